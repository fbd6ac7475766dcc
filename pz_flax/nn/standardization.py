"""Normalization layers that act over named axes.

Normalization is written once per *set of axis names* rather than once per
positional layout: the axes to normalize over are named, every other axis of
the input is vectorized over automatically. This is what lets the same
``LayerNorm`` serve a ``{"batch", "seq", "embedding"}`` activation during
training and a ``{"seq", "embedding"}`` one during decoding.

The stateless parts (`Standardize`, `RMSStandardize`) are split from the
learned parts (a scale `Linear` and, for `LayerNorm`, an `AddBias`) so that a
user can select and patch either one on its own, e.g. freeze the scales or
swap the statistic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from pz_flax.core import named_axes
from pz_flax.core import struct
from pz_flax.nn import grouping
from pz_flax.nn import layer as layer_base
from pz_flax.nn import linear_and_affine

NamedArray = named_axes.NamedArray


def _as_axis_tuple(across: str | tuple[str, ...]) -> tuple[str, ...]:
    """Accepts either a single axis name or a tuple of them."""
    return (across,) if isinstance(across, str) else tuple(across)


def _normalize_over_axes(
    layer_name: str,
    across: str | tuple[str, ...],
    value: NamedArray,
    normalize_block: Callable[[jax.Array], jax.Array],
) -> NamedArray:
    """Applies ``normalize_block`` to every block of ``value`` spanned by the ``across`` axes.

    The ``across`` axes become the positional axes of each block and every other axis is
    vectorized over. The input is checked first so that a missing axis or a stray positional
    axis is reported with the layer's name, rather than as a generic ``untag`` error that
    does not say which layer was being applied.

    Args:
      layer_name: Name of the calling layer, for error messages.
      across: The axis name, or tuple of axis names, spanning one block.
      value: The input; it must have only named axes, including all of ``across``.
      normalize_block: Maps one block to a normalized block of the same shape.

    Returns:
      The normalized array, with the same named shape as ``value``.
    """
    axis_names = _as_axis_tuple(across)
    named_shape = dict(value.named_shape)
    missing = [name for name in axis_names if name not in named_shape]
    if missing:
        raise ValueError(
            f"{layer_name} normalizes across axes {axis_names}, but the input is"
            f" missing axis {missing[0]!r} (all missing: {missing}); input"
            f" named_shape is {named_shape}."
        )
    if value.positional_shape:
        raise ValueError(
            f"{layer_name} expects an input with only named axes, but got"
            f" positional axes of shape {value.positional_shape} (named_shape"
            f" {named_shape}). Tag them before normalizing."
        )
    return named_axes.nmap(normalize_block)(value.untag(*axis_names)).tag(*axis_names)


@struct.pytree_dataclass
class Standardize(layer_base.Layer):
    """Shifts and scales an input to zero mean and unit variance over some axes.

    Mean and variance are computed jointly over *all* the axes in ``across``
    (so ``across=("heads", "projection")`` standardizes each head-projection
    block as one population), independently for every other axis of the input.
    No parameters are learned here; see `LayerNorm` for the learned version.

    Attributes:
      across: Axis name, or tuple of axis names, whose elements form one
        population for the mean and variance.
      epsilon: Added to the variance before the inverse square root, so that a
        constant input does not divide by zero.
    """

    across: str | tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})
    epsilon: float | jax.Array = 1e-6

    def __call__(self, value: NamedArray, **_unused_side_inputs) -> NamedArray:
        """Standardizes ``value`` over the ``across`` axes.

        Args:
          value: A named array containing every axis in ``across``.
          **_unused_side_inputs: Ignored.

        Returns:
          An array with the same named shape as ``value``.
        """
        epsilon = self.epsilon

        def standardize_block(block):
            centered = block - jnp.mean(block)
            variance = jnp.mean(jnp.square(centered))
            return centered * jax.lax.rsqrt(variance + epsilon)

        return _normalize_over_axes("Standardize", self.across, value, standardize_block)


@struct.pytree_dataclass
class RMSStandardize(layer_base.Layer):
    """Divides an input by its root-mean-square over some axes (no centering).

    This is the statistic of RMSNorm (Zhang & Sennrich, 2019,
    https://arxiv.org/abs/1910.07467): cheaper than `Standardize` because it
    skips the mean, and the usual choice in modern decoder-only transformers.
    The learned scale lives in `RMSLayerNorm`.

    Attributes:
      across: Axis name, or tuple of axis names, over which the mean square is
        taken.
      epsilon: Added to the mean square before the inverse square root.
    """

    across: str | tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})
    epsilon: float | jax.Array = 1e-6

    def __call__(self, value: NamedArray, **_unused_side_inputs) -> NamedArray:
        """Rescales ``value`` to unit root-mean-square over the ``across`` axes.

        Args:
          value: A named array containing every axis in ``across``.
          **_unused_side_inputs: Ignored.

        Returns:
          An array with the same named shape as ``value``.
        """
        epsilon = self.epsilon

        def rms_standardize_block(block):
            mean_square = jnp.mean(jnp.square(block))
            return block * jax.lax.rsqrt(mean_square + epsilon)

        return _normalize_over_axes("RMSStandardize", self.across, value, rms_standardize_block)


def _learned_scale(
    name: str,
    init_base_rng: jax.Array | None,
    across_axes: Mapping[str, int],
    dtype: jax.typing.DTypeLike,
) -> linear_and_affine.Linear:
    """A per-feature learned scale, initialized to one.

    Expressed as a `Linear` with only parallel axes (an elementwise product), so
    that tools that understand `Linear` weights (sharding, conversion) also
    understand normalization scales.
    """
    return linear_and_affine.Linear.from_config(
        name=f"{name}/scale",
        init_base_rng=init_base_rng,
        input_axes={},
        output_axes={},
        parallel_axes=dict(across_axes),
        initializer=linear_and_affine.constant_initializer(1.0),
        dtype=dtype,
    )


@struct.pytree_dataclass
class LayerNorm(grouping.Sequential):
    """Layer normalization: `Standardize`, then a learned scale and shift.

    A `Sequential` of three sublayers (``Standardize``, a parallel-axes
    ``Linear`` for the scale, ``AddBias`` for the shift), so each piece can be
    selected and replaced on its own. Build it with `LayerNorm.from_config`.

    Attributes:
      sublayers: The three sublayers, applied in order.
    """

    sublayers: list[layer_base.Layer]

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        across_axes: dict[str, int],
        epsilon: float | jax.Array = 1e-6,
        dtype: jax.typing.DTypeLike = jnp.float32,
    ) -> LayerNorm:
        """Builds a layer normalization over ``across_axes``.

        Args:
          name: Prefix for the parameter labels (``{name}/scale.weights`` and
            ``{name}/shift.bias``).
          init_base_rng: Base PRNG key for the parameters, or None to leave
            parameter slots to be bound later.
          across_axes: Names and sizes of the axes to normalize over; the
            scale and shift have exactly these axes.
          epsilon: Passed on to `Standardize`.
          dtype: Dtype of the scale and shift parameters.

        Returns:
          A new ``LayerNorm`` with scale one and shift zero.
        """
        return cls(
            [
                Standardize(across=tuple(across_axes.keys()), epsilon=epsilon),
                _learned_scale(name, init_base_rng, across_axes, dtype),
                linear_and_affine.AddBias.from_config(
                    name=f"{name}/shift",
                    init_base_rng=init_base_rng,
                    biased_axes=dict(across_axes),
                    dtype=dtype,
                ),
            ]
        )


@struct.pytree_dataclass
class RMSLayerNorm(grouping.Sequential):
    """RMS layer normalization: `RMSStandardize`, then a learned scale.

    A `Sequential` of two sublayers (``RMSStandardize`` and a parallel-axes
    ``Linear`` for the scale). There is no shift, following Zhang & Sennrich
    (2019). Build it with `RMSLayerNorm.from_config`.

    Attributes:
      sublayers: The two sublayers, applied in order.
    """

    sublayers: list[layer_base.Layer]

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        across_axes: dict[str, int],
        epsilon: float | jax.Array = 1e-6,
        dtype: jax.typing.DTypeLike = jnp.float32,
    ) -> RMSLayerNorm:
        """Builds an RMS layer normalization over ``across_axes``.

        Args:
          name: Prefix for the parameter label (``{name}/scale.weights``).
          init_base_rng: Base PRNG key for the parameters, or None to leave a
            parameter slot to be bound later.
          across_axes: Names and sizes of the axes to normalize over.
          epsilon: Passed on to `RMSStandardize`, stored as an array of
            ``dtype`` so that low-precision models do not upcast.
          dtype: Dtype of the scale parameter (and of ``epsilon``).

        Returns:
          A new ``RMSLayerNorm`` with scale one.
        """
        return cls(
            [
                RMSStandardize(
                    across=tuple(across_axes.keys()),
                    epsilon=jnp.asarray(epsilon, dtype=dtype),
                ),
                _learned_scale(name, init_base_rng, across_axes, dtype),
            ]
        )
