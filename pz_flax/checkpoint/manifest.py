"""The structure manifest: a JSON description of a model, from which it can be rebuilt.

Orbax stores arrays; it knows nothing of layer classes, static fields or axis names. The
manifest records everything else, so that a checkpoint restores to the exact model in a
process that never imported the code that built it:

* every struct (layer, ``NamedArray``, ...) by class name, with its child fields (recursively)
  and its static fields (encoded as JSON values, see below);
* every variable (``Parameter``, ``StateVariable`` or any ``nnx.Variable``) by class name, with
  its NNX metadata (label, axis names, user metadata) and its raw value; a variable that occurs
  twice in the model (tied weights) is stored once and referenced by id;
* every array as an entry of the ``arrays`` table: its path in the model, its key in the Orbax
  array tree, shape, dtype, and per-axis names when it belongs to a named array or variable;
* the format name and version, so that future versions can read or refuse old checkpoints.

Static values are encoded as plain JSON where JSON has the type (``null``, booleans, ints,
strings, finite floats) and otherwise as one-key objects: ``{"tuple": [...]}``,
``{"dict": [[key, value], ...]}``, ``{"dtype": "bfloat16"}``, ``{"function": "jax.nn:relu"}``,
``{"partial": {...}}``, ``{"dataclass": ..., "fields": ...}``, and so on. Classes and functions
are named, never pickled; ``type_registry`` decides which names restoring may resolve.

Nodes of the model tree use the same one-key style: ``{"struct": name, "fields": ...,
"static": ...}``, ``{"variable": name, "id": ..., "value": ..., "metadata": ...}``,
``{"variable_ref": id}``, ``{"array": index}``, ``{"list": [...]}``, ``{"tuple": [...]}``,
``{"dict": [[key, node], ...]}``, ``{"literal": value}`` and ``null``.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import math
import re
from collections.abc import Iterable
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.typing import HashableMapping

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import type_registry
from pz_flax.core import struct

FORMAT_NAME = "pz_flax.checkpoint"
FORMAT_VERSION = 1

# NNX bookkeeping entries of a variable's metadata. They are saved (so that a variable is
# rebuilt exactly) but not compared against a restore target: they describe how NNX handles
# the variable in this process, not what the checkpoint holds.
_NNX_RUNTIME_METADATA = frozenset(
    {"hijax", "ref", "eager_sharding", "sharding", "sharding_names", "mesh"}
)
_AXIS_NAMES_METADATA = "axis_names"
_LABEL_METADATA = "label"

_SAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


@dataclasses.dataclass(frozen=True)
class ArrayEntry:
    """One array of a checkpoint, as listed in its manifest.

    Attributes:
        path: Where the array sits in the model, as ``/``-separated field names, list
            indices and dict keys (``"sublayers/0/weights"``).
        key: The array's key path in the Orbax array tree of the checkpoint.
        shape: The array's shape.
        dtype: The array's dtype name (``"float32"``, ``"bfloat16"``, ...).
        axis_names: One entry per array axis: the axis name, or None for a positional axis;
            None altogether when the array has no named axes.
        label: The label of the variable holding the array, as text; None if not in one.
        prng_impl: For a typed PRNG key array, the name of its implementation
            (``"threefry2x32"``); the checkpoint then holds its ``jax.random.key_data``, whose
            shape and dtype the entry describes.
    """

    path: str
    key: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    axis_names: tuple[str | None, ...] | None = None
    label: str | None = None
    prng_impl: str | None = None

    @property
    def size(self) -> int:
        """The number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """The size in bytes of the array's data."""
        return self.size * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        """The entry as stored in the manifest."""
        return {
            "path": self.path,
            "key": list(self.key),
            "shape": list(self.shape),
            "dtype": self.dtype,
            "axis_names": None if self.axis_names is None else list(self.axis_names),
            "label": self.label,
            "prng_impl": self.prng_impl,
        }

    @classmethod
    def from_json(cls, data: Any) -> ArrayEntry:
        """Reads an entry back, checking its layout.

        Raises:
            CorruptCheckpointError: If ``data`` is not a well-formed entry.
        """
        try:
            axis_names = data["axis_names"]
            entry = cls(
                path=str(data["path"]),
                key=tuple(str(part) for part in data["key"]),
                shape=tuple(int(dim) for dim in data["shape"]),
                dtype=str(np.dtype(data["dtype"])),
                axis_names=None if axis_names is None else tuple(axis_names),
                label=data["label"],
                prng_impl=data.get("prng_impl"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.CorruptCheckpointError(
                f"The manifest's array table has a malformed entry {data!r}: {exc}"
            ) from None
        return entry


def path_to_str(path: tuple[str, ...]) -> str:
    """Joins a model path for messages; the root is ``"<root>"``."""
    return "/".join(path) if path else "<root>"


#### Static values ####


def encode_static(value: Any, path: str) -> Any:
    """Encodes a static field value (or variable metadata entry) as a JSON value.

    Args:
        value: The value.
        path: Where it was found, for error messages.

    Returns:
        A JSON-compatible value that ``decode_static`` turns back into an equal value.

    Raises:
        UnsupportedValueError: If the value has no encoding (a lambda, an arbitrary object).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if type(value) is int:
        return value
    if type(value) is float:
        return value if math.isfinite(value) else {"float": repr(value)}
    if type(value) is tuple:
        return {"tuple": [encode_static(item, path) for item in value]}
    if type(value) is list:
        return {"list": [encode_static(item, path) for item in value]}
    if type(value) in (dict, collections.OrderedDict):
        tag = "dict" if type(value) is dict else "ordered_dict"
        return {tag: [[encode_static(k, path), encode_static(v, path)] for k, v in value.items()]}
    if type(value) in (frozenset, set):
        return {type(value).__name__: [encode_static(item, path) for item in value]}
    if type(value) is slice:
        return {
            "slice": [encode_static(part, path) for part in (value.start, value.stop, value.step)]
        }
    if isinstance(value, jax.tree_util.PyTreeDef):
        return {"treedef": _encode_treedef(value, path)}
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):
        name = type_registry.qualified_name(type(value), what="named tuple class", path=path)
        return {"namedtuple": name, "items": [encode_static(item, path) for item in value]}
    if isinstance(value, HashableMapping):
        # NNX's frozen mapping, found in the graph definitions kept by wrapped NNX modules.
        return {
            "hashable_mapping": [
                [encode_static(k, path), encode_static(v, path)] for k, v in value.items()
            ]
        }
    if isinstance(value, np.dtype):
        return {"dtype": value.name}
    if isinstance(value, type) and type(value).__name__ == "_ScalarMeta":
        # jnp.float32 and friends: jax's scalar types, distinct from numpy's.
        return {"jnp_scalar_type": np.dtype(value.dtype).name}
    if isinstance(value, type) and issubclass(value, np.generic):
        return {"np_scalar_type": np.dtype(value).name}
    if isinstance(value, np.generic):
        return {"np_scalar": [value.dtype.name, encode_static(value.item(), path)]}
    if isinstance(value, enum.Enum):
        name = type_registry.qualified_name(type(value), what="enum class", path=path)
        return {"enum": name, "member": value.name}
    if isinstance(value, functools.partial):
        return {
            "partial": {
                "func": encode_static(value.func, path),
                "args": [encode_static(arg, path) for arg in value.args],
                "keywords": [[k, encode_static(v, path)] for k, v in value.keywords.items()],
            }
        }
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type_registry.qualified_name(type(value), what="dataclass", path=path)
        return {
            "dataclass": name,
            "fields": [
                [field.name, encode_static(getattr(value, field.name), path)]
                for field in dataclasses.fields(value)
            ],
        }
    if isinstance(value, type):
        return {"type": type_registry.qualified_name(value, what="class", path=path)}
    if callable(value) and not isinstance(value, (jax.Array, np.ndarray)):
        return {"function": type_registry.qualified_name(value, what="function", path=path)}
    raise errors.UnsupportedValueError(
        f"{path}: cannot describe the static value {value!r} of type"
        f" {type(value).__module__}.{type(value).__qualname__} in a checkpoint manifest."
    )


def decode_static(data: Any, path: str, allow_modules: Iterable[str]) -> Any:
    """Turns a value encoded by ``encode_static`` back into a Python value.

    Args:
        data: The JSON value.
        path: Where it occurs in the model, for error messages.
        allow_modules: Modules the caller trusts beyond pz_flax's own (see ``type_registry``).

    Returns:
        The decoded value.

    Raises:
        CorruptCheckpointError: If ``data`` is not a valid encoding.
        UntrustedTypeError: If it names a class or function outside the allow-list.
    """
    if data is None or isinstance(data, (bool, str, int, float)):
        return data
    if isinstance(data, list) or not (isinstance(data, dict) and len(data) in (1, 2)):
        raise errors.CorruptCheckpointError(f"{path}: malformed static value {data!r}.")

    def recurse(item):
        return decode_static(item, path, allow_modules)

    try:
        tag = next(iter(data))
        payload = data[tag]
        if tag == "float":
            return float(payload)
        if tag == "tuple":
            return tuple(recurse(item) for item in payload)
        if tag == "list":
            return [recurse(item) for item in payload]
        if tag == "dict":
            return {recurse(k): recurse(v) for k, v in payload}
        if tag == "ordered_dict":
            return collections.OrderedDict((recurse(k), recurse(v)) for k, v in payload)
        if tag == "frozenset":
            return frozenset(recurse(item) for item in payload)
        if tag == "set":
            return {recurse(item) for item in payload}
        if tag == "slice":
            return slice(*(recurse(part) for part in payload))
        if tag == "namedtuple":
            cls = type_registry.resolve(payload, "type", allow_modules=allow_modules, path=path)
            return cls._make(recurse(item) for item in data["items"])
        if tag == "hashable_mapping":
            return HashableMapping({recurse(k): recurse(v) for k, v in payload})
        if tag == "treedef":
            return _decode_treedef(payload, path, allow_modules)
        if tag == "dtype":
            return np.dtype(payload)
        if tag == "jnp_scalar_type":
            import jax.numpy as jnp

            return getattr(jnp, np.dtype(payload).name)
        if tag == "np_scalar_type":
            return np.dtype(payload).type
        if tag == "np_scalar":
            dtype_name, item = payload
            return np.dtype(dtype_name).type(recurse(item))
        if tag == "enum":
            cls = type_registry.resolve(payload, "type", allow_modules=allow_modules, path=path)
            return cls[data["member"]]
        if tag == "partial":
            func = recurse(payload["func"])
            args = [recurse(arg) for arg in payload["args"]]
            return functools.partial(func, *args, **{k: recurse(v) for k, v in payload["keywords"]})
        if tag == "dataclass":
            cls = type_registry.resolve(payload, "type", allow_modules=allow_modules, path=path)
            return _build_dataclass(cls, {name: recurse(v) for name, v in data["fields"]}, path)
        if tag == "type":
            return type_registry.resolve(payload, "type", allow_modules=allow_modules, path=path)
        if tag == "function":
            return type_registry.resolve(
                payload, "function", allow_modules=allow_modules, path=path
            )
    except errors.CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, StopIteration) as exc:
        raise errors.CorruptCheckpointError(
            f"{path}: malformed static value {data!r}: {exc}"
        ) from None
    raise errors.CorruptCheckpointError(f"{path}: unknown static value tag {tag!r}.")


# Pytree node types that are not classes a checkpoint could name by module.
_BUILTIN_NODE_TYPES = {
    "dict": dict,
    "list": list,
    "tuple": tuple,
    "NoneType": type(None),
    "OrderedDict": collections.OrderedDict,
    "defaultdict": collections.defaultdict,
}
_LEAF = "*"


def _encode_treedef(treedef: jax.tree_util.PyTreeDef, path: str) -> Any:
    """Encodes a JAX tree structure node by node: its type, auxiliary data and children.

    NNX graph definitions (kept by layers that wrap NNX modules) contain tree structures.
    """
    node_data = treedef.node_data()
    if node_data is None:
        return _LEAF
    node_type, aux = node_data
    builtin = next((name for name, cls in _BUILTIN_NODE_TYPES.items() if cls is node_type), None)
    return {
        "type": builtin
        or {"class": type_registry.qualified_name(node_type, what="pytree node type", path=path)},
        "aux": encode_static(aux, path),
        "children": [_encode_treedef(child, path) for child in treedef.children()],
    }


def _decode_treedef(data: Any, path: str, allow_modules: Iterable[str]) -> Any:
    if data == _LEAF:
        return jax.tree_util.tree_structure(0)
    type_data = data["type"]
    if isinstance(type_data, str):
        node_type = _BUILTIN_NODE_TYPES[type_data]
    else:
        node_type = type_registry.resolve(
            type_data["class"], "type", allow_modules=allow_modules, path=path
        )
    children = [_decode_treedef(child, path, allow_modules) for child in data["children"]]
    aux = decode_static(data["aux"], path, allow_modules)
    return jax.tree_util.PyTreeDef.from_node_data_and_children(
        jax.tree_util.default_registry, (node_type, aux), children
    )


def _build_dataclass(cls: type, field_values: dict[str, Any], path: str) -> Any:
    """Rebuilds a dataclass instance from its fields without running its ``__init__``."""
    expected = {field.name for field in dataclasses.fields(cls)}
    if expected != field_values.keys():
        raise errors.CorruptCheckpointError(
            f"{path}: {cls.__module__}.{cls.__qualname__} has the fields {sorted(expected)}, but"
            f" the checkpoint gives {sorted(field_values)}."
        )
    instance = object.__new__(cls)
    for name, value in field_values.items():
        object.__setattr__(instance, name, value)
    return instance


#### Model trees ####


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))


def _named_array_axis_names(value: Any) -> tuple[str | None, ...] | None:
    """Names of the axes of a named array's ``data_array`` (None for positional axes)."""
    named_axes = value.__dict__.get("named_axes")
    data_axis_for_name = value.__dict__.get("data_axis_for_name")
    data_array = value.__dict__.get("data_array")
    ndim = len(getattr(data_array, "shape", ()))
    if isinstance(data_axis_for_name, dict):
        names: list[str | None] = [None] * ndim
        for name, axis in data_axis_for_name.items():
            names[axis] = name
        return tuple(names)
    if isinstance(named_axes, dict):
        return (None,) * (ndim - len(named_axes)) + tuple(named_axes)
    return None


def _variable_axis_names(metadata: dict[str, Any], raw_value: Any) -> tuple[str | None, ...] | None:
    names = metadata.get(_AXIS_NAMES_METADATA)
    shape = getattr(raw_value, "shape", None)
    if names is None or shape is None or len(names) > len(shape):
        return None
    return (None,) * (len(shape) - len(names)) + tuple(names)


@dataclasses.dataclass
class EncodedModel:
    """A model split into its JSON manifest and its arrays.

    Attributes:
        manifest: The JSON-compatible manifest (``format``, ``format_version``, ``root``,
            ``arrays``).
        entries: The array table, in the order of ``arrays``.
        arrays: The model's arrays (or ``jax.ShapeDtypeStruct`` leaves of an abstract model).
    """

    manifest: dict[str, Any]
    entries: list[ArrayEntry]
    arrays: list[Any]

    def array_tree(self, leaves: Iterable[Any] | None = None) -> dict[str, Any]:
        """Nests ``leaves`` (default: the arrays) into the dict tree Orbax stores."""
        return build_array_tree(self.entries, self.arrays if leaves is None else leaves)


def build_array_tree(entries: Iterable[ArrayEntry], leaves: Iterable[Any]) -> dict[str, Any]:
    """Nests one leaf per entry into a dict tree keyed by the entries' ``key`` paths."""
    tree: dict[str, Any] = {}
    for entry, leaf in zip(entries, leaves):
        node = tree
        for part in entry.key[:-1]:
            node = node.setdefault(part, {})
        node[entry.key[-1]] = leaf
    return tree


class _Encoder:
    """Walks a model once, producing manifest nodes and collecting its arrays.

    The walk order (struct fields in declaration order, variables' raw values, sequences in
    order, dicts in insertion order) is the order ``replace_arrays`` walks in too.
    """

    def __init__(self, *, allow_abstract: bool, lenient_static: bool):
        self.allow_abstract = allow_abstract
        self.lenient_static = lenient_static
        self.entries: list[ArrayEntry] = []
        self.arrays: list[Any] = []
        self.variable_ids: dict[int, int] = {}
        self.used_keys: set[tuple[str, ...]] = set()

    def static(self, value: Any, path: str) -> Any:
        try:
            return encode_static(value, path)
        except errors.UnsupportedValueError:
            if not self.lenient_static:
                raise
            # Comparing against a target: an unencodable value simply never matches.
            return {"unencodable": repr(value)}

    def array_key(self, path: tuple[str, ...]) -> tuple[str, ...]:
        key = tuple(_SAFE_KEY_CHARS.sub("_", part) or "_" for part in path) or ("root",)
        unique, counter = key, 1
        while unique in self.used_keys:
            unique = (*key[:-1], f"{key[-1]}~{counter}")
            counter += 1
        self.used_keys.add(unique)
        return unique

    def node(self, value: Any, path: tuple[str, ...], axis_names=None, label=None) -> Any:
        where = path_to_str(path)
        if value is None:
            return None
        if isinstance(value, nnx.Variable):
            return self.variable(value, path)
        if struct.is_pytree_dataclass_type(type(value)):
            return self.struct(value, path)
        if _is_array(value) or (self.allow_abstract and isinstance(value, jax.ShapeDtypeStruct)):
            return self.array(value, path, axis_names, label)
        if isinstance(value, (bool, int, float, complex, str, np.generic)) and not isinstance(
            value, complex
        ):
            return {"literal": self.static(value, where)}
        if type(value) in (list, tuple):
            tag = type(value).__name__
            return {tag: [self.node(item, (*path, str(i))) for i, item in enumerate(value)]}
        if type(value) in (dict, collections.OrderedDict):
            return {
                "dict" if type(value) is dict else "ordered_dict": [
                    [self.static(key, where), self.node(item, (*path, str(key)))]
                    for key, item in value.items()
                ]
            }
        if isinstance(value, jax.ShapeDtypeStruct):
            raise errors.UnsupportedValueError(
                f"{where}: the model is abstract (a jax.ShapeDtypeStruct is here); only concrete"
                " arrays can be saved."
            )
        raise errors.UnsupportedValueError(
            f"{where}: cannot save a value of type {type(value).__module__}."
            f"{type(value).__qualname__}; checkpoints hold structs, variables, arrays, lists,"
            " tuples, dicts, None and Python scalars."
        )

    def struct(self, value: Any, path: tuple[str, ...]) -> dict[str, Any]:
        cls = type(value)
        where = path_to_str(path)
        fields: dict[str, Any] = {}
        static: dict[str, Any] = {}
        axis_names = _named_array_axis_names(value)
        for field in dataclasses.fields(value):
            field_value = value.__dict__[field.name]
            if struct.is_pytree_node_field(field):
                hint = axis_names if field.name == "data_array" else None
                fields[field.name] = self.node(field_value, (*path, field.name), hint)
            else:
                static[field.name] = self.static(field_value, f"{where} (field {field.name})")
        return {
            "struct": type_registry.qualified_name(cls, what="class", path=where),
            "fields": fields,
            "static": static,
        }

    def variable(self, variable: nnx.Variable, path: tuple[str, ...]) -> dict[str, Any]:
        where = path_to_str(path)
        known_id = self.variable_ids.get(id(variable))
        if known_id is not None:
            return {"variable_ref": known_id}
        variable_id = len(self.variable_ids)
        self.variable_ids[id(variable)] = variable_id
        metadata = variable.get_metadata()
        raw_value = variable.get_raw_value()
        label = metadata.get(_LABEL_METADATA)
        label_text = None if label is None else (label if isinstance(label, str) else repr(label))
        return {
            "variable": type_registry.qualified_name(
                type(variable), what="variable class", path=where
            ),
            "id": variable_id,
            "value": self.node(
                raw_value, path, _variable_axis_names(metadata, raw_value), label_text
            ),
            "metadata": [
                [key, self.static(entry, f"{where} (metadata {key})")]
                for key, entry in metadata.items()
            ],
        }

    def array(self, value: Any, path: tuple[str, ...], axis_names, label) -> dict[str, Any]:
        index = len(self.arrays)
        prng_impl = None
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            # Orbax stores plain arrays: keep the key data, and the implementation to rewrap.
            impl = value.dtype._impl
            prng_impl = impl.name
            if isinstance(value, jax.ShapeDtypeStruct):
                value = jax.ShapeDtypeStruct((*value.shape, *impl.key_shape), np.uint32)
            else:
                value = jax.random.key_data(value)
            axis_names = None
        self.arrays.append(value)
        shape = tuple(int(dim) for dim in value.shape)
        if axis_names is not None and len(axis_names) != len(shape):
            axis_names = None
        self.entries.append(
            ArrayEntry(
                path=path_to_str(path),
                key=self.array_key(path),
                shape=shape,
                dtype=np.dtype(value.dtype).name,
                axis_names=axis_names,
                label=label,
                prng_impl=prng_impl,
            )
        )
        return {"array": index}


def encode(
    model: Any, *, allow_abstract: bool = False, lenient_static: bool = False
) -> EncodedModel:
    """Describes a model as a manifest plus the list of its arrays.

    Args:
        model: A pz_flax model (or any tree of structs, variables, arrays, lists, tuples, dicts,
            None and Python scalars).
        allow_abstract: Accept ``jax.ShapeDtypeStruct`` leaves (to describe a restore target).
        lenient_static: Encode static values that have no JSON form as placeholders that never
            compare equal, instead of raising (to describe a restore target).

    Returns:
        The encoded model.

    Raises:
        UnsupportedValueError: If some value cannot be described; the message names its path.
    """
    encoder = _Encoder(allow_abstract=allow_abstract, lenient_static=lenient_static)
    root = encoder.node(model, ())
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "root": root,
        "arrays": [entry.to_json() for entry in encoder.entries],
    }
    return EncodedModel(manifest=manifest, entries=encoder.entries, arrays=encoder.arrays)


def read_entries(manifest: Any) -> list[ArrayEntry]:
    """Checks a manifest's header and returns its array table.

    Raises:
        CorruptCheckpointError: If the manifest is not a pz_flax manifest this version reads.
    """
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise errors.CorruptCheckpointError("The manifest is not a pz_flax checkpoint manifest.")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise errors.CorruptCheckpointError(
            f"The checkpoint has manifest format version {version!r}; this pz_flax reads"
            f" versions up to {FORMAT_VERSION}. Upgrade pz_flax to read it."
        )
    if "root" not in manifest or not isinstance(manifest.get("arrays"), list):
        raise errors.CorruptCheckpointError("The manifest lacks its 'root' or 'arrays' entry.")
    return [ArrayEntry.from_json(item) for item in manifest["arrays"]]


def decode(manifest: dict[str, Any], arrays: list[Any], *, allow_modules: Iterable[str]) -> Any:
    """Rebuilds a model from its manifest and its arrays, without running any ``__init__``.

    Args:
        manifest: A manifest produced by ``encode`` (read back from JSON).
        arrays: The arrays, in the order of the manifest's array table.
        allow_modules: Modules whose classes and functions may be resolved, beyond pz_flax's.

    Returns:
        The model.

    Raises:
        UntrustedTypeError: If the manifest names a class outside the allow-list.
        CorruptCheckpointError: If the manifest is malformed or names classes whose fields no
            longer match.
    """
    variables: dict[int, nnx.Variable] = {}
    allow_modules = tuple(allow_modules)

    def build(node: Any, path: tuple[str, ...]) -> Any:
        where = path_to_str(path)
        if node is None:
            return None
        if not isinstance(node, dict) or not node:
            raise errors.CorruptCheckpointError(f"{where}: malformed manifest node {node!r}.")
        try:
            if "array" in node:
                return arrays[node["array"]]
            if "literal" in node:
                return decode_static(node["literal"], where, allow_modules)
            if "list" in node:
                return [build(item, (*path, str(i))) for i, item in enumerate(node["list"])]
            if "tuple" in node:
                return tuple(build(item, (*path, str(i))) for i, item in enumerate(node["tuple"]))
            if "dict" in node or "ordered_dict" in node:
                pairs = node.get("dict", node.get("ordered_dict"))
                items = []
                for key_data, item in pairs:
                    key = decode_static(key_data, where, allow_modules)
                    items.append((key, build(item, (*path, str(key)))))
                return dict(items) if "dict" in node else collections.OrderedDict(items)
            if "variable_ref" in node:
                return variables[node["variable_ref"]]
            if "variable" in node:
                cls = type_registry.resolve(
                    node["variable"], "variable", allow_modules=allow_modules, path=where
                )
                metadata = {
                    key: decode_static(entry, f"{where} (metadata {key})", allow_modules)
                    for key, entry in node["metadata"]
                }
                variable = cls.from_metadata(build(node["value"], path), metadata)
                variables[node["id"]] = variable
                return variable
            if "struct" in node:
                cls = type_registry.resolve(
                    node["struct"], "struct", allow_modules=allow_modules, path=where
                )
                values = {
                    name: build(child, (*path, name)) for name, child in node["fields"].items()
                }
                for name, entry in node["static"].items():
                    values[name] = decode_static(entry, f"{where} (field {name})", allow_modules)
                expected = {field.name for field in dataclasses.fields(cls)}
                if expected != values.keys():
                    raise errors.CorruptCheckpointError(
                        f"{where}: the checkpoint gives {cls.__qualname__} the fields"
                        f" {sorted(values)}, but the class now has {sorted(expected)}."
                    )
                return cls.from_attributes(**values)
        except errors.CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise errors.CorruptCheckpointError(
                f"{where}: malformed manifest node: {type(exc).__name__}: {exc}"
            ) from None
        raise errors.CorruptCheckpointError(f"{where}: unknown manifest node {sorted(node)}.")

    return build(manifest["root"], ())


@dataclasses.dataclass(frozen=True)
class SavedLiteral:
    """A Python scalar the checkpoint holds where an abstract target has a scalar array.

    ``jax.eval_shape`` turns a model's Python-scalar leaves (a layer's ``epsilon``, say) into
    ``ShapeDtypeStruct``\\ s; restoring puts the saved scalar back there.

    Attributes:
        value: The saved value.
    """

    value: Any


def compare_manifests(
    saved: dict[str, Any], target: dict[str, Any]
) -> tuple[list[str], list[int | SavedLiteral]]:
    """Lists every path where a checkpoint's manifest and a restore target's differ.

    Compared: node kinds, class names, static fields, variable metadata (labels, axis names,
    user metadata; not NNX bookkeeping entries), container lengths and keys, and array shapes,
    dtypes and axis names.

    Args:
        saved: The checkpoint's manifest.
        target: The target's manifest (``encode(target, allow_abstract=True,
            lenient_static=True).manifest``).

    Returns:
        ``(problems, sources)``: one human-readable line per difference (``"path: what
        differs"``; empty if none), and for each array leaf of the target, in order, the index
        of the checkpoint array that fills it or the ``SavedLiteral`` that does.
    """
    saved_entries = saved["arrays"]
    target_entries = target["arrays"]
    problems: list[str] = []
    sources: list[int | SavedLiteral | None] = [None] * len(target_entries)
    saved_variables = dict(_variable_nodes(saved["root"]))
    target_to_saved_id: dict[int, int] = {}
    tied_checks: list[tuple[str, int | None, int]] = []

    def kind(node: Any) -> str:
        if node is None:
            return "None"
        if isinstance(node, dict) and node:
            tag = next(iter(node))
            return {"variable_ref": "variable"}.get(tag, tag)
        return "malformed"

    def describe(node: Any) -> str:
        node_kind = kind(node)
        if node_kind in ("struct", "variable") and node_kind in node:
            return f"{node_kind} {node[node_kind]}"
        return node_kind

    def walk(a: Any, b: Any, path: tuple[str, ...]) -> None:
        where = path_to_str(path)
        if (
            kind(a) == "literal"
            and kind(b) == "array"
            and target_entries[b["array"]]["shape"] == []
        ):
            sources[b["array"]] = SavedLiteral(decode_static(a["literal"], where, ()))
            return
        if kind(a) != kind(b):
            problems.append(
                f"{where}: {describe(a)} in the checkpoint, {describe(b)} in the target"
            )
            return
        node_kind = kind(a)
        if node_kind == "None":
            return
        if node_kind == "array":
            sources[b["array"]] = a["array"]
            walk_array(saved_entries[a["array"]], target_entries[b["array"]])
        elif node_kind == "literal":
            if a["literal"] != b["literal"]:
                problems.append(
                    f"{where}: value {a['literal']!r} in the checkpoint, {b['literal']!r} in the"
                    " target"
                )
        elif node_kind in ("list", "tuple"):
            if len(a[node_kind]) != len(b[node_kind]):
                problems.append(
                    f"{where}: {node_kind} of length {len(a[node_kind])} in the checkpoint,"
                    f" {len(b[node_kind])} in the target"
                )
                return
            for i, (x, y) in enumerate(zip(a[node_kind], b[node_kind])):
                walk(x, y, (*path, str(i)))
        elif node_kind in ("dict", "ordered_dict"):
            a_items = {_key_text(k): v for k, v in a[node_kind]}
            b_items = {_key_text(k): v for k, v in b[node_kind]}
            for key in a_items.keys() - b_items.keys():
                problems.append(
                    f"{path_to_str((*path, key))}: in the checkpoint, not in the target"
                )
            for key in b_items.keys() - a_items.keys():
                problems.append(
                    f"{path_to_str((*path, key))}: in the target, not in the checkpoint"
                )
            for key in a_items:
                if key in b_items:
                    walk(a_items[key], b_items[key], (*path, key))
        elif node_kind == "struct":
            if a["struct"] != b["struct"]:
                problems.append(
                    f"{where}: class {a['struct']} in the checkpoint, {b['struct']} in the target"
                )
                return
            for name in sorted(a["static"].keys() | b["static"].keys()):
                if a["static"].get(name) != b["static"].get(name):
                    problems.append(
                        f"{where}: static field {name} is {_shown(a['static'].get(name))} in the"
                        f" checkpoint, {_shown(b['static'].get(name))} in the target"
                    )
            for name in a["fields"].keys() - b["fields"].keys():
                problems.append(
                    f"{path_to_str((*path, name))}: in the checkpoint, not in the target"
                )
            for name in b["fields"].keys() - a["fields"].keys():
                problems.append(
                    f"{path_to_str((*path, name))}: in the target, not in the checkpoint"
                )
            for name in a["fields"]:
                if name in b["fields"]:
                    walk(a["fields"][name], b["fields"][name], (*path, name))
        elif node_kind == "variable":
            walk_variable(a, b, path)

    def walk_variable(a: dict, b: dict, path: tuple[str, ...]) -> None:
        where = path_to_str(path)
        if "variable_ref" in b:
            # The target ties this variable to another path; fine if the checkpoint does too.
            # Checked after the walk, once every variable of the target has been paired.
            saved_id = a.get("variable_ref", a.get("id"))
            tied_checks.append((where, saved_id, b["variable_ref"]))
            return
        if "variable_ref" in a:
            # The checkpoint shares it, the target holds a separate copy (``jax.eval_shape``
            # and ``tree_map`` untie variables): fill the copy from the shared arrays.
            a = saved_variables.get(a["variable_ref"], a)
            if "variable_ref" in a:
                problems.append(f"{where}: the checkpoint refers to an unknown variable")
                return
        target_to_saved_id[b["id"]] = a["id"]
        if a["variable"] != b["variable"]:
            problems.append(
                f"{where}: variable class {a['variable']} in the checkpoint, {b['variable']} in"
                " the target"
            )
        a_meta = {k: v for k, v in a["metadata"] if k not in _NNX_RUNTIME_METADATA}
        b_meta = {k: v for k, v in b["metadata"] if k not in _NNX_RUNTIME_METADATA}
        for key in sorted(a_meta.keys() | b_meta.keys()):
            if a_meta.get(key) != b_meta.get(key):
                what = "axis names" if key == _AXIS_NAMES_METADATA else f"metadata {key!r}"
                problems.append(
                    f"{where}: {what} {_shown(a_meta.get(key))} in the checkpoint,"
                    f" {_shown(b_meta.get(key))} in the target"
                )
        walk(a["value"], b["value"], path)

    def walk_array(a: dict, b: dict) -> None:
        where = a["path"]
        if a["shape"] != b["shape"]:
            problems.append(
                f"{where}: shape {tuple(a['shape'])} in the checkpoint, {tuple(b['shape'])} in the"
                " target"
            )
        if a["dtype"] != b["dtype"]:
            problems.append(
                f"{where}: dtype {a['dtype']} in the checkpoint, {b['dtype']} in the target"
            )
        if a["axis_names"] != b["axis_names"] and a["axis_names"] and b["axis_names"]:
            problems.append(
                f"{where}: axis names {tuple(a['axis_names'])} in the checkpoint,"
                f" {tuple(b['axis_names'])} in the target"
            )

    walk(saved["root"], target["root"], ())
    for where, saved_id, target_id in tied_checks:
        if saved_id is None or saved_id != target_to_saved_id.get(target_id):
            problems.append(
                f"{where}: the target shares this variable with another path, the checkpoint"
                " does not"
            )
    return problems, sources


def _variable_nodes(node: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every defining variable node of a manifest tree, by id."""
    if isinstance(node, dict):
        if "variable" in node and isinstance(node.get("id"), int):
            yield node["id"], node
        for value in node.values():
            yield from _variable_nodes(value)
    elif isinstance(node, list):
        for item in node:
            yield from _variable_nodes(item)


def _key_text(key_data: Any) -> str:
    return key_data if isinstance(key_data, str) else repr(key_data)


def _shown(encoded: Any) -> str:
    """A compact rendering of an encoded static value for mismatch messages."""
    if isinstance(encoded, dict) and len(encoded) == 1:
        tag, payload = next(iter(encoded.items()))
        if tag in ("function", "type", "dtype", "jnp_scalar_type", "np_scalar_type"):
            return str(payload)
        if tag in ("tuple", "list"):
            inner = ", ".join(_shown(item) for item in payload)
            return f"({inner})" if tag == "tuple" else f"[{inner}]"
    return repr(encoded)


def replace_arrays(model: Any, new_arrays: Iterator[Any]) -> Any:
    """Rebuilds ``model`` with its arrays replaced, in ``encode``'s walk order.

    Variables are rebuilt as new variables of the same class and metadata (shared variables
    stay shared); structs are rebuilt with ``from_attributes``; everything else is kept.

    Args:
        model: The model whose structure to keep (usually a restore target).
        new_arrays: One replacement per array (or ``ShapeDtypeStruct``) leaf of ``model``.

    Returns:
        The rebuilt model.
    """
    rebuilt_variables: dict[int, nnx.Variable] = {}

    def rebuild(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, nnx.Variable):
            known = rebuilt_variables.get(id(value))
            if known is None:
                known = type(value).from_metadata(
                    rebuild(value.get_raw_value()), value.get_metadata()
                )
                rebuilt_variables[id(value)] = known
            return known
        if struct.is_pytree_dataclass_type(type(value)):
            return type(value).from_attributes(
                **{
                    field.name: (
                        rebuild(value.__dict__[field.name])
                        if struct.is_pytree_node_field(field)
                        else value.__dict__[field.name]
                    )
                    for field in dataclasses.fields(value)
                }
            )
        if _is_array(value) or isinstance(value, jax.ShapeDtypeStruct):
            return next(new_arrays)
        if type(value) in (list, tuple):
            return type(value)(rebuild(item) for item in value)
        if type(value) in (dict, collections.OrderedDict):
            return type(value)((key, rebuild(item)) for key, item in value.items())
        return value

    return rebuild(model)


def shape_dtype_structs(
    entries: Iterable[ArrayEntry], shardings: Iterable[jax.sharding.Sharding]
) -> list[jax.ShapeDtypeStruct]:
    """One abstract array per entry, carrying the sharding to restore it into."""
    return [
        jax.ShapeDtypeStruct(entry.shape, np.dtype(entry.dtype), sharding=sharding)
        for entry, sharding in zip(entries, shardings)
    ]
