"""Tests of the wrapper layers: FromNNX, NNXWrapper, WrappedCallable and PzModule."""

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


def test_register_wrapped_axis_names():
    wrappers.register_wrapped_axis_names(
        Masked, lambda module, key, variable, naming: (naming.features,)
    )
    try:
        layer = convert.from_nnx(Masked())
        assert dict(layer.variables["offset"].value.named_shape) == {"features": 3}
    finally:
        del wrappers._WRAPPED_AXIS_NAMERS[Masked]
    with pytest.raises(TypeError, match="expects an NNX class and a callable"):
        wrappers.register_wrapped_axis_names(Masked, 3)


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
