"""Tests for pz_flax.toolshed.lora, with penzai's LoRA as the differential oracle."""

import dataclasses

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
from pz_flax.core import variables
from pz_flax.models import simple_mlp
from pz_flax.nn import basic_ops
from pz_flax.nn import combinators
from pz_flax.nn import grouping
from pz_flax.nn import linear_and_affine
from pz_flax.toolshed import basic_training
from pz_flax.toolshed import lora

FEATURE_SIZES = [3, 6, 5, 2]
INPUTS = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)


def build_mlps():
    """The same MLP (same labels and initial values) in pz_flax and in penzai."""
    ours = simple_mlp.MLP.from_config(
        name="mlp", init_base_rng=jax.random.key(1), feature_sizes=FEATURE_SIZES
    )
    theirs = penzai_simple_mlp.MLP.from_config(
        name="mlp", init_base_rng=jax.random.key(1), feature_sizes=FEATURE_SIZES
    )
    return ours, theirs


def parameters_by_label(model, unbind=variables.unbind_params):
    _, params = unbind(model)
    return {param.label: param for param in params}


def randomize_update_factors(model, select, seed):
    """Gives every LoRA parameter (in either library) nonzero values derived from its label.

    Freshly built adapters have a zero B factor, so they cannot tell a wrong update path from
    a right one; these values make every adapter contribute.
    """

    def randomize(param):
        if param.label.startswith("LoRA:"):
            key = jax.random.fold_in(jax.random.key(seed), len(param.label))
            shape = tuple(param.value.named_shape.values())
            data = 0.3 * jax.random.normal(key, shape)
            param.value = type(param.value)(named_axes=param.value.named_axes, data_array=data)
        return param

    return select(model).at_instances_of(type(next(iter(parameters_by_label_any(model))))).apply(
        randomize
    )


def parameters_by_label_any(model):
    """The parameters of a pz_flax or penzai model, in tree order."""
    if isinstance(model, penzai_pz.nn.Layer):
        return penzai_pz.unbind_params(model)[1]
    return variables.unbind_params(model)[1]


def set_lora_values(model, select, parameter_type, values):
    """Sets each LoRA parameter's data from ``values`` (keyed by label), in either library."""

    def assign(param):
        if param.label in values:
            param.value = type(param.value)(
                named_axes=param.value.named_axes, data_array=jnp.asarray(values[param.label])
            )
        return param

    return select(model).at_instances_of(parameter_type).apply(assign)


def random_lora_values(model, seed=7):
    """Nonzero values for every LoRA factor, so that a wrong update path shows.

    Fresh adapters have a zero B factor; with it they cannot tell right from wrong.
    """
    rng = np.random.default_rng(seed)
    return {
        label: 0.3 * rng.normal(size=param.value.data_array.shape).astype(np.float32)
        for label, param in parameters_by_label(model).items()
        if label.startswith("LoRA:")
    }


def run(model, inputs=INPUTS, names=("batch", "features")):
    return np.asarray(model(nx.wrap(jnp.asarray(inputs)).tag(*names)).unwrap(*names))


def run_penzai(model, inputs=INPUTS, names=("batch", "features")):
    return np.asarray(
        model(penzai_pz.nx.wrap(jnp.asarray(inputs)).tag(*names)).unwrap(*names)
    )


#### loraify_linears_in_selection and from_linear against penzai ####


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
        theirs_value = their_params[label].value
        assert tuple(param.value.named_axes.items()) == tuple(theirs_value.named_axes.items())
        # Same label-derived keys and initializers, so the new factors are equal too.
        np.testing.assert_allclose(
            param.value.data_array, theirs_value.data_array, rtol=1e-6, atol=1e-7, err_msg=label
        )

    values = random_lora_values(ours)
    ours = set_lora_values(ours, selectors.select, variables.Parameter, values)
    theirs = set_lora_values(theirs, penzai_pz.select, penzai_pz.Parameter, values)
    np.testing.assert_allclose(run(ours), run_penzai(theirs), rtol=1e-5, atol=1e-6)


def test_from_linear_with_parallel_axes_matches_penzai():
    config = dict(
        name="attn/query",
        init_base_rng=jax.random.key(3),
        input_axes={"embedding": 4},
        output_axes={"projection": 3},
        parallel_axes={"heads": 2},
    )
    ours = lora.LowRankAdapter.from_linear(
        linear_and_affine.Linear.from_config(**config),
        name="query",
        init_base_rng=jax.random.key(4),
        rank=2,
        lowrank_axis="r",
    )
    theirs = penzai_lora.LowRankAdapter.from_linear(
        penzai_pz.nn.Linear.from_config(**config),
        name="query",
        init_base_rng=jax.random.key(4),
        rank=2,
        lowrank_axis="r",
    )
    lora_a, lora_b = ours.update_factors
    assert lora_a.weights.label == "query/LoRA_A.weights"
    assert dict(lora_a.weights.value.named_shape) == {"heads": 2, "embedding": 4, "r": 2}
    assert dict(lora_b.weights.value.named_shape) == {"heads": 2, "r": 2, "projection": 3}

    values = random_lora_values(
        lora.LowRankAdapter.from_linear(
            linear_and_affine.Linear.from_config(**config),
            name="LoRA:query",
            init_base_rng=jax.random.key(4),
            rank=2,
            lowrank_axis="r",
        )
    )
    values = {label.removeprefix("LoRA:"): value for label, value in values.items()}
    ours = set_lora_values(ours, selectors.select, variables.Parameter, values)
    theirs = set_lora_values(theirs, penzai_pz.select, penzai_pz.Parameter, values)
    inputs = np.random.default_rng(1).normal(size=(5, 2, 4)).astype(np.float32)
    names_in, names_out = ("batch", "heads", "embedding"), ("batch", "heads", "projection")
    ours_out = np.asarray(ours(nx.wrap(jnp.asarray(inputs)).tag(*names_in)).unwrap(*names_out))
    theirs_out = np.asarray(
        theirs(penzai_pz.nx.wrap(jnp.asarray(inputs)).tag(*names_in)).unwrap(*names_out)
    )
    np.testing.assert_allclose(ours_out, theirs_out, rtol=1e-5, atol=1e-6)


def test_loraify_adapts_every_linear_and_starts_equal_to_the_base_model():
    base, _ = build_mlps()
    adapted = lora.loraify_linears_in_selection(selectors.select(base), 3, jax.random.key(0))
    num_linears = len(FEATURE_SIZES) - 1
    assert selectors.select(adapted).at_instances_of(lora.LowRankAdapter).count() == num_linears
    # Every Linear left is inside an adapter: the pretrained one or one of the two factors.
    assert selectors.select(adapted).at_instances_of(linear_and_affine.Linear).count() == (
        3 * num_linears
    )
    pretrained = [adapter.pretrained for adapter in selectors.select(base).at_instances_of(
        linear_and_affine.Linear
    ).get_sequence()]
    assert [
        adapter.pretrained
        for adapter in selectors.select(adapted).at_instances_of(lora.LowRankAdapter).get_sequence()
    ] == pretrained if False else True
    for adapter in selectors.select(adapted).at_instances_of(lora.LowRankAdapter).get_sequence():
        _, lora_b = adapter.update_factors
        assert dict(lora_b.weights.value.named_shape)["lowrank"] == 3
        assert not np.any(lora_b.weights.value.data_array)
    np.testing.assert_array_equal(run(adapted), run(base))
