"""Tests for pz_flax.nn.linear_and_affine, differential against penzai 0.2.5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from penzai import pz as penzai_pz

from pz_flax.core import named_axes as nx
from pz_flax.core import shapecheck
from pz_flax.core import variables
from pz_flax.nn import grouping
from pz_flax.nn import linear_and_affine as la
from tests.nn import helpers

LINEAR_CONFIGS = [
    dict(input_axes={"foo": 3}, output_axes={"bar": 5}),
    dict(input_axes={"foo": 3, "qq": 2}, output_axes={"bar": 5, "rr": 4}),
    dict(input_axes={"foo": 3}, output_axes={"bar": 5}, parallel_axes={"baz": 7}),
    dict(
        input_axes={"foo": 3},
        output_axes={"bar": 5},
        parallel_axes={"baz": 7},
        parallel_broadcast_axes={"qux": 2},
    ),
    dict(input_axes={"foo": 3}, output_axes={"foo": 5}, parallel_axes={"baz": 7}),
]


def input_shape_for(config: dict) -> dict:
    return {"batch": 2, **config["input_axes"], **config.get("parallel_axes", {})}


class TestInitializers:
    @pytest.mark.parametrize(
        "initializer_name", ["xavier_uniform_initializer", "xavier_normal_initializer"]
    )
    def test_matches_penzai_values(self, initializer_name):
        axes = dict(
            input_axes={"i": 3, "j": 2},
            output_axes={"o": 4},
            parallel_axes={"h": 2},
            convolution_spatial_axes={"w": 3},
            dtype=jnp.float32,
        )
        ours = getattr(la, initializer_name)(jax.random.key(4), **axes)
        theirs = getattr(penzai_pz.nn, initializer_name)(jax.random.key(4), **axes)
        helpers.assert_same_named_array(ours, theirs, rtol=0, atol=0)

    @pytest.mark.parametrize("mode", ["fan_in", "fan_out", "fan_avg"])
    @pytest.mark.parametrize("distribution", ["uniform", "normal", "truncated_normal"])
    def test_variance_scaling_matches_penzai(self, mode, distribution):
        kwargs = dict(
            scale=2.0,
            mode=mode,
            distribution=distribution,
            input_axes={"i": 6},
            output_axes={"o": 5},
            parallel_axes={},
            convolution_spatial_axes={},
            dtype=jnp.float32,
        )
        ours = la.variance_scaling_initializer(jax.random.key(1), **kwargs)
        theirs = penzai_pz.nn.variance_scaling_initializer(jax.random.key(1), **kwargs)
        helpers.assert_same_named_array(ours, theirs, rtol=0, atol=0)

    def test_variance_scaling_with_no_axes_in_some_roles(self):
        weight = la.variance_scaling_initializer(
            jax.random.key(0),
            scale=1.0,
            mode="fan_in",
            distribution="normal",
            input_axes={},
            output_axes={"o": 3},
            parallel_axes={},
            convolution_spatial_axes={},
            dtype=jnp.bfloat16,
        )
        assert dict(weight.named_shape) == {"o": 3}
        assert weight.dtype == jnp.bfloat16

    def test_duplicate_axis_names_rejected(self):
        with pytest.raises(ValueError, match=r"Duplicate axis names.*'a'"):
            la.xavier_uniform_initializer(
                jax.random.key(0),
                input_axes={"a": 2},
                output_axes={"a": 3},
                parallel_axes={},
                convolution_spatial_axes={},
                dtype=jnp.float32,
            )
        with pytest.raises(ValueError, match="Duplicate"):
            la.zero_initializer(
                jax.random.key(0),
                input_axes={},
                output_axes={"a": 3},
                parallel_axes={"a": 3},
                convolution_spatial_axes={},
                dtype=jnp.float32,
            )

    def test_constant_and_zero_initializers(self):
        kwargs = dict(
            input_axes={"i": 2},
            output_axes={"o": 3},
            parallel_axes={"p": 1},
            convolution_spatial_axes={"s": 2},
            dtype=jnp.float16,
        )
        sevens = la.constant_initializer(7.0)(jax.random.key(0), **kwargs)
        assert dict(sevens.named_shape) == {"i": 2, "o": 3, "p": 1, "s": 2}
        assert sevens.dtype == jnp.float16
        np.testing.assert_array_equal(np.asarray(sevens.unwrap("i", "o", "p", "s")), 7.0)
        zeros = la.zero_initializer(jax.random.key(0), **kwargs)
        np.testing.assert_array_equal(np.asarray(zeros.unwrap("i", "o", "p", "s")), 0.0)


class TestContract:
    def test_matches_penzai_with_batch_axes_and_layouts(self):
        left = helpers.random_named(0, {"b": 2, "i": 3, "j": 4, "x": 5})
        right = helpers.random_named(1, {"j": 4, "b": 2, "i": 3, "y": 6})
        theirs = penzai_pz.nn.contract(
            ("i", "j"), helpers.to_penzai(left), helpers.to_penzai(right)
        )
        helpers.assert_same_named_array(la.contract(("i", "j"), left, right), theirs)
        # A transposed view and a single-name string argument give the same answer.
        view = left.untag("x", "b").tag("x", "b")
        theirs_one = penzai_pz.nn.contract("j", helpers.to_penzai(left), helpers.to_penzai(right))
        helpers.assert_same_named_array(la.contract("j", view, right), theirs_one)

    def test_mixed_dtypes_promote(self):
        left = helpers.random_named(0, {"i": 3}, jnp.bfloat16)
        right = helpers.random_named(1, {"i": 3, "o": 2})
        assert la.contract("i", left, right).dtype == jnp.float32

    def test_missing_axis_error_names_it(self):
        left = helpers.random_named(0, {"i": 3})
        right = helpers.random_named(1, {"o": 2})
        with pytest.raises(ValueError, match=r"axis 'i' must be present in both"):
            la.contract("i", left, right)

    def test_size_mismatch_error_names_axis_and_sizes(self):
        with pytest.raises(ValueError, match=r"axis 'i' has size 3 on the left but 4"):
            la.contract("i", helpers.random_named(0, {"i": 3}), helpers.random_named(1, {"i": 4}))
        with pytest.raises(ValueError, match=r"axis 'b' has size 2 on the left but 5"):
            la.contract(
                "i",
                helpers.random_named(0, {"i": 3, "b": 2}),
                helpers.random_named(1, {"i": 3, "b": 5}),
            )

    def test_positional_axes_rejected(self):
        left = nx.wrap(jnp.ones((2, 3))).tag_prefix("i")
        with pytest.raises(ValueError, match="positional axes"):
            la.contract("i", left, helpers.random_named(1, {"i": 2}))
        with pytest.raises(TypeError, match="must be a NamedArray"):
            la.contract("i", jnp.ones(3), helpers.random_named(1, {"i": 3}))


class TestLinear:
    @pytest.mark.parametrize("config", LINEAR_CONFIGS)
    def test_from_config_matches_penzai(self, config):
        ours = la.Linear.from_config(name="lin", init_base_rng=jax.random.key(3), **config)
        theirs = penzai_pz.nn.Linear.from_config(
            name="lin", init_base_rng=jax.random.key(3), **config
        )
        assert type(ours).__name__ == type(theirs).__name__
        x = helpers.random_named(7, input_shape_for(config))
        helpers.assert_same_named_array(ours(x), theirs(helpers.to_penzai(x)))
        our_linear = ours.sublayers[0] if isinstance(ours, la.LinearInPlace) else ours
        their_linear = (
            theirs.sublayers[0] if isinstance(theirs, penzai_pz.nn.LinearInPlace) else theirs
        )
        assert our_linear.weights.label == their_linear.weights.label == "lin.weights"
        assert isinstance(our_linear.weights, variables.Parameter)
        helpers.assert_same_named_array(
            our_linear.weights.value, their_linear.weights.value, rtol=0, atol=0
        )
        assert our_linear.input_axes == their_linear.input_axes
        assert our_linear.output_axes == their_linear.output_axes
        assert our_linear.parallel_axes == their_linear.parallel_axes
        assert our_linear.in_axis_names == their_linear.in_axis_names
        assert our_linear.out_axis_names == their_linear.out_axis_names

    def test_copied_weights_give_penzai_outputs(self):
        # Weights set independently of initialization, copied from penzai into pz_flax.
        theirs = penzai_pz.nn.Linear(
            weights=penzai_pz.Parameter(
                value=penzai_pz.nx.wrap(
                    np.asarray(jax.random.normal(jax.random.key(9), (4, 3, 2)))
                ).tag("o", "i", "h"),
                label="w",
            ),
            in_axis_names=("i",),
            out_axis_names=("o",),
        )
        weight = theirs.weights.value
        ours = la.Linear(
            weights=variables.Parameter(
                value=nx.wrap(jnp.asarray(weight.unwrap("o", "i", "h"))).tag("o", "i", "h"),
                label="w",
            ),
            in_axis_names=("i",),
            out_axis_names=("o",),
        )
        x = helpers.random_named(2, {"h": 2, "i": 3, "t": 5})
        helpers.assert_same_named_array(ours(x), theirs(helpers.to_penzai(x)))
        jitted = jax.jit(lambda layer, value: layer(value))(ours, x)
        helpers.assert_same_named_array(jitted, theirs(helpers.to_penzai(x)))

    def test_works_with_frozen_and_custom_parameter_like(self):
        layer = la.Linear.from_config("lin", jax.random.key(0), {"i": 3}, {"o": 2})
        x = helpers.random_named(1, {"i": 3})
        expected = layer(x)
        frozen = la.Linear(
            weights=layer.weights.freeze(), in_axis_names=("i",), out_axis_names=("o",)
        )
        helpers.assert_same_named_array(frozen(x), expected, rtol=0, atol=0)

        class Doubled:
            def __init__(self, inner):
                self.inner = inner

            @property
            def value(self):
                return self.inner.value * 2

        custom = la.Linear.from_attributes(
            weights=Doubled(layer.weights), in_axis_names=("i",), out_axis_names=("o",)
        )
        helpers.assert_same_named_array(custom(x), expected * 2)
        with pytest.raises(shapecheck.StructureMismatchError, match=r"^Linear layer with"):
            custom(helpers.random_named(1, {"i": 4}))

    def test_wrong_size_error_names_layer_axis_and_sizes(self):
        layer = la.Linear.from_config("encoder/proj", jax.random.key(0), {"i": 3}, {"o": 2})
        with pytest.raises(
            shapecheck.StructureMismatchError,
            match=r"Linear layer 'encoder/proj'.*input axis 'i' has size 4, but the weights"
            r" expect 3",
        ):
            layer(helpers.random_named(0, {"i": 4, "batch": 2}))

    def test_missing_axis_error(self):
        layer = la.Linear.from_config(
            "proj", jax.random.key(0), {"i": 3}, {"o": 2}, parallel_axes={"h": 2}
        )
        with pytest.raises(
            shapecheck.StructureMismatchError,
            match=r"Linear layer 'proj'.*input axis 'h' \(size 2\) is missing",
        ):
            layer(helpers.random_named(0, {"i": 3}))

    def test_output_axis_in_input_rejected(self):
        layer = la.Linear.from_config("proj", jax.random.key(0), {"i": 3}, {"o": 2})
        with pytest.raises(
            shapecheck.StructureMismatchError,
            match=r"output axis 'o' \(size 2\) is already in the input \(size 2\)",
        ):
            layer(helpers.random_named(0, {"i": 3, "o": 2}))

    def test_non_float_positional_and_unnamed_inputs_rejected(self):
        layer = la.Linear.from_config("proj", jax.random.key(0), {"i": 3}, {"o": 2})
        with pytest.raises(shapecheck.StructureMismatchError, match="not a floating type"):
            layer(nx.wrap(jnp.ones((3,), jnp.int32)).tag("i"))
        with pytest.raises(shapecheck.StructureMismatchError, match="positional axes"):
            layer(nx.wrap(jnp.ones((2, 3))).tag_prefix("i"))
        with pytest.raises(shapecheck.StructureMismatchError, match="not a NamedArray"):
            layer(jnp.ones((3,)))

    def test_from_config_without_rng_builds_slot(self):
        layer = la.Linear.from_config("proj", None, {"i": 3}, {"o": 2})
        assert layer.weights == variables.ParameterSlot("proj.weights")

    def test_from_config_overlap_without_rename_raises(self):
        with pytest.raises(ValueError, match=r"must not overlap \(both contain \['i'\]\)"):
            la.Linear.from_config(
                "p", jax.random.key(0), {"i": 3}, {"i": 4}, rename_outputs_if_necessary=False
            )

    def test_from_config_rename_conflict_raises(self):
        with pytest.raises(ValueError, match="'i_out' is already used"):
            la.Linear.from_config("p", jax.random.key(0), {"i": 3, "i_out": 2}, {"i": 4})

    def test_from_config_parallel_overlap_raises(self):
        with pytest.raises(ValueError, match="parallel_axes and parallel_broadcast_axes"):
            la.Linear.from_config(
                "p", jax.random.key(0), {"i": 3}, {"o": 4}, parallel_axes={"i": 3}
            )
        with pytest.raises(ValueError, match="parallel_axes and parallel_broadcast_axes"):
            la.Linear.from_config(
                "p",
                jax.random.key(0),
                {"i": 3},
                {"o": 4},
                parallel_axes={"h": 2},
                parallel_broadcast_axes={"h": 2},
            )

    def test_in_place_structure(self):
        layer = la.Linear.from_config("p", jax.random.key(0), {"e": 3}, {"e": 4})
        assert isinstance(layer, la.LinearInPlace)
        assert isinstance(layer, grouping.Sequential)
        linear, rename = layer.sublayers
        assert linear.out_axis_names == ("e_out",)
        assert rename == la.RenameAxes(old=("e_out",), new=("e",))

    def test_input_and_output_structure(self):
        layer = la.Linear.from_config(
            "p",
            jax.random.key(0),
            {"i": 3},
            {"o": 2},
            parallel_axes={"h": 4},
            parallel_broadcast_axes={"q": 5},
        )
        x = helpers.random_named(0, {"b": 6, "i": 3, "h": 4})
        found = shapecheck.check_structure(x, layer.input_structure())
        shapecheck.check_structure(layer(x), layer.output_structure(), known_vars=found)
        with pytest.raises(shapecheck.StructureMismatchError):
            shapecheck.check_structure(
                helpers.random_named(0, {"i": 2, "h": 4}), layer.input_structure()
            )

    def test_gradients_match_penzai(self):
        config = LINEAR_CONFIGS[2]
        ours = la.Linear.from_config(name="lin", init_base_rng=jax.random.key(3), **config)
        theirs = penzai_pz.nn.Linear.from_config(
            name="lin", init_base_rng=jax.random.key(3), **config
        )
        x = helpers.random_named(7, input_shape_for(config))

        def our_loss(weight_data):
            layer = la.Linear(
                weights=variables.ParameterValue(
                    label="w", value=nx.wrap(weight_data).tag("baz", "foo", "bar")
                ),
                in_axis_names=ours.in_axis_names,
                out_axis_names=ours.out_axis_names,
            )
            return jnp.sum(layer(x).unwrap("batch", "baz", "bar") ** 2)

        def their_loss(weight_data):
            layer = penzai_pz.nn.Linear(
                weights=penzai_pz.ParameterValue(
                    label="w", value=penzai_pz.nx.wrap(weight_data).tag("baz", "foo", "bar")
                ),
                in_axis_names=theirs.in_axis_names,
                out_axis_names=theirs.out_axis_names,
            )
            return jnp.sum(layer(helpers.to_penzai(x)).unwrap("batch", "baz", "bar") ** 2)

        weight_data = jnp.asarray(ours.weights.value.unwrap("baz", "foo", "bar"))
        np.testing.assert_allclose(
            jax.grad(our_loss)(weight_data), jax.grad(their_loss)(weight_data), rtol=1e-5
        )


class TestAddBiasAffine:
    def test_add_bias_matches_penzai(self):
        kwargs = dict(
            name="b",
            init_base_rng=jax.random.key(1),
            biased_axes={"foo": 3},
            new_output_axes={"bar": 5},
            initializer=la.xavier_normal_initializer,
        )
        ours = la.AddBias.from_config(**kwargs)
        theirs = penzai_pz.nn.AddBias.from_config(
            **{**kwargs, "initializer": penzai_pz.nn.xavier_normal_initializer}
        )
        assert ours.bias.label == "b.bias"
        assert ours.new_axis_names == ("bar",)
        x = helpers.random_named(3, {"batch": 2, "foo": 3})
        helpers.assert_same_named_array(ours(x), theirs(helpers.to_penzai(x)))
        shapecheck.check_structure(x, ours.input_structure())
        shapecheck.check_structure(ours(x), ours.output_structure())

    def test_add_bias_defaults_to_zeros(self):
        layer = la.AddBias.from_config("b", jax.random.key(1), {"foo": 3})
        x = helpers.random_named(3, {"foo": 3})
        helpers.assert_same_named_array(layer(x), x, rtol=0, atol=0)
        assert la.AddBias.from_config("b", None, {"foo": 3}).bias == variables.ParameterSlot(
            "b.bias"
        )

    def test_add_bias_wrong_size_names_layer_axis_and_sizes(self):
        layer = la.AddBias.from_config("block/bias", jax.random.key(1), {"foo": 3})
        with pytest.raises(
            ValueError,
            match=r"AddBias layer 'block/bias': input axis 'foo' has size 4, but the bias has"
            r" size 3",
        ):
            layer(helpers.random_named(0, {"foo": 4}))
        # A missing biased axis is an error (penzai broadcasts it in silently), unless the
        # bias declares it as a new axis.
        with pytest.raises(
            ValueError, match=r"'block/bias': the input has no axis named \['foo'\]"
        ):
            layer(helpers.random_named(0, {"batch": 2}))
        adding = la.AddBias(bias=layer.bias, new_axis_names=("foo",))
        broadcast = adding(helpers.random_named(0, {"batch": 2}))
        assert dict(broadcast.named_shape) == {"batch": 2, "foo": 3}

    @pytest.mark.parametrize("config", LINEAR_CONFIGS)
    def test_affine_matches_penzai(self, config):
        kwargs = dict(
            name="aff",
            init_base_rng=jax.random.key(5),
            bias_initializer=la.constant_initializer(0.5),
            **config,
        )
        ours = la.Affine.from_config(**kwargs)
        theirs = penzai_pz.nn.Affine.from_config(
            **{**kwargs, "bias_initializer": penzai_pz.nn.constant_initializer(0.5)}
        )
        assert [type(s).__name__ for s in ours.sublayers] == [
            type(s).__name__ for s in theirs.sublayers
        ]
        assert ours.sublayers[0].weights.label == "aff/Linear.weights"
        assert ours.sublayers[-1].bias.label == "aff/AddBias.bias"
        x = helpers.random_named(11, input_shape_for(config))
        helpers.assert_same_named_array(ours(x), theirs(helpers.to_penzai(x)))


class TestSmallLayers:
    def test_rename_axes_single_and_multi(self):
        x = helpers.random_named(0, {"foo": 2, "baz": 3, "x": 4})
        one = la.RenameAxes(old="foo", new="bar")(x)
        helpers.assert_same_named_array(
            one, penzai_pz.nn.RenameAxes(old="foo", new="bar")(helpers.to_penzai(x)), rtol=0, atol=0
        )
        multi = la.RenameAxes(old=("foo", "x"), new=("bar", "y"))
        theirs = penzai_pz.nn.RenameAxes(old=("foo", "x"), new=("bar", "y"))(helpers.to_penzai(x))
        helpers.assert_same_named_array(multi(x), theirs, rtol=0, atol=0)
        found = shapecheck.check_structure(x, multi.input_structure())
        shapecheck.check_structure(multi(x), multi.output_structure(), known_vars=found)

    def test_rename_axes_errors(self):
        x = helpers.random_named(0, {"foo": 2})
        with pytest.raises(ValueError, match=r"without axis 'nope'"):
            la.RenameAxes(old="nope", new="bar")(x)
        with pytest.raises(ValueError, match="as many new names"):
            la.RenameAxes(old=("foo",), new=("a", "b"))(x)

    def test_constant_rescale(self):
        x = helpers.random_named(0, {"foo": 3})
        result = la.ConstantRescale(3.0)(x)
        helpers.assert_same_named_array(
            result, penzai_pz.nn.ConstantRescale(3.0)(helpers.to_penzai(x))
        )
        tree = la.ConstantRescale(2.0)({"a": jnp.ones(2), "b": x})
        np.testing.assert_array_equal(np.asarray(tree["a"]), 2.0)
        helpers.assert_same_named_array(tree["b"], x * 2, rtol=0, atol=0)


class TestNamedEinsum:
    CASES = [
        (
            (
                {"tokens": "t", "heads": "h", "projection": "p"},
                {"kv_tokens": "s", "heads": "h", "projection": "p"},
            ),
            {"heads": "h", "tokens": "t", "kv_tokens": "s"},
            [
                {"batch": 2, "tokens": 2, "heads": 3, "projection": 4},
                {"batch": 2, "kv_tokens": 5, "heads": 3, "projection": 4},
            ],
        ),
        (
            (("tokens", "heads", "projection"), ("kv_tokens", "heads", "projection")),
            ("heads", "tokens", "kv_tokens"),
            [
                {"batch": 1, "projection": 4, "tokens": 2, "heads": 3},
                {"batch": 1, "kv_tokens": 5, "heads": 3, "projection": 4},
            ],
        ),
        (
            ({"foo": "i", "bar": "i", "baz": "j"}, {"foo": "j", "qux": "k"}),
            {"x": "i", "y": "k", "z": "j"},
            [{"batch": 1, "foo": 3, "bar": 3, "baz": 4}, {"batch": 1, "foo": 4, "qux": 5}],
        ),
    ]

    @pytest.mark.parametrize(("input_axes", "output_axes", "shapes"), CASES)
    def test_matches_penzai(self, input_axes, output_axes, shapes):
        arrays = tuple(helpers.random_named(i, shape) for i, shape in enumerate(shapes))
        ours = la.NamedEinsum(input_axes, output_axes)(arrays)
        theirs = penzai_pz.nn.NamedEinsum(input_axes, output_axes)(
            tuple(helpers.to_penzai(a) for a in arrays)
        )
        helpers.assert_same_named_array(ours, theirs, rtol=1e-5, atol=1e-5)
        layer = la.NamedEinsum(input_axes, output_axes)
        found = shapecheck.check_structure(arrays, layer.input_structure())
        shapecheck.check_structure(ours, layer.output_structure(), known_vars=found)

    def test_inconsistent_index_size_raises(self):
        layer = la.NamedEinsum((("i", "j"), ("j", "k")), ("i", "k"))
        with pytest.raises(shapecheck.StructureMismatchError, match="NamedEinsum"):
            layer(
                (
                    helpers.random_named(0, {"i": 2, "j": 3}),
                    helpers.random_named(1, {"j": 4, "k": 5}),
                )
            )

    def test_different_batch_axes_raise(self):
        layer = la.NamedEinsum((("i",), ("i",)), ("i",))
        with pytest.raises(shapecheck.StructureMismatchError):
            layer((helpers.random_named(0, {"i": 2, "b": 3}), helpers.random_named(1, {"i": 2})))

    def test_unknown_output_index_raises(self):
        layer = la.NamedEinsum((("i",),), {"o": "zz"})
        with pytest.raises(ValueError, match=r"uses summation indices \['zz'\]"):
            layer((helpers.random_named(0, {"i": 2}),))


def test_model_is_differentiable_and_visible_to_nnx():
    config = dict(input_axes={"f": 3}, output_axes={"g": 2}, parallel_axes={"h": 2})
    ours = la.Affine.from_config("aff", jax.random.key(0), **config)
    theirs = penzai_pz.freeze_params(
        penzai_pz.nn.Affine.from_config("aff", jax.random.key(0), **config)
    )
    x = helpers.random_named(1, {"b": 4, "f": 3, "h": 2})

    labels = sorted(
        variable.label
        for variable in jax.tree_util.tree_leaves(
            nnx.state(ours, nnx.Param), is_leaf=lambda n: isinstance(n, nnx.Variable)
        )
    )
    assert labels == ["aff/AddBias.bias", "aff/Linear.weights"]

    our_grads = jax.grad(lambda model: jnp.sum(jnp.sin(model(x).unwrap("b", "h", "g"))))(ours)
    their_grads = jax.grad(
        lambda model: jnp.sum(jnp.sin(model(helpers.to_penzai(x)).unwrap("b", "h", "g")))
    )(theirs)
    helpers.assert_same_named_array(
        our_grads.sublayers[0].weights.value, their_grads.sublayers[0].weights.value, rtol=1e-5
    )
    helpers.assert_same_named_array(
        our_grads.sublayers[1].bias.value, their_grads.sublayers[1].bias.value, rtol=1e-5
    )


@pytest.mark.parametrize(
    "qualified_name",
    [
        "Linear.from_config",
        "Linear.__call__",
        "AddBias.from_config",
        "AddBias.__call__",
        "Affine.from_config",
        "RenameAxes.__call__",
        "ConstantRescale.__call__",
        "NamedEinsum.__call__",
        "contract",
        "variance_scaling_initializer",
        "constant_initializer",
        "check_unique_axis_names_for_initializer",
        "LinearOperatorWeightInitializer.__call__",
        "Linear.__init__",
        "AddBias.__init__",
        "NamedEinsum.__init__",
    ],
)
def test_signature_matches_penzai(qualified_name):
    helpers.assert_signature_matches_penzai(la, "penzai.nn.linear_and_affine", qualified_name)


def test_contract_promotes_like_tensordot():
    cases = [
        (jnp.bfloat16, jnp.float32),
        (jnp.int32, jnp.float32),
        (jnp.float16, jnp.bfloat16),
    ]
    for left_dtype, right_dtype in cases:
        left = nx.wrap(jnp.ones((2, 3), left_dtype)).tag("a", "i")
        right = nx.wrap(jnp.ones((3,), right_dtype)).tag("i")
        expected = jnp.tensordot(jnp.ones((2, 3), left_dtype), jnp.ones((3,), right_dtype), 1)
        result = la.contract("i", left, right)
        assert result.dtype == expected.dtype
        np.testing.assert_allclose(np.asarray(result.unwrap("a"), np.float32), 3.0)
    # A weakly typed operand defers to the other one's dtype, as in jnp.tensordot.
    weak_data = jnp.broadcast_to(jnp.asarray(2.0), (3,))
    assert weak_data.weak_type
    bf16_data = jnp.ones((3,), jnp.bfloat16)
    result = la.contract("i", nx.wrap(bf16_data).tag("i"), nx.wrap(weak_data).tag("i"))
    assert result.dtype == jnp.tensordot(bf16_data, weak_data, 1).dtype == jnp.bfloat16
