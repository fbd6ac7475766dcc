"""Helpers on top of ``jax.tree_util`` that selectors, partitioning and layers share.

JAX exposes pytrees as "flatten everything down to leaves". Selectors need a finer tool: look
at the direct children of one node (with their path keys), rebuild that node from new
children, and turn a key path into a name a person can read. Those pieces live here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any
from typing import TypeAlias

import jax
from flax import nnx

PyTreeDef: TypeAlias = jax.tree_util.PyTreeDef

# Keys that step into an attribute of an object (rather than an item of a container). A
# readable path names the object's type before such a step, e.g. ``Linear.weights``.
_ATTRIBUTE_LIKE_KEYS = (jax.tree_util.GetAttrKey, jax.tree_util.FlattenedIndexKey)


@dataclasses.dataclass(frozen=True)
class CustomGetAttrKey:
    """An attribute path key that, unlike ``jax.tree_util.GetAttrKey``, may be subclassed.

    ``GetAttrKey`` cannot carry extra information. A pytree type that wants its keys to say
    more than the attribute name (for instance, that a child is stacked along some axis)
    subclasses this dataclass and adds fields; path rendering still shows ``.name``, and
    ``pretty_keystr`` treats it as an attribute step.

    Attributes:
        name: The attribute name this key steps into.
    """

    name: str

    def __str__(self) -> str:
        return f".{self.name}"


#### Traversals that stop at variables ####

# NNX variables (and pz_flax's variable values and slots) are pytree nodes whose children are
# their raw arrays. Nearly every pz_flax traversal wants them whole, as leaves: this section is
# the one place that says so.


@functools.cache
def _is_variable_type(node_type: type) -> bool:
    # Checked by type and cached: ``isinstance(x, nnx.Variable)`` runs a Python-level
    # metaclass hook on every call, which dominated the cost of traversing large models.
    # Imported here because ``variables`` itself builds on this module.
    from pz_flax.core import variables

    return issubclass(
        node_type,
        (
            nnx.Variable,
            variables.AbstractVariable,
            variables.AbstractVariableValue,
            variables.AbstractVariableSlot,
        ),
    )


def is_variable_node(node: Any) -> bool:
    """Whether ``node`` is a variable: an ``nnx.Variable`` or a pz_flax variable value or slot.

    This is the ``is_leaf`` for ``jax.tree_util`` traversals that treat variables as whole
    leaves rather than descending into their arrays.
    """
    return _is_variable_type(type(node))


def leaves_stopping_at_variables(tree: Any) -> list[Any]:
    """``jax.tree_util.tree_leaves`` with every variable kept whole, as one leaf."""
    return jax.tree_util.tree_leaves(tree, is_leaf=is_variable_node)


def flatten_stopping_at_variables(tree: Any) -> tuple[list[Any], PyTreeDef]:
    """``jax.tree_util.tree_flatten`` with every variable kept whole, as one leaf."""
    return jax.tree_util.tree_flatten(tree, is_leaf=is_variable_node)


def flatten_with_path_stopping_at_variables(tree: Any) -> tuple[list[tuple[Any, Any]], PyTreeDef]:
    """``jax.tree_util.tree_flatten_with_path`` with every variable kept whole."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable_node)


def map_stopping_at_variables(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``jax.tree_util.tree_map`` that hands ``fn`` each variable whole."""
    return jax.tree_util.tree_map(fn, tree, *rest, is_leaf=is_variable_node)


def map_with_path_stopping_at_variables(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``jax.tree_util.tree_map_with_path`` that hands ``fn`` each variable whole."""
    return jax.tree_util.tree_map_with_path(fn, tree, *rest, is_leaf=is_variable_node)


def tree_flatten_exactly_one_level(
    tree: Any,
) -> tuple[list[tuple[Any, Any]], PyTreeDef] | None:
    """Splits a pytree node into its direct children, keeping their path keys.

    Unlike ``jax.tree_util.tree_flatten``, grandchildren are left inside their parents, which
    is what a traversal that decides node by node (selectors, ``combine``) needs.

    Args:
        tree: The node to split.

    Returns:
        ``None`` if ``tree`` is a pytree leaf. Otherwise ``(keyed_children, treedef)``, where
        ``keyed_children`` is a list of ``(key, child)`` pairs in flattening order (empty for a
        node without children, such as ``None`` or ``()``), and ``treedef.unflatten`` takes a
        list of new children and rebuilds a node of the same type and metadata.
    """
    # Treating every node below the root as a leaf stops flattening after one level.
    paths_and_children, treedef = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda node: node is not tree
    )
    root_is_leaf = treedef.num_nodes == 1 and treedef.num_leaves == 1
    if root_is_leaf:
        return None
    return [(path[0], child) for path, child in paths_and_children], treedef


def pretty_keystr(keypath: tuple[Any, ...], tree: Any) -> str:
    """Renders a key path into ``tree`` as a readable location, naming the types it crosses.

    ``jax.tree_util.keystr`` gives ``.layers[0].weights.value``; this gives
    ``Sequential.layers[0]/Linear.weights/Parameter.value``, which says what each attribute
    belongs to. It is meant for messages and generated names (for example the label of a
    variable found at that location).

    Args:
        keypath: A key path, as produced by ``jax.tree_util.tree_flatten_with_path``.
        tree: The tree that ``keypath`` indexes into; it is walked to learn the types.

    Returns:
        The readable path string; empty for the empty key path.

    Raises:
        ValueError: If ``keypath`` does not exist in ``tree``, naming the first step that does
            not match.
    """
    pieces = []
    node = tree
    for depth, key in enumerate(keypath):
        if isinstance(key, (*_ATTRIBUTE_LIKE_KEYS, CustomGetAttrKey)):
            if pieces:
                pieces.append("/")
            pieces.append(type(node).__name__)
        split = tree_flatten_exactly_one_level(node)
        children_by_key = dict(split[0]) if split is not None else {}
        if key not in children_by_key:
            raise ValueError(
                f"Key path {jax.tree_util.keystr(tuple(keypath))} does not exist in the given"
                f" tree: after {jax.tree_util.keystr(tuple(keypath[:depth])) or 'the root'}"
                f" there is a {type(node).__name__} with children"
                f" {[str(k) for k in children_by_key]}, not {key!s}."
            )
        node = children_by_key[key]
        pieces.append(str(key))
    return "".join(pieces)
