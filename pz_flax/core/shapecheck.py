"""Runtime checking of shapes, dtypes and structure, with dimension variables.

Models built from nested structs pass nested trees of (named) arrays between
layers, and Python's type annotations cannot say "a dict whose ``'query'``
entry is a float array with named axes ``seq`` and ``heads``, whose ``seq``
size matches the ``seq`` size of ``'key'``". This module can: a *pattern* is a
tree shaped like the value, whose leaves are `ArraySpec` (what an array must
look like), `Wildcard` (anything goes), or plain values (must be equal).

Sizes in an `ArraySpec` may be *dimension variables*:

* ``var("n")`` matches one axis; every use of ``"n"`` must match the same size.
* ``*var("batch")`` matches any run of positional axes (a tuple of sizes).
* ``**var("rest")`` matches any set of named axes (a dict of sizes).
* ``**vars_for_axes("heads", ("h", "kv"))`` names the sizes of known axes.

`check_structure` matches a value against a pattern, solves for every
variable, and returns the solution as a `MatchResult`; when something does not
fit, `StructureMismatchError` lists every mismatch, saying at which key path it
occurred, which variable was involved, what it had been bound to, and at which
key path that binding was made.

Example::

    result = check_structure(
        {"x": x, "mask": mask},
        {
            "x": ArraySpec(named_shape={"seq": var("n"), **var("batch")}),
            "mask": ArraySpec(named_shape={"seq": var("n")}, dtype=np.bool_),
        },
    )
    result.n, result["batch"]  # sizes recovered from the value
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import typing
from collections.abc import Collection
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pz_flax.core import named_axes
from pz_flax.core import struct
from pz_flax.core import tree_util
from pz_flax.core import variables

StructureAnnotation: typing.TypeAlias = Any
"""A pattern: any tree, usually with `ArraySpec` and `Wildcard` leaves."""


@struct.pytree_dataclass
class Wildcard(struct.Struct):
    """A pattern leaf that matches any value, including a whole subtree.

    Attributes:
      description: Optional human-readable note on what is expected here. It
        is only shown when the pattern is displayed; it does not restrict what
        matches.
    """

    description: str | None = dataclasses.field(default=None, metadata={"pytree_node": False})

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any):
        from pz_flax.core._treescope_handlers import shapecheck_handlers

        return shapecheck_handlers.handle_arraystructures(self, path, subtree_renderer)


ANY = Wildcard()
"""The shared `Wildcard` instance with no description."""


@dataclasses.dataclass(frozen=True)
class RemainingAxisPlaceholder:
    """Value paired with a `MultiDimVar` key in a named shape (``**var(...)``).

    It marks the entry as "all the named axes not listed elsewhere" rather than
    a size.
    """


@dataclasses.dataclass(frozen=True, order=True)
class DimVar(Mapping):
    """A variable standing for the size of one axis.

    Create it with `var` or `vars_for_axes`. Besides standing for one size, a
    ``DimVar`` can be unpacked: ``*var("x")`` produces a `MultiDimVar` that
    stands for a run of positional axes, and ``**var("x")`` produces the entry
    ``{MultiDimVar("x"): RemainingAxisPlaceholder()}`` that stands for a group
    of named axes. (That is why it is a one-entry `Mapping`.) Indexing
    ``var("x")[k]`` gives the variable for element ``k`` of whatever
    ``"x"`` is bound to, which is also what `vars_for_axes` builds.

    Attributes:
      name: Identity of the variable: two variables with equal names must
        match equal sizes. Either a string, or a ``(collection, key)`` pair
        naming one element of the collection bound to the string
        ``collection``.
    """

    name: str | tuple[str, str | int]

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[MultiDimVar]:
        if not isinstance(self.name, str):
            raise TypeError(
                f"Cannot unpack {_show_dim(self)}: only variables with a string name can"
                " stand for several axes."
            )
        yield MultiDimVar(self.name)

    def __getitem__(self, key: Any) -> DimVar | RemainingAxisPlaceholder:
        if not isinstance(self.name, str):
            raise TypeError(
                f"Cannot index {_show_dim(self)}: it already names a single element of"
                f" var({self.name[0]!r})."
            )
        if key == MultiDimVar(self.name):
            return RemainingAxisPlaceholder()
        if isinstance(key, int | str):
            return DimVar((self.name, key))
        raise KeyError(f"var({self.name!r}) can only be indexed by an int or str, not {key!r}")


@dataclasses.dataclass(frozen=True, order=True)
class MultiDimVar:
    """A variable standing for a run of positional axes or a group of named axes.

    Usually obtained by unpacking a `DimVar`: ``(2, *var("batch"), 3)`` or
    ``{"seq": 5, **var("rest")}``. In a positional shape it binds to a tuple of
    sizes, in a named shape to a dict from axis name to size.

    Attributes:
      name: Identity of the variable, shared with ``var(name)``.
    """

    name: str


@dataclasses.dataclass(frozen=True, order=True)
class KnownDim:
    """An axis whose size is known in advance, but which also binds a variable.

    `vars_for_axes` creates these for axes given a concrete size, so that the
    size is checked *and* reported in the match result. `check_structure` also
    creates them internally when it substitutes an already-solved unpacked
    variable back into a shape.

    Attributes:
      name: The variable bound to this axis (same conventions as
        `DimVar.name`).
      size: The size the axis must have.
      from_keypath: Where ``size`` was learned, if it was learned from another
        part of the value; used in error messages.
    """

    name: str | tuple[str, str | int]
    size: int
    from_keypath: str | None = None


def var(name: str) -> DimVar:
    """Returns the dimension variable called ``name``.

    Use it directly for one axis, as ``*var(name)`` for a run of positional
    axes, or as ``**var(name)`` for a group of named axes. All occurrences of
    the same name in one `check_structure` call must match consistently.

    Args:
      name: The variable's name; also its key in the `MatchResult`.

    Returns:
      The `DimVar` for ``name``.

    Raises:
      TypeError: If ``name`` is not a string.
    """
    if not isinstance(name, str):
        raise TypeError(f"Dimension variable names must be strings, got {name!r}")
    return DimVar(name)


def vars_for_axes(
    var_name: str,
    axis_names_or_specs: Collection[str] | Mapping[str, int | None],
) -> dict[str, DimVar | KnownDim]:
    """Returns per-axis variables for a known set of named axes.

    The result is meant to be unpacked into a named shape, e.g.
    ``ArraySpec(named_shape={"seq": 5, **vars_for_axes("heads", ("q", "kv"))})``.
    After matching, ``result["heads"]`` is a dict from each of those axis names
    to its size.

    Args:
      var_name: Name under which the sizes are collected in the match result.
      axis_names_or_specs: Either axis names, or a mapping from axis name to a
        required size (or ``None`` when any size is allowed).

    Returns:
      A dict from each axis name to a `DimVar` (unknown size) or a `KnownDim`
      (required size), both named ``(var_name, axis_name)``.
    """
    if not isinstance(axis_names_or_specs, Mapping):
        axis_names_or_specs = dict.fromkeys(axis_names_or_specs)
    specs: dict[str, DimVar | KnownDim] = {}
    for axis_name, size in axis_names_or_specs.items():
        if size is None:
            specs[axis_name] = DimVar((var_name, axis_name))
        else:
            specs[axis_name] = KnownDim((var_name, axis_name), size)
    return specs


@struct.pytree_dataclass
class ArraySpec(struct.Struct):
    """Description of an array (positional and named shape, dtype) to match.

    Like `jax.ShapeDtypeStruct`, but it also describes named axes, allows
    dimension variables, and is a pytree node *with no children* rather than a
    leaf: flattening a tree of ``ArraySpec`` yields no leaves, so a tree of
    specs can sit inside a model (e.g. describing a layer's expected input)
    without ever being touched by `jax.tree_util` transformations.

    The ``named_shape`` compared is the named shape of a `NamedArray` or
    `NamedArrayView`; a plain array has an empty named shape.

    Attributes:
      shape: Positional shape. Entries are ints, `DimVar` s or (via
        ``*var(...)``) `MultiDimVar` s.
      dtype: Required dtype. A concrete dtype (``np.dtype("float32")``,
        ``jnp.float32``) must match exactly; an abstract numpy scalar class
        (``np.floating``, ``np.integer``, the default ``np.generic``) accepts
        any dtype below it.
      named_shape: Named shape, from axis name to an int, a `DimVar` or a
        `KnownDim`; a `MultiDimVar` key with the value
        `RemainingAxisPlaceholder` (from ``**var(...)``) stands for any other
        named axes.
    """

    shape: tuple[int | DimVar | MultiDimVar, ...] = dataclasses.field(
        default=(), metadata={"pytree_node": False}
    )
    dtype: jax.typing.DTypeLike = dataclasses.field(
        default=np.generic, metadata={"pytree_node": False}
    )
    named_shape: Mapping[Any, int | DimVar | RemainingAxisPlaceholder] = dataclasses.field(
        default_factory=dict, metadata={"pytree_node": False}
    )

    @property
    def positional_shape(self) -> tuple[int | DimVar | MultiDimVar, ...]:
        """The positional shape, named as on `NamedArray`."""
        return self.shape

    @classmethod
    def floating_named(
        cls, named_shape: Mapping[Any, int | DimVar | RemainingAxisPlaceholder]
    ) -> ArraySpec:
        """Returns a spec for a floating-point array with only named axes.

        Args:
          named_shape: The named shape to require.

        Returns:
          ``ArraySpec(named_shape=named_shape, dtype=np.floating)``.
        """
        return cls(named_shape=named_shape, dtype=np.floating)

    def into_pytree(self) -> jax.ShapeDtypeStruct | named_axes.NamedArray:
        """Returns a pytree *leaf* standing for an array of this spec.

        Unlike the spec itself (a node with no leaves), the result has one leaf,
        a `jax.ShapeDtypeStruct`, so it can be used as an abstract target, e.g.
        to restore or initialize arrays into. With named axes, the struct is
        wrapped in a `NamedArray` whose named axes follow the positional ones in
        the order of ``named_shape``.

        Returns:
          A ``ShapeDtypeStruct``, or a ``NamedArray`` around one.

        Raises:
          ValueError: If the spec contains any dimension variable.
        """

        def concrete_size(size: Any) -> int | None:
            if isinstance(size, KnownDim):
                return size.size
            return operator.index(size) if _is_int(size) else None

        variable_dims = [
            _show_pattern((dim,))[1:-2] for dim in self.shape if concrete_size(dim) is None
        ]
        variable_dims.extend(
            _show_pattern({key: size})[1:-1]
            for key, size in self.named_shape.items()
            if isinstance(key, MultiDimVar) or concrete_size(size) is None
        )
        if variable_dims:
            raise ValueError(
                "Cannot use `into_pytree` on an ArraySpec with variable dimensions; found"
                f" {', '.join(variable_dims)}."
            )
        positional = tuple(concrete_size(dim) for dim in self.shape)
        named = collections.OrderedDict(
            (name, concrete_size(size)) for name, size in self.named_shape.items()
        )
        if not named:
            return jax.ShapeDtypeStruct(positional, self.dtype)
        return named_axes.NamedArray(
            named_axes=named,
            data_array=jax.ShapeDtypeStruct(positional + tuple(named.values()), self.dtype),
        )

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any):
        from pz_flax.core._treescope_handlers import shapecheck_handlers

        return shapecheck_handlers.handle_arraystructures(self, path, subtree_renderer)


class StructureMismatchError(Exception):
    """Raised by `check_structure` when a value does not match its pattern."""


_SizeBinding: typing.TypeAlias = int | tuple[int, ...] | dict[Any, int]


@dataclasses.dataclass(frozen=True)
class MatchResult(Mapping[str, _SizeBinding]):
    """The variable bindings found by a successful `check_structure`.

    Read a binding as ``result["n"]`` or ``result.n``; read several at once as
    ``result["n", "m"]`` (a tuple); or convert with ``dict(result)``. A result
    can be passed as ``known_vars`` to a later `check_structure` call to keep
    the two checks consistent.

    Attributes:
      _bindings: Map from variable name to its size (for ``var``), tuple of
        sizes (for ``*var``), or dict of named sizes (for ``**var`` and
        `vars_for_axes`).
    """

    _bindings: dict[str, _SizeBinding]

    def __len__(self) -> int:
        return len(self._bindings)

    def __iter__(self) -> Iterator[str]:
        return iter(self._bindings)

    def __getitem__(self, key_or_keys: str | tuple[str, ...]) -> Any:
        if isinstance(key_or_keys, str):
            return self._bindings[key_or_keys]
        return tuple(self._bindings[key] for key in key_or_keys)

    def __getattr__(self, key: str) -> _SizeBinding:
        # Looking up `_bindings` itself must not recurse (e.g. while copying).
        if key != "_bindings" and key in self._bindings:
            return self._bindings[key]
        raise AttributeError(f"No variable named {key!r} was bound", name=key, obj=self)


# ---------------------------------------------------------------------------
# Constraint solving.
#
# Matching first turns every pattern leaf into constraints (positional shape,
# named shape, or an already-known failure). Constraints with at most one
# unpacked variable can be solved directly; those with two or more are put off
# until other constraints have bound enough of their variables to substitute
# them in. Solving repeats until everything is solved, something fails, or a
# pass makes no progress.
# ---------------------------------------------------------------------------

_KNOWN_VARS_SOURCE = "the known variable assignments (argument `known_vars` to check_structure)"

_PositionalPattern: typing.TypeAlias = tuple[int | DimVar | MultiDimVar | KnownDim, ...]
_NamedPattern: typing.TypeAlias = dict[Any, int | DimVar | KnownDim | RemainingAxisPlaceholder]


@dataclasses.dataclass(frozen=True)
class _Bound:
    """A variable's solution and the key path (as text) that determined it."""

    source: str
    value: _SizeBinding


@dataclasses.dataclass(frozen=True)
class _PositionalShapeConstraint:
    value: tuple[int, ...]
    pattern: _PositionalPattern

    def unpacked_vars(self) -> list[MultiDimVar]:
        return [dim for dim in self.pattern if isinstance(dim, MultiDimVar)]

    def all_vars(self) -> list[DimVar | MultiDimVar]:
        return [dim for dim in self.pattern if isinstance(dim, DimVar | MultiDimVar)]


@dataclasses.dataclass(frozen=True)
class _NamedShapeConstraint:
    value: dict[Any, int]
    pattern: _NamedPattern

    def unpacked_vars(self) -> list[MultiDimVar]:
        return [key for key in self.pattern if isinstance(key, MultiDimVar)]

    def all_vars(self) -> list[DimVar | MultiDimVar]:
        size_vars = [size for size in self.pattern.values() if isinstance(size, DimVar)]
        return size_vars + self.unpacked_vars()


@dataclasses.dataclass(frozen=True)
class _Failure:
    message: str


_Constraint: typing.TypeAlias = _PositionalShapeConstraint | _NamedShapeConstraint | _Failure


def _is_int(value: Any) -> bool:
    """Whether ``value`` is an integer size (Python or NumPy int, not bool)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _show_dim(dim: Any) -> str:
    """Formats a size or size variable the way error messages show it."""
    if isinstance(dim, DimVar | MultiDimVar | KnownDim):
        if isinstance(dim.name, tuple):
            text = f"var({dim.name[0]!r})[{dim.name[1]!r}]"
        else:
            text = f"var({dim.name!r})"
        if isinstance(dim, KnownDim):
            text += f":={dim.size}"
        return text
    return repr(dim)


def _show_pattern(pattern: _PositionalPattern | _NamedPattern) -> str:
    """Formats a positional or named shape pattern with its unpacked variables."""
    if isinstance(pattern, tuple):
        parts = [
            f"*var({dim.name!r})" if isinstance(dim, MultiDimVar) else _show_dim(dim)
            for dim in pattern
        ]
        return "(" + parts[0] + ",)" if len(parts) == 1 else "(" + ", ".join(parts) + ")"
    parts = []
    for key, size in pattern.items():
        if isinstance(key, MultiDimVar) and isinstance(size, RemainingAxisPlaceholder):
            parts.append(f"**var({key.name!r})")
        else:
            parts.append(f"{key!r}: {_show_dim(size)}")
    return "{" + ", ".join(parts) + "}"


def _sorted_names(names: Collection[Any]) -> list[Any]:
    """Sorts axis names, falling back to their reprs when types are mixed."""
    try:
        return sorted(names)
    except TypeError:
        return sorted(names, key=repr)


def _variable_contents(variable: nnx.Variable) -> Any:
    """Returns what a variable holds, as the user sees it.

    A pz_flax variable's ``value`` restores the axis names its raw NNX value
    lacks; any other NNX variable simply holds its array.
    """
    if isinstance(variable, variables.AbstractVariable):
        return variable.value
    return variable.get_value()


def _is_array_leaf(node: Any) -> bool:
    """Whether `as_array_structure` stops at ``node`` (see `_abstract_leaf`).

    NNX variables are pytree nodes wrapping a positional array; treating the
    variable as the leaf lets its axis names take part.
    """
    return named_axes.is_namedarray(node) or tree_util.is_variable_node(node)


def _described_field_by_field(snapshot_or_slot: Any) -> Any:
    """A frozen variable or a slot with each of its fields described, as for any struct."""
    split = tree_util.tree_flatten_exactly_one_level(snapshot_or_slot)
    if split is None:
        return ANY
    keyed_children, treedef = split
    return treedef.unflatten([as_array_structure(child) for _, child in keyed_children])


def _abstract_leaf(value: Any) -> Any:
    """Returns the concrete `ArraySpec` describing ``value``, or `ANY`.

    A variable is described by the array it holds; its frozen snapshots and
    slots are plain structs, described field by field.
    """
    if isinstance(value, variables.AbstractVariableValue | variables.AbstractVariableSlot):
        return _described_field_by_field(value)
    if tree_util.is_variable_node(value):
        value = _variable_contents(value)
    if isinstance(value, named_axes.NamedArrayBase):
        value.check_valid()
        return ArraySpec(
            shape=tuple(value.positional_shape),
            named_shape=dict(value.named_shape),
            dtype=value.dtype,
        )
    if isinstance(value, ArraySpec):
        return ArraySpec(shape=value.shape, named_shape=value.named_shape, dtype=value.dtype)
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return ArraySpec(shape=tuple(value.shape), dtype=value.dtype)
    if isinstance(value, jax.typing.ArrayLike):
        return ArraySpec(shape=jnp.shape(value), dtype=jnp.result_type(value))
    return ANY


def _dtype_constraints(expected: Any, actual: Any) -> list[_Constraint]:
    """Checks a value's dtype against a spec's (abstract or concrete) dtype."""
    if isinstance(expected, type) and issubclass(expected, np.generic):
        if jnp.issubdtype(actual, expected):
            return []
        return [
            _Failure(
                f"Value has the wrong dtype: expected a sub-dtype of {expected} but got dtype"
                f" {actual}."
            )
        ]
    expected_dtype = jax.dtypes.canonicalize_dtype(expected, allow_extended_dtype=True)
    actual_dtype = jax.dtypes.canonicalize_dtype(actual, allow_extended_dtype=True)
    if expected_dtype == actual_dtype:
        return []
    return [
        _Failure(
            f"Value has the wrong dtype: expected dtype {expected_dtype} but got dtype"
            f" {actual_dtype}."
        )
    ]


def _leaf_constraints(spec: ArraySpec, value: Any) -> list[_Constraint]:
    """Returns the constraints under which ``value`` matches ``spec``."""
    concrete = _abstract_leaf(value)
    if not isinstance(concrete, ArraySpec):
        return [_Failure(f"Couldn't match an ArraySpec with a non-arraylike value {value}")]
    constraints = _dtype_constraints(spec.dtype, concrete.dtype)
    constraints.append(_PositionalShapeConstraint(tuple(concrete.shape), tuple(spec.shape)))
    constraints.append(_NamedShapeConstraint(dict(concrete.named_shape), dict(spec.named_shape)))
    return constraints


def _equality_constraints(pattern: Any, value: Any) -> list[_Constraint]:
    """Returns a failure unless a non-spec pattern leaf equals the value."""
    try:
        is_equal = pattern == value
        if isinstance(is_equal, jax.Array | np.ndarray):
            is_equal = bool(np.all(is_equal))
        is_equal = bool(is_equal)
    except (jax.errors.ConcretizationTypeError, ValueError):
        # Traced values cannot be compared, and arrays of different shapes
        # cannot be broadcast together; neither is a match.
        is_equal = False
    if is_equal:
        return []
    return [_Failure(f"Value {value!r} was not equal to the non-ArraySpec pattern {pattern!r}.")]


class _Solver:
    """Solves shape constraints for dimension variables, collecting failures."""

    def __init__(self, known_vars: Mapping[str, _SizeBinding] | None):
        self.solutions: dict[Any, _Bound] = {}
        if known_vars is not None:
            for name, value in dict(known_vars).items():
                self.solutions[name] = _Bound(_KNOWN_VARS_SOURCE, value)

    def bind_or_compare(self, where: str, pattern: Any, value: _SizeBinding) -> str | None:
        """Matches one size (or unpacked group of sizes) against its pattern.

        Args:
          where: The key path being matched, as ``root...`` text.
          pattern: An int, `DimVar`, `MultiDimVar` or `KnownDim`.
          value: The actual size, tuple of sizes, or dict of named sizes.

        Returns:
          None on success (binding any unbound variable), else a message.
        """
        if isinstance(pattern, DimVar | MultiDimVar):
            previous = self.solutions.get(pattern.name)
            if previous is None:
                self.solutions[pattern.name] = _Bound(where, value)
                return None
            if previous.value != value:
                return (
                    f"Size {value} does not match previous size {previous.value} for"
                    f" {_show_dim(pattern)} from {previous.source}"
                )
            return None
        if isinstance(pattern, KnownDim):
            previous = self.solutions.get(pattern.name)
            if previous is None:
                self.solutions[pattern.name] = _Bound(where, value)
            elif previous.value != pattern.size:
                return (
                    f"Size {pattern.size} does not match previous size {previous.value} for"
                    f" {_show_dim(pattern)} from {previous.source}"
                )
            if value == pattern.size:
                return None
            if pattern.from_keypath is not None:
                return (
                    f"Size {value} does not match previous size {pattern.size} for"
                    f" {_show_dim(pattern)} from {pattern.from_keypath}"
                )
            return f"Actual size {value} does not match expected {_show_dim(pattern)}"
        if _is_int(pattern):
            if value == pattern:
                return None
            return f"Actual size {value} does not match expected {_show_dim(pattern)}"
        return (
            f"Unsupported entry {pattern!r} in a shape pattern; expected an int, var(...),"
            " *var(...) or a KnownDim"
        )

    def _substitute_positional(
        self, constraint: _PositionalShapeConstraint
    ) -> tuple[_PositionalShapeConstraint | _Failure, str]:
        """Replaces solved ``*var(...)`` entries by the sizes they were bound to."""
        new_pattern = []
        notes = []
        for dim in constraint.pattern:
            bound = self.solutions.get(dim.name) if isinstance(dim, MultiDimVar) else None
            if bound is None:
                new_pattern.append(dim)
                continue
            if not isinstance(bound.value, tuple):
                return (
                    _Failure(
                        f"*var({dim.name!r}) stands for several positional axes, but"
                        f" var({dim.name!r}) was bound to {bound.value!r} from {bound.source}"
                    ),
                    "".join(notes),
                )
            new_pattern.extend(
                KnownDim((dim.name, i), size, from_keypath=bound.source)
                for i, size in enumerate(bound.value)
            )
            notes.append(
                f"\n  After inlining var({dim.name!r}) = {bound.value} from {bound.source}"
            )
        return _PositionalShapeConstraint(constraint.value, tuple(new_pattern)), "".join(notes)

    def _substitute_named(
        self, constraint: _NamedShapeConstraint
    ) -> tuple[_NamedShapeConstraint | _Failure, str]:
        """Replaces solved ``**var(...)`` entries by the named sizes they were bound to."""
        new_pattern: _NamedPattern = {}
        solved = []
        for key, size in constraint.pattern.items():
            if isinstance(key, MultiDimVar) and key.name in self.solutions:
                solved.append(key)
            else:
                new_pattern[key] = size
        notes = []
        for key in solved:
            bound = self.solutions[key.name]
            if not isinstance(bound.value, Mapping):
                return (
                    _Failure(
                        f"**var({key.name!r}) stands for a group of named axes, but"
                        f" var({key.name!r}) was bound to {bound.value!r} from {bound.source}"
                    ),
                    "".join(notes),
                )
            for axis_name, axis_size in bound.value.items():
                if axis_name in new_pattern:
                    return (
                        _Failure(
                            f"Key conflict while substituting unpacked variable {_show_dim(key)}"
                            f" for known named sub-shape {bound.value} from {bound.source}: name"
                            f" {axis_name} is already present in the shape"
                            f" {_show_pattern(constraint.pattern)}."
                        ),
                        "".join(notes),
                    )
                new_pattern[axis_name] = KnownDim(
                    (key.name, axis_name), axis_size, from_keypath=bound.source
                )
            notes.append(
                f"\n  After inlining var({key.name!r}) = {bound.value} from {bound.source}"
            )
        return _NamedShapeConstraint(constraint.value, new_pattern), "".join(notes)

    def solve_positional(
        self, where: str, constraint: _PositionalShapeConstraint, notes: str
    ) -> str | None:
        """Solves a positional constraint with at most one unpacked variable."""
        value, pattern = constraint.value, constraint.pattern
        problems = []
        unpacked_at = [i for i, dim in enumerate(pattern) if isinstance(dim, MultiDimVar)]
        if unpacked_at:
            [prefix_len] = unpacked_at
            suffix_len = len(pattern) - prefix_len - 1
            if len(value) < prefix_len + suffix_len:
                return (
                    f"Positional shape {value} was shorter than wildcard pattern"
                    f" {_show_pattern(pattern)}" + notes
                )
            unpacked = pattern[prefix_len]
            suffix_start = len(value) - suffix_len
            problem = self.bind_or_compare(where, unpacked, value[prefix_len:suffix_start])
            if problem is not None:
                problems.append(f"  Unpack pattern *var({unpacked.name}): {problem}")
            # Fixed entries line up with the start and end of the value.
            aligned = [(i, i) for i in range(prefix_len)]
            aligned += [(suffix_start + j, prefix_len + 1 + j) for j in range(suffix_len)]
        else:
            if len(value) != len(pattern):
                return (
                    f"Positional shape {value} had different length than pattern"
                    f" {_show_pattern(pattern)}" + notes
                )
            aligned = [(i, i) for i in range(len(value))]
        for value_index, pattern_index in aligned:
            problem = self.bind_or_compare(where, pattern[pattern_index], value[value_index])
            if problem is not None:
                problems.append(f"  Dim {value_index}: {problem}")
        if not problems:
            return None
        return (
            f"Positional shape mismatch between value {value} and pattern"
            f" {_show_pattern(pattern)}:\n" + "\n".join(problems) + notes
        )

    def solve_named(self, where: str, constraint: _NamedShapeConstraint, notes: str) -> str | None:
        """Solves a named constraint with at most one unpacked variable."""
        value, pattern = constraint.value, constraint.pattern
        problems = []
        unmatched = dict.fromkeys(value)
        unpacked_keys = []
        for key, size in pattern.items():
            if isinstance(key, MultiDimVar):
                unpacked_keys.append(key)
            elif key in value:
                problem = self.bind_or_compare(where, size, value[key])
                if problem is not None:
                    problems.append(f"  Axis {key!r}: {problem}")
                del unmatched[key]
            else:
                problems.append(f"  Axis {key!r}: Expected to be present but was missing")
        if unpacked_keys:
            [unpacked] = unpacked_keys
            rest = {name: value[name] for name in unmatched}
            problem = self.bind_or_compare(where, unpacked, rest)
            if problem is not None:
                problems.append(f"  Unpack pattern **{unpacked!r}: {problem}")
        elif unmatched:
            problems.append(
                f"  Unexpected names in value's named shape: {_sorted_names(unmatched)}"
            )
        if not problems:
            return None
        return (
            f"Named shape mismatch between value {value} and pattern {_show_pattern(pattern)}:\n"
            + "\n".join(problems)
            + notes
        )

    def solve(self, constraints: list[tuple[Any, _Constraint]], error_prefix: str) -> None:
        """Solves all constraints, raising `StructureMismatchError` on any failure."""
        failures = []
        pending = []
        for keypath, constraint in constraints:
            if isinstance(constraint, _Failure):
                failures.append((keypath, constraint.message))
            else:
                pending.append((keypath, constraint))

        while pending or failures:
            deferred = []
            deferred_vars: list[DimVar | MultiDimVar] = []
            for keypath, constraint in pending:
                where = "root" + jax.tree_util.keystr(keypath)
                if isinstance(constraint, _PositionalShapeConstraint):
                    constraint, notes = self._substitute_positional(constraint)
                else:
                    constraint, notes = self._substitute_named(constraint)
                if isinstance(constraint, _Failure):
                    failures.append((keypath, constraint.message + notes))
                    continue
                if len(constraint.unpacked_vars()) >= 2:
                    # Ambiguous until other constraints pin down all but one.
                    deferred.append((keypath, constraint))
                    deferred_vars.extend(constraint.all_vars())
                    continue
                if isinstance(constraint, _PositionalShapeConstraint):
                    problem = self.solve_positional(where, constraint, notes)
                else:
                    problem = self.solve_named(where, constraint, notes)
                if problem is not None:
                    failures.append((keypath, problem))

            if failures:
                lines = [error_prefix + "Mismatch while checking structures:"]
                lines.extend(
                    f"At root{jax.tree_util.keystr(keypath)}: {message}"
                    for keypath, message in failures
                )
                if deferred:
                    lines.append(
                        "There may also be additional mismatches due to remaining unsolved"
                        " constraints."
                    )
                raise StructureMismatchError("\n".join(lines))
            if len(deferred) == len(pending):
                raise StructureMismatchError(
                    error_prefix + "Could not solve for all variable constraints. This usually"
                    " means the variable assignment is ambiguous because multiple unpack"
                    " patterns (*var(...) or **var(...)) appeared in the same positional or"
                    " named shape.\nUnsolvable variables: "
                    + ", ".join(sorted({_show_dim(v) for v in deferred_vars}))
                    + "\nUnsolvable constraints:"
                    + "".join(
                        f"\n  {constraint.value} == {_show_pattern(constraint.pattern)} from"
                        f" root{jax.tree_util.keystr(keypath)}"
                        for keypath, constraint in deferred
                    )
                )
            pending = deferred

    def result(self, error_prefix: str) -> MatchResult:
        """Groups per-element solutions under their collection's name."""
        bindings: dict[str, Any] = {}
        conflicts = []
        for name, bound in self.solutions.items():
            if not isinstance(name, tuple):
                bindings[name] = bound.value
                continue
            collection, key = name
            whole = self.solutions.get(collection)
            if whole is None:
                bindings.setdefault(collection, {})[key] = bound.value
                continue
            # The collection was also bound as a whole; its element must agree.
            if isinstance(key, int) and isinstance(whole.value, tuple):
                element = whole.value[key] if key < len(whole.value) else None
            elif isinstance(key, str) and isinstance(whole.value, Mapping):
                element = whole.value.get(key)
            else:
                element = None
            if element != bound.value:
                conflicts.append(
                    f"  {_show_dim(DimVar(collection))}: Solved as {whole.value} from"
                    f" {whole.source} but separately solved {_show_dim(DimVar(name))} as"
                    f" {bound.value} from {bound.source}"
                )
        if conflicts:
            raise StructureMismatchError(
                error_prefix
                + "Unexpected conflicts between variable assignments:\n"
                + "\n".join(conflicts)
            )
        return MatchResult(bindings)


def check_structure(
    value: Any,
    pattern: StructureAnnotation,
    known_vars: Mapping[str, _SizeBinding] | None = None,
    error_prefix: str = "",
) -> MatchResult:
    """Checks a tree of values against a pattern and solves its size variables.

    Args:
      value: The tree to check, usually of arrays and `NamedArray` s. An NNX
        variable (e.g. a `Parameter`) standing where the pattern has an
        `ArraySpec` is matched by the array it holds, with its axis names.
      pattern: A tree with the same structure down to its `ArraySpec` and
        `Wildcard` leaves. An `ArraySpec` must match an array (or named array)
        at that position; a `Wildcard` matches anything, even a subtree; any
        other leaf must compare equal to the value there.
      known_vars: Bindings that must hold already, typically the `MatchResult`
        of an earlier check (e.g. of a layer's input, when checking its
        output). They are included in the returned result.
      error_prefix: Text put in front of error messages, to say what was being
        checked.

    Returns:
      The binding of every dimension variable in ``pattern`` (and of
      ``known_vars``).

    Raises:
      StructureMismatchError: If a leaf does not match, or the variables
        cannot be bound consistently (or, with several unpacked variables in
        one shape, cannot be determined at all).
      ValueError: If ``value`` does not have ``pattern``'s tree structure.
    """
    constraints: list[tuple[Any, _Constraint]] = []

    def collect(keypath, pattern_leaf, value_subtree):
        if isinstance(pattern_leaf, ArraySpec):
            found = _leaf_constraints(pattern_leaf, value_subtree)
        elif isinstance(pattern_leaf, Wildcard):
            found = []
        else:
            found = _equality_constraints(pattern_leaf, value_subtree)
        constraints.extend((keypath, constraint) for constraint in found)

    jax.tree_util.tree_map_with_path(
        collect, pattern, value, is_leaf=lambda node: isinstance(node, ArraySpec | Wildcard)
    )
    solver = _Solver(known_vars)
    solver.solve(constraints, error_prefix)
    return solver.result(error_prefix)


@dataclasses.dataclass
class DimensionVariableSubstitution:
    """Values (or replacement variables) for every dimension variable in a pattern.

    Obtain one with `get_dimension_variables`, replace its values, and apply it
    with `full_substitute_dimension_variables`. Values may themselves contain
    variables, e.g. ``mapping_variables["x"] = {"extra": 1, **var("y")}`` to
    rename ``**var("x")`` to ``**var("y")`` while adding an axis.

    Attributes:
      size_variables: From a single-axis variable name (string, or
        ``(collection, key)`` pair) to its size or a replacement `DimVar`.
      sequence_variables: From a ``*var`` name to the sizes (or variables) it
        stands for.
      mapping_variables: From a ``**var`` name to the named sizes (or
        variables) it stands for.
    """

    size_variables: dict[str | tuple[str, str | int], int | DimVar]
    sequence_variables: dict[str, tuple[int | DimVar | MultiDimVar, ...]]
    mapping_variables: dict[str, dict[Any, int | DimVar | RemainingAxisPlaceholder]]

    def is_empty(self) -> bool:
        """Whether there is no variable of any kind."""
        return not (self.size_variables or self.sequence_variables or self.mapping_variables)


def _is_spec(node: Any) -> bool:
    return isinstance(node, ArraySpec)


def get_dimension_variables(structure: StructureAnnotation) -> DimensionVariableSubstitution:
    """Collects every dimension variable used in a tree of `ArraySpec` s.

    Args:
      structure: A pattern tree.

    Returns:
      A substitution mapping each variable to itself (so applying it changes
      nothing but `KnownDim` entries, which become plain sizes). Its keys say
      which variables the structure uses; replace the values before applying.
    """
    found = DimensionVariableSubstitution({}, {}, {})

    def visit(leaf):
        if not isinstance(leaf, ArraySpec):
            return
        for dim in leaf.shape:
            if isinstance(dim, DimVar):
                found.size_variables[dim.name] = dim
            elif isinstance(dim, MultiDimVar):
                found.sequence_variables[dim.name] = (dim,)
        for key, size in leaf.named_shape.items():
            if isinstance(size, DimVar):
                found.size_variables[size.name] = size
            elif isinstance(key, MultiDimVar):
                found.mapping_variables[key.name] = {key: size}

    jax.tree_util.tree_map(visit, structure, is_leaf=_is_spec)
    return found


def _lookup_substitution(table: Mapping[Any, Any], dim: Any, kind: str, where: str) -> Any:
    try:
        return table[dim.name]
    except KeyError:
        raise KeyError(
            f"No substitution for {_show_dim(dim)} (a {kind}) used at {where}; the"
            f" substitution's {kind} keys are {list(table)}"
        ) from None


def full_substitute_dimension_variables(
    structure: StructureAnnotation, substitution: DimensionVariableSubstitution
) -> Any:
    """Replaces every dimension variable in a tree of `ArraySpec` s.

    Args:
      structure: A pattern tree.
      substitution: A value for every variable in ``structure`` (usually built
        from `get_dimension_variables`).

    Returns:
      A copy of ``structure`` with variables replaced and every `KnownDim`
      reduced to its size; fully concrete if the substitution had no
      variables in it.

    Raises:
      KeyError: If the substitution lacks a variable the structure uses.
      ValueError: If a ``**var`` expands to an axis name the shape already has.
    """

    def substitute(keypath, leaf):
        if not isinstance(leaf, ArraySpec):
            return leaf
        where = "root" + jax.tree_util.keystr(keypath)
        shape = []
        for dim in leaf.shape:
            if isinstance(dim, DimVar):
                shape.append(
                    _lookup_substitution(substitution.size_variables, dim, "size_variables", where)
                )
            elif isinstance(dim, MultiDimVar):
                shape.extend(
                    _lookup_substitution(
                        substitution.sequence_variables, dim, "sequence_variables", where
                    )
                )
            elif isinstance(dim, KnownDim):
                shape.append(dim.size)
            else:
                shape.append(dim)
        named_shape = {}
        for key, size in leaf.named_shape.items():
            if isinstance(size, DimVar):
                named_shape[key] = _lookup_substitution(
                    substitution.size_variables, size, "size_variables", where
                )
            elif isinstance(size, KnownDim):
                named_shape[key] = size.size
            elif isinstance(key, MultiDimVar):
                expansion = _lookup_substitution(
                    substitution.mapping_variables, key, "mapping_variables", where
                )
                for axis_name, axis_size in expansion.items():
                    # Substituting a group variable by itself (or by a group that
                    # keeps it) is not a conflict.
                    is_same_group = axis_name == key
                    if not is_same_group and (
                        axis_name in named_shape or axis_name in leaf.named_shape
                    ):
                        raise ValueError(
                            f"Key conflict while substituting mapping variable {_show_dim(key)}"
                            f" at {where}: name {axis_name} is already present"
                        )
                    named_shape[axis_name] = axis_size
            else:
                named_shape[key] = size
        return ArraySpec(shape=tuple(shape), named_shape=named_shape, dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(substitute, structure, is_leaf=_is_spec)


def as_array_structure(tree: Any) -> StructureAnnotation:
    """Replaces every array in a tree by the `ArraySpec` describing it.

    Args:
      tree: Any tree, e.g. a layer's input.

    Returns:
      The same tree with each array, array-like scalar, named array or NNX
      variable (described by the array it holds, with its axis names for
      pz_flax variables) replaced by its concrete `ArraySpec`, and every other
      leaf by `ANY`. Checking ``tree`` against the result always succeeds.
    """
    return jax.tree_util.tree_map(_abstract_leaf, tree, is_leaf=_is_array_leaf)
