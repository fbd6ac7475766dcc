"""Attention dataflow combinators and attention masks.

`Attention` fixes only the *wiring* of an attention layer (input to queries,
keys and values; queries and keys to weights; weights and values to output)
and leaves every computation to sublayers. The same wiring then serves
multi-head, multi-query and grouped-query attention, and a trained `Attention`
can be turned into a `KVCachingAttention` for incremental decoding without
touching its sublayers: only the dataflow changes (keys and values are
written into a cache variable and read back from it).

The mask layers sit inside ``query_key_to_attn`` and replace masked logits by a
large finite negative value before the softmax. The causal masks build the mask
from token positions passed as side inputs, so padding (position -1) and
decoding offsets are handled by the positions alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp

from pz_flax.core import named_axes
from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.nn import layer as layer_base
from pz_flax.nn import layer_stack


@struct.pytree_dataclass
class ApplyExplicitAttentionMask(layer_base.Layer):
    """Masks attention logits with a boolean mask passed as a side input.

    Attributes:
      mask_input_name: Side input holding the mask: a boolean named array,
        True where attention is allowed, broadcastable against the logits.
      masked_out_value: Logit value written where the mask is False (a large
        but finite negative number, so that fully masked rows stay finite).
    """

    mask_input_name: str = dataclasses.field(metadata={"pytree_node": False})
    masked_out_value: jax.typing.ArrayLike

    def __call__(self, x: named_axes.NamedArray, **side_inputs: Any) -> named_axes.NamedArray:
        """Replaces disallowed logits.

        Args:
          x: Attention logits (query-key dot products).
          **side_inputs: Must contain the mask under ``mask_input_name``.

        Returns:
          ``x`` where the mask is True, ``masked_out_value`` elsewhere.
        """
        mask = side_inputs[self.mask_input_name]
        return named_axes.nmap(jnp.where)(mask, x, self.masked_out_value)


def _causal_mask_positions(
    mask: ApplyCausalAttentionMask | ApplyCausalSlidingWindowAttentionMask,
    layer_name: str,
    x: named_axes.NamedArray,
    side_inputs: dict[str, Any],
) -> tuple[named_axes.NamedArray, named_axes.NamedArray]:
    """Reads both position side inputs of a causal mask; key positions get the ``kv_seq`` name.

    Renaming the key axis is what turns two 1-D position vectors into a 2-D
    (query, key) comparison under named-axis broadcasting. The logits' key
    axis is checked against the key positions so that a mismatch is reported
    with the layer's name instead of as a broadcasting error.

    Args:
      mask: The mask layer, giving the side input and axis names.
      layer_name: Its class name, for error messages.
      x: The attention logits the mask will be applied to.
      side_inputs: The side inputs of the call.

    Returns:
      The query positions and the key positions (along ``mask.kv_seq_axis``).
    """
    seq_axis, kv_seq_axis = mask.seq_axis, mask.kv_seq_axis
    query_positions = side_inputs[mask.query_positions_input_name]
    kv_positions = side_inputs[mask.kv_positions_input_name]
    if seq_axis not in kv_positions.named_shape:
        raise ValueError(
            f"{layer_name}: the key/value positions side input"
            f" {mask.kv_positions_input_name!r} must have the sequence axis {seq_axis!r},"
            f" but its named_shape is {dict(kv_positions.named_shape)}."
        )
    kv_positions = kv_positions.untag(seq_axis).tag(kv_seq_axis)
    expected = kv_positions.named_shape[kv_seq_axis]
    got = x.named_shape.get(kv_seq_axis)
    if got != expected:
        problem = "is missing" if got is None else f"has size {got}"
        raise ValueError(
            f"{layer_name}: the key positions have {expected} entries along"
            f" {kv_seq_axis!r}, but in the attention logits that axis {problem};"
            f" logits named_shape is {dict(x.named_shape)}."
        )
    return query_positions, kv_positions


@struct.pytree_dataclass
class ApplyCausalAttentionMask(layer_base.Layer):
    """Masks attention logits so that each query sees only earlier keys.

    A query at position ``q`` may attend to a key at position ``k`` when
    ``q >= k`` and ``k >= 0`` (negative positions mark padding).

    Attributes:
      masked_out_value: Logit value written where attention is not allowed.
      query_positions_input_name: Side input with the query positions (an
        integer array with ``seq_axis``).
      kv_positions_input_name: Side input with the key/value positions (also
        with ``seq_axis``, renamed here to ``kv_seq_axis``). Differs from the
        query positions during cached decoding.
      seq_axis: Sequence axis name in the position side inputs.
      kv_seq_axis: Key axis name in the logits.
    """

    masked_out_value: jax.typing.ArrayLike
    query_positions_input_name: str = dataclasses.field(
        default="token_positions", metadata={"pytree_node": False}
    )
    kv_positions_input_name: str = dataclasses.field(
        default="token_positions", metadata={"pytree_node": False}
    )
    seq_axis: str = dataclasses.field(default="seq", metadata={"pytree_node": False})
    kv_seq_axis: str = dataclasses.field(default="kv_seq", metadata={"pytree_node": False})

    def __call__(self, x: named_axes.NamedArray, **side_inputs: Any) -> named_axes.NamedArray:
        """Applies the causal mask.

        Args:
          x: Attention logits with the ``seq_axis`` and ``kv_seq_axis`` axes.
          **side_inputs: Must contain both position side inputs.

        Returns:
          The masked logits.
        """
        query_positions, kv_positions = _causal_mask_positions(
            self, "ApplyCausalAttentionMask", x, side_inputs
        )
        allowed = (query_positions >= kv_positions) & (kv_positions >= 0)
        return named_axes.nmap(jnp.where)(allowed, x, self.masked_out_value)


@struct.pytree_dataclass
class ApplyCausalSlidingWindowAttentionMask(layer_base.Layer):
    """Causal mask restricted to the last ``sliding_window_size`` positions.

    A query at ``q`` may attend to a key at ``k`` when ``0 <= k <= q`` and
    ``q - k < sliding_window_size`` (local attention, as in Mistral/Gemma 2).

    Attributes:
      masked_out_value: Logit value written where attention is not allowed.
      sliding_window_size: Number of positions (including the query's own)
        each query can see.
      query_positions_input_name: Side input with the query positions.
      kv_positions_input_name: Side input with the key/value positions.
      seq_axis: Sequence axis name in the position side inputs.
      kv_seq_axis: Key axis name in the logits.
    """

    masked_out_value: jax.typing.ArrayLike
    sliding_window_size: int | jax.typing.ArrayLike
    query_positions_input_name: str = dataclasses.field(
        default="token_positions", metadata={"pytree_node": False}
    )
    kv_positions_input_name: str = dataclasses.field(
        default="token_positions", metadata={"pytree_node": False}
    )
    seq_axis: str = dataclasses.field(default="seq", metadata={"pytree_node": False})
    kv_seq_axis: str = dataclasses.field(default="kv_seq", metadata={"pytree_node": False})

    def __call__(self, x: named_axes.NamedArray, **side_inputs: Any) -> named_axes.NamedArray:
        """Applies the sliding-window causal mask.

        Args:
          x: Attention logits with the ``seq_axis`` and ``kv_seq_axis`` axes.
          **side_inputs: Must contain both position side inputs.

        Returns:
          The masked logits.
        """
        query_positions, kv_positions = _causal_mask_positions(
            self, "ApplyCausalSlidingWindowAttentionMask", x, side_inputs
        )
        allowed = (
            (query_positions >= kv_positions)
            & (query_positions - kv_positions < self.sliding_window_size)
            & (kv_positions >= 0)
        )
        return named_axes.nmap(jnp.where)(allowed, x, self.masked_out_value)


@struct.pytree_dataclass
class Attention(layer_base.Layer):
    """The dataflow of an attention layer, with every computation a sublayer.

    ``input_to_query``, ``input_to_key`` and ``input_to_value`` all see the
    same input; ``query_key_to_attn`` gets the tuple ``(query, key)`` and
    usually computes dot products, masks and softmaxes them;
    ``attn_value_to_output`` gets ``(attn, value)`` and usually mixes the values
    and projects back to the residual stream. All sublayers see all side
    inputs.

    Attributes:
      input_to_query: Input to queries.
      input_to_key: Input to keys.
      input_to_value: Input to values.
      query_key_to_attn: ``(query, key)`` to attention weights.
      attn_value_to_output: ``(attn, value)`` to the layer output.
    """

    input_to_query: layer_base.Layer
    input_to_key: layer_base.Layer
    input_to_value: layer_base.Layer
    query_key_to_attn: layer_base.Layer
    attn_value_to_output: layer_base.Layer

    def __call__(self, x: named_axes.NamedArray, **side_inputs: Any) -> named_axes.NamedArray:
        """Runs the five sublayers in attention order.

        Args:
          x: The input from which queries, keys and values are computed.
          **side_inputs: Forwarded to every sublayer.

        Returns:
          The output of ``attn_value_to_output``.
        """
        query = self.input_to_query(x, **side_inputs)
        key = self.input_to_key(x, **side_inputs)
        value = self.input_to_value(x, **side_inputs)
        attn = self.query_key_to_attn((query, key), **side_inputs)
        return self.attn_value_to_output((attn, value), **side_inputs)

    def treescope_color(self) -> str:
        return "oklch(0.785 0.103 38.5 / 1.0)"


@struct.pytree_dataclass
class KVCachingAttention(layer_base.Layer):
    """`Attention` that appends its keys and values to a cache as it runs.

    Each call computes queries, keys and values for the new tokens only,
    writes the keys and values into the cache at index
    ``side_inputs[kv_cache_end_index_key]`` along ``sequence_axis``, and then
    attends from the new queries to the *whole* cache. Cache slots not yet
    written hold zeros; the attention mask (fed key positions of -1 for them)
    must hide them. Build one with `KVCachingAttention.from_uncached`.

    Attributes:
      input_to_query: As in `Attention`.
      input_to_key: As in `Attention`; its output is also written to the cache.
      input_to_value: As in `Attention`; its output is also written to the
        cache.
      query_key_to_attn: As in `Attention`, but it receives the full key cache.
      attn_value_to_output: As in `Attention`, but it receives the full value
        cache.
      sequence_axis: Axis of the key/value arrays along which tokens are
        cached.
      kv_cache_end_index_key: Side input name of the number of cache entries
        already filled (a scalar integer).
      kv_cache: State variable holding ``(key_cache, value_cache)``, updated in
        place by each call.
    """

    input_to_query: layer_base.Layer
    input_to_key: layer_base.Layer
    input_to_value: layer_base.Layer
    query_key_to_attn: layer_base.Layer
    attn_value_to_output: layer_base.Layer

    sequence_axis: str = dataclasses.field(metadata={"pytree_node": False})
    kv_cache_end_index_key: Hashable = dataclasses.field(metadata={"pytree_node": False})
    kv_cache: variables.StateVariable[tuple[named_axes.NamedArray, named_axes.NamedArray]]

    def _write_to_cache(
        self,
        cache: named_axes.NamedArray,
        update: named_axes.NamedArray,
        end_index: jax.Array,
        which: str,
    ) -> named_axes.NamedArray:
        """Writes ``update`` into ``cache`` at ``end_index`` along the sequence axis.

        Checks the shapes first because ``dynamic_update_slice`` would otherwise
        fail (or broadcast) with an error that names neither the layer nor the
        axis.
        """
        cache_shape = dict(cache.named_shape)
        update_shape = dict(update.named_shape)
        if self.sequence_axis not in update_shape:
            raise ValueError(
                f"KVCachingAttention caches along {self.sequence_axis!r}, but the new"
                f" {which} lack that axis; {which} named_shape is {update_shape}."
            )
        for name in set(cache_shape) | set(update_shape):
            if name == self.sequence_axis:
                continue
            if cache_shape.get(name) != update_shape.get(name):
                raise ValueError(
                    f"KVCachingAttention: axis {name!r} has size"
                    f" {update_shape.get(name)} in the new {which} but"
                    f" {cache_shape.get(name)} in the {which} cache (None means"
                    f" absent). New {which} named_shape: {update_shape}; cache"
                    f" named_shape: {cache_shape}."
                )
        if update_shape[self.sequence_axis] > cache_shape[self.sequence_axis]:
            raise ValueError(
                f"KVCachingAttention: {update_shape[self.sequence_axis]} new entries"
                f" along {self.sequence_axis!r} do not fit in a cache of length"
                f" {cache_shape[self.sequence_axis]}."
            )
        if update.dtype != cache.dtype:
            raise TypeError(
                f"KVCachingAttention: the new {which} have dtype {update.dtype} but the"
                f" {which} cache has dtype {cache.dtype}; build the cache with"
                " a matching cache_dtype."
            )
        return named_axes.nmap(jax.lax.dynamic_update_slice)(
            cache.untag(self.sequence_axis),
            update.untag(self.sequence_axis),
            (end_index,),
        ).tag(self.sequence_axis)

    def __call__(self, x: named_axes.NamedArray, **side_inputs: Any) -> named_axes.NamedArray:
        """Runs attention for new tokens against the updated key/value cache.

        Args:
          x: Input for the new tokens (with ``sequence_axis`` of the new
            tokens' length).
          **side_inputs: Forwarded to every sublayer; must contain the cache
            end index under ``kv_cache_end_index_key``.

        Returns:
          The output of ``attn_value_to_output`` for the new tokens.
        """
        end_index = side_inputs[self.kv_cache_end_index_key]
        key_cache, value_cache = self.kv_cache.value

        query = self.input_to_query(x, **side_inputs)
        key = self.input_to_key(x, **side_inputs)
        value = self.input_to_value(x, **side_inputs)

        new_key_cache = self._write_to_cache(key_cache, key, end_index, "keys")
        new_value_cache = self._write_to_cache(value_cache, value, end_index, "values")
        self.kv_cache.value = (new_key_cache, new_value_cache)

        attn = self.query_key_to_attn((query, new_key_cache), **side_inputs)
        return self.attn_value_to_output((attn, new_value_cache), **side_inputs)

    @classmethod
    def from_uncached(
        cls,
        original: Attention,
        sequence_axis: str,
        cache_len: int,
        cached_axes: dict[str, int],
        cache_end_index_key: Hashable,
        cache_dtype: jax.typing.DTypeLike = jnp.float32,
        cache_label: variables.VariableLabel | None = None,
        layerstack_axes: dict[named_axes.AxisName, int] | None = None,
    ) -> KVCachingAttention:
        """Wraps the sublayers of an `Attention` with an empty key/value cache.

        Args:
          original: The attention layer to convert; its sublayers are reused
            as they are.
          sequence_axis: Axis of the keys and values to cache along.
          cache_len: Cache length (maximum number of cached tokens).
          cached_axes: Names and sizes of the other axes of the keys and values
            (batch, heads, projection, ...), used to allocate the cache.
          cache_end_index_key: Side input name of the cache fill index.
          cache_dtype: Dtype of the cache (should match keys and values).
          cache_label: Label of the cache variable (None picks an automatic
            one).
          layerstack_axes: Stack axes of any enclosing `LayerStack` (see
            `layerstack_axes_from_keypath`): the cache gets one slice per
            stacked layer and is marked ``PER_LAYER`` for those axes.

        Returns:
          A ``KVCachingAttention`` with a zero-filled cache.
        """
        layerstack_axes = dict(layerstack_axes or {})
        cache_metadata = {}
        if layerstack_axes:
            cache_metadata = {
                "layerstack_axes": dict.fromkeys(
                    layerstack_axes, layer_stack.LayerStackVarBehavior.PER_LAYER
                )
            }
        empty_cache = named_axes.zeros(
            {**cached_axes, **layerstack_axes, sequence_axis: cache_len}, dtype=cache_dtype
        )
        return cls(
            input_to_query=original.input_to_query,
            input_to_key=original.input_to_key,
            input_to_value=original.input_to_value,
            query_key_to_attn=original.query_key_to_attn,
            attn_value_to_output=original.attn_value_to_output,
            sequence_axis=sequence_axis,
            kv_cache_end_index_key=cache_end_index_key,
            kv_cache=variables.StateVariable(
                value=(empty_cache, empty_cache),
                label=cache_label,
                metadata=cache_metadata,
            ),
        )
