"""Drawing token sequences, and per-token scores, as readable text in treescope figures.

`show_token_array` lays out an array of token IDs as rows of boxes, each with the ID's
colour-coded digit box and its decoded text; `show_token_scores` draws each token's text on
a colour given by its score (a log-probability, an attribution...), with the value on hover.
Both take NamedArrays or plain arrays, any number of axes: the last axis of
``axis_name_order`` runs across the page, and every other axis gives one labelled row per
index. Results are treescope figures, so they render in notebooks and in
``treescope.render_to_html``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import treescope
from treescope import figures

from pz_flax.core import named_axes


class SentencePieceProcessorLike(Protocol):
    """The part of a tokenizer these figures use; ``sentencepiece`` processors have it."""

    def GetPieceSize(self) -> int:
        """The size of the vocabulary."""

    def IdToPiece(self, id: int) -> str:
        """The text of token ``id``."""

    def IsControl(self, id: int) -> bool:
        """Whether token ``id`` is a control token (``<bos>``, ``<pad>``...)."""


def _fixup_tokens_and_name_order(
    token_arrays: list[named_axes.NamedArrayBase | jax.Array | np.ndarray],
    axis_name_order: Sequence[str] | None = None,
) -> tuple[list[named_axes.NamedArrayView], list[str]]:
    """Brings arrays to a common all-named layout on the host, and picks the axis order.

    Positional axes are named ``axis0``, ``axis1``, ...; every array is broadcast to the
    union of all named shapes. Without an explicit order, ``batch`` comes first, ``seq``
    last and the rest keep their order. A scalar gets a length-1 ``seq`` axis.
    """
    host_arrays = []
    common_shape: dict[Any, int] = {}
    for array in token_arrays:
        if not isinstance(array, named_axes.NamedArrayBase):
            # Host copies: drawing reads every element, one at a time.
            array = named_axes.wrap(jax.device_put(array, jax.local_devices(backend="cpu")[0]))
        if array.positional_shape:
            array = array.tag(*(f"axis{i}" for i in range(len(array.positional_shape))))
        array = jax.device_get(array)
        common_shape.update(array.named_shape)
        host_arrays.append(array.as_namedarrayview())

    shape_template = named_axes.zeros(common_shape)
    broadcast = [
        named_axes.nmap(lambda value, _template: value)(array, shape_template)
        for array in host_arrays
    ]

    if axis_name_order is None:
        order = list(broadcast[0].named_shape.keys())
        if "batch" in order:
            order.remove("batch")
            order.insert(0, "batch")
        if "seq" in order:
            order.remove("seq")
            order.append("seq")
    else:
        order = list(axis_name_order)
    if not broadcast[0].named_shape:
        broadcast = [array[{"seq": None}] for array in broadcast]
        order.append("seq")
    return broadcast, order


def _row_indices(array: named_axes.NamedArrayBase, row_axes: Sequence[str]):
    """Every index dict over ``row_axes``, in row-major order."""
    ranges = [[(name, i) for i in range(array.named_shape[name])] for name in row_axes]
    return [dict(combination) for combination in itertools.product(*ranges)]


def _decoded_piece(vocab: SentencePieceProcessorLike, token: int):
    """The token's text, escaped: grey for control tokens, orange if the piece is not a str."""
    if vocab.IsControl(token):
        return figures.with_color(vocab.IdToPiece(token), "gray")
    piece = repr(vocab.IdToPiece(token))
    if piece[:1] in "'\"" and piece[-1:] in "'\"":
        return piece[1:-1]
    return figures.with_color(piece, "orange")


def show_token_array(
    tokens: named_axes.NamedArrayBase | jax.Array | np.ndarray,
    vocab: SentencePieceProcessorLike,
    axis_name_order: Sequence[str] | None = None,
):
    """Draws an array of token IDs as digit boxes with their decoded text.

    Args:
        tokens: Integer token IDs, named or positional, any shape.
        vocab: The tokenizer that decodes them (see `SentencePieceProcessorLike`).
        axis_name_order: Axis names in layout order; the last runs across the page, each
            other gives one labelled row per index. Inferred when omitted.

    Returns:
        A treescope figure.
    """
    [tokens], order = _fixup_tokens_and_name_order([tokens], axis_name_order)
    *row_axes, across = order
    parts = []
    for row in _row_indices(tokens, row_axes):
        if row:
            parts.append(figures.styled(f"\n{row!r}:", "font-style: italic"))
        cells = []
        for i in range(tokens.named_shape[across]):
            token = int(tokens[{**row, across: i}])
            cells.append(
                figures.inline(
                    treescope.integer_digitbox(token, label=f"{token}"),
                    " ",
                    _decoded_piece(vocab, token),
                    wrap=False,
                )
            )
            cells.append(" ")
        # Indented, and wrapping inside the indent, so long sequences stay readable.
        parts.append(figures.indented(figures.inline(*cells, wrap=True)))
    return figures.inline(*parts)


def show_token_scores(
    tokens: named_axes.NamedArrayBase | jax.Array | np.ndarray,
    scores: named_axes.NamedArrayBase | jax.Array | np.ndarray,
    vocab: SentencePieceProcessorLike,
    axis_name_order: Sequence[str] | None = None,
    vmax: float | None = None,
):
    """Draws each token's text on a colour given by its score.

    Args:
        tokens: Integer token IDs, named or positional, any shape.
        scores: One score per token; broadcast against ``tokens`` by axis name.
        vocab: The tokenizer that decodes the tokens.
        axis_name_order: Axis names in layout order, as for `show_token_array`.
        vmax: The score at which the colour scale saturates; by default three times the
            scores' root mean square.

    Returns:
        A treescope figure.
    """
    [tokens, scores], order = _fixup_tokens_and_name_order([tokens, scores], axis_name_order)
    if vmax is None:
        vmax = 3 * jnp.sqrt(jnp.mean(jnp.square(scores.data_array)))
    *row_axes, across = order
    parts = []
    for row in _row_indices(tokens, row_axes):
        # A row label, or an empty line leaving room for the hover tooltips.
        parts.append(figures.styled(f"\n{row!r}:", "font-style: italic") if row else "\n")
        cells = []
        for i in range(tokens.named_shape[across]):
            index = {**row, across: i}
            cells.append(
                figures.text_on_color(
                    text=vocab.IdToPiece(int(tokens[index])),
                    value=float(scores[index]),
                    vmax=vmax,
                )
            )
            cells.append("")
        parts.append(figures.indented(figures.inline(*cells, wrap=True)))
    return figures.inline(*parts)
