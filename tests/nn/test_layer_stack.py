"""Tests for pz_flax.nn.layer_stack, with penzai 0.2.5 as the differential oracle."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz as penzai_pz

from pz_flax import pz
from pz_flax.core import named_axes
from pz_flax.core import variables
from pz_flax.nn import layer_stack

SHARED = layer_stack.LayerStackVarBehavior.SHARED
PER_LAYER = layer_stack.LayerStackVarBehavior.PER_LAYER


def _stack_metadata(behavior, axis="stack"):
    """Penzai-style metadata of a state variable living in a stack over ``axis``."""
    return {"layerstack_axes": {axis: behavior}}


@pz.pytree_dataclass
class CountingLayer(pz.nn.Layer):
    """Adds one to its input and to each of its states and to a shared side-input counter."""

    params: tuple[Any, ...]
    expected_param_shapes: tuple[dict[str, int], ...] | None = dataclasses.field(
        metadata={"pytree_node": False}
    )
    states: tuple[Any, ...] = ()
    stuff: Any = None

    def __call__(self, arg, /, shared_counter, **side_inputs):
        if self.expected_param_shapes is not None:
            for param, expected in zip(self.params, self.expected_param_shapes):
                assert dict(param.value.named_shape) == expected
        for state in self.states:
            state.value = state.value + 1
        shared_counter.value = shared_counter.value + 1
        return arg + 1


def _counting_stack():
    return pz.nn.LayerStack(
        stacked_sublayers=CountingLayer(
            params=(
                pz.Parameter(value=named_axes.zeros({"stack": 3, "foo": 4}), label="param1"),
                pz.Parameter(value=named_axes.zeros({"bar": 5}), label="param2"),
            ),
            expected_param_shapes=({"foo": 4}, {"bar": 5}),
            states=(
                pz.StateVariable(value=0, label="state1", metadata=_stack_metadata(SHARED)),
                pz.StateVariable(
                    value=named_axes.zeros({"foo": 3}),
                    label="state2",
                    metadata=_stack_metadata(SHARED),
                ),
                pz.StateVariable(
                    value=named_axes.arange("stack", 3),
                    label="state3",
                    metadata=_stack_metadata(PER_LAYER),
                ),
            ),
            stuff={
                "value": 100.0,
                "named": named_axes.arange("bar", 3),
                "named_stacked": named_axes.arange("stack", 3),
            },
        ),
        stack_axis="stack",
        stack_axis_size=3,
    )


def test_stack_call_updates_shared_and_per_layer_state():
    stack = _counting_stack()
    counter = pz.StateVariable(0, label="counter")
    result = stack(10, shared_counter=counter)
    assert int(result) == 13
    assert int(counter.value) == 3
    states = stack.stacked_sublayers.states
    assert int(states[0].value) == 3
    np.testing.assert_array_equal(np.asarray(states[1].value.unwrap("foo")), 3.0)
    assert dict(states[2].value.named_shape) == {"stack": 3}
    np.testing.assert_array_equal(np.asarray(states[2].value.unwrap("stack")), [1, 2, 3])


def test_stack_call_under_variable_jit():
    stack = _counting_stack()
    counter = pz.StateVariable(0, label="counter")
    call = pz.variable_jit(lambda stack, x, counter: stack(x, shared_counter=counter))
    call(stack, jnp.asarray(1.0), counter)
    assert float(call(stack, jnp.asarray(1.0), counter)) == 4.0
    assert int(counter.value) == 6
    np.testing.assert_array_equal(
        np.asarray(stack.stacked_sublayers.states[2].value.unwrap("stack")), [2, 3, 4]
    )


def _builder(init_base_rng, some_value):
    return CountingLayer(
        params=(
            pz.nn.make_parameter(
                "foo",
                init_base_rng,
                lambda key: named_axes.wrap(jax.random.uniform(key, shape=(4,)), "vals"),
            ),
        ),
        expected_param_shapes=None,
        states=(pz.StateVariable(value=named_axes.zeros({}), label="varstate"),),
        stuff={"value": some_value, "named_value": named_axes.arange("bar", 4)},
    )


def test_from_sublayer_builder():
    stack = pz.nn.LayerStack.from_sublayer_builder(
        builder=_builder,
        stack_axis="stack",
        stack_axis_size=3,
        init_base_rng=jax.random.key(1),
        builder_kwargs={"some_value": 100.0},
    )
    sublayer = stack.stacked_sublayers
    param = sublayer.params[0]
    assert isinstance(param, variables.Parameter)
    assert dict(param.value.named_shape) == {"stack": 3, "vals": 4}
    # Each layer gets its own key, so the stacked parameters differ across layers.
    per_layer = np.asarray(param.value.unwrap("stack", "vals"))
    assert not np.allclose(per_layer[0], per_layer[1])
    state = sublayer.states[0]
    assert dict(state.value.named_shape) == {"stack": 3}
    assert state.metadata == {"layerstack_axes": {"stack": PER_LAYER}}
    hash(state.metadata["layerstack_axes"])  # NNX needs hashable metadata
    assert float(sublayer.stuff["value"]) == 100.0
    np.testing.assert_array_equal(
        np.asarray(sublayer.stuff["named_value"].unwrap("stack", "bar")), [[0, 1, 2, 3]] * 3
    )

    slot_stack = pz.nn.LayerStack.from_sublayer_builder(
        builder=_builder,
        stack_axis="stack",
        stack_axis_size=3,
        init_base_rng=None,
        builder_kwargs={"some_value": 100.0},
    )
    assert isinstance(slot_stack.stacked_sublayers.params[0], variables.ParameterSlot)
    unbound, _ = pz.unbind_variables(stack)
    slot_unbound, slot_values = pz.unbind_variables(slot_stack)
    assert jax.tree_util.tree_structure(unbound) == jax.tree_util.tree_structure(slot_unbound)
    slot_by_label = {value.label: value for value in slot_values}
    assert set(slot_by_label) == {"varstate"}
    assert slot_by_label["varstate"].metadata == state.metadata


def test_from_sublayer_builder_rejects_unnamed_variable_values():
    def builder(init_base_rng):
        return CountingLayer((), None, (pz.StateVariable(value=jnp.zeros(2), label="s"),), None)

    with pytest.raises(ValueError, match="must hold only NamedArrays"):
        pz.nn.LayerStack.from_sublayer_builder(builder, "stack", 2, jax.random.key(0), {})


def test_from_sublayer_builder_rejects_already_stacked_state():
    def builder(init_base_rng):
        state = pz.StateVariable(
            value=named_axes.zeros({}), label="s", metadata=_stack_metadata(SHARED)
        )
        return CountingLayer((), None, (state,), None)

    with pytest.raises(ValueError, match=r"'s' already has a LayerStack behavior for axis 'stack'"):
        pz.nn.LayerStack.from_sublayer_builder(builder, "stack", 2, jax.random.key(0), {})


def test_from_sublayer_builder_keeps_behaviors_for_other_axes():
    # A state already inside an inner stack keeps its behavior there and becomes per-layer for
    # the new, outer stack axis; its other metadata survives.
    def builder(init_base_rng):
        metadata = {**_stack_metadata(SHARED, axis="inner"), "note": "kept"}
        state = pz.StateVariable(value=named_axes.zeros({}), label="s", metadata=metadata)
        return CountingLayer((), None, (state,), None)

    stack = pz.nn.LayerStack.from_sublayer_builder(builder, "outer", 2, jax.random.key(0), {})
    state = stack.stacked_sublayers.states[0]
    assert state.metadata == {
        "layerstack_axes": {"inner": SHARED, "outer": PER_LAYER},
        "note": "kept",
    }
    assert dict(state.value.named_shape) == {"outer": 2}


def _mlp_block(lib, init_base_rng):
    return lib.nn.Sequential(
        [
            lib.nn.Affine.from_config("block/in", init_base_rng, {"features": 6}, {"hidden": 8}),
            lib.nn.Elementwise(jax.nn.gelu),
            lib.nn.Linear.from_config("block/out", init_base_rng, {"hidden": 8}, {"features": 6}),
        ]
    )


def _unrolled_layers(stack):
    """The stacked layers written out one by one, by slicing every stacked array."""
    frozen = pz.freeze_params(stack.stacked_sublayers)
    layers = []
    for index in range(stack.stack_axis_size):
        layers.append(
            pz.select(frozen)
            .at_instances_of(named_axes.NamedArrayBase)
            .where(lambda array: stack.stack_axis in array.named_shape)
            .apply(lambda array, index=index: array[{stack.stack_axis: index}])
        )
    return layers


def test_scan_equals_unrolled_and_penzai():
    stack = pz.nn.LayerStack.from_sublayer_builder(
        lambda init_base_rng: _mlp_block(pz, init_base_rng), "layers", 3, jax.random.key(4), {}
    )
    x = named_axes.wrap(jax.random.normal(jax.random.key(5), (2, 6)), "batch", "features")
    scanned = stack(x)
    unrolled = x
    for layer in _unrolled_layers(stack):
        unrolled = layer(unrolled)
    assert dict(scanned.named_shape) == {"batch": 2, "features": 6}
    np.testing.assert_allclose(
        np.asarray(scanned.unwrap("batch", "features")),
        np.asarray(unrolled.unwrap("batch", "features")),
        rtol=1e-5,
        atol=1e-6,
    )

    theirs = penzai_pz.nn.LayerStack.from_sublayer_builder(
        lambda init_base_rng: _mlp_block(penzai_pz, init_base_rng),
        "layers",
        3,
        jax.random.key(4),
        {},
    )
    _, our_params = pz.unbind_params(stack)
    _, their_params = penzai_pz.unbind_params(theirs)
    theirs_by_label = {param.label: param for param in their_params}
    for param in our_params:
        names = tuple(param.value.named_shape)
        theirs_by_label[param.label].value = penzai_pz.nx.wrap(
            np.asarray(param.value.unwrap(*names)), *names
        )
    their_out = theirs(
        penzai_pz.nx.wrap(np.asarray(x.unwrap("batch", "features")), "batch", "features")
    )
    np.testing.assert_allclose(
        np.asarray(scanned.unwrap("batch", "features")),
        np.asarray(their_out.unwrap("batch", "features")),
        rtol=1e-5,
        atol=1e-6,
    )


def test_key_paths_carry_stack_axes():
    inner = pz.nn.LayerStack(
        stacked_sublayers=pz.nn.Elementwise(jax.nn.relu), stack_axis="inner", stack_axis_size=2
    )
    outer = pz.nn.LayerStack(
        stacked_sublayers=pz.nn.Sequential([inner]), stack_axis="outer", stack_axis_size=4
    )
    selection = pz.select(outer).at_instances_of(pz.nn.Elementwise)
    (keypath,) = selection.selected_by_path.keys()
    assert layer_stack.layerstack_axes_from_keypath(keypath) == {"outer": 4, "inner": 2}
    key = keypath[0]
    assert isinstance(key, layer_stack.LayerStackGetAttrKey)
    assert key == layer_stack.LayerStackGetAttrKey("stacked_sublayers", "outer", 4)
    assert str(key) == ".stacked_sublayers"
    assert layer_stack.layerstack_axes_from_keypath((jax.tree_util.GetAttrKey("x"),)) == {}


def test_wrong_stack_axis_size_names_path_and_sizes():
    stack = pz.nn.LayerStack(
        stacked_sublayers=_mlp_block(pz, jax.random.key(0)),
        stack_axis="features",
        stack_axis_size=3,
    )
    with pytest.raises(ValueError, match=r"'features' of size 3 found that axis with size 6"):
        stack(named_axes.ones({"hidden": 8}))


def test_state_without_stack_behavior_is_rejected():
    layer = CountingLayer((), None, (pz.StateVariable(value=0, label="s"),), None)
    stack = pz.nn.LayerStack(stacked_sublayers=layer, stack_axis="stack", stack_axis_size=2)
    with pytest.raises(ValueError, match=r"'s' is inside a LayerStack over 'stack'"):
        stack(0, shared_counter=pz.StateVariable(0, label="c"))


def test_shared_state_with_stack_axis_is_rejected():
    state = pz.StateVariable(
        value=named_axes.zeros({"stack": 2}), label="s", metadata=_stack_metadata(SHARED)
    )
    stack = pz.nn.LayerStack(
        stacked_sublayers=CountingLayer((), None, (state,), None),
        stack_axis="stack",
        stack_axis_size=2,
    )
    with pytest.raises(ValueError, match=r"'s' is SHARED across stack axis 'stack'"):
        stack(0, shared_counter=pz.StateVariable(0, label="c"))


def test_per_layer_state_without_stack_axis_is_rejected():
    state = pz.StateVariable(value=0, label="s", metadata=_stack_metadata(PER_LAYER))
    stack = pz.nn.LayerStack(
        stacked_sublayers=CountingLayer((), None, (state,), None),
        stack_axis="stack",
        stack_axis_size=2,
    )
    with pytest.raises(ValueError, match=r"'s' is PER_LAYER along stack axis 'stack'"):
        stack(0, shared_counter=pz.StateVariable(0, label="c"))


def test_per_layer_state_passed_as_side_input_is_rejected():
    state = pz.StateVariable(
        value=named_axes.zeros({"stack": 2}), label="s", metadata=_stack_metadata(PER_LAYER)
    )
    stack = pz.nn.LayerStack(
        stacked_sublayers=CountingLayer((), None, (state,), None),
        stack_axis="stack",
        stack_axis_size=2,
    )
    with pytest.raises(ValueError, match=r"Per-layer state variable 's' cannot also be passed"):
        stack(0, shared_counter=state)


def test_parameter_side_input_is_rejected():
    stack = _counting_stack()
    param = pz.Parameter(value=named_axes.zeros({}), label="p")
    with pytest.raises(ValueError, match=r"only thread StateVariables.*Parameter.*\['p'\]"):
        stack(0, shared_counter=pz.StateVariable(0, label="c"), extra=param)
