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
from tests.models.transformer.variants import fake_gemma
from tests.models.transformer.variants import oracle

# Release name -> a tiny checkpoint with that release's layout.
LAYOUTS = {
    "gemma_2b": fake_gemma.FakeGemma(layers=1, heads=4, kv_heads=1),
    "gemma_7b": fake_gemma.FakeGemma(layers=3, heads=3, kv_heads=3),
    "gemma2_2b": fake_gemma.FakeGemma(layers=2, heads=4, kv_heads=2, gemma2=True),
    "gemma2_9b": fake_gemma.FakeGemma(
        layers=4, heads=4, kv_heads=2, gemma2=True, transposed_gating=True
    ),
}
EMBED, PROJ, HIDDEN = 8, 4, 12


def fake_checkpoint(release: str, dtype=np.float32) -> dict:
    return LAYOUTS[release].params(dtype)


@pytest.fixture
def tiny_penzai_presets(monkeypatch):
    for release, layout in LAYOUTS.items():
        preset = {**penzai_gemma._GEMMA_PRESETS[release], **layout.preset_sizes()}
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
