"""Tests for pz_flax.toolshed.lora, with penzai's LoRA as the differential oracle."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from penzai import pz as penzai_pz
from penzai.models import simple_mlp as penzai_simple_mlp
from penzai.toolshed import lora as penzai_lora

from pz_flax.core import named_axes as nx
from pz_flax.core import selectors
from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.models import simple_mlp
from pz_flax.nn import basic_ops
from pz_flax.nn import grouping
from pz_flax.nn import linear_and_affine
from pz_flax.toolshed import basic_training
from pz_flax.toolshed import lora

FEATURE_SIZES = [3, 6, 5, 2]
INPUTS = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
HEADS_CONFIG = dict(
    name="attn/query",
    init_base_rng=jax.random.key(3),
    input_axes={"embedding": 4},
    output_axes={"projection": 3},
    parallel_axes={"heads": 2},
)


def build_mlps():
    """The same MLP (same labels and initial values) in pz_flax and in penzai."""
    ours = simple_mlp.MLP.from_config(
        name="mlp", init_base_rng=jax.random.key(1), feature_sizes=FEATURE_SIZES
    )
    theirs = penzai_simple_mlp.MLP.from_config(
        name="mlp", init_base_rng=jax.random.key(1), feature_sizes=FEATURE_SIZES
    )
    return ours, theirs


def parameters_by_label(model, unbind=variables.unbind_params) -> dict[str, Any]:
    _, params = unbind(model)
    return {param.label: param for param in params}


def random_lora_values(model, seed=7) -> dict[str, np.ndarray]:
    """Nonzero data for every LoRA factor of ``model``, keyed by label.

    Fresh adapters have a zero B factor, and with it they cannot tell a right update path from
    a wrong one; these values make every adapter contribute.
    """
    rng = np.random.default_rng(seed)
    return {
        label: 0.3 * rng.normal(size=param.value.data_array.shape).astype(np.float32)
        for label, param in parameters_by_label(model).items()
        if "/LoRA_" in label
    }


def set_values(model, select, parameter_type, values):
    """Replaces the data of the parameters named in ``values`` (works for either library)."""

    def assign(param):
        if param.label in values:
            param.value = type(param.value)(
                named_axes=param.value.named_axes, data_array=jnp.asarray(values[param.label])
            )
        return param

    return select(model).at_instances_of(parameter_type).apply(assign)


def with_random_factors(model, seed=7):
    return set_values(model, selectors.select, variables.Parameter, random_lora_values(model, seed))


def run(model, inputs=INPUTS, names_in=("batch", "features"), names_out=("batch", "features")):
    return np.asarray(model(nx.wrap(jnp.asarray(inputs)).tag(*names_in)).unwrap(*names_out))


def run_penzai(model, inputs=INPUTS, names_in=("batch", "features"), names_out=None):
    names_out = names_out or names_in
    named = penzai_pz.nx.wrap(jnp.asarray(inputs)).tag(*names_in)
    return np.asarray(model(named).unwrap(*names_out))


def heads_inputs():
    return np.random.default_rng(1).normal(size=(5, 2, 4)).astype(np.float32)


HEADS_IN = ("batch", "heads", "embedding")
HEADS_OUT = ("batch", "heads", "projection")


def heads_adapter(**overrides):
    base = linear_and_affine.Linear.from_config(**HEADS_CONFIG)
    kwargs = dict(name="query", init_base_rng=jax.random.key(4), rank=2, lowrank_axis="r")
    return lora.LowRankAdapter.from_linear(base, **{**kwargs, **overrides})


#### Against penzai ####


def test_loraify_matches_penzai_labels_axes_values_and_outputs():
    ours, theirs = build_mlps()
    ours = lora.loraify_linears_in_selection(selectors.select(ours), 2, jax.random.key(5))
    theirs = penzai_lora.loraify_linears_in_selection(
        penzai_pz.select(theirs), rank=2, init_base_rng=jax.random.key(5)
    )
    our_params = parameters_by_label(ours)
    their_params = parameters_by_label(theirs, penzai_pz.unbind_params)
    assert list(our_params) == list(their_params)
    assert "LoRA:MLP.sublayers[0]/Affine.sublayers[0]/LoRA_A.weights" in our_params
    for label, param in our_params.items():
        their_value = their_params[label].value
        assert tuple(param.value.named_axes.items()) == tuple(their_value.named_axes.items())
        # Same label-derived keys and initializers, so the new factors start out equal too.
        np.testing.assert_allclose(
            param.value.data_array, their_value.data_array, rtol=1e-6, atol=1e-7, err_msg=label
        )

    values = random_lora_values(ours)
    ours = set_values(ours, selectors.select, variables.Parameter, values)
    theirs = set_values(theirs, penzai_pz.select, penzai_pz.Parameter, values)
    np.testing.assert_allclose(run(ours), run_penzai(theirs), rtol=1e-5, atol=1e-6)
    assert not np.allclose(run(ours), run(build_mlps()[0]), atol=1e-3)


def test_from_linear_with_parallel_axes_matches_penzai():
    ours = heads_adapter()
    theirs = penzai_lora.LowRankAdapter.from_linear(
        penzai_pz.nn.Linear.from_config(**HEADS_CONFIG),
        name="query",
        init_base_rng=jax.random.key(4),
        rank=2,
        lowrank_axis="r",
    )
    lora_a, lora_b = ours.update_factors
    assert lora_a.weights.label == "query/LoRA_A.weights"
    assert lora_b.weights.label == "query/LoRA_B.weights"
    assert dict(lora_a.weights.value.named_shape) == {"heads": 2, "embedding": 4, "r": 2}
    assert dict(lora_b.weights.value.named_shape) == {"heads": 2, "r": 2, "projection": 3}
    assert lora_a.in_axis_names == ("embedding",) and lora_a.out_axis_names == ("r",)
    assert lora_b.in_axis_names == ("r",) and lora_b.out_axis_names == ("projection",)

    values = random_lora_values(ours)
    ours = set_values(ours, selectors.select, variables.Parameter, values)
    theirs = set_values(theirs, penzai_pz.select, penzai_pz.Parameter, values)
    np.testing.assert_allclose(
        run(ours, heads_inputs(), HEADS_IN, HEADS_OUT),
        run_penzai(theirs, heads_inputs(), HEADS_IN, HEADS_OUT),
        rtol=1e-5,
        atol=1e-6,
    )


def test_loraify_reaches_the_linear_inside_a_linear_in_place_like_penzai():
    config = dict(
        name="square",
        init_base_rng=jax.random.key(2),
        input_axes={"features": 3},
        output_axes={"features": 3},
    )
    ours = linear_and_affine.Linear.from_config(**config)
    assert isinstance(ours, linear_and_affine.LinearInPlace)
    adapted = lora.loraify_linears_in_selection(selectors.select(ours), 2, jax.random.key(0))
    theirs = penzai_lora.loraify_linears_in_selection(
        penzai_pz.select(penzai_pz.nn.Linear.from_config(**config)), 2, jax.random.key(0)
    )
    assert isinstance(adapted, linear_and_affine.LinearInPlace)
    assert isinstance(adapted.sublayers[0], lora.LowRankAdapter)
    assert list(parameters_by_label(adapted)) == list(
        parameters_by_label(theirs, penzai_pz.unbind_params)
    )
    np.testing.assert_array_equal(run(adapted), run(ours))


def test_unseeded_adapters_have_labelled_slots_like_penzai():
    base = linear_and_affine.Linear.from_config(**HEADS_CONFIG)
    adapter = lora.LowRankAdapter.from_linear(base, "q", init_base_rng=None, rank=2)
    theirs = penzai_lora.LowRankAdapter.from_linear(
        penzai_pz.nn.Linear.from_config(**HEADS_CONFIG), "q", init_base_rng=None, rank=2
    )
    lora_a, lora_b = adapter.update_factors
    assert isinstance(lora_a.weights, variables.ParameterSlot)
    assert isinstance(lora_b.weights, variables.ParameterSlot)
    their_slots = penzai_pz.select(theirs).at_instances_of(penzai_pz.ParameterSlot).get_sequence()
    assert [lora_a.weights.label, lora_b.weights.label] == [s.label for s in their_slots]
    with pytest.raises(variables.UnboundVariableError):
        adapter.merged()


#### Selection and initial behaviour ####


def test_loraify_adapts_every_linear_and_starts_equal_to_the_base_model():
    base, _ = build_mlps()
    base_linears = selectors.select(base).at_instances_of(linear_and_affine.Linear).get_sequence()
    adapted = lora.loraify_linears_in_selection(selectors.select(base), 3, jax.random.key(0))
    adapters = selectors.select(adapted).at_instances_of(lora.LowRankAdapter).get_sequence()
    assert len(adapters) == len(base_linears) == len(FEATURE_SIZES) - 1
    # The pretrained layers are the original objects, parameters included.
    assert all(a.pretrained is linear for a, linear in zip(adapters, base_linears))
    for adapter in adapters:
        lora_a, lora_b = adapter.update_factors
        assert lora_a.weights.value.named_shape["lowrank"] == 3
        assert not np.any(lora_b.weights.value.data_array)
        assert np.any(lora_a.weights.value.data_array)
    np.testing.assert_array_equal(run(adapted), run(base))


def test_loraify_only_touches_the_selected_part():
    base, _ = build_mlps()
    last = selectors.select(base).at_instances_of(linear_and_affine.Affine).pick_nth_selected(2)
    adapted = lora.loraify_linears_in_selection(last, 2, jax.random.key(0))
    (adapter,) = selectors.select(adapted).at_instances_of(lora.LowRankAdapter).get_sequence()
    assert adapter.pretrained is base.sublayers[-1].sublayers[0]
    untouched = adapted.sublayers[0].sublayers[0]
    assert isinstance(untouched, linear_and_affine.Linear)
    assert untouched.weights is base.sublayers[0].sublayers[0].weights

    no_linears = selectors.select(base).at_instances_of(basic_ops.Elementwise)
    unchanged = lora.loraify_linears_in_selection(no_linears, 2, jax.random.key(0))
    assert jax.tree_util.tree_structure(unchanged) == jax.tree_util.tree_structure(base)
    assert selectors.select(unchanged).at_instances_of(lora.LowRankAdapter).is_empty()


def test_adapter_is_a_sequential_with_penzais_layout():
    adapter = heads_adapter()
    assert isinstance(adapter, grouping.Sequential)
    (branch,) = adapter.sublayers
    pretrained, update = branch.branches
    assert (pretrained.name, update.name) == ("Pretrained", "Update")
    assert adapter.pretrained is pretrained.sublayers[0]
    assert adapter.update_factors == tuple(update.sublayers)


def mark_untrainable(model):
    return (
        selectors.select(model)
        .at_instances_of(variables.Parameter)
        .apply(
            lambda p: variables.Parameter(
                label=p.label, value=p.value, metadata={**p.metadata, "trainable": False}
            )
        )
    )


@pytest.mark.parametrize("freeze", [mark_untrainable, variables.freeze_params])
def test_training_with_frozen_base_moves_only_the_adapters(freeze):
    base, _ = build_mlps()
    frozen = freeze(base)
    model = lora.loraify_linears_in_selection(selectors.select(frozen), 2, jax.random.key(0))
    before = {k: np.array(p.value.data_array) for k, p in parameters_by_label(model).items()}
    targets = nx.wrap(jnp.asarray(np.tanh(INPUTS[:, :2]))).tag("batch", "features")

    def loss_fn(*, model, state, rng):
        del rng
        error = model(nx.wrap(jnp.asarray(INPUTS)).tag("batch", "features")) - targets
        loss = (error**2).untag("batch", "features").unwrap().mean()
        return loss, state, {"loss": loss}

    trainer = basic_training.StatefulTrainer.build(
        root_rng=jax.random.key(0), model=model, optimizer_def=optax.adam(0.05), loss_fn=loss_fn
    )
    losses = [float(trainer.step()["loss"]) for _ in range(5)]
    assert losses[-1] < losses[0]
    after = {k: np.array(p.value.data_array) for k, p in parameters_by_label(model).items()}
    moved = {label for label in before if not np.array_equal(before[label], after[label])}
    assert moved and all(label.startswith("LoRA:") for label in moved)
    assert {label for label in moved if label.endswith("LoRA_B.weights")}


#### Merging ####


def test_merged_computes_the_adapter_as_one_linear_w_plus_ab():
    base = linear_and_affine.Linear.from_config(**HEADS_CONFIG)
    base = dataclasses.replace(
        base,
        weights=variables.Parameter(
            label=base.weights.label, value=base.weights.value, metadata={"trainable": False}
        ),
    )
    adapter = with_random_factors(
        lora.LowRankAdapter.from_linear(base, "q", jax.random.key(4), rank=2, lowrank_axis="r")
    )
    merged = adapter.merged()
    assert type(merged) is linear_and_affine.Linear
    assert isinstance(merged.weights, variables.Parameter)
    assert merged.weights is not base.weights
    assert merged.weights.label == "attn/query.weights"
    assert merged.weights.metadata == {"trainable": False}
    assert (merged.in_axis_names, merged.out_axis_names) == (
        base.in_axis_names,
        base.out_axis_names,
    )
    assert tuple(merged.weights.value.named_axes) == tuple(base.weights.value.named_axes)
    lora_a, lora_b = (factor.weights.value for factor in adapter.update_factors)
    expected = base.weights.value.unwrap("heads", "embedding", "projection") + np.einsum(
        "her,hrp->hep",
        lora_a.unwrap("heads", "embedding", "r"),
        lora_b.unwrap("heads", "r", "projection"),
    )
    np.testing.assert_allclose(
        merged.weights.value.unwrap("heads", "embedding", "projection"),
        expected,
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        run(merged, heads_inputs(), HEADS_IN, HEADS_OUT),
        run(adapter, heads_inputs(), HEADS_IN, HEADS_OUT),
        rtol=1e-5,
        atol=1e-5,
    )


def test_merged_keeps_a_frozen_weight_frozen_and_its_dtype():
    base = variables.freeze_params(
        linear_and_affine.Linear.from_config(**HEADS_CONFIG, dtype=jnp.bfloat16)
    )
    adapter = with_random_factors(lora.LowRankAdapter.from_linear(base, "q", jax.random.key(4), 2))
    merged = adapter.merged()
    assert isinstance(merged.weights, variables.ParameterValue)
    assert merged.weights.label == base.weights.label
    assert merged.weights.value.dtype == jnp.bfloat16
    # The float32 update is added before rounding to bfloat16 once.
    lora_a, lora_b = (factor.weights.value for factor in adapter.update_factors)
    update = np.einsum(
        "her,hrp->hep",
        lora_a.unwrap("heads", "embedding", "lowrank"),
        lora_b.unwrap("heads", "lowrank", "projection"),
    )
    expected = np.asarray(base.weights.value.unwrap("heads", "embedding", "projection"), np.float32)
    np.testing.assert_allclose(
        np.asarray(merged.weights.value.unwrap("heads", "embedding", "projection"), np.float32),
        expected + update,
        rtol=1e-2,
        atol=1e-2,
    )


def test_merging_every_adapter_gives_back_the_pretrained_structure():
    base, _ = build_mlps()
    adapted = with_random_factors(
        lora.loraify_linears_in_selection(selectors.select(base), 2, jax.random.key(0))
    )
    merged = lora.merge_lora_adapters_in_selection(selectors.select(adapted))
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
    assert list(parameters_by_label(merged)) == list(parameters_by_label(base))
    np.testing.assert_allclose(run(merged), run(adapted), rtol=1e-5, atol=1e-5)
    assert not np.allclose(run(merged), run(base), atol=1e-3)

    # A partial selection merges only what it covers.
    first_only = lora.merge_lora_adapters_in_selection(
        selectors.select(adapted).at_instances_of(lora.LowRankAdapter).pick_nth_selected(0)
    )
    assert selectors.select(first_only).at_instances_of(lora.LowRankAdapter).count() == 2
    np.testing.assert_allclose(run(first_only), run(adapted), rtol=1e-5, atol=1e-5)


def test_adapting_twice_then_merging_merges_inside_out():
    base, _ = build_mlps()
    once = with_random_factors(
        lora.loraify_linears_in_selection(selectors.select(base), 2, jax.random.key(0))
    )
    twice = with_random_factors(
        lora.loraify_linears_in_selection(selectors.select(once), 2, jax.random.key(1)), seed=8
    )
    # Every Linear of every first-round adapter (base, A and B) got its own adapter.
    num_linears = len(FEATURE_SIZES) - 1
    adapters = selectors.select(twice).at_instances_of(lora.LowRankAdapter)
    assert adapters.count() == num_linears
    assert adapters.at_instances_of(lora.LowRankAdapter, innermost=True).count() == 3 * num_linears
    merged = lora.merge_lora_adapters_in_selection(selectors.select(twice))
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
    np.testing.assert_allclose(run(merged), run(twice), rtol=1e-4, atol=1e-5)


#### Errors ####


def test_from_linear_rejects_layers_that_are_not_linear():
    in_place = linear_and_affine.Linear.from_config(
        name="square", init_base_rng=jax.random.key(0), input_axes={"a": 2}, output_axes={"a": 2}
    )
    for layer in (in_place, basic_ops.Elementwise(jax.nn.relu)):
        with pytest.raises(TypeError, match=f"got a {type(layer).__name__}"):
            lora.LowRankAdapter.from_linear(layer, "x", jax.random.key(0), rank=2)


@pytest.mark.parametrize("rank", [0, -1, 2.0, True, "2"])
def test_rank_must_be_a_positive_integer(rank):
    base = linear_and_affine.Linear.from_config(**HEADS_CONFIG)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.LowRankAdapter.from_linear(base, "q", jax.random.key(0), rank=rank)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.loraify_linears_in_selection(selectors.select(base), rank, jax.random.key(0))


def test_numpy_integer_rank_is_accepted():
    adapter = heads_adapter(rank=np.int64(3))
    assert adapter.update_factors[0].weights.value.named_shape["r"] == 3


def test_lowrank_axis_must_not_be_a_parallel_axis():
    with pytest.raises(ValueError, match="lowrank_axis 'heads' is a parallel axis"):
        heads_adapter(lowrank_axis="heads")
    # penzai fails here too, though with a generic message from Linear.from_config.
    with pytest.raises(ValueError):
        penzai_lora.LowRankAdapter.from_linear(
            penzai_pz.nn.Linear.from_config(**HEADS_CONFIG), "q", jax.random.key(4), 2, "heads"
        )


@pytest.mark.parametrize("axis", ["embedding", "projection"])
def test_lowrank_axis_named_like_an_input_or_output_axis_works_like_penzai(axis):
    ours = heads_adapter(lowrank_axis=axis)
    theirs = penzai_lora.LowRankAdapter.from_linear(
        penzai_pz.nn.Linear.from_config(**HEADS_CONFIG), "query", jax.random.key(4), 2, axis
    )
    assert any(
        isinstance(factor, linear_and_affine.LinearInPlace) for factor in ours.update_factors
    )
    values = random_lora_values(ours)
    ours = set_values(ours, selectors.select, variables.Parameter, values)
    theirs = set_values(theirs, penzai_pz.select, penzai_pz.Parameter, values)
    adapted = run(ours, heads_inputs(), HEADS_IN, HEADS_OUT)
    np.testing.assert_allclose(
        adapted, run_penzai(theirs, heads_inputs(), HEADS_IN, HEADS_OUT), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        run(ours.merged(), heads_inputs(), HEADS_IN, HEADS_OUT), adapted, rtol=1e-5, atol=1e-5
    )


def test_edited_layouts_are_reported():
    adapter = heads_adapter()
    flattened = dataclasses.replace(adapter, sublayers=list(adapter.sublayers[0].branches))
    with pytest.raises(ValueError, match="no longer has the layout built by from_linear"):
        _ = flattened.pretrained
    with pytest.raises(ValueError, match="no longer has the layout built by from_linear"):
        flattened.merged()

    not_linear = (
        selectors.select(adapter)
        .at_instances_of(grouping.NamedGroup)
        .where(lambda group: group.name == "Pretrained")
        .apply(lambda group: dataclasses.replace(group, sublayers=[grouping.Identity()]))
    )
    with pytest.raises(ValueError, match="pretrained layer is a Identity"):
        not_linear.merged()


def test_merging_factors_that_do_not_fit_the_base_is_an_error():
    adapter = heads_adapter()
    wrong_b = linear_and_affine.Linear.from_config(
        name="wrong",
        init_base_rng=jax.random.key(0),
        input_axes={"r": 2},
        output_axes={"out": 5},
        parallel_axes={"heads": 2},
    )
    mismatched = (
        selectors.select(adapter).at_instances_of(linear_and_affine.Linear).pick_nth_selected(2)
    ).set(wrong_b)
    with pytest.raises(ValueError, match="differs from the base weight"):
        mismatched.merged()

    other_axis = linear_and_affine.Linear.from_config(
        name="other",
        init_base_rng=jax.random.key(0),
        input_axes={"s": 2},
        output_axes={"projection": 3},
        parallel_axes={"heads": 2},
    )
    disconnected = (
        selectors.select(adapter).at_instances_of(linear_and_affine.Linear).pick_nth_selected(2)
    ).set(other_axis)
    with pytest.raises(ValueError, match="do not meet on the low-rank axis"):
        disconnected.merged()


@struct.pytree_dataclass
class PlainWeights(struct.Struct):
    """A user's own ``ParameterLike``: anything with a ``value``."""

    value: Any


def test_merging_into_an_unknown_parameter_kind_is_an_error():
    base = linear_and_affine.Linear.from_config(**HEADS_CONFIG)
    base = dataclasses.replace(base, weights=PlainWeights(base.weights.value))
    adapter = lora.LowRankAdapter.from_linear(base, "q", jax.random.key(0), rank=2)
    np.testing.assert_array_equal(
        run(adapter, heads_inputs(), HEADS_IN, HEADS_OUT),
        run(base, heads_inputs(), HEADS_IN, HEADS_OUT),
    )
    with pytest.raises(TypeError, match="weights are a PlainWeights"):
        adapter.merged()
