"""The transformer family shared by Llama, Mistral and Gemma ("llama-like" models).

What the family has in common:

* pre-norm residual blocks, normalized with RMS layer norms, optionally with a second norm
  after the attention and feedforward sublayers (Gemma 2);
* gated feedforward blocks: ``out(act(gate(x)) * value(x))`` with SiLU (SwiGLU) or the
  tanh approximation of GELU (GeGLU);
* rotary position embeddings on queries and keys;
* multi-head, multi-query or grouped-query attention, causal over the whole sequence or
  over a sliding window, optionally with soft-capped attention logits;
* no biases anywhere; optionally the output logits reuse the token embedding table.

The attention heads are named by what they are shared with. With as many key/value heads
as query heads there is one ``"heads"`` axis; with a single key/value head the queries have
``"query_heads"`` and keys/values no head axis at all; in between (grouped-query attention)
everything has ``"head_groups"`` and queries additionally ``"query_heads"``. Every
intermediate of attention therefore keeps readable names.

Each builder takes ``name`` (the prefix of the parameter labels), the base PRNG key
``init_base_rng`` (None leaves parameter slots, to be filled by a converter) and the
`LlamalikeTransformerConfig`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp

from pz_flax.core import named_axes
from pz_flax.models.transformer import _assembly
from pz_flax.models.transformer import model_parts
from pz_flax.models.transformer.variants import _binding
from pz_flax.nn import attention
from pz_flax.nn import basic_ops
from pz_flax.nn import combinators
from pz_flax.nn import embeddings
from pz_flax.nn import grouping
from pz_flax.nn import linear_and_affine
from pz_flax.nn import standardization

# Large and negative, but finite: a fully masked row still gives a well-defined softmax.
# (The value used by the reference Gemma implementation.)
_MASKED_OUT_LOGIT = -2.3819763e38


@dataclasses.dataclass(frozen=True)
class AttentionTypeGlobalCausal:
    """Attention type: every token attends to itself and all earlier tokens."""


@dataclasses.dataclass(frozen=True)
class AttentionTypeSlidingWindowCausal:
    """Attention type: every token attends to the ``window_size`` most recent tokens.

    Attributes:
      window_size: Number of tokens seen, the token itself included.
    """

    window_size: int


AttentionType = AttentionTypeGlobalCausal | AttentionTypeSlidingWindowCausal


@dataclasses.dataclass(kw_only=True)
class LlamalikeTransformerConfig:
    """Sizes and options of a llama-like transformer.

    One object describes a whole model (Llama, Mistral and Gemma checkpoints all map to
    one), so that builders pass it around instead of a dozen arguments.

    Attributes:
      num_kv_heads: Number of key/value heads (head groups for grouped-query attention).
      query_head_multiplier: Number of query heads per key/value head.
      embedding_dim: Width of the residual stream (``"embedding"``).
      projection_dim: Size of each query, key and value vector (``"projection"``).
      mlp_hidden_dim: Width of the feedforward hidden layer (``"neurons"``).
      num_decoder_blocks: Number of transformer blocks.
      vocab_size: Number of tokens (``"vocabulary"``).
      mlp_variant: ``"swiglu"`` (SiLU gate) or ``"geglu_approx"`` (tanh-approximated
        GELU gate).
      tie_embedder_and_logits: Compute logits with the input embedding table instead of a
        separate ``lm_head``; the input embeddings are then scaled up by
        ``sqrt(embedding_dim)`` (as in Gemma).
      rope_wavelength: Maximum wavelength of the rotary embeddings.
      rms_norm_eps: Epsilon of every RMS layer norm.
      attention_type: One attention type for every block, or a sequence of them repeated
        cyclically over the blocks (its length must divide ``num_decoder_blocks``).
      use_post_attn_norm: Add an RMS layer norm after each attention sublayer.
      use_post_ffw_norm: Add an RMS layer norm after each feedforward sublayer.
      final_logit_softcap: If set, output logits are soft-capped at this value with tanh.
      attn_logits_soft_cap: If set, attention logits are soft-capped at this value.
      query_scaling_factor: Multiplier of the queries; ``"default"`` is
        ``projection_dim ** -0.5``.
      parameter_dtype: Dtype of the parameters.
      activation_dtype: Dtype of activations and key/value caches.
      use_layer_stack: Stack the blocks in one `LayerStack` along ``"blocks"`` (requires
        a single attention type).
    """

    num_kv_heads: int
    query_head_multiplier: int
    embedding_dim: int
    projection_dim: int
    mlp_hidden_dim: int
    num_decoder_blocks: int
    vocab_size: int
    mlp_variant: Literal["geglu_approx", "swiglu"]
    tie_embedder_and_logits: bool
    rope_wavelength: float = 10_000
    rms_norm_eps: float = 1e-6
    attention_type: AttentionType | Sequence[AttentionType] = AttentionTypeGlobalCausal()
    use_post_attn_norm: bool = False
    use_post_ffw_norm: bool = False
    final_logit_softcap: float | None = None
    attn_logits_soft_cap: float | None = None
    query_scaling_factor: float | Literal["default"] = "default"
    parameter_dtype: jax.typing.DTypeLike = jnp.float32
    activation_dtype: jax.typing.DTypeLike = jnp.float32
    use_layer_stack: bool = False


_MLP_ACTIVATIONS = {
    # Spelled out because JAX's and PyTorch's GELU defaults differ.
    "geglu_approx": functools.partial(jax.nn.gelu, approximate=True),
    "swiglu": jax.nn.silu,
}


def build_llamalike_feedforward(
    name: str,
    init_base_rng: jax.Array | None,
    config: LlamalikeTransformerConfig,
) -> model_parts.TransformerFeedForward:
    """Builds a gated feedforward block: ``out(act(gate(x)) * value(x))``.

    The gate is a `NamedGroup` called ``"gate"``, so its activations can be selected by
    name; the product is a `BranchAndMultiplyTogether`.

    Args:
      name: Label prefix of the block's parameters.
      init_base_rng: Base PRNG key, or None for parameter slots.
      config: The model configuration.

    Returns:
      The feedforward block.

    Raises:
      ValueError: If ``config.mlp_variant`` is not a known variant.
    """
    activation = _assembly.named_option(_MLP_ACTIVATIONS, config.mlp_variant, "mlp_variant")

    linear = _assembly.projection_builder(
        linear_and_affine.Linear, name, init_base_rng, config.parameter_dtype
    )
    embedding = {"embedding": config.embedding_dim}
    neurons = {"neurons": config.mlp_hidden_dim}
    return model_parts.TransformerFeedForward(
        [
            combinators.BranchAndMultiplyTogether(
                branches=[
                    grouping.NamedGroup(
                        "gate",
                        [
                            linear("gating_linear", embedding, neurons),
                            basic_ops.Elementwise(activation),
                        ],
                    ),
                    linear("value_linear", embedding, neurons),
                ]
            ),
            linear("out_linear", neurons, embedding),
        ]
    )


def _head_layout(config: LlamalikeTransformerConfig) -> _assembly.HeadLayout:
    return _assembly.HeadLayout.for_heads(config.num_kv_heads, config.query_head_multiplier)


def _block_attention_type(
    config: LlamalikeTransformerConfig, block_index: int | None
) -> AttentionType:
    if isinstance(config.attention_type, AttentionType):
        return config.attention_type
    if block_index is None:
        raise ValueError(
            "block_index is required when config.attention_type is a sequence of per-block"
            f" attention types (got {config.attention_type!r})."
        )
    return config.attention_type[block_index % len(config.attention_type)]


def _causal_mask(attention_type: AttentionType, masked_out_value: jax.Array):
    if isinstance(attention_type, AttentionTypeSlidingWindowCausal):
        return attention.ApplyCausalSlidingWindowAttentionMask(
            sliding_window_size=attention_type.window_size,
            masked_out_value=masked_out_value,
        )
    if isinstance(attention_type, AttentionTypeGlobalCausal):
        return attention.ApplyCausalAttentionMask(masked_out_value=masked_out_value)
    raise ValueError(
        f"Unsupported attention type {attention_type!r}; expected an"
        " AttentionTypeGlobalCausal or AttentionTypeSlidingWindowCausal."
    )


def build_llamalike_attention(
    name: str,
    init_base_rng: jax.Array | None,
    config: LlamalikeTransformerConfig,
    block_index: int | None = None,
) -> attention.Attention:
    """Builds the attention sublayer of one block.

    Queries and keys get rotary embeddings from the ``"token_positions"`` side input;
    queries are scaled by ``config.query_scaling_factor``.

    Args:
      name: Label prefix of the parameters (``{name}/query``, ``/key``, ``/value``,
        ``/output``).
      init_base_rng: Base PRNG key, or None for parameter slots.
      config: The model configuration.
      block_index: Index of the block, which picks its attention type when
        ``config.attention_type`` is a sequence.

    Returns:
      The attention layer.

    Raises:
      ValueError: If ``config.attention_type`` is a sequence and ``block_index`` is None,
        or the attention type is unknown.
    """
    heads = _head_layout(config)
    dtype = config.activation_dtype
    if config.query_scaling_factor == "default":
        query_scale = config.projection_dim**-0.5
    else:
        query_scale = config.query_scaling_factor
    mask = _causal_mask(
        _block_attention_type(config, block_index), jnp.array(_MASKED_OUT_LOGIT, dtype=dtype)
    )

    logit_layers: list[Any] = []
    if config.attn_logits_soft_cap is not None:
        logit_layers.append(
            basic_ops.TanhSoftCap(soft_cap=jnp.array(config.attn_logits_soft_cap, dtype=dtype))
        )
    logit_layers.append(mask)
    return _assembly.causal_self_attention(
        projection=_assembly.projection_builder(
            linear_and_affine.Linear, name, init_base_rng, config.parameter_dtype
        ),
        rope=lambda: embeddings.ApplyRoPE(
            positions_input_name="token_positions",
            embedding_axis="projection",
            max_wavelength=config.rope_wavelength,
        ),
        heads=heads,
        embedding_dim=config.embedding_dim,
        projection_dim=config.projection_dim,
        query_scale=jnp.array(query_scale, dtype=dtype),
        logit_layers=logit_layers,
    )


def _rms_norm(name: str, init_base_rng: jax.Array | None, config: LlamalikeTransformerConfig):
    return standardization.RMSLayerNorm.from_config(
        name=name,
        init_base_rng=init_base_rng,
        across_axes={"embedding": config.embedding_dim},
        dtype=config.parameter_dtype,
        epsilon=config.rms_norm_eps,
    )


def build_llamalike_block(
    name: str,
    init_base_rng: jax.Array | None,
    config: LlamalikeTransformerConfig,
    block_index: int | None = None,
) -> model_parts.TransformerBlock:
    """Builds one block: a residual attention sublayer, then a residual feedforward one.

    Args:
      name: Label prefix of the block's parameters.
      init_base_rng: Base PRNG key, or None for parameter slots.
      config: The model configuration.
      block_index: Index of the block (see `build_llamalike_attention`).

    Returns:
      The block.
    """
    attention_part = [
        _rms_norm(f"{name}/pre_attention_norm", init_base_rng, config),
        build_llamalike_attention(f"{name}/attention", init_base_rng, config, block_index),
    ]
    if config.use_post_attn_norm:
        attention_part.append(_rms_norm(f"{name}/post_attention_norm", init_base_rng, config))
    feedforward_part = [
        _rms_norm(f"{name}/pre_ffw_norm", init_base_rng, config),
        build_llamalike_feedforward(f"{name}/mlp", init_base_rng, config),
    ]
    if config.use_post_ffw_norm:
        feedforward_part.append(_rms_norm(f"{name}/post_ffw_norm", init_base_rng, config))
    return model_parts.TransformerBlock(
        sublayers=[
            combinators.Residual(grouping.Sequential(attention_part)),
            combinators.Residual(grouping.Sequential(feedforward_part)),
        ]
    )


def build_llamalike_transformer(
    config: LlamalikeTransformerConfig,
    init_base_rng: jax.Array | None = None,
    name: str = "transformer",
) -> model_parts.TransformerLM:
    """Builds a whole llama-like language model.

    Args:
      config: The model configuration.
      init_base_rng: Base PRNG key of the parameters; None leaves parameter slots (for
        converters that bind loaded weights).
      name: Prefix of every parameter label.

    Returns:
      The model: token ids with a ``"seq"`` axis in, logits over ``"vocabulary"`` out.

    Raises:
      ValueError: If per-block attention types are combined with ``use_layer_stack``, or
        their number does not divide ``num_decoder_blocks``.
    """
    per_block_types = not isinstance(config.attention_type, AttentionType)
    if per_block_types and config.use_layer_stack:
        raise ValueError(
            "use_layer_stack=True needs one attention type for every block, but"
            f" config.attention_type is the sequence {config.attention_type!r}."
        )
    if per_block_types and config.num_decoder_blocks % len(config.attention_type) != 0:
        raise ValueError(
            f"The {len(config.attention_type)} per-block attention types must repeat evenly"
            f" over the {config.num_decoder_blocks} blocks."
        )

    embedding_table = embeddings.EmbeddingTable.from_config(
        name=f"{name}/embedder",
        init_base_rng=init_base_rng,
        vocab_size=config.vocab_size,
        embedding_axes={"embedding": config.embedding_dim},
        dtype=config.parameter_dtype,
    )
    after_embedding = []
    if config.tie_embedder_and_logits:
        after_embedding.append(
            linear_and_affine.ConstantRescale(
                by=jnp.sqrt(config.embedding_dim).astype(config.activation_dtype)
            )
        )

    head: list[Any] = [_rms_norm(f"{name}/final_norm", init_base_rng, config)]
    if config.tie_embedder_and_logits:
        head.append(embeddings.EmbeddingDecode(embedding_table))
    else:
        head.append(
            linear_and_affine.Linear.from_config(
                name=f"{name}/lm_head",
                init_base_rng=init_base_rng,
                input_axes={"embedding": config.embedding_dim},
                output_axes={"vocabulary": config.vocab_size},
                dtype=config.parameter_dtype,
            )
        )
    if config.final_logit_softcap:
        head.append(
            basic_ops.TanhSoftCap(
                soft_cap=jnp.array(config.final_logit_softcap, dtype=config.activation_dtype)
            )
        )

    return _assembly.transformer_lm(
        config,
        embedding_table=embedding_table,
        after_embedding=after_embedding,
        blocks=_assembly.decoder_blocks(
            build_llamalike_block,
            name=name,
            init_base_rng=init_base_rng,
            config=config,
            num_blocks=config.num_decoder_blocks,
            use_layer_stack=config.use_layer_stack,
            pass_block_index=True,
        ),
        head=head,
        heads=_head_layout(config),
    )


def _split_heads(
    weight: jax.Array, config: LlamalikeTransformerConfig, which: Literal["q", "k", "v", "o"]
) -> named_axes.NamedArray:
    """Names a Hugging Face attention weight (PyTorch ``[out, in]`` layout) by head."""
    heads = _head_layout(config)
    head_axes = {**heads.shared_axes, **heads.query_axes} if which in "qo" else heads.shared_axes
    head_shape = (*head_axes.values(), config.projection_dim)
    head_names = (*head_axes, "projection")
    if which == "o":
        return named_axes.wrap(weight.reshape((config.embedding_dim, *head_shape))).tag(
            "embedding", *head_names
        )
    return named_axes.wrap(weight.reshape((*head_shape, config.embedding_dim))).tag(
        *head_names, "embedding"
    )


def llamalike_from_huggingface_model(
    model: Any,
    upcast_activations_to_float32: bool = False,
    use_layer_stack: bool = False,
) -> model_parts.TransformerLM:
    """Converts a Hugging Face llama-like causal LM (Llama, Mistral, ...) to pz_flax.

    This does not check the configuration: it assumes the standard Llama architecture
    (SwiGLU, RoPE, RMS norms, no biases, untied logits), with sliding-window attention if
    the configuration sets ``sliding_window``. Prefer `llama.llama_from_huggingface_model`
    or `mistral.mistral_from_huggingface_model`, which reject configurations this
    conversion would get wrong.

    Args:
      model: A PyTorch ``transformers`` model of the Llama family (float32 or bfloat16).
      upcast_activations_to_float32: Run activations (and caches) in float32 whatever the
        parameter dtype, to analyse activations at full precision.
      use_layer_stack: Stack the decoder blocks in a `LayerStack`.

    Returns:
      The converted model, with the Hugging Face weights (labels start with
      ``"transformer/"``).

    Raises:
      ValueError: If the number of attention heads is not a multiple of the number of
        key/value heads, or the parameter dtype is not float32 or bfloat16.
    """
    from pz_flax.models.transformer.variants import _huggingface

    hf_config = model.config
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads"
            f" ({num_kv_heads})."
        )
    sliding_window = getattr(hf_config, "sliding_window", None)
    parameter_dtype = _huggingface.parameter_dtype(model)
    config = LlamalikeTransformerConfig(
        num_kv_heads=num_kv_heads,
        query_head_multiplier=num_heads // num_kv_heads,
        embedding_dim=hf_config.hidden_size,
        projection_dim=_huggingface.head_dim(hf_config),
        mlp_hidden_dim=hf_config.intermediate_size,
        num_decoder_blocks=hf_config.num_hidden_layers,
        vocab_size=hf_config.vocab_size,
        mlp_variant="swiglu",
        rope_wavelength=_huggingface.rope_theta(hf_config),
        tie_embedder_and_logits=False,
        attention_type=(
            AttentionTypeGlobalCausal()
            if sliding_window is None
            else AttentionTypeSlidingWindowCausal(sliding_window)
        ),
        rms_norm_eps=hf_config.rms_norm_eps,
        parameter_dtype=parameter_dtype,
        activation_dtype=jnp.float32 if upcast_activations_to_float32 else parameter_dtype,
        use_layer_stack=use_layer_stack,
    )

    weights = _huggingface.state_dict_as_jax(model)

    def named(key: str, *names: str) -> named_axes.NamedArray:
        return named_axes.wrap(weights[key]).tag(*names)

    shared = {
        "embedder.embeddings": named("model.embed_tokens.weight", "vocabulary", "embedding"),
        "final_norm/scale.weights": named("model.norm.weight", "embedding"),
        "lm_head.weights": named("lm_head.weight", "vocabulary", "embedding"),
    }
    per_block = []
    for index in range(config.num_decoder_blocks):
        layer = f"model.layers.{index}"
        per_block.append(
            {
                "pre_attention_norm/scale.weights": named(
                    f"{layer}.input_layernorm.weight", "embedding"
                ),
                "pre_ffw_norm/scale.weights": named(
                    f"{layer}.post_attention_layernorm.weight", "embedding"
                ),
                "mlp/gating_linear.weights": named(
                    f"{layer}.mlp.gate_proj.weight", "neurons", "embedding"
                ),
                "mlp/value_linear.weights": named(
                    f"{layer}.mlp.up_proj.weight", "neurons", "embedding"
                ),
                "mlp/out_linear.weights": named(
                    f"{layer}.mlp.down_proj.weight", "embedding", "neurons"
                ),
                **{
                    f"attention/{part}.weights": _split_heads(
                        weights[f"{layer}.self_attn.{which}_proj.weight"], config, which
                    )
                    for part, which in (
                        ("query", "q"),
                        ("key", "k"),
                        ("value", "v"),
                        ("output", "o"),
                    )
                },
            }
        )
    return _binding.bind_converted_parameters(
        lambda rng: build_llamalike_transformer(config, init_base_rng=rng, name="transformer"),
        label_prefix="transformer",
        shared=shared,
        per_block=per_block,
        use_layer_stack=use_layer_stack,
        source=f"{type(model).__name__} conversion",
    )
