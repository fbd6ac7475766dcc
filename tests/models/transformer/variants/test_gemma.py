"""Tests for pz_flax.models.transformer.variants.gemma, on fake checkpoints in Gemma's layout.

The checkpoints are generated here with random weights and the released checkpoints'
parameter names and layouts (see the gemma module docstring). Penzai 0.2.5 only loads the
released sizes, chosen by layer count; to use it as the oracle on tiny checkpoints, its
preset table is patched to tiny sizes with the same per-release options.
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint
import pytest
from penzai.models.transformer.variants import gemma as penzai_gemma

from pz_flax import pz
from pz_flax.models.transformer.variants import gemma
from pz_flax.models.transformer.variants import llamalike_common
from tests.models.transformer.variants import oracle

EMBED, PROJ, HIDDEN, VOCAB = 8, 4, 12, 17

# Release name -> (layers, query heads, key/value heads, Gemma 2, gating stored transposed).
LAYOUTS = {
    "gemma_2b": (1, 4, 1, False, False),
    "gemma_7b": (3, 3, 3, False, False),
    "gemma2_2b": (2, 4, 2, True, False),
    "gemma2_9b": (4, 4, 2, True, True),
}


def fake_checkpoint(release: str, dtype=np.float32, seed: int = 0) -> dict:
    """Random parameters named and laid out as in the released ``release`` checkpoint."""
    layers, heads, kv_heads, gemma2, transposed_gating = LAYOUTS[release]
    rng = np.random.default_rng(seed)

    def w(*shape):
        return {"w": (rng.standard_normal(shape) * 0.3).astype(dtype)}

    def scale():
        return {"scale": (rng.standard_normal(EMBED) * 0.1).astype(dtype)}

    params = {
        "transformer/embedder": {
            "input_embedding": rng.standard_normal((VOCAB, EMBED)).astype(dtype)
        },
        "transformer/final_norm": scale(),
    }
    for i in range(layers):
        layer = f"transformer/layer_{i}"
        norms = ["pre_attention_norm", "pre_ffw_norm"]
        if gemma2:
            norms += ["post_attention_norm", "post_ffw_norm"]
        params.update({f"{layer}/{norm}": scale() for norm in norms})
        gating = (2, HIDDEN, EMBED) if transposed_gating else (2, EMBED, HIDDEN)
        params[f"{layer}/mlp/gating_einsum"] = w(*gating)
        params[f"{layer}/mlp/linear"] = w(HIDDEN, EMBED)
        if heads == kv_heads:
            params[f"{layer}/attn/qkv_einsum"] = w(3, heads, EMBED, PROJ)
        else:
            params[f"{layer}/attn/q_einsum"] = w(heads, EMBED, PROJ)
            params[f"{layer}/attn/kv_einsum"] = w(2, kv_heads, EMBED, PROJ)
        params[f"{layer}/attn/attn_vec_einsum"] = w(heads, PROJ, EMBED)
    return params


@pytest.fixture
def tiny_penzai_presets(monkeypatch):
    for release, (layers, heads, kv_heads, _, _) in LAYOUTS.items():
        preset = dict(penzai_gemma._GEMMA_PRESETS[release])
        preset.update(
            num_decoder_blocks=layers,
            vocab_size=VOCAB,
            num_kv_heads=kv_heads,
            query_head_multiplier=heads // kv_heads,
            embedding_dim=EMBED,
            projection_dim=PROJ,
            mlp_hidden_dim=HIDDEN,
        )
        monkeypatch.setitem(penzai_gemma._GEMMA_PRESETS, release, preset)


@pytest.mark.parametrize("release", sorted(LAYOUTS))
def test_matches_penzai_on_each_layout(release, tiny_penzai_presets):
    params = fake_checkpoint(release)
    ours = gemma.gemma_from_pretrained_checkpoint(params)
    theirs = penzai_gemma.gemma_from_pretrained_checkpoint(params)
    oracle.assert_same_parameters(ours, theirs)
    assert ours.metadata.common_head_axes == theirs.metadata.common_head_axes
    assert ours.metadata.query_only_head_axes == theirs.metadata.query_only_head_axes
    np.testing.assert_allclose(
        oracle.logits(ours, oracle.tokens(pz)),
        oracle.penzai_logits(theirs, oracle.tokens(oracle.penzai_pz)),
        atol=oracle.ATOL,
        rtol=oracle.RTOL,
    )


def test_cached_logits_match_penzai_with_a_layer_stack(tiny_penzai_presets):
    params = fake_checkpoint("gemma_7b")
    ours = gemma.gemma_from_pretrained_checkpoint(params, use_layer_stack=True)
    theirs = penzai_gemma.gemma_from_pretrained_checkpoint(params, use_layer_stack=True)
    assert isinstance(ours.body.sublayers[2], pz.nn.LayerStack)
    np.testing.assert_allclose(
        oracle.cached_logits(ours, oracle.tokens(pz)),
        oracle.penzai_cached_logits(theirs, oracle.tokens(oracle.penzai_pz)),
        atol=oracle.ATOL,
    )


def test_restored_from_an_orbax_checkpoint(tmp_path):
    params = fake_checkpoint("gemma2_2b")
    path = tmp_path / "2b"
    orbax.checkpoint.PyTreeCheckpointer().save(path, params)
    restored = orbax.checkpoint.PyTreeCheckpointer().restore(path)
    model = gemma.gemma_from_pretrained_checkpoint(restored)
    np.testing.assert_array_equal(
        oracle.logits(model, oracle.tokens(pz)),
        oracle.logits(gemma.gemma_from_pretrained_checkpoint(params), oracle.tokens(pz)),
    )


def test_weights_are_rearranged_not_changed():
    params = fake_checkpoint("gemma2_2b")
    model = gemma.gemma_from_pretrained_checkpoint(params)
    _, found = pz.unbind_params(model)
    values = {p.label: p.value for p in found}
    norm = values["transformer/block_1/post_ffw_norm/scale.weights"]
    np.testing.assert_array_equal(
        np.asarray(norm.unwrap("embedding")),
        1 + params["transformer/layer_1/post_ffw_norm"]["scale"],
    )
    query = values["transformer/block_0/attention/query.weights"]
    np.testing.assert_array_equal(
        np.asarray(query.unwrap("head_groups", "query_heads", "embedding", "projection")),
        params["transformer/layer_0/attn/q_einsum"]["w"].reshape(2, 2, EMBED, PROJ),
    )
    key = values["transformer/block_0/attention/key.weights"]
    np.testing.assert_array_equal(
        np.asarray(key.unwrap("head_groups", "embedding", "projection")),
        params["transformer/layer_0/attn/kv_einsum"]["w"][0],
    )


def test_configuration_comes_from_the_checkpoint():
    gemma2 = gemma.gemma_from_pretrained_checkpoint(fake_checkpoint("gemma2_9b"))
    softcaps = pz.select(gemma2).at_instances_of(pz.nn.TanhSoftCap).get_sequence()
    assert sorted(float(s.soft_cap) for s in softcaps) == [30.0] + [50.0] * 4
    windows = pz.select(gemma2).at_instances_of(pz.nn.ApplyCausalSlidingWindowAttentionMask)
    assert [w.sliding_window_size for w in windows.get_sequence()] == [4096, 4096]
    gemma1 = gemma.gemma_from_pretrained_checkpoint(fake_checkpoint("gemma_2b"))
    assert not pz.select(gemma1).at_instances_of(pz.nn.TanhSoftCap).count()
    assert gemma1.metadata.query_only_head_axes == {"query_heads": 4}
    assert gemma1.metadata.common_head_axes == {}


def test_dtype_and_upcasting():
    params = fake_checkpoint("gemma_2b", dtype=jnp.bfloat16)
    model = gemma.gemma_from_pretrained_checkpoint(params, upcast_activations_to_float32=True)
    _, found = pz.unbind_params(model)
    assert {p.value.dtype for p in found} == {jnp.dtype(jnp.bfloat16)}
    assert model.metadata.activation_dtype == jnp.float32
    out = model(oracle.tokens(pz))
    assert out.dtype == jnp.float32
    same_dtype = gemma.gemma_from_pretrained_checkpoint(params)
    assert same_dtype(oracle.tokens(pz)).dtype == jnp.bfloat16


def test_released_sizes_pick_their_preset():
    # The 27B release scales queries by width per head, which its shapes cannot tell.
    sizes = gemma._GEMMA_PRESETS["gemma2_27b"]
    checkpoint = {
        "embedder": {"input_embedding": jax.ShapeDtypeStruct((256_128, 4608), jnp.float32)},
        "layer_0/mlp/gating_einsum": {"w": jax.ShapeDtypeStruct((2, 36_864, 4608), jnp.float32)},
        "layer_0/attn/attn_vec_einsum": {"w": jax.ShapeDtypeStruct((32, 128, 4608), jnp.float32)},
        "layer_0/attn/kv_einsum": {"w": jax.ShapeDtypeStruct((2, 16, 4608, 128), jnp.float32)},
        "layer_0/post_attention_norm": {},
        **{f"layer_{i}/mlp/linear": {} for i in range(46)},
    }
    picked = gemma._preset_config(gemma._Checkpoint(checkpoint), "auto")
    assert picked == sizes
    assert picked["query_scaling_factor"] == pytest.approx(144**-0.5)


def test_explicit_preset_must_match_the_shapes():
    with pytest.raises(ValueError, match=r"preset 'gemma_2b' \(num_decoder_blocks: preset 18"):
        gemma.gemma_from_pretrained_checkpoint(fake_checkpoint("gemma_2b"), preset_name="gemma_2b")
    with pytest.raises(ValueError, match="Unknown Gemma preset 'gemma3'"):
        gemma.gemma_from_pretrained_checkpoint(fake_checkpoint("gemma_2b"), preset_name="gemma3")


def test_missing_entry_is_named():
    params = fake_checkpoint("gemma2_2b")
    del params["transformer/layer_1/post_ffw_norm"]
    with pytest.raises(ValueError, match="'transformer/layer_1/post_ffw_norm/scale'"):
        gemma.gemma_from_pretrained_checkpoint(params)
    with pytest.raises(ValueError, match="no 'transformer/layer_0/mlp/linear'"):
        gemma.gemma_from_pretrained_checkpoint({"transformer/embedder": {}})


def test_wrong_shape_is_named():
    params = fake_checkpoint("gemma_7b")
    params["transformer/layer_2/mlp/linear"]["w"] = np.zeros((HIDDEN + 1, EMBED), np.float32)
    with pytest.raises(ValueError, match=r"'transformer/block_2/mlp/out_linear\.weights'"):
        gemma.gemma_from_pretrained_checkpoint(params)


def test_not_a_mapping():
    with pytest.raises(TypeError, match="parameter dict, got list"):
        gemma.gemma_from_pretrained_checkpoint([1, 2])


def test_layer_stack_needs_one_attention_type():
    with pytest.raises(ValueError, match="use_layer_stack"):
        gemma.gemma_from_pretrained_checkpoint(fake_checkpoint("gemma2_2b"), use_layer_stack=True)


def test_attention_types_of_the_presets():
    gemma2 = gemma._GEMMA_PRESETS["gemma2_2b"]["attention_type"]
    assert gemma2 == (
        llamalike_common.AttentionTypeSlidingWindowCausal(4096),
        llamalike_common.AttentionTypeGlobalCausal(),
    )
