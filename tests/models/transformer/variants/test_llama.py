"""Tests for pz_flax.models.transformer.variants.llama (Hugging Face conversion)."""

import sys

import jax.numpy as jnp
import numpy as np
import pytest

from pz_flax import pz
from pz_flax.models.transformer.variants import llama


def test_without_transformers_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(RuntimeError, match=r"pz_flax\[huggingface\]"):
        llama.llama_from_huggingface_model(object())


hf = pytest.importorskip("tests.models.transformer.variants.huggingface_models")

LLAMA = {
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "max_position_embeddings": 32,
    "rms_norm_eps": 1e-5,
}


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "use_layer_stack"),
    [(4, 2, False), (4, 4, True), (4, 1, False)],
    ids=["grouped_query", "multi_head_layer_stack", "multi_query"],
)
def test_logits_match_transformers(num_heads, num_kv_heads, use_layer_stack):
    model = hf.build(
        "LlamaForCausalLM",
        "LlamaConfig",
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        **LLAMA,
    )
    converted = llama.llama_from_huggingface_model(model, use_layer_stack=use_layer_stack)
    hf.assert_logits_match(converted, model)


def test_weights_are_copied_bit_for_bit():
    model = hf.build(
        "LlamaForCausalLM", "LlamaConfig", num_attention_heads=4, num_key_value_heads=2, **LLAMA
    )
    converted = llama.llama_from_huggingface_model(model)
    _, params = pz.unbind_params(converted)
    values = {p.label: p.value for p in params}
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(
        np.asarray(values["transformer/embedder.embeddings"].unwrap("vocabulary", "embedding")),
        state["model.embed_tokens.weight"],
    )
    query = values["transformer/block_1/attention/query.weights"]
    np.testing.assert_array_equal(
        np.asarray(query.unwrap("head_groups", "query_heads", "projection", "embedding")),
        state["model.layers.1.self_attn.q_proj.weight"].reshape(2, 2, 4, 16),
    )
    total = sum(int(np.prod(v.shape)) for v in state.values())
    assert sum(v.data_array.size for v in values.values()) == total


def test_rope_theta_and_explicit_head_dim():
    model = hf.build(
        "LlamaForCausalLM",
        "LlamaConfig",
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=6,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        **LLAMA,
    )
    converted = llama.llama_from_huggingface_model(model)
    assert converted.metadata.projection_dim == 6
    rope = pz.select(converted).at_instances_of(pz.nn.ApplyRoPE).get_sequence()
    assert {r.max_wavelength for r in rope} == {500.0}
    hf.assert_logits_match(converted, model)


def test_bfloat16_model_and_upcasting():
    model = hf.build(
        "LlamaForCausalLM",
        "LlamaConfig",
        dtype=hf.torch.bfloat16,
        num_attention_heads=4,
        num_key_value_heads=2,
        **LLAMA,
    )
    converted = llama.llama_from_huggingface_model(model, upcast_activations_to_float32=True)
    _, params = pz.unbind_params(converted)
    assert {p.value.dtype for p in params} == {jnp.dtype(jnp.bfloat16)}
    tokens = pz.nx.wrap(hf.token_ids()).tag("batch", "seq")
    assert converted(tokens).dtype == jnp.float32
    assert llama.llama_from_huggingface_model(model)(tokens).dtype == jnp.bfloat16


def test_unsupported_settings_are_named():
    model = hf.build(
        "LlamaForCausalLM",
        "LlamaConfig",
        num_attention_heads=2,
        attention_bias=True,
        tie_word_embeddings=True,
        **LLAMA,
    )
    with pytest.raises(ValueError, match="'tie_word_embeddings': True, 'attention_bias': True"):
        llama.llama_from_huggingface_model(model)


def test_rope_scaling_is_rejected():
    model = hf.build(
        "LlamaForCausalLM",
        "LlamaConfig",
        num_attention_heads=2,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        **LLAMA,
    )
    with pytest.raises(ValueError, match="RoPE scaling of type 'linear'"):
        llama.llama_from_huggingface_model(model)


def test_other_model_classes_are_rejected():
    model = hf.build("MistralForCausalLM", "MistralConfig", num_attention_heads=2, **LLAMA)
    with pytest.raises(ValueError, match=r"Expected a transformers\.LlamaForCausalLM"):
        llama.llama_from_huggingface_model(model)


def test_float16_is_rejected():
    model = hf.build(
        "LlamaForCausalLM", "LlamaConfig", dtype=hf.torch.float16, num_attention_heads=2, **LLAMA
    )
    with pytest.raises(ValueError, match=r"float32 or bfloat16, not torch\.float16"):
        llama.llama_from_huggingface_model(model)
