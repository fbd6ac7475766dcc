"""Mutable, labelled pockets of state inside immutable pytree models.

A pz_flax model is an immutable tree of structs, yet training changes its parameters and some
layers keep state (a cache, a step counter, a random-stream offset). Variables reconcile the
two: a variable is a small *mutable* object that sits in the tree, and every variable has a
*label* that identifies it uniquely within that tree. Around them this module provides the
vocabulary for moving state across JAX transformations:

* **unbind**: pull the variables out of a tree, leaving a hashable *slot* in their place;
* **freeze**: take an immutable snapshot (a ``...Value`` struct, itself a plain pytree);
* **unfreeze**: turn a snapshot back into a fresh mutable variable;
* **bind**: put variables (mutable or frozen) back into the slots of a tree.

``variable_jit`` packages these steps so that a function that mutates variables can be
jit-compiled and still mutate them, as seen from the caller.

**Variables are Flax NNX variables.** ``Parameter`` subclasses ``flax.nnx.Param`` and
``StateVariable`` subclasses ``flax.nnx.Variable``. A pz_flax model is therefore also a valid
NNX object graph: ``nnx.state``, ``nnx.split``/``nnx.merge``, ``nnx.Optimizer``, ``nnx.jit``
and Orbax checkpointing work on it directly. To keep NNX and Optax happy, the raw NNX value of a
variable is *positional*: when the user stores a ``NamedArray``, the variable keeps its
``data_array`` as the raw value and records the axis names as NNX metadata (``axis_names``);
``variable.value`` rebuilds the ``NamedArray`` view on access. NNX's own accessors
(``get_value()``, ``variable[...]``, ``get_raw_value()``) keep returning the raw array. The
label and the user's metadata entries are NNX metadata entries too, so they survive
``nnx.split``/``nnx.merge`` and Orbax round trips.

Two consequences differ from penzai, where variables are opaque leaves:

* NNX registers every variable class as a JAX pytree node (child: the raw value; auxiliary
  data: the metadata), so ``jax.tree_util`` sees *through* variables to their arrays, and
  ``jax.jit`` accepts them as arguments. Mutating such an argument inside a plain ``jax.jit``
  only changes a traced copy; use ``variable_jit`` to get mutation semantics.
* NNX forbids mutating a variable from a different JAX trace level than the one that created
  it (a ``flax.errors.TraceContextError``), where penzai silently leaked tracers.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import copy
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any
from typing import Generic
from typing import Literal
from typing import TypeAlias
from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import MISSING

from pz_flax._compat import nnx as nnx_compat
from pz_flax.core import auto_order_types
from pz_flax.core import named_axes
from pz_flax.core import struct
from pz_flax.core import tree_util

T = TypeVar("T")

VariableLabel: TypeAlias = Hashable

# NNX metadata entries that carry structure rather than user metadata: ``label`` and
# ``axis_names`` are ours, the rest are the entries NNX itself writes on every variable.
_LABEL_KEY = "label"
_AXIS_NAMES_KEY = "axis_names"


@functools.cache
def _reserved_metadata_keys() -> frozenset[str]:
    return frozenset({_LABEL_KEY, _AXIS_NAMES_KEY}) | nnx_compat.nnx_metadata_keys().required


# The keyword argument ``variable_jit`` uses to smuggle frozen variables into the jitted
# function. Kept identical to penzai's so that code passing ``donate_argnames`` keeps working.
_VARIABLES_ARGNAME = "__penzai_variables"


class VariableConflictError(Exception):
    """Two distinct variables (or a variable and a slot) claim the same label in one tree."""


class UnboundVariableError(Exception):
    """The value of a variable slot was requested; bind a variable into the slot first."""


class AbstractVariable(abc.ABC):
    """Interface of every mutable variable that the unbind/bind/freeze machinery handles.

    A variable is a mutable object identified, within a tree, by its slot (see ``get_slot``).
    ``Parameter`` and ``StateVariable`` are the two concrete kinds; both are also Flax NNX
    variables. Custom variable kinds may implement this interface directly.
    """

    # Empty slots keep this mixin layout-compatible with ``nnx.Variable``'s ``__slots__``.
    __slots__ = ()

    @abc.abstractmethod
    def freeze(self) -> AbstractVariableValue:
        """Returns an immutable snapshot of this variable (a pytree)."""

    @abc.abstractmethod
    def get_slot(self) -> AbstractVariableSlot:
        """Returns the placeholder that stands for this variable in an unbound tree.

        The slot identifies this variable uniquely within a tree; two different variables with
        equal slots in one tree are a conflict.
        """

    @abc.abstractmethod
    def update(self, new_frozen_value: AbstractVariableValue):
        """Overwrites this variable's value with the value of a matching frozen snapshot.

        Args:
            new_frozen_value: A snapshot whose slot equals this variable's slot.
        """

    @typing.final
    def __get_state_as_jax_pytree__(self) -> AbstractVariableValue:
        """JAX-ecosystem mutable-state protocol: the variable's state as a pytree."""
        return self.freeze()

    @typing.final
    def __set_state_from_jax_pytree__(self, value: AbstractVariableValue):
        """JAX-ecosystem mutable-state protocol: overwrite the state from a pytree."""
        return self.update(value)


class AbstractVariableValue(struct.Struct, abc.ABC):
    """Interface of an immutable snapshot of a variable.

    Snapshots are ordinary pytree structs, so they pass through any JAX transformation.
    """

    @abc.abstractmethod
    def unfreeze_as_copy(self) -> AbstractVariable:
        """Returns a new mutable variable holding this snapshot's value."""

    @abc.abstractmethod
    def get_slot(self) -> AbstractVariableSlot:
        """Returns the slot of the variable this snapshot came from.

        Freezing a variable, or unfreezing a snapshot, never changes the slot.
        """

    @typing.final
    def __jax_pytree_state_to_new_variable__(self):
        """JAX-ecosystem mutable-state protocol: build a new variable from this state."""
        return self.unfreeze_as_copy()


class AbstractVariableSlot(struct.Struct, abc.ABC):
    """Interface of a placeholder left in a tree where a variable was unbound.

    Slots are pytree structs without children (their label is static), hence hashable; they
    are the keys that ``bind_variables`` matches variables against.
    """


#### Unbinding, binding and freezing ####


@typing.overload
def unbind_variables(
    tree: Any,
    predicate: Callable[[AbstractVariable], bool] | None = None,
    freeze: Literal[False] = False,
) -> tuple[Any, tuple[AbstractVariable, ...]]: ...


@typing.overload
def unbind_variables(
    tree: Any,
    predicate: Callable[[AbstractVariable], bool] | None = None,
    *,
    freeze: Literal[True],
) -> tuple[Any, tuple[AbstractVariableValue, ...]]: ...


def unbind_variables(
    tree: Any,
    predicate: Callable[[AbstractVariable], bool] | None = None,
    freeze: bool = False,
) -> tuple[Any, tuple[AbstractVariable | AbstractVariableValue, ...]]:
    """Pulls variables out of a tree, leaving their slots in their place.

    This is the first step of carrying state across a JAX transformation: the slotted tree is
    an ordinary pytree, and the extracted variables can be frozen, passed in separately, and
    bound back with ``bind_variables``.

    Args:
        tree: Any pytree. The same variable object may occur several times; it is extracted
            once.
        predicate: Selects which variables to extract; all variables if None.
        freeze: Return frozen snapshots instead of the mutable variables.

    Returns:
        ``(tree_with_slots, variables)``: a copy of ``tree`` with each extracted variable
        replaced by its slot, and the distinct extracted variables (or their snapshots) in the
        order they were first met.

    Raises:
        VariableConflictError: If two distinct variable objects have the same slot, or an
            extracted variable's slot already occurs in the tree.
    """
    leaves_with_paths, treedef = tree_util.flatten_with_path_stopping_at_variables(tree)
    existing_slots = {
        leaf for _, leaf in leaves_with_paths if isinstance(leaf, AbstractVariableSlot)
    }

    variables_by_slot: dict[AbstractVariableSlot, AbstractVariable] = {}
    first_paths: dict[AbstractVariableSlot, Any] = {}
    new_leaves = []
    for path, leaf in leaves_with_paths:
        if not isinstance(leaf, AbstractVariable) or (
            predicate is not None and not predicate(leaf)
        ):
            new_leaves.append(leaf)
            continue
        slot = leaf.get_slot()
        if slot in existing_slots:
            raise VariableConflictError(
                f"The variable at tree{jax.tree_util.keystr(path)} has slot {slot!r}, which is"
                " already present as an unbound slot elsewhere in the tree."
            )
        known = variables_by_slot.get(slot)
        if known is None:
            variables_by_slot[slot] = leaf
            first_paths[slot] = path
        elif known is not leaf:
            raise VariableConflictError(
                f"Two different variables share the slot {slot!r}: at"
                f" tree{jax.tree_util.keystr(first_paths[slot])} and at"
                f" tree{jax.tree_util.keystr(path)}. Give each variable a unique label."
            )
        new_leaves.append(slot)

    extracted = tuple(variables_by_slot.values())
    if freeze:
        extracted = tuple(variable.freeze() for variable in extracted)
    return treedef.unflatten(new_leaves), extracted


def bind_variables(
    tree: Any,
    variables: Iterable[AbstractVariable | AbstractVariableValue],
    allow_unused: bool = False,
    unfreeze_as_copy: bool = False,
) -> Any:
    """Puts variables (mutable or frozen) into the matching slots of a tree.

    The inverse of ``unbind_variables``.

    Args:
        tree: A pytree containing variable slots.
        variables: The variables or snapshots to insert, each matched to slots by its slot.
        allow_unused: Silently skip variables with no matching slot instead of raising.
        unfreeze_as_copy: Turn every snapshot into a fresh mutable variable before inserting
            it; then every element of ``variables`` must be a snapshot.

    Returns:
        A copy of ``tree`` with the slots replaced by the variables.

    Raises:
        ValueError: If two variables have the same slot, if ``unfreeze_as_copy`` is set and a
            mutable variable is given, or (unless ``allow_unused``) if a variable matches no
            slot.
    """
    leaves, treedef = tree_util.flatten_stopping_at_variables(tree)

    by_slot: dict[AbstractVariableSlot, AbstractVariable | AbstractVariableValue] = {}
    for variable in variables:
        if unfreeze_as_copy:
            if not isinstance(variable, AbstractVariableValue):
                raise ValueError(
                    "bind_variables(..., unfreeze_as_copy=True) needs frozen variable values"
                    f" (ParameterValue, StateVariableValue, ...), but got {type(variable).__name__}"
                    f" with slot {variable.get_slot()!r}."
                )
            variable = variable.unfreeze_as_copy()
        slot = variable.get_slot()
        if slot in by_slot:
            raise ValueError(f"Several variables were given for the same slot {slot!r}.")
        by_slot[slot] = variable

    used = set()
    new_leaves = []
    for leaf in leaves:
        if isinstance(leaf, AbstractVariableSlot) and leaf in by_slot:
            new_leaves.append(by_slot[leaf])
            used.add(leaf)
        else:
            new_leaves.append(leaf)

    if not allow_unused and len(used) != len(by_slot):
        unused = [slot for slot in by_slot if slot not in used]
        raise ValueError(
            f"No slot in the tree matches these variables: {unused}. Pass allow_unused=True to"
            " ignore them."
        )
    return treedef.unflatten(new_leaves)


def freeze_variables(
    tree: Any,
    predicate: Callable[[AbstractVariable], bool] | None = None,
) -> Any:
    """Replaces variables in a tree by immutable snapshots of themselves.

    Once every variable is frozen the tree is an ordinary pytree that JAX transformations can
    take and return without losing anything.

    Args:
        tree: Any pytree.
        predicate: Selects which variables to freeze; all variables if None.

    Returns:
        A copy of ``tree`` with the selected variables replaced by their ``freeze()`` values.
    """

    def freeze_if_selected(node):
        if isinstance(node, AbstractVariable) and (predicate is None or predicate(node)):
            return node.freeze()
        return node

    return tree_util.map_stopping_at_variables(freeze_if_selected, tree)


def variable_jit(fun, *, donate_variables: bool = False, **jit_kwargs):
    """Like ``jax.jit``, but variables in the arguments keep their mutation semantics.

    Every variable found in the arguments is unbound and passed to the compiled function as a
    frozen snapshot; inside, fresh mutable copies are bound in their place, so ``fun`` can read
    and assign ``variable.value`` as usual. On return, the final values are written back into
    the caller's variables.

    Limitations: variables must be passed as arguments (closed-over variables cannot be
    updated from inside the trace, and NNX raises if ``fun`` tries); they are never static
    arguments; their sharding is left unspecified; ``fun`` must not return variables (return
    ``unbind_variables(..., freeze=True)`` instead and rebuild them with
    ``bind_variables(..., unfreeze_as_copy=True)``); and the keyword argument
    ``__penzai_variables`` is reserved.

    Args:
        fun: The function to compile.
        donate_variables: Donate the variables' buffers to the computation, so that XLA can
            update them in place. The arrays a variable held before the call are invalid after
            it; the variable itself holds the new ones.
        **jit_kwargs: Passed to ``jax.jit``. Donated keyword arguments must be named with
            ``donate_argnames`` (``donate_argnums`` cannot address the extra keyword argument).

    Returns:
        The compiled function, with the same signature as ``fun``.
    """
    signature = inspect.signature(fun)
    takes_var_keyword = any(
        parameter.kind == inspect.Parameter.VAR_KEYWORD
        for parameter in signature.parameters.values()
    )
    if not takes_var_keyword:
        # jax.jit resolves static/donated argument names through the signature, so the hidden
        # keyword argument has to appear in it.
        signature = signature.replace(
            parameters=[
                *signature.parameters.values(),
                inspect.Parameter(_VARIABLES_ARGNAME, inspect.Parameter.KEYWORD_ONLY),
            ]
        )

    def traced_fun(*args, **kwargs):
        frozen_variables = kwargs.pop(_VARIABLES_ARGNAME)
        inner_variables = [value.unfreeze_as_copy() for value in frozen_variables]
        bound_args, bound_kwargs = bind_variables((args, kwargs), inner_variables)
        result = fun(*bound_args, **bound_kwargs)
        _, returned_variables = unbind_variables(result)
        if returned_variables:
            raise ValueError(
                "Returning a variable from a function compiled with variable_jit is not"
                " allowed. Return `unbind_variables(..., freeze=True)` instead and rebuild the"
                " variables afterwards with `bind_variables(..., unfreeze_as_copy=True)`."
                f"\nReturned variables: {list(returned_variables)}"
            )
        return result, [variable.freeze() for variable in inner_variables]

    traced_fun.__signature__ = signature

    if donate_variables:
        jit_kwargs["donate_argnames"] = (
            *_as_name_tuple(jit_kwargs.get("donate_argnames", ())),
            _VARIABLES_ARGNAME,
        )
    if "out_shardings" in jit_kwargs:
        jit_kwargs["out_shardings"] = (jit_kwargs["out_shardings"], None)

    compiled = jax.jit(traced_fun, **jit_kwargs)

    @functools.wraps(fun)
    def wrapper(*args, **kwargs):
        (slotted_args, slotted_kwargs), outer_variables = unbind_variables((args, kwargs))
        result, new_values = compiled(
            *slotted_args,
            **slotted_kwargs,
            **{_VARIABLES_ARGNAME: [variable.freeze() for variable in outer_variables]},
        )
        for variable, new_value in zip(outer_variables, new_values, strict=True):
            variable.update(new_value)
        return result

    wrapper.__doc__ = f"Variable-aware jit-compiled version of {fun.__name__}:\n{fun.__doc__}"
    return wrapper


def _as_name_tuple(names: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        return (names,)
    return tuple(names)


#### Labelled variables, stored as NNX variables ####


# ``AbstractVariable`` is an ABC, so labelled variables need a metaclass deriving from both.
_VariableMeta = nnx_compat.variable_metaclass_with(abc.ABCMeta)


def _split_value(value: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """Splits a user value into the raw NNX value and the axis names (None if unnamed)."""
    if isinstance(value, named_axes.NamedArrayBase):
        # The canonical layout (positional axes first, then the named ones in order) makes the
        # raw value a plain array whose trailing axes are the named ones.
        canonical = value.with_positional_prefix()
        return _as_jax_array(canonical.data_array), tuple(canonical.named_axes)
    return jax.tree_util.tree_map(_as_jax_array, value), None


def _as_jax_array(leaf: Any) -> jax.Array:
    # ``jnp.asarray`` costs tens of microseconds even on what already is a JAX array, and every
    # variable of a converted model passes through here.
    return leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)


@dataclasses.dataclass(frozen=True, init=False, eq=False, repr=False)
class MetadataDict(Mapping):
    """A read-only, hashable dict, used for dict-valued variable metadata entries.

    NNX hashes variable metadata (it becomes part of graph definitions), so a metadata entry
    cannot be a plain dict; yet penzai code stores dicts there, e.g. LayerStack's
    ``{"layerstack_axes": {axis: LayerStackVarBehavior.SHARED}}``. Variables therefore store
    every dict-valued entry (at any depth) as a ``MetadataDict``, which reads like the dict and
    compares equal to it. It is a dataclass so that checkpoint manifests can describe it.

    Attributes:
        entries: The ``(key, value)`` pairs, in insertion order.
    """

    entries: tuple[tuple[Hashable, Any], ...]

    def __init__(self, mapping: Mapping[Hashable, Any]):
        """Freezes ``mapping``, turning the dicts among its values into ``MetadataDict``s too.

        Args:
            mapping: The dict to freeze.
        """
        frozen = tuple((key, _frozen_metadata_entry(entry)) for key, entry in mapping.items())
        object.__setattr__(self, "entries", frozen)

    def __getitem__(self, key: Hashable) -> Any:
        for entry_key, entry in self.entries:
            if entry_key == key:
                return entry
        raise KeyError(key)

    def __iter__(self) -> Iterator[Hashable]:
        return (key for key, _ in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return dict(self.entries) == dict(other)

    def __hash__(self) -> int:
        return hash(frozenset(self.entries))

    def __repr__(self) -> str:
        return repr(dict(self.entries))

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any):
        from treescope import repr_lib  # Only needed when rendering.

        return repr_lib.render_dictionary_wrapper(
            object_type=type(self),
            wrapped_dict=dict(self.entries),
            path=path,
            subtree_renderer=subtree_renderer,
        )


def _frozen_metadata_entry(entry: Any) -> Any:
    """Returns ``entry`` with its dicts (possibly nested in tuples) made hashable."""
    if isinstance(entry, Mapping) and not isinstance(entry, MetadataDict):
        return MetadataDict(entry)
    if type(entry) is tuple:
        return tuple(_frozen_metadata_entry(item) for item in entry)
    return entry


def _checked_user_metadata(owner: str, metadata: dict[Any, Any] | None) -> dict[str, Any]:
    """Validates user metadata: it becomes NNX metadata, so it must be str-keyed and hashable.

    Dict-valued entries are frozen into ``MetadataDict``s; other unhashable entries are errors.
    """
    if not metadata:
        return {}
    checked = {}
    for key, entry in metadata.items():
        if not isinstance(key, str):
            raise TypeError(
                f"{owner} metadata keys must be strings (they become NNX variable metadata), got"
                f" the key {key!r} of type {type(key).__name__}."
            )
        if key in _reserved_metadata_keys():
            raise ValueError(
                f"{owner} metadata key {key!r} is reserved; the reserved keys are"
                f" {sorted(_reserved_metadata_keys())}."
            )
        frozen = _frozen_metadata_entry(entry)
        try:
            hash(frozen)
        except TypeError as exc:
            raise TypeError(
                f"{owner} metadata entry {key!r} must be hashable once its dicts are frozen (NNX"
                f" hashes variable metadata), got {entry!r}; use tuples rather than lists."
            ) from exc
        checked[key] = frozen
    return checked


def _check_hashable(owner: str, what: str, value: Any):
    # nnx.jit and nnx.split put variable metadata into hashed graph definitions; catching an
    # unhashable entry here gives a clear error instead of one deep inside a transformation.
    try:
        hash(value)
    except TypeError as exc:
        raise TypeError(
            f"{owner} {what} must be hashable (NNX hashes variable metadata), got {value!r} of"
            f" type {type(value).__name__}."
        ) from exc


# mypy cannot follow _VariableMeta, a metaclass built at import time, hence the ignore.
class LabeledVariable(nnx.Variable[T], AbstractVariable, metaclass=_VariableMeta):  # type: ignore[metaclass]
    """A mutable variable with a label, a value and a metadata dictionary, stored NNX-style.

    This is the shared implementation of ``Parameter`` and ``StateVariable``. The NNX raw value
    is positional: a ``NamedArray`` value is stored as its ``data_array`` plus an
    ``axis_names`` metadata entry, and ``value`` rebuilds the ``NamedArray`` on access. Any
    other pytree is stored as is (with its leaves converted to JAX arrays). NNX's accessors
    (``get_value``, ``variable[...]``, arithmetic on the variable object itself) operate on the
    raw value; ``value`` is the named view.

    A variable should only be assigned in the JAX trace that created it; NNX enforces this.
    Variables compare and hash by identity (a variable is a mutable object, not a value).

    Attributes:
        label: The label identifying this variable within a tree.
        value: The value, with named axes restored if a ``NamedArray`` was stored.
        metadata: The user's metadata entries, as a new dict on each access (assign a new dict
            to change them).
    """

    def __init__(self, *, label: VariableLabel, value: T, metadata: dict[Any, Any] | None = None):
        """Creates a variable.

        Args:
            label: The label identifying this variable; must be hashable.
            value: The initial value: a ``NamedArray``/``NamedArrayView`` or any pytree of
                array-likes.
            metadata: User metadata; string keys and hashable values, because each entry is
                stored as an NNX metadata entry.
        """
        owner = type(self).__name__
        _check_hashable(owner, "label", label)
        nnx_metadata = _checked_user_metadata(owner, metadata)
        raw, axis_names = _split_value(value)
        nnx_metadata[_LABEL_KEY] = label
        if axis_names is not None:
            nnx_metadata[_AXIS_NAMES_KEY] = axis_names
        # Hijax variables and array refs would change what the raw value is; pz_flax relies on
        # it being a plain pytree of arrays.
        super().__init__(raw, **nnx_compat.PLAIN_VARIABLE_OPTIONS, **nnx_metadata)

    # Identity semantics (penzai's), instead of NNX's elementwise comparison of raw values.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __deepcopy__(self, memo: dict[int, Any]) -> LabeledVariable[T]:
        # Without this, ``copy.deepcopy`` finds the raw array's ``__deepcopy__`` through NNX's
        # attribute forwarding and returns a bare array instead of a variable.
        duplicate = self.from_metadata(
            copy.deepcopy(self.get_raw_value(), memo), copy.deepcopy(self.get_metadata(), memo)
        )
        memo[id(self)] = duplicate
        return duplicate

    @property
    def label(self) -> VariableLabel:
        return self.get_metadata()[_LABEL_KEY]

    @label.setter
    def label(self, new_label: VariableLabel):
        _check_hashable(type(self).__name__, "label", new_label)
        self.set_metadata(**{_LABEL_KEY: new_label})

    @property
    def metadata(self) -> dict[str, Any]:
        reserved = _reserved_metadata_keys()
        return {key: entry for key, entry in self.get_metadata().items() if key not in reserved}

    @metadata.setter
    def metadata(self, new_metadata: dict[Any, Any]):
        checked = _checked_user_metadata(type(self).__name__, new_metadata)
        reserved = _reserved_metadata_keys()
        structural = {key: entry for key, entry in self.get_metadata().items() if key in reserved}
        # The whole-dict form of ``set_metadata`` lets NNX rename its own deprecated keys.
        self.set_metadata({**checked, **structural})

    @property
    def value(self) -> T:
        raw = self.get_raw_value()
        axis_names = self.get_metadata().get(_AXIS_NAMES_KEY)
        # A tree-mapped model can hold placeholders in place of arrays (selection holes,
        # shardings, None); they have no axes to name, so they are shown as they are.
        if axis_names is None or not hasattr(raw, "shape"):
            return raw
        num_positional = len(raw.shape) - len(axis_names)
        if num_positional < 0:
            raise ValueError(
                f"{type(self).__name__} {self.label!r} records the axis names {axis_names}, but"
                f" its raw value has only the shape {tuple(raw.shape)}."
            )
        return named_axes.NamedArray(
            named_axes=collections.OrderedDict(zip(axis_names, raw.shape[num_positional:])),
            data_array=raw,
        )

    @value.setter
    def value(self, new_value: T):
        raw, axis_names = _split_value(new_value)
        metadata = self.get_metadata()
        # NNX checks the trace on each of these writes; the first one to refuse leaves the
        # variable unchanged.
        if axis_names is None and _AXIS_NAMES_KEY in metadata:
            self.set_metadata(
                {key: entry for key, entry in metadata.items() if key != _AXIS_NAMES_KEY}
            )
        elif axis_names is not None and metadata.get(_AXIS_NAMES_KEY) != axis_names:
            self.set_metadata(**{_AXIS_NAMES_KEY: axis_names})
        self.set_raw_value(raw)

    def set_value(self, value: Any, *, index: Any = MISSING):
        """NNX's raw-value setter, which also accepts a ``NamedArray`` (stored like ``value``).

        Args:
            value: A raw value (axis names are kept) or a ``NamedArray`` (axis names replaced).
            index: As in ``nnx.Variable.set_value``; not allowed with a ``NamedArray``.
        """
        if isinstance(value, named_axes.NamedArrayBase):
            if index is not MISSING:
                raise TypeError(
                    f"Cannot assign a NamedArray to an index of {type(self).__name__}"
                    f" {self.label!r}; assign the whole value or index the raw array."
                )
            self.value = value
            return
        super().set_value(value, index=index)

    def copy(self, value: Any = MISSING, **updates: Any) -> LabeledVariable[T]:
        """NNX's copy (also ``replace``), which also accepts a ``NamedArray`` value.

        A ``NamedArray`` (passed positionally or as ``value=``) is stored like ``value`` stores
        it: its data array as the raw value and its names as the ``axis_names`` entry, so the
        copy reads back the same named array.

        Args:
            value: The new value; a raw value keeps the axis names, a ``NamedArray`` sets them.
            **updates: Metadata entries to change, as in ``nnx.Variable.copy``.

        Returns:
            A new variable of the same class.
        """
        if value is MISSING and "value" in updates:
            value = updates.pop("value")
        if isinstance(value, named_axes.NamedArrayBase):
            value, updates[_AXIS_NAMES_KEY] = _split_value(value)
        return super().copy(value, **updates)

    replace = copy

    def update(self, new_frozen_value: LabeledVariableValue):
        """Copies the value of a frozen snapshot of this same variable into it.

        Args:
            new_frozen_value: A snapshot with the same slot (kind and label).

        Raises:
            ValueError: If the snapshot belongs to a different slot.
        """
        if self.get_slot() != new_frozen_value.get_slot():
            raise ValueError(
                f"Cannot update {type(self).__name__} {self.label!r} from a snapshot of a"
                f" different slot, {new_frozen_value.get_slot()!r}."
            )
        self.value = new_frozen_value.value

    @abc.abstractmethod
    def treescope_color(self) -> str | tuple[str, str]:
        """Returns the colour treescope uses for this kind of variable."""

    def __repr__(self):
        import treescope

        with treescope.using_expansion_strategy(max_height=1):
            return treescope.render_to_text(self, ignore_exceptions=True)

    # NNX's Representable gives str() its own format; penzai's str() is the treescope text.
    __str__ = __repr__

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any):
        from pz_flax.core._treescope_handlers import variable_handlers

        return variable_handlers.render_labeled_variable(self, path, subtree_renderer)


@struct.pytree_dataclass
class LabeledVariableValue(AbstractVariableValue, Generic[T]):
    """An immutable snapshot of a labelled variable, as a pytree struct.

    Attributes:
        label: The label of the variable the snapshot was taken from (static).
        value: The snapshotted value (a pytree, e.g. a ``NamedArray``).
        metadata: The variable's user metadata (static).
    """

    label: VariableLabel = dataclasses.field(metadata={"pytree_node": False})
    value: T
    metadata: dict[Any, Any] = dataclasses.field(
        default_factory=dict, metadata={"pytree_node": False}
    )

    def _unfrozen_as(self, variable_type: type[Any]) -> Any:
        # The snapshot's value was placed (sharded, where NNX shards eagerly) when its variable
        # was first made. Constructing the copy with a sharding annotation would place it again,
        # which inside a trace without a mesh is an error (a sharded model under variable_jit);
        # NNX's set_metadata attaches the annotation without placing anything.
        metadata = _checked_user_metadata(variable_type.__name__, self.metadata)
        copy_ = variable_type(label=self.label, value=self.value)
        if metadata:
            copy_.set_metadata(**metadata)
        return copy_


#### Parameters ####


class Parameter(LabeledVariable[T], nnx.Param):  # type: ignore[metaclass]
    """A model parameter: updated by optimizers, read (not written) by the model.

    A subclass of ``flax.nnx.Param``, so NNX filters (``nnx.state(model, nnx.Param)``,
    ``nnx.Optimizer(..., wrt=nnx.Param)``) select pz_flax parameters.

    Attributes:
        label: The label identifying this parameter within a model.
        value: The parameter value, usually a ``NamedArray``.
        metadata: The user's metadata entries (e.g. ``{"trainable": False}``).
    """

    def freeze(self) -> ParameterValue[T]:
        return ParameterValue(label=self.label, value=self.value, metadata=self.metadata)

    def get_slot(self) -> ParameterSlot:
        return ParameterSlot(label=self.label)

    def treescope_color(self) -> str:
        return "#93cce1"


@struct.pytree_dataclass(has_implicitly_inherited_fields=True)
class ParameterValue(LabeledVariableValue[T]):
    """An immutable snapshot of a ``Parameter``, as a pytree struct.

    Attributes:
        label: The parameter's label (static).
        value: The snapshotted value.
        metadata: The parameter's user metadata (static).
    """

    def unfreeze_as_copy(self) -> Parameter[T]:
        return self._unfrozen_as(Parameter)

    def get_slot(self) -> ParameterSlot:
        return ParameterSlot(label=self.label)

    def treescope_color(self) -> str:
        return "#a0b0c9"


@struct.pytree_dataclass
class ParameterSlot(AbstractVariableSlot):
    """Where an unbound ``Parameter`` goes back; identified by the parameter's label.

    Attributes:
        label: The label of the parameter this slot stands for.
    """

    label: VariableLabel = dataclasses.field(metadata={"pytree_node": False})

    @property
    def value(self) -> Any:
        """Always raises: a slot holds no value until a parameter is bound into it."""
        raise UnboundVariableError(
            f"Tried to read .value of {self!r}; bind the parameter first (bind_variables)."
        )

    def treescope_color(self) -> tuple[str, str]:
        return "#93cce1", "#cdcdcd"


#### State variables ####


@dataclasses.dataclass(frozen=True)
class AutoStateVarLabel(auto_order_types.AutoOrderedAcrossTypes):
    """Default label of a ``StateVariable``: unique because it is the variable's Python id.

    Attributes:
        var_id: ``id()`` of the variable when it was created.
    """

    var_id: int


@dataclasses.dataclass(frozen=True)
class ScopedStateVarLabel(auto_order_types.AutoOrderedAcrossTypes):
    """Default label of a ``StateVariable`` made inside ``scoped_auto_state_var_labels``.

    Unlike ``AutoStateVarLabel`` it is reproducible: building the same model twice in a scope
    gives the same labels, hence the same pytree structure and no jit recompilation.

    Attributes:
        group: The scope's group tag.
        index: The variable's creation index within the scope.
    """

    group: Any
    index: int


@dataclasses.dataclass
class _LabelScope:
    group: Hashable
    next_index: int = 0


# The innermost active ``scoped_auto_state_var_labels`` scope, or None.
_active_label_scope: _LabelScope | None = None


def _next_auto_state_var_label(variable_id: int) -> VariableLabel:
    scope = _active_label_scope
    if scope is None:
        return AutoStateVarLabel(var_id=variable_id)
    label = ScopedStateVarLabel(group=scope.group, index=scope.next_index)
    scope.next_index += 1
    return label


@contextlib.contextmanager
def scoped_auto_state_var_labels(group: Hashable = None):
    """Numbers unlabelled ``StateVariable``\\ s created inside the block: 0, 1, 2, ...

    Automatic labels are normally ``AutoStateVarLabel(id(variable))``, which differ from run to
    run; labels are part of a slotted tree's structure, so differing labels force jit to
    recompile. Within this context, unlabelled state variables get
    ``ScopedStateVarLabel(group, index)`` instead. Scopes nest; the outer count resumes when an
    inner scope exits.

    Args:
        group: A tag stored in the labels, to tell apart variables from different scopes.

    Yields:
        Nothing; the scope is active inside the ``with`` block.
    """
    global _active_label_scope
    enclosing = _active_label_scope
    _active_label_scope = _LabelScope(group=group)
    try:
        yield
    finally:
        _active_label_scope = enclosing


class StateVariable(LabeledVariable[T]):
    """A mutable state variable: written by the model as it runs (caches, counters, ...).

    A subclass of ``flax.nnx.Variable`` (not of ``nnx.Param``), so NNX optimizers with
    ``wrt=nnx.Param`` leave it alone while ``nnx.state`` and checkpoints include it.

    Attributes:
        label: The label identifying this variable within a model.
        value: The current value.
        metadata: The user's metadata entries.
    """

    def __init__(
        self,
        value: T,
        *,
        label: VariableLabel | None = None,
        metadata: dict[Any, Any] | None = None,
    ):
        """Creates a state variable.

        Args:
            value: The initial value.
            label: A label unique within the model; generated automatically if None (see
                ``scoped_auto_state_var_labels``).
            metadata: User metadata; string keys and hashable values.
        """
        if label is None:
            label = _next_auto_state_var_label(id(self))
        super().__init__(label=label, value=value, metadata=metadata)

    def freeze(self) -> StateVariableValue[T]:
        return StateVariableValue(label=self.label, value=self.value, metadata=self.metadata)

    def get_slot(self) -> StateVariableSlot:
        return StateVariableSlot(label=self.label)

    def treescope_color(self) -> str:
        return "#f57603"


@struct.pytree_dataclass(has_implicitly_inherited_fields=True)
class StateVariableValue(LabeledVariableValue[T]):
    """An immutable snapshot of a ``StateVariable``, as a pytree struct.

    Attributes:
        label: The variable's label (static).
        value: The snapshotted value.
        metadata: The variable's user metadata (static).
    """

    def unfreeze_as_copy(self) -> StateVariable[T]:
        return self._unfrozen_as(StateVariable)

    def get_slot(self) -> StateVariableSlot:
        return StateVariableSlot(label=self.label)

    def treescope_color(self) -> str:
        return "#d4af27"


@struct.pytree_dataclass
class StateVariableSlot(AbstractVariableSlot):
    """Where an unbound ``StateVariable`` goes back; identified by the variable's label.

    Attributes:
        label: The label of the state variable this slot stands for.
    """

    label: VariableLabel = dataclasses.field(metadata={"pytree_node": False})

    @property
    def value(self) -> Any:
        """Always raises: a slot holds no value until a variable is bound into it."""
        raise UnboundVariableError(
            f"Tried to read .value of {self!r}; bind the state variable first (bind_variables)."
        )

    def treescope_color(self) -> tuple[str, str]:
        return "#f57603", "#cdcdcd"


#### Kind-specific shorthands ####


def _restricted_to(
    variable_type: type[Any], predicate: Callable[[Any], bool] | None
) -> Callable[[AbstractVariable], bool]:
    if predicate is None:
        return lambda variable: isinstance(variable, variable_type)
    return lambda variable: isinstance(variable, variable_type) and predicate(variable)


@typing.overload
def unbind_params(
    tree: Any,
    predicate: Callable[[Parameter], bool] | None = None,
    freeze: Literal[False] = False,
) -> tuple[Any, tuple[Parameter, ...]]: ...


@typing.overload
def unbind_params(
    tree: Any,
    predicate: Callable[[Parameter], bool] | None = None,
    *,
    freeze: Literal[True],
) -> tuple[Any, tuple[ParameterValue, ...]]: ...


def unbind_params(
    tree: Any,
    predicate: Callable[[Parameter], bool] | None = None,
    freeze: bool = False,
) -> tuple[Any, tuple[Parameter | ParameterValue, ...]]:
    """``unbind_variables`` restricted to ``Parameter``\\ s (see there for details).

    Args:
        tree: Any pytree.
        predicate: Further selects which parameters to extract.
        freeze: Return frozen snapshots instead of the parameters.

    Returns:
        ``(tree_with_slots, parameters)``.
    """
    return unbind_variables(tree, _restricted_to(Parameter, predicate), freeze=freeze)


def freeze_params(tree: Any, predicate: Callable[[Parameter], bool] | None = None) -> Any:
    """``freeze_variables`` restricted to ``Parameter``\\ s.

    Args:
        tree: Any pytree.
        predicate: Further selects which parameters to freeze.

    Returns:
        A copy of ``tree`` with the selected parameters replaced by ``ParameterValue``\\ s.
    """
    return freeze_variables(tree, _restricted_to(Parameter, predicate))


@typing.overload
def unbind_state_vars(
    tree: Any,
    predicate: Callable[[StateVariable], bool] | None = None,
    freeze: Literal[False] = False,
) -> tuple[Any, tuple[StateVariable, ...]]: ...


@typing.overload
def unbind_state_vars(
    tree: Any,
    predicate: Callable[[StateVariable], bool] | None = None,
    *,
    freeze: Literal[True],
) -> tuple[Any, tuple[StateVariableValue, ...]]: ...


def unbind_state_vars(
    tree: Any,
    predicate: Callable[[StateVariable], bool] | None = None,
    freeze: bool = False,
) -> tuple[Any, tuple[StateVariable | StateVariableValue, ...]]:
    """``unbind_variables`` restricted to ``StateVariable``\\ s (see there for details).

    Args:
        tree: Any pytree.
        predicate: Further selects which state variables to extract.
        freeze: Return frozen snapshots instead of the variables.

    Returns:
        ``(tree_with_slots, state_variables)``.
    """
    return unbind_variables(tree, _restricted_to(StateVariable, predicate), freeze=freeze)


def freeze_state_vars(tree: Any, predicate: Callable[[StateVariable], bool] | None = None) -> Any:
    """``freeze_variables`` restricted to ``StateVariable``\\ s.

    Args:
        tree: Any pytree.
        predicate: Further selects which state variables to freeze.

    Returns:
        A copy of ``tree`` with the selected variables replaced by ``StateVariableValue``\\ s.
    """
    return freeze_variables(tree, _restricted_to(StateVariable, predicate))
