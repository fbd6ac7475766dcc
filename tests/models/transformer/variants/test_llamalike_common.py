"""Tests for pz_flax.models.transformer.variants.llamalike_common, against penzai 0.2.5."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai.models.transformer.variants import llamalike_common as penzai_llamalike

from pz_flax import pz
from pz_flax.models.transformer import model_parts
from pz_flax.models.transformer.variants import llamalike_common
from tests.models.transformer.variants import oracle

BASE = {
    "embedding_dim": 16,
    "projection_dim": 4,
    "mlp_hidden_dim": 24,
    "num_decoder_blocks": 2,
    "vocab_size": 17,
}

# One configuration per head layout and option the family has.
CONFIGS = {
    "multi_head_swiglu_untied": {
        "num_kv_heads": 3,
        "query_head_multiplier": 1,
        "mlp_variant": "swiglu",
        "tie_embedder_and_logits": False,
    },
    "multi_query_geglu_tied_stacked": {
        "num_kv_heads": 1,
        "query_head_multiplier": 3,
        "mlp_variant": "geglu_approx",
        "tie_embedder_and_logits": True,
        "use_layer_stack": True,
    },
    "grouped_query_gemma2_options": {
        "num_kv_heads": 2,
        "query_head_multiplier": 2,
        "mlp_variant": "geglu_approx",
        "tie_embedder_and_logits": True,
        "attention_type": (
            llamalike_common.AttentionTypeSlidingWindowCausal(3),
            llamalike_common.AttentionTypeGlobalCausal(),
        ),
        "use_post_attn_norm": True,
        "use_post_ffw_norm": True,
        "final_logit_softcap": 3.0,
        "attn_logits_soft_cap": 2.0,
        "query_scaling_factor": 0.3,
        "rope_wavelength": 1000.0,
        "rms_norm_eps": 1e-5,
    },
    "sliding_window_bf16_parameters": {
        "num_kv_heads": 2,
        "query_head_multiplier": 2,
        "mlp_variant": "swiglu",
        "tie_embedder_and_logits": True,
        "attention_type": llamalike_common.AttentionTypeSlidingWindowCausal(4),
        "parameter_dtype": jnp.bfloat16,
        "activation_dtype": jnp.float32,
        "use_layer_stack": True,
    },
}


def _penzai_attention_type(attention_type):
    convert = {
        llamalike_common.AttentionTypeGlobalCausal: lambda _: (
            penzai_llamalike.AttentionTypeGlobalCausal()
        ),
        llamalike_common.AttentionTypeSlidingWindowCausal: lambda t: (
            penzai_llamalike.AttentionTypeSlidingWindowCausal(t.window_size)
        ),
    }
    if isinstance(attention_type, tuple):
        return tuple(_penzai_attention_type(t) for t in attention_type)
    return convert[type(attention_type)](attention_type)


def make_config(name: str) -> llamalike_common.LlamalikeTransformerConfig:
    return llamalike_common.LlamalikeTransformerConfig(**BASE, **CONFIGS[name])


def penzai_config(config):
    twin = oracle.penzai_twin(penzai_llamalike.LlamalikeTransformerConfig, config)
    return dataclasses.replace(twin, attention_type=_penzai_attention_type(config.attention_type))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request):
    config = make_config(request.param)
    ours = llamalike_common.build_llamalike_transformer(config, jax.random.key(4))
    theirs = penzai_llamalike.build_llamalike_transformer(penzai_config(config), jax.random.key(4))
    return request.param, ours, theirs


def test_same_parameters_as_penzai(models):
    _, ours, theirs = models
    oracle.assert_same_parameters(ours, theirs)


def test_logits_match_penzai(models):
    _, ours, theirs = models
    np.testing.assert_allclose(
        oracle.logits(ours, oracle.tokens(pz)),
        oracle.penzai_logits(theirs, oracle.tokens(oracle.penzai_pz)),
        atol=oracle.ATOL,
        rtol=oracle.RTOL,
    )


@pytest.mark.parametrize(
    "config_name", ["multi_head_swiglu_untied", "multi_query_geglu_tied_stacked"]
)
def test_cached_logits_match_penzai(config_name):
    config = make_config(config_name)
    ours = llamalike_common.build_llamalike_transformer(config, jax.random.key(5))
    theirs = penzai_llamalike.build_llamalike_transformer(penzai_config(config), jax.random.key(5))
    our_tokens, their_tokens = oracle.tokens(pz), oracle.tokens(oracle.penzai_pz)
    cached = oracle.cached_logits(ours, our_tokens)
    np.testing.assert_allclose(
        cached, oracle.penzai_cached_logits(theirs, their_tokens), atol=oracle.ATOL
    )
    # Cached decoding also agrees with the full pass of the same model.
    np.testing.assert_allclose(cached, oracle.logits(ours, our_tokens), atol=oracle.ATOL)


def test_sampled_tokens_match_penzai():
    config = make_config("grouped_query_gemma2_options")
    config = dataclasses.replace(
        config, attention_type=llamalike_common.AttentionTypeGlobalCausal()
    )
    ours = llamalike_common.build_llamalike_transformer(config, jax.random.key(7))
    theirs = penzai_llamalike.build_llamalike_transformer(penzai_config(config), jax.random.key(7))
    np.testing.assert_array_equal(
        oracle.sampled_tokens(ours, oracle.tokens(pz, seq=3)),
        oracle.penzai_sampled_tokens(theirs, oracle.tokens(oracle.penzai_pz, seq=3)),
    )


def test_sliding_window_cached_decoding_matches_full_pass():
    # Penzai documents its sliding-window masks as unsupported with caches; pz_flax's
    # masks read the cached key positions, so cached decoding gives the full-pass logits.
    config = make_config("grouped_query_gemma2_options")
    model = llamalike_common.build_llamalike_transformer(config, jax.random.key(6))
    token_ids = oracle.tokens(pz)
    np.testing.assert_allclose(
        oracle.cached_logits(model, token_ids, prompt_len=2),
        oracle.logits(model, token_ids),
        atol=oracle.ATOL,
    )


def test_structure_and_metadata():
    config = make_config("grouped_query_gemma2_options")
    model = llamalike_common.build_llamalike_transformer(config, jax.random.key(0), name="lm")
    assert isinstance(model, model_parts.TransformerLM)
    assert model.metadata == model_parts.TransformerMetadata(
        common_head_axes={"head_groups": 2},
        query_only_head_axes={"query_heads": 2},
        embedding_dim=16,
        projection_dim=4,
        mlp_hidden_dim=24,
        vocab_size=17,
        activation_dtype=jnp.float32,
    )
    blocks = pz.select(model).at_instances_of(model_parts.TransformerBlock).get_sequence()
    assert len(blocks) == 2
    windows = [
        pz.select(block).at_instances_of(pz.nn.ApplyCausalSlidingWindowAttentionMask).count()
        for block in blocks
    ]
    assert windows == [1, 0]  # the attention types repeat: window, global
    gates = pz.select(model).at_instances_of(pz.nn.NamedGroup).get_sequence()
    assert [g.name for g in gates] == ["gate", "gate"]
    _, params = pz.unbind_params(model)
    labels = {p.label for p in params}
    assert "lm/block_1/post_ffw_norm/scale.weights" in labels
    assert "lm/block_0/attention/query.weights" in labels


def test_parameter_slots_without_rng():
    model = llamalike_common.build_llamalike_transformer(make_config("multi_head_swiglu_untied"))
    with pytest.raises(ValueError, match="ParameterSlots found"):
        pz.nn.assert_no_parameter_slots(model)


def test_unknown_mlp_variant():
    config = dataclasses.replace(make_config("multi_head_swiglu_untied"), mlp_variant="reglu")
    with pytest.raises(ValueError, match="'reglu'"):
        llamalike_common.build_llamalike_transformer(config, jax.random.key(0))


def test_per_block_attention_types_need_a_block_index():
    config = make_config("grouped_query_gemma2_options")
    with pytest.raises(ValueError, match="block_index"):
        llamalike_common.build_llamalike_attention("a", jax.random.key(0), config)


def test_per_block_attention_types_reject_a_layer_stack():
    config = dataclasses.replace(make_config("grouped_query_gemma2_options"), use_layer_stack=True)
    with pytest.raises(ValueError, match="use_layer_stack"):
        llamalike_common.build_llamalike_transformer(config, jax.random.key(0))


def test_per_block_attention_types_must_divide_the_blocks():
    config = dataclasses.replace(make_config("grouped_query_gemma2_options"), num_decoder_blocks=3)
    with pytest.raises(ValueError, match="repeat evenly over the 3 blocks"):
        llamalike_common.build_llamalike_transformer(config, jax.random.key(0))


def test_unknown_attention_type():
    config = dataclasses.replace(make_config("multi_head_swiglu_untied"), attention_type="local")
    with pytest.raises(ValueError, match="attention type"):
        llamalike_common.build_llamalike_attention("a", jax.random.key(0), config, 0)
