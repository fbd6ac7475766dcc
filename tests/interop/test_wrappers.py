"""Tests of the wrapper layers: FromNNX, NNXWrapper, WrappedCallable and PzModule."""

import dataclasses
import functools
import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import treescope
from flax import nnx

from pz_flax.core import named_axes
from pz_flax.core import variables
from pz_flax.interop import convert
from pz_flax.interop import wrappers
from pz_flax.nn import linear_and_affine
from tests.interop import helpers


def test_from_nnx_layer_runs_its_layer():
    inner = linear_and_affine.RenameAxes(old="a", new="b")
    layer = wrappers.FromNNX(layer=inner, nnx_type=nnx.Linear)
    x = helpers.named(jnp.ones((2,)), "a")
    assert dict(layer(x).named_shape) == {"b": 2}
    assert layer.nnx_config == {}


def test_conv_is_wrapped_with_named_kernel_and_exact_output():
    conv = nnx.Conv(3, 4, (3, 3), strides=2, rngs=nnx.Rngs(0))
    layer = convert.from_nnx(conv)
    assert isinstance(layer, wrappers.NNXWrapper)
    kernel = layer.variables["kernel"]
    assert dict(kernel.value.named_shape) == {
        "height": 3,
        "width": 3,
        "features": 3,
        "features_out": 4,
    }
    assert kernel.get_value() is conv.kernel.get_value()
    images = helpers.random_input((2, 6, 6, 3))
    names = ("batch", "height", "width", "features")
    result = layer(helpers.named(images, *names)).unwrap(*names)
    np.testing.assert_array_equal(result, conv(images))
    helpers.assert_same_state(conv, convert.to_nnx(layer))


def test_conv1d_uses_seq_axis_and_gradients_match():
    conv = nnx.Conv(2, 3, (3,), rngs=nnx.Rngs(0))
    layer = convert.from_nnx(conv)
    assert next(iter(layer.variables["kernel"].value.named_shape)) == "seq"
    x = helpers.random_input((2, 7, 2))
    names = ("batch", "seq", "features")
    pz_grads = helpers.pz_parameter_grads(
        layer, lambda layer: jnp.sum(layer(helpers.named(x, *names)).unwrap(*names) ** 2)
    )
    nnx_grads = helpers.nnx_parameter_grads(conv, lambda conv: jnp.sum(conv(x) ** 2))
    for key in nnx_grads:
        np.testing.assert_allclose(pz_grads[key], nnx_grads[key], rtol=1e-5, atol=1e-6)


def test_wrapper_passes_plain_arrays_through_positionally():
    conv = nnx.Conv(3, 2, (2, 2), rngs=nnx.Rngs(0))
    layer = convert.from_nnx(conv)
    images = helpers.random_input((1, 4, 4, 3))
    np.testing.assert_array_equal(layer(images), conv(images))


def test_wrapper_keeps_positional_axes_in_front():
    norm = nnx.BatchNorm(3, use_running_average=True, rngs=nnx.Rngs(0))
    layer = convert.from_nnx(norm)
    data = helpers.random_input((2, 5, 3))
    partially_named = named_axes.wrap(data).tag("batch", "seq", "features").untag_prefix("batch")
    result = layer(partially_named)
    assert result.positional_shape == (2,)
    assert dict(result.named_shape) == {"seq": 5, "features": 3}
    np.testing.assert_allclose(result.with_positional_prefix().data_array, norm(data), rtol=1e-6)


class Pool(nnx.Module):
    """Averages away the spatial axes; its output has fewer axes than its input."""

    def __call__(self, x):
        return jnp.mean(x, axis=(1, 2))


def test_wrapper_output_naming_rules_and_errors():
    images = helpers.named(
        helpers.random_input((2, 4, 4, 3)), "batch", "height", "width", "features"
    )
    # Which input axes survive the pooling is found by resizing them one at a time.
    assert dict(convert.from_nnx(Pool())(images).named_shape) == {"batch": 2, "features": 3}
    with pytest.raises(ValueError, match="fewer axes than the 0 positional and 3 batch axes"):
        convert.from_nnx(PoolTransposed())(images)
    pooled = convert.from_nnx(Pool(), input_axes=("height", "width", "features"))
    assert dict(pooled(images).named_shape) == {"batch": 2, "features": 3}
    renamed = convert.from_nnx(
        Pool(), input_axes=("height", "width", "features"), output_axes=("channels",)
    )
    assert dict(renamed(images).named_shape) == {"batch": 2, "channels": 3}


class PoolTransposed(nnx.Module):
    """Pools, then puts the batch axis last: the kept axis is not where pz_flax can name it."""

    def __call__(self, x):
        return jnp.mean(x, axis=(1, 2)).T


class Masked(nnx.Module):
    """Takes a keyword argument besides its input."""

    def __init__(self):
        self.offset = nnx.Param(jnp.ones((3,)))

    def __call__(self, x, mask=None):
        out = x + self.offset[...]
        return out if mask is None else jnp.where(mask, out, 0.0)


class NeedsPositions(nnx.Module):
    """Takes a required argument, an optional one and ``**kwargs``."""

    def __init__(self):
        self.offset = nnx.Param(jnp.ones((3,)))

    def __call__(self, x, positions, *, scale=1.0, **extra):
        return (x + self.offset[...] + positions) * scale + sum(extra.values())


def test_side_inputs_named_like_call_parameters_become_keyword_arguments():
    layer = convert.from_nnx(Masked())
    assert layer.call_signature == wrappers.CallSignature(("mask",), (), False)
    x = helpers.named(jnp.ones((2, 3)), "batch", "features")
    mask = jnp.array([[True, False, True], [False, True, True]])
    result = layer(x, mask=mask, unrelated=1).unwrap("batch", "features")
    np.testing.assert_array_equal(result, jnp.where(mask, 2.0, 0.0))
    np.testing.assert_array_equal(layer(x).unwrap("batch", "features"), 2.0)


def test_missing_required_call_argument_is_an_error_and_kwargs_take_everything():
    layer = convert.from_nnx(NeedsPositions())
    x = helpers.named(jnp.ones((2, 3)), "batch", "features")
    with pytest.raises(
        TypeError, match=r"NeedsPositions needs the call argument\(s\) \['positions'\]"
    ):
        layer(x, scale=2.0)
    result = layer(x, positions=1.0, scale=2.0, bonus=3.0).unwrap("batch", "features")
    np.testing.assert_array_equal(result, (1.0 + 1.0 + 1.0) * 2.0 + 3.0)


def test_wrapped_callable_names_output():
    layer = wrappers.WrappedCallable(fn=lambda x: x[..., :2], input_axes=("features",))
    x = helpers.named(jnp.arange(6.0).reshape(2, 3), "batch", "features")
    np.testing.assert_array_equal(
        layer(x).unwrap("batch", "features"), jnp.array([[0.0, 1.0], [3.0, 4.0]])
    )
    assert layer(jnp.ones((2, 3))).shape == (2, 2)


def _features_namer(module, key, variable, naming):
    return (naming.features,)


def test_register_wrapped_axis_names_names_a_wrapped_class_until_unregistered():
    with wrappers.wrapped_axis_namer_registry.isolated():
        wrappers.register_wrapped_axis_names(Masked, _features_namer)
        layer = convert.from_nnx(Masked())
        assert dict(layer.variables["offset"].value.named_shape) == {"features": 3}
        assert wrappers.unregister_wrapped_axis_names(Masked) is _features_namer
        assert not named_axes.is_namedarray(convert.from_nnx(Masked()).variables["offset"].value)
        with pytest.raises(KeyError, match="Masked"):
            wrappers.unregister_wrapped_axis_names(Masked)


def test_wrapped_axis_namer_registry_scopes_and_refuses_silent_replacement():
    def other_namer(module, key, variable, naming):
        return None

    with wrappers.wrapped_axis_namer_registry.scoped(Masked, _features_namer):
        assert named_axes.is_namedarray(convert.from_nnx(Masked()).variables["offset"].value)
        with pytest.raises(ValueError, match="replace=True"):
            wrappers.register_wrapped_axis_names(Masked, other_namer)
    assert Masked not in wrappers.wrapped_axis_namer_registry
    with wrappers.wrapped_axis_namer_registry.scoped(nnx.Conv, other_namer, replace=True):
        conv = convert.from_nnx(nnx.Conv(2, 3, (3,), rngs=nnx.Rngs(0)))
        assert not named_axes.is_namedarray(conv.variables["kernel"].value)
    assert wrappers.wrapped_axis_namer_registry[nnx.Conv] is not other_namer


def test_register_wrapped_axis_names_rejects_a_non_class_or_non_callable():
    with pytest.raises(TypeError, match="expects an NNX class and a callable"):
        wrappers.register_wrapped_axis_names(Masked, 3)
    with pytest.raises(TypeError, match="expects an NNX class and a callable"):
        wrappers.register_wrapped_axis_names("Masked", _features_namer)


def test_pz_module_names_inputs_and_forwards_side_inputs():
    layer = linear_and_affine.RenameAxes(old="seq", new="time")
    module = wrappers.PzModule(layer)
    data = jnp.arange(24.0).reshape(2, 3, 4)
    # Axes named like the input's come first, in the input's order; new names ("time") follow.
    np.testing.assert_array_equal(module(data), jnp.transpose(data, (0, 2, 1)))
    explicit = wrappers.PzModule(
        linear_and_affine.ConstantRescale(by=2.0), input_names=("seq", "batch", "features")
    )
    np.testing.assert_array_equal(explicit(data), 2.0 * data)
    named_value = helpers.named(data, "batch", "seq", "features")
    assert dict(module(named_value).named_shape) == {"batch": 2, "time": 3, "features": 4}


def test_pz_module_names_numpy_inputs_like_jax_arrays_also_under_nnx_jit():
    affine = linear_and_affine.Linear.from_config(
        "probe", jax.random.key(0), input_axes={"features": 4}, output_axes={"features_out": 3}
    )
    module = wrappers.PzModule(affine)
    data = np.arange(8.0, dtype=np.float32).reshape(2, 4)
    expected = module(jnp.asarray(data))
    np.testing.assert_array_equal(module(data), expected)
    np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(module, data), expected)


def test_pz_module_state_is_visible_to_nnx():
    layer = linear_and_affine.Affine.from_config(
        "proj", jax.random.key(0), {"features": 2}, {"features": 3}
    )
    module = wrappers.PzModule(layer)
    params = nnx.state(module, nnx.Param)
    leaves = jax.tree_util.tree_leaves(params)
    assert {leaf.shape for leaf in leaves} == {(2, 3), (3,)}
    assert wrappers.is_pz_object(layer)
    assert not wrappers.is_pz_object(module)


def test_module_shell_compares_by_graph_definition_and_prints_briefly():
    first = convert.from_nnx(nnx.BatchNorm(3, rngs=nnx.Rngs(0))).shell
    second = convert.from_nnx(nnx.BatchNorm(3, rngs=nnx.Rngs(1))).shell
    other = convert.from_nnx(nnx.BatchNorm(4, rngs=nnx.Rngs(0))).shell
    assert first == second and hash(first) == hash(second)
    assert first != other
    assert repr(first) == "ModuleShell(<nnx.GraphDef of BatchNorm>)"
    assert treescope.render_to_text(first) == repr(first)


def test_wrapper_runs_and_differentiates_on_frozen_parameter_values():
    """Penzai's pattern: bind frozen ParameterValues and take gradients with respect to them."""
    conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    layer = convert.from_nnx(conv)
    images = helpers.random_input((2, 5, 5, 3))
    names = ("batch", "height", "width", "features")
    skeleton, frozen = variables.unbind_params(layer, freeze=True)

    def loss(frozen_params):
        bound = variables.bind_variables(skeleton, frozen_params)
        return jnp.sum(bound(helpers.named(images, *names)).unwrap(*names) ** 2)

    np.testing.assert_allclose(loss(frozen), jnp.sum(conv(images) ** 2), rtol=1e-6)
    grads = {g.label: g.value for g in jax.grad(loss)(frozen)}
    nnx_grads = helpers.nnx_parameter_grads(conv, lambda conv: jnp.sum(conv(images) ** 2))
    kernel_label = layer.variables["kernel"].label
    np.testing.assert_allclose(
        grads[kernel_label].with_positional_prefix().data_array,
        nnx_grads["kernel"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_wrapper_refuses_to_drop_a_change_to_a_frozen_state():
    batch_norm = nnx.BatchNorm(3, use_running_average=False, rngs=nnx.Rngs(0))
    layer = convert.from_nnx(batch_norm)
    skeleton, frozen = variables.unbind_variables(layer, freeze=True)
    bound = variables.bind_variables(skeleton, frozen)
    x = helpers.named(helpers.random_input((4, 3)), "batch", "features")
    with pytest.raises(ValueError, match="frozen snapshot"):
        bound(x)


#### Values NNX code sows ####


class SowingAttention(nnx.Module):
    """Keeps its attention weights with ``sow``, as interpretability-minded NNX code does."""

    def __init__(self, rngs):
        self.query = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        weights = jax.nn.softmax(self.query(x) @ x.swapaxes(-1, -2))
        self.sow(nnx.Intermediate, "attention_weights", weights)
        return weights @ x


class SowingBlock(nnx.Module):
    """Holds a sowing child and sows its own output too."""

    def __init__(self, rngs):
        self.attn = SowingAttention(rngs)
        self.scale = nnx.Param(jnp.full((4,), 1.5))

    def __call__(self, x):
        out = self.attn(x) * self.scale[...]
        self.sow(nnx.Intermediate, "block_output", out)
        return out


_SEQ_NAMES = ("batch", "seq", "features")


def _sowing_layer_and_input(seed=0):
    block = SowingBlock(nnx.Rngs(seed))
    x = helpers.random_input((2, 3, 4), seed=seed + 1)
    return block, convert.from_nnx(block), x


def _nnx_sown(block, x):
    """What NNX itself collects from one call, by ``/``-joined path."""
    _, collected = nnx.capture(block, nnx.Intermediate)(x)
    return {"/".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(collected)}


def test_recorded_sown_values_equal_what_nnx_captures_for_each_call_alone():
    block, layer, x = _sowing_layer_and_input()
    recording = wrappers.capture_sown(layer)
    assert layer.sown is None  # the original is unchanged
    assert recording.sown.label == "sown" and recording.sown.value is None
    for scale in (1.0, 2.0):
        named_x = helpers.named(x * scale, *_SEQ_NAMES)
        recording(named_x)
        recording(named_x)  # a second call replaces, never appends
        expected = _nnx_sown(block, x * scale)
        assert recording.sown.value.keys() == {"attn/attention_weights", "block_output"}
        for key, value in expected.items():
            assert len(recording.sown.value[key]) == 1 == len(value)
            np.testing.assert_array_equal(recording.sown.value[key][0], value[0])


def test_sown_values_never_pile_up_on_a_reused_module_nor_warn(recwarn):
    _, layer, x = _sowing_layer_and_input()
    named_x = helpers.named(x, *_SEQ_NAMES)
    for _ in range(3):
        layer(named_x)
    built = layer.__dict__[wrappers._BUILT_MODULE_KEY].module
    assert len(nnx.state(built, nnx.Intermediate)) == 0
    assert not [w for w in recwarn if "sow" in str(w.message)]


def test_a_nested_wrapper_records_its_own_sown_values_by_its_own_paths():
    block, layer, x = _sowing_layer_and_input()
    edited = (
        layer.select()
        .at_subtrees_where(
            lambda node: (
                isinstance(node, wrappers.NNXWrapper) and node.module_type is SowingAttention
            )
        )
        .apply(lambda wrapper: wrapper.capturing_sown("attention.sown"))
    )
    assert edited.sown is None
    edited(helpers.named(x, *_SEQ_NAMES))
    recorded = edited.children["attn"].sown.value
    assert recorded.keys() == {"attention_weights"}
    np.testing.assert_array_equal(
        recorded["attention_weights"][0], _nnx_sown(block, x)["attn/attention_weights"][0]
    )


def test_capture_sown_labels_each_outermost_wrapper_by_its_key_path():
    _, layer, _ = _sowing_layer_and_input()
    model = [layer, layer.children["attn"]]
    recording = wrappers.capture_sown(model, label_prefix="probe")
    assert [wrapper.sown.label for wrapper in recording] == ["probe[0]", "probe[1]"]
    # Wrappers run as another wrapper's NNX code are covered by that wrapper's recording.
    assert recording[0].children["attn"].sown is None


def test_sown_values_come_out_of_variable_jit_as_concrete_arrays():
    block, layer, x = _sowing_layer_and_input()
    recording = wrappers.capture_sown(layer)
    named_x = helpers.named(x, *_SEQ_NAMES)
    jitted = variables.variable_jit(lambda model, value: model(value))
    output = jitted(recording, named_x)
    np.testing.assert_allclose(output.unwrap(*_SEQ_NAMES), nnx.capture(block)(x), rtol=1e-6)
    weights = recording.sown.value["attn/attention_weights"][0]
    assert not isinstance(weights, jax.core.Tracer)
    np.testing.assert_allclose(weights, _nnx_sown(block, x)["attn/attention_weights"][0], rtol=1e-6)


def test_a_frozen_sown_recorder_is_an_error_naming_its_label():
    _, layer, x = _sowing_layer_and_input()
    recording = wrappers.capture_sown(layer, label_prefix="weights")
    pure, state = variables.unbind_state_vars(recording, freeze=True)
    frozen = variables.bind_variables(pure, state)
    with pytest.raises(ValueError, match=r"'weights'.*frozen snapshot"):
        frozen(helpers.named(x, *_SEQ_NAMES))


#### Which modules can sow (a call that records nothing skips capturing elsewhere) ####


def _keep_for_later(module, value):
    module.sow(nnx.Intermediate, "kept", value)


class SowsThroughAHelper(nnx.Module):
    def __call__(self, x):
        _keep_for_later(self, x)
        return x


class SowsInAClosure(nnx.Module):
    def __call__(self, x):
        def keep(value):
            self.sow(nnx.Intermediate, "kept", value)
            return value

        return keep(x)


class Perturbs(nnx.Module):
    def __call__(self, x):
        return self.perturb("x", x)


class HoldsASowingFunction(nnx.Module):
    def __init__(self):
        self.hook = _keep_for_later

    def __call__(self, x):
        self.hook(self, x)
        return x


def _logged(method):
    @functools.wraps(method)
    def logged(*args, **kwargs):
        return method(*args, **kwargs)

    return logged


def _unnamed_wrapper(method):
    return lambda *args, **kwargs: method(*args, **kwargs)


class SowsInADecoratedMethod(nnx.Module):
    @_logged
    def __call__(self, x):
        self.sow(nnx.Intermediate, "kept", x)
        return x


class SowsInAMethodWrappedWithoutWraps(nnx.Module):
    @_unnamed_wrapper
    def __call__(self, x):
        _keep_for_later(self, x)
        return x


class Plain(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.linear(x))


class Attends(nnx.Module):
    """Stock attention whose weights are kept only when ``keep_weights`` is set."""

    def __init__(self, keep_weights, rngs):
        self.attn = nnx.MultiHeadAttention(2, 4, decode=False, rngs=rngs)
        self.keep_weights = keep_weights

    def __call__(self, x):
        if self.keep_weights:
            return self.attn(x, sow_weights=True)
        return self.attn(x)


class AttendsPlainly(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(2, 4, decode=False, rngs=rngs)

    def __call__(self, x, **attention_options):
        return self.attn(x, **attention_options)


@pytest.mark.parametrize(
    "module",
    [
        SowingAttention(nnx.Rngs(0)),
        SowsThroughAHelper(),
        SowsInAClosure(),
        Perturbs(),
        HoldsASowingFunction(),
        SowsInADecoratedMethod(),
        SowsInAMethodWrappedWithoutWraps(),
    ],
    ids=type,
)
def test_may_sow_sees_sows_in_methods_helpers_closures_perturbs_and_held_functions(module):
    assert wrappers.may_sow(module)


def test_may_sow_is_false_for_code_that_never_sows_and_switched_stock_layers():
    assert not wrappers.may_sow(Plain(nnx.Rngs(0)))
    assert not wrappers.may_sow(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    attention = nnx.MultiHeadAttention(2, 4, decode=False, rngs=nnx.Rngs(0))
    assert not wrappers.may_sow(attention, switches_on=frozenset())
    assert wrappers.may_sow(attention)  # by default every switch counts as set


def test_outermost_sowing_modules_follow_the_models_own_code():
    block = SowingBlock(nnx.Rngs(0))
    assert wrappers.outermost_sowing_modules(block) == [block]  # not also block.attn
    assert wrappers.outermost_sowing_modules(Plain(nnx.Rngs(0))) == []
    keeping = Attends(True, nnx.Rngs(0))
    assert wrappers.outermost_sowing_modules(keeping) == [keeping.attn]
    # Mentioning the switch anywhere in the model's code counts, whatever its value.
    assert wrappers.outermost_sowing_modules(Attends(False, nnx.Rngs(0))) != []
    assert wrappers.outermost_sowing_modules(AttendsPlainly(nnx.Rngs(0))) == []


@pytest.fixture
def capture_calls(monkeypatch):
    """Counts the calls of ``nnx.capture`` made by wrappers."""
    calls = []
    original = nnx.capture

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(wrappers.nnx, "capture", counting)
    return calls


def test_a_call_that_records_nothing_captures_only_where_code_may_sow(capture_calls):
    x = helpers.random_input((2, 3, 4))
    plain = Plain(nnx.Rngs(0))
    layer = convert.from_nnx(plain)
    output = layer(helpers.named(x, *_SEQ_NAMES)).unwrap(*_SEQ_NAMES)
    np.testing.assert_array_equal(output, plain(x))
    assert capture_calls == []
    _, sowing, _ = _sowing_layer_and_input()
    sowing(helpers.named(x, *_SEQ_NAMES))
    assert len(capture_calls) == 1
    # Recording always captures the whole module.
    wrappers.capture_sown(layer)(helpers.named(x, *_SEQ_NAMES))
    assert len(capture_calls) == 2


@pytest.mark.parametrize("through_side_input", [False, True])
def test_switched_stock_attention_records_its_weights_and_never_piles_them_up(
    through_side_input, recwarn
):
    x = helpers.random_input((2, 3, 4))
    named_x = helpers.named(x, *_SEQ_NAMES)
    model = AttendsPlainly(nnx.Rngs(0)) if through_side_input else Attends(True, nnx.Rngs(0))
    options = {"sow_weights": True} if through_side_input else {}
    layer = convert.from_nnx(model)
    for _ in range(2):
        layer(named_x, **options)
    assert len(nnx.state(_built(layer), nnx.Intermediate)) == 0
    assert not [w for w in recwarn if "sow" in str(w.message)]
    recording = wrappers.capture_sown(layer)
    recording(named_x, **options)
    _, expected = nnx.capture(model, nnx.Intermediate)(x, **options)
    (weights,) = recording.sown.value["attn/attention_weights"]
    np.testing.assert_allclose(weights, expected["attn"]["attention_weights"].get_value()[0])


class TrainModeNorm(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, use_running_average=False, momentum=0.5, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.linear(x))


def test_uncaptured_eager_calls_write_batch_statistics_back_every_call(capture_calls):
    reference, converted = TrainModeNorm(nnx.Rngs(0)), TrainModeNorm(nnx.Rngs(0))
    layer = convert.from_nnx(converted)
    for seed in range(3):
        x = helpers.random_input((6, 4), seed=seed)
        expected = reference(x)
        output = layer(helpers.named(x, "batch", "features")).unwrap("batch", "features")
        np.testing.assert_allclose(output, expected, rtol=1e-6)
        stats = layer.children["norm"].variables
        for name in ("mean", "var"):
            np.testing.assert_allclose(
                stats[name].value.unwrap("features"),
                getattr(reference.norm, name).get_value(),
                rtol=1e-6,
            )
    assert capture_calls == []


#### Reusing the module an eager call built ####


def _conv_layer_and_images():
    conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    images = helpers.random_input((2, 5, 5, 3))
    return conv, convert.from_nnx(conv), helpers.named(images, *_IMAGE_NAMES), images


_IMAGE_NAMES = ("batch", "height", "width", "features")


def _built(layer):
    return layer.__dict__[wrappers._BUILT_MODULE_KEY].module


def test_eager_calls_reuse_the_built_module_until_a_variable_gets_a_new_array():
    conv, layer, named_images, images = _conv_layer_and_images()
    layer(named_images)
    first = _built(layer)
    layer(named_images)
    assert _built(layer) is first
    kernel = layer.variables["kernel"]
    kernel.value = kernel.value * 2.0  # a training update
    result = layer(named_images).unwrap(*_IMAGE_NAMES)
    assert _built(layer) is not first
    conv.kernel.set_value(conv.kernel.get_value() * 2.0)
    np.testing.assert_allclose(result, conv(images), rtol=1e-6)


def test_a_replaced_variables_entry_or_edited_copy_is_never_served_a_stale_module():
    conv, layer, named_images, _ = _conv_layer_and_images()
    before = layer(named_images).unwrap(*_IMAGE_NAMES)
    other_bias = variables.Parameter(value=jnp.full((4,), 3.0), label="bias")
    edited = dataclasses.replace(layer, variables={**layer.variables, "bias": other_bias})
    np.testing.assert_allclose(
        edited(named_images).unwrap(*_IMAGE_NAMES),
        before - conv.bias.get_value() + 3.0,
        rtol=1e-5,
        atol=1e-6,
    )
    # Even a mutated entry of the (frozen) wrapper's dictionary is noticed.
    layer.variables["bias"] = other_bias
    np.testing.assert_allclose(
        layer(named_images).unwrap(*_IMAGE_NAMES),
        before - conv.bias.get_value() + 3.0,
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_child_layers_training_update_reaches_the_reused_module():
    block, layer, x = _sowing_layer_and_input()
    named_x = helpers.named(x, *_SEQ_NAMES)
    layer(named_x)
    kernel = layer.children["attn"].children["query"].layer.sublayers[0].weights
    kernel.value = kernel.value * 0.5
    block.attn.query.kernel.set_value(block.attn.query.kernel.get_value() * 0.5)
    np.testing.assert_allclose(layer(named_x).unwrap(*_SEQ_NAMES), nnx.capture(block)(x), rtol=1e-6)


def test_the_built_module_lives_and_dies_with_its_wrapper():
    _, layer, named_images, _ = _conv_layer_and_images()
    layer(named_images)
    alive = weakref.ref(layer)
    module = weakref.ref(_built(layer))
    del layer
    gc.collect()
    assert alive() is None and module() is None


def test_a_traced_call_keeps_no_module_and_later_eager_calls_are_exact():
    conv, layer, named_images, images = _conv_layer_and_images()
    traced = jax.jit(lambda model, value: model(value))(layer, named_images)
    assert wrappers._BUILT_MODULE_KEY not in layer.__dict__
    np.testing.assert_allclose(traced.unwrap(*_IMAGE_NAMES), conv(images), rtol=1e-6)
    np.testing.assert_array_equal(layer(named_images).unwrap(*_IMAGE_NAMES), conv(images))


#### Treescope view ####


def test_wrapper_bookkeeping_renders_collapsed_while_variables_and_children_expand():
    _, layer, _ = _sowing_layer_and_input()
    bookkeeping = {
        field.name
        for field in dataclasses.fields(wrappers.NNXWrapper)
        if field.metadata.get("treescope_always_collapse")
    }
    assert bookkeeping == {
        field.name
        for field in dataclasses.fields(wrappers.NNXWrapper)
        if not field.metadata.get("pytree_node", True)
    }
    # Expand everything treescope may expand, on a narrow page: only what is marked stays shut.
    with treescope.using_expansion_strategy(max_height=None, target_width=40):
        lines = treescope.render_to_text(layer).splitlines()
    # The model's own parts open onto lines of their own, the nested wrapper's too ...
    assert "  variables={" in lines and "  children={" in lines
    assert "      label='scale'," in lines
    assert "    'attn': NNXWrapper(" in lines and "        'query': FromNNX(" in lines
    # ... while each piece of bookkeeping stays on its one line, however narrow the page.
    for indent in ("  ", "      "):
        assert (
            f"{indent}call_signature=CallSignature(keywords=(), required=(), accepts_any=False),"
        ) in lines
    assert "  shell=ModuleShell(<nnx.GraphDef of SowingBlock>)," in lines
    assert "  variable_paths={'scale': ('scale',)}," in lines
    html = treescope.render_to_html(layer, compressed=False)
    assert "SowingBlock" in html and "call_signature" in html
