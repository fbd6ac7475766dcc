"""Tests for pz_flax.nn.layer: the Layer base class."""

import jax
import pytest

from pz_flax.core import shapecheck
from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.nn import grouping
from pz_flax.nn import layer as layer_base
from pz_flax.nn import linear_and_affine
from tests.nn import helpers


@struct.pytree_dataclass
class Accumulate(layer_base.Layer):
    counter: variables.StateVariable

    def __call__(self, x, scale, **_side_inputs):
        self.counter.value += x * scale
        return x


@struct.pytree_dataclass
class ReportMutability(layer_base.Layer):
    to_check: variables.StateVariable | variables.StateVariableValue

    def __call__(self, x, scale, **_side_inputs):
        kind = "mutable" if isinstance(self.to_check, variables.StateVariable) else "frozen"
        return x, {kind: self.to_check.value}


def test_layer_without_call_is_abstract():
    @struct.pytree_dataclass
    class NoCall(layer_base.Layer):
        pass

    with pytest.raises(TypeError, match="abstract"):
        NoCall()


def test_layer_without_decorator_cannot_be_built():
    class Undecorated(layer_base.Layer):
        def __call__(self, x, **side_inputs):
            return x

    with pytest.raises(TypeError, match="pytree_dataclass"):
        Undecorated()


def test_stateful_call_then_stateless_call():
    """Mirrors penzai's layer test: same calls, same expected results."""
    layer_1 = Accumulate(counter=variables.StateVariable(value=0, label="counter_1"))
    layer_2 = Accumulate(counter=variables.StateVariable(value=100, label="counter_2"))
    flag = ReportMutability(to_check=variables.StateVariable(value=999, label="flag"))
    model = grouping.Sequential([layer_1, layer_2, flag])

    assert model(5, scale=2) == (5, {"mutable": 999})
    assert int(layer_1.counter.value) == 10
    assert int(layer_2.counter.value) == 110
    assert model(2, scale=1) == (2, {"mutable": 999})
    assert int(layer_1.counter.value) == 12
    assert int(layer_2.counter.value) == 112

    unbound, unbound_vars = variables.unbind_variables(model, lambda var: var.label != "flag")
    assert unbound == grouping.Sequential(
        [
            Accumulate(counter=variables.StateVariableSlot("counter_1")),
            Accumulate(counter=variables.StateVariableSlot("counter_2")),
            flag,
        ]
    )
    assert unbound_vars == (layer_1.counter, layer_2.counter)

    frozen = (layer_1.counter.freeze(), layer_2.counter.freeze())
    result, new_frozen = unbound.stateless_call(frozen, 100, scale=3)
    # The still-bound flag variable was frozen for the call, so the layer saw a value.
    assert result == (100, {"frozen": 999})
    assert [(v.label, int(v.value)) for v in new_frozen] == [("counter_1", 312), ("counter_2", 412)]
    assert all(isinstance(v, variables.StateVariableValue) for v in new_frozen)
    # Neither the original variables nor the given frozen values changed.
    assert int(layer_1.counter.value) == 12
    assert int(frozen[0].value) == 12


def test_stateless_call_binds_slots_in_argument_and_side_inputs():
    @struct.pytree_dataclass
    class ReadSide(layer_base.Layer):
        def __call__(self, x, state, **_side_inputs):
            state.value = state.value + x.value
            return x.value

    value = variables.StateVariableValue(label="s", value=3)
    arg_value = variables.StateVariableValue(label="a", value=10)
    result, (new_state, new_arg) = ReadSide().stateless_call(
        (value, arg_value), variables.StateVariableSlot("a"), state=variables.StateVariableSlot("s")
    )
    assert result == 10
    assert int(new_state.value) == 13
    assert int(new_arg.value) == 10


def test_stateless_call_under_jit():
    layer = Accumulate(counter=variables.StateVariableSlot("c"))

    @jax.jit
    def step(frozen):
        return layer.stateless_call(frozen, 2, scale=4)

    _, (new_value,) = step((variables.StateVariableValue(label="c", value=1),))
    assert int(new_value.value) == 9


def test_bind_variables_is_pz_bind_variables():
    linear = linear_and_affine.Linear.from_config("lin", jax.random.key(0), {"i": 2}, {"o": 3})
    unbound, params = variables.unbind_params(linear)
    rebound = unbound.bind_variables(params)
    assert rebound.weights is linear.weights
    frozen_rebound = unbound.bind_variables([params[0].freeze()])
    assert isinstance(frozen_rebound.weights, variables.ParameterValue)
    with pytest.raises(ValueError, match="No slot in the tree matches"):
        unbound.bind_variables([*params, variables.Parameter(value=1.0, label="other")])
    assert (
        unbound.bind_variables(
            [*params, variables.Parameter(value=1.0, label="other")], allow_unused=True
        ).weights
        is linear.weights
    )


def test_default_structures_accept_anything():
    layer = grouping.Identity()
    assert layer.input_structure() is shapecheck.ANY
    assert layer.output_structure() is shapecheck.ANY
    shapecheck.check_structure({"anything": 1}, layer.input_structure())


def test_repr_of_a_layer_shows_its_type():
    assert repr(linear_and_affine.RenameAxes(old="a", new="b")).startswith("RenameAxes(")


@pytest.mark.parametrize(
    "qualified_name",
    [
        "Layer.__call__",
        "Layer.bind_variables",
        "Layer.stateless_call",
    ],
)
def test_signature_matches_penzai(qualified_name):
    helpers.assert_signature_matches_penzai(layer_base, "penzai.nn.layer", qualified_name)
