"""Selectors: pick out parts of an immutable pytree, then read or rewrite them functionally.

A pz_flax model is an immutable tree, so "change the attention layers" means "build a new tree
that differs at those places". Selectors make that a one-liner::

    model = pz.select(model).at_instances_of(pz.nn.Attention).apply(make_causal)

``select(tree)`` starts a ``Selection`` holding the whole tree. Every ``at_*`` method narrows
it to nodes inside the currently selected ones (by type, predicate, key path, accessor,
...); terminal methods (``apply``, ``set``, ``get``, ``remove_from_parent``, ``partition``,
...) read the selected nodes or rebuild the tree with them replaced.

A ``Selection`` is itself a pytree ``Struct`` with two fields: ``selected_by_path``, the
selected subtrees keyed by their JAX key paths, and ``remainder``, the rest of the tree with
a ``SelectionHole`` at each selected location. Because the holes have no pytree children, the
leaves of a selection are exactly the leaves of the tree it came from.

Flax NNX variables (``pz.Parameter``, ``pz.StateVariable``, any ``nnx.Variable``) are pytree
*nodes* whose only child is their raw value, at key ``GetAttrKey('value')``. Selectors can
select a variable as a whole (``at_instances_of(pz.Parameter)``) or reach inside it
(``at_pytree_leaves``, ``at_instances_of(jax.Array)``). Variables are mutable objects shared
by identity, so every operation here hands out and keeps the *same* variable objects wherever
it did not have to change them: the parameters selected from a model are that model's
parameters, and a model rebuilt by ``apply`` shares its untouched variables with the original.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import typing
import warnings
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Generic
from typing import Literal

import jax
import numpy as np
from flax import nnx

from pz_flax.core import partitioning
from pz_flax.core import struct
from pz_flax.core import tree_util

KeyPath = tuple[Any, ...]

SelectedSubtree = typing.TypeVar("SelectedSubtree")
OtherSubtree = typing.TypeVar("OtherSubtree")


@struct.pytree_dataclass
class SelectionHole(struct.Struct):
    """Marks, inside ``Selection.remainder``, where a selected subtree was taken out.

    It has no pytree children: from JAX's point of view the selected subtree really is gone
    from the remainder, so the remainder and the selected values together hold each leaf of
    the original tree exactly once. Selecting a node therefore requires that its parent accept
    an arbitrary object in place of that child; nodes that validate their children's types
    (``jax.tree_util.Partial`` for instance) cannot have their direct children selected.

    Users get these from ``select`` and never need to build one.

    Attributes:
        path: Key path of the selected subtree, which is also its key in
            ``Selection.selected_by_path``.
    """

    path: KeyPath = dataclasses.field(metadata={"pytree_node": False})


@struct.pytree_dataclass
class SelectionQuote(struct.Struct):
    """Escapes a ``SelectionHole`` (or quote) that belongs to a different, inner selection.

    A selection can contain another selection, for instance when one selects into a
    ``Selection`` object itself. Its holes must not be filled when the outer selection is
    resolved, so building the outer selection wraps each pre-existing hole or quote in one
    more ``SelectionQuote``; resolving the outer selection removes exactly one level. Quoting
    only ever happens in ``remainder``, the only place where holes are looked for.

    Users get these from ``select`` and never need to build one.

    Attributes:
        quoted: The hole or quote being escaped.
    """

    quoted: SelectionHole | SelectionQuote = dataclasses.field(metadata={"pytree_node": False})


class _SelectionBoundary:
    """Wraps a subtree that is about to be selected (internal to this module).

    Selection operations first rebuild the tree with these wrappers around the chosen
    subtrees, then ``_build_selection`` moves every wrapped subtree into ``selected_by_path``.
    The class is deliberately not a pytree, so JAX treats a wrapped subtree as one leaf.
    """

    __slots__ = ("selected",)

    def __init__(self, selected: Any):
        self.selected = selected


class _UniqueLeaf:
    """Gives each leaf of a copied tree its own identity, so ``Selection.at`` can find it."""

    __slots__ = ("wrapped",)

    def __init__(self, wrapped: Any):
        self.wrapped = wrapped


_MARKER_TYPES = frozenset({_SelectionBoundary, SelectionHole, SelectionQuote})


def _describe_keypaths(keypaths: Iterable[KeyPath]) -> str:
    """Formats key paths for error messages, e.g. ``['a'], .layers[0]``."""
    return ", ".join(jax.tree_util.keystr(tuple(keypath)) or "(root)" for keypath in keypaths)


def _is_hole_or_quote(node: Any) -> bool:
    return type(node) is SelectionHole or type(node) is SelectionQuote


def _has_no_children(node: Any) -> bool:
    split = tree_util.tree_flatten_exactly_one_level(node)
    return split is None or not split[0]


def _rebuild_failure(exc: Exception, tree: Any) -> ValueError:
    """Explains why rebuilding ``tree`` with placeholders in it failed."""
    message = (
        "Could not rebuild a pytree while building or resolving a Selection"
        f" ({type(exc).__name__}: {exc}). Selections put placeholder objects in place of"
        " selected subtrees, so this happens when a pytree node requires its children to"
        " have particular types; it also happens when the value is not a valid JAX pytree"
        " at all (jax.tree_util.tree_flatten fails on it too)."
    )
    try:
        nodes = jax.tree_util.tree_leaves(
            tree, is_leaf=lambda node: isinstance(node, jax.tree_util.Partial)
        )
    except Exception:  # The tree cannot even be flattened; the message above covers it.
        nodes = []
    if any(isinstance(node, jax.tree_util.Partial) for node in nodes):
        message += (
            " The tree contains a jax.tree_util.Partial, which only accepts a tuple and a"
            " dict as its children, so the direct children of a Partial cannot be"
            " selected; select the Partial itself instead."
        )
    return ValueError(message)


def _unflatten_explained(treedef: tree_util.PyTreeDef, children: list[Any], original: Any) -> Any:
    """Rebuilds a node, turning a failure into an explanation of why selectors can hit it."""
    try:
        return treedef.unflatten(children)
    except Exception as exc:
        raise _rebuild_failure(exc, original) from exc


def _map_subtrees(
    tree: Any,
    stop: Callable[..., bool],
    replace: Callable[[KeyPath, Any], Any],
    keypath_prefix: KeyPath = (),
    stop_uses_keypath: bool = False,
) -> tuple[Any, bool]:
    """Replaces the outermost subtrees where ``stop`` holds; keeps unchanged variables as is.

    Like ``jax.tree_util.tree_map_with_path`` with an ``is_leaf``: every node for which
    ``stop`` is true is replaced by ``replace(keypath, node)`` and not descended into; leaves
    where ``stop`` is false are kept. Variables (``tree_util.is_variable_node``) are handled one
    level at a time so that a variable with nothing replaced inside it comes back as the very
    same object (JAX would rebuild a copy), which preserves the sharing of variables between
    trees.

    Args:
        tree: The tree to map over.
        stop: Decides whether to replace a node: called as ``stop(node)``, or as
            ``stop(keypath, node)`` with the absolute key path if ``stop_uses_keypath``.
        replace: Produces the replacement of a node for which ``stop`` held, from its
            absolute key path and the node.
        keypath_prefix: Key path of ``tree`` itself, prepended to every key path.
        stop_uses_keypath: Whether ``stop`` takes a key path (which costs a little per node).

    Returns:
        ``(new_tree, changed)``, where ``changed`` tells whether anything was replaced.
    """
    # Remember where ``stop`` held while flattening, so that the (user-supplied) predicate runs
    # once per node, as in penzai, rather than again for every leaf it produced.
    if stop_uses_keypath:
        stopped_keypaths = set()

        def is_leaf_with_path(keypath, node):
            if stop(keypath_prefix + keypath, node):
                stopped_keypaths.add(keypath)
                return True
            return tree_util.is_variable_node(node)

        keyed_leaves, treedef = jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=is_leaf_with_path, is_leaf_takes_path=True
        )

        def stopped(keypath, node):
            del node
            return keypath in stopped_keypaths

    else:
        # Without a key path the answer depends on the node alone, so identity is a safe key.
        stopped_ids = set()

        def is_leaf(node):
            if stop(node):
                stopped_ids.add(id(node))
                return True
            return tree_util.is_variable_node(node)

        keyed_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)

        def stopped(keypath, node):
            del keypath
            return id(node) in stopped_ids

    changed = False
    new_leaves = []
    for keypath, node in keyed_leaves:
        if stopped(keypath, node):
            new_node = replace(keypath_prefix + keypath, node)
            changed = True
        elif tree_util.is_variable_node(node):
            new_node, variable_changed = _map_variable(
                node, stop, replace, keypath_prefix + keypath, stop_uses_keypath
            )
            changed = changed or variable_changed
        else:
            new_node = node
        new_leaves.append(new_node)
    return _unflatten_explained(treedef, new_leaves, tree), changed


def _map_variable(
    variable: Any,
    stop: Callable[..., bool],
    replace: Callable[[KeyPath, Any], Any],
    keypath: KeyPath,
    stop_uses_keypath: bool,
) -> tuple[Any, bool]:
    """``_map_subtrees`` for the children of one variable, returning it unchanged if possible."""
    keyed_children, treedef = tree_util.tree_flatten_exactly_one_level(variable)
    results = [
        _map_subtrees(child, stop, replace, (*keypath, key), stop_uses_keypath)
        for key, child in keyed_children
    ]
    if not any(changed for _, changed in results):
        return variable, False
    return _unflatten_explained(treedef, [new for new, _ in results], variable), True


def _build_selection(tree_with_boundaries: Any) -> Selection:
    """Turns a tree with ``_SelectionBoundary`` wrappers into a selection of the wrapped parts.

    Pre-existing holes and quotes (from a selection inside the tree) get one more level of
    quoting, so that they are left alone when this selection is resolved.
    """
    selected_by_path = collections.OrderedDict()

    def take_out(keypath, node):
        if type(node) is _SelectionBoundary:
            selected_by_path[keypath] = node.selected
            return SelectionHole(keypath)
        return SelectionQuote(node)

    remainder, _ = _map_subtrees(
        tree_with_boundaries, lambda node: type(node) in _MARKER_TYPES, take_out
    )
    return Selection(selected_by_path=selected_by_path, remainder=remainder)


def _checked_filter(filter_fn: Callable[..., bool]) -> Callable[..., bool]:
    """Wraps a user predicate so that a non-bool answer fails loudly instead of silently."""

    def checked(*args):
        result = filter_fn(*args)
        if not isinstance(result, bool):
            raise TypeError(
                "The filter function of at_subtrees_where must return a Python bool, but it"
                f" returned a {type(result).__name__}: {result!r}. (Array comparisons return"
                " arrays; wrap them in bool(...) if that is what you mean.)"
            )
        return result

    return checked


@struct.pytree_dataclass
class Selection(Generic[SelectedSubtree], struct.Struct):
    """Some non-overlapping subtrees of a pytree, pulled out so they can be read or replaced.

    Build one with ``select(tree)`` (or ``struct.select()``) and narrow it with the ``at_*``
    methods; then read the selected nodes (``get``, ``get_sequence``, ``get_by_path``) or
    produce a new tree with them replaced (``apply``, ``set``, ``set_sequence``, ...). No
    selected node is ever an ancestor of another selected node.

    A selection is a pure value and a pytree; its leaves are the leaves of the original tree
    (in a different order). In the language of functional optics it is a lens that has already
    been focused on a particular tree: it can both view and update its focus.

    Attributes:
        selected_by_path: The selected subtrees, keyed by their key paths in the original tree
            (as produced by ``jax.tree_util``), in the tree's flattening order. An
            ``OrderedDict``, so that JAX keeps this order instead of sorting keys that may not
            be comparable.
        remainder: The original tree with a ``SelectionHole`` in place of each selected
            subtree (and ``SelectionQuote`` around holes of any selection nested inside it).
    """

    selected_by_path: collections.OrderedDict[KeyPath, SelectedSubtree]
    remainder: Any

    # ----------------------------------------------------------------------------------
    # Inspecting the selection.

    def count(self) -> int:
        """Returns how many subtrees are selected."""
        return len(self.selected_by_path)

    def __len__(self) -> int:
        return len(self.selected_by_path)

    def is_empty(self) -> bool:
        """Returns True if nothing is selected."""
        return not self.selected_by_path

    def assert_count_is(self, count: int) -> Selection:
        """Checks the number of selected subtrees, for chaining into a pipeline.

        Args:
            count: The number of subtrees that should be selected.

        Returns:
            This selection, unchanged.

        Raises:
            AssertionError: If a different number of subtrees is selected.
        """
        if self.count() != count:
            raise AssertionError(
                f"Expected {count} selected subtree(s), but {self.count()} are selected, at"
                f" {_describe_keypaths(self.selected_by_path)}."
            )
        return self

    def get(self) -> SelectedSubtree:
        """Returns the selected subtree of a selection that selects exactly one.

        Returns:
            The single selected subtree.

        Raises:
            ValueError: If zero or several subtrees are selected.
        """
        if len(self.selected_by_path) != 1:
            raise ValueError(
                "Selection.get() needs exactly one selected subtree, but"
                f" {len(self.selected_by_path)} are selected"
                + (
                    f", at {_describe_keypaths(self.selected_by_path)}"
                    if self.selected_by_path
                    else ""
                )
                + ". Use get_sequence() or get_by_path() to read several."
            )
        (value,) = self.selected_by_path.values()
        return value

    def get_keypaths(self) -> tuple[KeyPath, ...]:
        """Returns the key paths of the selected subtrees, in order."""
        return tuple(self.selected_by_path.keys())

    def get_sequence(self) -> tuple[SelectedSubtree, ...]:
        """Returns the selected subtrees in the tree's flattening order."""
        return tuple(self.selected_by_path.values())

    def get_by_path(self) -> collections.OrderedDict[KeyPath, SelectedSubtree]:
        """Returns the selected subtrees keyed by key path (``selected_by_path`` itself)."""
        return self.selected_by_path

    # ----------------------------------------------------------------------------------
    # Rebuilding the tree.

    def deselect(self) -> Any:
        """Puts the selected subtrees back into the remainder, forgetting the selection.

        Returns:
            The tree this selection describes: the original tree, unless the selected values
            were changed (e.g. by ``apply(..., keep_selected=True)``).
        """
        selected_by_path = self.selected_by_path

        def fill(keypath, node):
            if isinstance(node, SelectionQuote):
                return node.quoted
            if node.path not in selected_by_path:
                raise ValueError(
                    f"The remainder has a hole for key path {jax.tree_util.keystr(node.path)},"
                    " but selected_by_path has no value for it; this Selection was not built"
                    " by select() and is inconsistent."
                )
            return selected_by_path[node.path]

        rebuilt, _ = _map_subtrees(self.remainder, _is_hole_or_quote, fill)
        return rebuilt

    @typing.overload
    def apply(
        self,
        fn: Callable[[SelectedSubtree], Any],
        *,
        with_keypath: Literal[False] = False,
        keep_selected: Literal[False] = False,
    ) -> Any: ...

    @typing.overload
    def apply(
        self,
        fn: Callable[[SelectedSubtree], OtherSubtree],
        *,
        with_keypath: Literal[False] = False,
        keep_selected: Literal[True],
    ) -> Selection[OtherSubtree]: ...

    @typing.overload
    def apply(
        self,
        fn: Callable[[KeyPath, SelectedSubtree], Any],
        *,
        with_keypath: Literal[True],
        keep_selected: Literal[False] = False,
    ) -> Any: ...

    @typing.overload
    def apply(
        self,
        fn: Callable[[KeyPath, SelectedSubtree], OtherSubtree],
        *,
        with_keypath: Literal[True],
        keep_selected: Literal[True],
    ) -> Selection[OtherSubtree]: ...

    def apply(
        self, fn: Callable[..., Any], *, with_keypath: bool = False, keep_selected: bool = False
    ) -> Any:
        """Replaces every selected subtree with ``fn`` of it.

        Args:
            fn: Called once per selected subtree, as ``fn(subtree)``, or as
                ``fn(keypath, subtree)`` if ``with_keypath``; returns the replacement.
            with_keypath: Pass the subtree's key path as the first argument.
            keep_selected: Return the selection of the replacements instead of the rebuilt
                tree, to keep working on them.

        Returns:
            The rebuilt tree, or the updated ``Selection`` if ``keep_selected``.
        """
        if with_keypath:
            new_values = [(k, fn(k, v)) for k, v in self.selected_by_path.items()]
        else:
            new_values = [(k, fn(v)) for k, v in self.selected_by_path.items()]
        updated = Selection(
            selected_by_path=collections.OrderedDict(new_values), remainder=self.remainder
        )
        return updated if keep_selected else updated.deselect()

    def apply_with_selected_index(
        self, fn: Callable[[int, SelectedSubtree], Any], keep_selected: bool = False
    ) -> Any | Selection:
        """Like ``apply``, but ``fn`` gets each subtree's position among the selected ones.

        Args:
            fn: Called as ``fn(index, subtree)``, with ``index`` counting the selected subtrees
                from 0 in order; returns the replacement.
            keep_selected: Return the updated selection instead of the rebuilt tree.

        Returns:
            The rebuilt tree, or the updated ``Selection`` if ``keep_selected``.
        """
        updated = Selection(
            selected_by_path=collections.OrderedDict(
                (k, fn(i, v)) for i, (k, v) in enumerate(self.selected_by_path.items())
            ),
            remainder=self.remainder,
        )
        return updated if keep_selected else updated.deselect()

    def set(self, replacement: Any) -> Any:
        """Rebuilds the tree with every selected subtree replaced by ``replacement``.

        Args:
            replacement: The value to put at every selected location (the same object each
                time).

        Returns:
            The rebuilt tree.
        """
        return self.apply(lambda _: replacement)

    def set_by_path(self, replacer: Mapping[KeyPath, Any] | Callable[[KeyPath], Any]) -> Any:
        """Rebuilds the tree with replacements looked up by each selected subtree's key path.

        Args:
            replacer: A mapping from key path to replacement, which must cover every selected
                path (``selected_by_path`` itself gives back the same tree), or a function from
                key path to replacement. To see the old values too, use
                ``apply(fn, with_keypath=True)``.

        Returns:
            The rebuilt tree.

        Raises:
            KeyError: If ``replacer`` is a mapping without an entry for a selected path.
        """
        if callable(replacer):
            return self.apply(lambda keypath, _: replacer(keypath), with_keypath=True)
        missing = [keypath for keypath in self.selected_by_path if keypath not in replacer]
        if missing:
            raise KeyError(
                "set_by_path: the replacements have no entry for the selected key path(s)"
                f" {_describe_keypaths(missing)}."
            )
        return self.apply(lambda keypath, _: replacer[keypath], with_keypath=True)

    def set_sequence(self, replacements: Iterable[Any]) -> Any:
        """Rebuilds the tree with the selected subtrees replaced, in order, from an iterable.

        Args:
            replacements: One replacement per selected subtree, in the order of
                ``get_sequence()``. Only as many items as there are selected subtrees are
                taken, so an endless iterator is fine.

        Returns:
            The rebuilt tree.

        Raises:
            ValueError: If ``replacements`` runs out before every selected subtree has one.
        """
        iterator = iter(replacements)
        new_values = []
        for keypath in self.selected_by_path:
            try:
                new_values.append(next(iterator))
            except StopIteration:
                raise ValueError(
                    f"set_sequence: {self.count()} subtrees are selected but only"
                    f" {len(new_values)} replacement(s) were given (none for"
                    f" {jax.tree_util.keystr(keypath)})."
                ) from None
        return self.apply_with_selected_index(lambda index, _: new_values[index])

    def select_and_set_by_path(self, replacements_by_path: dict[KeyPath, Any]) -> Any:
        """Within each selected subtree, replaces the nodes at the given relative key paths.

        Shorthand for selecting each subtree, ``at_keypaths(...)`` and ``set_by_path(...)``.

        Args:
            replacements_by_path: Replacement values keyed by key paths relative to each
                selected subtree.

        Returns:
            The rebuilt tree.

        Raises:
            ValueError: If one of the key paths does not exist in a selected subtree, naming
                that path.
        """

        def replace_inside(keypath: KeyPath, subtree: Any) -> Any:
            inner = select(subtree).at_keypaths(replacements_by_path.keys())
            found = inner.selected_by_path
            absent = [
                path
                for path in replacements_by_path
                if path not in found and not any(path[: len(k)] == k for k in found)
            ]
            if absent:
                raise ValueError(
                    "select_and_set_by_path: no node at relative key path(s)"
                    f" {_describe_keypaths(absent)} inside the subtree"
                    f" selected at {jax.tree_util.keystr(keypath) or '(root)'}."
                )
            return inner.set_by_path(replacements_by_path)

        return self.apply(replace_inside, with_keypath=True)

    # ----------------------------------------------------------------------------------
    # Narrowing the selection.

    def _mark_and_rebuild(self, mark: Callable[[KeyPath, Any], Any]) -> Selection:
        """Builds a new selection from ``mark(keypath, subtree)`` of each selected subtree.

        ``mark`` returns the subtree with ``_SelectionBoundary`` around the parts to select;
        everything not wrapped becomes unselected.
        """
        marked = self.apply(mark, with_keypath=True)
        return _build_selection(marked)

    def where(
        self, filter_fn: Callable[..., bool], *, with_keypath: bool = False
    ) -> Selection[SelectedSubtree]:
        """Keeps only the selected subtrees for which ``filter_fn`` is true.

        Args:
            filter_fn: Called as ``filter_fn(subtree)``, or ``filter_fn(keypath, subtree)``
                if ``with_keypath``.
            with_keypath: Pass the subtree's key path as the first argument.

        Returns:
            A selection of the subtrees that passed; the others return to the remainder.
        """

        def keep_if(keypath, subtree):
            passes = filter_fn(keypath, subtree) if with_keypath else filter_fn(subtree)
            return _SelectionBoundary(subtree) if passes else subtree

        return self._mark_and_rebuild(keep_if)

    def pick_nth_selected(self, n: int | Sequence[int]) -> Selection:
        """Keeps only the selected subtree(s) at the given position(s) in selection order.

        ``selection.pick_nth_selected(i).get()`` is ``selection.get_sequence()[i]``.

        Args:
            n: A position, or several, counted from 0 over the selected subtrees. Positions
                past the end select nothing.

        Returns:
            A selection of the chosen subtrees only.
        """
        wanted = {n} if isinstance(n, int) else set(n)
        marked = self.apply_with_selected_index(
            lambda index, subtree: _SelectionBoundary(subtree) if index in wanted else subtree
        )
        return _build_selection(marked)

    def at(
        self,
        accessor_fn: Callable[[SelectedSubtree], Any | Collection[Any]],
        multiple: bool | None = None,
    ) -> Selection:
        """Selects the node(s) that ``accessor_fn`` points to inside each selected subtree.

        For example, ``pz.select(obj).at(lambda o: o.bar[2]["baz"])`` selects that one value,
        and ``.at(lambda o: (o.a, o.b), multiple=True)`` selects two. The accessor is run on a
        copy of the subtree whose leaves and childless nodes are wrapped in unique objects,
        and the node it returns is located by identity; so it must only navigate structure
        (attributes, items), never compute new values.

        Args:
            accessor_fn: Maps a selected subtree to one of its nodes, or to a collection of
                them if ``multiple``.
            multiple: Whether ``accessor_fn`` returns a collection of nodes. ``None`` first
                looks for the result as a single node; if it is not one but is a collection
                of nodes, those are selected with a ``UserWarning`` saying that this form is
                deprecated (pass ``multiple=True`` to be explicit).

        Returns:
            A selection of the nodes the accessor designated.

        Raises:
            ValueError: If the accessor returns something that is not a node of its input.
        """

        def mark(keypath, subtree):
            del keypath
            target_paths = self._locate_accessed_nodes(subtree, accessor_fn, multiple)
            marked, _ = _map_subtrees(
                subtree,
                lambda path, _: path in target_paths,
                lambda _, node: _SelectionBoundary(node),
                stop_uses_keypath=True,
            )
            return marked

        return self._mark_and_rebuild(mark)

    @staticmethod
    def _locate_accessed_nodes(
        subtree: Any, accessor_fn: Callable[[Any], Any], multiple: bool | None
    ) -> builtins.set[KeyPath]:  # builtins: inside Selection, `set` is the method
        """Runs an ``at`` accessor on a uniquely-labelled copy; returns its results' key paths."""
        try:
            labelled_copy = jax.tree_util.tree_map(_UniqueLeaf, subtree, is_leaf=_has_no_children)
        except Exception as exc:
            raise _rebuild_failure(exc, subtree) from exc
        result = accessor_fn(labelled_copy)

        def key_paths_of(candidates: Collection[Any]) -> tuple[set[KeyPath], list[Any]]:
            wanted_ids = {id(node) for node in candidates}
            keyed_nodes, _ = jax.tree_util.tree_flatten_with_path(
                labelled_copy, is_leaf=lambda node: id(node) in wanted_ids
            )
            found_paths = {path for path, node in keyed_nodes if id(node) in wanted_ids}
            found_ids = {id(node) for _, node in keyed_nodes if id(node) in wanted_ids}
            missing = [node for node in candidates if id(node) not in found_ids]
            return found_paths, missing

        def unwrap(node):
            return jax.tree_util.tree_map(
                lambda leaf: leaf.wrapped if isinstance(leaf, _UniqueLeaf) else leaf, node
            )

        if multiple:
            paths, missing = key_paths_of(list(result))
            if missing:
                raise ValueError(
                    "Selection.at: the accessor returned values that are not nodes of its"
                    " argument (it must only navigate to existing nodes, not compute new"
                    f" values): {[unwrap(node) for node in missing]}"
                )
            return paths

        paths, missing = key_paths_of([result])
        if not missing:
            return paths
        if multiple is None and isinstance(result, Collection):
            candidates = list(result)
            paths, missing_in_collection = key_paths_of(candidates)
            if not missing_in_collection:
                warnings.warn(
                    "Selection.at: the accessor returned a collection of nodes but multiple"
                    " was not set; selecting each of them. Pass multiple=True to select"
                    " several nodes (returning a collection without it is deprecated).",
                    stacklevel=7,  # Blame the caller of Selection.at.
                )
                return paths
        raise ValueError(
            "Selection.at: the accessor returned a value that is not a node of its argument"
            " (it must navigate to one existing node; to select several, return a collection"
            f" and pass multiple=True): {unwrap(result)!r}"
        )

    def at_pytree_leaves(self) -> Selection:
        """Selects every JAX pytree leaf inside the selected subtrees.

        This is the finest selection possible. It reaches inside NNX variables (their raw
        arrays are leaves); objects that are not registered pytrees are selected whole.

        Returns:
            A selection of all leaves of the selected subtrees.
        """
        return self._mark_and_rebuild(
            lambda _, subtree: jax.tree_util.tree_map(_SelectionBoundary, subtree)
        )

    def at_children(self) -> Selection:
        """Selects the direct pytree children of each selected subtree.

        Useful for generic recursive rewrites::

            def rewrite(node):
                node = select(node).at_children().apply(rewrite)
                return transform(node)

        Returns:
            A selection of every direct child. Selected leaves have no children and simply
            drop out of the selection.
        """

        def mark_children(keypath, subtree):
            del keypath
            split = tree_util.tree_flatten_exactly_one_level(subtree)
            if split is None or not split[0]:
                return subtree
            keyed_children, treedef = split
            return _unflatten_explained(
                treedef, [_SelectionBoundary(child) for _, child in keyed_children], subtree
            )

        return self._mark_and_rebuild(mark_children)

    def at_childless(self) -> Selection:
        """Selects every node without children: leaves, plus ``None``, ``()``, empty structs.

        Unlike ``at_pytree_leaves`` this also selects empty pytree nodes, which JAX does not
        count as leaves (handy for visualisation).

        Returns:
            A selection of the childless nodes of the selected subtrees.
        """
        return self.at_subtrees_where(_has_no_children)

    def at_subtrees_where(
        self,
        filter_fn: Callable[..., bool],
        *,
        with_keypath: bool = False,
        absolute_keypath: bool = False,
        innermost: bool = False,
    ) -> Selection:
        """Selects the subtrees of the selected subtrees where ``filter_fn`` is true.

        Selected nodes never nest, so when matches are nested only the outermost is selected
        (or the innermost, with ``innermost=True``). To transform every match including nested
        ones, loop until the selection is empty, or write a recursive rewrite with
        ``at_children``.

        Args:
            filter_fn: A deterministic predicate returning a Python bool; it may be called more
                than once per node. Called as ``filter_fn(subtree)``, or
                ``filter_fn(keypath, subtree)`` if ``with_keypath``.
            with_keypath: Pass each node's key path as the first argument.
            absolute_keypath: With ``with_keypath``, give key paths from the root of the whole
                tree rather than from the selected subtree being searched.
            innermost: Select the deepest matches (nodes with no matching descendant) instead
                of the outermost ones. Matching leaves are selected too.

        Returns:
            A selection of the matching subtrees.

        Raises:
            TypeError: If ``filter_fn`` returns something other than a bool.
        """
        checked = _checked_filter(filter_fn)

        def mark(keypath, subtree):
            base = keypath if (with_keypath and absolute_keypath) else ()
            if innermost:
                matches = checked if with_keypath else (lambda _, node: checked(node))
                _, marked = _mark_innermost(subtree, base, matches)
                return marked
            marked, _ = _map_subtrees(
                subtree,
                checked,
                lambda _, node: _SelectionBoundary(node),
                keypath_prefix=base,
                stop_uses_keypath=with_keypath,
            )
            return marked

        return self._mark_and_rebuild(mark)

    def at_instances_of(
        self,
        cls: type[OtherSubtree] | tuple[type[OtherSubtree], ...],
        innermost: bool = False,
    ) -> Selection[OtherSubtree]:
        """Selects the subtrees that are instances of ``cls``.

        Shorthand for ``at_subtrees_where(lambda node: isinstance(node, cls))``. NNX variables
        are nodes, so ``at_instances_of(pz.Parameter)`` selects whole parameter objects and
        ``at_instances_of(jax.Array)`` reaches the arrays inside them.

        Args:
            cls: A class or tuple of classes.
            innermost: Select the innermost instances when instances are nested, instead of
                the outermost.

        Returns:
            A selection of the instances.
        """
        return self.at_subtrees_where(lambda node: isinstance(node, cls), innermost=innermost)

    def at_equal_to(self, template: OtherSubtree) -> Selection[OtherSubtree]:
        """Selects the subtrees that compare equal (``==``) to ``template``.

        Arrays, named arrays and NNX variables are never compared (their ``==`` is
        elementwise); the search goes inside variables instead.

        Args:
            template: The value to look for; ``template == subtree`` is not evaluated, but
                ``subtree == template`` is.

        Returns:
            A selection of the subtrees equal to ``template``.

        Raises:
            ValueError: If ``template`` is an array, named array or NNX variable.
        """
        from pz_flax.core import named_axes  # named_axes builds on selectors; import late

        elementwise_eq_types = (jax.Array, np.ndarray, named_axes.NamedArrayBase, nnx.Variable)
        if isinstance(template, elementwise_eq_types):
            raise ValueError(
                f"at_equal_to cannot look for a {type(template).__name__}: its == operator"
                " compares elementwise and returns an array. Use at_subtrees_where with an"
                " explicit comparison instead."
            )

        def equals_template(node):
            if isinstance(node, elementwise_eq_types):
                return False
            return bool(node == template)

        return self.at_subtrees_where(equals_template)

    def at_keypaths(self, keypaths: Collection[KeyPath]) -> Selection:
        """Selects the nodes at the given key paths, relative to each selected subtree.

        Args:
            keypaths: Key paths (tuples of JAX path keys). Paths that do not exist select
                nothing; if one path is a prefix of another, only the shorter is selected,
                since selected nodes cannot nest.

        Returns:
            A selection of the nodes found at those paths.
        """
        wanted = frozenset(keypaths)
        return self.at_subtrees_where(lambda keypath, _: keypath in wanted, with_keypath=True)

    def invert(self) -> Selection:
        """Selects the largest subtrees that contain no currently selected node.

        The result and the original selection together cover the whole tree without overlap;
        ancestors of selected nodes belong to neither.

        Returns:
            The complementary selection.
        """
        selected_paths = set(self.selected_by_path)
        strict_ancestor_paths = {
            keypath[:length] for keypath in selected_paths for length in range(len(keypath))
        } - selected_paths

        def outside(keypath, node):
            del node
            return keypath not in strict_ancestor_paths

        def select_unless_selected(keypath, node):
            return node if keypath in selected_paths else _SelectionBoundary(node)

        marked, _ = _map_subtrees(
            self.deselect(), outside, select_unless_selected, stop_uses_keypath=True
        )
        return _build_selection(marked)

    def flatten_selected_selections(
        self: Selection[Selection[SelectedSubtree]],
    ) -> Selection[SelectedSubtree]:
        """Merges a selection of selections into one selection of their selected nodes.

        Together with ``apply(f, keep_selected=True)``, where ``f`` selects inside a subtree,
        this broadcasts custom selection logic over all selected subtrees (``refine`` does
        both at once).

        Returns:
            A selection of every node selected by the inner selections, in the outer tree.

        Raises:
            ValueError: If a selected value is not a ``Selection``.
        """

        def open_inner(keypath, inner):
            if not isinstance(inner, Selection):
                raise ValueError(
                    "flatten_selected_selections needs every selected value to be a Selection,"
                    f" but the one at {jax.tree_util.keystr(keypath) or '(root)'} is a"
                    f" {type(inner).__name__}."
                )
            return inner.apply(_SelectionBoundary)

        return self._mark_and_rebuild(open_inner)

    def refine(
        self, selector_fn: Callable[[Any], Selection[OtherSubtree]]
    ) -> Selection[OtherSubtree]:
        """Selects inside each selected subtree with per-subtree logic.

        Args:
            selector_fn: Takes one selected subtree and returns a selection of (usually) parts
                of it. It may also modify the subtree, as in ``apply``.

        Returns:
            A selection of everything ``selector_fn`` selected, in the context of the whole
            tree.
        """
        return self.apply(selector_fn, keep_selected=True).flatten_selected_selections()

    # ----------------------------------------------------------------------------------
    # Editing sequences.

    def apply_and_inline(
        self, fn: Callable[..., Iterable[Any]], *, with_keypath: bool = False
    ) -> Any:
        """Replaces each selected list/tuple element with zero or more new elements.

        Every selected node must be an element of a list or tuple; it is replaced in that
        sequence by the items of ``fn(node)`` (a "flat map").

        Args:
            fn: Called as ``fn(subtree)`` or ``fn(keypath, subtree)``; returns an iterable of
                elements to put in its place.
            with_keypath: Pass the subtree's key path as the first argument.

        Returns:
            The rebuilt tree.

        Raises:
            ValueError: If a selected node is the root or is not an element of a list or
                tuple, naming its key path and its parent's type.
        """

        def replacements_for(hole: SelectionHole) -> Iterable[Any]:
            value = self.selected_by_path[hole.path]
            return fn(hole.path, value) if with_keypath else fn(value)

        def misplaced(hole: SelectionHole, parent: Any) -> ValueError:
            value = self.selected_by_path[hole.path]
            where = (
                "the root of the tree is selected"
                if parent is None
                else f"the node at {jax.tree_util.keystr(hole.path)} is inside a"
                f" {type(parent).__name__}"
            )
            hint = (
                " To replace a layer by several layers, replace it by a Sequential of them"
                " with .apply(lambda layer: Sequential([...])) instead."
                if callable(value)
                else ""
            )
            return ValueError(
                "apply_and_inline (also used by remove_from_parent and insert_before/after)"
                f" needs every selected node to be an element of a list or tuple, but {where}."
                + hint
            )

        def rebuild(node: Any, parent: Any) -> tuple[Any, bool]:
            if isinstance(node, SelectionHole):
                raise misplaced(node, parent)
            if isinstance(node, SelectionQuote):
                return node.quoted, True
            if type(node) in (list, tuple):
                elements = []
                for element in node:
                    if isinstance(element, SelectionHole):
                        elements.extend(replacements_for(element))
                    else:
                        elements.append(rebuild(element, node)[0])
                return type(node)(elements), True
            split = tree_util.tree_flatten_exactly_one_level(node)
            if split is None:
                return node, False
            keyed_children, treedef = split
            results = [rebuild(child, node) for _, child in keyed_children]
            if not any(changed for _, changed in results):
                return node, False
            return _unflatten_explained(treedef, [new for new, _ in results], node), True

        return rebuild(self.remainder, None)[0]

    def remove_from_parent(self) -> Any:
        """Deletes every selected node from the list or tuple containing it.

        Returns:
            The rebuilt tree.

        Raises:
            ValueError: If a selected node is not an element of a list or tuple.
        """
        return self.apply_and_inline(lambda _: ())

    def insert_before(self, value: Any, and_select: bool = False) -> Any:
        """Inserts ``value`` just before every selected node in its list or tuple.

        Args:
            value: The element to insert (the same object at each place).
            and_select: Return a selection of the inserted copies instead of the tree.

        Returns:
            The rebuilt tree, or a selection of the inserted elements if ``and_select``.

        Raises:
            ValueError: If a selected node is not an element of a list or tuple.
        """
        if and_select:
            return _build_selection(
                self.apply_and_inline(lambda node: (_SelectionBoundary(value), node))
            )
        return self.apply_and_inline(lambda node: (value, node))

    def insert_after(self, value: Any, and_select: bool = False) -> Any:
        """Inserts ``value`` just after every selected node in its list or tuple.

        Args:
            value: The element to insert (the same object at each place).
            and_select: Return a selection of the inserted copies instead of the tree.

        Returns:
            The rebuilt tree, or a selection of the inserted elements if ``and_select``.

        Raises:
            ValueError: If a selected node is not an element of a list or tuple.
        """
        if and_select:
            return _build_selection(
                self.apply_and_inline(lambda node: (node, _SelectionBoundary(value)))
            )
        return self.apply_and_inline(lambda node: (node, value))

    # ----------------------------------------------------------------------------------
    # Partitioning.

    def partition(self, at_leaves: bool = False) -> tuple[Any, Any]:
        """Splits the tree into ``(selected_part, other_part)`` for JAX APIs that take parts.

        ``jax.grad(argnums=...)`` and ``jax.jit(donate_argnums=...)`` address whole
        arguments. Partitioning splits a model into two trees of the same shape:
        ``selected_part`` has ``NotInThisPartition()`` wherever ``other_part`` has data and
        vice versa. ``pz.combine(selected_part, other_part)`` gives the tree back. Partition
        ``other_part`` again to make more parts; ``combine`` merges any number at once.

        Args:
            at_leaves: Put ``NotInThisPartition`` at each leaf, so both parts have exactly the
                original structure. Otherwise a whole missing subtree is one sentinel
                (``combine`` accepts both).

        Returns:
            ``(selected_part, other_part)``.
        """
        placeholder = partitioning.NotInThisPartition()
        inverted = self.invert()
        if at_leaves:
            return (
                inverted.at_pytree_leaves().set(placeholder),
                self.at_pytree_leaves().set(placeholder),
            )
        return inverted.set(placeholder), self.set(placeholder)

    # ----------------------------------------------------------------------------------
    # Visualisation.

    def show_selection(self, ignore_exceptions: bool = False):
        """Displays the selection in IPython, with each selected subtree in a highlighted box.

        Args:
            ignore_exceptions: Render subtrees whose rendering fails as a fallback instead of
                failing the whole display.
        """
        from pz_flax.core._treescope_handlers import selection_rendering

        selection_rendering.display_selection_streaming(
            self, visible_selection=True, ignore_exceptions=ignore_exceptions
        )

    def show_value(self, ignore_exceptions: bool = False):
        """Displays the underlying tree in IPython, expanded down to the selected subtrees.

        Args:
            ignore_exceptions: Render subtrees whose rendering fails as a fallback instead of
                failing the whole display.
        """
        from pz_flax.core._treescope_handlers import selection_rendering

        selection_rendering.display_selection_streaming(
            self, visible_selection=False, ignore_exceptions=ignore_exceptions
        )

    def __treescope_root_repr__(self):
        """Treescope rendering when the selection is the object being displayed."""
        from pz_flax.core._treescope_handlers import selection_rendering

        return selection_rendering.render_selection_to_foldable_representation(
            self, visible_selection=True, ignore_exceptions=True
        )


def _mark_innermost(
    node: Any, keypath: KeyPath, matches: Callable[[KeyPath, Any], bool]
) -> tuple[bool, Any]:
    """Wraps the deepest matching nodes of ``node`` in boundaries (post-order walk).

    Returns:
        ``(found_any, marked_node)``; an unmatched subtree is returned as the same object.
    """
    split = tree_util.tree_flatten_exactly_one_level(node)
    if split is not None:
        keyed_children, treedef = split
        results = [
            _mark_innermost(child, (*keypath, key), matches) for key, child in keyed_children
        ]
        if any(found for found, _ in results):
            return True, _unflatten_explained(treedef, [new for _, new in results], node)
    if matches(keypath, node):
        return True, _SelectionBoundary(node)
    return False, node


def select(tree: Any) -> Selection:
    """Starts a selection containing the whole of ``tree``.

    Args:
        tree: Any pytree (a model, a dict of arrays, ...).

    Returns:
        A ``Selection`` with ``tree`` as its single selected subtree (at key path ``()``),
        ready for ``.at_*`` narrowing and editing methods.
    """
    return Selection(
        selected_by_path=collections.OrderedDict({(): tree}), remainder=SelectionHole(())
    )
