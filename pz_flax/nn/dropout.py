"""Dropout as a layer that draws its randomness from a side input.

A dropout layer has no "training" flag. It is always stochastic, and turning
dropout off is a model edit rather than a call argument: select the
`StochasticDropout` layers and either remove them or call ``.disable()`` on
them, which swaps in a `DisabledDropout` that remembers the configuration so
that ``.enable()`` can restore it. This keeps the forward pass free of mode
switches and makes "which dropouts are active" visible in the model tree.

Randomness comes from a random stream (anything with a ``next_key()`` method,
usually `pz_flax.core.random_stream.RandomStream`) passed as a side input, so a
whole model shares one stream and each dropout draws a fresh key from it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pz_flax.core import named_axes
from pz_flax.core import struct
from pz_flax.nn import grouping
from pz_flax.nn import layer as layer_base


@struct.pytree_dataclass
class StochasticDropout(layer_base.Layer):
    """Zeroes each element with probability ``drop_rate``, rescaling the rest.

    Surviving elements are divided by ``1 - drop_rate`` so that the expected
    value of every element is unchanged, which lets the same weights be used
    with dropout disabled at inference time.

    A fresh mask element is drawn for every position along every axis, except
    the axes listed in ``share_across_axes``, along which one mask is
    broadcast (dropping whole slices, e.g. whole feature maps or whole tokens).

    Attributes:
      drop_rate: Probability of zeroing an element, in ``[0, 1)``.
      share_across_axes: Names of axes along which the mask is shared.
      random_stream_input_name: Name of the side input holding the random
        stream to draw mask keys from.
    """

    drop_rate: float
    share_across_axes: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"pytree_node": False}
    )
    random_stream_input_name: str = dataclasses.field(
        default="random_stream", metadata={"pytree_node": False}
    )

    def __call__(self, value: named_axes.NamedArray, /, **side_inputs) -> named_axes.NamedArray:
        """Applies a freshly sampled dropout mask to ``value``.

        Args:
          value: A named array. The mask is laid out over its named axes and
            broadcast over any positional ones.
          **side_inputs: Must contain the random stream under
            ``random_stream_input_name``.

        Returns:
          ``value`` with dropped elements set to zero and the rest rescaled.

        Raises:
          KeyError: If the random stream side input is missing.
        """
        if self.random_stream_input_name not in side_inputs:
            raise KeyError(
                f"StochasticDropout needs a random stream side input named"
                f" {self.random_stream_input_name!r}, but only got side inputs"
                f" {sorted(map(str, side_inputs))}. Pass one (e.g."
                f" {self.random_stream_input_name}=pz.RandomStream.from_base_key(key))"
                " or disable dropout."
            )
        stream = side_inputs[self.random_stream_input_name]
        mask_axes = {
            name: size
            for name, size in value.named_shape.items()
            if name not in self.share_across_axes
        }
        dropped = named_axes.wrap(
            jax.random.bernoulli(
                stream.next_key(), p=self.drop_rate, shape=tuple(mask_axes.values())
            ),
            *mask_axes.keys(),
        )
        keep_scale = 1 - self.drop_rate
        return named_axes.nmap(jnp.where)(dropped, 0, value / keep_scale)

    def disable(self) -> DisabledDropout:
        """Returns a no-op `DisabledDropout` that remembers this configuration."""
        return DisabledDropout(
            drop_rate=self.drop_rate,
            share_across_axes=tuple(self.share_across_axes),
            random_stream_input_name=self.random_stream_input_name,
        )


@struct.pytree_dataclass
class DisabledDropout(grouping.Identity):
    """An identity layer standing where a `StochasticDropout` was (or could be).

    It marks the place in the model and keeps the dropout configuration, so
    that ``.enable()`` rebuilds the stochastic layer exactly.

    Attributes:
      drop_rate: Drop rate the enabled layer will use.
      share_across_axes: Shared mask axes the enabled layer will use.
      random_stream_input_name: Side input name the enabled layer will read.
    """

    drop_rate: float
    share_across_axes: tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})
    random_stream_input_name: str = dataclasses.field(
        default="random_stream", metadata={"pytree_node": False}
    )

    def enable(self) -> StochasticDropout:
        """Returns the `StochasticDropout` layer with this configuration."""
        return StochasticDropout(
            drop_rate=self.drop_rate,
            share_across_axes=self.share_across_axes,
            random_stream_input_name=self.random_stream_input_name,
        )


def maybe_dropout(
    drop_rate: float | None,
    share_across_axes: tuple[str, ...] = (),
    random_stream_input_name: str = "random_stream",
) -> StochasticDropout | DisabledDropout:
    """Builds a dropout layer, or a disabled placeholder when the rate is None.

    Convenient in model builders whose config may leave dropout unset: the
    placeholder keeps the model's structure the same either way.

    Args:
      drop_rate: Drop probability, or None for no dropout.
      share_across_axes: Axes along which the mask is shared.
      random_stream_input_name: Side input name of the random stream.

    Returns:
      A `StochasticDropout` for a numeric rate, else a `DisabledDropout` with
      rate 0.
    """
    if drop_rate is None:
        return DisabledDropout(
            drop_rate=0.0,
            share_across_axes=share_across_axes,
            random_stream_input_name=random_stream_input_name,
        )
    return StochasticDropout(
        drop_rate=drop_rate,
        share_across_axes=share_across_axes,
        random_stream_input_name=random_stream_input_name,
    )
