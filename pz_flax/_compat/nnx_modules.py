"""Taking NNX modules apart into attributes, and putting them together without ``__init__``.

Checkpoints describe a wrapped NNX module by its class, its attributes and, for each
attribute, whether NNX treats it as data (part of the module's state) or as static
configuration. NNX has no public API for either direction: which attributes are data is
recorded in ``_pytree__nodes`` (flax >= 0.12; ``nnx.data``/``nnx.static`` annotations end up
there), and an empty module needs its ``_pytree__state`` (what NNX's metaclass sets before
running ``__init__``, and what ``nnx.merge`` sets through its private graph-node hooks).
Both are guarded: if a flax release renames them, these functions raise a ``RuntimeError``
naming the assumption (see ``tests/checkpoint/test_module_schema.py``'s canary).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
from flax import nnx

from pz_flax._compat.nnx import BOOKKEEPING_ATTRIBUTES

# The two bookkeeping attributes (see ``BOOKKEEPING_ATTRIBUTES``) this module reads and writes.
_NODES_ATTRIBUTE = "_pytree__nodes"
_STATE_ATTRIBUTE = "_pytree__state"


def _broken(what: str) -> RuntimeError:
    return RuntimeError(
        f"pz_flax cannot {what} with this flax release: NNX modules no longer keep"
        f" {_NODES_ATTRIBUTE}/{_STATE_ATTRIBUTE} as flax 0.12 does. pz_flax._compat.nnx_modules"
        " needs updating."
    )


def module_attributes(module: nnx.Pytree) -> list[tuple[str, Any, bool]]:
    """``(name, value, is_data)`` for each of the module's own attributes, in order.

    Raises:
        RuntimeError: If this flax release does not record data attributes as flax 0.12 does.
    """
    nodes = vars(module).get(_NODES_ATTRIBUTE)
    if nodes is None or not hasattr(nodes, "get"):
        raise _broken("describe an NNX module")
    return [
        # NNX's own type test only for an attribute the record lacks: it costs microseconds.
        (name, value, bool(nodes[name]) if name in nodes else nnx.is_data(value))
        for name, value in vars(module).items()
        if name not in BOOKKEEPING_ATTRIBUTES
    ]


def empty_module_with(cls: type, attributes: list[tuple[str, Any, bool]]) -> nnx.Pytree:
    """A module of class ``cls`` holding ``attributes``, built without running ``__init__``.

    Args:
        cls: An ``nnx.Pytree`` subclass (an ``nnx.Module``, an ``nnx.RngStream``, ...).
        attributes: ``(name, value, is_data)`` triples, as ``module_attributes`` gives them.

    Raises:
        RuntimeError: If this flax release builds modules differently from flax 0.12.
    """
    template = nnx.Module()
    state = vars(template).get(_STATE_ATTRIBUTE)
    class_nodes = getattr(cls, _NODES_ATTRIBUTE, None)
    if state is None or class_nodes is None or not hasattr(class_nodes, "update"):
        raise _broken("rebuild an NNX module")
    module = object.__new__(cls)
    object.__setattr__(module, _STATE_ATTRIBUTE, type(state)())
    nodes = class_nodes.update({name: data for name, _, data in attributes})
    # NNX's metaclass records, after ``__init__``, every attribute it has not seen yet,
    # ``_pytree__nodes`` itself included; do the same so graph definitions compare equal.
    missing = {name: False for name in BOOKKEEPING_ATTRIBUTES if name not in nodes}
    object.__setattr__(module, _NODES_ATTRIBUTE, nodes.update(missing))
    for name, value, _ in attributes:
        object.__setattr__(module, name, value)
    return module


def shallow_copy_without(module: nnx.Pytree, removed: Iterable[str]) -> nnx.Pytree:
    """A shallow copy of ``module`` without the attributes ``removed``; ``module`` is untouched.

    The copy shares the module's attribute values (variables, submodules); only its attribute
    dictionary and its record of data attributes are its own. ``copy.copy`` alone shares that
    record (``_pytree__nodes``) with ``module``, and flax 0.12.3's ``Pytree.__delattr__``
    deletes from it in place, so deleting an attribute of the copy would also drop it from the
    original's record (and change the original's graph definition). Flax 0.12.4+ replace the
    record on every delete; giving the copy its own record first does the same on every release.

    Raises:
        AttributeError: If ``module`` has no attribute named in ``removed``.
        RuntimeError: If this flax release does not record data attributes as flax 0.12 does.
    """
    removed = frozenset(removed)
    nodes = vars(module).get(_NODES_ATTRIBUTE)
    if nodes is None or not hasattr(nodes, "items"):
        raise _broken("copy an NNX module")
    missing = sorted(removed - vars(module).keys())
    if missing:
        raise AttributeError(f"{type(module).__name__} has no attributes {missing} to remove")
    shell = copy.copy(module)
    own_nodes = type(nodes)({name: data for name, data in nodes.items() if name not in removed})
    object.__setattr__(shell, _NODES_ATTRIBUTE, own_nodes)
    for name in removed:
        delattr(shell, name)
    return shell


def module_of_graphdef(graphdef: Any) -> nnx.Module:
    """The module a graph definition describes, its variables holding placeholder scalars.

    Used to describe a wrapped module's shell (a graph definition without state) attribute by
    attribute. ``nnx.merge`` accepts a flat list of leaves; the graph definition's
    ``num_leaves`` (flax >= 0.12) says how many.

    Raises:
        RuntimeError: If this flax release's graph definitions have no ``num_leaves``.
    """
    num_leaves = getattr(graphdef, "num_leaves", None)
    if not isinstance(num_leaves, int):
        raise _broken("read a wrapped NNX module's graph definition")
    return nnx.merge(graphdef, [np.zeros((), np.float32)] * num_leaves)
