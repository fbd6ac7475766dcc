"""Tests for pz_flax.nn.attention, with penzai 0.2.5 as the differential oracle."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz as penzai_pz

from pz_flax import pz
from pz_flax.core import named_axes
from pz_flax.core import variables
from pz_flax.nn import attention
from pz_flax.nn import layer_stack

EMBEDDING = 8
HEADS = {"heads": 2, "projection": 4}
MASKED = -1e9


def _build_attention(lib, mask_layer):
    """A small multi-head causal attention with RoPE, built from ``lib``'s layers.

    ``lib`` is either pz_flax's or penzai's ``pz`` namespace, so the two models have the same
    structure; their weights are synchronized afterwards by ``_copy_params``.
    """
    rng = jax.random.key(0)
    query_key_spec = (
        {"seq": "tq", "heads": "h", "projection": "p"},
        {"seq": "tkv", "heads": "h", "projection": "p"},
    )
    attn_value_spec = (
        {"seq": "tq", "heads": "h", "kv_seq": "tkv"},
        {"seq": "tkv", "heads": "h", "projection": "p"},
    )

    def projection(name):
        return lib.nn.Linear.from_config(name, rng, {"embedding": EMBEDDING}, HEADS)

    def rope():
        return lib.nn.ApplyRoPE("projection", 10_000, "token_positions")

    return lib.nn.Attention(
        input_to_query=lib.nn.Sequential([projection("attn/query"), rope()]),
        input_to_key=lib.nn.Sequential([projection("attn/key"), rope()]),
        input_to_value=projection("attn/value"),
        query_key_to_attn=lib.nn.Sequential(
            [
                lib.nn.NamedEinsum(query_key_spec, {"seq": "tq", "heads": "h", "kv_seq": "tkv"}),
                mask_layer,
                lib.nn.Softmax("kv_seq"),
            ]
        ),
        attn_value_to_output=lib.nn.Sequential(
            [
                lib.nn.NamedEinsum(attn_value_spec, {"seq": "tq", "heads": "h", "projection": "p"}),
                lib.nn.Linear.from_config("attn/output", rng, HEADS, {"embedding": EMBEDDING}),
            ]
        ),
    )


def _to_penzai(array):
    names = tuple(array.named_shape)
    return penzai_pz.nx.wrap(np.asarray(array.unwrap(*names)), *names)


def _copy_params(ours, theirs, seed=3):
    """Gives both models the same random weights (labels must match one to one)."""
    _, our_params = variables.unbind_params(ours)
    _, their_params = penzai_pz.unbind_params(theirs)
    theirs_by_label = {param.label: param for param in their_params}
    assert set(theirs_by_label) == {param.label for param in our_params}
    for index, param in enumerate(our_params):
        shape = dict(param.value.named_shape)
        data = jax.random.normal(jax.random.key(seed + index), tuple(shape.values())) * 0.5
        param.value = named_axes.wrap(data, *shape)
        theirs_by_label[param.label].value = _to_penzai(param.value)


def _assert_same(ours, theirs, atol=1e-5):
    assert dict(ours.named_shape) == dict(theirs.named_shape)
    names = tuple(theirs.named_shape)
    np.testing.assert_allclose(
        np.asarray(ours.unwrap(*names)), np.asarray(theirs.unwrap(*names)), atol=atol, rtol=1e-5
    )


def _inputs(seq=5, batch=2, seed=11):
    data = jax.random.normal(jax.random.key(seed), (batch, seq, EMBEDDING))
    return named_axes.wrap(data, "batch", "seq", "embedding")


def test_causal_attention_matches_penzai():
    ours = _build_attention(pz, pz.nn.ApplyCausalAttentionMask(MASKED))
    theirs = _build_attention(penzai_pz, penzai_pz.nn.ApplyCausalAttentionMask(MASKED))
    _copy_params(ours, theirs)
    x = _inputs()
    positions = named_axes.arange("seq", 5)
    out = ours(x, token_positions=positions)
    _assert_same(out, theirs(_to_penzai(x), token_positions=_to_penzai(positions)))
    assert dict(out.named_shape) == {"batch": 2, "seq": 5, "embedding": EMBEDDING}


def test_attention_is_causal():
    layer = _build_attention(pz, pz.nn.ApplyCausalAttentionMask(MASKED))
    x = _inputs()
    changed = (
        x.untag("seq").at[4].set(named_axes.full({"batch": 2, "embedding": 8}, 9.0)).tag("seq")
    )
    positions = named_axes.arange("seq", 5)
    before = np.asarray(layer(x, token_positions=positions).unwrap("batch", "seq", "embedding"))
    after = np.asarray(
        layer(changed, token_positions=positions).unwrap("batch", "seq", "embedding")
    )
    np.testing.assert_allclose(before[:, :4], after[:, :4], atol=1e-6)
    assert not np.allclose(before[:, 4], after[:, 4])


def _logits_and_positions():
    logits = jax.random.normal(jax.random.key(1), (2, 5, 5))
    query_positions = np.array([[0, 1, 2, 3, 4], [-1, 0, 1, 2, 3]], np.int32)
    return (
        named_axes.wrap(logits, "batch", "seq", "kv_seq"),
        named_axes.wrap(query_positions, "batch", "seq"),
    )


@pytest.mark.parametrize("window", [1, 2, 4])
def test_sliding_window_mask_matches_penzai(window):
    logits, positions = _logits_and_positions()
    ours = pz.nn.ApplyCausalSlidingWindowAttentionMask(MASKED, window)(
        logits, token_positions=positions
    )
    theirs = penzai_pz.nn.ApplyCausalSlidingWindowAttentionMask(MASKED, window)(
        _to_penzai(logits), token_positions=_to_penzai(positions)
    )
    _assert_same(ours, theirs, atol=0)
    kept = np.asarray(ours.unwrap("batch", "seq", "kv_seq")) != MASKED
    # Row 0 of batch 0 sees only itself; row 4 sees the last `window` positions.
    np.testing.assert_array_equal(kept[0, 4], np.arange(5) > 4 - window)


def test_causal_mask_matches_penzai_with_padding_and_custom_names():
    logits, positions = _logits_and_positions()
    kv_positions = named_axes.wrap(np.array([[0, 1, 2, -1, -1]] * 2, np.int32), "batch", "seq")
    layer_kwargs = {
        "masked_out_value": MASKED,
        "query_positions_input_name": "q_pos",
        "kv_positions_input_name": "kv_pos",
    }
    ours = pz.nn.ApplyCausalAttentionMask(**layer_kwargs)(
        logits, q_pos=positions, kv_pos=kv_positions
    )
    theirs = penzai_pz.nn.ApplyCausalAttentionMask(**layer_kwargs)(
        _to_penzai(logits), q_pos=_to_penzai(positions), kv_pos=_to_penzai(kv_positions)
    )
    _assert_same(ours, theirs, atol=0)
    kept = np.asarray(ours.unwrap("batch", "seq", "kv_seq")) != MASKED
    assert not kept[:, :, 3:].any()


def test_explicit_mask_matches_penzai():
    logits, _ = _logits_and_positions()
    mask = named_axes.wrap(jax.random.bernoulli(jax.random.key(2), 0.5, (5, 5)), "seq", "kv_seq")
    ours = pz.nn.ApplyExplicitAttentionMask("mask", MASKED)(logits, mask=mask)
    theirs = penzai_pz.nn.ApplyExplicitAttentionMask("mask", MASKED)(
        _to_penzai(logits), mask=_to_penzai(mask)
    )
    _assert_same(ours, theirs, atol=0)


def test_mask_errors_name_layer_axis_and_sizes():
    logits, positions = _logits_and_positions()
    wrong_kv_length = pz.nn.ApplyCausalAttentionMask(MASKED, kv_positions_input_name="kv")
    with pytest.raises(
        ValueError, match=r"ApplyCausalAttentionMask.*4 entries.*'kv_seq'.*has size 5"
    ):
        wrong_kv_length(logits, token_positions=positions, kv=named_axes.arange("seq", 4))
    sliding = pz.nn.ApplyCausalSlidingWindowAttentionMask(MASKED, 2)
    with pytest.raises(
        ValueError, match=r"ApplyCausalSlidingWindowAttentionMask.*'kv_seq'.*that axis is missing"
    ):
        sliding(named_axes.ones({"batch": 2, "seq": 5}), token_positions=positions)
    with pytest.raises(
        ValueError, match=r"ApplyCausalAttentionMask.*must have the sequence axis 'seq'"
    ):
        pz.nn.ApplyCausalAttentionMask(MASKED)(logits, token_positions=named_axes.arange("t", 5))


def _caching(layer, cache_len=6, batch=2, **kwargs):
    with_kv_positions = (
        pz.select(layer)
        .at_instances_of(pz.nn.ApplyCausalAttentionMask)
        .apply(lambda mask: dataclasses.replace(mask, kv_positions_input_name="kv_positions"))
    )
    return pz.nn.KVCachingAttention.from_uncached(
        with_kv_positions,
        sequence_axis="seq",
        cache_len=cache_len,
        cached_axes={"batch": batch, **HEADS},
        cache_end_index_key="cache_end_index",
        **kwargs,
    )


def _kv_positions(filled, cache_len=6):
    return named_axes.wrap(np.where(np.arange(cache_len) < filled, np.arange(cache_len), -1), "seq")


def test_kv_caching_matches_full_forward_and_penzai():
    ours_uncached = _build_attention(pz, pz.nn.ApplyCausalAttentionMask(MASKED))
    theirs_uncached = _build_attention(penzai_pz, penzai_pz.nn.ApplyCausalAttentionMask(MASKED))
    _copy_params(ours_uncached, theirs_uncached)
    x = _inputs()
    full = ours_uncached(x, token_positions=named_axes.arange("seq", 5))

    ours = _caching(ours_uncached, cache_label="cache")
    theirs_masked = (
        penzai_pz.select(theirs_uncached)
        .at_instances_of(penzai_pz.nn.ApplyCausalAttentionMask)
        .apply(lambda mask: dataclasses.replace(mask, kv_positions_input_name="kv_positions"))
    )
    theirs = penzai_pz.nn.KVCachingAttention.from_uncached(
        theirs_masked,
        sequence_axis="seq",
        cache_len=6,
        cached_axes={"batch": 2, **HEADS},
        cache_end_index_key="cache_end_index",
        cache_label="cache",
    )
    assert ours.kv_cache.label == "cache"
    assert ours.kv_cache.metadata == {}
    outputs = []
    for start, stop in [(0, 3), (3, 4), (4, 5)]:
        chunk = x[{"seq": pz.slice[start:stop]}]
        positions = named_axes.arange("seq", start, stop)
        kv_positions = _kv_positions(stop)
        out = ours(
            chunk, token_positions=positions, kv_positions=kv_positions, cache_end_index=start
        )
        expected = theirs(
            _to_penzai(chunk),
            token_positions=_to_penzai(positions),
            kv_positions=_to_penzai(kv_positions),
            cache_end_index=start,
        )
        _assert_same(out, expected)
        outputs.append(out)
    cached = named_axes.concatenate(outputs, "seq")
    _assert_same(cached, full)
    key_cache, _ = ours.kv_cache.value
    assert dict(key_cache.named_shape) == {"batch": 2, **HEADS, "seq": 6}
    np.testing.assert_array_equal(
        np.asarray(key_cache.unwrap("seq", "batch", "heads", "projection"))[5], 0
    )


def test_kv_caching_from_uncached_inside_layer_stack():
    layer = _build_attention(pz, pz.nn.ApplyCausalAttentionMask(MASKED))
    cached = _caching(layer, layerstack_axes={"layers": 3}, cache_dtype=jnp.bfloat16)
    key_cache, value_cache = cached.kv_cache.value
    assert dict(key_cache.named_shape) == {"batch": 2, **HEADS, "layers": 3, "seq": 6}
    assert key_cache.dtype == value_cache.dtype == jnp.bfloat16
    assert cached.kv_cache.metadata == {
        "layerstack_axes": {"layers": layer_stack.LayerStackVarBehavior.PER_LAYER}
    }
    assert cached.input_to_query == layer.input_to_query


def test_kv_caching_shape_errors():
    layer = _caching(_build_attention(pz, pz.nn.ApplyCausalAttentionMask(MASKED)))
    side = {
        "token_positions": named_axes.arange("seq", 2),
        "kv_positions": _kv_positions(2),
        "cache_end_index": 0,
    }
    with pytest.raises(
        ValueError, match=r"KVCachingAttention: axis 'batch' has size 3 in the new keys but 2"
    ):
        layer(_inputs(seq=2, batch=3), **side)
    with pytest.raises(
        ValueError, match=r"KVCachingAttention: 7 new entries along 'seq' do not fit .* 6"
    ):
        layer(
            _inputs(seq=7),
            **{
                **side,
                "token_positions": named_axes.arange("seq", 7),
                "kv_positions": _kv_positions(6),
            },
        )
    wrong_dtype = _caching(
        _build_attention(pz, pz.nn.ApplyCausalAttentionMask(MASKED)), cache_dtype=jnp.bfloat16
    )
    with pytest.raises(TypeError, match=r"KVCachingAttention: the new keys have dtype float32"):
        wrong_dtype(_inputs(seq=2), **side)


def test_kv_caching_rejects_keys_without_sequence_axis():
    identity = pz.nn.Identity()
    layer = pz.nn.KVCachingAttention(
        input_to_query=identity,
        input_to_key=pz.nn.Elementwise(lambda x: x),
        input_to_value=identity,
        query_key_to_attn=identity,
        attn_value_to_output=identity,
        sequence_axis="seq",
        kv_cache_end_index_key="end",
        kv_cache=pz.StateVariable(
            value=(named_axes.zeros({"seq": 4, "f": 2}), named_axes.zeros({"seq": 4, "f": 2})),
            label="c",
        ),
    )
    with pytest.raises(ValueError, match=r"caches along 'seq', but the new keys lack that axis"):
        layer(named_axes.zeros({"f": 2}), end=0)


def test_kv_caching_under_variable_jit():
    layer = _caching(_build_attention(pz, pz.nn.ApplyCausalAttentionMask(MASKED)))

    @variables.variable_jit
    def step(layer, x, start):
        return layer(
            x,
            token_positions=named_axes.arange("seq", 1) + start,
            kv_positions=named_axes.wrap(
                jnp.where(jnp.arange(6) <= start, jnp.arange(6), -1), "seq"
            ),
            cache_end_index=start,
        )

    x = _inputs(seq=2)
    for start in range(2):
        step(layer, x[{"seq": pz.slice[start : start + 1]}], jnp.asarray(start))
    key_cache, _ = layer.kv_cache.value
    written = np.asarray(key_cache.unwrap("seq", "batch", "heads", "projection"))
    assert np.abs(written[:2]).sum() > 0
    np.testing.assert_array_equal(written[2:], 0)


def test_attention_treescope_color():
    layer = _build_attention(pz, pz.nn.ApplyCausalAttentionMask(MASKED))
    assert isinstance(layer, attention.Attention)
    assert layer.treescope_color().startswith("oklch(")
