"""``from_nnx`` and ``to_nnx``: converting models between Flax NNX and pz_flax.

``from_nnx`` walks an NNX module tree. A module whose class has a registered mapping becomes
the mapping's pz_flax layer, tagged ``FromNNX``; any other module becomes an ``NNXWrapper``
that runs the module's own code, with its variables as labelled pz_flax variables and its
child modules converted recursively; ``nnx.List``/``nnx.Dict`` become lists/dicts; functions
become ``Elementwise`` layers (activations) or ``WrappedCallable`` layers. No array is copied:
pz_flax variables hold the NNX variables' own arrays.

Sharing survives both directions. A module or variable reachable under several attributes
(weight tying) is converted once per call, and every occurrence gets that one pz_flax layer or
``Parameter`` (pz_flax variables are shared by identity, as in penzai); ``to_nnx`` likewise
builds one NNX module or variable per pz_flax layer or variable object. So
``to_nnx(from_nnx(m))`` lists a tied weight once in ``nnx.state``, exactly as ``m`` does.

``to_nnx`` goes back: ``FromNNX`` layers through their mapping, wrappers by rebuilding the
module, and natively built pz_flax layers either into a ``PzModule`` adapter or, with
``native=True``, into NNX's own layer classes.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from pz_flax._compat import nnx as compat_nnx
from pz_flax._compat import nnx_modules
from pz_flax.core import named_axes
from pz_flax.core import struct
from pz_flax.core import tree_util
from pz_flax.core import variables
from pz_flax.interop import naming as naming_lib
from pz_flax.interop import registry
from pz_flax.interop import wrappers
from pz_flax.nn import basic_ops
from pz_flax.nn import layer as layer_base
from pz_flax.nn import layer_stack


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__module__}.{type(value).__qualname__} ({text})"


def from_nnx(
    module: Any,
    /,
    *,
    overrides: Mapping[Any, Mapping[str, Any]] | None = None,
    strict: bool = False,
    **naming: Any,
) -> Any:
    """Converts a Flax NNX module (or function) into a pz_flax layer.

    Weights are not copied: the result's ``Parameter``/``StateVariable`` objects hold the
    module's own arrays, labelled with their NNX state paths and given axis names by the
    naming convention (see ``pz_flax.interop.naming``). A module or variable that ``module``
    reaches under several paths (tied weights) is converted once, at the path ``nnx.state``
    lists it under (which is also where path overrides apply), and the result shares that one
    layer or ``Parameter`` wherever the NNX model shares it. A shared variable whose users
    would name its axes differently keeps the names of its first user, and the later users
    are wrapped (see ``NNXWrapper``), since one variable has one set of axis names. Under the
    default naming,
    ``from_nnx(m)(pz.nx.wrap(x).tag("batch", "features")).unwrap("batch", "features")``
    equals ``m(x)``.

    Args:
        module: An ``nnx.Module`` (``nnx.List``/``nnx.Dict`` become a list/dict of converted
            entries) or a plain function such as ``nnx.relu``.
        overrides: Naming overrides for some modules: ``{nnx class or "path/to/module":
            {option: value}}``; path overrides win over class overrides.
        strict: Raise instead of wrapping a module whose class has a mapping that cannot
            express its configuration exactly.
        **naming: Naming options for the whole conversion (fields of ``NNXNaming``, e.g.
            ``features="embedding"``).

    Returns:
        The pz_flax layer (or container).

    Raises:
        TypeError: If ``module`` is not an NNX module or a callable, or a naming option is
            unknown.
        ValueError: With ``strict=True``, if a mapped module cannot be converted exactly.
    """
    base_naming = naming_lib.DEFAULT_NAMING.replace(**naming)
    checked_overrides = naming_lib.check_overrides(overrides)
    if isinstance(module, struct.Struct):
        raise TypeError(
            f"from_nnx expects a Flax NNX module or a function, but got the pz_flax object"
            f" {type(module).__qualname__}, which needs no conversion."
        )
    if not isinstance(module, nnx.Module) and not _is_plain_callable(module):
        raise TypeError(
            "from_nnx expects a Flax NNX module (nnx.Module) or a function, got"
            f" {_describe(module)}."
        )

    graph = _GraphIndex()
    memo = registry.IdentityMemo(
        graph.shared_first_paths(module) if isinstance(module, nnx.Module) else None
    )

    def convert(obj: Any, path: tuple[Hashable, ...]) -> Any:
        # Modules are converted once; a shared one at the path nnx.state lists it under.
        # Functions hold no state, so each occurrence is converted with its own naming.
        is_module = isinstance(obj, nnx.Module)
        if is_module and obj in memo:
            return memo.get(obj)
        if is_module:
            path = memo.first_paths.get(id(obj), path)
        stack_size = graph.stack_size(obj) if is_module else None
        if stack_size is not None:
            naming = naming_lib.resolve_naming(base_naming, checked_overrides, type(obj), path)
            converted = _convert_stacked(obj, path, stack_size, naming.stack, convert, memo)
        else:
            converted = _convert_from_nnx(
                obj, path, base_naming, checked_overrides, strict, convert, memo, graph
            )
        if is_module:
            memo.put(obj, converted)
        return converted

    return convert(module, ())


class _GraphIndex:
    """Facts about the nodes of the NNX graph being converted, each worked out once per node.

    Conversion asks the same questions of nested modules over and over (is this a stack of
    layers? which embedding tables lie below it?); answering each from a fresh walk of the
    module's subgraph made conversion quadratic in the model's depth. Here every answer is
    built from the answers of the node's children and remembered, so one conversion visits
    each node once per question. The index lives for one conversion: nodes are keyed by
    identity and held, so their ``id()`` values stay unique while it lives.

    Stacks are modules created by ``nnx.vmap``: a module is a stack of ``n`` layers when every
    variable below it has a leading axis of size ``n`` and some module below it with a
    registered mapping has one axis too many for that mapping (its variables are per-layer
    stacks of the arrays the mapping expects). The stack is the outermost such module that is
    not a mere holder of one stacked child (a module with no variables of its own and a single
    child with variables is not itself stacked: its code is what runs the stack, e.g. with
    ``nnx.scan``).
    """

    def __init__(self):
        self._facts: dict[tuple[str, int], tuple[Any, Any]] = {}

    def _remembered(self, question: str, node: Any, answer: Callable[[Any], Any]) -> Any:
        key = (question, id(node))
        found = self._facts.get(key)
        if found is None:
            found = (node, answer(node))
            self._facts[key] = found
        return found[1]

    def children(self, node: Any) -> list[Any]:
        """The modules and variables directly below ``node``, one entry per edge."""
        return self._remembered("children", node, _graph_edges)

    def shared_first_paths(self, root: nnx.Module) -> dict[int, tuple[Hashable, ...]]:
        """For each module or variable reachable under several paths, the first one, by id.

        First in the order ``nnx.state`` lists paths in, which is where a shared object is
        converted and labelled. A node is shared when it is reached over more than one edge
        of the graph; counting edges is one light walk, and NNX's own path-ordered walk runs
        only when something is shared.
        """
        edges: dict[int, int] = {}
        pending = [root]
        while pending:
            for child in self.children(pending.pop()):
                seen = id(child) in edges
                edges[id(child)] = edges.get(id(child), 0) + 1
                if not seen and _is_nnx_pytree(child):
                    pending.append(child)
        shared = {node_id for node_id, count in edges.items() if count > 1}
        if not shared:
            return {}
        # iter_graph visits each node once, at the first path in the order nnx.state uses.
        return {
            id(node): path
            for path, node in nnx.iter_graph(root)
            if id(node) in shared and isinstance(node, nnx.Module | nnx.Variable)
        }

    def stack_size(self, module: nnx.Module) -> int | None:
        """The number of stacked layers ``module`` is, or None if it is not a stack."""
        if isinstance(module, nnx.List | nnx.Dict):
            return None
        own_variables, children = self.own_variables_and_children(module)
        if not own_variables and len(children) == 1:
            return None
        size = self._common_leading_size(module)
        if size is None:
            return None
        if not self._has_over_ranked(module):
            return None
        return size

    def own_variables_and_children(self, node: Any) -> tuple[list[nnx.Variable], list[Any]]:
        """The variables and child graph nodes held directly in a module's attributes."""
        return self._remembered("own", node, _own_variables_and_children)

    def _module_children(self, node: Any) -> list[Any]:
        return [child for child in self.children(node) if _is_nnx_pytree(child)]

    def embedding_tables(self, node: Any) -> frozenset[tuple[int, int]]:
        """``(num_embeddings, features)`` of every ``nnx.Embed`` in ``node``'s subgraph."""
        return self._remembered("tables", node, self._embedding_tables)

    def _embedding_tables(self, node: Any) -> frozenset[tuple[int, int]]:
        tables = {(node.num_embeddings, node.features)} if isinstance(node, nnx.Embed) else set()
        for child in self._module_children(node):
            tables |= self.embedding_tables(child)
        return frozenset(tables)

    def _common_leading_size(self, node: Any) -> int | None:
        return self._remembered("leading", node, self._leading_size)

    def _leading_size(self, node: Any) -> int | None:
        own_variables, children = self.own_variables_and_children(node)
        sizes = set()
        for variable in own_variables:
            raw = variable.get_raw_value()
            for leaf in (raw,) if _is_array(raw) else jax.tree_util.tree_leaves(raw):
                sizes.add(leaf.shape[0] if getattr(leaf, "ndim", 0) else None)
        for child in children:
            sizes.add(self._common_leading_size(child))
        return sizes.pop() if len(sizes) == 1 else None

    def structure(self, module: nnx.Module) -> Hashable:
        """What a mapping's verdict on ``module`` depends on (see ``_structure``)."""
        return self._remembered("structure", module, _structure)

    def _has_over_ranked(self, node: Any) -> bool:
        """Whether ``node`` or a module in its subgraph is over-ranked for its mapping."""
        return self._remembered(
            "over_ranked_below",
            node,
            lambda node: (
                self._is_over_ranked(node)
                or any(self._has_over_ranked(child) for child in self._module_children(node))
            ),
        )

    def _is_over_ranked(self, node: Any) -> bool:
        if not isinstance(node, nnx.Module):
            return False
        mapping = registry.get_mapping(type(node))
        if mapping is None or not mapping.verify_round_trip:
            return False
        return _mapping_verdict(
            "over_ranked", mapping, self.structure(node), lambda: _is_over_ranked(mapping, node)
        )


def _structure(module: nnx.Module) -> Hashable:
    """A description of ``module`` at least as fine as its graph definition and its shapes.

    Two modules with equal descriptions have equal graph definitions (class, attribute names,
    settings, which attributes are data, variable types and metadata, sharing within the
    module) and variables of equal shapes and dtypes, so a mapping decides the same about
    both. It is read from the attributes directly: ``nnx.split`` builds the same facts in
    several times the time, and conversion asks this of every mapped module.
    """
    numbers: dict[int, int] = {}

    def node_key(node: Any) -> Hashable:
        number = numbers.get(id(node))
        if number is not None:
            return ("shared", number)
        numbers[id(node)] = len(numbers)
        if _is_nnx_variable(node):
            raw = node.get_raw_value()
            metadata = tuple(node.get_metadata().items())
            if _is_array(raw):
                return (type(node), _array_key(raw), metadata)
            leaves, treedef = jax.tree_util.tree_flatten(raw)
            return (type(node), treedef, tuple(map(_array_key, leaves)), metadata)
        attributes = [
            (name, is_data, value_key(value))
            for name, value, is_data in nnx_modules.module_attributes(node)
        ]
        return (type(node), tuple(attributes))

    def value_key(value: Any) -> Hashable:
        if _is_plain_setting(value):
            return (type(value), value)
        if _is_graph_node(value):
            return node_key(value)
        leaves, treedef = jax.tree_util.tree_flatten(value, is_leaf=_is_graph_node)
        return (
            treedef,
            tuple(node_key(leaf) if _is_graph_node(leaf) else _array_key(leaf) for leaf in leaves),
        )

    return node_key(module)


_PLAIN_SETTING_TYPES = frozenset({int, float, bool, str, type(None)})


def _is_plain_setting(value: Any) -> bool:
    """Whether ``value`` is a number, string, None, class (a dtype) or function.

    Such a value holds no graph node or array, so it needs no pytree walk, and it describes
    itself (with its type: ``1``, ``1.0`` and ``True`` are equal but different settings).
    """
    return type(value) in _PLAIN_SETTING_TYPES or isinstance(value, type | types.FunctionType)


def _array_key(leaf: Any) -> Hashable:
    """An array by its shape and dtype (what a mapping may depend on); anything else by value.

    A value comes with its type, since equal values of different types (``1``, ``1.0``,
    ``True``) are different settings.
    """
    if _is_array(leaf):
        return ("array", leaf.shape, leaf.dtype)
    return (type(leaf), leaf)


# Whether values of a type are arrays, remembered by type: ``jax.Array``'s instance check runs
# Python code, and conversion asks it of every variable.
_ARRAY_TYPES: dict[type, bool] = {}


def _is_array(value: Any) -> bool:
    """Whether ``value`` is a JAX or NumPy array (or a tracer)."""
    value_type = type(value)
    known = _ARRAY_TYPES.get(value_type)
    if known is None:
        known = _ARRAY_TYPES[value_type] = isinstance(value, jax.Array | np.ndarray)
    return known


class _RememberedAnswers:
    """Answers about modules, remembered across conversions by what decides them.

    Real models repeat a few layer configurations many times over, and some answers cost
    several times the conversion itself (the exactness check rebuilds the module). An answer
    is remembered under a key naming the question and everything the answer depends on,
    among it the module's structure (see ``_structure``). At most ``LIMIT`` answers are kept.
    """

    LIMIT = 4096

    def __init__(self):
        self._answers: dict[Hashable, tuple[Any, Any]] = {}

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any], keep: Any = None) -> Any:
        """The answer remembered under ``key``, or ``compute()``, remembered if ``key`` hashes.

        Args:
            key: The question and what its answer depends on.
            compute: Works the answer out.
            keep: An object whose ``id()`` is part of ``key``; it is kept with the answer so
                that its id is not reused meanwhile, and the answer is used only for it.
        """
        try:
            known = self._answers.get(key)
        except TypeError:  # an unhashable setting or metadata entry: ask every time
            return compute()
        if known is not None and known[0] is keep:
            return known[1]
        answer = compute()
        if len(self._answers) >= self.LIMIT:
            self._answers.clear()
        self._answers[key] = (keep, answer)
        return answer

    def clear(self) -> None:
        """Forgets every answer."""
        self._answers.clear()


_REMEMBERED = _RememberedAnswers()


def _mapping_verdict(
    question: str,
    mapping: registry.LayerMapping,
    structure: Hashable,
    compute: Callable[[], Any],
    *facts: Hashable,
) -> Any:
    """What ``mapping`` makes of a module of this structure, remembered.

    Besides the question, the mapping and the module's structure, the answer depends on the
    version of the mapping table (whose entries convert a mapped module's children) and on any
    further facts the question names. Registering or unregistering a mapping changes the
    table's version, so no stale answer is used.
    """
    key = (question, id(mapping), registry.mapping_registry.version, structure, *facts)
    return _REMEMBERED.get_or_compute(key, compute, keep=mapping)


def _graph_edges(node: Any) -> list[Any]:
    """The graph nodes directly below ``node``: NNX pytrees (modules) and variables.

    Attributes are followed through plain pytrees (lists, dicts, tuples), so the children of
    the nodes below a module reach exactly the modules and variables ``nnx.iter_graph``
    visits. One entry per edge: a node held under two attributes is listed twice.
    """
    if not _is_nnx_pytree(node):
        return []
    found = []
    for _, value in compat_nnx.own_attributes(node):
        if _is_graph_node(value):
            found.append(value)
        elif not _is_plain_setting(value):
            found.extend(
                leaf
                for leaf in jax.tree_util.tree_leaves(value, is_leaf=_is_graph_node)
                if _is_graph_node(leaf)
            )
    return found


_VARIABLE, _PYTREE = "variable", "pytree"
_NODE_KINDS: dict[type, str | None] = {}


def _node_kind(value: Any) -> str | None:
    """``_VARIABLE`` for an ``nnx.Variable``, ``_PYTREE`` for an ``nnx.Pytree``, else None.

    Remembered by type: NNX's variable metaclass makes a negative ``isinstance`` answer slow
    (it asks about tracers and hijax variables too), ``nnx.Pytree``'s is an abstract base
    class check, and conversion asks both of every attribute of a model. Unlike
    ``tree_util.is_variable_node`` this is exactly NNX's notion (pz_flax's own value and slot
    types are not NNX variables). Tracers, whose type does not say, are never remembered.
    """
    value_type = type(value)
    try:
        return _NODE_KINDS[value_type]
    except KeyError:
        pass
    if isinstance(value, nnx.Variable):
        kind = _VARIABLE
    elif isinstance(value, nnx.Pytree):
        kind = _PYTREE
    else:
        kind = None
    if not isinstance(value, jax.core.Tracer):
        _NODE_KINDS[value_type] = kind
    return kind


def _is_nnx_variable(value: Any) -> bool:
    return _node_kind(value) is _VARIABLE


def _is_nnx_pytree(value: Any) -> bool:
    return _node_kind(value) is _PYTREE


def _is_graph_node(value: Any) -> bool:
    return _node_kind(value) is not None


def _is_over_ranked(mapping: registry.LayerMapping, module: nnx.Module) -> bool:
    """Whether ``module``'s variables have one axis too many for ``mapping``."""
    trial = registry.FromNNXContext(
        naming=naming_lib.DEFAULT_NAMING, path=(), convert_child=lambda child, path: None
    )
    try:
        mapping.to_pz(module, trial)
    except registry.AxisCountMismatch:
        return True
    except Exception:
        # MappingNotApplicable: the mapping declines for another reason. Anything else: the
        # trial's children are placeholders (None), which a mapping may fairly trip over; a
        # genuine bug is reported, with the module's path, when the module itself is
        # converted.
        return False
    return False


def _own_variables_and_children(node: Any) -> tuple[list[nnx.Variable], list[Any]]:
    """The variables and the child graph nodes held directly in a module's attributes."""
    own, children = [], []
    if isinstance(node, nnx.List):
        values = list(node)
    elif isinstance(node, nnx.Dict):
        values = list(node.values())
    else:
        values = [value for _, value in compat_nnx.own_attributes(node)]
    for value in values:
        kind = _node_kind(value)
        if kind is _VARIABLE:
            own.append(value)
        elif kind is _PYTREE:
            children.append(value)
    return own, children


def _convert_stacked(module, path, size, stack_axis, convert, memo) -> Any:
    """Converts a stack of ``size`` layers into a ``LayerStack`` over ``stack_axis``.

    The first layer is converted like any module; its pz_flax variables then take the whole
    stacked arrays (no copy), named with ``stack_axis`` in front.
    """
    graphdef, variable_paths = _module_layout(module)
    stacked_arrays = [
        wrappers.variable_at(module, variable_path).get_raw_value()
        for variable_path in variable_paths
    ]
    first_layer = nnx.merge(
        graphdef,
        nnx.from_flat_state(list(zip(variable_paths, _first_slices(stacked_arrays)))),
    )
    converted = convert(first_layer, path)
    for variable_path, stacked in zip(variable_paths, stacked_arrays):
        pz_variable = memo.get(wrappers.variable_at(first_layer, variable_path))
        if pz_variable is None:
            continue
        layer_names = tuple(pz_variable.get_metadata().get(variables._AXIS_NAMES_KEY) or ())
        positional = tuple(
            f"{stack_axis}_dim{index}" for index in range(stacked.ndim - 1 - len(layer_names))
        )
        names = (stack_axis, *positional, *layer_names)
        if isinstance(stacked, jax.Array) and len(set(names)) == len(names):
            # What assigning the named stacked array does, without building it: the raw
            # value is the array itself and every axis is named.
            pz_variable.set_metadata(**{variables._AXIS_NAMES_KEY: names})
            pz_variable.set_raw_value(stacked)
        else:  # the named value's own checks (repeated names) and conversions
            type(pz_variable).value.fset(pz_variable, named_axes.wrap(stacked).tag(*names))
        if isinstance(pz_variable, variables.StateVariable):
            pz_variable.metadata = {
                **pz_variable.metadata,
                "layerstack_axes": {stack_axis: layer_stack.LayerStackVarBehavior.PER_LAYER},
            }
    return layer_stack.LayerStack(
        stacked_sublayers=converted, stack_axis=stack_axis, stack_axis_size=size
    )


@jax.jit
def _first_slices_in_one_call(stacked: list[jax.Array]) -> list[jax.Array]:
    return [array[0] for array in stacked]


def _first_slices(stacked: list[jax.Array]) -> list[jax.Array]:
    """The first layer's arrays of a stack: slice 0 of each stacked array.

    One compiled call for all of them: an eager slice per array costs tens to hundreds of
    microseconds each, as much as converting the whole first layer. Arrays that cannot go
    into one computation (committed to different devices) are sliced one by one.
    """
    try:
        return _first_slices_in_one_call(stacked)
    except ValueError:
        return [jax.lax.index_in_dim(array, 0, keepdims=False) for array in stacked]


def _is_plain_callable(value: Any) -> bool:
    return (
        callable(value)
        and not isinstance(value, type)
        and not tree_util.is_variable_node(value)
        and not isinstance(value, struct.Struct)
    )


def _convert_from_nnx(obj, path, base_naming, overrides, strict, convert, memo, graph):
    """Converts one object found in an NNX tree; ``convert`` recurses into children."""
    if isinstance(obj, nnx.Module):
        mapping = registry.get_mapping(type(obj))
        naming = naming_lib.resolve_naming(
            base_naming, overrides, type(obj), path, mapping.naming if mapping else None
        )
        context = registry.FromNNXContext(
            naming=naming,
            path=path,
            convert_child=_converting_child(
                convert, lambda child, child_path: f"the child at {_describe_path(child_path)}"
            ),
            memo=memo,
        )
        wrapped_because = ""
        if mapping is not None:
            mark = memo.mark()
            where = _describe_path(path)
            try:
                return _apply_mapping(mapping, obj, context, graph)
            except registry.MappingNotApplicable as exc:
                # The module is wrapped instead: what the attempt converted must not be reused.
                memo.rollback(mark)
                wrapped_because = f"{type(mapping).__name__}: {exc}"
                if strict:
                    raise ValueError(
                        f"Cannot convert {type(obj).__qualname__} at {where} with"
                        f" {type(mapping).__name__}: {exc}"
                    ) from exc
            except Exception as exc:
                if _is_child_failure(exc):
                    raise  # Not this mapping's: it passes on what a child's conversion raised.
                failed = f"{type(mapping).__name__} failed converting the {type(obj).__qualname__}"
                raise _mapping_error(f"{failed} at {where}", exc) from exc
        return wrap_module(obj, context, wrapped_because, graph)
    naming = naming_lib.resolve_naming(base_naming, overrides, None, path)
    if _is_plain_callable(obj):
        return _convert_function(obj, naming)
    raise TypeError(f"from_nnx cannot convert {_describe(obj)} found at {_describe_path(path)}.")


def _describe_path(path: tuple[Hashable, ...]) -> str:
    return "/".join(map(str, path)) or "<root>"


class _ChildFailureNote(str):
    """The note added to an exception that escapes the conversion of a mapping's child.

    Its type marks the exception as the child's, so that the parent's mapping passes it on
    unchanged instead of reporting it as its own failure; its text says where it was raised.
    """


def _converting_child(convert: Callable[..., Any], describe: Callable[..., str]) -> Any:
    """``convert`` for the children of a mapped module or layer, marking what escapes it."""

    def convert_child(*args: Any) -> Any:
        try:
            return convert(*args)
        except Exception as exc:
            if not _is_child_failure(exc):
                exc.add_note(_ChildFailureNote(f"(raised while converting {describe(*args)})"))
            raise

    return convert_child


def _mapping_error(failed: str, exc: Exception) -> registry.MappingError:
    return registry.MappingError(
        f"{failed} ({type(exc).__name__}: {exc}). A mapping declines only by raising"
        " MappingNotApplicable (or by returning None from to_nnx); anything else is a bug in the"
        " mapping, or a Flax change it does not handle."
    )


def _is_child_failure(exc: BaseException) -> bool:
    return any(isinstance(note, _ChildFailureNote) for note in getattr(exc, "__notes__", ()))


def _apply_mapping(mapping: registry.LayerMapping, module: Any, context, graph: _GraphIndex) -> Any:
    converted = mapping.to_pz(module, context)
    config = dict(mapping.config_for(module))
    if context.naming != naming_lib.DEFAULT_NAMING:
        # The reverse conversion must read axis names the way they were written.
        config["naming"] = context.naming
    if mapping.verify_round_trip:
        inexact = _inexactness(mapping, module, converted, config, context.naming, graph)
        if inexact is not None:
            raise registry.MappingNotApplicable(inexact)
    if not mapping.callable_result:
        return converted
    return wrappers.FromNNX(layer=converted, nnx_type=type(module), nnx_config=config)


def _inexactness(
    mapping: registry.LayerMapping,
    module: nnx.Module,
    converted: Any,
    config: dict[str, Any],
    naming: naming_lib.NNXNaming,
    graph: _GraphIndex,
) -> str | None:
    """Why ``converted`` does not capture ``module`` exactly, or None if it does.

    Exact means that ``mapping.to_nnx`` rebuilds, from ``converted``, a module with the
    graph definition of ``module``. The verdict is remembered (see ``_mapping_verdict``).
    """
    structure = graph.structure(module)

    def check() -> str | None:
        rebuilt = mapping.to_nnx(converted, _reverse_context(naming), config)
        if rebuilt is None:
            return f"{type(mapping).__name__}.to_nnx did not accept its own to_pz result."
        if nnx.graphdef(rebuilt) != nnx.graphdef(module):
            return (
                "the module has settings its pz_flax form does not capture"
                f" ({_differing_settings(module, rebuilt)}; rebuilding it from the pz_flax"
                " form gives a different graph definition)."
            )
        return None

    return _mapping_verdict("inexactness", mapping, structure, check, naming)


def _differing_settings(module: nnx.Module, rebuilt: nnx.Module) -> str:
    """Names the attributes (or variable metadata) where two modules of one class differ."""
    differences = []
    mine_by_name = dict(compat_nnx.own_attributes(module))
    theirs_by_name = dict(compat_nnx.own_attributes(rebuilt))
    for name in sorted(set(mine_by_name) | set(theirs_by_name)):
        mine, theirs = mine_by_name.get(name), theirs_by_name.get(name)
        if isinstance(mine, nnx.Variable) and isinstance(theirs, nnx.Variable):
            mine, theirs = mine.get_metadata(), theirs.get_metadata()
            if mine != theirs:
                changed = sorted(
                    key for key in set(mine) | set(theirs) if mine.get(key) != theirs.get(key)
                )
                differences.append(f"metadata {changed} of variable {name!r}")
        elif isinstance(mine, nnx.Module) or isinstance(theirs, nnx.Module):
            continue
        elif type(mine) is not type(theirs) or not _same_setting(mine, theirs):
            differences.append(f"{name}={mine!r}")
    return ", ".join(differences) or "a difference in its children or structure"


def _same_setting(first: Any, second: Any) -> bool:
    try:
        return bool(first == second)
    except Exception:  # values without a plain equality (arrays)
        return first is second


def _convert_function(fn: Any, naming: naming_lib.NNXNaming) -> Any:
    if basic_ops.is_elementwise_function(fn):
        return basic_ops.Elementwise(fn)
    if fn is jax.nn.softmax:
        return basic_ops.Softmax(naming.features)
    return wrappers.WrappedCallable(
        fn=fn,
        input_axes=naming.input_axes or (naming.features,),
        output_axes=naming.output_axes,
        feature_axis=naming.features,
    )


def wrap_module(
    module: nnx.Module,
    context: registry.FromNNXContext,
    wrapped_because: str = "",
    graph: _GraphIndex | None = None,
) -> wrappers.NNXWrapper:
    """Wraps an NNX module so that it runs its own code inside a pz_flax model.

    Child modules (attributes holding ``nnx.Module`` objects, including ``nnx.List`` and
    ``nnx.Dict``) are converted with ``from_nnx`` and put back when the module is rebuilt;
    attributes that already hold pz_flax objects are kept as they are; everything else stays
    in the module's graph definition, and its variables become pz_flax variables.

    Args:
        module: The module.
        context: Naming and path of the module.
        wrapped_because: Why its class's mapping did not apply, if it has one.
        graph: The facts already worked out about the graph being converted, if any.

    Returns:
        The wrapper layer.
    """
    children = {}
    pz_attributes = {}
    for name, value in compat_nnx.own_attributes(module):
        if isinstance(value, nnx.Module):
            children[name] = context.convert(value, name)
        elif wrappers.is_pz_object(value):
            pz_attributes[name] = value
    shell_graphdef, shell_paths = _module_layout(_shell_of(module, (*children, *pz_attributes)))
    wrapped_variables = {}
    variable_paths = {}
    for path in shell_paths:
        key = "/".join(str(part) for part in path)
        original = wrappers.variable_at(module, path)
        variable_paths[key] = path
        shared = context.memo.get(original)
        if shared is not None:
            # A tied variable converted elsewhere: the wrapper runs on its raw array, whatever
            # names it was given there.
            wrapped_variables[key] = shared
            continue
        names = (
            wrappers.wrapped_axis_names(module, path[0], original, context.naming)
            if len(path) == 1
            else None
        )
        label = context.variable_label(original, *path)
        pz_class = (
            variables.Parameter if isinstance(original, nnx.Param) else variables.StateVariable
        )
        wrapped_variables[key] = registry.pz_variable_like(
            original, pz_class, registry.variable_value(original), label, axis_names=names
        )
        context.memo.put(original, wrapped_variables[key])
    naming = context.naming
    required_input_axes = wrappers.wrapped_input_axes(module, naming)
    return wrappers.NNXWrapper(
        variables=wrapped_variables,
        children=children,
        pz_attributes=pz_attributes,
        module_type=type(module),
        shell=wrappers.ModuleShell(shell_graphdef),
        variable_paths=variable_paths,
        input_axes=naming.input_axes or (*required_input_axes, naming.features),
        output_axes=naming.output_axes,
        call_signature=_call_signature(type(module)),
        required_input_axes=() if naming.input_axes else required_input_axes,
        feature_axis=naming.features,
        vocabulary_axis=_vocabulary_axis(module, naming, graph or _GraphIndex()),
        wrapped_because=wrapped_because,
    )


# Reading a signature (``inspect``) costs more than wrapping a small module; a class's is read
# once for each ``__call__`` it has had.
_CALL_SIGNATURES: dict[tuple[type, Any], wrappers.CallSignature] = {}


def _call_signature(module_type: type) -> wrappers.CallSignature:
    # The class's own ``__call__`` as its MRO defines it (what ``inspect.getattr_static``
    # finds, in a fraction of the time).
    own_call = next(
        (vars(klass)["__call__"] for klass in module_type.__mro__ if "__call__" in vars(klass)),
        None,
    )
    key = (module_type, own_call)
    signature = _CALL_SIGNATURES.get(key)
    if signature is None:
        signature = _CALL_SIGNATURES[key] = wrappers.CallSignature.of(module_type)
    return signature


def _shell_of(module: nnx.Module, removed: tuple[str, ...]) -> nnx.Module:
    """A shallow copy of ``module`` without the attributes ``removed``; ``module`` is untouched.

    What a wrapper keeps in its graph definition. The copy shares the module's variables and
    attribute values (it is only split, never run or changed), so making it costs one
    attribute dictionary, not a walk of the module's subtree: the children are converted on
    their own, and copying them here too would make wrapping nested modules quadratic.
    """
    return nnx_modules.shallow_copy_without(module, removed)


def _module_layout(module: nnx.Module) -> tuple[Any, tuple[tuple[Hashable, ...], ...]]:
    """A module's graph definition and the paths of its variables, in NNX's order.

    Remembered by the module's structure (see ``_structure``): modules of one configuration
    have equal graph definitions and the same variable paths, and splitting each of them
    again (a wrapper's shell, a stack of layers) would cost more than the rest of converting
    it.
    """

    def split() -> tuple[Any, tuple[tuple[Hashable, ...], ...]]:
        graphdef, state = nnx.split(module)
        return graphdef, tuple(tuple(path) for path, _ in nnx.to_flat_state(state))

    return _REMEMBERED.get_or_compute(("layout", _structure(module)), split)


def _vocabulary_axis(
    module: nnx.Module, naming: naming_lib.NNXNaming, graph: _GraphIndex
) -> tuple[int, str] | None:
    """``(size, name)`` of the vocabulary of the one embedding table inside ``module``.

    None when there is no such table, several, or one whose vocabulary is as large as its
    feature axis (then an output axis of that size could be either).
    """
    tables = graph.embedding_tables(module)
    sizes = {vocabulary for vocabulary, features in tables if vocabulary != features}
    if len(sizes) != 1 or len(tables) != 1:
        return None
    return (sizes.pop(), naming.vocabulary)


def rebuild_wrapped_module(
    wrapper: wrappers.NNXWrapper,
    bindings: list | None = None,
    native: bool = False,
    naming: naming_lib.NNXNaming = naming_lib.DEFAULT_NAMING,
) -> nnx.Module:
    """Rebuilds the NNX module an ``NNXWrapper`` stands for, around its current arrays.

    Args:
        wrapper: The wrapper.
        bindings: If given, receives ``(pz variable, module, path)`` for each variable put
            into the rebuilt module tree, for writing state changes back.
        native: Convert children to native NNX layers only (see ``to_nnx``).
        naming: Naming convention for natively built children.

    Returns:
        A module of the wrapped class, whose variables hold the wrapper's arrays.
    """
    context = _reverse_context(naming, native)
    context.bindings = bindings
    return _rebuild(wrapper, context)


def _rebuild(wrapper: wrappers.NNXWrapper, context: registry.ToNNXContext) -> nnx.Module:
    entries = [
        (wrapper.variable_paths[key], variable, wrappers.raw_value_of(variable))
        for key, variable in wrapper.variables.items()
    ]
    graphdef = wrapper.shell.graphdef
    module = nnx.merge(graphdef, nnx.from_flat_state([(path, raw) for path, _, raw in entries]))
    tied = [
        context.shared_variable(variable, raw, type(wrappers.variable_at(module, path)))
        for path, variable, raw in entries
    ]
    if any(shared is not None for shared in tied):
        # Some variables were already built in this conversion (tied weights). merge keeps the
        # NNX variable objects it is given, so passing those makes the module share them.
        flat = [
            (path, raw if shared is None else shared)
            for (path, _, raw), shared in zip(entries, tied)
        ]
        module = nnx.merge(graphdef, nnx.from_flat_state(flat))
    for path, variable, raw in entries:
        context.remember_variable(variable, raw, wrappers.variable_at(module, path))
    if context.bindings is not None:
        for key, variable in wrapper.variables.items():
            context.bindings.append((variable, module, wrapper.variable_paths[key]))
    for name, child in wrapper.children.items():
        setattr(module, name, context.convert(child))
    for name, value in wrapper.pz_attributes.items():
        setattr(module, name, value)
    return module


def _reverse_context(naming: naming_lib.NNXNaming, native: bool = False) -> registry.ToNNXContext:
    """A ``to_nnx`` context whose children are converted by the ``to_nnx`` engine."""
    context = registry.ToNNXContext(naming=naming, native=native, convert_child=None)
    context.convert_child = _converting_child(
        lambda layer: _to_nnx(layer, context), lambda layer: f"a child {type(layer).__name__}"
    )
    return context


def to_nnx(
    layer: Any,
    /,
    *,
    native: bool = False,
    input_names: tuple[str, ...] | None = None,
    **naming: Any,
) -> Any:
    """Converts a pz_flax layer into a Flax NNX module.

    * A layer made by ``from_nnx`` comes back as an object of the original NNX class whose
      ``nnx.state`` has the same paths and the same arrays (edits made on the pz_flax side
      are carried over).
    * A natively built pz_flax layer becomes a ``PzModule``: an ``nnx.Module`` called like the
      layer (with positional arrays named by the naming convention), exposing the layer's
      parameters to ``nnx.state(..., nnx.Param)`` and ``nnx.Optimizer``.
    * With ``native=True``, every sublayer must have a native NNX counterpart (``Affine`` ->
      ``nnx.Linear``, ``LayerNorm`` -> ``nnx.LayerNorm``, ``Sequential`` -> ``nnx.Sequential``,
      ``Elementwise(relu)`` -> ``relu``, ...), and the result is built from NNX's own classes.

    Args:
        layer: A pz_flax layer, or a list/dict of them (giving ``nnx.List``/``nnx.Dict``).
        native: Produce NNX's own layer classes only, raising if some sublayer has none.
        input_names: For a ``PzModule`` result: names of the positional input's axes.
        **naming: Naming options (fields of ``NNXNaming``) assumed for natively built layers.

    Returns:
        The NNX module (or ``nnx.List``/``nnx.Dict``).

    Raises:
        TypeError: If ``layer`` is not a pz_flax layer or container of layers.
        ValueError: With ``native=True``, if a sublayer has no NNX counterpart.
    """
    naming_obj = naming_lib.DEFAULT_NAMING.replace(**naming)
    if isinstance(layer, nnx.Module):
        raise TypeError(
            f"to_nnx expects a pz_flax layer, but got the NNX module {type(layer).__qualname__},"
            " which needs no conversion."
        )
    if not (isinstance(layer, list | tuple | dict) or _is_pz_layer(layer)):
        raise TypeError(f"to_nnx expects a pz_flax layer, got {_describe(layer)}.")

    context = _reverse_context(naming_obj, native)
    if not native and not _came_from_nnx(layer):
        return wrappers.PzModule(layer, input_names=input_names, naming=naming_obj)
    result = _to_nnx(layer, context)
    if not isinstance(result, nnx.Module):
        # A bare function (e.g. an activation) is still returned as a module.
        result = nnx.Sequential(result)
    return result


def _came_from_nnx(layer: Any) -> bool:
    """Whether ``to_nnx`` rebuilds ``layer`` as NNX classes rather than a ``PzModule``.

    So it does for what ``from_nnx`` made at the root: a mapped or wrapped module, a
    container, or the ``LayerStack`` of an ``nnx.vmap``-stacked module (its stacked layer is
    one of the former).
    """
    if isinstance(layer, layer_stack.LayerStack):
        layer = layer.stacked_sublayers
    return isinstance(
        layer,
        wrappers.FromNNX | wrappers.NNXWrapper | wrappers.WrappedCallable | list | tuple | dict,
    )


def _is_pz_layer(value: Any) -> bool:
    return isinstance(value, layer_base.Layer) or (
        isinstance(value, struct.Struct) and callable(value)
    )


def _to_nnx(layer: Any, context: registry.ToNNXContext) -> Any:
    """Converts one pz_flax object to its NNX form, once per object (shared stays shared)."""
    if layer in context.memo:
        return context.memo.get(layer)
    converted = _convert_to_nnx(layer, context)
    context.memo.put(layer, converted)
    return converted


def _try_mapping(
    mapping: registry.LayerMapping,
    layer: Any,
    context: registry.ToNNXContext,
    config: Mapping[str, Any],
) -> Any:
    """``mapping.to_nnx``, forgetting what it built if it declines the layer.

    A mapping declines by returning None or raising ``MappingNotApplicable``; any other
    exception is reported as a ``MappingError``.
    """
    mark = context.memo.mark()
    try:
        module = mapping.to_nnx(layer, context, config)
    except registry.MappingNotApplicable:
        module = None
    except Exception as exc:
        if _is_child_failure(exc):
            raise  # Not this mapping's: it passes on what a child's conversion raised.
        failed = f"{type(mapping).__name__}.to_nnx failed on a {type(layer).__qualname__}"
        raise _mapping_error(failed, exc) from exc
    if module is None:
        context.memo.rollback(mark)
    return module


def _convert_to_nnx(layer: Any, context: registry.ToNNXContext) -> Any:
    """Converts one pz_flax object to its NNX form (module, function or container)."""
    if isinstance(layer, wrappers.FromNNX):
        mapping = registry.get_mapping(layer.nnx_type)
        if mapping is not None:
            module = _try_mapping(mapping, layer.layer, context, layer.nnx_config)
            if module is not None:
                return module
        if context.native:
            return _to_native(layer.layer, context)
        return wrappers.PzModule(
            layer,
            naming=context.naming,
            input_names_for_rank=MappedInputNames(layer.nnx_type, layer.nnx_config, context.naming),
        )
    if isinstance(layer, wrappers.NNXWrapper):
        return _rebuild(layer, context)
    if isinstance(layer, layer_stack.LayerStack) and not context.native:
        return _stacked_to_nnx(layer, context)
    if isinstance(layer, wrappers.WrappedCallable):
        return layer.fn
    if isinstance(layer, list | tuple):
        return nnx.List([_to_nnx(item, context) for item in layer])
    if isinstance(layer, dict):
        return nnx.Dict({key: _to_nnx(item, context) for key, item in layer.items()})
    function = _as_function(layer, context.naming)
    if function is not None:
        return function
    if context.native:
        return _to_native(layer, context)
    if _is_pz_layer(layer):
        return wrappers.PzModule(layer, naming=context.naming)
    raise TypeError(f"to_nnx cannot convert {_describe(layer)}.")


def _stacked_to_nnx(layer: layer_stack.LayerStack, context: registry.ToNNXContext) -> Any:
    """Builds the ``nnx.vmap``-style NNX module of a ``LayerStack``: one module, stacked arrays.

    The stack's first layer is converted (from copies of its variables holding slice 0), and
    every variable of the result then takes the whole stacked array of the variable it came
    from, so the module has exactly the layout ``nnx.vmap`` creates.
    """
    stack_axis = layer.stack_axis
    pure, stacked_variables = variables.unbind_variables(layer.stacked_sublayers)
    originals_by_slice = {}
    slices = []
    for variable in stacked_variables:
        value = variable.value
        if not (named_axes.is_namedarray(value) and stack_axis in value.named_shape):
            slices.append(variable)
            continue
        first = value[{stack_axis: 0}]
        names = tuple(first.named_shape)
        if all(name.startswith(f"{stack_axis}_dim") for name in names):
            first = first.unwrap(*names)
        metadata = {
            key: entry for key, entry in variable.metadata.items() if key != "layerstack_axes"
        }
        copy = type(variable)(value=first, label=variable.label, metadata=metadata)
        originals_by_slice[id(copy.get_raw_value())] = variable
        slices.append(copy)
    first_mark = None if context.bindings is None else len(context.bindings)
    module = context.convert(variables.bind_variables(pure, slices))
    for _, nnx_variable in nnx.to_flat_state(nnx.state(module)):
        original = originals_by_slice.get(id(nnx_variable.get_raw_value()))
        if original is not None:
            nnx_variable.set_value(original.get_raw_value())
    if first_mark is not None:
        # State written back after a call must reach the stacked variables, not the slices.
        by_copy = {id(copy): original for copy, original in zip(slices, stacked_variables)}
        context.bindings[first_mark:] = [
            (by_copy.get(id(variable), variable), built, path)
            for variable, built, path in context.bindings[first_mark:]
        ]
    return module


@dataclasses.dataclass(frozen=True)
class MappedInputNames:
    """How the NNX class of an edited layer names its positional input, by input rank.

    What ``to_nnx`` gives the ``PzModule`` it makes of an edited ``FromNNX`` layer. Plain data
    (the class, the settings its mapping recorded, the naming), not a closure, so that an NNX
    model holding such a module converts back with ``from_nnx`` and saves in a checkpoint.

    Attributes:
        nnx_type: The NNX class the layer came from.
        nnx_config: The settings its mapping recorded (``FromNNX.nnx_config``).
        naming: The naming convention of the conversion.
    """

    nnx_type: type[Any]
    nnx_config: dict[str, Hashable]
    naming: naming_lib.NNXNaming

    def __hash__(self) -> int:
        # NNX hashes a module's static attributes (jit caches); the settings are hashable.
        return hash((self.nnx_type, tuple(sorted(self.nnx_config.items())), self.naming))

    def __call__(self, ndim: int) -> tuple[str, ...] | None:
        mapping = registry.get_mapping(self.nnx_type)
        if mapping is None:
            return None
        naming = self.nnx_config.get("naming", self.naming)
        return mapping.input_names(self.nnx_config, naming, ndim)


def _as_function(layer: Any, naming: naming_lib.NNXNaming) -> Any:
    """The positional function a pz_flax function layer is equivalent to, if any."""
    if isinstance(layer, basic_ops.Elementwise) and basic_ops.is_elementwise_function(layer.fn):
        return layer.fn
    if isinstance(layer, basic_ops.Softmax):
        axes = (layer.axes,) if isinstance(layer.axes, str) else tuple(layer.axes)
        if axes == (naming.features,):
            return jax.nn.softmax
    return None


def _to_native(layer: Any, context: registry.ToNNXContext) -> Any:
    for mapping in registry.mappings_for_pz_type(type(layer)):
        module = _try_mapping(mapping, layer, context, {})
        if module is not None:
            return module
    raise ValueError(
        f"to_nnx(native=True): the pz_flax layer {type(layer).__qualname__} has no native NNX"
        " counterpart (no registered mapping accepts it in this form). Use native=False to"
        f" wrap it in a PzModule instead. The layer: {_describe(layer)}"
    )
