"""The GPT-NeoX architecture (GPT-NeoX-20B, the Pythia suite).

How it differs from the llama-like family:

* "parallel" blocks: attention and feedforward both read the block's input,
  ``y = x + Attention(LayerNorm(x)) + MLP(LayerNorm(x))``;
* full multi-head attention, with rotary embeddings on only the first
  ``rope_subset_size`` entries of each query and key;
* biases everywhere (every projection, every layer norm), a plain two-layer MLP;
* untied output logits.

Builders take ``name`` (label prefix), ``init_base_rng`` (None for parameter slots) and a
`GPTNeoXTransformerConfig`; `gpt_neox_from_huggingface_model` converts
``transformers.GPTNeoXForCausalLM`` models (the ``huggingface`` extra).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp

from pz_flax.core import named_axes
from pz_flax.models.transformer import _assembly
from pz_flax.models.transformer import model_parts
from pz_flax.models.transformer.variants import _binding
from pz_flax.models.transformer.variants import _huggingface
from pz_flax.nn import attention
from pz_flax.nn import basic_ops
from pz_flax.nn import combinators
from pz_flax.nn import embeddings
from pz_flax.nn import grouping
from pz_flax.nn import linear_and_affine
from pz_flax.nn import standardization

# See llamalike_common: large, negative and finite.
_MASKED_OUT_LOGIT = -2.3819763e38

_ACTIVATIONS = {
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_approx": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}

# Hugging Face ``hidden_act`` names -> ours.
_HF_ACTIVATIONS = {
    "gelu": "gelu_exact",
    "gelu_new": "gelu_approx",
    "silu": "silu",
    "relu": "relu",
}


@dataclasses.dataclass
class GPTNeoXTransformerConfig:
    """Sizes and options of a GPT-NeoX transformer.

    Attributes:
      num_attention_heads: Number of attention heads (``"heads"``).
      embedding_dim: Width of the residual stream (``"embedding"``).
      projection_dim: Size of each query, key and value vector (``"projection"``).
      mlp_hidden_dim: Width of the feedforward hidden layer (``"neurons"``).
      num_decoder_blocks: Number of transformer blocks.
      vocab_size: Number of tokens (``"vocabulary"``).
      activation_fn: Feedforward activation: ``"relu"``, ``"silu"``, ``"gelu_exact"`` or
        ``"gelu_approx"`` (tanh approximation).
      rope_subset_size: How many leading entries of each query and key vector get rotary
        embeddings.
      rope_wavelength: Maximum wavelength of the rotary embeddings.
      layernorm_epsilon: Epsilon of every layer norm.
      parameter_dtype: Dtype of the parameters.
      activation_dtype: Dtype of activations and key/value caches.
      use_layer_stack: Stack the blocks in one `LayerStack` along ``"blocks"``.
    """

    num_attention_heads: int
    embedding_dim: int
    projection_dim: int
    mlp_hidden_dim: int
    num_decoder_blocks: int
    vocab_size: int
    activation_fn: Literal["relu", "silu", "gelu_exact", "gelu_approx"]
    rope_subset_size: int
    rope_wavelength: float
    layernorm_epsilon: float
    parameter_dtype: jax.typing.DTypeLike
    activation_dtype: jax.typing.DTypeLike
    use_layer_stack: bool = False


def _layer_norm(
    name: str, init_base_rng: jax.Array | None, config: GPTNeoXTransformerConfig
) -> standardization.LayerNorm:
    return standardization.LayerNorm.from_config(
        name=name,
        init_base_rng=init_base_rng,
        across_axes={"embedding": config.embedding_dim},
        epsilon=config.layernorm_epsilon,
        dtype=config.parameter_dtype,
    )


def build_gpt_neox_feedforward(
    name: str,
    init_base_rng: jax.Array | None,
    config: GPTNeoXTransformerConfig,
) -> model_parts.TransformerFeedForward:
    """Builds the feedforward block: ``Affine``, activation, ``Affine``.

    Args:
      name: Label prefix of the parameters (``{name}/in``, ``{name}/out``).
      init_base_rng: Base PRNG key, or None for parameter slots.
      config: The model configuration.

    Returns:
      The feedforward block.

    Raises:
      ValueError: If ``config.activation_fn`` is not a known activation.
    """
    activation = _assembly.named_option(_ACTIVATIONS, config.activation_fn, "activation_fn")
    affine = _assembly.projection_builder(
        linear_and_affine.Affine, name, init_base_rng, config.parameter_dtype
    )
    embedding = {"embedding": config.embedding_dim}
    neurons = {"neurons": config.mlp_hidden_dim}
    return model_parts.TransformerFeedForward(
        [
            affine("in", embedding, neurons),
            basic_ops.Elementwise(activation),
            affine("out", neurons, embedding),
        ]
    )


def build_gpt_neox_attention(
    name: str,
    init_base_rng: jax.Array | None,
    config: GPTNeoXTransformerConfig,
) -> attention.Attention:
    """Builds the causal multi-head attention sublayer of one block.

    Args:
      name: Label prefix of the parameters (``{name}/query``, ``/key``, ``/value``,
        ``/output``).
      init_base_rng: Base PRNG key, or None for parameter slots.
      config: The model configuration.

    Returns:
      The attention layer.
    """
    dtype = config.activation_dtype
    return _assembly.causal_self_attention(
        projection=_assembly.projection_builder(
            linear_and_affine.Affine, name, init_base_rng, config.parameter_dtype
        ),
        rope=lambda: embeddings.ApplyRoPEToSubset(
            positions_input_name="token_positions",
            embedding_axis="projection",
            max_wavelength=config.rope_wavelength,
            rope_subset_size=config.rope_subset_size,
        ),
        heads=_assembly.HeadLayout.for_heads(config.num_attention_heads, 1),
        embedding_dim=config.embedding_dim,
        projection_dim=config.projection_dim,
        query_scale=jnp.array(config.projection_dim**-0.5, dtype=dtype),
        logit_layers=[
            attention.ApplyCausalAttentionMask(
                masked_out_value=jnp.array(_MASKED_OUT_LOGIT, dtype=dtype)
            )
        ],
    )


def build_gpt_neox_block(
    name: str,
    init_base_rng: jax.Array | None,
    config: GPTNeoXTransformerConfig,
) -> model_parts.TransformerBlock:
    """Builds one parallel block: ``x + Attention(LayerNorm(x)) + MLP(LayerNorm(x))``.

    Args:
      name: Label prefix of the block's parameters.
      init_base_rng: Base PRNG key, or None for parameter slots.
      config: The model configuration.

    Returns:
      The block.
    """
    return model_parts.TransformerBlock(
        sublayers=[
            combinators.BranchAndAddTogether(
                [
                    grouping.Identity(),
                    grouping.Sequential(
                        [
                            _layer_norm(f"{name}/pre_attention_norm", init_base_rng, config),
                            build_gpt_neox_attention(f"{name}/attention", init_base_rng, config),
                        ]
                    ),
                    grouping.Sequential(
                        [
                            _layer_norm(f"{name}/pre_ffw_norm", init_base_rng, config),
                            build_gpt_neox_feedforward(f"{name}/mlp", init_base_rng, config),
                        ]
                    ),
                ]
            )
        ]
    )


def build_gpt_neox_transformer(
    config: GPTNeoXTransformerConfig,
    init_base_rng: jax.Array | None = None,
    name: str = "transformer",
) -> model_parts.TransformerLM:
    """Builds a whole GPT-NeoX language model.

    Args:
      config: The model configuration.
      init_base_rng: Base PRNG key of the parameters; None leaves parameter slots.
      name: Prefix of every parameter label.

    Returns:
      The model: token ids with a ``"seq"`` axis in, logits over ``"vocabulary"`` out.
    """
    return _assembly.transformer_lm(
        config,
        embedding_table=embeddings.EmbeddingTable.from_config(
            name=f"{name}/embedder",
            init_base_rng=init_base_rng,
            vocab_size=config.vocab_size,
            embedding_axes={"embedding": config.embedding_dim},
            dtype=config.parameter_dtype,
        ),
        blocks=_assembly.decoder_blocks(
            build_gpt_neox_block,
            name=name,
            init_base_rng=init_base_rng,
            config=config,
            num_blocks=config.num_decoder_blocks,
            use_layer_stack=config.use_layer_stack,
        ),
        head=[
            _layer_norm(f"{name}/final_norm", init_base_rng, config),
            linear_and_affine.Linear.from_config(
                name=f"{name}/lm_head",
                init_base_rng=init_base_rng,
                input_axes={"embedding": config.embedding_dim},
                output_axes={"vocabulary": config.vocab_size},
                dtype=config.parameter_dtype,
            ),
        ],
        heads=_assembly.HeadLayout.for_heads(config.num_attention_heads, 1),
    )


GPTNeoXForCausalLM = Any

_HANDLED_CONFIG_ATTRIBUTES = frozenset(
    {
        "hidden_act",
        "hidden_size",
        "intermediate_size",
        "layer_norm_eps",
        "num_attention_heads",
        "num_hidden_layers",
        "rotary_emb_base",
        "rotary_pct",
        "rope_theta",
        "partial_rotary_factor",
        "rope_parameters",
        "vocab_size",
        "head_dim",
    }
)


def _rope_config(hf_config: Any) -> tuple[float, float]:
    """(wavelength, fraction of each head rotated), from old or new ``transformers``."""
    legacy_base = getattr(hf_config, "rotary_emb_base", None)
    legacy_fraction = getattr(hf_config, "rotary_pct", None)
    wavelength = legacy_base if legacy_base is not None else _huggingface.rope_theta(hf_config)
    if legacy_fraction is None:
        legacy_fraction = _huggingface.rope_setting(hf_config, "partial_rotary_factor")
    return float(wavelength), float(legacy_fraction)


def gpt_neox_from_huggingface_model(
    model: GPTNeoXForCausalLM,
    upcast_activations_to_float32: bool = False,
    use_layer_stack: bool = False,
) -> model_parts.TransformerLM:
    """Converts a Hugging Face ``GPTNeoXForCausalLM`` to a pz_flax `TransformerLM`.

    Covers the settings of GPT-NeoX-20B and the Pythia models (parallel residual blocks,
    untied logits, partial RoPE); other settings are rejected by name.

    Args:
      model: The PyTorch model (float32 or bfloat16 parameters).
      upcast_activations_to_float32: Run activations (and caches) in float32.
      use_layer_stack: Stack the decoder blocks in a `LayerStack`.

    Returns:
      The converted model.

    Raises:
      RuntimeError: If ``transformers`` is not installed.
      ValueError: If ``model`` is not a ``GPTNeoXForCausalLM``, or its configuration
        changes a setting the conversion does not implement.
    """
    _huggingface.check_model_and_config(
        model, "GPTNeoXForCausalLM", "GPTNeoXConfig", _HANDLED_CONFIG_ATTRIBUTES
    )
    hf_config = model.config
    activation_fn = _assembly.named_option(_HF_ACTIVATIONS, hf_config.hidden_act, "hidden_act")
    parameter_dtype = _huggingface.parameter_dtype(model)
    num_heads = hf_config.num_attention_heads
    projection_dim = hf_config.hidden_size // num_heads
    rope_wavelength, rotated_fraction = _rope_config(hf_config)
    config = GPTNeoXTransformerConfig(
        num_attention_heads=num_heads,
        embedding_dim=hf_config.hidden_size,
        projection_dim=projection_dim,
        mlp_hidden_dim=hf_config.intermediate_size,
        num_decoder_blocks=hf_config.num_hidden_layers,
        vocab_size=hf_config.vocab_size,
        activation_fn=activation_fn,
        rope_wavelength=rope_wavelength,
        rope_subset_size=int(rotated_fraction * projection_dim),
        layernorm_epsilon=hf_config.layer_norm_eps,
        parameter_dtype=parameter_dtype,
        activation_dtype=jnp.float32 if upcast_activations_to_float32 else parameter_dtype,
        use_layer_stack=use_layer_stack,
    )

    weights = _huggingface.state_dict_as_jax(model)

    def named(key: str, *names: str) -> named_axes.NamedArray:
        return named_axes.wrap(weights[key]).tag(*names)

    def norm(prefix: str, hf_key: str) -> dict[str, named_axes.NamedArray]:
        return {
            f"{prefix}/scale.weights": named(f"{hf_key}.weight", "embedding"),
            f"{prefix}/shift.bias": named(f"{hf_key}.bias", "embedding"),
        }

    def affine(prefix: str, hf_key: str, out_names, in_names) -> dict[str, named_axes.NamedArray]:
        return {
            f"{prefix}/Linear.weights": named(f"{hf_key}.weight", *out_names, *in_names),
            f"{prefix}/AddBias.bias": named(f"{hf_key}.bias", *out_names),
        }

    shared = {
        "embedder.embeddings": named("gpt_neox.embed_in.weight", "vocabulary", "embedding"),
        **norm("final_norm", "gpt_neox.final_layer_norm"),
        # Older ``transformers`` releases call the output projection ``embed_out``.
        "lm_head.weights": named(
            "embed_out.weight" if "embed_out.weight" in weights else "lm_head.weight",
            "vocabulary",
            "embedding",
        ),
    }
    per_block = []
    for index in range(config.num_decoder_blocks):
        layer = f"gpt_neox.layers.{index}"
        # The fused projection's output index runs over (head, q/k/v, projection).
        fused = f"{layer}.attention.query_key_value"
        qkv_weights = named_axes.wrap(
            weights[f"{fused}.weight"].reshape((num_heads, 3, projection_dim, config.embedding_dim))
        ).tag("heads", "qkv", "projection", "embedding")
        qkv_biases = named_axes.wrap(
            weights[f"{fused}.bias"].reshape((num_heads, 3, projection_dim))
        ).tag("heads", "qkv", "projection")
        block = {
            **norm("pre_attention_norm", f"{layer}.input_layernorm"),
            **norm("pre_ffw_norm", f"{layer}.post_attention_layernorm"),
            **affine("mlp/in", f"{layer}.mlp.dense_h_to_4h", ["neurons"], ["embedding"]),
            **affine("mlp/out", f"{layer}.mlp.dense_4h_to_h", ["embedding"], ["neurons"]),
            "attention/output/Linear.weights": named_axes.wrap(
                weights[f"{layer}.attention.dense.weight"].reshape(
                    (config.embedding_dim, num_heads, projection_dim)
                )
            ).tag("embedding", "heads", "projection"),
            "attention/output/AddBias.bias": named(f"{layer}.attention.dense.bias", "embedding"),
        }
        for index_in_fused, part in enumerate(("query", "key", "value")):
            block[f"attention/{part}/Linear.weights"] = qkv_weights[{"qkv": index_in_fused}]
            block[f"attention/{part}/AddBias.bias"] = qkv_biases[{"qkv": index_in_fused}]
        per_block.append(block)
    return _binding.bind_converted_parameters(
        lambda rng: build_gpt_neox_transformer(config, init_base_rng=rng, name="transformer"),
        label_prefix="transformer",
        shared=shared,
        per_block=per_block,
        use_layer_stack=use_layer_stack,
        source="GPTNeoXForCausalLM conversion",
    )
