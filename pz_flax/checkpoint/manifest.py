"""The structure manifest: a JSON description of a model, from which it can be rebuilt.

Orbax stores arrays; it knows nothing of layer classes, static fields or axis names. The
manifest records everything else, so that a checkpoint restores to the exact model in a
process that never imported the code that built it:

* every struct (layer, ``NamedArray``, ...) by class name, with its child fields (recursively)
  and its static fields (``static_codec``);
* every variable (``Parameter``, ``StateVariable`` or any ``nnx.Variable``) by class name, with
  its NNX metadata (label, axis names, user metadata; never hooks) and its raw value; a
  variable that occurs twice in the model (tied weights) is stored once and referenced by id;
* every array as an entry of the ``arrays`` table: its path in the model, its key in the Orbax
  array tree, shape, dtype, and per-axis names when it belongs to a named array or variable;
* the format name and version, and the versions of the libraries that wrote it.

Nodes of the model tree are one-key objects: ``{"struct": name, "fields": ..., "static":
...}``, ``{"variable": name, "id": ..., "value": ..., "metadata": ...}``, ``{"variable_ref":
id}``, ``{"array": index}``, ``{"list": [...]}``, ``{"tuple": [...]}``, ``{"dict": [[key, node],
...]}``, ``{"ordered_dict": ...}``, ``{"literal": value}`` and ``null``. Each kind is one class
below (``_NodeKind``) that encodes, decodes (validating as it goes), compares against a
restore target and rebuilds around new arrays, so the four can never disagree.

A checkpoint is untrusted input. Decoding validates every node against this schema before it
builds anything from it, resolves names only through the allow-lists of ``type_registry`` and
``functions``, checks that each array reference sits where the array table says, and checks
static fields against the class's annotations; every malformed manifest is a
``CorruptCheckpointError`` naming the checkpoint and the manifest path, with a bounded message.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.metadata
import json
import math
import re
import types
import typing
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from pz_flax._compat import nnx as nnx_compat
from pz_flax.checkpoint import errors
from pz_flax.checkpoint import messages
from pz_flax.checkpoint import migrations
from pz_flax.checkpoint import static_codec
from pz_flax.checkpoint import type_registry
from pz_flax.checkpoint.static_codec import Corrupt
from pz_flax.checkpoint.static_codec import DecodeContext
from pz_flax.checkpoint.static_codec import expect
from pz_flax.checkpoint.static_codec import expect_list
from pz_flax.checkpoint.static_codec import expect_pairs
from pz_flax.core import named_axes
from pz_flax.core import struct

FORMAT_NAME = "pz_flax.checkpoint"
FORMAT_VERSION = 2
# The distributions whose versions a manifest records (``writer``).
_WRITER_DISTRIBUTIONS = ("pz_flax", "jax", "flax", "orbax-checkpoint")
_TOP_LEVEL_KEYS = {"format", "format_version", "root", "arrays"}

_AXIS_NAMES_METADATA = "axis_names"
_LABEL_METADATA = "label"
# The PRNG implementations a checkpoint may name: JAX's built-in ones, by their public names.
_PRNG_IMPLEMENTATIONS = ("threefry2x32", "rbg", "unsafe_rbg")
_MAX_NDIM = 64
_MAX_DIM = 2**62

_SAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


def _corrupt(source: str | None, problem: str) -> errors.CorruptCheckpointError:
    text = messages.bounded_text(problem, messages.MAX_MESSAGE_CHARS)
    return errors.CorruptCheckpointError(f"{source or 'The manifest'}: {text}")


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
    def from_json(cls, data: Any, where: str = "arrays") -> ArrayEntry:
        """Reads an entry back, validating every field.

        Raises:
            CorruptCheckpointError: If ``data`` is not a well-formed entry.
        """
        try:
            return cls._validated(data)
        except Corrupt as exc:
            raise _corrupt(None, f"manifest path {where}: malformed array entry: {exc}") from exc

    @classmethod
    def _validated(cls, data: Any) -> ArrayEntry:
        expect(isinstance(data, dict), "an entry is an object")
        expect(
            {"path", "key", "shape", "dtype", "axis_names", "label"}
            <= data.keys()
            <= {"path", "key", "shape", "dtype", "axis_names", "label", "prng_impl"},
            f"unexpected keys {messages.bounded_repr(sorted(data))}",
        )
        path = data["path"]
        expect(isinstance(path, str), "path is a string")
        key = expect_list(data["key"], "key")
        expect(key and all(isinstance(part, str) for part in key), "key is a list of strings")
        shape = expect_list(data["shape"], "shape")
        expect(len(shape) <= _MAX_NDIM, f"more than {_MAX_NDIM} dimensions")
        expect(
            all(type(dim) is int and 0 <= dim < _MAX_DIM for dim in shape),
            f"shape {messages.bounded_repr(shape)} is not a list of sizes",
        )
        dtype = static_codec.valid_dtype(data["dtype"])
        axis_names = data["axis_names"]
        if axis_names is not None:
            # Its length is checked against the stored array, with the shape.
            expect_list(axis_names, "axis_names")
            expect(
                all(name is None or isinstance(name, str) for name in axis_names),
                "axis names are strings or null",
            )
        label = data["label"]
        expect(label is None or isinstance(label, str), "label is a string or null")
        prng_impl = data.get("prng_impl")
        expect(
            prng_impl is None
            or (isinstance(prng_impl, str) and prng_impl in _PRNG_IMPLEMENTATIONS),
            f"unknown PRNG implementation {messages.bounded_repr(prng_impl)}",
        )
        return cls(
            path=path,
            key=tuple(key),
            shape=tuple(shape),
            dtype=dtype.name,
            axis_names=None if axis_names is None else tuple(axis_names),
            label=label,
            prng_impl=prng_impl,
        )


@functools.cache
def _prng_impls_by_dtype() -> dict[str, str]:
    """Each typed key dtype's text (``key<fry>``) and its implementation's public name.

    JAX gives no public way from a key dtype to its implementation's name, but a key made
    with each named implementation shows its dtype.
    """
    names = {}
    for impl in _PRNG_IMPLEMENTATIONS:
        try:
            names[str(jax.random.key(0, impl=impl).dtype)] = impl
        except ValueError:  # An implementation this JAX release does not have.
            continue
    return names


def is_prng_key(value: Any) -> bool:
    """Whether ``value`` (an array or ``jax.ShapeDtypeStruct``) is a typed PRNG key array."""
    return jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)


def prng_impl_name(dtype: Any, path: str) -> str:
    """The name of the PRNG implementation of typed key dtype ``dtype`` (``"threefry2x32"``).

    Raises:
        UnsupportedValueError: If it is none of JAX's built-in implementations, which are
            the ones a checkpoint can name (``path``: where the key is, for the message).
    """
    name = _prng_impls_by_dtype().get(str(dtype))
    if name is None:
        raise errors.UnsupportedValueError(
            f"{path}: cannot save a PRNG key of the implementation {dtype}: checkpoints hold"
            f" keys of JAX's built-in implementations {list(_PRNG_IMPLEMENTATIONS)} only."
        )
    return name


def path_to_str(path: tuple[str, ...]) -> str:
    """Joins a model path for messages; the root is ``"<root>"``."""
    return "/".join(path) if path else "<root>"


#### Static values ####


def encode_static(value: Any, path: str) -> Any:
    """Encodes a static field value (or variable metadata entry) as JSON (``static_codec``).

    Raises:
        UnsupportedValueError: If the value has no encoding (a lambda, an arbitrary object).
    """
    return static_codec.encode(value, path)


def decode_static(data: Any, path: str, allow_modules: Iterable[str]) -> Any:
    """Turns a value encoded by ``encode_static`` back into a Python value, validating it.

    Raises:
        CorruptCheckpointError: If ``data`` is not a valid encoding.
        UntrustedTypeError: If it names a class or function outside the allow-lists.
    """
    context = DecodeContext(tuple(allow_modules), path, "static")
    try:
        return static_codec.decode(data, context)
    except Corrupt as exc:
        raise _corrupt(None, f"{context.where()}: {exc}") from exc


#### Reading manifests ####


def _refuse_constant(name: str) -> Any:
    raise Corrupt(f"the manifest holds the non-JSON constant {name}")


def _bounded_int(text: str) -> int:
    expect(len(text) <= static_codec.MAX_INT_DIGITS, "the manifest holds an over-long integer")
    return int(text)


def parse_manifest_json(text: str | bytes, source: str) -> Any:
    """Parses a manifest file's contents (UTF-8), refusing what strict JSON refuses.

    ``NaN``/``Infinity`` constants, integers longer than ``static_codec.MAX_INT_DIGITS``
    digits and nesting deep enough to exhaust the parser are all damage, not data.

    Raises:
        CorruptCheckpointError: If ``text`` is not such JSON; names ``source``.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, parse_constant=_refuse_constant, parse_int=_bounded_int)
    except Corrupt as exc:
        raise _corrupt(source, f"the manifest is damaged ({exc}).") from exc
    except RecursionError as exc:
        raise _corrupt(source, "the manifest is damaged (nested too deeply).") from exc
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors.
        raise _corrupt(
            source, f"the manifest is damaged (not valid JSON: {messages.bounded_text(str(exc))})."
        ) from exc


@functools.cache
def _writer_versions() -> dict[str, str]:
    versions = {}
    for distribution in _WRITER_DISTRIBUTIONS:
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[distribution] = "unknown"
    return versions


def _current(manifest: Any, source: str | None) -> dict[str, Any]:
    """The manifest checked to be a pz_flax manifest, migrated to the current format."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise _corrupt(
            source, f"not a pz_flax checkpoint manifest (its 'format' is not {FORMAT_NAME!r})."
        )
    version = manifest.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise _corrupt(
            source,
            f"manifest format version {messages.bounded_repr(version)}; this pz_flax reads"
            f" versions 1 to {FORMAT_VERSION}. Upgrade pz_flax to read a newer one.",
        )
    allowed_keys = _TOP_LEVEL_KEYS | ({"writer"} if version >= 2 else set())
    if not _TOP_LEVEL_KEYS <= manifest.keys() <= allowed_keys:
        raise _corrupt(
            source,
            f"the manifest has the entries {messages.bounded_repr(sorted(manifest))}; expected"
            f" {sorted(allowed_keys)}.",
        )
    if not isinstance(manifest["arrays"], list):
        raise _corrupt(source, "manifest path arrays: the array table is not a list.")
    try:
        return migrations.upgrade(manifest, FORMAT_VERSION)
    except Corrupt as exc:
        raise _corrupt(source, f"format-{version} manifest: {exc}") from exc


def read_entries(manifest: Any, source: str | None = None) -> list[ArrayEntry]:
    """Checks a manifest's header and array table, and returns the table.

    Args:
        manifest: The parsed manifest.
        source: The manifest file, for messages.

    Raises:
        CorruptCheckpointError: If the manifest is not a pz_flax manifest this version reads,
            or its array table is malformed.
    """
    manifest = _current(manifest, source)
    entries = []
    keys: set[tuple[str, ...]] = set()
    for i, item in enumerate(manifest["arrays"]):
        try:
            entry = ArrayEntry._validated(item)
            expect(entry.key not in keys, f"the key {messages.bounded_repr(entry.key)} repeats")
        except Corrupt as exc:
            raise _corrupt(
                source, f"manifest path arrays/{i}: malformed array entry: {exc}"
            ) from exc
        keys.add(entry.key)
        entries.append(entry)
    return entries


#### Field annotations ####


def _fits(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits the annotation ``hint``; None when the hint is not checked.

    Only the annotations a hostile checkpoint could abuse with a value of the wrong kind are
    checked (numbers, strings, booleans, callables, and tuples and unions of those); anything
    else is left to the class.
    """
    if hint is float:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, bool
        )
    if hint is int:
        return isinstance(value, (int, np.integer))
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if hint is Callable or origin is Callable:
        return callable(value)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_fits(value, option) for option in typing.get_args(hint)]
        if True in verdicts:
            return True
        return None if None in verdicts else False
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            verdicts = [_fits(item, args[0]) for item in value]
        elif args and len(args) == len(value):
            verdicts = [_fits(item, arg) for item, arg in zip(value, args)]
        else:
            return None if not args else False
        return False if False in verdicts else None
    if isinstance(hint, type) and origin is None:
        try:
            return isinstance(value, hint)
        except TypeError:  # A protocol or other class that isinstance cannot check.
            return None
    return None


_HINTS_CACHE: dict[type, dict[str, Any] | None] = {}


def _field_hints(cls: type) -> dict[str, Any] | None:
    if cls not in _HINTS_CACHE:
        try:
            _HINTS_CACHE[cls] = typing.get_type_hints(cls)
        except Exception:  # Unresolvable annotations: the class is not checked.
            _HINTS_CACHE[cls] = None
    return _HINTS_CACHE[cls]


def _check_field_types(cls: type, values: dict[str, Any]) -> None:
    """Refuses field values of the wrong kind (a function or string in a float slot)."""
    hints = _field_hints(cls) or {}
    for name, value in values.items():
        if name not in hints or _is_array(value) or isinstance(value, jax.ShapeDtypeStruct):
            continue
        if _fits(value, hints[name]) is False:
            raise Corrupt(
                f"field {name} of {cls.__qualname__} holds {messages.bounded_repr(value)}, which"
                f" does not fit its annotation {messages.bounded_repr(hints[name])}"
            )


#### Model trees ####


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))


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
        manifest: The JSON-compatible manifest (``format``, ``format_version``, ``writer``,
            ``root``, ``arrays``).
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


@dataclasses.dataclass(frozen=True)
class SavedLiteral:
    """A Python scalar the checkpoint holds where an abstract target has a scalar array.

    ``jax.eval_shape`` turns a model's Python-scalar leaves (a layer's ``epsilon``, say) into
    ``ShapeDtypeStruct``\\ s; restoring puts the saved scalar back there.

    Attributes:
        value: The saved value.
    """

    value: Any


class _Located(Corrupt):
    """A ``Corrupt`` that already says where in the model and the manifest it is."""


class _NodeKind:
    """One kind of model-tree node: the one place that encodes, decodes, compares, rebuilds.

    Attributes:
        tags: The JSON keys naming the kind (``"variable"`` and ``"variable_ref"``, say).
    """

    tags: tuple[str, ...] = ()

    def takes(self, value: Any, encoder: _Encoder) -> bool:
        """Whether a Python value is of this kind."""
        raise NotImplementedError

    def encode(self, encoder: _Encoder, value: Any, path: tuple[str, ...], hint: Any) -> Any:
        """The manifest node for ``value`` (``hint``: axis names, label of an array)."""
        raise NotImplementedError

    def decode(self, decoder: _Decoder, data: dict, path: tuple[str, ...], at: str) -> Any:
        """The value for a manifest node, validated; raises ``Corrupt`` if malformed."""
        raise NotImplementedError

    def compare(self, comparer: _Comparer, a: dict, b: dict, path: tuple[str, ...]) -> None:
        """Records in ``comparer`` how checkpoint node ``a`` differs from target node ``b``."""
        raise NotImplementedError

    def rebuild(self, rebuilder: _Rebuilder, value: Any) -> Any:
        """``value`` rebuilt around the rebuilder's new arrays."""
        raise NotImplementedError


class _ArrayKind(_NodeKind):
    tags = ("array",)

    def takes(self, value, encoder):
        return _is_array(value) or (
            encoder.allow_abstract and isinstance(value, jax.ShapeDtypeStruct)
        )

    def encode(self, encoder, value, path, hint):
        axis_names, label = hint or (None, None)
        index = len(encoder.arrays)
        prng_impl = None
        if is_prng_key(value):
            # Orbax stores plain arrays: keep the key data, and the implementation to rewrap.
            prng_impl = prng_impl_name(value.dtype, path_to_str(path))
            if isinstance(value, jax.ShapeDtypeStruct):
                value = jax.eval_shape(jax.random.key_data, value)
            else:
                value = jax.random.key_data(value)
            axis_names = None
        encoder.arrays.append(value)
        shape = tuple(int(dim) for dim in value.shape)
        if axis_names is not None and len(axis_names) != len(shape):
            axis_names = None
        encoder.entries.append(
            ArrayEntry(
                path=path_to_str(path),
                key=encoder.array_key(path),
                shape=shape,
                dtype=np.dtype(value.dtype).name,
                axis_names=axis_names,
                label=label,
                prng_impl=prng_impl,
            )
        )
        return {"array": index}

    def decode(self, decoder, data, path, at):
        expect(data.keys() == {"array"}, "an array node has only the key 'array'")
        index = data["array"]
        expect(
            type(index) is int and 0 <= index < len(decoder.entries),
            f"array index {messages.bounded_repr(index)} is not in the array table",
        )
        entry = decoder.entries[index]
        expect(index not in decoder.used_arrays, f"array {index} is referenced twice")
        expect(
            entry.path == path_to_str(path),
            f"the array table puts array {index} at {messages.bounded_text(entry.path)}, not"
            " here (swapped array references?)",
        )
        decoder.used_arrays.add(index)
        if decoder.arrays is None:
            return jax.ShapeDtypeStruct(entry.shape, np.dtype(entry.dtype))
        return decoder.arrays[index]

    def compare(self, comparer, a, b, path):
        comparer.sources[b["array"]] = a["array"]
        saved = comparer.saved_entries[a["array"]]
        target = comparer.target_entries[b["array"]]
        where = saved.path
        if saved.shape != target.shape:
            comparer.problem(
                f"{where}: shape {saved.shape} in the checkpoint, {target.shape} in the target"
            )
        if saved.dtype != target.dtype:
            comparer.problem(
                f"{where}: dtype {saved.dtype} in the checkpoint, {target.dtype} in the target"
            )
        if saved.axis_names != target.axis_names and saved.axis_names and target.axis_names:
            comparer.problem(
                f"{where}: axis names {saved.axis_names} in the checkpoint,"
                f" {target.axis_names} in the target"
            )

    def rebuild(self, rebuilder, value):
        return next(rebuilder.new_arrays)


class _LiteralKind(_NodeKind):
    tags = ("literal",)
    _TYPES = (bool, int, float, str, np.generic)

    def takes(self, value, encoder):
        return isinstance(value, self._TYPES) and not isinstance(value, complex)

    def encode(self, encoder, value, path, hint):
        return {"literal": encoder.static(value, path_to_str(path))}

    def decode(self, decoder, data, path, at):
        expect(data.keys() == {"literal"}, "a literal node has only the key 'literal'")
        value = static_codec.decode(data["literal"], decoder.context(path, f"{at}/literal"))
        expect(isinstance(value, self._TYPES), "a literal is a boolean, number, string or scalar")
        return value

    def compare(self, comparer, a, b, path):
        if a["literal"] != b["literal"]:
            comparer.problem(
                f"{path_to_str(path)}: value {_shown(a['literal'])} in the checkpoint,"
                f" {_shown(b['literal'])} in the target"
            )

    def rebuild(self, rebuilder, value):
        return value


class _SequenceKind(_NodeKind):
    tags = ("list", "tuple")

    def takes(self, value, encoder):
        return type(value) in (list, tuple)

    def encode(self, encoder, value, path, hint):
        return {
            type(value).__name__: [
                encoder.node(item, (*path, str(i))) for i, item in enumerate(value)
            ]
        }

    def decode(self, decoder, data, path, at):
        tag = next(iter(data))
        expect(data.keys() == {tag}, f"a {tag} node has only the key {tag!r}")
        items = expect_list(data[tag], f"a {tag} node")
        built = [
            decoder.node(item, (*path, str(i)), f"{at}/{tag}/{i}") for i, item in enumerate(items)
        ]
        return built if tag == "list" else tuple(built)

    def compare(self, comparer, a, b, path):
        tag = next(iter(a))
        if len(a[tag]) != len(b[tag]):
            comparer.problem(
                f"{path_to_str(path)}: {tag} of length {len(a[tag])} in the checkpoint,"
                f" {len(b[tag])} in the target"
            )
            return
        for i, (x, y) in enumerate(zip(a[tag], b[tag])):
            comparer.walk(x, y, (*path, str(i)))

    def rebuild(self, rebuilder, value):
        return type(value)(rebuilder.rebuild(item) for item in value)


class _MappingKind(_NodeKind):
    tags = ("dict", "ordered_dict")

    def takes(self, value, encoder):
        return type(value) in (dict, collections.OrderedDict)

    def encode(self, encoder, value, path, hint):
        where = path_to_str(path)
        return {
            "dict" if type(value) is dict else "ordered_dict": [
                [encoder.static(key, where), encoder.node(item, (*path, str(key)))]
                for key, item in value.items()
            ]
        }

    def decode(self, decoder, data, path, at):
        tag = next(iter(data))
        expect(data.keys() == {tag}, f"a {tag} node has only the key {tag!r}")
        items = []
        for i, (key_data, item) in enumerate(expect_pairs(data[tag], f"a {tag} node")):
            key = static_codec.decode(key_data, decoder.context(path, f"{at}/{tag}/{i}/0"))
            try:
                hash(key)
            except TypeError as exc:
                raise Corrupt(f"the {tag} key {messages.bounded_repr(key)} is unhashable") from exc
            items.append((key, decoder.node(item, (*path, str(key)), f"{at}/{tag}/{i}/1")))
        expect(len(dict(items)) == len(items), f"a {tag} node repeats a key")
        return dict(items) if tag == "dict" else collections.OrderedDict(items)

    def compare(self, comparer, a, b, path):
        tag = next(iter(a))
        comparer.walk_named(
            {_key_text(k): v for k, v in a[tag]}, {_key_text(k): v for k, v in b[tag]}, path
        )

    def rebuild(self, rebuilder, value):
        return type(value)((key, rebuilder.rebuild(item)) for key, item in value.items())


class _VariableKind(_NodeKind):
    tags = ("variable", "variable_ref")

    def takes(self, value, encoder):
        return isinstance(value, nnx.Variable)

    def encode(self, encoder, variable, path, hint):
        where = path_to_str(path)
        known_id = encoder.variable_ids.get(id(variable))
        if known_id is not None:
            return {"variable_ref": known_id}
        variable_id = len(encoder.variable_ids)
        encoder.variable_ids[id(variable)] = variable_id
        metadata = variable.get_metadata()
        raw_value = variable.get_raw_value()
        label = metadata.get(_LABEL_METADATA)
        label_text = None if label is None else (label if isinstance(label, str) else repr(label))
        if encoder.lenient_static:
            encoded_metadata = [
                [key, encoder.static(entry, f"{where} (metadata {key})")]
                for key, entry in metadata.items()
            ]
        else:
            encoded_metadata = static_codec.encode_variable_metadata(metadata, where)
        return {
            "variable": type_registry.qualified_name(
                type(variable), what="variable class", path=where
            ),
            "id": variable_id,
            "value": encoder.node(
                raw_value, path, (_variable_axis_names(metadata, raw_value), label_text)
            ),
            "metadata": encoded_metadata,
        }

    def decode(self, decoder, data, path, at):
        if "variable_ref" in data:
            expect(data.keys() == {"variable_ref"}, "a variable reference has one key")
            variable = (
                decoder.variables.get(data["variable_ref"])
                if type(data["variable_ref"]) is int
                else None
            )
            expect(variable is not None, "the variable reference names no earlier variable")
            return variable
        expect(
            data.keys() == {"variable", "id", "value", "metadata"},
            f"a variable node has the keys variable, id, value and metadata, not"
            f" {messages.bounded_repr(sorted(data))}",
        )
        variable_id = data["id"]
        expect(
            type(variable_id) is int and variable_id not in decoder.variables,
            "a variable id is an integer used once",
        )
        context = decoder.context(path, at)
        cls = context.resolve(data["variable"], "variable")
        static_codec.check_variable_class(cls)
        metadata = static_codec.decode_variable_metadata(data["metadata"], context.at("metadata"))
        value = decoder.node(data["value"], path, f"{at}/value")
        _check_variable_metadata(metadata, value)
        variable = static_codec.build_variable(cls, value, metadata)
        decoder.variables[variable_id] = variable
        return variable

    def compare(self, comparer, a, b, path):
        where = path_to_str(path)
        if "variable_ref" in b:
            # The target ties this variable to another path; fine if the checkpoint does too.
            # Checked after the walk, once every variable of the target has been paired.
            comparer.tied_checks.append((where, a.get("variable_ref", a.get("id")), b))
            return
        if "variable_ref" in a:
            # The checkpoint shares it, the target holds a separate copy (``jax.eval_shape``
            # and ``tree_map`` untie variables): fill the copy from the shared arrays.
            a = comparer.saved_variables[a["variable_ref"]]
        comparer.target_to_saved_id[b["id"]] = a["id"]
        if a["variable"] != b["variable"]:
            comparer.problem(
                f"{where}: variable class {a['variable']} in the checkpoint, {b['variable']} in"
                " the target"
            )
        # NNX's own entries (its switches, sharding annotations) are saved, so that a variable
        # is rebuilt exactly, but not compared: they say how NNX handles the variable in this
        # process, not what the checkpoint holds.
        nnx_keys = nnx_compat.nnx_metadata_keys().all
        a_meta = {k: v for k, v in a["metadata"] if k not in nnx_keys}
        b_meta = {k: v for k, v in b["metadata"] if k not in nnx_keys}
        for key in sorted(a_meta.keys() | b_meta.keys()):
            if a_meta.get(key) != b_meta.get(key):
                what = "axis names" if key == _AXIS_NAMES_METADATA else f"metadata {key!r}"
                comparer.problem(
                    f"{where}: {what} {_shown(a_meta.get(key))} in the checkpoint,"
                    f" {_shown(b_meta.get(key))} in the target"
                )
        comparer.walk(a["value"], b["value"], path)

    def rebuild(self, rebuilder, variable):
        known = rebuilder.variables.get(id(variable))
        if known is None:
            known = type(variable).from_metadata(
                rebuilder.rebuild(variable.get_raw_value()), variable.get_metadata()
            )
            rebuilder.variables[id(variable)] = known
        return known


# Encoded values of a field a class no longer has that restoring may drop: an unset option.
_EMPTY_STATIC_VALUES = (None, {"tuple": []}, {"list": []}, {"dict": []})


@functools.cache
def _field_layout(cls: type) -> tuple[tuple[dataclasses.Field, ...], frozenset, frozenset]:
    """A struct class's fields, and the names of its child and of its static fields."""
    fields = dataclasses.fields(cls)
    node_fields = frozenset(field.name for field in fields if struct.is_pytree_node_field(field))
    return fields, node_fields, frozenset(field.name for field in fields) - node_fields


def _matched_fields(
    cls: type, children: dict[str, Any], static: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Pairs a struct node's fields with the class's, as the class has evolved since.

    A field the class has gained since the checkpoint was written takes its default; a
    static field it has lost is dropped if the checkpoint left it unset (empty or None).
    Anything else (a missing field without a default, a lost field that was set, a child
    saved as static or the reverse) is refused.

    Returns:
        ``(children, static, defaults)``: the node's child and static fields to decode, and
        the default values of fields the checkpoint lacks.
    """
    fields, node_fields, static_fields = _field_layout(cls)
    lost = {
        name: value
        for name, value in static.items()
        if name not in static_fields and name not in node_fields
    }
    expect(
        all(value in _EMPTY_STATIC_VALUES for value in lost.values()),
        f"the checkpoint sets the static fields {messages.bounded_repr(sorted(lost))}, which"
        f" {cls.__qualname__} no longer has",
    )
    static = {name: value for name, value in static.items() if name not in lost}
    defaults = {}
    for field in fields:
        if field.name in children or field.name in static:
            continue
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    expect(
        children.keys() | defaults.keys() >= node_fields
        and static.keys() | defaults.keys() >= static_fields
        and children.keys() <= node_fields
        and static.keys() <= static_fields,
        f"the checkpoint gives {cls.__qualname__} the fields"
        f" {messages.bounded_repr(sorted(children))} and static fields"
        f" {messages.bounded_repr(sorted(static))}, but the class has {sorted(node_fields)}"
        f" and {sorted(static_fields)}",
    )
    return children, static, defaults


def _check_variable_metadata(metadata: dict[str, Any], value: Any) -> None:
    """Refuses axis names that cannot describe the variable's value."""
    names = metadata.get(_AXIS_NAMES_METADATA)
    if names is None:
        return
    ndim = len(getattr(value, "shape", ()))
    expect(
        isinstance(names, tuple)
        and len(names) <= ndim
        and all(isinstance(name, str) for name in names)
        and len(set(names)) == len(names),
        f"the axis names {messages.bounded_repr(names)} do not fit a value of {ndim} axes",
    )


class _StructKind(_NodeKind):
    tags = ("struct",)

    def takes(self, value, encoder):
        return struct.is_pytree_dataclass_type(type(value))

    def encode(self, encoder, value, path, hint):
        where = path_to_str(path)
        fields: dict[str, Any] = {}
        static: dict[str, Any] = {}
        axis_names = (
            value.data_axis_names() if isinstance(value, named_axes.NamedArrayBase) else None
        )
        for field in dataclasses.fields(value):
            field_value = value.__dict__[field.name]
            if struct.is_pytree_node_field(field):
                array_hint = (axis_names, None) if field.name == "data_array" else None
                fields[field.name] = encoder.node(field_value, (*path, field.name), array_hint)
            else:
                static[field.name] = encoder.static(field_value, f"{where} (field {field.name})")
        return {
            "struct": type_registry.qualified_name(type(value), what="class", path=where),
            "fields": fields,
            "static": static,
        }

    def decode(self, decoder, data, path, at):
        expect(
            data.keys() == {"struct", "fields", "static"},
            "a struct node has the keys struct, fields and static",
        )
        context = decoder.context(path, at)
        cls = context.resolve(data["struct"], "struct")
        children, static = data["fields"], data["static"]
        expect(isinstance(children, dict) and isinstance(static, dict), "fields are objects")
        children, static, defaults = _matched_fields(cls, children, static)
        values = {
            name: decoder.node(child, (*path, name), f"{at}/fields/{name}")
            for name, child in children.items()
        }
        for name, entry in static.items():
            values[name] = static_codec.decode(entry, context.at("static", name))
        values.update(defaults)
        _check_field_types(cls, values)
        built = cls.from_attributes(**values)
        if isinstance(built, named_axes.NamedArrayBase):
            try:
                built.check_valid()
            except ValueError as exc:  # Axis names that do not fit the array.
                raise Corrupt(f"an invalid named array: {exc}") from exc
        return built

    def compare(self, comparer, a, b, path):
        where = path_to_str(path)
        if a["struct"] != b["struct"]:
            comparer.problem(
                f"{where}: class {a['struct']} in the checkpoint, {b['struct']} in the target"
            )
            return
        for name in sorted(a["static"].keys() | b["static"].keys()):
            if a["static"].get(name) != b["static"].get(name):
                comparer.problem(
                    f"{where}: static field {name} is {_shown(a['static'].get(name))} in the"
                    f" checkpoint, {_shown(b['static'].get(name))} in the target"
                )
        comparer.walk_named(a["fields"], b["fields"], path)

    def rebuild(self, rebuilder, value):
        return type(value).from_attributes(
            **{
                field.name: (
                    rebuilder.rebuild(value.__dict__[field.name])
                    if struct.is_pytree_node_field(field)
                    else value.__dict__[field.name]
                )
                for field in dataclasses.fields(value)
            }
        )


# In encoding order: variables before structs (a variable is no struct), structs before
# literals.
_NODE_KINDS: tuple[_NodeKind, ...] = (
    _VariableKind(),
    _StructKind(),
    _ArrayKind(),
    _LiteralKind(),
    _SequenceKind(),
    _MappingKind(),
)
_NODE_KINDS_BY_TAG = {tag: kind for kind in _NODE_KINDS for tag in kind.tags}


def _node_kind(data: Any) -> _NodeKind | None:
    if isinstance(data, dict) and data:
        return _NODE_KINDS_BY_TAG.get(next(iter(data)))
    return None


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
            return static_codec.encode(value, path)
        except errors.UnsupportedValueError:
            if not self.lenient_static:
                raise
            # Comparing against a target: an unencodable value simply never matches.
            return {"unencodable": messages.bounded_repr(value)}

    def array_key(self, path: tuple[str, ...]) -> tuple[str, ...]:
        key = tuple(_SAFE_KEY_CHARS.sub("_", part) or "_" for part in path) or ("root",)
        unique, counter = key, 1
        while unique in self.used_keys:
            unique = (*key[:-1], f"{key[-1]}~{counter}")
            counter += 1
        self.used_keys.add(unique)
        return unique

    def node(self, value: Any, path: tuple[str, ...], hint: Any = None) -> Any:
        if value is None:
            return None
        for kind in _NODE_KINDS:
            if kind.takes(value, self):
                return kind.encode(self, value, path, hint)
        where = path_to_str(path)
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
        UnsupportedValueError: If some value cannot be described (a lambda, an NNX variable
            hook); the message names its path.
    """
    encoder = _Encoder(allow_abstract=allow_abstract, lenient_static=lenient_static)
    root = encoder.node(model, ())
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "writer": _writer_versions(),
        "root": root,
        "arrays": [entry.to_json() for entry in encoder.entries],
    }
    return EncodedModel(manifest=manifest, entries=encoder.entries, arrays=encoder.arrays)


class _Decoder:
    """Walks a manifest tree once, validating each node and building its value."""

    def __init__(self, entries: list[ArrayEntry], arrays: list[Any] | None, allow_modules):
        self.entries = entries
        self.arrays = arrays
        self.allow_modules = tuple(allow_modules)
        self.variables: dict[int, nnx.Variable] = {}
        self.used_arrays: set[int] = set()

    def context(self, path: tuple[str, ...], at: str) -> DecodeContext:
        return DecodeContext(self.allow_modules, path_to_str(path), at, depth=len(path))

    def node(self, data: Any, path: tuple[str, ...], at: str) -> Any:
        if data is None:
            return None
        try:
            expect(len(path) < static_codec.MAX_DEPTH, "the model is nested too deeply")
            kind = _node_kind(data)
            if kind is None:
                raise Corrupt(f"malformed model node {messages.bounded_repr(data)}")
            return kind.decode(self, data, path, at)
        except _Located:
            raise
        except Corrupt as exc:
            # Only what validation found: any other exception is a pz_flax bug (or a library
            # change), and surfaces as itself rather than as a damaged checkpoint.
            raise _Located(
                f"{messages.bounded_text(path_to_str(path))}: {messages.bounded_text(str(exc), 600)}"
                f" (manifest path {messages.bounded_text(at)})"
            ) from exc


def decode(
    manifest: dict[str, Any],
    arrays: list[Any] | None,
    *,
    allow_modules: Iterable[str],
    source: str | None = None,
) -> Any:
    """Validates a manifest and rebuilds its model, without running any ``__init__``.

    Args:
        manifest: A manifest (read back from JSON), of this format or an older one.
        arrays: The arrays, in the order of the manifest's array table; or None to validate
            only (arrays are then ``jax.ShapeDtypeStruct`` placeholders). A list of Nones is
            taken as None.
        allow_modules: Modules whose classes and functions may be resolved, beyond the
            allow-lists.
        source: The manifest file, for messages.

    Returns:
        The model.

    Raises:
        UntrustedTypeError: If the manifest names a class or function outside the allow-lists.
        CorruptCheckpointError: If the manifest is malformed (names the checkpoint and the
            manifest path).
    """
    entries = read_entries(manifest, source)
    manifest = _current(manifest, source)
    if arrays is not None and all(array is None for array in arrays):
        arrays = None
    decoder = _Decoder(entries, arrays, allow_modules)
    try:
        model = decoder.node(manifest["root"], (), "root")
        unused = sorted(set(range(len(entries))) - decoder.used_arrays)
        expect(not unused, f"the array table lists arrays the model never uses: {unused[:5]}")
    except Corrupt as exc:
        raise _corrupt(source, str(exc)) from exc
    except (errors.CorruptCheckpointError, errors.UntrustedTypeError) as exc:
        # Raised by name resolution, which knows the model path but not the checkpoint.
        if source is None:
            raise
        raise type(exc)(f"{source}: {exc}") from exc
    return model


class _Comparer:
    """Walks a checkpoint's manifest and a target's side by side, listing differences."""

    def __init__(
        self, saved: dict[str, Any], target: dict[str, Any], saved_entries, target_entries
    ):
        self.saved_entries = saved_entries
        self.target_entries = target_entries
        self.problems: list[str] = []
        self.sources: list[int | SavedLiteral | None] = [None] * len(target_entries)
        self.saved_variables = dict(_variable_nodes(saved["root"]))
        self.target_to_saved_id: dict[int, int] = {}
        self.tied_checks: list[tuple[str, int | None, dict]] = []

    def problem(self, line: str) -> None:
        self.problems.append(messages.bounded_text(line, messages.MAX_MESSAGE_CHARS // 4))

    def walk(self, a: Any, b: Any, path: tuple[str, ...]) -> None:
        a_kind, b_kind = _node_kind(a), _node_kind(b)
        if isinstance(a_kind, _LiteralKind) and isinstance(b_kind, _ArrayKind):
            target = self.target_entries[b["array"]]
            literal = a["literal"]
            if target.shape == () and _literal_fits(literal, target.dtype):
                self.sources[b["array"]] = SavedLiteral(literal)
                return
        if a_kind is not b_kind or (a is None) != (b is None):
            self.problem(
                f"{path_to_str(path)}: {_describe(a)} in the checkpoint, {_describe(b)} in the"
                " target"
            )
            return
        if a is None:
            return
        if next(iter(a)) != next(iter(b)) and not isinstance(a_kind, _VariableKind):
            self.problem(
                f"{path_to_str(path)}: {next(iter(a))} in the checkpoint, {next(iter(b))} in the"
                " target"
            )
            return
        a_kind.compare(self, a, b, path)

    def walk_named(self, a: dict[str, Any], b: dict[str, Any], path: tuple[str, ...]) -> None:
        """Compares two name-to-node maps (struct fields, dict items)."""
        for key in a.keys() - b.keys():
            self.problem(f"{path_to_str((*path, key))}: in the checkpoint, not in the target")
        for key in b.keys() - a.keys():
            self.problem(f"{path_to_str((*path, key))}: in the target, not in the checkpoint")
        for key in a:
            if key in b:
                self.walk(a[key], b[key], (*path, key))


def _literal_fits(literal: Any, dtype: str) -> bool:
    """Whether a saved Python scalar may fill a target's scalar array of ``dtype``."""
    kind = np.dtype(dtype).kind
    if isinstance(literal, bool):
        return kind == "b"
    if isinstance(literal, int):
        return kind in "iuf"
    return isinstance(literal, float) and kind == "f"


def compare_manifests(
    saved: dict[str, Any], target: dict[str, Any], source: str | None = None
) -> tuple[list[str], list[int | SavedLiteral]]:
    """Lists every path where a checkpoint's manifest and a restore target's differ.

    Compared: node kinds, class names, static fields, variable metadata (labels, axis names,
    user metadata; not NNX bookkeeping entries), container lengths and keys, and array shapes,
    dtypes and axis names. The checkpoint's manifest is validated first (with placeholders
    for its arrays), so a malformed one is a ``CorruptCheckpointError``, never a crash.

    Args:
        saved: The checkpoint's manifest.
        target: The target's manifest (``encode(target, allow_abstract=True,
            lenient_static=True).manifest``).
        source: The checkpoint's manifest file, for messages.

    Returns:
        ``(problems, sources)``: one human-readable line per difference (``"path: what
        differs"``; empty if none), and for each array leaf of the target, in order, the index
        of the checkpoint array that fills it or the ``SavedLiteral`` that does.

    Raises:
        CorruptCheckpointError: If ``saved`` is malformed.
    """
    # Validation resolves names only as far as the target has them: the target's classes are
    # the ones restored, so a checkpoint naming classes of modules not allowed still compares.
    saved_entries = read_entries(saved, source)
    saved = _current(saved, source)
    _validate_for_comparison(saved, target, source)
    comparer = _Comparer(saved, target, saved_entries, read_entries(target))
    comparer.walk(saved["root"], target["root"], ())
    for where, saved_id, target_node in comparer.tied_checks:
        if saved_id is None or saved_id != comparer.target_to_saved_id.get(
            target_node["variable_ref"]
        ):
            comparer.problem(
                f"{where}: the target shares this variable with another path, the checkpoint"
                " does not"
            )
    return comparer.problems, comparer.sources


_NAMING_TAGS = frozenset(
    {"struct", "variable", "type", "function", "enum", "dataclass", "namedtuple", "nnx_module"}
)


def _modules_named_in(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The modules of every class and function a (target's) manifest names."""
    modules: set[str] = set()
    pending = [manifest]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if key in _NAMING_TAGS and isinstance(item, str):
                    modules.add(item.partition(":")[0])
                pending.append(item)
        elif isinstance(value, list):
            pending.extend(value)
    return tuple(sorted(modules))


def _validate_for_comparison(saved, target, source) -> None:
    """Validates the checkpoint's manifest, trusting what the target itself names.

    The restored model takes its classes and static values from the target, so a checkpoint
    of a user's model restores into it without ``allow_modules``; the validation pass only
    builds (and drops) objects, it never calls them.
    """
    decode(saved, None, allow_modules=_modules_named_in(target), source=source)


def _variable_nodes(node: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every defining variable node of a (validated) manifest tree, by id."""
    pending = [node]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            if "variable" in value and type(value.get("id")) is int and "metadata" in value:
                yield value["id"], value
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


def _key_text(key_data: Any) -> str:
    return key_data if isinstance(key_data, str) else repr(key_data)


def _describe(node: Any) -> str:
    """A node's kind (and class) for mismatch messages."""
    if node is None:
        return "None"
    kind = _node_kind(node)
    tag = next(iter(node))
    if isinstance(kind, (_StructKind, _VariableKind)) and isinstance(node.get(tag), str):
        return f"{tag} {messages.bounded_text(node[tag])}"
    return "variable" if tag == "variable_ref" else tag


def _shown(encoded: Any) -> str:
    """A compact, bounded rendering of an encoded static value for mismatch messages."""
    if isinstance(encoded, dict) and len(encoded) == 1:
        tag, payload = next(iter(encoded.items()))
        if tag in ("function", "type", "dtype", "jnp_scalar_type", "np_scalar_type"):
            return messages.bounded_text(str(payload))
        if tag in ("tuple", "list") and isinstance(payload, list):
            inner = ", ".join(_shown(item) for item in payload[:10])
            inner += ", ..." if len(payload) > 10 else ""
            return messages.bounded_text(f"({inner})" if tag == "tuple" else f"[{inner}]")
        if tag == "nnx_module":
            return f"<NNX module {messages.bounded_text(str(payload))}>"
    return messages.bounded_repr(encoded)


class _Rebuilder:
    def __init__(self, new_arrays: Iterator[Any]):
        self.new_arrays = new_arrays
        self.variables: dict[int, nnx.Variable] = {}
        self.encoder = _Encoder(allow_abstract=True, lenient_static=True)

    def rebuild(self, value: Any) -> Any:
        if value is None:
            return None
        for kind in _NODE_KINDS:
            if kind.takes(value, self.encoder):
                return kind.rebuild(self, value)
        return value


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
    return _Rebuilder(new_arrays).rebuild(model)


def shape_dtype_structs(
    entries: Iterable[ArrayEntry], shardings: Iterable[jax.sharding.Sharding]
) -> list[jax.ShapeDtypeStruct]:
    """One abstract array per entry, carrying the sharding to restore it into."""
    return [
        jax.ShapeDtypeStruct(entry.shape, np.dtype(entry.dtype), sharding=sharding)
        for entry, sharding in zip(entries, shardings)
    ]
