"""Static values (layer configuration, variable metadata) as JSON, one table of kinds.

JSON's own types (``null``, booleans, ints, strings, finite floats) stand for themselves; every
other value is a one-key object whose key is its kind's tag (``{"tuple": [...]}``,
``{"dtype": "bfloat16"}``, ``{"function": "jax.nn:relu"}``; a few kinds add a second key, such
as ``{"enum": name, "member": "RED"}``). Each kind is one row of ``_KINDS``: which Python
values it takes, how it encodes them, and how it decodes and validates its JSON. Decoding
checks every payload's layout before using it, so a malformed value is a
``CorruptCheckpointError`` naming where it is, never a raw ``TypeError``; classes and
functions resolve through ``type_registry`` and ``functions`` only.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import math
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pz_flax._compat import nnx as nnx_compat
from pz_flax.checkpoint import errors
from pz_flax.checkpoint import functions
from pz_flax.checkpoint import messages
from pz_flax.checkpoint import type_registry

# Deepest nesting of static values (and of model nodes) a manifest may use. Real models nest
# a few levels; the bound keeps hostile manifests from exhausting the interpreter's stack.
MAX_DEPTH = 100
# Longest JSON integer a manifest may hold (Python refuses to parse integers over 4300 digits).
MAX_INT_DIGITS = 400
_NON_FINITE_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


class Corrupt(Exception):
    """A malformed piece of a manifest; turned into ``CorruptCheckpointError`` with context."""


def expect(condition: Any, problem: str) -> None:
    """Raises ``Corrupt(problem)`` unless ``condition`` holds."""
    if not condition:
        raise Corrupt(problem)


def expect_list(value: Any, what: str, length: int | None = None) -> list[Any]:
    """``value`` checked to be a JSON array (of ``length`` items, if given)."""
    if not isinstance(value, list):
        raise Corrupt(f"{what} must be a list, not {messages.bounded_repr(value)}")
    if length is not None:
        expect(len(value) == length, f"{what} must have {length} items, not {len(value)}")
    return value


def expect_pairs(value: Any, what: str) -> list[list[Any]]:
    """``value`` checked to be a JSON array of ``[key, value]`` pairs."""
    for pair in expect_list(value, what):
        expect_list(pair, f"each entry of {what}", 2)
    return value


def valid_dtype(name: Any) -> np.dtype:
    """The numeric (or boolean) dtype named ``name``.

    Raises:
        Corrupt: If ``name`` is not the name of such a dtype.
    """
    if not (isinstance(name, str) and len(name) <= 32):
        raise Corrupt(f"bad dtype {messages.bounded_repr(name)}")
    try:
        dtype = np.dtype(name)
    except TypeError:
        dtype = None
    expect(
        dtype is not None
        and dtype.name == name
        and (jax.dtypes.issubdtype(dtype, np.number) or dtype == np.bool_),
        f"{messages.bounded_repr(name)} is not a numeric dtype name",
    )
    return dtype


def is_primitive(value: Any) -> bool:
    """Whether ``value`` is a JSON scalar usable as a literal (finite float, int, str, ...)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (bool, int, str))


@dataclasses.dataclass
class DecodeContext:
    """Where decoding is, and what it may resolve.

    Attributes:
        allow_modules: Modules the caller trusts beyond the allow-lists.
        model_path: The model path of the value being decoded, for messages.
        json_path: The position in the manifest, for messages (``root/fields/fn``).
        depth: Nesting depth so far.
    """

    allow_modules: tuple[str, ...]
    model_path: str
    json_path: str
    depth: int = 0

    def at(self, *parts: Any) -> DecodeContext:
        """The context one level down, at ``parts`` of the manifest."""
        expect(self.depth < MAX_DEPTH, f"values are nested deeper than {MAX_DEPTH} levels")
        suffix = "/".join(str(part) for part in parts)
        return DecodeContext(
            self.allow_modules, self.model_path, f"{self.json_path}/{suffix}", self.depth + 1
        )

    def where(self) -> str:
        return f"{self.model_path} (manifest path {messages.bounded_text(self.json_path)})"

    def resolve(self, name: Any, kind: type_registry.Kind) -> Any:
        if kind == "function":
            return functions.resolve_function(
                name, allow_modules=self.allow_modules, path=self.where()
            )
        return type_registry.resolve(
            name, kind, allow_modules=self.allow_modules, path=self.where()
        )


@dataclasses.dataclass(frozen=True)
class _Kind:
    """One kind of static value.

    Attributes:
        tag: The JSON key naming the kind.
        takes: Whether a Python value is of this kind (checked in table order).
        encode: The JSON object for a value: ``encode(value, path)``.
        decode: The value for a JSON object: ``decode(data, context)``; validates ``data``.
        extra_key: The second key of the kind's JSON object, if it has one.
    """

    tag: str
    takes: Callable[[Any], bool]
    encode: Callable[[Any, str], dict[str, Any]]
    decode: Callable[[dict[str, Any], DecodeContext], Any]
    extra_key: str | None = None


def encode(value: Any, path: str) -> Any:
    """Encodes a static value as JSON.

    Args:
        value: The value.
        path: Where it was found, for error messages.

    Returns:
        A JSON-compatible value that ``decode`` turns back into an equal value.

    Raises:
        UnsupportedValueError: If the value has no encoding (a lambda, an arbitrary object).
    """
    if value is None or isinstance(value, (bool, str)) or type(value) is int:
        return value
    if type(value) is float and math.isfinite(value):
        return value
    for kind in _KINDS:
        if kind.takes(value):
            return kind.encode(value, path)
    raise errors.UnsupportedValueError(
        f"{path}: cannot describe the static value {messages.bounded_repr(value)} of type"
        f" {type(value).__module__}.{type(value).__qualname__} in a checkpoint manifest."
    )


def decode(data: Any, context: DecodeContext) -> Any:
    """Turns JSON written by ``encode`` back into the value, validating it on the way.

    Raises:
        Corrupt: If ``data`` is not a valid encoding (the caller adds the checkpoint).
        UntrustedTypeError: If it names a class or function outside the allow-lists.
    """
    if is_primitive(data):
        return data
    if not (isinstance(data, dict) and data):
        raise Corrupt(f"malformed static value {messages.bounded_repr(data)}")
    tag = next(iter(data))
    kind = _KINDS_BY_TAG.get(tag)
    if kind is None:
        raise Corrupt(f"unknown static value kind {messages.bounded_repr(tag)}")
    expected_keys = {tag} if kind.extra_key is None else {tag, kind.extra_key}
    if data.keys() != expected_keys:
        raise Corrupt(
            f"a {tag} value has the keys {messages.bounded_repr(sorted(data))}, not"
            f" {sorted(expected_keys)}"
        )
    return kind.decode(data, context.at(tag))


def _items(data: Any, context: DecodeContext, what: str) -> list[Any]:
    return [decode(item, context.at(i)) for i, item in enumerate(expect_list(data, what))]


def _pairs(data: Any, context: DecodeContext, what: str) -> list[tuple[Any, Any]]:
    pairs = []
    for i, (key, value) in enumerate(expect_pairs(data, what)):
        pairs.append((decode(key, context.at(i, 0)), decode(value, context.at(i, 1))))
    return pairs


def _hashable(values: Iterable[Any], what: str) -> None:
    for value in values:
        try:
            hash(value)
        except TypeError as exc:
            raise Corrupt(f"{what} holds the unhashable {messages.bounded_repr(value)}") from exc


def _sequence_kind(tag: str, cls: type) -> _Kind:
    def decode_items(data, context):
        items = _items(data[tag], context, f"a {tag}")
        if cls in (frozenset, set):
            _hashable(items, f"a {tag}")
        return cls(items)

    return _Kind(
        tag,
        lambda value: type(value) is cls,
        lambda value, path: {tag: [encode(item, path) for item in value]},
        decode_items,
    )


def _mapping_kind(tag: str, cls: type) -> _Kind:
    def decode_pairs(data, context):
        pairs = _pairs(data[tag], context, f"a {tag}")
        _hashable((key for key, _ in pairs), f"the keys of a {tag}")
        return cls(pairs)

    return _Kind(
        tag,
        lambda value: type(value) is cls,
        lambda value, path: {tag: [[encode(k, path), encode(v, path)] for k, v in value.items()]},
        decode_pairs,
    )


def _decode_float(data, context):
    text = data["float"]
    expect(
        isinstance(text, str) and text in _NON_FINITE_FLOATS,
        f"a float must be 'inf', '-inf' or 'nan', not {messages.bounded_repr(text)}",
    )
    return _NON_FINITE_FLOATS[text]


def _decode_slice(data, context):
    parts = _items(data["slice"], context, "a slice")
    expect(len(parts) == 3, "a slice has three parts")
    expect(all(part is None or type(part) is int for part in parts), "slice parts are ints")
    return slice(*parts)


def _decode_np_scalar(data, context):
    dtype_name, item = expect_list(data["np_scalar"], "a numpy scalar", 2)
    item = decode(item, context.at(1))
    expect(isinstance(item, (bool, int, float)), "a numpy scalar holds a number")
    try:
        return valid_dtype(dtype_name).type(item)
    except (OverflowError, ValueError, TypeError) as exc:
        raise Corrupt(f"bad numpy scalar: {messages.bounded_text(str(exc))}") from exc


def _decode_jnp_scalar_type(data, context):
    scalar_type = getattr(jnp, valid_dtype(data["jnp_scalar_type"]).name, None)
    expect(isinstance(scalar_type, type), "not a jax.numpy scalar type")
    return scalar_type


def _is_named_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def _decode_named_tuple(data, context):
    cls = context.resolve(data["namedtuple"], "type")
    expect(issubclass(cls, tuple) and hasattr(cls, "_fields"), f"{cls.__name__} is no namedtuple")
    items = _items(data["items"], context, "a named tuple's items")
    expect(len(items) == len(cls._fields), f"{cls.__name__} has {len(cls._fields)} fields")
    return cls._make(items)


def _decode_enum(data, context):
    cls = context.resolve(data["enum"], "type")
    member = data["member"]
    expect(issubclass(cls, enum.Enum), f"{cls.__name__} is not an enum")
    expect(
        isinstance(member, str) and member in cls.__members__,
        f"{cls.__name__} has no member {messages.bounded_repr(member)}",
    )
    return cls[member]


def _encode_partial(value: functools.partial, path: str) -> dict[str, Any]:
    arguments = (*value.args, *value.keywords.values())
    if isinstance(value.func, functools.partial) or not all(
        type(argument) in functions.PARTIAL_ARGUMENT_TYPES for argument in arguments
    ):
        raise errors.UnsupportedValueError(
            f"{path}: cannot save {messages.bounded_repr(value)}: a checkpoint holds partials"
            " only over a named function with None, boolean, number or string arguments."
        )
    return {
        "partial": {
            "func": encode(value.func, path),
            "args": [encode(argument, path) for argument in value.args],
            "keywords": [[key, encode(argument, path)] for key, argument in value.keywords.items()],
        }
    }


def _decode_partial(data, context):
    payload = data["partial"]
    expect(
        isinstance(payload, dict) and payload.keys() == {"func", "args", "keywords"},
        "a partial has the keys func, args and keywords",
    )
    function_data = payload["func"]
    expect(
        isinstance(function_data, dict) and function_data.keys() == {"function"},
        "a partial's func must be a named function",
    )
    func = context.at("func").resolve(function_data["function"], "function")
    args = expect_list(payload["args"], "a partial's args")
    keywords = expect_pairs(payload["keywords"], "a partial's keywords")
    literals = [*args, *(value for _, value in keywords)]
    expect(
        all(is_primitive(value) for value in literals)
        and all(isinstance(key, str) and key.isidentifier() for key, _ in keywords),
        "a partial's arguments must be literal None, booleans, numbers or strings",
    )
    return functools.partial(func, *args, **dict(keywords))


def _decode_dataclass(data, context):
    cls = context.resolve(data["dataclass"], "type")
    expect(dataclasses.is_dataclass(cls), f"{cls.__name__} is not a dataclass")
    values = dict(_pairs(data["fields"], context, "a dataclass's fields"))
    expected = [field.name for field in dataclasses.fields(cls)]
    expect(
        sorted(expected) == sorted(values) and len(values) == len(data["fields"]),
        f"{cls.__qualname__} has the fields {expected}, but the checkpoint gives"
        f" {messages.bounded_repr(sorted(map(str, values)))}",
    )
    # Rebuilt field by field: restoring never runs a constructor the checkpoint chose.
    instance = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(instance, name, value)
    return instance


def _encode_dataclass(value: Any, path: str) -> dict[str, Any]:
    return {
        "dataclass": type_registry.qualified_name(type(value), what="dataclass", path=path),
        "fields": [
            [field.name, encode(getattr(value, field.name), path)]
            for field in dataclasses.fields(value)
        ],
    }


def _spec_entry(entry: Any) -> Any:
    if entry is None or isinstance(entry, str):
        return entry
    return list(entry)


def _decode_partition_spec(data, context):
    entries = expect_list(data["partition_spec"], "a partition spec")
    for entry in entries:
        expect(
            entry is None
            or isinstance(entry, str)
            or (isinstance(entry, list) and all(isinstance(name, str) for name in entry)),
            "a partition spec entry is null, a mesh axis name or a list of them",
        )
    return jax.sharding.PartitionSpec(
        *(tuple(entry) if isinstance(entry, list) else entry for entry in entries)
    )


def _encode_mesh(mesh: Any) -> dict[str, Any]:
    return {
        "axis_names": list(mesh.axis_names),
        "axis_sizes": [int(size) for size in mesh.axis_sizes],
        "axis_types": [axis_type.name for axis_type in mesh.axis_types],
    }


def _decode_mesh(data, context):
    """An ``AbstractMesh``: the devices that held the arrays are not this process's concern."""
    payload = data["mesh"]
    expect(
        isinstance(payload, dict) and payload.keys() == {"axis_names", "axis_sizes", "axis_types"},
        "a mesh has axis_names, axis_sizes and axis_types",
    )
    names = expect_list(payload["axis_names"], "a mesh's axis names")
    sizes = expect_list(payload["axis_sizes"], "a mesh's axis sizes", len(names))
    types = expect_list(payload["axis_types"], "a mesh's axis types", len(names))
    expect(all(isinstance(name, str) for name in names), "mesh axis names are strings")
    expect(all(type(size) is int and 0 < size < 2**31 for size in sizes), "bad mesh axis size")
    members = jax.sharding.AxisType.__members__
    expect(
        all(isinstance(name, str) and name in members for name in types), "unknown mesh axis type"
    )
    return jax.sharding.AbstractMesh(
        tuple(sizes), tuple(names), axis_types=tuple(members[name] for name in types)
    )


def _decode_named_sharding(data, context):
    payload = data["named_sharding"]
    expect(
        isinstance(payload, dict) and payload.keys() == {"mesh", "spec"},
        "a named sharding has a mesh and a spec",
    )
    mesh = _decode_mesh({"mesh": payload["mesh"]}, context.at("mesh"))
    spec = _decode_partition_spec({"partition_spec": payload["spec"]}, context.at("spec"))
    try:
        return jax.sharding.NamedSharding(mesh, spec)
    except (ValueError, TypeError) as exc:
        raise Corrupt(f"bad named sharding: {messages.bounded_text(str(exc))}") from exc


#### NNX transform configuration: filters and state axes ####

# NNX's transforms keep filters (which variables a rule applies to) and ``nnx.StateAxes`` (which
# axis each filter's variables are mapped over) as static configuration: ``nnx.RNN`` holds
# ``state_axes`` and ``broadcast_rngs``, for instance. A filter is a literal (a class, a tag
# string, a boolean, ``...`` or None), a list or tuple of filters, or one of NNX's filter
# objects. Filter objects are rebuilt through their public constructors, from arguments
# checked to be of the kinds those constructors take, so a manifest can only ever produce
# these few classes.


@dataclasses.dataclass(frozen=True)
class _FilterClass:
    """How one of NNX's filter classes is saved.

    Attributes:
        cls: The class, as ``flax.nnx`` exports it (its name is the manifest's tag payload).
        arguments: The constructor arguments that rebuild a given filter.
        accepts: Whether decoded arguments are ones the constructor takes.
    """

    cls: type
    arguments: Callable[[Any], tuple[Any, ...]]
    accepts: Callable[[tuple[Any, ...]], bool]


def _is_filter(value: Any) -> bool:
    """Whether ``value`` is an NNX filter this codec can rebuild."""
    if value is None or value is Ellipsis or isinstance(value, (bool, str, type)):
        return True
    if type(value) in (list, tuple):
        return all(_is_filter(item) for item in value)
    return type(value) in _FILTER_CLASSES_BY_TYPE


def _are_filters(arguments: tuple[Any, ...]) -> bool:
    return all(_is_filter(argument) for argument in arguments)


def _dataclass_arguments(value: Any) -> tuple[Any, ...]:
    return tuple(getattr(value, field.name) for field in dataclasses.fields(value))


def _is_path_key(value: Any) -> bool:
    return isinstance(value, str) or type(value) is int


_FILTER_CLASSES = {
    filter_class.cls.__name__: filter_class
    for filter_class in (
        # Dataclasses, saved field by field as this flax release defines them (``PathContains``
        # has an ``exact`` flag in flax 0.12.8; a release without it has one field fewer).
        _FilterClass(
            nnx.WithTag,
            _dataclass_arguments,
            lambda args: len(args) == 1 and isinstance(args[0], str),
        ),
        _FilterClass(
            nnx.PathContains,
            _dataclass_arguments,
            lambda args: (
                len(args) == len(dataclasses.fields(nnx.PathContains))
                and _is_path_key(args[0])
                and all(type(arg) is bool for arg in args[1:])
            ),
        ),
        _FilterClass(
            nnx.OfType,
            _dataclass_arguments,
            lambda args: len(args) == 1 and isinstance(args[0], type),
        ),
        _FilterClass(nnx.Any, lambda f: f.predicates, _are_filters),
        _FilterClass(nnx.All, lambda f: f.predicates, _are_filters),
        _FilterClass(
            nnx.Not, lambda f: (f.predicate,), lambda args: len(args) == 1 and _are_filters(args)
        ),
        _FilterClass(nnx.Everything, lambda f: (), lambda args: not args),
        _FilterClass(nnx.Nothing, lambda f: (), lambda args: not args),
    )
}
_FILTER_CLASSES_BY_TYPE = {
    filter_class.cls: filter_class for filter_class in _FILTER_CLASSES.values()
}


def _encode_filter(value: Any, path: str) -> dict[str, Any]:
    filter_class = _FILTER_CLASSES_BY_TYPE[type(value)]
    return {
        "nnx_filter": filter_class.cls.__name__,
        "args": [encode(argument, path) for argument in filter_class.arguments(value)],
    }


def _decode_filter(data, context):
    name = data["nnx_filter"]
    filter_class = _FILTER_CLASSES.get(name) if isinstance(name, str) else None
    expect(filter_class is not None, f"{messages.bounded_repr(name)} is not an NNX filter class")
    arguments = tuple(_items(data["args"], context, "an NNX filter's arguments"))
    expect(
        filter_class.accepts(arguments),
        f"nnx.{name} does not take the arguments {messages.bounded_repr(arguments)}",
    )
    return filter_class.cls(*arguments)


def _is_state_axis(value: Any) -> bool:
    return value is None or value is nnx.Carry or type(value) is int


def _decode_state_axes(data, context):
    pairs = _pairs(data["state_axes"], context, "a StateAxes")
    for filter_, axis in pairs:
        expect(_is_filter(filter_), f"{messages.bounded_repr(filter_)} is not an NNX filter")
        expect(
            _is_state_axis(axis),
            f"a StateAxes axis is an integer, None or nnx.Carry, not {messages.bounded_repr(axis)}",
        )
    return nnx.StateAxes(pairs)


def _decode_ellipsis(data, context):
    expect(data["ellipsis"] is None, "an ellipsis value is null")
    return Ellipsis


def _is_mesh(value: Any) -> bool:
    return isinstance(value, (jax.sharding.Mesh, jax.sharding.AbstractMesh))


# ``jnp.float32`` and friends: JAX's scalar types, distinct from numpy's, all instances of one
# metaclass that JAX does not export; the type of a known one names it.
_JAX_SCALAR_TYPE_METACLASS = type(jnp.float32)


def _is_scalar_type(value: Any) -> bool:
    return isinstance(value, _JAX_SCALAR_TYPE_METACLASS)


def _is_function(value: Any) -> bool:
    return (
        callable(value)
        and not isinstance(value, type)
        and not isinstance(value, (jax.Array, np.ndarray))
    )


# Wrapped NNX modules have their own schema (``module_schema``, which builds on this one and
# is imported when first needed).
MODULE_SHELL_TAG = "nnx_module"


def _module_schema():
    from pz_flax.checkpoint import module_schema

    return module_schema


def _module_shell_kind() -> _Kind:
    return _Kind(
        MODULE_SHELL_TAG,
        lambda value: _module_schema().is_module_shell(value),
        lambda value, path: _module_schema().encode_shell(value, path),
        lambda data, context: _module_schema().decode_shell(data, context),
        extra_key="attributes",
    )


_KINDS: tuple[_Kind, ...] = (
    _Kind(
        "float",
        lambda value: type(value) is float,
        lambda value, path: {"float": repr(value)},
        _decode_float,
    ),
    _Kind(
        "namedtuple",
        _is_named_tuple,
        lambda value, path: {
            "namedtuple": type_registry.qualified_name(
                type(value), what="named tuple class", path=path
            ),
            "items": [encode(item, path) for item in value],
        },
        _decode_named_tuple,
        extra_key="items",
    ),
    _sequence_kind("tuple", tuple),
    _sequence_kind("list", list),
    _sequence_kind("frozenset", frozenset),
    _sequence_kind("set", set),
    _mapping_kind("dict", dict),
    _mapping_kind("ordered_dict", collections.OrderedDict),
    _Kind(
        "slice",
        lambda value: type(value) is slice,
        lambda value, path: {
            "slice": [encode(part, path) for part in (value.start, value.stop, value.step)]
        },
        _decode_slice,
    ),
    _Kind(
        "dtype",
        lambda value: isinstance(value, np.dtype),
        lambda value, path: {"dtype": value.name},
        lambda data, context: valid_dtype(data["dtype"]),
    ),
    _Kind(
        "jnp_scalar_type",
        _is_scalar_type,
        lambda value, path: {"jnp_scalar_type": np.dtype(value.dtype).name},
        _decode_jnp_scalar_type,
    ),
    _Kind(
        "np_scalar_type",
        lambda value: isinstance(value, type) and issubclass(value, np.generic),
        lambda value, path: {"np_scalar_type": np.dtype(value).name},
        lambda data, context: valid_dtype(data["np_scalar_type"]).type,
    ),
    _Kind(
        "np_scalar",
        lambda value: isinstance(value, np.generic),
        lambda value, path: {"np_scalar": [value.dtype.name, encode(value.item(), path)]},
        _decode_np_scalar,
    ),
    _Kind(
        "enum",
        lambda value: isinstance(value, enum.Enum),
        lambda value, path: {
            "enum": type_registry.qualified_name(type(value), what="enum class", path=path),
            "member": value.name,
        },
        _decode_enum,
        extra_key="member",
    ),
    _Kind(
        "partition_spec",
        lambda value: isinstance(value, jax.sharding.PartitionSpec),
        lambda value, path: {"partition_spec": [_spec_entry(entry) for entry in value]},
        _decode_partition_spec,
    ),
    _Kind(
        "named_sharding",
        lambda value: isinstance(value, jax.sharding.NamedSharding),
        lambda value, path: {
            "named_sharding": {
                "mesh": _encode_mesh(value.mesh),
                "spec": [_spec_entry(entry) for entry in value.spec],
            }
        },
        _decode_named_sharding,
    ),
    _Kind(
        "mesh",
        _is_mesh,
        lambda value, path: {"mesh": _encode_mesh(value)},
        _decode_mesh,
    ),
    _Kind(
        "ellipsis",
        lambda value: value is Ellipsis,
        lambda value, path: {"ellipsis": None},
        _decode_ellipsis,
    ),
    # Before dataclasses: some NNX filters are dataclasses, rebuilt here by constructor.
    _Kind(
        "nnx_filter",
        lambda value: type(value) in _FILTER_CLASSES_BY_TYPE,
        _encode_filter,
        _decode_filter,
        extra_key="args",
    ),
    _Kind(
        "state_axes",
        lambda value: type(value) is nnx.StateAxes,
        lambda value, path: {
            "state_axes": [[encode(f, path), encode(axis, path)] for f, axis in value.items()]
        },
        _decode_state_axes,
    ),
    _module_shell_kind(),
    _Kind(
        "partial",
        lambda value: isinstance(value, functools.partial),
        _encode_partial,
        _decode_partial,
    ),
    _Kind(
        "dataclass",
        lambda value: dataclasses.is_dataclass(value) and not isinstance(value, type),
        _encode_dataclass,
        _decode_dataclass,
        extra_key="fields",
    ),
    _Kind(
        "type",
        lambda value: isinstance(value, type),
        lambda value, path: {"type": type_registry.qualified_name(value, what="class", path=path)},
        lambda data, context: context.resolve(data["type"], "type"),
    ),
    _Kind(
        "function",
        _is_function,
        lambda value, path: {"function": functions.function_name(value, path)},
        lambda data, context: context.resolve(data["function"], "function"),
    ),
)
_KINDS_BY_TAG = {kind.tag: kind for kind in _KINDS}


#### Variable metadata ####

# NNX's variable hooks (``on_get_value`` and the others; ``*_hooks`` in older releases) are
# functions NNX calls whenever the variable is created, read or written: a checkpoint holding
# one would run code on ``param[...]``. They are never saved and never restored.
_HOOK_PREFIX = "on_"
_HOOK_SUFFIX = "_hooks"


def is_hook_key(key: str) -> bool:
    """Whether a variable metadata key names an NNX variable hook."""
    return key.startswith(_HOOK_PREFIX) or key.endswith(_HOOK_SUFFIX)


def encode_variable_metadata(metadata: dict[str, Any], path: str) -> list[list[Any]]:
    """A variable's metadata as ``[key, value]`` pairs.

    Raises:
        UnsupportedValueError: If it holds a hook, or a value with no encoding.
    """
    hooks = sorted(key for key in metadata if is_hook_key(key))
    if hooks:
        raise errors.UnsupportedValueError(
            f"{path}: cannot save a variable with the NNX hooks {hooks}: hooks are functions NNX"
            " runs whenever the variable is used, and a checkpoint never holds code. Remove them"
            " (or use a Variable subclass) before saving."
        )
    return [[key, encode(value, f"{path} (metadata {key})")] for key, value in metadata.items()]


def decode_variable_metadata(data: Any, context: DecodeContext) -> dict[str, Any]:
    """Reads a variable's metadata pairs, refusing hooks.

    Raises:
        Corrupt: If the pairs are malformed, or a key names a hook.
    """
    metadata: dict[str, Any] = {}
    for i, (key, value) in enumerate(expect_pairs(data, "a variable's metadata")):
        expect(isinstance(key, str), "variable metadata keys are strings")
        expect(
            not is_hook_key(key),
            f"the variable has the NNX hook {messages.bounded_repr(key)}; checkpoints never hold"
            " hooks (refusing to restore it)",
        )
        if key in metadata:
            raise Corrupt(f"the metadata key {messages.bounded_repr(key)} repeats")
        metadata[key] = decode(value, context.at(i, 1))
    # NNX hashes variable metadata into graph definitions: an unhashable entry would fail on
    # first use, far from the checkpoint.
    _hashable(metadata.values(), "the variable's metadata")
    for key in nnx_compat.PLAIN_VARIABLE_OPTIONS:  # NNX's switches (``hijax``, ``ref``).
        expect(isinstance(metadata.get(key, False), bool), f"metadata {key} must be a boolean")
    return metadata


def build_variable(cls: type[nnx.Variable], value: Any, metadata: dict[str, Any]) -> nnx.Variable:
    """A variable of class ``cls`` holding ``value`` and decoded ``metadata``.

    Entries NNX requires on every variable that the checkpoint lacks (it was written by an
    older flax, or by hand) take the values NNX gives a plain variable made now.
    """
    return cls.from_metadata(value, {**_required_metadata_defaults(), **metadata})


def _required_metadata_defaults() -> dict[str, Any]:
    # Not cached: some defaults (``eager_sharding``) follow NNX's configuration of the moment.
    plain = nnx.Variable(np.zeros(()), **nnx_compat.PLAIN_VARIABLE_OPTIONS).get_metadata()
    required = nnx_compat.nnx_metadata_keys().required
    return {key: entry for key, entry in plain.items() if key in required}


def check_variable_class(cls: type) -> None:
    """Refuses a variable class that defines hooks of its own."""
    hooks = _class_hooks(cls)
    expect(not hooks, f"the variable class {cls.__qualname__} defines the NNX hooks {hooks}")


@functools.cache
def _class_hooks(cls: type) -> list[str]:
    return [name for name in dir(cls) if is_hook_key(name) and getattr(cls, name, None)]
