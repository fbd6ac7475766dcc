"""Tests for pz_flax.nn.parameters, differential against penzai 0.2.5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz as penzai_pz

from pz_flax.core import named_axes as nx
from pz_flax.core import variables
from pz_flax.nn import grouping
from pz_flax.nn import linear_and_affine
from pz_flax.nn import parameters
from tests.nn import helpers


def uniform_and_sum(key, a, b):
    return {"v": jax.random.uniform(key), "s": jnp.asarray(a + b)}


@pytest.mark.parametrize("name", ["foo", "layer/Linear.weights", "ünïcode", ""])
def test_derive_param_key_matches_penzai(name):
    base = jax.random.key(42)
    ours = parameters.derive_param_key(base, name)
    theirs = penzai_pz.nn.derive_param_key(base, name)
    np.testing.assert_array_equal(jax.random.key_data(ours), jax.random.key_data(theirs))


def test_derive_param_key_differs_by_name():
    base = jax.random.key(0)
    first = jax.random.key_data(parameters.derive_param_key(base, "a"))
    second = jax.random.key_data(parameters.derive_param_key(base, "b"))
    assert not np.array_equal(first, second)


def test_make_parameter_keyed():
    param = parameters.make_parameter(
        "foo", jax.random.key(2), uniform_and_sum, 100, metadata={"foo": "bar"}, b=20
    )
    assert isinstance(param, variables.Parameter)
    assert param.label == "foo"
    assert param.metadata == {"foo": "bar"}
    assert int(param.value["s"]) == 120
    assert param.value["v"].shape == ()
    theirs = penzai_pz.nn.make_parameter("foo", jax.random.key(2), uniform_and_sum, 100, b=20)
    assert float(param.value["v"]) == float(theirs.value["v"])

    other = parameters.make_parameter("bar", jax.random.key(2), uniform_and_sum, 100, b=20)
    assert other.metadata == {}
    assert float(other.value["v"]) != float(param.value["v"])


def test_make_parameter_named_value_keeps_axis_names():
    param = parameters.make_parameter(
        "w", jax.random.key(0), lambda key: nx.wrap(jax.random.normal(key, (2, 3))).tag("a", "b")
    )
    assert dict(param.value.named_shape) == {"a": 2, "b": 3}


def test_make_parameter_slot_without_rng():
    called = []
    slot = parameters.make_parameter("foo", None, lambda key: called.append(key))
    assert slot == variables.ParameterSlot("foo")
    assert not called


def test_assert_no_parameter_slots_accepts_filled_models():
    parameters.assert_no_parameter_slots(
        {
            "foo": variables.Parameter(value=3, label="a"),
            "bar": variables.Parameter(value=3, label="b"),
            "baz": variables.StateVariableSlot(label="c"),
        }
    )
    parameters.assert_no_parameter_slots(
        linear_and_affine.Linear.from_config("lin", jax.random.key(0), {"i": 2}, {"o": 3})
    )


def test_assert_no_parameter_slots_reports_each_slot_with_its_path():
    model = grouping.Sequential(
        [
            linear_and_affine.Linear.from_config("first", None, {"i": 2}, {"o": 3}),
            linear_and_affine.Linear.from_config("second", jax.random.key(0), {"o": 3}, {"p": 1}),
            linear_and_affine.AddBias.from_config("bias", None, {"p": 1}),
        ]
    )
    with pytest.raises(ValueError, match="Unexpected ParameterSlots") as info:
        parameters.assert_no_parameter_slots(model)
    message = str(info.value)
    assert ".sublayers[0].weights: 'first.weights'" in message
    assert ".sublayers[2].bias: 'bias.bias'" in message
    assert "second" not in message
    with pytest.raises(ValueError, match="<root>: 'x'"):
        parameters.assert_no_parameter_slots(variables.ParameterSlot("x"))


@pytest.mark.parametrize(
    "qualified_name",
    [
        "derive_param_key",
        "make_parameter",
        "assert_no_parameter_slots",
    ],
)
def test_signature_matches_penzai(qualified_name):
    helpers.assert_signature_matches_penzai(parameters, "penzai.nn.parameters", qualified_name)
