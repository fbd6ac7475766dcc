"""The named pieces of a decoder-only transformer language model.

Axis names used throughout the transformer models:

* ``"seq"``: token position in the sequence (the queries' position in an
  attention matrix);
* ``"kv_seq"``: the keys' and values' position in an attention matrix;
* ``"embedding"``: the residual stream;
* ``"heads"``: attention heads; ``"projection"``: the per-head query, key and
  value vectors;
* ``"neurons"``: the hidden layer of the feedforward blocks;
* ``"vocabulary"``: token ids (in the embedding table and the output logits).

Side inputs: ``"token_positions"`` gives each token's position (-1 marks
padding), used by RoPE and the causal mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from pz_flax.core import named_axes
from pz_flax.core import struct
from pz_flax.nn import grouping
from pz_flax.nn import layer as layer_base


@dataclasses.dataclass(frozen=True)
class TransformerMetadata:
    """Sizes and dtypes of a transformer, kept next to its layers.

    Model transformations (such as switching to cached decoding) need the
    shapes of intermediate activations before running anything; this record
    provides them.

    Attributes:
      common_head_axes: Head axes shared by queries, keys and values (names
        to sizes), e.g. ``{"heads": 4}``.
      query_only_head_axes: Head axes only queries have (for multi-query or
        grouped-query attention); empty for plain multi-head attention.
      embedding_dim: Size of the ``"embedding"`` axis.
      projection_dim: Size of the ``"projection"`` axis.
      mlp_hidden_dim: Size of the ``"neurons"`` axis.
      vocab_size: Size of the ``"vocabulary"`` axis.
      activation_dtype: Dtype of activations and of key/value caches.
    """

    common_head_axes: dict[str, int]
    query_only_head_axes: dict[str, int]
    embedding_dim: int
    projection_dim: int
    mlp_hidden_dim: int
    vocab_size: int
    activation_dtype: jax.typing.DTypeLike


@struct.pytree_dataclass(has_implicitly_inherited_fields=True)
class TransformerFeedForward(grouping.Sequential):
    """A `Sequential` marking a transformer's feedforward (MLP) sublayers.

    Attributes:
      sublayers: The feedforward layers, in order.
    """


@struct.pytree_dataclass(has_implicitly_inherited_fields=True)
class TransformerBlock(grouping.Sequential):
    """A `Sequential` marking one transformer block (attention and feedforward).

    Attributes:
      sublayers: The block's layers, in order.
    """

    def treescope_color(self) -> tuple[str, str]:
        accent = "oklch(0.785 0.103 186.9 / 1.0)"
        return accent, f"color-mix(in oklab, {accent} 25%, white)"


@struct.pytree_dataclass
class TransformerLM(layer_base.Layer):
    """Top level of a transformer language model: tokens in, logits out.

    It supplies default token positions and checks the input; the
    computation itself is ``body``.

    Attributes:
      body: The model (embedding lookup, blocks, final norm, decoding).
      metadata: Sizes and dtypes of the model.
    """

    body: layer_base.Layer
    metadata: TransformerMetadata = dataclasses.field(metadata={"pytree_node": False})

    def __call__(
        self,
        tokens: named_axes.NamedArray,
        *,
        token_positions: named_axes.NamedArray | None = None,
        **side_inputs: Any,
    ) -> named_axes.NamedArray:
        """Computes next-token logits for every position.

        Args:
          tokens: Integer token ids with a ``"seq"`` axis and any batch axes.
          token_positions: Position of each token (same axes as ``tokens`` or
            a subset containing ``"seq"``); defaults to ``0, 1, ...`` along
            ``"seq"``.
          **side_inputs: Forwarded to ``body``.

        Returns:
          Logits with the axes of ``tokens`` plus ``"vocabulary"``.

        Raises:
          ValueError: If ``tokens`` has no ``"seq"`` axis or positional axes.
        """
        if tokens.positional_shape or "seq" not in tokens.named_shape:
            raise ValueError(
                "TransformerLM expects token ids with a 'seq' axis and only named axes,"
                f" but got named_shape {dict(tokens.named_shape)} and positional shape"
                f" {tokens.positional_shape}."
            )
        if token_positions is None:
            token_positions = named_axes.arange("seq", tokens.named_shape["seq"])
        return self.body(tokens, token_positions=token_positions, **side_inputs)
