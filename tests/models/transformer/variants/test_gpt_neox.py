"""Tests for pz_flax.models.transformer.variants.gpt_neox, against penzai 0.2.5."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai.models.transformer.variants import gpt_neox as penzai_gpt_neox

from pz_flax import pz
from pz_flax.models.transformer.variants import gpt_neox
from tests.models.transformer.variants import oracle


def make_config(**overrides) -> gpt_neox.GPTNeoXTransformerConfig:
    fields = {
        "num_attention_heads": 2,
        "embedding_dim": 12,
        "projection_dim": 6,
        "mlp_hidden_dim": 20,
        "num_decoder_blocks": 2,
        "vocab_size": 17,
        "activation_fn": "gelu_exact",
        "rope_subset_size": 4,
        "rope_wavelength": 10_000.0,
        # Penzai's final norm ignores this setting and uses 1e-6; equal here so the two
        # libraries compute the same thing.
        "layernorm_epsilon": 1e-6,
        "parameter_dtype": jnp.float32,
        "activation_dtype": jnp.float32,
    }
    return gpt_neox.GPTNeoXTransformerConfig(**{**fields, **overrides})


@pytest.mark.parametrize(
    "overrides",
    [{}, {"use_layer_stack": True, "activation_fn": "gelu_approx"}, {"activation_fn": "silu"}],
    ids=["unrolled_gelu", "layer_stack_gelu_approx", "silu"],
)
def test_logits_and_parameters_match_penzai(overrides):
    config = make_config(**overrides)
    ours = gpt_neox.build_gpt_neox_transformer(config, jax.random.key(2))
    theirs = penzai_gpt_neox.build_gpt_neox_transformer(
        oracle.penzai_twin(penzai_gpt_neox.GPTNeoXTransformerConfig, config), jax.random.key(2)
    )
    oracle.assert_same_parameters(ours, theirs)
    np.testing.assert_allclose(
        oracle.logits(ours, oracle.tokens(pz)),
        oracle.penzai_logits(theirs, oracle.tokens(oracle.penzai_pz)),
        atol=oracle.ATOL,
        rtol=oracle.RTOL,
    )


def test_cached_logits_and_samples_match_penzai():
    config = make_config(use_layer_stack=True)
    ours = gpt_neox.build_gpt_neox_transformer(config, jax.random.key(3))
    theirs = penzai_gpt_neox.build_gpt_neox_transformer(
        oracle.penzai_twin(penzai_gpt_neox.GPTNeoXTransformerConfig, config), jax.random.key(3)
    )
    np.testing.assert_allclose(
        oracle.cached_logits(ours, oracle.tokens(pz)),
        oracle.penzai_cached_logits(theirs, oracle.tokens(oracle.penzai_pz)),
        atol=oracle.ATOL,
    )
    np.testing.assert_array_equal(
        oracle.sampled_tokens(ours, oracle.tokens(pz, seq=3)),
        oracle.penzai_sampled_tokens(theirs, oracle.tokens(oracle.penzai_pz, seq=3)),
    )


def test_every_norm_uses_the_configured_epsilon_and_dtype():
    config = make_config(layernorm_epsilon=1e-5, parameter_dtype=jnp.bfloat16)
    model = gpt_neox.build_gpt_neox_transformer(config, jax.random.key(0))
    norms = pz.select(model).at_instances_of(pz.nn.Standardize).get_sequence()
    assert len(norms) == 5  # two per block and the final norm
    assert {float(n.epsilon) for n in norms} == {1e-5}
    _, params = pz.unbind_params(model)
    assert {p.value.dtype for p in params} == {jnp.dtype(jnp.bfloat16)}


def test_parallel_block_structure():
    model = gpt_neox.build_gpt_neox_transformer(make_config(), jax.random.key(0))
    block = model.body.sublayers[1]
    (parallel,) = block.sublayers
    assert isinstance(parallel, pz.nn.BranchAndAddTogether)
    assert isinstance(parallel.branches[0], pz.nn.Identity)
    rope = pz.select(model).at_instances_of(pz.nn.ApplyRoPEToSubset).get_sequence()
    assert {r.rope_subset_size for r in rope} == {4}
    assert model.metadata.common_head_axes == {"heads": 2}


def test_unknown_activation():
    config = dataclasses.replace(make_config(), activation_fn="selu")
    with pytest.raises(ValueError, match="'selu'"):
        gpt_neox.build_gpt_neox_transformer(config, jax.random.key(0))


GPT_NEOX = {
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 32,
}


@pytest.mark.parametrize(
    ("hidden_act", "use_layer_stack"),
    [("gelu", False), ("gelu_new", True), ("relu", False)],
)
def test_logits_match_transformers(hidden_act, use_layer_stack):
    hf = pytest.importorskip("tests.models.transformer.variants.huggingface_models")
    model = hf.build(
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        hidden_act=hidden_act,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1000.0,
            "partial_rotary_factor": 0.5,
        },
        **GPT_NEOX,
    )
    converted = gpt_neox.gpt_neox_from_huggingface_model(model, use_layer_stack=use_layer_stack)
    rope = pz.select(converted).at_instances_of(pz.nn.ApplyRoPEToSubset).get_sequence()
    assert {(r.rope_subset_size, r.max_wavelength) for r in rope} == {(4, 1000.0)}
    hf.assert_logits_match(converted, model)


def test_huggingface_unsupported_settings_are_named():
    hf = pytest.importorskip("tests.models.transformer.variants.huggingface_models")
    model = hf.build("GPTNeoXForCausalLM", "GPTNeoXConfig", use_parallel_residual=False, **GPT_NEOX)
    with pytest.raises(ValueError, match="'use_parallel_residual': False"):
        gpt_neox.gpt_neox_from_huggingface_model(model)
    with pytest.raises(ValueError, match=r"Expected a transformers\.GPTNeoXForCausalLM"):
        gpt_neox.gpt_neox_from_huggingface_model(object())
