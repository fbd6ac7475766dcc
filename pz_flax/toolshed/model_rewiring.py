"""Layers for interventions on activations: ablation, activation and path patching,
linearization.

They are inserted into a model (usually by selection) to measure what a component causes:

* `KnockOutAttentionHeads` redirects chosen attention heads to the first (``<BOS>``) token,
  a cheap ablation for heads that park their attention there.
* `RewireComputationPaths` mixes activations between "worlds": counterfactual copies of the
  input stacked along one axis and run in a single batched call. A corrupted world can read
  an activation from the clean one, a world can drop a contribution entirely, and so on,
  declaratively and in one forward pass instead of saving and replaying activations.
* `LinearizeAndAdjust` replaces a layer by its first-order expansion around one (adjusted)
  input, evaluated at another.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pz_flax.core import named_axes
from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.nn import layer as layer_base


@struct.pytree_dataclass
class KnockOutAttentionHeads(layer_base.Layer):
    """Pulls masked heads' attention weights towards the first key position.

    Insert it right after the attention softmax. Its input has a ``kv_seq`` axis; the
    result is ``bos + head_mask * (weights - bos)``, where ``bos`` puts all weight on key
    position 0.

    Attributes:
        head_mask: 1 for heads to keep, 0 for heads to send to ``<BOS>``, anything between
            for a blend; a NamedArray, typically over the ``heads`` axis.
    """

    head_mask: named_axes.NamedArray

    def __call__(
        self, attn_weights: named_axes.NamedArray, **_unused_side_inputs: Any
    ) -> named_axes.NamedArray:
        """Returns the attention weights with the masked heads knocked out."""
        num_keys = attn_weights.named_shape["kv_seq"]
        attend_to_first = named_axes.wrap(
            jnp.zeros([num_keys], attn_weights.dtype).at[0].set(1.0)
        ).tag("kv_seq")
        return attend_to_first + self.head_mask * (attn_weights - attend_to_first)


@dataclasses.dataclass(frozen=True)
class From:
    """One incoming connection of a world in `RewireComputationPaths`.

    Attributes:
        source: The name of the world to read from.
        weight: How much of it to take: a number, or a NamedArray with no positional axes
            whose named axes give a separate weight per index (per head, say).
    """

    source: str
    weight: float | named_axes.NamedArray = 1.0


@struct.pytree_dataclass
class RewireComputationPaths(layer_base.Layer):
    """Recombines activations across the worlds stacked along ``worlds_axis``.

    The input holds one activation per world (clean run, corrupted run, ...) along
    ``worlds_axis``, in the order ``world_ordering``. Each output world is the weighted sum
    of the input worlds that ``taking`` lists for it. A world taking ``From(itself)`` is
    unchanged; a world taking ``()`` is zeroed, which disables whatever the activation feeds.

    Attributes:
        worlds_axis: The name of the worlds axis; it must not be an axis the model uses.
        world_ordering: The world names, in their order along ``worlds_axis``.
        taking: For each world in ``world_ordering``, a `From` or a tuple of them.
    """

    worlds_axis: str = dataclasses.field(metadata={"pytree_node": False})
    world_ordering: tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})
    taking: dict[str, From | tuple[From, ...]] = dataclasses.field(metadata={"pytree_node": False})

    def path_matrix(self) -> named_axes.NamedArray:
        """The mixing matrix: entry ``[to, from]`` is the weight world ``to`` takes from ``from``.

        Returns:
            A NamedArray with positional shape ``(worlds, worlds)``, plus the named axes of
            any NamedArray weights.

        Raises:
            ValueError: If ``taking`` does not name exactly the worlds of ``world_ordering``,
                or a `From` reads from a world not in it.
        """
        if set(self.taking) != set(self.world_ordering) or len(self.taking) != len(
            self.world_ordering
        ):
            raise ValueError(
                f"taking must have one entry per world of world_ordering {self.world_ordering},"
                f" but its keys are {tuple(self.taking)}."
            )
        matrix: list[list[Any]] = [[0 for _ in self.world_ordering] for _ in self.world_ordering]
        for destination, connections in self.taking.items():
            if isinstance(connections, From):
                connections = (connections,)
            to_index = self.world_ordering.index(destination)
            for connection in connections:
                if connection.source not in self.world_ordering:
                    raise ValueError(
                        f"World {destination!r} takes from {connection.source!r}, which is not"
                        f" in world_ordering {self.world_ordering}."
                    )
                from_index = self.world_ordering.index(connection.source)
                matrix[to_index][from_index] += connection.weight
        # nmap lets the entries be named scalars: the matrix gets their named axes.
        return named_axes.nmap(jnp.array)(matrix)

    def __call__(
        self, inputs: named_axes.NamedArray, **_unused_side_inputs: Any
    ) -> named_axes.NamedArray:
        """Returns ``inputs`` with each world replaced by its weighted sources."""
        matrix = self.path_matrix().astype(inputs.dtype)
        mixed = named_axes.nmap(jnp.dot)(matrix, inputs.untag(self.worlds_axis))
        return mixed.tag(self.worlds_axis)


def _as_named(value: Any) -> named_axes.NamedArrayBase:
    return value if isinstance(value, named_axes.NamedArrayBase) else named_axes.wrap(value)


@struct.pytree_dataclass
class LinearizeAndAdjust(layer_base.Layer):
    """Evaluates ``target``'s linearization around one adjusted input at another.

    With ``p = linearize_around(x)`` and ``e = evaluate_at(x)``, the output is
    ``target(p) + J_target(p) (e - p)``. When both adjustments agree the output is just
    ``target(x')``, since a linearization is exact at its own point.

    Attributes:
        linearize_around: Computes the linearization point from the input.
        evaluate_at: Computes the evaluation point from the input.
        target: The layer to linearize; its variables are read, not updated.
    """

    linearize_around: layer_base.Layer
    evaluate_at: layer_base.Layer
    target: layer_base.Layer

    def __call__(self, inputs: Any, **side_inputs: Any) -> Any:
        """Returns the first-order approximation of ``target`` at the evaluation point."""
        primal_point = self.linearize_around(inputs, **side_inputs)
        eval_point = self.evaluate_at(inputs, **side_inputs)
        primal_leaves, structure = jax.tree.flatten(primal_point, is_leaf=named_axes.is_namedarray)
        eval_leaves, eval_structure = jax.tree.flatten(eval_point, is_leaf=named_axes.is_namedarray)
        if structure != eval_structure:
            raise ValueError(
                "linearize_around and evaluate_at must return the same structure, but got"
                f" {structure} and {eval_structure}."
            )
        primals, tangents = [], []
        for primal_leaf, eval_leaf in zip(primal_leaves, eval_leaves, strict=True):
            primal_leaf, eval_leaf = _as_named(primal_leaf), _as_named(eval_leaf)
            dtype = jnp.result_type(primal_leaf, eval_leaf)
            tangent = eval_leaf - primal_leaf
            # jvp needs primal and tangent of identical layout (axes, order and dtype).
            primal_leaf = primal_leaf.broadcast_like(eval_leaf).astype(dtype)
            primals.append(primal_leaf)
            tangents.append(tangent.order_like(primal_leaf).astype(dtype))

        frozen_target = variables.freeze_variables(self.target)
        frozen_side_inputs = variables.freeze_variables(side_inputs)

        def run_target(value):
            return frozen_target(value, **frozen_side_inputs)

        primal_out, tangent_out = jax.jvp(
            run_target, (structure.unflatten(primals),), (structure.unflatten(tangents),)
        )
        return jax.tree.map(
            lambda p, t: p + t, primal_out, tangent_out, is_leaf=named_axes.is_namedarray
        )
