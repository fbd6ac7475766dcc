import jax
import numpy as np
import pytest

from pz_flax import pz
from pz_flax.models import simple_mlp
from pz_flax.toolshed import isolate_submodel
from tests.toolshed.stateful_layers import CountCalls


def _mlp(name, seed, sizes):
    return simple_mlp.MLP.from_config(
        name=name, init_base_rng=jax.random.key(seed), feature_sizes=sizes
    )


def test_isolates_a_stateless_layer_and_replays_it():
    mlp = _mlp("mlp", 42, [8, 16, 32, 32])
    selection = mlp.select().at(lambda root: root.sublayers[2].sublayers[0])
    assert isinstance(selection.get(), pz.nn.Linear)
    isolated = isolate_submodel.call_and_extract_submodel(
        selection, pz.nx.ones({"batch": 4, "features": 8})
    )
    assert isinstance(isolated, isolate_submodel.IsolatedSubmodel)
    assert isinstance(isolated.submodel, pz.nn.Linear)
    assert tuple(isolated.initial_var_values) == () and tuple(isolated.final_var_values) == ()
    # Parameters come out frozen: the isolated copy cannot change the model.
    assert isinstance(isolated.submodel.weights, pz.ParameterValue)
    replay = isolated.submodel(isolated.saved_arg)
    np.testing.assert_allclose(
        replay.unwrap("batch", "features_out"),
        isolated.saved_output.unwrap("batch", "features_out"),
    )


def test_captures_state_shared_layers_and_random_streams():
    shared = simple_mlp.DropoutMLP.from_config(
        name="shared_mlp", init_base_rng=jax.random.key(42), feature_sizes=[8, 16, 8], drop_rate=0.2
    )
    counter = CountCalls(pz.StateVariable(0, label="counter"))
    model = pz.nn.Sequential(
        [
            _mlp("mlp0", 1, [8, 16, 8]),
            shared,
            counter,
            pz.nn.NamedGroup("target", [shared, counter]),
            counter,
            _mlp("mlp1", 2, [8, 16, 8]),
            shared,
        ]
    )
    stream = pz.RandomStream(jax.random.key(42), offset=pz.StateVariable(0, label="rng_offset"))
    selection = model.select().at_subtrees_where(
        lambda node: isinstance(node, pz.nn.NamedGroup) and node.name == "target"
    )
    isolated = isolate_submodel.call_and_extract_submodel(
        selection, pz.nx.ones({"batch": 4, "features": 8}), random_stream=stream
    )
    assert isinstance(isolated.submodel, pz.nn.NamedGroup)
    saved_stream = isolated.saved_side_inputs["random_stream"]
    assert saved_stream.offset == pz.StateVariableSlot(label="rng_offset")
    assert {v.label: v.value for v in isolated.initial_var_values} == {
        "counter": 1,
        "rng_offset": 1,
    }
    assert {v.label: v.value for v in isolated.final_var_values} == {"counter": 2, "rng_offset": 2}

    replay, replay_values = isolated.submodel.stateless_call(
        isolated.initial_var_values, isolated.saved_arg, **isolated.saved_side_inputs
    )
    np.testing.assert_allclose(
        replay.unwrap("batch", "features"), isolated.saved_output.unwrap("batch", "features")
    )
    assert {v.label: v.value for v in replay_values} == {"counter": 2, "rng_offset": 2}
    # The real model ran to completion with the capturer in place.
    assert counter.calls.value == 3 and stream.offset.value == 3


@pz.pytree_dataclass
class _CallTwice(pz.nn.Layer):
    inner: pz.nn.Layer

    def __call__(self, value, **side_inputs):
        return self.inner(self.inner(value, **side_inputs), **side_inputs)


def test_a_layer_called_twice_gives_one_record_per_call():
    inner = _mlp("inner", 0, [4, 4])
    selection = pz.select(_CallTwice(inner)).at(lambda m: m.inner)
    x = pz.nx.ones({"features": 4})
    calls = isolate_submodel.call_and_extract_submodel(selection, x)
    assert isinstance(calls, list) and len(calls) == 2
    np.testing.assert_allclose(calls[0].saved_arg.unwrap("features"), x.unwrap("features"))
    np.testing.assert_allclose(
        calls[1].saved_arg.unwrap("features"), calls[0].saved_output.unwrap("features")
    )


def test_selection_errors():
    mlp = _mlp("mlp", 0, [4, 4, 4])
    with pytest.raises(ValueError, match="exactly one sublayer"):
        isolate_submodel.call_and_extract_submodel(
            mlp.select().at_instances_of(pz.nn.Linear), pz.nx.ones({"features": 4})
        )
    with pytest.raises(ValueError, match="must select a layer"):
        isolate_submodel.call_and_extract_submodel(
            mlp.select().at_instances_of(pz.Parameter).pick_nth_selected(0),
            pz.nx.ones({"features": 4}),
        )
    with pytest.raises(ValueError, match="built from must be a layer"):
        isolate_submodel.call_and_extract_submodel(
            pz.select({"model": mlp}).at(lambda d: d["model"]), pz.nx.ones({"features": 4})
        )
