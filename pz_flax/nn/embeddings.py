"""Token embeddings and rotary position embeddings, over named axes.

The embedding table is a plain struct, not a layer: it owns the parameter,
and two thin layers use it, `EmbeddingLookup` (tokens to vectors, the first
layer of a language model) and `EmbeddingDecode` (vectors to token logits, the
last). Tying input and output embeddings is then just passing the same table
(holding the same `Parameter`) to both.

`ApplyRoPE` and `ApplyRoPEToSubset` rotate query/key vectors by an angle that
depends on each token's position, read from a side input, so that query-key
dot products depend on relative position only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pz_flax.core import named_axes
from pz_flax.core import struct
from pz_flax.nn import layer as layer_base
from pz_flax.nn import linear_and_affine
from pz_flax.nn import parameters

# Fan-out scaling treats the embedding axes as outputs, so each embedding
# vector starts with unit expected squared norm per element regardless of size.
_DEFAULT_EMBEDDING_INITIALIZER = functools.partial(
    linear_and_affine.variance_scaling_initializer,
    scale=1.0,
    mode="fan_out",
    distribution="normal",
)


@struct.pytree_dataclass
class EmbeddingTable(struct.Struct):
    """The embedding parameter of a vocabulary, shared by lookup and decode.

    Not callable on its own: wrap it in `EmbeddingLookup` or `EmbeddingDecode`.
    Keeping the parameter in one struct lets both directions share one
    initializer and, for tied embeddings, one parameter.

    Attributes:
      embeddings: The parameter: a named array with the vocabulary axis plus
        the embedding axes (usually one, e.g. ``"embedding"``).
      vocabulary_axis: Name of the axis indexed by token ids.
    """

    embeddings: parameters.ParameterLike[named_axes.NamedArray]
    vocabulary_axis: str = dataclasses.field(metadata={"pytree_node": False})

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        vocab_size: int,
        embedding_axes: dict[str, int],
        vocabulary_axis: str = "vocabulary",
        initializer: linear_and_affine.LinearOperatorWeightInitializer = (
            _DEFAULT_EMBEDDING_INITIALIZER
        ),
        dtype: np.typing.DTypeLike = np.float32,
    ) -> EmbeddingTable:
        """Builds a table with a freshly initialized embedding parameter.

        Args:
          name: Prefix of the parameter label (``{name}.embeddings``).
          init_base_rng: Base PRNG key, or None to leave a parameter slot.
          vocab_size: Number of tokens.
          embedding_axes: Names and sizes of the embedding axes.
          vocabulary_axis: Name of the token axis; must not be one of the
            embedding axes.
          initializer: Weight initializer. It sees the embedding axes as
            output axes, no input axes, and the vocabulary axis as a parallel
            axis, so the default (fan-out variance scaling) gives every
            embedding vector unit expected squared norm per axis element.
          dtype: Dtype of the parameter.

        Returns:
          A new ``EmbeddingTable``.

        Raises:
          ValueError: If ``vocabulary_axis`` is also an embedding axis.
        """
        if vocabulary_axis in embedding_axes:
            raise ValueError(
                f"EmbeddingTable: the vocabulary axis {vocabulary_axis!r} must not"
                f" also be an embedding axis, but embedding_axes is {embedding_axes}."
            )
        return cls(
            embeddings=parameters.make_parameter(
                f"{name}.embeddings",
                init_base_rng,
                initializer,
                input_axes={},
                output_axes=embedding_axes,
                parallel_axes={vocabulary_axis: vocab_size},
                convolution_spatial_axes={},
                dtype=dtype,
            ),
            vocabulary_axis=vocabulary_axis,
        )


@struct.pytree_dataclass
class EmbeddingLookup(layer_base.Layer):
    """Maps token ids to their embedding vectors.

    No rescaling is applied; add a `ConstantRescale` after it if the model
    multiplies embeddings by ``sqrt(d)``.

    Attributes:
      table: The table to look ids up in.
    """

    table: EmbeddingTable

    def __call__(
        self, token_index: named_axes.NamedArray, **_unused_side_inputs
    ) -> named_axes.NamedArray:
        """Looks up each token id.

        Args:
          token_index: Integer named array of token ids (any batch/sequence
            axes, none shared with the table).
          **_unused_side_inputs: Ignored.

        Returns:
          The embeddings, with the axes of ``token_index`` plus the embedding
          axes of the table.

        Raises:
          ValueError: If ``token_index`` has positional axes or shares an axis
            name with the table.
        """
        table = self.table.embeddings.value
        vocabulary_axis = self.table.vocabulary_axis
        if token_index.positional_shape:
            raise ValueError(
                "EmbeddingLookup expects token ids with only named axes, but got"
                f" positional shape {token_index.positional_shape}."
            )
        shared = [name for name in token_index.named_shape if name in table.named_shape]
        if shared:
            raise ValueError(
                f"EmbeddingLookup: token ids have axis {shared[0]!r} (size"
                f" {token_index.named_shape[shared[0]]}), which is also an axis of the"
                f" embedding table (named_shape {dict(table.named_shape)}). Token id"
                " axes must be disjoint from the table's axes."
            )
        # Plain indexing (not ``jnp.take``) so out-of-range ids clamp like any
        # JAX gather instead of producing NaN embeddings.
        return named_axes.nmap(lambda rows, index: rows[index])(
            table.untag(vocabulary_axis), token_index
        )


@struct.pytree_dataclass
class EmbeddingDecode(layer_base.Layer):
    """Maps embedding vectors to one logit per token, with the table's weights.

    The logit of token ``t`` is the dot product of the input with the embedding
    of ``t``; with the same table as the model's `EmbeddingLookup` this gives
    tied input/output embeddings.

    Attributes:
      table: The table whose embeddings are contracted with the input.
    """

    table: EmbeddingTable

    def __call__(
        self, out_embeddings: named_axes.NamedArray, **_unused_side_inputs
    ) -> named_axes.NamedArray:
        """Scores every vocabulary entry.

        Args:
          out_embeddings: Named array with every embedding axis of the table
            (same sizes) plus any batch axes.
          **_unused_side_inputs: Ignored.

        Returns:
          Logits with the batch axes of the input plus the vocabulary axis.

        Raises:
          ValueError: If an embedding axis is missing or has the wrong size.
        """
        table = self.table.embeddings.value
        contracting_axes = [
            name for name in table.named_shape if name != self.table.vocabulary_axis
        ]
        for name in contracting_axes:
            expected = table.named_shape[name]
            got = out_embeddings.named_shape.get(name)
            if got != expected:
                problem = "is missing" if got is None else f"has size {got}"
                raise ValueError(
                    f"EmbeddingDecode contracts over embedding axis {name!r} of size"
                    f" {expected}, but in its input that axis {problem}; input"
                    f" named_shape is {dict(out_embeddings.named_shape)}."
                )
        return linear_and_affine.contract(contracting_axes, out_embeddings, table)


def _rotate_pairs(
    vector: jax.Array, position: jax.Array, max_wavelength: float, rotated_size: int
) -> jax.Array:
    """Applies RoPE to the first ``rotated_size`` entries of a 1-D vector.

    Entry ``i`` of the first half is paired with entry ``i`` of the second half
    (the "rotate half" layout of GPT-NeoX/Llama/Gemma), and the pair is rotated
    by ``position / max_wavelength ** (2 i / rotated_size)`` radians. Entries
    past ``rotated_size`` pass through unchanged.
    """
    half = rotated_size // 2
    exponents = 2 * jnp.arange(half) / rotated_size
    angles = position / (max_wavelength**exponents)
    sin = jnp.sin(angles)
    cos = jnp.cos(angles)
    first = vector[:half]
    second = vector[half:rotated_size]
    return jnp.concatenate(
        [first * cos - second * sin, second * cos + first * sin, vector[rotated_size:]]
    )


def _apply_rope(
    layer_name: str,
    inputs: named_axes.NamedArray,
    positions: named_axes.NamedArray,
    embedding_axis: str,
    max_wavelength: float,
    rotated_size: int | None,
) -> named_axes.NamedArray:
    """Validates shapes, then rotates the (prefix of the) embedding axis."""
    if embedding_axis in positions.named_shape:
        raise ValueError(
            f"{layer_name}: the positions side input must not have the embedding"
            f" axis {embedding_axis!r}, but its named_shape is"
            f" {dict(positions.named_shape)}."
        )
    if positions.positional_shape:
        raise ValueError(
            f"{layer_name}: the positions side input must have only named axes, but"
            f" it has positional shape {positions.positional_shape}."
        )
    for name, size in positions.named_shape.items():
        if inputs.named_shape.get(name) != size:
            raise ValueError(
                f"{layer_name}: every axis of the positions must appear in the input"
                f" with the same size, but axis {name!r} has size {size} in the"
                f" positions and {inputs.named_shape.get(name)} in the input.\n"
                f"Positions named_shape: {dict(positions.named_shape)}\n"
                f"Input named_shape: {dict(inputs.named_shape)}"
            )
    if embedding_axis not in inputs.named_shape:
        raise ValueError(
            f"{layer_name} rotates along axis {embedding_axis!r}, which its input"
            f" lacks; input named_shape is {dict(inputs.named_shape)}."
        )
    embedding_size = inputs.named_shape[embedding_axis]
    if rotated_size is None:
        rotated_size = embedding_size
    if rotated_size > embedding_size or rotated_size % 2:
        raise ValueError(
            f"{layer_name} rotates pairs of entries, so the rotated part of axis"
            f" {embedding_axis!r} must have even size at most {embedding_size}, but"
            f" it has size {rotated_size}."
        )
    rotate = functools.partial(
        _rotate_pairs, max_wavelength=max_wavelength, rotated_size=rotated_size
    )
    rotated = named_axes.nmap(rotate)(inputs.untag(embedding_axis), positions)
    return rotated.tag(embedding_axis).astype(inputs.dtype)


@struct.pytree_dataclass
class ApplyRoPE(layer_base.Layer):
    """Rotary position embeddings (RoPE; Su et al. 2021, arXiv:2104.09864).

    Placed on the query and key paths of an attention layer, right before their
    dot product: it rotates pairs of embedding entries by angles proportional
    to the token position, so the dot product of a rotated query and key
    depends on their positions only through the difference.

    Attributes:
      embedding_axis: Axis of the vectors to rotate (e.g. ``"projection"``).
      max_wavelength: Longest rotation wavelength (10000 in most models).
      positions_input_name: Side input holding integer token positions, with
        a subset of the input's axes (never the embedding axis).
    """

    embedding_axis: str = dataclasses.field(metadata={"pytree_node": False})
    max_wavelength: float = dataclasses.field(metadata={"pytree_node": False})
    positions_input_name: str = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, inputs: named_axes.NamedArray, **side_inputs) -> named_axes.NamedArray:
        """Rotates ``inputs`` along the embedding axis by token position.

        Args:
          inputs: Query or key vectors, with the embedding axis (even size).
          **side_inputs: Must contain the positions under
            ``positions_input_name``.

        Returns:
          Rotated vectors, same named shape and dtype as ``inputs``.

        Raises:
          ValueError: If the positions or the embedding axis do not fit.
        """
        return _apply_rope(
            "ApplyRoPE",
            inputs,
            side_inputs[self.positions_input_name],
            self.embedding_axis,
            self.max_wavelength,
            rotated_size=None,
        )


@struct.pytree_dataclass
class ApplyRoPEToSubset(layer_base.Layer):
    """`ApplyRoPE` on only the first ``rope_subset_size`` embedding entries.

    For models (GPT-NeoX and relatives) that rotate a prefix of each head's
    vector and leave the rest position-independent.

    Attributes:
      embedding_axis: Axis of the vectors to rotate.
      max_wavelength: Longest rotation wavelength.
      rope_subset_size: Size of the rotated prefix (even); the suffix passes
        through unchanged.
      positions_input_name: Side input holding integer token positions.
    """

    embedding_axis: str = dataclasses.field(metadata={"pytree_node": False})
    max_wavelength: float = dataclasses.field(metadata={"pytree_node": False})
    rope_subset_size: int = dataclasses.field(metadata={"pytree_node": False})
    positions_input_name: str = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, inputs: named_axes.NamedArray, **side_inputs) -> named_axes.NamedArrayBase:
        """Rotates the prefix of the embedding axis by token position.

        Args:
          inputs: Query or key vectors, with the embedding axis.
          **side_inputs: Must contain the positions under
            ``positions_input_name``.

        Returns:
          Vectors of the same named shape and dtype, prefix rotated.

        Raises:
          ValueError: If the positions, the embedding axis or the subset size
            do not fit.
        """
        return _apply_rope(
            "ApplyRoPEToSubset",
            inputs,
            side_inputs[self.positions_input_name],
            self.embedding_axis,
            self.max_wavelength,
            rotated_size=self.rope_subset_size,
        )
