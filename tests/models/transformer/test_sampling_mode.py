"""Tests for pz_flax.models.transformer.sampling_mode: cached decoding equals the full pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pz_flax import pz
from pz_flax.core import named_axes
from pz_flax.models.transformer import sampling_mode
from pz_flax.models.transformer import simple_decoder
from tests.models.transformer import helpers


@pytest.fixture(scope="module", params=[True, False], ids=["layer_stack", "unrolled"])
def model(request):
    config = helpers.tiny_config(use_layer_stack=request.param)
    return simple_decoder.build_simple_decoder(config, jax.random.key(0))


@pz.variable_jit
def _cached_call(model, tokens):
    return model(tokens)


def test_cached_decoding_matches_full_forward(model):
    tokens = helpers.random_tokens()
    cached = sampling_mode.KVCachingTransformerLM.from_uncached(model, 8, {"batch": 2})
    pieces = [_cached_call(cached, tokens[{"seq": pz.slice[:3]}])]
    for index in range(3, 6):
        pieces.append(_cached_call(cached, tokens[{"seq": pz.slice[index : index + 1]}]))
    logits = named_axes.concatenate(pieces, "seq")
    assert dict(logits.named_shape) == {"batch": 2, "seq": 6, "vocabulary": 13}
    np.testing.assert_allclose(
        np.asarray(logits.unwrap("batch", "seq", "vocabulary")),
        helpers.full_logits(model, tokens),
        atol=2e-5,
    )
    assert int(cached.cache_end_index.value) == 6
    written = np.asarray(cached.previous_tokens.value.unwrap("batch", "seq"))
    np.testing.assert_array_equal(written[:, :6], np.asarray(tokens.unwrap("batch", "seq")))
    np.testing.assert_array_equal(written[:, 6:], 0)


def test_left_padding_gives_the_unpadded_logits(model):
    tokens = helpers.random_tokens(seq=4)
    unpadded = np.asarray(tokens.unwrap("batch", "seq"))
    padded = np.concatenate([np.zeros((2, 2), unpadded.dtype), unpadded], axis=1)
    padded[1, :2] = [7, 8]  # the second row is not padded: it has two extra real tokens
    cached = sampling_mode.KVCachingTransformerLM.from_uncached(model, 8, {"batch": 2}, pad_id=0)
    logits = np.asarray(
        _cached_call(cached, named_axes.wrap(padded, "batch", "seq")).unwrap(
            "batch", "seq", "vocabulary"
        )
    )
    full = helpers.full_logits(model, tokens)
    np.testing.assert_allclose(logits[0, 2:], full[0], atol=2e-5)
    full_second = helpers.full_logits(model, named_axes.wrap(padded, "batch", "seq"))
    np.testing.assert_allclose(logits[1], full_second[1], atol=2e-5)


def test_from_uncached_structure(model):
    cached = sampling_mode.KVCachingTransformerLM.from_uncached(
        model, 8, {"batch": 2}, variable_name_prefix="dec"
    )
    assert not pz.select(cached).at_instances_of(pz.nn.Attention).count()
    caching = pz.select(cached).at_instances_of(pz.nn.KVCachingAttention).get_sequence()
    is_stacked = isinstance(model.body.sublayers[1], pz.nn.LayerStack)
    # A layer stack holds one attention layer (with per-layer caches), else one per block.
    assert len(caching) == (1 if is_stacked else helpers.TINY_CONFIG.num_blocks)
    key_cache, _ = caching[0].kv_cache.value
    expected_axes = {"batch": 2, "heads": 2, "projection": 8, "seq": 8}
    if is_stacked:
        expected_axes["blocks"] = helpers.TINY_CONFIG.num_blocks
        assert caching[0].kv_cache.metadata == {
            "layerstack_axes": {"blocks": pz.nn.LayerStackVarBehavior.PER_LAYER}
        }
    assert dict(key_cache.named_shape) == expected_axes
    assert caching[0].kv_cache.label == "dec/cache_0"
    assert cached.cache_end_index.label == "dec/cache_end_index"
    masks = pz.select(cached).at_instances_of(pz.nn.ApplyCausalAttentionMask).get_sequence()
    assert {mask.kv_positions_input_name for mask in masks} == {"kv_token_positions"}
    # Parameters are shared with the original model, not copied.
    _, original_params = pz.unbind_params(model)
    _, cached_params = pz.unbind_params(cached)
    assert {id(p) for p in original_params} == {id(p) for p in cached_params}


def test_token_shape_errors(model):
    cached = sampling_mode.KVCachingTransformerLM.from_uncached(model, 4, {"batch": 2})
    with pytest.raises(
        pz.chk.StructureMismatchError,
        match=r"(?s)KVCachingTransformerLM token ids.*'batch': Actual size 3 does not match expected 2",
    ):
        cached(named_axes.zeros({"batch": 3, "seq": 1}, jnp.int32))
    with pytest.raises(ValueError, match=r"5 tokens along 'seq' do not fit in a cache of length 4"):
        cached(named_axes.zeros({"batch": 2, "seq": 5}, jnp.int32))


def test_nonstandard_mask_input_cannot_be_rewired(model):
    renamed = (
        pz.select(model)
        .at_instances_of(pz.nn.ApplyCausalAttentionMask)
        .apply(lambda mask: dataclasses.replace(mask, kv_positions_input_name="custom"))
    )
    with pytest.raises(ValueError, match=r"ApplyCausalAttentionMask reading 'custom'"):
        sampling_mode.KVCachingTransformerLM.from_uncached(renamed, 4, {"batch": 2})
