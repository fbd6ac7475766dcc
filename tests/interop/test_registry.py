"""Tests of the mapping registry: user mappings, elementwise functions, contexts."""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pz_flax._compat import nnx as compat_nnx
from pz_flax.core import named_axes
from pz_flax.core import variables
from pz_flax.interop import convert
from pz_flax.interop import mappings
from pz_flax.interop import naming
from pz_flax.interop import registry
from pz_flax.interop import wrappers
from pz_flax.nn import basic_ops
from pz_flax.nn import linear_and_affine
from tests.interop import helpers


class Scale(nnx.Module):
    """A user layer: multiplies the features by a learned vector."""

    def __init__(self, features, *, rngs):
        self.scale = nnx.Param(jax.random.normal(rngs.params(), (features,)))

    def __call__(self, x):
        return x * self.scale[...]


class ScaleMapping(registry.LayerMapping):
    nnx_type = Scale
    pz_types = ()

    def to_pz(self, module, context):
        features = context.naming.features
        return linear_and_affine.Linear(
            weights=context.parameter(module.scale, "scale", (features,)),
            in_axis_names=(),
            out_axis_names=(),
        )

    def to_nnx(self, layer, context, config):
        if type(layer) is not linear_and_affine.Linear or layer.in_axis_names:
            return None
        names = tuple(layer.weights.value.named_shape)
        array = context.array(layer.weights, names)
        return context.construct(
            Scale, array.shape[0], variables_by_path={"scale": (layer.weights, array)}
        )


@pytest.fixture
def scale_mapping():
    with registry.mapping_registry.scoped(Scale, ScaleMapping()) as mapping:
        yield mapping


def test_user_mapping_converts_both_ways(scale_mapping):
    assert registry.get_mapping(Scale) is scale_mapping
    assert registry.registered_mappings()[Scale] is scale_mapping
    module = Scale(3, rngs=nnx.Rngs(0))
    layer = convert.from_nnx(module)
    assert isinstance(layer, wrappers.FromNNX)
    assert type(layer.layer) is linear_and_affine.Linear
    x = helpers.random_input((2, 3))
    result = layer(helpers.named(x, "batch", "features")).unwrap("batch", "features")
    np.testing.assert_allclose(result, module(x), rtol=1e-6)
    helpers.assert_same_state(module, convert.to_nnx(layer))


def test_without_a_mapping_the_user_class_is_wrapped():
    module = Scale(3, rngs=nnx.Rngs(0))
    assert registry.get_mapping(Scale) is None
    assert isinstance(convert.from_nnx(module), wrappers.NNXWrapper)


def test_register_and_unregister_mapping_functions():
    with registry.mapping_registry.isolated():
        mapping = registry.register_mapping(ScaleMapping())
        assert registry.get_mapping(Scale) is mapping
        assert isinstance(convert.from_nnx(Scale(3, rngs=nnx.Rngs(0))), wrappers.FromNNX)
        assert registry.unregister_mapping(Scale) is mapping
        assert registry.get_mapping(Scale) is None
        assert Scale not in registry.registered_mappings()
        assert isinstance(convert.from_nnx(Scale(3, rngs=nnx.Rngs(0))), wrappers.NNXWrapper)


def test_register_rejects_duplicates_and_bad_input(scale_mapping):
    with pytest.raises(
        ValueError, match=r"Scale is already in the NNX layer mappings registry \(as ScaleMapping"
    ):
        registry.register_mapping(ScaleMapping())
    with registry.mapping_registry.isolated():
        replacement = registry.register_mapping(ScaleMapping(), replace=True)
        assert registry.get_mapping(Scale) is replacement
    assert registry.get_mapping(Scale) is scale_mapping
    with pytest.raises(TypeError, match="expects a LayerMapping instance, got str"):
        registry.register_mapping("mapping")

    class NoType(ScaleMapping):
        nnx_type = None

    with pytest.raises(TypeError, match="nnx_type must be an NNX module class"):
        registry.register_mapping(NoType())
    with pytest.raises(KeyError, match=r"builtins\.int is not in the NNX layer mappings registry"):
        registry.unregister_mapping(int)


def test_the_mapping_registry_checks_direct_entries():
    table = registry.mapping_registry
    with pytest.raises(TypeError, match="takes LayerMapping instances, got str"):
        table.register(Scale, "mapping")
    with pytest.raises(TypeError, match="converts Scale, so it must be registered under that"):
        table.register(nnx.Linear, ScaleMapping())
    with pytest.raises(TypeError, match="converts Scale"), table.scoped(int, ScaleMapping()):
        pass
    assert Scale not in table
    assert table.get(nnx.Linear) is not None


def test_scoped_mappings_are_undone_and_restore_what_they_replaced():
    table = registry.mapping_registry
    builtin_linear = table[nnx.Linear]
    before = table.snapshot()

    class ReplacementLinearMapping(mappings.LinearMapping):
        pass

    with table.scoped(nnx.Linear, ReplacementLinearMapping(), replace=True) as replacement:
        assert registry.get_mapping(nnx.Linear) is replacement
    assert registry.get_mapping(nnx.Linear) is builtin_linear
    assert table.snapshot() == before
    assert list(table) == list(before)  # same order: native to_nnx priorities unchanged
    with (
        pytest.raises(ValueError, match="already in the NNX layer mappings registry"),
        table.scoped(nnx.Linear, ReplacementLinearMapping()),
    ):
        pass
    assert registry.get_mapping(nnx.Linear) is builtin_linear


def test_the_pz_type_index_follows_the_table():
    class NativeScaleMapping(ScaleMapping):
        pz_types = (linear_and_affine.Linear,)

    builtin = registry.mappings_for_pz_type(linear_and_affine.Linear)
    assert builtin and all(type(m).__module__ == mappings.__name__ for m in builtin)
    with registry.mapping_registry.scoped(Scale, NativeScaleMapping()) as user_mapping:
        # The most recently registered mapping is tried first.
        assert registry.mappings_for_pz_type(linear_and_affine.Linear) == (user_mapping, *builtin)
        scale = linear_and_affine.Linear(
            weights=variables.Parameter(value=helpers.named(jnp.ones(3), "features"), label="s"),
            in_axis_names=(),
            out_axis_names=(),
        )
        assert isinstance(convert.to_nnx(scale, native=True), Scale)
    assert registry.mappings_for_pz_type(linear_and_affine.Linear) == builtin
    assert registry.mappings_for_pz_type(Scale) == ()


def test_a_mapping_that_does_not_round_trip_exactly_falls_back_to_a_wrapper():
    class LossyMapping(ScaleMapping):
        def to_nnx(self, layer, context, config):
            module = super().to_nnx(layer, context, config)
            module.extra = 1  # a static attribute the original does not have
            return module

    with registry.mapping_registry.scoped(Scale, LossyMapping()):
        module = Scale(3, rngs=nnx.Rngs(0))
        assert isinstance(convert.from_nnx(module), wrappers.NNXWrapper)
        with pytest.raises(ValueError, match="different graph definition"):
            convert.from_nnx(module, strict=True)


def test_mapping_naming_overrides_apply_to_its_class():
    class RenamingMapping(ScaleMapping):
        naming = {"features": "channels"}

    with registry.mapping_registry.scoped(Scale, RenamingMapping()):
        layer = convert.from_nnx(Scale(3, rngs=nnx.Rngs(0)))
        assert dict(layer.layer.weights.value.named_shape) == {"channels": 3}


def _cube(x):
    return x**3


def test_declared_elementwise_functions_convert_to_elementwise_and_back():
    assert isinstance(convert.from_nnx(_cube), wrappers.WrappedCallable)
    with basic_ops.elementwise_function_registry.scoped(_cube, "cube"):
        layer = convert.from_nnx(_cube)
        assert layer == basic_ops.Elementwise(_cube)
        module = convert.to_nnx(layer, native=True)
        assert isinstance(module, nnx.Sequential) and module.layers[0] is _cube
    assert isinstance(convert.from_nnx(_cube), wrappers.WrappedCallable)
    with pytest.raises(ValueError, match="Elementwise has no native NNX counterpart"):
        convert.to_nnx(basic_ops.Elementwise(_cube), native=True)


def test_interop_reads_the_one_elementwise_table():
    from pz_flax import interop

    assert interop.elementwise_function_registry is basic_ops.elementwise_function_registry
    assert interop.register_elementwise_function is basic_ops.register_elementwise_function
    # Every function nn knows to be elementwise converts from NNX code as Elementwise.
    for fn in (jnp.exp, jax.nn.mish, jax.lax.erf, jax.nn.identity, nnx.relu, nnx.tanh):
        assert convert.from_nnx(fn) == basic_ops.Elementwise(fn)
    leaky = functools.partial(jax.nn.leaky_relu, negative_slope=0.2)
    assert isinstance(convert.from_nnx(leaky), wrappers.WrappedCallable)


def test_context_array_returns_stored_array_or_reorders():
    array = jnp.arange(6.0).reshape(2, 3)
    parameter = variables.Parameter(value=helpers.named(array, "a", "b"), label="w")
    context = registry.ToNNXContext(
        naming=naming.DEFAULT_NAMING, native=False, convert_child=lambda layer: layer
    )
    assert context.array(parameter, ("a", "b")) is array
    np.testing.assert_array_equal(context.array(parameter, ("b", "a")), array.T)
    with pytest.raises(registry.LayerShapeMismatch, match=r"exactly the named axes \('a', 'c'\)"):
        context.array(parameter, ("a", "c"))
    with pytest.raises(ValueError, match="got named axes"):
        context.array(parameter, None)
    positional = variables.Parameter(value=array, label="p")
    assert context.array(positional, None) is array
    with pytest.raises(ValueError, match="is a positional array"):
        context.array(positional, ("a", "b"))
    with pytest.raises(registry.LayerShapeMismatch, match="Expected a parameter, got ArrayImpl"):
        context.array(array, None)


def test_context_construct_checks_variables():
    context = registry.ToNNXContext(
        naming=naming.DEFAULT_NAMING, native=False, convert_child=lambda layer: layer
    )
    kernel = jnp.ones((2, 3))
    # Wrong paths are the mapping's mistake (reported), not a layer of another shape (declined).
    with pytest.raises(ValueError, match=r"missing \['bias'\]") as raised:
        context.construct(nnx.Linear, 2, 3, variables_by_path={"kernel": (None, kernel)})
    assert not isinstance(raised.value, registry.MappingNotApplicable)
    with pytest.raises(registry.LayerShapeMismatch, match=r"'kernel' needs shape \(2, 3\)"):
        context.construct(
            nnx.Linear,
            2,
            3,
            use_bias=False,
            variables_by_path={"kernel": (None, jnp.ones((3, 2)))},
        )
    module = context.construct(
        nnx.Linear, 2, 3, use_bias=False, variables_by_path={"kernel": (None, kernel)}
    )
    assert module.kernel.get_value() is kernel


def test_context_parameter_carries_nnx_metadata():
    module = nnx.Linear(2, 3, kernel_metadata={"note": "frozen"}, rngs=nnx.Rngs(0))
    context = registry.FromNNXContext(
        naming=naming.DEFAULT_NAMING, path=("encoder",), convert_child=None
    )
    parameter = context.parameter(module.kernel, "kernel", ("features", "features_out"))
    assert parameter.label == "encoder/kernel"
    assert parameter.metadata == {"note": "frozen"}
    assert parameter.get_value() is module.kernel.get_value()
    with pytest.raises(ValueError, match="cannot take the axis names"):
        context.parameter(module.kernel, "kernel", ("features",))
    rebuilt = convert.to_nnx(convert.from_nnx(module))
    assert rebuilt.kernel.get_metadata()["note"] == "frozen"


def test_unhashable_metadata_is_not_carried_and_the_module_is_wrapped():
    module = nnx.Linear(2, 3, kernel_metadata={"tags": ["a", "b"]}, rngs=nnx.Rngs(0))
    assert registry.user_metadata(module.kernel) == {}
    layer = convert.from_nnx(module)
    assert isinstance(layer, wrappers.NNXWrapper)
    rebuilt = convert.to_nnx(layer)
    assert rebuilt.kernel.get_metadata()["tags"] == ["a", "b"]


def _sources():
    with nnx.use_eager_sharding(False):
        sharded = nnx.Param(
            jnp.ones((2, 3)), **{compat_nnx.nnx_metadata_keys().sharding: ("data", None)}
        )
    noted = nnx.Param(jnp.ones((2, 3)))
    noted.set_metadata("note", "kept")
    return {
        "plain": (nnx.Param(jnp.ones((2, 3))), variables.Parameter),
        "sharded, not eagerly": (sharded, variables.Parameter),
        "user metadata": (noted, variables.Parameter),
        "state": (nnx.BatchStat(jnp.zeros((2, 3))), variables.StateVariable),
    }


@pytest.mark.parametrize("case", sorted(_sources()))
@pytest.mark.parametrize("axis_names", [("batch", "features"), None])
def test_pz_variable_like_builds_what_the_constructor_builds(case, axis_names):
    source, pz_class = _sources()[case]
    raw = source.get_value()
    fast = registry.pz_variable_like(source, pz_class, raw, "a/b", axis_names=axis_names)
    # A NamedArray value takes the constructor route.
    value = raw if axis_names is None else named_axes.wrap(raw).tag(*axis_names)
    with mock.patch.object(registry, "_plain_variable_metadata", return_value=None):
        built = registry.pz_variable_like(source, pz_class, value, "a/b")
    assert type(fast) is type(built) is pz_class
    assert fast.get_metadata() == built.get_metadata()
    assert fast.get_raw_value() is built.get_raw_value() is raw
    assert fast.label == "a/b"
    if axis_names is not None:
        assert dict(fast.value.named_shape) == {"batch": 2, "features": 3}
    # Metadata is attached, never applied: no mesh is needed, no array is moved.
    assert fast.get_metadata().get("eager_sharding") == source.get_metadata()["eager_sharding"]


def test_pz_variable_like_reports_bad_axis_names_as_tag_does():
    source = nnx.Param(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="Repeated axis names"):
        registry.pz_variable_like(
            source, variables.Parameter, source.get_value(), "w", axis_names=("a", "a")
        )
    with pytest.raises(ValueError, match="exactly as many names"):
        registry.pz_variable_like(
            source, variables.Parameter, source.get_value(), "w", axis_names=("a",)
        )


class _Doubled(nnx.Param):
    """A variable type with its own getter, as NNX suggests instead of hooks."""

    def get_value(self, **kwargs):
        return super().get_value(**kwargs) * 2


def test_variable_value_is_the_getters_value():
    plain = nnx.Param(jnp.ones(3))
    assert registry.variable_value(plain) is plain.get_raw_value()
    doubled = _Doubled(jnp.ones(3))
    np.testing.assert_array_equal(registry.variable_value(doubled), jnp.full(3, 2.0))
