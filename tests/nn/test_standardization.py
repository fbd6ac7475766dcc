"""Tests for pz_flax.nn.standardization, with penzai 0.2.5 as the differential oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz as penzai_pz

from pz_flax.core import named_axes
from pz_flax.core import shapecheck
from pz_flax.core import variables
from pz_flax.nn import grouping
from pz_flax.nn import linear_and_affine
from pz_flax.nn import standardization

SHAPE = {"batch": 3, "foo": 4, "bar": 2}


def _random_input(seed=0):
    """The same random values as a pz_flax and a penzai named array."""
    data = np.asarray(jax.random.normal(jax.random.key(seed), tuple(SHAPE.values())) * 3 + 1)
    return named_axes.wrap(data, *SHAPE), penzai_pz.nx.wrap(data, *SHAPE)


def _assert_same(ours, theirs, atol=1e-5):
    assert dict(ours.named_shape) == dict(theirs.named_shape)
    names = tuple(theirs.named_shape)
    np.testing.assert_allclose(
        np.asarray(ours.unwrap(*names)), np.asarray(theirs.unwrap(*names)), atol=atol, rtol=1e-5
    )


@pytest.mark.parametrize("across", ["foo", ("foo", "bar")])
def test_standardize_matches_penzai(across):
    ours_in, theirs_in = _random_input()
    ours = standardization.Standardize(across=across)(ours_in)
    theirs = penzai_pz.nn.Standardize(across=across)(theirs_in)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("across", ["bar", ("batch", "foo")])
def test_rms_standardize_matches_penzai(across):
    ours_in, theirs_in = _random_input(1)
    ours = standardization.RMSStandardize(across=across, epsilon=1e-3)(ours_in)
    theirs = penzai_pz.nn.RMSStandardize(across=across, epsilon=1e-3)(theirs_in)
    _assert_same(ours, theirs)


def test_standardize_statistics_over_the_named_axes():
    ours_in, _ = _random_input(2)
    out = standardization.Standardize(across=("foo", "bar"))(ours_in)
    flat = np.asarray(out.unwrap("batch", "foo", "bar")).reshape(3, -1)
    np.testing.assert_allclose(flat.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(flat.std(axis=1), 1.0, atol=1e-4)


def _scale_and_shift_like(ours_layer, seed):
    """Random values for every parameter of ``ours_layer``, keyed by label."""
    _, params = variables.unbind_params(ours_layer)
    values = {}
    for index, param in enumerate(params):
        shape = dict(param.value.named_shape)
        values[param.label] = (
            np.asarray(jax.random.normal(jax.random.key(seed + index), tuple(shape.values()))),
            tuple(shape),
        )
    return values


def _set_params(ours_layer, values):
    _, params = variables.unbind_params(ours_layer)
    for param in params:
        data, names = values[param.label]
        param.value = named_axes.wrap(jnp.asarray(data), *names)


def _penzai_params(theirs_layer, values):
    _, params = penzai_pz.unbind_params(theirs_layer)
    assert {param.label for param in params} == set(values)
    for param in params:
        data, names = values[param.label]
        param.value = penzai_pz.nx.wrap(jnp.asarray(data), *names)


def test_layernorm_matches_penzai_with_random_weights():
    across = {"foo": 4, "bar": 2}
    ours = standardization.LayerNorm.from_config("ln", jax.random.key(0), across, epsilon=1e-5)
    theirs = penzai_pz.nn.LayerNorm.from_config("ln", jax.random.key(0), across, epsilon=1e-5)
    values = _scale_and_shift_like(ours, seed=10)
    assert set(values) == {"ln/scale.weights", "ln/shift.bias"}
    _set_params(ours, values)
    _penzai_params(theirs, values)
    ours_in, theirs_in = _random_input(3)
    _assert_same(ours(ours_in), theirs(theirs_in))


def test_rms_layernorm_matches_penzai_with_random_weights():
    across = {"foo": 4}
    ours = standardization.RMSLayerNorm.from_config("rms", jax.random.key(0), across)
    theirs = penzai_pz.nn.RMSLayerNorm.from_config("rms", jax.random.key(0), across)
    values = _scale_and_shift_like(ours, seed=20)
    assert set(values) == {"rms/scale.weights"}
    _set_params(ours, values)
    _penzai_params(theirs, values)
    ours_in, theirs_in = _random_input(4)
    _assert_same(ours(ours_in), theirs(theirs_in))


def test_layernorm_structure_and_initial_values():
    layer = standardization.LayerNorm.from_config(
        "ln", jax.random.key(0), {"foo": 4}, dtype=jnp.bfloat16
    )
    assert isinstance(layer, grouping.Sequential)
    standardize, scale, shift = layer.sublayers
    assert standardize == standardization.Standardize(across=("foo",), epsilon=1e-6)
    assert isinstance(scale, linear_and_affine.Linear)
    assert isinstance(shift, linear_and_affine.AddBias)
    assert scale.weights.value.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(scale.weights.value.unwrap("foo"), np.float32), 1.0)
    np.testing.assert_array_equal(np.asarray(shift.bias.value.unwrap("foo"), np.float32), 0.0)


def test_rms_layernorm_stores_epsilon_in_param_dtype():
    layer = standardization.RMSLayerNorm.from_config(
        "rms", jax.random.key(0), {"foo": 4}, epsilon=1e-3, dtype=jnp.bfloat16
    )
    rms, scale = layer.sublayers
    assert rms.across == ("foo",)
    assert rms.epsilon.dtype == jnp.bfloat16
    assert isinstance(scale, linear_and_affine.Linear)


def test_from_config_without_rng_leaves_parameter_slots():
    layer = standardization.LayerNorm.from_config("ln", None, {"foo": 4})
    assert isinstance(layer.sublayers[1].weights, variables.ParameterSlot)
    assert isinstance(layer.sublayers[2].bias, variables.ParameterSlot)


@pytest.mark.parametrize(
    "layer_type", [standardization.Standardize, standardization.RMSStandardize]
)
def test_missing_axis_error_names_layer_and_axis(layer_type):
    ours_in, _ = _random_input()
    with pytest.raises(ValueError, match=rf"{layer_type.__name__}.*'embedding'.*'batch': 3"):
        layer_type(across=("foo", "embedding"))(ours_in)


def test_positional_axes_rejected():
    with pytest.raises(ValueError, match="Standardize expects an input with only named axes"):
        standardization.Standardize(across="foo")(named_axes.ones({"foo": 4, "x": 2}).untag("x"))


def test_layernorm_wrong_axis_size_is_rejected():
    layer = standardization.LayerNorm.from_config("ln", jax.random.key(0), {"foo": 4})
    # The size check belongs to the scale ``Linear``, which names itself, as in penzai.
    with pytest.raises(shapecheck.StructureMismatchError, match=r"'ln/scale'.*'foo' has size 5.*4"):
        layer(named_axes.ones({"batch": 2, "foo": 5}))


def test_standardize_works_under_jit_and_vmapped_axes():
    ours_in, _ = _random_input(5)
    layer = standardization.RMSLayerNorm.from_config("rms", jax.random.key(0), {"bar": 2})
    frozen = variables.freeze_params(layer)
    eager = frozen(ours_in)
    jitted = jax.jit(lambda model, x: model(x))(frozen, ours_in)
    _assert_same(jitted, eager)
