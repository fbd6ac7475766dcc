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

from pz_flax.models.transformer import model_parts
from pz_flax.nn import attention
from pz_flax.nn import basic_ops
from pz_flax.nn import combinators
from pz_flax.nn import embeddings
from pz_flax.nn import grouping
from pz_flax.nn import layer as layer_base
from pz_flax.nn import layer_stack
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
    heads = {"heads": config.num_heads, "projection": config.projection_dim}

    def projection(kind: str) -> linear_and_affine.Linear:
        return linear_and_affine.Linear.from_config(
            name=f"{name}/{kind}",
            init_base_rng=init_base_rng,
            input_axes={"embedding": config.embedding_dim},
            output_axes=heads,
            dtype=config.parameter_dtype,
        )

    def rope() -> embeddings.ApplyRoPE:
        return embeddings.ApplyRoPE(
            embedding_axis="projection",
            max_wavelength=config.rope_wavelength,
            positions_input_name="token_positions",
        )

    query_scale = jnp.asarray(config.projection_dim**-0.5, config.activation_dtype)
    return attention.Attention(
        input_to_query=grouping.Sequential(
            [projection("query"), rope(), linear_and_affine.ConstantRescale(by=query_scale)]
        ),
        input_to_key=grouping.Sequential([projection("key"), rope()]),
        input_to_value=grouping.Sequential([projection("value")]),
        query_key_to_attn=grouping.Sequential(
            [
                linear_and_affine.NamedEinsum(
                    (
                        {"seq": "q", "heads": "h", "projection": "p"},
                        {"seq": "k", "heads": "h", "projection": "p"},
                    ),
                    {"seq": "q", "heads": "h", "kv_seq": "k"},
                ),
                _attention_mask(config),
                basic_ops.Softmax("kv_seq"),
            ]
        ),
        attn_value_to_output=grouping.Sequential(
            [
                linear_and_affine.NamedEinsum(
                    (
                        {"seq": "q", "heads": "h", "kv_seq": "k"},
                        {"seq": "k", "heads": "h", "projection": "p"},
                    ),
                    {"seq": "q", "heads": "h", "projection": "p"},
                ),
                linear_and_affine.Linear.from_config(
                    name=f"{name}/output",
                    init_base_rng=init_base_rng,
                    input_axes=heads,
                    output_axes={"embedding": config.embedding_dim},
                    dtype=config.parameter_dtype,
                ),
            ]
        ),
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
    return model_parts.TransformerFeedForward(
        [
            linear_and_affine.Affine.from_config(
                name=f"{name}/in",
                init_base_rng=init_base_rng,
                input_axes={"embedding": config.embedding_dim},
                output_axes={"neurons": config.mlp_hidden_dim},
                dtype=config.parameter_dtype,
            ),
            basic_ops.Elementwise(config.activation_fn),
            linear_and_affine.Affine.from_config(
                name=f"{name}/out",
                init_base_rng=init_base_rng,
                input_axes={"neurons": config.mlp_hidden_dim},
                output_axes={"embedding": config.embedding_dim},
                dtype=config.parameter_dtype,
            ),
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

    layers: list[layer_base.Layer] = [embeddings.EmbeddingLookup(input_table)]
    if config.activation_dtype != config.parameter_dtype:
        layers.append(basic_ops.CastToDType(config.activation_dtype))
    if config.use_layer_stack:
        layers.append(
            layer_stack.LayerStack.from_sublayer_builder(
                builder=build_block,
                stack_axis="blocks",
                stack_axis_size=config.num_blocks,
                init_base_rng=init_base_rng,
                builder_kwargs={"name": f"{name}/blocks", "config": config},
            )
        )
    else:
        layers.extend(
            build_block(f"{name}/block_{index}", init_base_rng, config)
            for index in range(config.num_blocks)
        )
    layers.append(_rms_norm(f"{name}/final_norm", init_base_rng, config))
    layers.append(embeddings.EmbeddingDecode(output_table))

    return model_parts.TransformerLM(
        body=grouping.Sequential(layers),
        metadata=model_parts.TransformerMetadata(
            common_head_axes={"heads": config.num_heads},
            query_only_head_axes={},
            embedding_dim=config.embedding_dim,
            projection_dim=config.projection_dim,
            mlp_hidden_dim=config.mlp_hidden_dim,
            vocab_size=config.vocab_size,
            activation_dtype=config.activation_dtype,
        ),
    )
