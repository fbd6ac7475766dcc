"""Combinators for non-sequential dataflow: skip connections and parallel branches.

Together with ``Sequential`` these express most network topologies as a tree of layers,
instead of as hand-written ``__call__`` methods, so the topology stays visible and
editable.
"""

from __future__ import annotations

from typing import Any

from pz_flax.core import struct
from pz_flax.nn import layer as layer_base


@struct.pytree_dataclass
class Residual(layer_base.Layer):
    """A skip connection: returns ``delta(x) + x``.

    Stacking residual blocks gives the "residual stream" of modern networks, where each
    block reads the stream and adds an update to it.

    Attributes:
        delta: The layer whose output is added to the input.
    """

    delta: layer_base.Layer

    def __call__(self, value: Any, **side_inputs: Any) -> Any:
        """Runs ``delta`` on ``value`` and adds ``value`` back.

        Args:
            value: The block's input.
            **side_inputs: Passed to ``delta``.

        Returns:
            ``delta(value) + value``.
        """
        return self.delta(value, **side_inputs) + value


def _run_branches(
    combinator: layer_base.Layer, branches: list[Any], value: Any, side_inputs: dict, combine
) -> Any:
    """Runs every branch on the same input and folds their outputs with ``combine``."""
    if not branches:
        raise ValueError(f"{type(combinator).__name__} requires at least one branch.")
    total = branches[0](value, **side_inputs)
    for branch in branches[1:]:
        total = combine(total, branch(value, **side_inputs))
    return total


@struct.pytree_dataclass
class BranchAndAddTogether(layer_base.Layer):
    """Runs several layers on the same input and sums their outputs.

    The outputs must have the same (or broadcast-compatible) shapes.

    Attributes:
        branches: The layers to run; at least one.
    """

    branches: list[layer_base.Layer]

    def __call__(self, arg: Any, **side_inputs: Any) -> Any:
        """Returns the sum of every branch applied to ``arg``.

        Raises:
            ValueError: If there are no branches.
        """
        return _run_branches(self, self.branches, arg, side_inputs, lambda a, b: a + b)


@struct.pytree_dataclass
class BranchAndMultiplyTogether(layer_base.Layer):
    """Runs several layers on the same input and multiplies their outputs.

    This is the shape of gated units (GLU, SwiGLU, GeGLU): one branch computes a gate with
    a nonlinearity, another a value, and their product is the output.

    Attributes:
        branches: The layers to run; at least one.
    """

    branches: list[layer_base.Layer]

    def __call__(self, arg: Any, **side_inputs: Any) -> Any:
        """Returns the product of every branch applied to ``arg``.

        Raises:
            ValueError: If there are no branches.
        """
        return _run_branches(self, self.branches, arg, side_inputs, lambda a, b: a * b)
