"""Multi-layer perceptrons over a named feature axis.

The models are plain `Sequential` subclasses: the class only gives the stack of
layers a name (visible in treescope and usable in selectors) and a builder. All
behaviour comes from the sublayers, so an MLP can be edited like any other
sequence of layers, e.g. by swapping an activation or inserting a probe.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from collections.abc import Sequence

import jax

from pz_flax.core import struct
from pz_flax.nn import basic_ops
from pz_flax.nn import dropout
from pz_flax.nn import grouping
from pz_flax.nn import layer as layer_base
from pz_flax.nn import linear_and_affine


def _check_feature_sizes(model_name: str, feature_sizes: Sequence[int]) -> None:
    if len(feature_sizes) < 2:
        raise ValueError(
            f"{model_name}.from_config needs at least an input and an output size in"
            f" feature_sizes, got {list(feature_sizes)}."
        )


def _mlp_layers(
    init_base_rng: jax.Array | None,
    feature_sizes: Sequence[int],
    name: str,
    activation_fn: Callable[[jax.Array], jax.Array],
    feature_axis: str,
    between_layers: Callable[[], list[layer_base.Layer]],
) -> list[layer_base.Layer]:
    """Affine layers ``feature_sizes[i] -> feature_sizes[i + 1]``, with activations between.

    The feature axis keeps its name from layer to layer (only its size changes),
    which is what lets every layer read the previous one's output directly.
    """
    layers = []
    for index, (size_in, size_out) in enumerate(itertools.pairwise(feature_sizes)):
        if index:
            layers.extend(between_layers())
            layers.append(basic_ops.Elementwise(activation_fn))
        layers.append(
            linear_and_affine.Affine.from_config(
                name=f"{name}/Affine_{index}",
                init_base_rng=init_base_rng,
                input_axes={feature_axis: size_in},
                output_axes={feature_axis: size_out},
            )
        )
    return layers


@struct.pytree_dataclass(has_implicitly_inherited_fields=True)
class MLP(grouping.Sequential):
    """A multi-layer perceptron: `Affine` layers with an activation between each pair.

    Attributes:
      sublayers: The affine and activation layers, in order.
    """

    @classmethod
    def from_config(
        cls,
        init_base_rng: jax.Array | None,
        feature_sizes: list[int],
        name: str = "mlp",
        activation_fn: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        feature_axis: str = "features",
    ) -> MLP:
        """Builds an MLP mapping ``feature_sizes[0]`` features to ``feature_sizes[-1]``.

        Args:
          init_base_rng: Base PRNG key, or None to leave parameter slots.
          feature_sizes: Sizes of the feature axis at the input, after each
            hidden layer, and at the output (at least two entries).
          name: Prefix of the parameter labels (``{name}/Affine_{i}...``).
          activation_fn: Elementwise activation applied between affine layers
            (not after the last one).
          feature_axis: Name of the feature axis at every layer.

        Returns:
          The new MLP.

        Raises:
          ValueError: If fewer than two sizes are given.
        """
        _check_feature_sizes("MLP", feature_sizes)
        return cls(
            sublayers=_mlp_layers(
                init_base_rng, feature_sizes, name, activation_fn, feature_axis, list
            )
        )


@struct.pytree_dataclass(has_implicitly_inherited_fields=True)
class DropoutMLP(grouping.Sequential):
    """An `MLP` with a `StochasticDropout` before each hidden activation.

    The dropout layers need a ``random_stream`` side input; disable them for
    evaluation with ``pz.select(model).at_instances_of(StochasticDropout)
    .apply(lambda layer: layer.disable())``.

    Attributes:
      sublayers: The affine, dropout and activation layers, in order.
    """

    @classmethod
    def from_config(
        cls,
        init_base_rng: jax.Array | None,
        feature_sizes: list[int],
        drop_rate: float,
        name: str = "dropout_mlp",
        activation_fn: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        feature_axis: str = "features",
    ) -> DropoutMLP:
        """Builds an MLP with dropout between its layers.

        Args:
          init_base_rng: Base PRNG key, or None to leave parameter slots.
          feature_sizes: Sizes of the feature axis at the input, after each
            hidden layer, and at the output (at least two entries).
          drop_rate: Drop probability of every dropout layer.
          name: Prefix of the parameter labels.
          activation_fn: Elementwise activation applied between affine layers.
          feature_axis: Name of the feature axis at every layer.

        Returns:
          The new MLP.

        Raises:
          ValueError: If fewer than two sizes are given.
        """
        _check_feature_sizes("DropoutMLP", feature_sizes)
        return cls(
            sublayers=_mlp_layers(
                init_base_rng,
                feature_sizes,
                name,
                activation_fn,
                feature_axis,
                lambda: [dropout.StochasticDropout(drop_rate)],
            )
        )
