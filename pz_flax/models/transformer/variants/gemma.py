"""The Gemma 1 and Gemma 2 architectures, loaded from the official Flax checkpoints.

Gemma is a llama-like transformer (`llamalike_common`) with GeGLU feedforward blocks, tied
input/output embeddings (inputs scaled by ``sqrt(embedding_dim)``) and multi-query or
multi-head attention; Gemma 2 adds grouped-query attention, alternating sliding-window and
global attention, normalization after each sublayer and soft-capped logits.

`gemma_from_pretrained_checkpoint` reads the parameter dictionary of a released Gemma
checkpoint (as restored by Orbax's ``PyTreeCheckpointer``): keys such as
``"transformer/layer_0/attn/q_einsum"`` mapping to ``{"w": array}``, with these layouts:

* ``embedder/input_embedding``: ``[vocab, embed]``; ``final_norm/scale``: ``[embed]``;
* per layer ``layer_{i}/``: ``pre_attention_norm``, ``pre_ffw_norm`` (and for Gemma 2
  ``post_attention_norm``, ``post_ffw_norm``) ``scale``: ``[embed]``, stored as the offset
  from one;
* ``mlp/gating_einsum/w``: ``[2, embed, hidden]`` (gate, then value; ``[2, hidden,
  embed]`` in the larger Gemma 2 releases), ``mlp/linear/w``: ``[hidden, embed]``;
* attention: ``attn/qkv_einsum/w``: ``[3, heads, embed, proj]`` when every query head has
  its own key/value head, otherwise ``attn/q_einsum/w``: ``[heads, embed, proj]`` and
  ``attn/kv_einsum/w``: ``[2, kv_heads, embed, proj]``; ``attn/attn_vec_einsum/w``:
  ``[heads, proj, embed]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from pz_flax.core import named_axes
from pz_flax.models.transformer import model_parts
from pz_flax.models.transformer.variants import _binding
from pz_flax.models.transformer.variants import llamalike_common

_GEMMA2_ATTENTION = {
    "attention_type": (
        llamalike_common.AttentionTypeSlidingWindowCausal(4096),
        llamalike_common.AttentionTypeGlobalCausal(),
    ),
    "use_post_attn_norm": True,
    "use_post_ffw_norm": True,
    "final_logit_softcap": 30.0,
    "attn_logits_soft_cap": 50.0,
}

# The released models: sizes, plus the settings a checkpoint's shapes cannot tell.
_GEMMA_PRESETS: dict[str, dict[str, Any]] = {
    "gemma_2b": {
        "num_decoder_blocks": 18,
        "vocab_size": 256_128,
        "num_kv_heads": 1,
        "query_head_multiplier": 8,
        "embedding_dim": 2048,
        "projection_dim": 256,
        "mlp_hidden_dim": 16_384,
    },
    "gemma_7b": {
        "num_decoder_blocks": 28,
        "vocab_size": 256_128,
        "num_kv_heads": 16,
        "query_head_multiplier": 1,
        "embedding_dim": 3072,
        "projection_dim": 256,
        "mlp_hidden_dim": 24_576,
    },
    "gemma2_2b": {
        "num_decoder_blocks": 26,
        "vocab_size": 256_128,
        "num_kv_heads": 4,
        "query_head_multiplier": 2,
        "embedding_dim": 2304,
        "projection_dim": 256,
        "mlp_hidden_dim": 9216,
        **_GEMMA2_ATTENTION,
    },
    "gemma2_9b": {
        "num_decoder_blocks": 42,
        "vocab_size": 256_128,
        "num_kv_heads": 8,
        "query_head_multiplier": 2,
        "embedding_dim": 3584,
        "projection_dim": 256,
        "mlp_hidden_dim": 14_336,
        **_GEMMA2_ATTENTION,
    },
    "gemma2_27b": {
        "num_decoder_blocks": 46,
        "vocab_size": 256_128,
        "num_kv_heads": 16,
        "query_head_multiplier": 2,
        "embedding_dim": 4608,
        "projection_dim": 128,
        "mlp_hidden_dim": 36_864,
        # This release scales queries by the model width per query head, not by the
        # projection size.
        "query_scaling_factor": (4608 // 32) ** -0.5,
        **_GEMMA2_ATTENTION,
    },
}

_SIZE_FIELDS = (
    "num_decoder_blocks",
    "vocab_size",
    "num_kv_heads",
    "query_head_multiplier",
    "embedding_dim",
    "projection_dim",
    "mlp_hidden_dim",
)


class _Checkpoint:
    """Access to a Gemma parameter dictionary, with errors that name the missing entry."""

    def __init__(self, ckpt_params: Mapping[str, Any]):
        if not isinstance(ckpt_params, Mapping):
            raise TypeError(
                "gemma_from_pretrained_checkpoint expects the checkpoint's parameter dict,"
                f" got {type(ckpt_params).__name__}."
            )
        self.params = {
            key.removeprefix("transformer/"): value for key, value in ckpt_params.items()
        }

    def has(self, key: str) -> bool:
        return key in self.params

    def entry(self, key: str, field: str) -> Any:
        """The stored array (or its shape-and-dtype description) at ``key``/``field``."""
        entry = self.params.get(key)
        if not isinstance(entry, Mapping) or field not in entry:
            raise ValueError(f"The Gemma checkpoint has no parameter 'transformer/{key}/{field}'.")
        return entry[field]

    def get(self, key: str, field: str) -> jax.Array:
        return jnp.asarray(self.entry(key, field))

    def num_layers(self) -> int:
        count = 0
        while self.has(f"layer_{count}/mlp/linear"):
            count += 1
        if count == 0:
            raise ValueError(
                "The Gemma checkpoint has no 'transformer/layer_0/mlp/linear' entry; is it a"
                " Gemma parameter dictionary?"
            )
        return count


def _sizes_from_checkpoint(checkpoint: _Checkpoint) -> dict[str, Any]:
    """The configuration implied by the shapes (and norm entries) of a checkpoint."""
    num_layers = checkpoint.num_layers()
    vocab_size, embedding_dim = checkpoint.entry("embedder", "input_embedding").shape
    gating = checkpoint.entry("layer_0/mlp/gating_einsum", "w").shape
    mlp_hidden_dim = gating[1] if gating[2] == embedding_dim else gating[2]
    num_heads, projection_dim, _ = checkpoint.entry("layer_0/attn/attn_vec_einsum", "w").shape
    if checkpoint.has("layer_0/attn/qkv_einsum"):
        num_kv_heads = num_heads
    else:
        num_kv_heads = checkpoint.entry("layer_0/attn/kv_einsum", "w").shape[1]
    sizes = {
        "num_decoder_blocks": num_layers,
        "vocab_size": vocab_size,
        "num_kv_heads": num_kv_heads,
        "query_head_multiplier": num_heads // num_kv_heads,
        "embedding_dim": embedding_dim,
        "projection_dim": projection_dim,
        "mlp_hidden_dim": mlp_hidden_dim,
    }
    if checkpoint.has("layer_0/post_attention_norm"):
        sizes.update(_GEMMA2_ATTENTION)
    return sizes


def _preset_config(checkpoint: _Checkpoint, preset_name: str) -> dict[str, Any]:
    inferred = _sizes_from_checkpoint(checkpoint)
    if preset_name == "auto":
        for preset in _GEMMA_PRESETS.values():
            if all(preset[field] == inferred[field] for field in _SIZE_FIELDS):
                return dict(preset)
        # Not a released size (e.g. a small test model): the shapes say it all.
        return inferred
    if preset_name not in _GEMMA_PRESETS:
        raise ValueError(
            f"Unknown Gemma preset {preset_name!r}; expected 'auto' or one of"
            f" {sorted(_GEMMA_PRESETS)}."
        )
    preset = _GEMMA_PRESETS[preset_name]
    mismatched = {
        field: (preset[field], inferred[field])
        for field in _SIZE_FIELDS
        if preset[field] != inferred[field]
    }
    if mismatched:
        details = ", ".join(f"{k}: preset {a}, checkpoint {b}" for k, (a, b) in mismatched.items())
        raise ValueError(f"The checkpoint does not match preset {preset_name!r} ({details}).")
    return dict(preset)


def gemma_from_pretrained_checkpoint(
    ckpt_params: dict[str, Any],
    upcast_activations_to_float32: bool = False,
    use_layer_stack: bool = False,
    preset_name: Literal[
        "gemma_2b", "gemma_7b", "gemma2_2b", "gemma2_9b", "gemma2_27b", "auto"
    ] = "auto",
) -> model_parts.TransformerLM:
    """Builds a Gemma `TransformerLM` holding the weights of a Gemma checkpoint.

    The parameters are those of the checkpoint, rearranged: queries, keys and values get
    one weight each (instead of fused ``qkv_einsum`` / ``kv_einsum`` tensors), norm scales
    are stored with the one already added, and every axis is named.

    Args:
      ckpt_params: The checkpoint's flat parameter dictionary (see the module docstring).
      upcast_activations_to_float32: Run activations (and caches) in float32 whatever the
        parameter dtype.
      use_layer_stack: Stack the decoder blocks in a `LayerStack` (Gemma 1 only: Gemma 2
        alternates attention types between blocks).
      preset_name: Which released model the checkpoint is. ``"auto"`` picks the release
        whose sizes match the checkpoint's shapes, or, for sizes no release has, builds
        the configuration from the shapes alone (Gemma 2 is recognized by its post-norm
        entries).

    Returns:
      The model (parameter labels start with ``"transformer/"``).

    Raises:
      TypeError: If ``ckpt_params`` is not a mapping.
      ValueError: If an entry is missing, the preset is unknown or does not match the
        checkpoint's shapes, or a weight has an unexpected shape (named by label).
    """
    checkpoint = _Checkpoint(ckpt_params)
    preset = _preset_config(checkpoint, preset_name)
    parameter_dtype = np.dtype(checkpoint.entry("layer_0/attn/attn_vec_einsum", "w").dtype)
    config = llamalike_common.LlamalikeTransformerConfig(
        **preset,
        parameter_dtype=parameter_dtype,
        mlp_variant="geglu_approx",
        rope_wavelength=10_000,
        tie_embedder_and_logits=True,
        activation_dtype=jnp.float32 if upcast_activations_to_float32 else parameter_dtype,
        use_layer_stack=use_layer_stack,
    )

    def named(key: str, field: str, *names: str) -> named_axes.NamedArray:
        return named_axes.wrap(checkpoint.get(key, field)).tag(*names)

    def norm_scale(key: str) -> named_axes.NamedArray:
        # Gemma stores the scale minus one.
        return named_axes.wrap(1 + checkpoint.get(key, "scale")).tag("embedding")

    shared = {
        "embedder.embeddings": named("embedder", "input_embedding", "vocabulary", "embedding"),
        "final_norm/scale.weights": norm_scale("final_norm"),
    }
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    if config.use_post_attn_norm:
        norms.append("post_attention_norm")
    if config.use_post_ffw_norm:
        norms.append("post_ffw_norm")
    heads = llamalike_common._head_layout(config)
    query_heads = {**heads.shared_axes, **heads.query_axes}
    per_block = []
    for index in range(config.num_decoder_blocks):
        layer = f"layer_{index}"
        block = {f"{norm}/scale.weights": norm_scale(f"{layer}/{norm}") for norm in norms}

        gating = checkpoint.get(f"{layer}/mlp/gating_einsum", "w")
        gating_names = ("embedding", "neurons")
        if gating.shape[1] != config.embedding_dim:
            gating_names = ("neurons", "embedding")
        block["mlp/gating_linear.weights"] = named_axes.wrap(gating[0]).tag(*gating_names)
        block["mlp/value_linear.weights"] = named_axes.wrap(gating[1]).tag(*gating_names)
        block["mlp/out_linear.weights"] = named(f"{layer}/mlp/linear", "w", "neurons", "embedding")

        if checkpoint.has(f"{layer}/attn/qkv_einsum"):
            query, key, value = checkpoint.get(f"{layer}/attn/qkv_einsum", "w")
        else:
            query = checkpoint.get(f"{layer}/attn/q_einsum", "w")
            key, value = checkpoint.get(f"{layer}/attn/kv_einsum", "w")
            # Keys and values have no head axis when all query heads share one.
            key = key.reshape((*heads.shared_axes.values(), *key.shape[1:]))
            value = value.reshape((*heads.shared_axes.values(), *value.shape[1:]))
        query = query.reshape((*query_heads.values(), *query.shape[1:]))
        output = checkpoint.get(f"{layer}/attn/attn_vec_einsum", "w")
        output = output.reshape((*query_heads.values(), *output.shape[1:]))
        block["attention/query.weights"] = named_axes.wrap(query).tag(
            *query_heads, "embedding", "projection"
        )
        block["attention/key.weights"] = named_axes.wrap(key).tag(
            *heads.shared_axes, "embedding", "projection"
        )
        block["attention/value.weights"] = named_axes.wrap(value).tag(
            *heads.shared_axes, "embedding", "projection"
        )
        block["attention/output.weights"] = named_axes.wrap(output).tag(
            *query_heads, "projection", "embedding"
        )
        per_block.append(block)

    return _binding.bind_converted_parameters(
        lambda rng: llamalike_common.build_llamalike_transformer(
            config, init_base_rng=rng, name="transformer"
        ),
        label_prefix="transformer",
        shared=shared,
        per_block=per_block,
        use_layer_stack=use_layer_stack,
        source="Gemma checkpoint",
    )
