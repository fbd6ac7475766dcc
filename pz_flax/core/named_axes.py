"""Named axes for JAX arrays, in a "locally positional" style (``pz.nx``).

Positional axis indices are a common source of silent bugs: transposing an input or adding a
batch dimension quietly changes what ``axis=-1`` means. Naming axes fixes that, but a named
version of every NumPy/JAX function would be an enormous API. This module takes a smaller
route: a ``NamedArray`` has *named* axes, which every operation maps over automatically, and
*positional* axes, which operations see as ordinary array axes. To work on a named axis you
temporarily make it positional with ``untag``, run any positional code through ``nmap`` (or
one of the wrapped methods and operators, which use ``nmap``), and give names back to the
resulting positional axes with ``tag``::

    scores = nmap(jnp.dot)(queries.untag("embed"), keys.untag("embed"))
    weights = nmap(jax.nn.softmax)(scores.untag("kv_seq")).tag("kv_seq")

Inside ``nmap`` the function sees only the positional axes; every axis name found in any
argument is vectorized over (jointly, when several arguments share the name) and appears in
every output. Names that exist in only some arguments are broadcast, which is how
``a + b`` combines arrays with different sets of names.

Two concrete classes carry the data:

* ``NamedArray`` stores positional axes first and named axes last, in ``named_axes`` order.
  This is the layout to use with ``jax.tree_util``/``jax.lax.scan``, which work on leading
  axes.
* ``NamedArrayView`` lets positional and named axes sit anywhere in the data array. Many
  operations (``untag``, ``nmap`` outputs) produce views, because that avoids transposing the
  data; ``with_positional_prefix`` turns a view back into a ``NamedArray``.

The order in which named axes are stored is part of the pytree structure (it is static
metadata), so two arrays with the same named shape can still have different tree
structures; ``order_like``/``order_as``/``canonicalize`` line them up when that matters.

This module reproduces penzai 0.2.5's ``penzai.core.named_axes`` API and results (including
the internal layout of results, so pytree structures agree with penzai's), with cheaper
paths for elementwise operators and reductions that skip ``jax.vmap`` tracing.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import functools
import operator
import typing
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pz_flax.core import struct

# Axis names may be any hashable except integers, which would be confused with positional
# axis indices.
AxisName: typing.TypeAlias = Hashable


class TmpPosAxisMarker:
    """A throwaway axis name that cannot collide with any other name.

    Instances compare equal only to themselves (default object identity), so code can name
    positional axes temporarily (e.g. to move them around with ``tag``/``untag``) without
    risking a clash with the user's axis names.
    """


# ---------------------------------------------------------------------------------------------
# Low-level helpers on the (data array, name->data axis, positional->data axis) description.
# ---------------------------------------------------------------------------------------------

# An array's layout as used internally: (data_array, data_axis_for_name,
# data_axis_for_logical_axis, data_shape).
_Layout: typing.TypeAlias = tuple[Any, Mapping[AxisName, int], tuple[int, ...], tuple[int, ...]]


def _new_named_array(named_axes: collections.OrderedDict, data_array: Any) -> NamedArray:
    """Builds a ``NamedArray`` from fields already known to be consistent.

    Skips the dataclass ``__init__`` machinery; this is on the path of every operation.
    """
    instance = object.__new__(NamedArray)
    instance.__dict__["named_axes"] = named_axes
    instance.__dict__["data_array"] = data_array
    return instance


def _new_view(
    data_shape: tuple[int, ...],
    data_axis_for_logical_axis: tuple[int, ...],
    data_axis_for_name: dict[AxisName, int],
    data_array: Any,
) -> NamedArrayView:
    """Builds a ``NamedArrayView`` from fields already known to be consistent."""
    instance = object.__new__(NamedArrayView)
    fields = instance.__dict__
    fields["data_shape"] = data_shape
    fields["data_axis_for_logical_axis"] = data_axis_for_logical_axis
    fields["data_axis_for_name"] = data_axis_for_name
    fields["data_array"] = data_array
    return instance


def _named_array_in_data_order(
    data: Any, afn: Mapping[AxisName, int], shape: tuple[int, ...]
) -> NamedArray:
    """Wraps a fully named data array as a ``NamedArray``, keeping the data's axis order."""
    names_by_axis = [None] * len(shape)
    for name, axis in afn.items():
        names_by_axis[axis] = name
    return _new_named_array(collections.OrderedDict(zip(names_by_axis, shape)), data)


def _check_name_types(names: Sequence[Any], operation: str) -> None:
    integer_names = [name for name in names if isinstance(name, int)]
    if integer_names:
        raise ValueError(
            f"Integers are not allowed as axis names, to avoid confusion with positional axis"
            f" indices; `{operation}` got the names {tuple(names)} (integer names:"
            f" {integer_names})."
        )


def _check_requested_names(
    axis_order: Sequence[AxisName], afn: Mapping[AxisName, int], shape, operation: str
) -> None:
    """Raises ValueError if ``axis_order`` repeats a name or names an absent axis."""
    if len(set(axis_order)) != len(axis_order):
        repeated = [name for name, count in collections.Counter(axis_order).items() if count > 1]
        raise ValueError(
            f"Repeats in `axis_order` are not allowed. `{operation}` got {tuple(axis_order)},"
            f" which repeats {repeated}."
        )
    missing = [name for name in axis_order if name not in afn]
    if missing:
        raise ValueError(
            f"Requested axis names {set(missing)} are not present in the array. `{operation}`"
            f" was called on an array with named shape"
            f" {_named_shape_of(afn, shape)}."
        )


def _named_shape_of(afn: Mapping[AxisName, int], shape: tuple[int, ...]) -> dict:
    return {name: shape[axis] for name, axis in afn.items()}


def _broadcast_positional_shapes(shapes: Sequence[tuple[int, ...]], context: str) -> tuple:
    """NumPy-broadcasts positional shapes, raising a ValueError that names every shape."""
    rank = max(len(shape) for shape in shapes)
    result = [1] * rank
    for shape in shapes:
        offset = rank - len(shape)
        for i, size in enumerate(shape):
            current = result[offset + i]
            if current == 1:
                result[offset + i] = size
            elif size not in (1, current):
                raise ValueError(
                    f"Incompatible positional shapes for broadcasting in {context}:"
                    f" {[tuple(s) for s in shapes]} (positional axis {offset + i - rank} has"
                    f" sizes {current} and {size}). Named axes are matched by name; positional"
                    " axes follow NumPy broadcasting."
                )
    return tuple(result)


def _align_to_canonical(
    layout: _Layout, all_names: Sequence[AxisName], positional_rank: int
) -> Any:
    """Rearranges a data array to broadcast against the canonical ``nmap`` output layout.

    The canonical layout is ``all_names`` (in order) followed by ``positional_rank``
    positional axes. The returned array has this array's named axes in ``all_names`` order
    with size-1 axes for names it lacks, then its positional axes right-aligned. Leading
    size-1 axes are left out, since NumPy broadcasting adds them for free; the common cases
    (same names in the same order) therefore cost no device work at all.
    """
    data, afn, logical, shape = layout
    if not isinstance(data, jax.Array):
        # NumPy data would otherwise get NumPy semantics (e.g. 64-bit results) in the fast
        # paths, whereas ``vmap`` always computes with JAX.
        data = jnp.asarray(data)
    permutation = [afn[name] for name in all_names if name in afn]
    permutation.extend(logical)
    if permutation != list(range(len(permutation))):
        data = jnp.transpose(data, permutation)
    target = []
    for name in all_names:
        axis = afn.get(name)
        if axis is not None:
            target.append(shape[axis])
        elif target:
            target.append(1)
    if target:
        target.extend([1] * (positional_rank - len(logical)))
    target.extend(shape[axis] for axis in logical)
    if tuple(target) != tuple(data.shape):
        data = jnp.reshape(data, target)
    return data


def _as_jax_array(value: Any) -> jax.Array:
    """``jnp.asarray``, skipped for what already is a JAX array (tracers included).

    ``jnp.asarray`` returns such an array unchanged but costs tens of microseconds per call,
    which adds up where every variable of a converted model is wrapped.
    """
    return value if isinstance(value, jax.Array) else jnp.asarray(value)


def _wrap_output(leaf: Any, all_names: Sequence[AxisName]) -> NamedArray | NamedArrayView:
    """Wraps an array in the canonical layout (``all_names`` first) as a named array."""
    leaf = _as_jax_array(leaf)
    shape = leaf.shape
    num_names = len(all_names)
    if len(shape) == num_names:
        return _new_named_array(collections.OrderedDict(zip(all_names, shape)), leaf)
    if len(shape) < num_names:
        raise ValueError(
            f"An nmap-ed function returned an array of shape {shape} where the vectorized"
            f" axes {tuple(all_names)} were expected as a prefix."
        )
    return _new_view(
        shape,
        tuple(range(num_names, len(shape))),
        dict(zip(all_names, range(num_names))),
        leaf,
    )


def _merge_named_sizes(layouts: Sequence[_Layout]) -> tuple[dict[AxisName, int], list]:
    """Collects every axis name with its size, in order of first appearance.

    Returns:
        The merged named shape, and the list of names whose sizes disagree between layouts.
    """
    sizes: dict[AxisName, int] = {}
    conflicting = []
    for _, afn, _, shape in layouts:
        for name, axis in afn.items():
            size = shape[axis]
            known = sizes.setdefault(name, size)
            if known != size and name not in conflicting:
                conflicting.append(name)
    return sizes, conflicting


def _raise_inconsistent_sizes(fun: Any, args, kwargs, conflicting: list) -> typing.NoReturn:
    """Raises the ValueError for an nmap call whose arguments disagree on axis sizes."""
    paths_and_leaves = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_namedarray)[
        0
    ]
    sizes_seen = collections.defaultdict(list)
    lines = []
    for path, leaf in paths_and_leaves:
        if not isinstance(leaf, NamedArrayBase):
            continue
        root = "args" if path[0] == jax.tree_util.SequenceKey(0) else "kwargs"
        where = f"{root}{jax.tree_util.keystr(path[1:])}"
        named_shape = leaf.named_shape
        lines.append(f"  {where}.named_shape == {named_shape}")
        for name in conflicting:
            if name in named_shape:
                sizes_seen[name].append(f"{named_shape[name]} in {where}")
    details = "; ".join(f"{name!r}: {', '.join(seen)}" for name, seen in sizes_seen.items())
    fun_name = getattr(fun, "__name__", repr(fun))
    raise ValueError(
        f"Inconsistent named axes in a call to nmap({fun_name}) for axes {conflicting}"
        f" (sizes: {details}). Arrays that share an axis name must agree on its size:\n"
        + "\n".join(lines)
    )


# ---------------------------------------------------------------------------------------------
# nmap
# ---------------------------------------------------------------------------------------------


def _nmap_call(fun: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Runs ``fun`` vectorized over the named axes of every named array in its arguments.

    Each axis name becomes one ``jax.vmap`` level (with ``axis_name`` set to the name, so
    collectives like ``jax.lax.psum(x, "batch")`` work inside ``fun``). Instead of building
    intermediate view objects at every level, the ``in_axes`` of every level are computed up
    front from the layouts.
    """
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs), is_leaf=is_namedarray)
    named_positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, NamedArrayBase)]
    layouts = [leaves[i]._layout() for i in named_positions]
    sizes, conflicting = _merge_named_sizes(layouts)
    if conflicting:
        _raise_inconsistent_sizes(fun, args, kwargs, conflicting)
    all_names = list(sizes)

    in_axes_by_level = [[None] * len(layouts) for _ in all_names]
    final_permutations = []
    for arg_index, (_, afn, logical, shape) in enumerate(layouts):
        remaining_axes = list(range(len(shape)))
        for level, name in enumerate(all_names):
            axis = afn.get(name)
            if axis is not None:
                position = remaining_axes.index(axis)
                in_axes_by_level[level][arg_index] = position
                del remaining_axes[position]
        permutation = tuple(remaining_axes.index(axis) for axis in logical)
        final_permutations.append(
            None if permutation == tuple(range(len(permutation))) else permutation
        )

    def call_with_positional_slices(*arrays):
        new_leaves = list(leaves)
        for position, array, permutation in zip(named_positions, arrays, final_permutations):
            new_leaves[position] = (
                array if permutation is None else jnp.transpose(array, permutation)
            )
        call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, new_leaves)
        return fun(*call_args, **call_kwargs)

    vectorized = call_with_positional_slices
    for level in reversed(range(len(all_names))):
        vectorized = jax.vmap(
            vectorized,
            in_axes=tuple(in_axes_by_level[level]),
            out_axes=0,
            axis_name=all_names[level],
        )
    result = vectorized(*(layout[0] for layout in layouts))
    return jax.tree_util.tree_map(lambda leaf: _wrap_output(leaf, all_names), result)


def _elementwise_nmap_call(fun: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``nmap`` for functions that act elementwise with NumPy broadcasting (``+``, ``astype``).

    For such functions, vectorizing over a named axis is the same as broadcasting along it,
    so the data arrays are only rearranged into the canonical output layout (names first,
    positional axes right-aligned) and ``fun`` is applied once; no ``vmap`` tracing. The
    result, including its layout, equals what ``_nmap_call`` computes. Arguments that might
    hide named arrays inside containers take the general path.
    """
    for value in kwargs.values():
        # Keyword arguments are passed through unaligned, so anything that could carry axes
        # (named arrays, containers, arrays with positional axes) needs the general path.
        if isinstance(value, NamedArrayBase | list | tuple | dict) or np.ndim(value) > 0:
            return _nmap_call(fun, args, kwargs)
    layouts = []
    positional_shapes = []
    for value in args:
        if isinstance(value, NamedArrayBase):
            layout = value._layout()
            layouts.append(layout)
            shape = layout[3]
            positional_shapes.append(tuple(shape[axis] for axis in layout[2]))
        elif isinstance(value, jax.Array | np.ndarray):
            positional_shapes.append(tuple(value.shape))
        elif isinstance(value, list | tuple | dict):
            return _nmap_call(fun, args, kwargs)
    if not layouts:
        return _nmap_call(fun, args, kwargs)
    sizes, conflicting = _merge_named_sizes(layouts)
    if conflicting:
        _raise_inconsistent_sizes(fun, args, kwargs, conflicting)
    first_shape = positional_shapes[0]
    if any(shape != first_shape for shape in positional_shapes):
        fun_name = getattr(fun, "__name__", repr(fun))
        positional_rank = len(_broadcast_positional_shapes(positional_shapes, fun_name))
    else:
        positional_rank = len(first_shape)
    all_names = list(sizes)
    remaining_layouts = iter(layouts)
    aligned_args = [
        _align_to_canonical(next(remaining_layouts), all_names, positional_rank)
        if isinstance(value, NamedArrayBase)
        else value
        for value in args
    ]
    result = fun(*aligned_args, **kwargs)
    if isinstance(result, tuple):
        return tuple(_wrap_output(leaf, all_names) for leaf in result)
    return _wrap_output(result, all_names)


def nmap(fun: Callable[..., Any]) -> Callable[..., Any]:
    """Lifts a positional-axis function to named arrays, vectorizing over every axis name.

    ``nmap(fun)`` accepts the same arguments as ``fun``, except that any argument (or any
    pytree leaf inside an argument) may be a ``NamedArray`` or ``NamedArrayView``. ``fun`` is
    then called with plain arrays shaped like each named array's ``positional_shape``, and is
    vectorized (with ``jax.vmap``) over the union of all axis names: arguments that share a
    name are mapped over it together, arguments without it are broadcast. To let ``fun``
    operate on a named axis, ``untag`` it first; to name the positional axes ``fun`` returns,
    ``tag`` the result.

    Unlike ``jax.vmap``, there are no ``in_axes``/``out_axes``: the names say what to map.
    Within ``fun`` each mapped axis is a ``vmap`` axis named after the axis name, so
    collectives such as ``jax.lax.psum(x, axis_name="batch")`` are available. ``nmap`` works
    eagerly and under ``jax.jit``, ``jax.grad``, ``jax.vmap`` and ``jax.lax.scan``.

    Args:
        fun: The function to lift. Its non-named arguments are passed through unchanged (they
            may be arbitrary Python objects, e.g. static sizes), and it must return a pytree
            of array-likes.

    Returns:
        The lifted function. Every array leaf it returns becomes a named array carrying every
        axis name seen in the inputs; it is a ``NamedArray`` if it has no positional axes and
        a ``NamedArrayView`` (named axes first) otherwise.

    Raises:
        ValueError: When called with named arrays that give the same axis name different
            sizes; the message lists every argument's named shape.
    """

    @functools.wraps(fun)
    def lifted(*args, **kwargs):
        return _nmap_call(fun, args, kwargs)

    fun_name = getattr(fun, "__name__", repr(fun))
    lifted.__doc__ = _lifted_docstring(fun_name, getattr(fun, "__doc__", None))
    return lifted


def _lifted_docstring(fun_name: str, fun_doc: str | None) -> str:
    doc = (
        f"Named-axis version of `{fun_name}` (see `nmap`): named array arguments are"
        " vectorized over their axis names and the results are named arrays."
    )
    if fun_doc:
        doc += f"\n\nDocumentation of `{fun_name}`:\n\n{fun_doc}"
    return doc


def _elementwise_operator(fun: Callable[..., Any], doc_name: str) -> Callable[..., Any]:
    """Makes a named-array method from an elementwise (broadcasting) function."""

    def method(*args, **kwargs):
        return _elementwise_nmap_call(fun, args, kwargs)

    method.__name__ = doc_name.rsplit(".", 1)[-1]
    method.__qualname__ = f"NamedArrayBase.{method.__name__}"
    method.__doc__ = (
        f"Named-axis version of `{doc_name}`: named axes are matched by name (and broadcast"
        " where missing), positional axes follow NumPy broadcasting."
    )
    return method


def _swapped(binary_operator: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def reflected(left, right):
        return binary_operator(right, left)

    reflected.__name__ = f"reflected_{binary_operator.__name__}"
    return reflected


def _scalar_conversion(convert: Callable[[Any], Any]) -> Callable[[NamedArrayBase], Any]:
    def method(self: NamedArrayBase):
        if self.named_shape or self.positional_shape:
            raise ValueError(
                f"Cannot convert a non-scalar NamedArray or NamedArrayView with {convert}:"
                f" it has named shape {dict(self.named_shape)} and positional shape"
                f" {self.positional_shape}."
            )
        return convert(self.unwrap())

    method.__name__ = f"__{getattr(convert, '__name__', 'convert')}__"
    return method


# Array attributes that are properties on jax.Array; their named versions are methods (as in
# penzai), so they are read rather than called inside nmap.
_ARRAY_PROPERTIES = frozenset({"T", "mT", "real", "imag"})
_ELEMENTWISE_ARRAY_METHODS = frozenset({"astype", "clip", "conj", "conjugate", "round"})
# Reductions whose ``axis=None`` means "all (positional) axes", with the keyword arguments the
# fast path understands.
_REDUCTIONS_OVER_ALL_AXES = {
    "sum": {"axis", "dtype", "keepdims"},
    "mean": {"axis", "dtype", "keepdims"},
    "prod": {"axis", "dtype", "keepdims"},
    "max": {"axis", "keepdims"},
    "min": {"axis", "keepdims"},
    "all": {"axis", "keepdims"},
    "any": {"axis", "keepdims"},
    "std": {"axis", "dtype", "keepdims", "ddof"},
    "var": {"axis", "dtype", "keepdims", "ddof"},
}
# Reductions/scans that need an explicit integer axis for the fast path (``axis=None``
# flattens, which does not commute with vectorization).
_SINGLE_AXIS_METHODS = {
    "argmax": {"axis", "keepdims"},
    "argmin": {"axis", "keepdims"},
    "cumsum": {"axis", "dtype"},
    "cumprod": {"axis", "dtype"},
}


def _array_method_body(name: str) -> Callable[..., Any]:
    if name in _ARRAY_PROPERTIES:

        def read_property(array):
            return getattr(array, name)

        read_property.__name__ = name
        return read_property

    def call_method(array, *args, **kwargs):
        return getattr(array, name)(*args, **kwargs)

    call_method.__name__ = name
    return call_method


def _shift_positional_axes(axis: Any, positional_rank: int, offset: int) -> Any:
    """Maps positional ``axis`` (int or tuple) to data axes, or returns None if invalid."""
    axes = axis if isinstance(axis, tuple) else (axis,)
    shifted = []
    for single in axes:
        if isinstance(single, bool) or not isinstance(single, int | np.integer):
            return None
        if not -positional_rank <= single < positional_rank:
            return None
        shifted.append(offset + int(single) % positional_rank)
    return tuple(shifted) if isinstance(axis, tuple) else shifted[0]


def _fast_reduction(self: NamedArrayBase, name: str, args: tuple, kwargs: dict) -> Any:
    """Computes a reduction on the data array directly, or returns None to use ``nmap``."""
    allowed = _REDUCTIONS_OVER_ALL_AXES.get(name) or _SINGLE_AXIS_METHODS[name]
    if len(args) > 1 or not allowed.issuperset(kwargs):
        return None
    if args:
        if "axis" in kwargs:
            return None
        kwargs = {**kwargs, "axis": args[0]}
    layout = self._layout()
    _, afn, logical, _ = layout
    num_names = len(afn)
    axis = kwargs.get("axis")
    if axis is None:
        if name not in _REDUCTIONS_OVER_ALL_AXES:
            return None
        data_axis = tuple(range(num_names, num_names + len(logical)))
    else:
        data_axis = _shift_positional_axes(axis, len(logical), num_names)
        if data_axis is None:
            return None
    all_names = list(afn)
    data = _align_to_canonical(layout, all_names, len(logical))
    result = getattr(data, name)(**{**kwargs, "axis": data_axis})
    return _wrap_output(result, all_names)


def _array_method(name: str) -> Callable[..., Any]:
    """Makes a named-array method that runs ``jax.Array.<name>`` on the positional axes."""
    body = _array_method_body(name)
    if name in _ELEMENTWISE_ARRAY_METHODS:

        def method(self, *args, **kwargs):
            return _elementwise_nmap_call(body, (self, *args), kwargs)

    elif name in _REDUCTIONS_OVER_ALL_AXES or name in _SINGLE_AXIS_METHODS:

        def method(self, *args, **kwargs):
            result = _fast_reduction(self, name, args, kwargs)
            if result is None:
                result = _nmap_call(body, (self, *args), kwargs)
            return result

    else:

        def method(self, *args, **kwargs):
            return _nmap_call(body, (self, *args), kwargs)

    method.__name__ = name
    method.__qualname__ = f"NamedArrayBase.{name}"
    method.__doc__ = (
        f"Named-axis version of the array method `{name}`: acts on the positional axes and is"
        " vectorized over the named axes (see `nmap`). Takes the same arguments as"
        f" `jax.Array.{name}`{'' if name not in _ARRAY_PROPERTIES else ' (a property there)'}."
    )
    return method


# ---------------------------------------------------------------------------------------------
# Indexing
# ---------------------------------------------------------------------------------------------


@struct.pytree_dataclass
class _StaticPart(struct.Struct):
    """An index component that must stay a Python value under ``jit`` (``None``, ``...``)."""

    value: Any = dataclasses.field(metadata={"pytree_node": False})

    def unwrap(self):
        return self.value


@struct.pytree_dataclass
class _DynamicPart(struct.Struct):
    """An index component that is (or may be) an array, traced under ``jit``."""

    value: Any

    def unwrap(self):
        return self.value


@struct.pytree_dataclass
class _SlicePart(struct.Struct):
    """A slice, stored as static fields since ``slice`` objects are not pytrees."""

    start: Any = dataclasses.field(metadata={"pytree_node": False})
    stop: Any = dataclasses.field(metadata={"pytree_node": False})
    step: Any = dataclasses.field(metadata={"pytree_node": False})

    def unwrap(self):
        return slice(self.start, self.stop, self.step)


def _index_components(indexer: Any) -> tuple:
    """Splits a positional indexer into pieces ``jit`` can take (static vs. traced)."""
    if not isinstance(indexer, tuple):
        indexer = (indexer,)
    components = []
    for component in indexer:
        if isinstance(component, jax.Array | np.ndarray | NamedArrayBase | int):
            components.append(_DynamicPart(component))
        elif isinstance(component, slice):
            components.append(_SlicePart(component.start, component.stop, component.step))
        else:
            components.append(_StaticPart(component))
    return tuple(components)


# Positional gathers and scatters are always compiled: run eagerly under vmap they can
# materialize transposed copies of a large array.
@functools.partial(
    jax.jit, static_argnames=("indices_are_sorted", "unique_indices", "mode", "fill_value")
)
def _compiled_gather(
    array,
    components,
    *,
    indices_are_sorted=False,
    unique_indices=False,
    mode=None,
    fill_value=None,
):
    def gather(positional, positional_components):
        index = tuple(component.unwrap() for component in positional_components)
        return positional.at[index].get(
            indices_are_sorted=indices_are_sorted,
            unique_indices=unique_indices,
            mode=mode,
            fill_value=fill_value,
        )

    return _nmap_call(gather, (array, components), {})


@functools.partial(
    jax.jit, static_argnames=("method", "indices_are_sorted", "unique_indices", "mode")
)
def _compiled_scatter(
    array,
    components,
    values,
    method,
    *,
    indices_are_sorted=False,
    unique_indices=False,
    mode=None,
):
    def scatter(positional, positional_components, positional_values):
        index = tuple(component.unwrap() for component in positional_components)
        if isinstance(positional_values, _StaticPart):
            positional_values = positional_values.unwrap()
        return getattr(positional.at[index], method)(
            positional_values,
            indices_are_sorted=indices_are_sorted,
            unique_indices=unique_indices,
            mode=mode,
        )

    return _nmap_call(scatter, (array, components, values), {})


@dataclasses.dataclass
class _IndexUpdateHelper:
    """What ``named_array.at`` returns: subscript it to get an ``_IndexUpdateRef``."""

    array: NamedArrayBase

    def __getitem__(self, index) -> _IndexUpdateRef:
        return _IndexUpdateRef(self.array, index)


def _scatter_method(name: str, doc: str, jax_method: str | None = None) -> Callable[..., Any]:
    """Makes an ``_IndexUpdateRef`` update method that runs ``jax.Array.at[].<jax_method>``.

    Args:
        name: The method's name.
        doc: The method's docstring.
        jax_method: The ``jax.Array.at[]`` method that performs the update, when it differs
            from ``name`` (for aliases that ``jax.Array.at`` lacks, such as ``div``).

    Returns:
        A method taking ``(self, values, /, **kwargs)``.
    """
    jax_method = jax_method or name

    def method(self, values, /, **kwargs):
        return self._update(jax_method, values, kwargs)

    method.__name__ = name
    method.__qualname__ = f"_IndexUpdateRef.{name}"
    method.__doc__ = doc
    return method


@dataclasses.dataclass
class _IndexUpdateRef:
    """``named_array.at[index]``: gathers or functional updates at ``index``.

    Attributes:
        array: The array being indexed.
        indexer: A positional NumPy-style index, or a dict from axis names to indices.
    """

    array: NamedArrayBase
    indexer: Any

    def _dict_index_orders(self) -> tuple[tuple, tuple, tuple]:
        """Plans how a dict index becomes a positional one.

        The indexed names are made positional in front of the existing positional axes:
        sliced names first, then names indexed by integers or arrays (which disappear or
        become advanced-indexing axes). Names mapped to ``None`` are new axes inserted in
        front of all of them.

        Returns:
            The names to untag from the input, the names in the order of the positional
            index, and the names to tag on the result.
        """
        introduced, sliced, indexed = [], [], []
        for name, index in self.indexer.items():
            if index is None:
                introduced.append(name)
            elif isinstance(index, slice):
                sliced.append(name)
            elif isinstance(index, int) or (
                isinstance(index, jax.Array | np.ndarray | NamedArrayBase)
                and jnp.issubdtype(index.dtype, np.integer)
            ):
                indexed.append(name)
            else:
                raise TypeError(
                    "Unsupported index for a named axis using dict-style index: expected a"
                    f" slice, an integer, an integer array, or None, but got {index!r} for axis"
                    f" {name!r}."
                )
        named_shape = self.array.named_shape
        already_present = [name for name in introduced if name in named_shape]
        if already_present:
            raise ValueError(
                f"Axis names mapped to None in a dict index become new axes, but"
                f" {already_present} already exist in the array (named shape {named_shape})."
            )
        return (
            (*sliced, *indexed),
            (*introduced, *sliced, *indexed),
            (*introduced, *sliced),
        )

    def get(self, **kwargs) -> NamedArray | NamedArrayView:
        """Returns ``array[index]``; keyword arguments are those of ``jax.Array.at[].get``."""
        if isinstance(self.indexer, dict):
            untag_order, index_order, tag_order = self._dict_index_orders()
            positional_index = tuple(self.indexer[name] for name in index_order)
            return (
                self.array.untag_prefix(*untag_order)
                .at[positional_index]
                .get(**kwargs)
                .tag_prefix(*tag_order)
            )
        return _compiled_gather(self.array, _index_components(self.indexer), **kwargs)

    def _update(self, method: str, values: Any, kwargs: dict) -> NamedArray | NamedArrayView:
        if method == "apply" and not callable(values):
            raise TypeError(f"`at[...].apply` needs a function, got {values!r}.")
        if not isinstance(self.indexer, dict):
            if method == "apply":
                # The function is not an array: it has to reach the compiled scatter as
                # static data.
                values = _StaticPart(values)
            return _compiled_scatter(
                self.array, _index_components(self.indexer), values, method, **kwargs
            )
        untag_order, index_order, tag_order = self._dict_index_orders()
        positional_index = tuple(self.indexer[name] for name in index_order)
        if method == "apply":
            return (
                self.array.untag_prefix(*untag_order)
                .at[positional_index]
                ._update(method, values, kwargs)
                .tag_prefix(*untag_order)
            )
        if not isinstance(values, NamedArrayBase):
            values = wrap(values)
        result_shape = jax.eval_shape(self.get).positional_shape
        values_shape = values.positional_shape
        missing_rank = len(result_shape) - len(values_shape)
        if missing_rank < 0 or not all(
            value_size in (1, result_size)
            for value_size, result_size in zip(values_shape, result_shape[missing_rank:])
        ):
            raise ValueError(
                f"Cannot provide updates with positional shape {values_shape} for an index"
                f" whose result shape is {result_shape}! Update shape must be a suffix of the"
                " result shape (or broadcastable to it)."
            )
        if missing_rank:
            values = values[(None,) * missing_rank + (...,)]
        values_named_shape = values.named_shape
        new_names = {name: None for name in tag_order if name not in values_named_shape}
        if new_names:
            values = values[new_names]
        return (
            self.array.untag_prefix(*untag_order)
            .at[positional_index]
            ._update(method, values.untag_prefix(*tag_order), kwargs)
            .tag_prefix(*untag_order)
        )

    set = _scatter_method("set", "Returns a copy with ``values`` written at the index.")
    apply = _scatter_method(
        "apply",
        """Returns a copy with the function ``values`` applied to the entries at the index.

        ``values`` is a function of the selected entries (as in ``jax.Array.at[].apply``); it is
        passed to the compiled scatter as static data, so use a function whose identity is
        stable (a named function, not a fresh lambda per call) to avoid recompiling.
        """,
    )
    add = _scatter_method("add", "Returns a copy with ``values`` added at the index.")
    multiply = _scatter_method(
        "multiply", "Returns a copy with the entries at the index multiplied by ``values``."
    )
    mul = _scatter_method("mul", "Alias of ``multiply``.")
    divide = _scatter_method(
        "divide", "Returns a copy with the entries at the index divided by ``values``."
    )
    div = _scatter_method(
        "div", "Alias of ``divide`` (``jax.Array.at`` itself has no ``div``).", "divide"
    )
    power = _scatter_method(
        "power", "Returns a copy with the entries at the index raised to ``values``."
    )
    min = _scatter_method(
        "min", "Returns a copy with the entries at the index replaced by their min with ``values``."
    )
    max = _scatter_method(
        "max", "Returns a copy with the entries at the index replaced by their max with ``values``."
    )


# ---------------------------------------------------------------------------------------------
# Named arrays
# ---------------------------------------------------------------------------------------------


class NamedArrayBase(abc.ABC):
    """Behaviour shared by ``NamedArray`` and ``NamedArrayView``.

    Everything that does not depend on the storage layout lives here: name manipulation built
    on ``tag``/``untag``, broadcasting, indexing, and the operators and array methods, all of
    which act on positional axes and are vectorized over named axes.
    """

    # -- Layout-specific API, implemented by the two concrete classes. -----------------------

    @property
    @abc.abstractmethod
    def dtype(self) -> np.dtype:
        """The dtype of the data array."""

    @abc.abstractmethod
    def check_valid(self) -> None:
        """Raises ValueError unless the fields describe a consistent named array."""

    @property
    @abc.abstractmethod
    def named_shape(self) -> Mapping[AxisName, int]:
        """The size of each named axis, as a ``dict`` from name to size."""

    @property
    @abc.abstractmethod
    def positional_shape(self) -> tuple[int, ...]:
        """The sizes of the positional (unnamed) axes, in order."""

    @abc.abstractmethod
    def _layout(self) -> _Layout:
        """(data array, data axis for each name, data axis for each positional axis, shape)."""

    def data_axis_names(self) -> tuple[AxisName | None, ...]:
        """The name of each axis of ``data_array`` (None for a positional axis), in order.

        What a checkpoint records beside the stored data array, so that it can be inspected
        and sharded by axis name without rebuilding the named array.

        Raises:
            ValueError: If the fields do not describe a consistent named array.
        """
        _, axis_for_name, _, shape = self._layout()
        names: list[AxisName | None] = [None] * len(shape)
        for name, axis in axis_for_name.items():
            names[axis] = name
        return tuple(names)

    @abc.abstractmethod
    def unwrap(self, *names: AxisName) -> jax.Array:
        """Returns the positional JAX array.

        Args:
            *names: If the array has named axes (and no positional ones), the order in which
                all of its names become the axes of the result. Shorthand for
                ``untag(*names).unwrap()``.

        Returns:
            An ordinary array whose axes are the positional axes (or ``names``, in order).

        Raises:
            ValueError: If named axes would remain, if ``names`` is given for an array that
                already has positional axes, or if ``names`` does not match the axis names.
        """

    @abc.abstractmethod
    def with_positional_prefix(self) -> NamedArray:
        """Returns an equivalent ``NamedArray`` (positional axes first in the data array).

        A view's data is transposed if needed; a ``NamedArray`` is returned unchanged. Use
        this before handing the array to code that slices or stacks leading axes of the data
        (``jax.tree_util.tree_map``, ``jax.lax.scan``).
        """

    @abc.abstractmethod
    def as_namedarrayview(self) -> NamedArrayView:
        """Returns an equivalent ``NamedArrayView``; never moves data.

        Handy for code that wants to read ``data_axis_for_name``/``data_axis_for_logical_axis``
        without distinguishing the two classes.
        """

    @abc.abstractmethod
    def untag(self, *axis_order: AxisName) -> NamedArray | NamedArrayView:
        """Makes the named axes ``axis_order`` positional, in that order.

        Only allowed on arrays without positional axes (use ``untag_prefix`` otherwise).

        Args:
            *axis_order: Distinct names of existing axes.

        Returns:
            A view whose positional axes are ``axis_order``; a ``NamedArray`` with the same
            axes if ``axis_order`` is empty.

        Raises:
            ValueError: If the array has positional axes, if a name repeats, or if a name is
                not an axis of the array.
        """

    @abc.abstractmethod
    def tag(self, *names: AxisName) -> NamedArray:
        """Names every positional axis, in order.

        Args:
            *names: One new, distinct, non-integer name per positional axis (use
                ``tag_prefix`` to name only the leading ones).

        Returns:
            A ``NamedArray`` without positional axes.

        Raises:
            ValueError: If the number of names differs from the number of positional axes, if
                a name is an integer, or if a name repeats or already exists.
        """

    # -- Name manipulation built on the layout. --------------------------------------------

    def untag_prefix(self, *axis_order: AxisName) -> NamedArray | NamedArrayView:
        """Makes named axes positional, in front of the existing positional axes.

        The version of ``untag`` for arrays that already have positional axes.

        Args:
            *axis_order: Distinct names of existing axes.

        Returns:
            A view whose positional axes are ``axis_order`` followed by the old positional
            axes.

        Raises:
            ValueError: If a name repeats or is not an axis of the array.
        """
        data, afn, logical, shape = self._layout()
        if not axis_order and not logical:
            return _named_array_in_data_order(data, afn, shape)
        _check_requested_names(axis_order, afn, shape, "untag_prefix")
        requested = set(axis_order)
        remaining = {
            name: axis
            for name, axis in sorted(afn.items(), key=operator.itemgetter(1))
            if name not in requested
        }
        return _new_view(shape, (*(afn[name] for name in axis_order), *logical), remaining, data)

    def tag_prefix(self, *axis_order: AxisName) -> NamedArray | NamedArrayView:
        """Names the leading positional axes, keeping the rest positional.

        Args:
            *axis_order: One new, distinct, non-integer name for each of the first
                ``len(axis_order)`` positional axes.

        Returns:
            A named array whose positional axes are the remaining (trailing) ones.

        Raises:
            ValueError: If there are more names than positional axes, if a name is an
                integer, or if a name repeats or already exists.
        """
        data, afn, logical, shape = self._layout()
        if len(axis_order) > len(logical):
            raise ValueError(
                f"`tag_prefix` got {len(axis_order)} names {axis_order} but the array has only"
                f" {len(logical)} positional axes (positional shape"
                f" {tuple(shape[a] for a in logical)})."
            )
        _check_name_types(axis_order, "tag_prefix")
        _check_no_repeated_names(axis_order, afn, "tag_prefix")
        names_by_axis = {axis: name for name, axis in afn.items()}
        names_by_axis.update(zip(logical, axis_order))
        if len(axis_order) == len(logical):
            return _named_array_in_data_order(data, {n: a for a, n in names_by_axis.items()}, shape)
        return _new_view(
            shape,
            logical[len(axis_order) :],
            {names_by_axis[axis]: axis for axis in sorted(names_by_axis)},
            data,
        )

    def order_as(self, *axis_order: AxisName) -> NamedArray:
        """Stores the named axes in the data array in exactly this order.

        Useful to give two arrays the same pytree structure; ``canonicalize`` does this with
        the sorted names.

        Args:
            *axis_order: A permutation of all axis names of the array.

        Returns:
            An equivalent ``NamedArray`` whose data holds the positional axes, then the named
            axes in ``axis_order``.

        Raises:
            ValueError: If ``axis_order`` is not a permutation of the axis names.
        """
        data, afn, logical, shape = self._layout()
        _check_requested_names(axis_order, afn, shape, "order_as")
        if len(axis_order) != len(afn):
            unlisted = [name for name in afn if name not in set(axis_order)]
            raise ValueError(
                f"`order_as` needs every axis name of the array; {unlisted} are missing from"
                f" {axis_order} (named shape {_named_shape_of(afn, shape)})."
            )
        permutation = [*logical, *(afn[name] for name in axis_order)]
        if permutation != list(range(len(permutation))):
            data = jnp.transpose(data, permutation)
        return _new_named_array(
            collections.OrderedDict((name, shape[afn[name]]) for name in axis_order), data
        )

    def order_like(self, other: NamedArray | NamedArrayView) -> NamedArray | NamedArrayView:
        """Lays this array's data out like ``other``'s, so their pytree structures match.

        Needed before combining named arrays with tree-level JAX APIs that require identical
        structures (``jax.lax.cond`` branches, ``jax.tree_util.tree_map`` over two trees,
        scan carries). For whole trees, use the module-level ``order_like``.

        Args:
            other: A named array with the same axis names; if it is a ``NamedArrayView``, it
                must also have the same number of positional axes.

        Returns:
            The data of ``self`` arranged like ``other``: a ``NamedArray`` (if ``other`` is
            one) or a ``NamedArrayView`` with ``other``'s axis mapping.

        Raises:
            ValueError: If the names (or the positional axis counts, for views) differ.
            TypeError: If ``other`` is not a named array.
        """
        self.check_valid()
        if isinstance(other, NamedArray):
            other.check_valid()
            return self.order_as(*other.named_axes)
        if not isinstance(other, NamedArrayView):
            raise TypeError(
                "`order_like` requires a NamedArray or NamedArrayView, but got"
                f" {type(other).__name__}"
            )
        other.check_valid()
        if len(self.positional_shape) != len(other.positional_shape):
            raise ValueError(
                "Calling `order_like` with a NamedArrayView requires the two arrays to have the"
                " same number of positional axes, but got positional shapes"
                f" {self.positional_shape} and {other.positional_shape}."
            )
        if set(self.named_shape) != set(other.named_shape):
            raise ValueError(
                "Calling `order_like` with a NamedArrayView requires the two arrays to have the"
                f" same axis names, but got named shapes {dict(self.named_shape)} and"
                f" {dict(other.named_shape)}."
            )
        data, afn, logical, _ = self._layout()
        source_axis_for_target = {}
        for source_axis, target_axis in zip(logical, other.data_axis_for_logical_axis):
            source_axis_for_target[target_axis] = source_axis
        for name, target_axis in other.data_axis_for_name.items():
            source_axis_for_target[target_axis] = afn[name]
        permutation = [source_axis_for_target[axis] for axis in range(len(other.data_shape))]
        if permutation != list(range(len(permutation))):
            data = jnp.transpose(data, permutation)
        return _new_view(
            tuple(data.shape),
            other.data_axis_for_logical_axis,
            other.data_axis_for_name,
            data,
        )

    def broadcast_to(
        self,
        positional_shape: Sequence[int] = (),
        named_shape: Mapping[AxisName, int] | None = None,
    ) -> NamedArrayBase:
        """Broadcasts to a (possibly) larger positional and named shape.

        Args:
            positional_shape: Target positional shape, reached by NumPy broadcasting.
            named_shape: Axis names to add (with their sizes). Names the array already has
                must have the same size here: like ``nmap``, this never stretches a size-1
                named axis.

        Returns:
            A named array with the given positional shape and the union of both named shapes
            (axes of ``self`` that ``named_shape`` does not mention are kept).

        Raises:
            ValueError: If a shared name has a different size, or the positional shape cannot
                be broadcast to ``positional_shape``.
        """
        named_shape = {} if named_shape is None else dict(named_shape)
        positional_shape = tuple(positional_shape)
        layout = self._layout()
        _, afn, logical, shape = layout
        own_positional = tuple(shape[axis] for axis in logical)
        if own_positional == positional_shape and _named_shape_of(afn, shape) == named_shape:
            return self
        sizes = _named_shape_of(afn, shape)
        mismatched = {
            name: (sizes[name], size)
            for name, size in named_shape.items()
            if name in sizes and sizes[name] != size
        }
        if mismatched:
            raise ValueError(
                "Cannot broadcast named axes to a different size (named axes are matched by"
                " name and never stretched): "
                + ", ".join(
                    f"{name!r} has size {old}, requested {new}"
                    for name, (old, new) in mismatched.items()
                )
            )
        offset = len(positional_shape) - len(own_positional)
        if offset < 0 or any(
            size not in (1, positional_shape[offset + i]) for i, size in enumerate(own_positional)
        ):
            raise ValueError(
                f"Cannot broadcast positional shape {own_positional} to {positional_shape}."
            )
        for name, size in named_shape.items():
            sizes.setdefault(name, size)
        all_names = list(sizes)
        aligned = _align_to_canonical(layout, all_names, len(positional_shape))
        broadcast = jnp.broadcast_to(aligned, (*sizes.values(), *positional_shape))
        return _wrap_output(broadcast, all_names)

    def broadcast_like(self, other: NamedArrayBase | jax.typing.ArrayLike) -> NamedArrayBase:
        """Broadcasts to the positional and named shape of ``other``.

        Args:
            other: A named array, or a plain array-like (whose shape is taken as positional).

        Returns:
            A named array with ``other``'s shapes, plus any extra axis names of ``self``.
        """
        if isinstance(other, NamedArrayBase):
            return self.broadcast_to(other.positional_shape, other.named_shape)
        return self.broadcast_to(jnp.shape(other), {})

    def canonicalize(self) -> NamedArray:
        """Returns an equivalent ``NamedArray`` with named axes stored in sorted order.

        Any two named arrays with equal shapes have the same pytree structure afterwards.
        """
        return self.order_as(*sorted(self.named_shape))

    # -- Indexing. ---------------------------------------------------------------------------

    def __getitem__(self, indexer) -> NamedArray | NamedArrayView:
        """Indexes positional axes NumPy-style, or named axes with a dict.

        Positional indexing (``array.untag("vocab")[token_ids]``) follows NumPy's basic and
        advanced indexing on the positional axes and is vectorized over the named axes;
        named arrays used as indices contribute their names too (shared names are mapped
        jointly, new ones are added to the result).

        Dict indexing (``array[{"seq": 0, "features": pz.slice[2:5], "new": None}]``) applies
        the same rules to named axes: an integer removes the axis, a slice keeps it (smaller),
        ``None`` adds a new axis of size 1, an integer array with positional axes is an
        advanced index whose axes become leading positional axes of the result, and a named
        array index is vectorized over its names. It behaves like making the indexed names
        positional, indexing, and naming the sliced axes again.

        Args:
            indexer: A positional NumPy-style index, or a dict from axis names to indices.

        Returns:
            The selected part of the array.
        """
        self.check_valid()
        return self.at[indexer].get()

    @property
    def at(self) -> _IndexUpdateHelper:
        """Functional updates: ``array.at[index].set(values)`` (also ``add``, ``get``, ...).

        The index follows ``__getitem__``'s rules (positional or dict). Updating at a
        positional index is ``nmap(lambda a, i, v: a.at[i].set(v))(array, index, values)``,
        so named axes of ``values`` or of index arrays broadcast by name. With a dict index,
        sliced names may appear in ``values`` and line up with the sliced axes, other names
        broadcast by name, and positional axes of ``values`` broadcast against the positional
        shape of ``array[index]``. To update several entries of one axis use an index array
        with a *positional* axis; an index with a named axis instead vectorizes (one update
        per name entry).
        """
        self.check_valid()
        return _IndexUpdateHelper(self)

    def __iter__(self):
        # Defined explicitly: the fallback iteration protocol would call __getitem__ with
        # ever larger integers, and JAX clamps out-of-range indices instead of raising.
        positional_shape = self.positional_shape
        if not positional_shape:
            raise ValueError(
                "Cannot iterate over an array with no positional axes! Its named shape is"
                f" {dict(self.named_shape)}; untag an axis first (or use nx.unstack)."
            )
        for i in range(positional_shape[0]):
            yield self[i]

    # -- Rendering (implemented by the treescope handlers). ---------------------------------

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any):
        from pz_flax.core._treescope_handlers import named_axes_handlers

        return named_axes_handlers.handle_named_arrays(self, path, subtree_renderer)

    def __treescope_ndarray_adapter__(self):
        from pz_flax.core._treescope_handlers import named_axes_handlers

        return named_axes_handlers.NamedArrayAdapter()

    # -- Operators: elementwise, names matched by name, positional axes broadcast. -----------

    __lt__ = _elementwise_operator(operator.lt, "jax.Array.__lt__")
    __le__ = _elementwise_operator(operator.le, "jax.Array.__le__")
    __eq__ = _elementwise_operator(operator.eq, "jax.Array.__eq__")  # type: ignore[assignment]
    __ne__ = _elementwise_operator(operator.ne, "jax.Array.__ne__")  # type: ignore[assignment]
    __ge__ = _elementwise_operator(operator.ge, "jax.Array.__ge__")
    __gt__ = _elementwise_operator(operator.gt, "jax.Array.__gt__")

    __add__ = _elementwise_operator(operator.add, "jax.Array.__add__")
    __sub__ = _elementwise_operator(operator.sub, "jax.Array.__sub__")
    __mul__ = _elementwise_operator(operator.mul, "jax.Array.__mul__")
    __truediv__ = _elementwise_operator(operator.truediv, "jax.Array.__truediv__")
    __floordiv__ = _elementwise_operator(operator.floordiv, "jax.Array.__floordiv__")
    __mod__ = _elementwise_operator(operator.mod, "jax.Array.__mod__")
    __divmod__ = _elementwise_operator(divmod, "jax.Array.__divmod__")
    __pow__ = _elementwise_operator(operator.pow, "jax.Array.__pow__")
    __lshift__ = _elementwise_operator(operator.lshift, "jax.Array.__lshift__")
    __rshift__ = _elementwise_operator(operator.rshift, "jax.Array.__rshift__")
    __and__ = _elementwise_operator(operator.and_, "jax.Array.__and__")
    __or__ = _elementwise_operator(operator.or_, "jax.Array.__or__")
    __xor__ = _elementwise_operator(operator.xor, "jax.Array.__xor__")

    __radd__ = _elementwise_operator(_swapped(operator.add), "jax.Array.__radd__")
    __rsub__ = _elementwise_operator(_swapped(operator.sub), "jax.Array.__rsub__")
    __rmul__ = _elementwise_operator(_swapped(operator.mul), "jax.Array.__rmul__")
    __rtruediv__ = _elementwise_operator(_swapped(operator.truediv), "jax.Array.__rtruediv__")
    __rfloordiv__ = _elementwise_operator(_swapped(operator.floordiv), "jax.Array.__rfloordiv__")
    __rmod__ = _elementwise_operator(_swapped(operator.mod), "jax.Array.__rmod__")
    __rdivmod__ = _elementwise_operator(_swapped(divmod), "jax.Array.__rdivmod__")
    __rpow__ = _elementwise_operator(_swapped(operator.pow), "jax.Array.__rpow__")
    __rlshift__ = _elementwise_operator(_swapped(operator.lshift), "jax.Array.__rlshift__")
    __rrshift__ = _elementwise_operator(_swapped(operator.rshift), "jax.Array.__rrshift__")
    __rand__ = _elementwise_operator(_swapped(operator.and_), "jax.Array.__rand__")
    __ror__ = _elementwise_operator(_swapped(operator.or_), "jax.Array.__ror__")
    __rxor__ = _elementwise_operator(_swapped(operator.xor), "jax.Array.__rxor__")

    __abs__ = _elementwise_operator(operator.abs, "jax.Array.__abs__")
    __neg__ = _elementwise_operator(operator.neg, "jax.Array.__neg__")
    __pos__ = _elementwise_operator(operator.pos, "jax.Array.__pos__")
    __invert__ = _elementwise_operator(operator.invert, "jax.Array.__invert__")

    # -- Conversions to Python scalars (only for arrays without any axes). ------------------

    __bool__ = _scalar_conversion(bool)
    __complex__ = _scalar_conversion(complex)
    __int__ = _scalar_conversion(int)
    __float__ = _scalar_conversion(float)
    __index__ = _scalar_conversion(operator.index)

    # -- Array methods, acting on positional axes. ------------------------------------------

    all = _array_method("all")
    any = _array_method("any")
    argmax = _array_method("argmax")
    argmin = _array_method("argmin")
    argpartition = _array_method("argpartition")
    argsort = _array_method("argsort")
    astype = _array_method("astype")
    choose = _array_method("choose")
    clip = _array_method("clip")
    compress = _array_method("compress")
    conj = _array_method("conj")
    conjugate = _array_method("conjugate")
    cumprod = _array_method("cumprod")
    cumsum = _array_method("cumsum")
    diagonal = _array_method("diagonal")
    dot = _array_method("dot")
    flatten = _array_method("flatten")
    imag = _array_method("imag")
    item = _array_method("item")
    max = _array_method("max")
    mean = _array_method("mean")
    min = _array_method("min")
    nonzero = _array_method("nonzero")
    prod = _array_method("prod")
    ptp = _array_method("ptp")
    ravel = _array_method("ravel")
    real = _array_method("real")
    repeat = _array_method("repeat")
    reshape = _array_method("reshape")
    round = _array_method("round")
    searchsorted = _array_method("searchsorted")
    sort = _array_method("sort")
    squeeze = _array_method("squeeze")
    std = _array_method("std")
    sum = _array_method("sum")
    swapaxes = _array_method("swapaxes")
    take = _array_method("take")
    trace = _array_method("trace")
    transpose = _array_method("transpose")
    T = _array_method("T")
    mT = _array_method("mT")
    var = _array_method("var")
    view = _array_method("view")


def _check_no_repeated_names(
    new_names: Sequence[AxisName], afn: Mapping[AxisName, int], operation: str
) -> None:
    counts = collections.Counter(iter(afn))
    counts.update(new_names)
    repeated = [name for name, count in counts.items() if count > 1]
    if repeated:
        raise ValueError(
            f"Repeated axis names are not allowed; original names were {tuple(afn)} and new"
            f" names passed to {operation} were {tuple(new_names)}; repeated: {repeated}"
        )


@struct.pytree_dataclass
class NamedArray(NamedArrayBase, struct.Struct):
    r"""An array with positional axes followed by named axes.

    Operations on a ``NamedArray`` act on its positional axes and are vectorized over its
    named axes (see ``nmap``). To operate on a named axis, ``untag`` it (making it
    positional), apply the operation, and ``tag`` the positional result axes with names.

    The data array stores the positional axes first and the named axes last, in the order of
    ``named_axes``. Because the positional axes lead, stacking ``NamedArray``\ s (along axis
    0) or scanning over them with ``jax.lax.scan`` works directly. Only those leading axes
    may be manipulated through ``data_array`` by code that does not know about names.

    Several operations return a ``NamedArrayView`` instead, which allows any layout and thus
    avoids transposes; ``with_positional_prefix`` converts a view to a ``NamedArray``.

    The order of ``named_axes`` is static pytree metadata, so equal-shaped arrays can have
    different tree structures; ``order_like`` or ``canonicalize`` makes them agree.

    Attributes:
        named_axes: The named axes and their sizes, in storage order. The sizes equal the
            trailing ``len(named_axes)`` entries of ``data_array.shape``.
        data_array: The underlying array.
    """

    named_axes: collections.OrderedDict[AxisName, int] = dataclasses.field(
        metadata={"pytree_node": False}
    )
    data_array: jax.Array

    # Keep the elementwise ``==``; dataclasses would otherwise generate a field comparison.
    __eq__ = NamedArrayBase.__eq__

    @classmethod
    def wrap(cls, array: jax.typing.ArrayLike, *names: AxisName) -> NamedArray:
        """Wraps an array, optionally naming all of its axes.

        Args:
            array: An array-like; converted with ``jnp.asarray``.
            *names: Either nothing (all axes stay positional) or one name per axis, which is
                shorthand for ``wrap(array).tag(*names)``.

        Returns:
            The wrapped array.
        """
        wrapped = _new_named_array(collections.OrderedDict(), _as_jax_array(array))
        return wrapped.tag(*names) if names else wrapped

    @property
    def dtype(self) -> np.dtype:
        return self.data_array.dtype

    def check_valid(self) -> None:
        if not hasattr(self.data_array, "shape") or not hasattr(self.data_array, "dtype"):
            raise ValueError(
                "NamedArray.data_array must contain a jax or numpy array (or at least something"
                f" with a shape and dtype), not {type(self.data_array)}"
            )
        if not isinstance(self.named_axes, collections.OrderedDict) or not all(
            isinstance(size, int) for size in self.named_axes.values()
        ):
            raise ValueError(
                "NamedArray.named_axes must be an ordered dictionary of named axis shapes"
                f" (axis name -> int size), not {self.named_axes!r}"
            )
        _check_name_types(tuple(self.named_axes), "NamedArray")
        data_shape = tuple(self.data_array.shape)
        named_sizes = tuple(self.named_axes.values())
        if len(named_sizes) > len(data_shape) or (
            named_sizes and data_shape[-len(named_sizes) :] != named_sizes
        ):
            raise ValueError(
                "The axis sizes in `named_axes` must exactly match a suffix of the data array's"
                f" shape, but {named_sizes} (from named_axes {dict(self.named_axes)}) was not a"
                f" suffix of {data_shape}"
            )

    def _layout(self) -> _Layout:
        data = self.data_array
        named_axes = self.named_axes
        try:
            shape = data.shape
        except AttributeError:
            self.check_valid()
            raise
        num_positional = len(shape) - len(named_axes)
        if num_positional < 0 or shape[num_positional:] != tuple(named_axes.values()):
            self.check_valid()
        afn = {name: num_positional + i for i, name in enumerate(named_axes)}
        return data, afn, tuple(range(num_positional)), tuple(shape)

    @property
    def named_shape(self) -> Mapping[AxisName, int]:
        return dict(self.named_axes)

    @property
    def positional_shape(self) -> tuple[int, ...]:
        _, _, logical, shape = self._layout()
        return shape[: len(logical)]

    def unwrap(self, *names: AxisName) -> jax.Array:
        if names:
            return _unwrap_with_names(self, names)
        if self.named_axes:
            raise ValueError(
                "To unwrap a NamedArray with nonempty named shape, an ordering for its named"
                f" axes must be provided. Named shape: {dict(self.named_axes)}"
            )
        return self.data_array

    def with_positional_prefix(self) -> NamedArray:
        return self

    def as_namedarrayview(self) -> NamedArrayView:
        data, afn, logical, shape = self._layout()
        return _new_view(shape, logical, afn, data)

    def untag(self, *axis_order: AxisName) -> NamedArray | NamedArrayView:
        return _untag(self, axis_order)

    def tag(self, *names: AxisName) -> NamedArray:
        if not names and len(self.named_axes) == len(self.data_array.shape):
            return self
        return _tag(self, names)


@struct.pytree_dataclass
class NamedArrayView(NamedArrayBase, struct.Struct):
    """A named array whose positional and named axes may sit anywhere in the data array.

    ``untag`` and ``nmap`` return views so that no data has to move; ``tag`` and
    ``with_positional_prefix`` turn a view back into a ``NamedArray`` (the latter transposes
    if needed). The data array's shape must not be changed directly; operate through
    ``nmap``, or call ``with_positional_prefix`` and work on the leading axes.

    Attributes:
        data_shape: The shape ``data_array`` must have.
        data_axis_for_logical_axis: For each positional axis, its index in ``data_array``.
        data_axis_for_name: For each axis name, its index in ``data_array``.
        data_array: The underlying array.
    """

    data_shape: tuple[int, ...] = dataclasses.field(metadata={"pytree_node": False})
    data_axis_for_logical_axis: tuple[int, ...] = dataclasses.field(metadata={"pytree_node": False})
    data_axis_for_name: dict[AxisName, int] = dataclasses.field(metadata={"pytree_node": False})
    data_array: jax.Array

    __eq__ = NamedArrayBase.__eq__

    @property
    def dtype(self) -> np.dtype:
        return self.data_array.dtype

    def check_valid(self) -> None:
        if not hasattr(self.data_array, "shape") or not hasattr(self.data_array, "dtype"):
            raise ValueError(
                "NamedArrayView.data_array must contain a jax or numpy array (or at least"
                f" something with a shape and dtype), not {type(self.data_array)}"
            )
        if tuple(self.data_shape) != tuple(self.data_array.shape):
            raise ValueError(
                f"Expected data_array to have shape {self.data_shape}, but it has shape"
                f" {self.data_array.shape}. Modifying the shape of the data array of a"
                " NamedArrayView directly is not allowed; use `nmap` instead, or call"
                " `with_positional_prefix` if you need to manipulate the positional axes as"
                " prefix axes."
            )
        seen = collections.Counter(self.data_axis_for_logical_axis)
        seen.update(self.data_axis_for_name.values())
        if seen != collections.Counter(range(len(self.data_shape))):
            raise ValueError(
                "Every axis index into `data_shape` must appear exactly once in either"
                " `data_axis_for_logical_axis` or `data_axis_for_name`, but got"
                f" data_axis_for_logical_axis={self.data_axis_for_logical_axis} and"
                f" data_axis_for_name={self.data_axis_for_name} for data_shape"
                f" {self.data_shape}."
            )
        _check_name_types(tuple(self.data_axis_for_name), "NamedArrayView")

    def _layout(self) -> _Layout:
        data = self.data_array
        shape = self.data_shape
        afn = self.data_axis_for_name
        logical = self.data_axis_for_logical_axis
        if getattr(data, "shape", None) != shape or len(afn) + len(logical) != len(shape):
            self.check_valid()
        return data, afn, logical, shape

    @property
    def named_shape(self) -> Mapping[AxisName, int]:
        shape = self.data_shape
        return {name: shape[axis] for name, axis in self.data_axis_for_name.items()}

    @property
    def positional_shape(self) -> tuple[int, ...]:
        shape = self.data_shape
        return tuple(shape[axis] for axis in self.data_axis_for_logical_axis)

    def unwrap(self, *names: AxisName) -> jax.Array:
        self.check_valid()
        if names:
            return _unwrap_with_names(self, names)
        if self.data_axis_for_name:
            raise ValueError(
                "To unwrap a NamedArrayView with nonempty named shape, an ordering for its"
                f" named axes must be provided. Named shape: {dict(self.named_shape)}"
            )
        return self.with_positional_prefix().unwrap()

    def with_positional_prefix(self) -> NamedArray:
        data, afn, logical, shape = self._layout()
        named_in_data_order = sorted(afn.items(), key=operator.itemgetter(1))
        permutation = [*logical, *(axis for _, axis in named_in_data_order)]
        if permutation != list(range(len(permutation))):
            data = jnp.transpose(data, permutation)
        return _new_named_array(
            collections.OrderedDict((name, shape[axis]) for name, axis in named_in_data_order),
            data,
        )

    def as_namedarrayview(self) -> NamedArrayView:
        return self

    def untag(self, *axis_order: AxisName) -> NamedArray | NamedArrayView:
        return _untag(self, axis_order)

    def tag(self, *names: AxisName) -> NamedArray:
        return _tag(self, names)


def _untag(array: NamedArrayBase, axis_order: tuple) -> NamedArray | NamedArrayView:
    data, afn, logical, shape = array._layout()
    if logical:
        raise ValueError(
            "`untag` cannot be used to introduce positional axes for a NamedArray (or"
            " NamedArrayView) that already has positional axes. Please assign names to the"
            f" existing positional axes first using `tag` (positional shape"
            f" {tuple(shape[axis] for axis in logical)}), or use `untag_prefix`."
        )
    if not axis_order:
        return array.with_positional_prefix()
    _check_requested_names(axis_order, afn, shape, "untag")
    requested = set(axis_order)
    remaining = {name: axis for name, axis in afn.items() if name not in requested}
    return _new_view(shape, tuple(afn[name] for name in axis_order), remaining, data)


def _tag(array: NamedArrayBase, names: tuple) -> NamedArray:
    data, afn, logical, shape = array._layout()
    if len(names) != len(logical):
        raise ValueError(
            "There must be exactly as many names given to `tag` as there are positional axes"
            f" in the array, but got {len(names)} names {names} for positional shape"
            f" {tuple(shape[axis] for axis in logical)}. Use `tag_prefix` to name only the"
            " leading positional axes."
        )
    _check_name_types(names, "tag")
    _check_no_repeated_names(names, afn, "tag")
    names_by_axis = [None] * len(shape)
    for name, axis in afn.items():
        names_by_axis[axis] = name
    for name, axis in zip(names, logical):
        names_by_axis[axis] = name
    return _new_named_array(collections.OrderedDict(zip(names_by_axis, shape)), data)


def _unwrap_with_names(array: NamedArrayBase, names: tuple) -> jax.Array:
    if array.positional_shape:
        raise ValueError(
            f"Cannot unwrap a {type(array).__name__} by providing an axis name ordering if it"
            f" already has a positional shape: {array.positional_shape}. For advanced axis"
            " name manipulation, try using `untag` and `tag` directly."
        )
    positional = array.untag(*names)
    if positional.named_shape:
        raise ValueError(
            "When calling `unwrap` with axis names, a position must be given for every axis"
            f" name. Unassigned names: {dict(positional.named_shape)}"
        )
    return positional.unwrap()


wrap = NamedArray.wrap


def is_namedarray(value: Any) -> typing.TypeGuard[NamedArrayBase]:
    """Tells whether ``value`` is a ``NamedArray`` or ``NamedArrayView``.

    Also the natural ``is_leaf`` for ``jax.tree_util`` functions that should stop at named
    arrays instead of descending into their data.
    """
    return isinstance(value, NamedArrayBase)


# ---------------------------------------------------------------------------------------------
# Constructors
# ---------------------------------------------------------------------------------------------


def _constructed(
    function_name: str,
    named_shape: Mapping[AxisName, int],
    make_data: Callable[[tuple[int, ...]], jax.Array],
) -> NamedArray:
    """A ``NamedArray`` with exactly ``named_shape``, its data made by ``make_data(shape)``.

    Args:
        function_name: The public constructor, named in the error for a bad axis name.
        named_shape: The axis names and sizes, in storage order.
        make_data: Builds the data array from the positional shape.

    Returns:
        A ``NamedArray`` without positional axes.
    """
    named_axes = collections.OrderedDict(named_shape)
    _check_name_types(tuple(named_axes), function_name)
    return _new_named_array(named_axes, make_data(tuple(named_axes.values())))


def full(
    named_shape: Mapping[AxisName, int],
    fill_value: jax.typing.ArrayLike,
    dtype: jax.typing.DTypeLike | None = None,
) -> NamedArray:
    """Creates a named array filled with one value.

    Args:
        named_shape: The axis names and sizes of the result, in storage order.
        fill_value: The value of every element.
        dtype: The dtype; inferred from ``fill_value`` if omitted.

    Returns:
        A ``NamedArray`` without positional axes.
    """
    return _constructed("full", named_shape, lambda shape: jnp.full(shape, fill_value, dtype))


def zeros(
    named_shape: Mapping[AxisName, int], dtype: jax.typing.DTypeLike | None = None
) -> NamedArray:
    """Creates a named array of zeros.

    Args:
        named_shape: The axis names and sizes of the result, in storage order.
        dtype: The dtype (JAX's default float type if omitted).

    Returns:
        A ``NamedArray`` without positional axes.
    """
    return _constructed("zeros", named_shape, lambda shape: jnp.zeros(shape, dtype))


def ones(
    named_shape: Mapping[AxisName, int], dtype: jax.typing.DTypeLike | None = None
) -> NamedArray:
    """Creates a named array of ones.

    Args:
        named_shape: The axis names and sizes of the result, in storage order.
        dtype: The dtype (JAX's default float type if omitted).

    Returns:
        A ``NamedArray`` without positional axes.
    """
    return _constructed("ones", named_shape, lambda shape: jnp.ones(shape, dtype))


def arange(
    name: str,
    start: int,
    stop: int | None = None,
    step: int | None = None,
    dtype: jax.typing.DTypeLike | None = None,
) -> NamedArray:
    """Creates a one-axis named array of evenly spaced values (``jnp.arange``, then named).

    Args:
        name: The name of the axis.
        start: First value; if ``stop`` is omitted this is the stop and the start is 0.
        stop: End of the range (exclusive).
        step: Spacing (1 if omitted).
        dtype: The dtype; inferred if omitted.

    Returns:
        A ``NamedArray`` with the single axis ``name``.
    """
    return wrap(jnp.arange(start, stop, step, dtype)).tag(name)


def random_split(
    key: jax.Array | NamedArrayBase,
    named_shape: Mapping[AxisName, int] | Sequence[tuple[AxisName, int]],
) -> NamedArray | NamedArrayView:
    """Splits a PRNG key into one independent key per position of a named shape.

    Args:
        key: A PRNG key, or a named array of keys whose names are disjoint from
            ``named_shape`` (each key is split separately).
        named_shape: The axes to add. A plain mapping's names are sorted first, so the keys
            do not depend on dict insertion order; pass an ``OrderedDict`` or a sequence of
            ``(name, size)`` pairs to fix the order yourself (needed for unsortable names).

    Returns:
        A named array of keys with the names of ``key`` plus ``named_shape``.

    Raises:
        ValueError: If ``named_shape`` is an unordered mapping with unsortable names.
    """
    if not isinstance(key, NamedArrayBase):
        key = wrap(key)
    if isinstance(named_shape, collections.OrderedDict):
        names, sizes = tuple(named_shape.keys()), tuple(named_shape.values())
    elif isinstance(named_shape, Sequence):
        names, sizes = (tuple(column) for column in zip(*named_shape)) if named_shape else ((), ())
    else:
        try:
            names = tuple(sorted(named_shape))
        except TypeError as exc:
            raise ValueError(
                "Unordered mappings must have sortable axis names when using `random_split`,"
                f" but got {list(named_shape)}. Pass a collections.OrderedDict or a sequence of"
                " (name, size) pairs to choose the order."
            ) from exc
        sizes = tuple(named_shape[name] for name in names)
    total = int(np.prod(sizes, dtype=np.int64))
    flat_keys = nmap(jax.random.split)(key, total)
    return flat_keys.reshape(sizes + flat_keys.positional_shape[1:]).tag_prefix(*names)


# ---------------------------------------------------------------------------------------------
# Combining and iterating
# ---------------------------------------------------------------------------------------------


def _common_positional_rank(arrays: Sequence[NamedArrayBase], operation: str) -> int:
    ranks = {len(array.positional_shape) for array in arrays}
    if len(ranks) != 1:
        raise ValueError(
            f"All arrays passed to `{operation}` must have the same number of positional axes,"
            f" but got positional shapes {[array.positional_shape for array in arrays]}"
        )
    return ranks.pop()


def concatenate(
    arrays: Sequence[NamedArrayBase], axis_name: AxisName
) -> NamedArray | NamedArrayView:
    """Joins named arrays end to end along an existing named axis.

    Args:
        arrays: Named arrays that all have ``axis_name`` and agree on every other axis.
        axis_name: The axis to concatenate along.

    Returns:
        The concatenation; ``axis_name`` has the summed size.

    Raises:
        ValueError: If the arrays differ in positional rank, lack ``axis_name``, or disagree
            on another axis.
    """
    rank = _common_positional_rank(arrays, "concatenate")
    for index, array in enumerate(arrays):
        if axis_name not in array.named_shape:
            raise ValueError(
                f"`concatenate` along {axis_name!r}: arrays[{index}] has no such axis (named"
                f" shape {dict(array.named_shape)})."
            )
    placeholders = [TmpPosAxisMarker() for _ in range(rank)]
    pieces = [array.tag(*placeholders).untag(axis_name) for array in arrays]
    joined = nmap(jnp.concatenate)(pieces)
    return joined.tag(axis_name).untag(*placeholders)


def stack(arrays: Sequence[NamedArrayBase], axis_name: AxisName) -> NamedArray | NamedArrayView:
    """Stacks equally shaped named arrays along a new named axis.

    Args:
        arrays: Named arrays with the same named and positional shapes (names broadcast as in
            ``nmap``).
        axis_name: The name of the new axis; must not already exist.

    Returns:
        The stacked array, with ``axis_name`` of size ``len(arrays)``.
    """
    rank = _common_positional_rank(arrays, "stack")
    placeholders = [TmpPosAxisMarker() for _ in range(rank)]
    stacked = nmap(jnp.stack)([array.tag(*placeholders) for array in arrays])
    return stacked.tag(axis_name).untag(*placeholders)


def unstack(array: NamedArrayBase, axis_name: AxisName) -> Sequence[NamedArray | NamedArrayView]:
    """Splits a named array into its slices along a named axis.

    Args:
        array: The array to split.
        axis_name: An axis of ``array``.

    Returns:
        A list with one array per index of ``axis_name``, each without that axis.
    """
    named_shape = array.named_shape
    if axis_name not in named_shape:
        raise ValueError(
            f"`unstack` along {axis_name!r}: the array has no such axis (named shape"
            f" {dict(named_shape)})."
        )
    return [array[{axis_name: i}] for i in range(named_shape[axis_name])]


def order_like(value_tree: Any, reference_tree: Any) -> Any:
    """Lays out every named array in a tree like its counterpart in a reference tree.

    The tree version of ``NamedArrayBase.order_like``: afterwards the two trees have the same
    pytree structure, as JAX needs for ``jax.lax.cond`` branches, scan carries, or tree maps
    over both. Other leaves are returned unchanged.

    Args:
        value_tree: The tree to rearrange.
        reference_tree: A tree of the same structure, up to the storage order of named axes.

    Returns:
        ``value_tree``'s data with ``reference_tree``'s structure.
    """

    def match(value, reference):
        return value.order_like(reference) if isinstance(value, NamedArrayBase) else value

    return jax.tree_util.tree_map(match, value_tree, reference_tree, is_leaf=is_namedarray)


def scan(
    f: Callable[[Any, Any], Any], axis: AxisName, init: Any, xs: Any = None, **scan_kwargs
) -> Any:
    """``jax.lax.scan`` over a named axis.

    ``f(carry, x)`` is called once per index of ``axis`` with the slices of ``xs`` at that
    index (``axis`` removed) and returns ``(new_carry, y)``; the ``y``\\ s are stacked along a
    new named axis ``axis``. Roughly::

        carry, ys = init, []
        for i in range(size_of_axis):
            carry, y = f(carry, xs[{axis: i}])
            ys.append(y)
        return carry, nx.stack(ys, axis)

    The carry returned by ``f`` is re-laid-out like the incoming carry (``order_like``), so
    ``f`` need not care in which order it builds named axes. Plain-array outputs of ``f``
    become named arrays with the new axis.

    Args:
        f: The step function ``(carry, x) -> (carry, y)``.
        axis: The named axis of ``xs`` to scan along.
        init: The initial carry (any pytree).
        xs: A pytree whose leaves are all named arrays with axis ``axis``, or None (then pass
            ``length=`` in ``scan_kwargs``).
        **scan_kwargs: Passed to ``jax.lax.scan`` (``length``, ``reverse``, ``unroll``, ...).

    Returns:
        ``(final_carry, stacked_ys)``.

    Raises:
        ValueError: If a leaf of ``xs`` is not a named array.
    """

    def move_axis_to_front(leaf):
        if not isinstance(leaf, NamedArrayBase):
            raise ValueError(
                f"All leaves of `xs` must be Penzai named arrays, but got {type(leaf).__name__}"
                f" while scanning over {axis!r}."
            )
        return leaf.untag_prefix(axis).with_positional_prefix()

    xs_positional = jax.tree_util.tree_map(move_axis_to_front, xs, is_leaf=is_namedarray)

    def step(carry, x):
        new_carry, y = f(carry, x)
        y = jax.tree_util.tree_map(
            lambda leaf: leaf.with_positional_prefix() if is_namedarray(leaf) else leaf,
            y,
            is_leaf=is_namedarray,
        )
        return order_like(new_carry, carry), y

    final_carry, ys_positional = jax.lax.scan(step, init, xs_positional, **scan_kwargs)

    def name_leading_axis(leaf):
        if not isinstance(leaf, NamedArrayBase):
            leaf = wrap(leaf)
        return leaf.tag_prefix(axis)

    return final_carry, jax.tree_util.tree_map(
        name_leading_axis, ys_positional, is_leaf=is_namedarray
    )
