"""Tests for pz_flax.models.transformer.variants.mistral (Hugging Face conversion)."""

import pytest

from pz_flax import pz
from pz_flax.models.transformer.variants import mistral

hf = pytest.importorskip("tests.models.transformer.variants.huggingface_models")

MISTRAL = {
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}


@pytest.mark.parametrize("use_layer_stack", [False, True], ids=["unrolled", "layer_stack"])
def test_sliding_window_logits_match_transformers(use_layer_stack):
    # A window shorter than the sequence, so that the window changes the logits.
    model = hf.build("MistralForCausalLM", "MistralConfig", sliding_window=3, **MISTRAL)
    converted = mistral.mistral_from_huggingface_model(model, use_layer_stack=use_layer_stack)
    masks = pz.select(converted).at_instances_of(pz.nn.ApplyCausalSlidingWindowAttentionMask)
    assert {m.sliding_window_size for m in masks.get_sequence()} == {3}
    hf.assert_logits_match(converted, model)


def test_without_sliding_window_attention_is_global():
    model = hf.build("MistralForCausalLM", "MistralConfig", sliding_window=None, **MISTRAL)
    converted = mistral.mistral_from_huggingface_model(model)
    assert pz.select(converted).at_instances_of(pz.nn.ApplyCausalAttentionMask).count() == 2
    hf.assert_logits_match(converted, model)


def test_other_model_classes_are_rejected():
    model = hf.build("LlamaForCausalLM", "LlamaConfig", **MISTRAL)
    with pytest.raises(ValueError, match=r"Expected a transformers\.MistralForCausalLM"):
        mistral.mistral_from_huggingface_model(model)


def test_unsupported_settings_are_named():
    model = hf.build("MistralForCausalLM", "MistralConfig", hidden_act="gelu", **MISTRAL)
    with pytest.raises(ValueError, match="'hidden_act': 'gelu'"):
        mistral.mistral_from_huggingface_model(model)
