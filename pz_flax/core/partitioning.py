"""Splitting a model into disjoint parts and putting it back together.

JAX transformations address their arguments positionally: ``jax.grad(argnums=...)`` and
``jax.jit(donate_argnums=...)`` act on whole arguments. To differentiate with respect to only
some parameters, or donate only some state, the model is split into several trees with
``Selection.partition``; each part keeps the model's structure but has the other parts'
subtrees replaced by the ``NotInThisPartition`` sentinel. ``combine`` reverses the split.

A dedicated sentinel (rather than ``None``, as in Equinox) keeps the split unambiguous:
``None`` is a legitimate value in many models, ``NotInThisPartition`` means exactly "this
subtree lives in another part". It may stand in for a whole subtree, not only a leaf.
"""

from __future__ import annotations

from typing import Any

import jax

from pz_flax.core import struct
from pz_flax.core import tree_util


@struct.pytree_dataclass
class NotInThisPartition(struct.Struct):
    """Placeholder for a subtree that ``Selection.partition`` moved into another part.

    It has no pytree children, so a partitioned tree passes through JAX transformations and
    its leaves are exactly the leaves that belong to this part. ``combine`` replaces each
    placeholder with the matching subtree of another part.
    """

    def treescope_color(self) -> str:
        return "orange"


def combine(*partitions: Any) -> Any:
    """Merges trees produced by ``Selection.partition`` back into one tree.

    All parts share the same structure, except that wherever a subtree belongs to one part,
    every other part holds ``NotInThisPartition`` there (at that subtree or at one of its
    ancestors). The result takes each subtree from the part that really has it.

    Args:
        *partitions: The parts to merge, in any order.

    Returns:
        The merged tree. With no parts, ``NotInThisPartition()``, which is the neutral element
        of merging. A location that every part leaves out stays ``NotInThisPartition()``.

    Raises:
        ValueError: If two parts both hold real values at the same location and those values
            do not have the same node type and metadata (for instance, both hold a leaf), naming
            the key path.
    """
    if not partitions:
        return NotInThisPartition()
    return _merge_at((), list(partitions))


def _merge_at(keypath: tuple[Any, ...], candidates: list[Any]) -> Any:
    """Merges the subtrees that several parts hold at ``keypath``."""
    present = [subtree for subtree in candidates if not isinstance(subtree, NotInThisPartition)]
    if not present:
        return candidates[0]
    if len(present) == 1:
        return present[0]

    # Several parts hold something here: they must all be the same kind of node, and each of
    # its children is then merged independently.
    splits = [tree_util.tree_flatten_exactly_one_level(subtree) for subtree in present]
    first_split = splits[0]
    for subtree, split in zip(present[1:], splits[1:]):
        if first_split is None or split is None or split[1] != first_split[1]:
            raise ValueError(
                "combine: the parts disagree at key path"
                f" {jax.tree_util.keystr(keypath) or '(root)'}: more than one part holds a value"
                " there and they are not nodes of the same structure (each location should be"
                f" held by exactly one part, the others holding NotInThisPartition). Got"
                f" {present[0]!r} and {subtree!r}."
            )
    keyed_children, treedef = first_split
    merged_children = []
    for child_index, (key, _) in enumerate(keyed_children):
        child_candidates = [split[0][child_index][1] for split in splits]
        merged_children.append(_merge_at((*keypath, key), child_candidates))
    return treedef.unflatten(merged_children)
