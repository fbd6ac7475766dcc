import jax
import pytest
from penzai import pz as penzai_pz
from penzai.models import simple_mlp as penzai_simple_mlp
from penzai.toolshed import save_intermediates as penzai_save_intermediates

from pz_flax import pz
from pz_flax.models import simple_mlp
from pz_flax.toolshed import save_intermediates


def _recorded(lib, mlp_module, tool, group, shapes_only):
    mlp = mlp_module.MLP.from_config(
        name="mlp", init_base_rng=jax.random.key(10), feature_sizes=[8, 16, 64, 32]
    )
    saving = tool.saving_all_intermediates(mlp, intermediates_group=group, shapes_only=shapes_only)
    _, state_vars = lib.unbind_state_vars(saving)
    before = [var.value for var in state_vars]
    result = saving(lib.nx.zeros({"batch": 3, "features": 8}))
    return saving, state_vars, before, result


@pytest.mark.parametrize("group", [None, "intermediates"])
@pytest.mark.parametrize("shapes_only", [False, True])
def test_records_the_same_activations_as_penzai(group, shapes_only):
    _, ours, our_before, our_result = _recorded(
        pz, simple_mlp, save_intermediates, group, shapes_only
    )
    _, theirs, _, their_result = _recorded(
        penzai_pz, penzai_simple_mlp, penzai_save_intermediates, group, shapes_only
    )
    assert len(ours) == len(theirs) == 12
    assert our_before == [None] * 12
    assert (
        dict(our_result.named_shape)
        == dict(their_result.named_shape)
        == {"batch": 3, "features": 32}
    )
    assert [dict(v.value.named_shape) for v in ours] == [dict(v.value.named_shape) for v in theirs]
    for var in ours:
        if group is None:
            assert isinstance(var.label, pz.AutoStateVarLabel)
        else:
            assert isinstance(var.label, pz.ScopedStateVarLabel) and var.label.group == group
        expected_type = pz.chk.ArraySpec if shapes_only else pz.nx.NamedArray
        assert isinstance(var.value, expected_type)


def test_saved_values_are_the_real_activations():
    mlp = simple_mlp.MLP.from_config(
        name="mlp", init_base_rng=jax.random.key(3), feature_sizes=[4, 6, 2]
    )
    saving = save_intermediates.saving_all_intermediates(mlp)
    x = pz.nx.wrap(jax.random.normal(jax.random.key(0), (2, 4))).tag("batch", "features")
    out = saving(x)
    _, state_vars = pz.unbind_state_vars(saving)
    first, last = state_vars[0].value, state_vars[-1].value
    assert (first.unwrap("batch", "features") == x.unwrap("batch", "features")).all()
    assert (last.unwrap("batch", "features") == out.unwrap("batch", "features")).all()
    assert (out.unwrap("batch", "features") == mlp(x).unwrap("batch", "features")).all()


def test_identity_gets_a_recorder_only_before_it():
    model = pz.nn.Sequential([pz.nn.Identity(), pz.nn.Elementwise(jax.nn.relu)])
    saving = save_intermediates.saving_all_intermediates(model, intermediates_group=None)
    kinds = [type(layer).__name__ for layer in saving.sublayers]
    assert kinds == ["SaveIntermediate", "Identity", "Elementwise", "SaveIntermediate"]
    penzai_model = penzai_pz.nn.Sequential(
        [penzai_pz.nn.Identity(), penzai_pz.nn.Elementwise(jax.nn.relu)]
    )
    penzai_saving = penzai_save_intermediates.saving_all_intermediates(
        penzai_model, intermediates_group=None
    )
    assert kinds == [type(layer).__name__ for layer in penzai_saving.sublayers]
    bare = save_intermediates.saving_all_intermediates(pz.nn.Identity())
    assert [type(layer).__name__ for layer in bare.sublayers] == ["SaveIntermediate", "Identity"]


def test_shape_recorder_survives_jit():
    layer = save_intermediates.SaveIntermediateShape()
    x = pz.nx.ones({"batch": 2, "features": 3})
    out = pz.variable_jit(lambda model, value: model(value))(layer, x)
    assert dict(out.named_shape) == {"batch": 2, "features": 3}
    assert layer.saved.value == pz.chk.ArraySpec(
        named_shape={"batch": 2, "features": 3}, dtype=x.dtype
    )


def test_single_recorders_pass_values_through():
    recorder = save_intermediates.SaveIntermediate()
    assert recorder.saved.value is None
    assert recorder(5) == 5 and recorder.saved.value == 5
