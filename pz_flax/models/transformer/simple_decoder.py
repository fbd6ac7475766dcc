"""A configurable pre-norm decoder-only transformer, built from ``pz_flax.nn`` layers.

Each block is ``x + Attention(RMSNorm(x))`` followed by
``x + FeedForward(RMSNorm(x))``; attention is causal multi-head attention with
rotary position embeddings. Token embeddings can be tied to the output logits.
With ``use_layer_stack=True`` (the default) the blocks are one `LayerStack`
along a ``"blocks"`` axis, so ``jax.jit`` traces a single block however deep the
model is.

Every piece is an ordinary layer with a readable name, so the built model can
be inspected and patched with selectors: e.g.
``pz.select(model).at_instances_of(pz.nn.Softmax)`` finds every attention
pattern.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pz_flax.models.transformer import _assembly
from pz_flax.models.transformer import model_parts
from pz_flax.nn import attention
from pz_flax.nn import basic_ops
from pz_flax.nn import combinators
from pz_flax.nn import embeddings
from pz_flax.nn import grouping
from pz_flax.nn import layer as layer_base
from pz_flax.nn import linear_and_affine
from pz_flax.nn import standardization


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimpleDecoderConfig:
    """Sizes and options of a `build_simple_decoder` model.

    Attributes:
      vocab_size: Number of tokens.
      embedding_dim: Width of the residual stream (``"embedding"`` axis).
      num_heads: Number of attention heads.
      projection_dim: Per-head query/key/value size; must be even (RoPE
        rotates pairs of entries).
      mlp_hidden_dim: Width of the feedforward hidden layer.
      num_blocks: Number of transformer blocks.
      activation_fn: Elementwise activation of the feedforward blocks.
      rope_wavelength: Maximum RoPE wavelength.
      rms_norm_eps: Epsilon of every RMS normalization.
      sliding_window_size: If set, each token attends only to this many most
        recent tokens (itself included); otherwise to all earlier tokens.
      tie_embeddings: Use the input embedding table to compute output logits.
      use_layer_stack: Stack the blocks in a `LayerStack` (scanned) instead of
        writing them out in a `Sequential`.
      parameter_dtype: Dtype of the parameters.
      activation_dtype: Dtype of activations and key/value caches.
    """

    vocab_size: int
    embedding_dim: int
    num_heads: int
    projection_dim: int
    mlp_hidden_dim: int
    num_blocks: int
    activation_fn: Callable[[jax.Array], jax.Array] = jax.nn.gelu
    rope_wavelength: float = 10_000.0
    rms_norm_eps: float = 1e-6
    sliding_window_size: int | None = None
    tie_embeddings: bool = True
    use_layer_stack: bool = True
    parameter_dtype: jax.typing.DTypeLike = jnp.float32
    activation_dtype: jax.typing.DTypeLike = jnp.float32

    def __post_init__(self):
        for field_name in (
            "vocab_size",
            "embedding_dim",
            "num_heads",
            "projection_dim",
            "mlp_hidden_dim",
            "num_blocks",
        ):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"SimpleDecoderConfig.{field_name} must be a positive int, got {value!r}."
                )
        if self.projection_dim % 2:
            raise ValueError(
                "SimpleDecoderConfig.projection_dim must be even (RoPE rotates pairs of"
                f" entries), got {self.projection_dim}."
            )
        if self.sliding_window_size is not None and self.sliding_window_size < 1:
            raise ValueError(
                "SimpleDecoderConfig.sliding_window_size must be None or a positive int,"
                f" got {self.sliding_window_size}."
            )


def _rms_norm(name: str, init_base_rng: jax.Array | None, config: SimpleDecoderConfig):
    return standardization.RMSLayerNorm.from_config(
        name=name,
        init_base_rng=init_base_rng,
        across_axes={"embedding": config.embedding_dim},
        epsilon=config.rms_norm_eps,
        dtype=config.parameter_dtype,
    )


def _attention_mask(config: SimpleDecoderConfig) -> layer_base.Layer:
    # Half the most negative finite value: masked logits stay finite (so a fully
    # masked padding row gives a uniform softmax instead of NaN) and subtracting
    # the row maximum cannot overflow.
    masked_out_value = jnp.asarray(
        jnp.finfo(config.activation_dtype).min / 2, config.activation_dtype
    )
    if config.sliding_window_size is None:
        return attention.ApplyCausalAttentionMask(masked_out_value=masked_out_value)
    return attention.ApplyCausalSlidingWindowAttentionMask(
        masked_out_value=masked_out_value, sliding_window_size=config.sliding_window_size
    )


def build_attention(
    name: str, init_base_rng: jax.Array | None, config: SimpleDecoderConfig
) -> attention.Attention:
    """Builds causal multi-head self-attention with RoPE.

    Queries, keys and values have axes ``"seq"``, ``"heads"`` and
    ``"projection"`` (plus batch axes). The query-key einsum renames the keys'
    ``"seq"`` to ``"kv_seq"`` so the attention matrix has both.

    Args:
      name: Prefix of the parameter labels.
      init_base_rng: Base PRNG key, or None for parameter slots.
      config: The model configuration.

    Returns:
      The attention layer.
    """
    return _assembly.causal_self_attention(
        projection=_assembly.projection_builder(
            linear_and_affine.Linear, name, init_base_rng, config.parameter_dtype
        ),
        rope=lambda: embeddings.ApplyRoPE(
            embedding_axis="projection",
            max_wavelength=config.rope_wavelength,
            positions_input_name="token_positions",
        ),
        heads=_assembly.HeadLayout.for_heads(config.num_heads, 1),
        embedding_dim=config.embedding_dim,
        projection_dim=config.projection_dim,
        query_scale=jnp.asarray(config.projection_dim**-0.5, config.activation_dtype),
        logit_layers=[_attention_mask(config)],
    )


def build_feedforward(
    name: str, init_base_rng: jax.Array | None, config: SimpleDecoderConfig
) -> model_parts.TransformerFeedForward:
    """Builds the two-layer feedforward block ``embedding -> neurons -> embedding``.

    Args:
      name: Prefix of the parameter labels.
      init_base_rng: Base PRNG key, or None for parameter slots.
      config: The model configuration.

    Returns:
      The feedforward block.
    """
    affine = _assembly.projection_builder(
        linear_and_affine.Affine, name, init_base_rng, config.parameter_dtype
    )
    embedding = {"embedding": config.embedding_dim}
    neurons = {"neurons": config.mlp_hidden_dim}
    return model_parts.TransformerFeedForward(
        [
            affine("in", embedding, neurons),
            basic_ops.Elementwise(config.activation_fn),
            affine("out", neurons, embedding),
        ]
    )


def build_block(
    name: str, init_base_rng: jax.Array | None, config: SimpleDecoderConfig
) -> model_parts.TransformerBlock:
    """Builds one pre-norm block: residual attention, then residual feedforward.

    Args:
      name: Prefix of the parameter labels.
      init_base_rng: Base PRNG key, or None for parameter slots.
      config: The model configuration.

    Returns:
      The block.
    """

    def pre_norm_residual(norm_name: str, sublayer: layer_base.Layer) -> combinators.Residual:
        norm = _rms_norm(f"{name}/{norm_name}", init_base_rng, config)
        return combinators.Residual(grouping.Sequential([norm, sublayer]))

    return model_parts.TransformerBlock(
        [
            pre_norm_residual(
                "pre_attention_norm", build_attention(f"{name}/attention", init_base_rng, config)
            ),
            pre_norm_residual(
                "pre_ffw_norm", build_feedforward(f"{name}/mlp", init_base_rng, config)
            ),
        ]
    )


def build_simple_decoder(
    config: SimpleDecoderConfig,
    init_base_rng: jax.Array | None = None,
    name: str = "transformer",
) -> model_parts.TransformerLM:
    """Builds a decoder-only transformer language model.

    Args:
      config: Sizes and options.
      init_base_rng: Base PRNG key, or None to leave parameter slots to be
        bound later (e.g. from a checkpoint).
      name: Prefix of every parameter label.

    Returns:
      A `TransformerLM` mapping ``{..., "seq"}`` token ids to
      ``{..., "seq", "vocabulary"}`` logits.
    """

    def embedding_table(table_name: str) -> embeddings.EmbeddingTable:
        return embeddings.EmbeddingTable.from_config(
            name=f"{name}/{table_name}",
            init_base_rng=init_base_rng,
            vocab_size=config.vocab_size,
            embedding_axes={"embedding": config.embedding_dim},
            dtype=config.parameter_dtype,
        )

    input_table = embedding_table("embedder")
    output_table = input_table if config.tie_embeddings else embedding_table("unembedder")
    return _assembly.transformer_lm(
        config,
        embedding_table=input_table,
        blocks=_assembly.decoder_blocks(
            build_block,
            name=name,
            init_base_rng=init_base_rng,
            config=config,
            num_blocks=config.num_blocks,
            use_layer_stack=config.use_layer_stack,
        ),
        head=[
            _rms_norm(f"{name}/final_norm", init_base_rng, config),
            embeddings.EmbeddingDecode(output_table),
        ],
        heads=_assembly.HeadLayout.for_heads(config.num_heads, 1),
    )
