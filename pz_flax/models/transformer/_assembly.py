"""The pieces every decoder-only transformer here is assembled from.

`simple_decoder` and the published variants (`llamalike_common`, `gpt_neox`) differ in their
blocks (pre-norm or parallel residuals, gated or plain feedforward, biases or none) but share
the shape of the rest: projections labelled ``{name}/{part}``, the same causal self-attention
wiring (project, rotate, rescale, score, mask, softmax, mix, project back), blocks either
stacked in one `LayerStack` or written out as ``block_{i}``, and a `TransformerLM` whose body
runs embedding lookup, activation cast, blocks and output head in that order. Those shared
parts live here, once, so a fix to (say) how the cast or the attention is wired reaches every
model alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Protocol

import jax

from pz_flax.models.transformer import model_parts
from pz_flax.nn import attention
from pz_flax.nn import basic_ops
from pz_flax.nn import embeddings
from pz_flax.nn import grouping
from pz_flax.nn import layer as layer_base
from pz_flax.nn import layer_stack
from pz_flax.nn import linear_and_affine


def named_option(options: Mapping[str, Any], choice: str, setting: str) -> Any:
    """``options[choice]``, or a ValueError naming ``setting`` and the choices it has."""
    if choice not in options:
        raise ValueError(f"Unsupported {setting} {choice!r}; expected one of {sorted(options)}.")
    return options[choice]


# ``projection(part, input_axes, output_axes)``: a parameterized layer labelled ``{name}/{part}``.
ProjectionBuilder = Callable[[str, dict[str, int], dict[str, int]], layer_base.Layer]


def projection_builder(
    layer_type: type[linear_and_affine.Linear] | type[linear_and_affine.Affine],
    name: str,
    init_base_rng: jax.Array | None,
    dtype: jax.typing.DTypeLike,
) -> ProjectionBuilder:
    """Builds ``layer_type`` projections whose labels all start with ``name``."""

    def projection(part: str, input_axes: dict[str, int], output_axes: dict[str, int]):
        return layer_type.from_config(
            name=f"{name}/{part}",
            init_base_rng=init_base_rng,
            input_axes=input_axes,
            output_axes=output_axes,
            dtype=dtype,
        )

    return projection


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """How the attention heads of a model are named.

    With as many key/value heads as query heads there is one ``"heads"`` axis; with a single
    key/value head the queries have ``"query_heads"`` and keys/values no head axis at all; in
    between (grouped-query attention) everything has ``"head_groups"`` and queries
    additionally ``"query_heads"``.

    Attributes:
      shared_axes: Head axes of queries, keys and values.
      query_axes: Head axes only the queries have.
      shared_letters: Einsum letters of ``shared_axes``.
      query_letters: Einsum letters of ``query_axes``.
    """

    shared_axes: dict[str, int]
    query_axes: dict[str, int]
    shared_letters: dict[str, str]
    query_letters: dict[str, str]

    @classmethod
    def for_heads(cls, num_kv_heads: int, query_head_multiplier: int) -> HeadLayout:
        """The layout of ``num_kv_heads`` key/value heads, each shared by that many queries."""
        if query_head_multiplier == 1:
            return cls({"heads": num_kv_heads}, {}, {"heads": "h"}, {})
        if num_kv_heads == 1:
            return cls({}, {"query_heads": query_head_multiplier}, {}, {"query_heads": "h"})
        return cls(
            {"head_groups": num_kv_heads},
            {"query_heads": query_head_multiplier},
            {"head_groups": "hg"},
            {"query_heads": "hq"},
        )


def causal_self_attention(
    *,
    projection: ProjectionBuilder,
    rope: Callable[[], layer_base.Layer],
    heads: HeadLayout,
    embedding_dim: int,
    projection_dim: int,
    query_scale: jax.Array,
    logit_layers: Sequence[layer_base.Layer],
) -> attention.Attention:
    """Self-attention over ``"seq"``, its pattern over ``"kv_seq"``.

    Queries and keys are projected and then rotated by ``rope()``; queries are then scaled by
    ``query_scale``. The attention logits go through ``logit_layers`` (soft cap, causal mask)
    before the softmax over ``"kv_seq"``.

    Args:
      projection: Builds the ``"query"``, ``"key"``, ``"value"`` and ``"output"`` projections.
      rope: Builds the rotary embedding applied to queries and to keys.
      heads: How the heads are named.
      embedding_dim: Width of the residual stream (``"embedding"``).
      projection_dim: Size of each query, key and value vector (``"projection"``).
      query_scale: Multiplier of the queries.
      logit_layers: Layers applied to the attention logits, in order, before the softmax.

    Returns:
      The attention layer.
    """
    embedding = {"embedding": embedding_dim}
    query_vectors = {**heads.shared_axes, **heads.query_axes, "projection": projection_dim}
    kv_vectors = {**heads.shared_axes, "projection": projection_dim}
    query_heads_spec = {"seq": "tq", **heads.shared_letters, **heads.query_letters}
    query_spec = {**query_heads_spec, "projection": "p"}
    kv_spec = {"seq": "tkv", **heads.shared_letters, "projection": "p"}
    pattern_spec = {**query_heads_spec, "kv_seq": "tkv"}
    return attention.Attention(
        input_to_query=grouping.Sequential(
            [
                projection("query", embedding, query_vectors),
                rope(),
                linear_and_affine.ConstantRescale(by=query_scale),
            ]
        ),
        input_to_key=grouping.Sequential([projection("key", embedding, kv_vectors), rope()]),
        input_to_value=grouping.Sequential([projection("value", embedding, kv_vectors)]),
        query_key_to_attn=grouping.Sequential(
            [
                linear_and_affine.NamedEinsum((query_spec, kv_spec), pattern_spec),
                *logit_layers,
                basic_ops.Softmax("kv_seq"),
            ]
        ),
        attn_value_to_output=grouping.Sequential(
            [
                linear_and_affine.NamedEinsum((pattern_spec, kv_spec), query_spec),
                projection("output", query_vectors, embedding),
            ]
        ),
    )


def decoder_blocks(
    builder: Callable[..., layer_base.Layer],
    *,
    name: str,
    init_base_rng: jax.Array | None,
    config: Any,
    num_blocks: int,
    use_layer_stack: bool,
    pass_block_index: bool = False,
) -> list[layer_base.Layer]:
    """The model's blocks: one `LayerStack` along ``"blocks"``, or ``block_{i}`` in order.

    Args:
      builder: Called as ``builder(name, init_base_rng, config)`` for each block (stacked:
        once, with keyword arguments, under the name ``{name}/blocks``).
      name: Label prefix of the model.
      init_base_rng: Base PRNG key, or None for parameter slots.
      config: The model configuration, passed on to ``builder``.
      num_blocks: Number of blocks.
      use_layer_stack: Stack the blocks instead of writing them out.
      pass_block_index: Also pass each written-out block its index (``block_index=i``).

    Returns:
      The layers to put between the embedding and the output head.
    """
    if use_layer_stack:
        return [
            layer_stack.LayerStack.from_sublayer_builder(
                builder=builder,
                stack_axis="blocks",
                stack_axis_size=num_blocks,
                init_base_rng=init_base_rng,
                builder_kwargs={"name": f"{name}/blocks", "config": config},
            )
        ]
    return [
        builder(
            f"{name}/block_{index}",
            init_base_rng,
            config,
            **({"block_index": index} if pass_block_index else {}),
        )
        for index in range(num_blocks)
    ]


class DecoderSizes(Protocol):
    """What `transformer_lm` reads from a model configuration (every config here has it)."""

    embedding_dim: int
    projection_dim: int
    mlp_hidden_dim: int
    vocab_size: int
    parameter_dtype: jax.typing.DTypeLike
    activation_dtype: jax.typing.DTypeLike


def transformer_lm(
    config: DecoderSizes,
    *,
    embedding_table: embeddings.EmbeddingTable,
    after_embedding: Sequence[layer_base.Layer] = (),
    blocks: Sequence[layer_base.Layer],
    head: Sequence[layer_base.Layer],
    heads: HeadLayout,
) -> model_parts.TransformerLM:
    """A `TransformerLM`: look up, cast, ``after_embedding``, blocks, then ``head``.

    The lookup's embeddings are cast to ``config.activation_dtype`` when it differs from the
    parameters' dtype, so every block computes (and caches) in the activation dtype.

    Args:
      config: The model configuration (its sizes go into the model's metadata).
      embedding_table: The input embedding table.
      after_embedding: Layers between the (cast) embeddings and the first block.
      blocks: The blocks (see `decoder_blocks`).
      head: The final norm and everything that turns it into logits over ``"vocabulary"``.
      heads: How the attention heads are named (recorded in the metadata).

    Returns:
      The model: token ids with a ``"seq"`` axis in, logits over ``"vocabulary"`` out.
    """
    body: list[layer_base.Layer] = [embeddings.EmbeddingLookup(embedding_table)]
    if config.activation_dtype != config.parameter_dtype:
        body.append(basic_ops.CastToDType(config.activation_dtype))
    body += [*after_embedding, *blocks, *head]
    return model_parts.TransformerLM(
        metadata=model_parts.TransformerMetadata(
            common_head_axes=heads.shared_axes,
            query_only_head_axes=heads.query_axes,
            embedding_dim=config.embedding_dim,
            projection_dim=config.projection_dim,
            mlp_hidden_dim=config.mlp_hidden_dim,
            vocab_size=config.vocab_size,
            activation_dtype=config.activation_dtype,
        ),
        body=grouping.Sequential(body),
    )
