"""Key/value-cached decoding mode for `TransformerLM` models.

Decoding one token at a time with the training model would recompute the keys
and values of the whole prefix at every step. `KVCachingTransformerLM` reuses
the trained layers unchanged but swaps each `Attention` for a
`KVCachingAttention` that remembers keys and values, and keeps track of how
many tokens have been processed, so that each call only runs the new tokens.

Conventions (besides those of `model_parts`): the side input
``"kv_token_positions"`` gives the position of every cache slot (-1 for empty
or padding slots) and ``"cache_end_index"`` the number of filled slots before
the current call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pz_flax.core import named_axes
from pz_flax.core import selectors
from pz_flax.core import shapecheck
from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.models.transformer import model_parts
from pz_flax.nn import attention
from pz_flax.nn import layer as layer_base
from pz_flax.nn import layer_stack

_CAUSAL_MASKS = (
    attention.ApplyCausalAttentionMask,
    attention.ApplyCausalSlidingWindowAttentionMask,
)


@struct.pytree_dataclass
class KVCachingTransformerLM(layer_base.Layer):
    """A transformer in stateful, cached, incremental decoding mode.

    Each call takes the next few tokens of every sequence in the batch, runs
    them against the cached keys and values of all earlier tokens, appends
    their own keys and values to the caches, and returns their logits. Token
    positions are derived from the tokens seen so far, skipping padding.

    Build it from a trained model with `KVCachingTransformerLM.from_uncached`;
    the parameters are shared with the original model, not copied.

    Attributes:
      body: The model body with caching attention layers.
      cache_end_index: State variable: number of tokens processed so far.
      previous_tokens: State variable: every token processed so far, with
        ``"seq"`` of length ``cache_len`` (unfilled slots hold ``pad_id``).
      metadata: Sizes and dtypes of the model.
      cache_len: Maximum number of tokens the caches hold.
      batch_axes: Names and sizes of the batch axes of the caches; every
        call's tokens must have exactly these axes plus ``"seq"``.
      pad_id: Token id of padding, which gets position -1 and is never
        attended to.
    """

    body: layer_base.Layer
    cache_end_index: variables.StateVariable[int]
    previous_tokens: variables.StateVariable[named_axes.NamedArray]
    metadata: model_parts.TransformerMetadata = dataclasses.field(metadata={"pytree_node": False})
    cache_len: int = dataclasses.field(metadata={"pytree_node": False})
    batch_axes: dict[str, int] = dataclasses.field(metadata={"pytree_node": False})
    pad_id: int = dataclasses.field(metadata={"pytree_node": False})

    def _check_tokens(self, tokens: named_axes.NamedArray) -> None:
        shapecheck.check_structure(
            tokens,
            shapecheck.ArraySpec(named_shape={**self.batch_axes, "seq": shapecheck.var("S")}),
            error_prefix="KVCachingTransformerLM token ids: ",
        )
        seq_len = tokens.named_shape["seq"]
        if seq_len > self.cache_len:
            raise ValueError(
                f"KVCachingTransformerLM: {seq_len} tokens along 'seq' do not fit in a"
                f" cache of length {self.cache_len}."
            )

    def __call__(
        self, tokens: named_axes.NamedArray, **extra_side_inputs: Any
    ) -> named_axes.NamedArray:
        """Processes the next tokens and appends them to the caches.

        Args:
          tokens: Integer token ids with axes ``batch_axes`` plus ``"seq"``.
            Padding tokens are skipped (they get no position and are never
            attended to).
          **extra_side_inputs: Forwarded to ``body``; the position and cache
            side inputs are supplied here.

        Returns:
          Logits for the new tokens, with axes ``batch_axes``, ``"seq"`` and
          ``"vocabulary"``.

        Raises:
          StructureMismatchError: If the tokens' axes are not ``batch_axes``
            plus ``"seq"``.
          ValueError: If there are more tokens than the cache length.
        """
        self._check_tokens(tokens)
        start = self.cache_end_index.value
        num_new = tokens.named_shape["seq"]
        all_tokens = named_axes.nmap(jax.lax.dynamic_update_slice)(
            self.previous_tokens.value.untag("seq"), tokens.untag("seq"), (start,)
        ).tag("seq")
        # A token's position counts the real (non-padding) tokens before it, so
        # left-padded prompts get the same positions as unpadded ones.
        is_real = all_tokens != self.pad_id
        real_so_far = named_axes.nmap(jnp.cumsum)(is_real.untag("seq"), dtype=jnp.int32).tag("seq")
        kv_positions = named_axes.nmap(jnp.where)(is_real, real_so_far - 1, -1)
        query_positions = named_axes.nmap(jax.lax.dynamic_slice)(
            kv_positions.untag("seq"), (start,), (num_new,)
        ).tag("seq")

        logits = self.body(
            tokens,
            token_positions=query_positions,
            kv_token_positions=kv_positions,
            cache_end_index=start,
            **extra_side_inputs,
        )
        self.previous_tokens.value = all_tokens
        self.cache_end_index.value = start + num_new
        return logits

    @classmethod
    def from_uncached(
        cls,
        uncached: model_parts.TransformerLM,
        cache_len: int,
        batch_axes: dict[str, int],
        pad_id: int = 0,
        variable_name_prefix: str = "sampler",
    ) -> KVCachingTransformerLM:
        """Rewires a trained `TransformerLM` for cached decoding.

        Every `Attention` in ``uncached.body`` (including those inside a
        `LayerStack`, which get one cache per stacked layer) becomes a
        `KVCachingAttention`, and its causal masks read key positions from
        ``"kv_token_positions"``. All other layers, and all parameters, are
        shared with ``uncached``.

        Args:
          uncached: The model to convert.
          cache_len: Maximum number of tokens (prompt plus generated) per
            sequence.
          batch_axes: Names and sizes of the batch axes used while decoding.
          pad_id: Padding token id.
          variable_name_prefix: Prefix of the labels of the new state
            variables.

        Returns:
          The caching model, with empty caches.

        Raises:
          ValueError: If a causal mask reads key positions from a side input
            other than the default ``"token_positions"`` (it cannot be
            rewired automatically).
        """

        def read_cached_positions(mask):
            if mask.kv_positions_input_name != "token_positions":
                raise ValueError(
                    "KVCachingTransformerLM.from_uncached can only rewire causal masks that"
                    " read key positions from 'token_positions', but found"
                    f" {type(mask).__name__} reading {mask.kv_positions_input_name!r}."
                )
            return dataclasses.replace(mask, kv_positions_input_name="kv_token_positions")

        cached_axes = {
            **batch_axes,
            **uncached.metadata.common_head_axes,
            "projection": uncached.metadata.projection_dim,
        }
        attention_layers = selectors.select(uncached.body).at_instances_of(attention.Attention)
        caching_layers = {}
        for index, (keypath, layer) in enumerate(attention_layers.selected_by_path.items()):
            rewired = (
                selectors.select(layer).at_instances_of(_CAUSAL_MASKS).apply(read_cached_positions)
            )
            caching_layers[keypath] = attention.KVCachingAttention.from_uncached(
                rewired,
                sequence_axis="seq",
                cache_len=cache_len,
                cached_axes=cached_axes,
                cache_end_index_key="cache_end_index",
                cache_dtype=uncached.metadata.activation_dtype,
                cache_label=f"{variable_name_prefix}/cache_{index}",
                layerstack_axes=layer_stack.layerstack_axes_from_keypath(keypath),
            )
        return cls(
            body=attention_layers.set_by_path(caching_layers),
            cache_end_index=variables.StateVariable(
                value=0, label=f"{variable_name_prefix}/cache_end_index"
            ),
            previous_tokens=variables.StateVariable(
                value=named_axes.full({**batch_axes, "seq": cache_len}, pad_id, jnp.int32),
                label=f"{variable_name_prefix}/previous_tokens",
            ),
            metadata=uncached.metadata,
            cache_len=cache_len,
            batch_axes=dict(batch_axes),
            pad_id=pad_id,
        )
