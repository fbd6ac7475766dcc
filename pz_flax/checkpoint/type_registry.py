"""Naming classes and functions in a checkpoint, and resolving those names safely.

A structure manifest refers to the classes of a model's layers (and to the functions and
types held in static fields, like ``jax.nn.relu`` or ``jnp.bfloat16``) by qualified name,
written ``"module:qualname"``. Resolving such a name means importing a module and reading
an attribute, which is exactly what an attacker who controls a checkpoint would like us to
do with a module of their choosing. So resolution is an allow-list, checked *before* any
import:

* pz_flax's own modules (``pz_flax`` and its submodules);
* classes and functions registered explicitly with ``register_type``;
* modules the caller lists in ``allow_modules`` (and their submodules);
* for everything but layer (struct) classes: a few namespaces of the libraries pz_flax
  depends on (``jax.nn``, ``jax.numpy``, ``jax.lax``, ``flax.nnx``, ``optax``, ``math``, ...;
  see ``_TRUSTED_LIBRARIES``), minus names that suggest I/O or host callbacks.

Names outside the list raise ``UntrustedTypeError`` naming the class and the
``allow_modules`` entry that would admit it. Even inside the list, the object found must be
of the expected kind (a ``pytree_dataclass`` for a layer, an ``nnx.Variable`` subclass for a
variable, ...) and must really live where the name says, so a trusted module cannot be used
as a stepping stone to an object of another module (``pz_flax.x:os.system``).
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterable
from typing import Any
from typing import Literal

from flax import nnx

from pz_flax.checkpoint import errors
from pz_flax.core import struct

Kind = Literal["struct", "variable", "function", "type"]

_OWN_PACKAGE = "pz_flax"

# Library namespaces whose functions and classes a manifest may name without
# ``allow_modules``: the numerics a layer holds in static fields (activations, initializers,
# lax primitives), NNX's module/variable/graph classes (kept by layers converted from NNX),
# and tree and sharding types. Deliberately narrow: a name resolved here may end up called by
# the model, so nothing that touches files, callbacks or the host is reachable (numpy is left
# out for that reason; dtypes are stored by name and need no resolution).
_TRUSTED_LIBRARIES = (
    "jax.nn",
    "jax.numpy",
    "jax.lax",
    "jax.scipy",
    "jax.random",
    "jax.dtypes",
    "jax.sharding",
    "jax.tree_util",
    "jax._src.nn",
    "jax._src.numpy",
    "jax._src.lax",
    "jax._src.scipy",
    "jax._src.random",
    "jax._src.dtypes",
    "jax._src.sharding_impls",
    "jax._src.partition_spec",
    "jax._src.tree_util",
    "flax.nnx",
    "flax.typing",
    "optax",
    "math",
    "operator",
)
# Even inside those namespaces, names suggesting I/O or host callbacks are refused
# (``jax.numpy.load``, ``jax.pure_callback``, ...).
_UNSAFE_LIBRARY_NAME = re.compile(r"callback|load|save|file|open|write|exec|eval|system|import")

# Public namespaces tried, in order, before a function's private defining module:
# ``jax.nn.relu`` is defined in ``jax._src.nn.functions``, which may move between releases.
_PUBLIC_FUNCTION_NAMESPACES = (
    "jax.nn",
    "jax.numpy",
    "jax.lax",
    "jax.scipy.special",
    "jax.nn.initializers",
    "flax.nnx",
)

_IDENTIFIER_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

_registered: dict[str, Any] = {}


def _module_in(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def register_type(obj: Any) -> Any:
    """Trusts one class or function for restoring, without trusting its whole module.

    Usable as a class decorator. Registration lasts for the process, so a checkpoint naming
    the object restores without ``allow_modules``.

    Args:
        obj: A class or function with an importable ``__module__`` and ``__qualname__``.

    Returns:
        ``obj`` itself.

    Raises:
        UnsupportedValueError: If ``obj`` is defined inside a function (``<locals>``) or is a
            lambda, so that no qualified name can find it again.
    """
    name = _own_qualified_name(obj)
    if "<" in name:
        raise errors.UnsupportedValueError(
            f"Cannot register {obj!r}: it is defined inside a function or is a lambda, so a"
            " checkpoint could not name it."
        )
    _registered[name] = obj
    return obj


def _own_qualified_name(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def qualified_name(obj: Any, *, what: str, path: str) -> str:
    """The name under which a checkpoint refers to ``obj``: ``"module:qualname"``.

    Functions that the trusted libraries define in private modules are named by their public
    alias when they have one (``jax.nn:relu`` rather than ``jax._src.nn.functions:relu``). The name is checked to find
    ``obj`` again, so that saving fails (clearly) where restoring would.

    Args:
        obj: A class or function.
        what: What ``obj`` is, for error messages ("layer class", "function", ...).
        path: Where in the model ``obj`` was found, for error messages.

    Returns:
        The qualified name.

    Raises:
        UnsupportedValueError: If ``obj`` cannot be found again by name (a lambda, a local
            class, an object without ``__module__``/``__qualname__``).
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise errors.UnsupportedValueError(
            f"{path}: cannot save the {what} {obj!r}: it has no __module__/__qualname__ to name"
            " it by."
        )
    defined_publicly = not any(part.startswith("_") for part in module.split("."))
    if (
        callable(obj)
        and not isinstance(obj, type)
        and not defined_publicly
        and _module_in(module, _TRUSTED_LIBRARIES)
    ):
        public_name = getattr(obj, "__name__", None)
        for namespace in _PUBLIC_FUNCTION_NAMESPACES:
            namespace_module = sys.modules.get(namespace)
            if namespace_module is not None and getattr(namespace_module, public_name, None) is obj:
                return f"{namespace}:{public_name}"
    name = f"{module}:{qualname}"
    if "<" in qualname:
        raise errors.UnsupportedValueError(
            f"{path}: cannot save the {what} {module}.{qualname}: lambdas and objects defined"
            " inside functions cannot be named in a checkpoint. Define it at module level."
        )
    try:
        found = _lookup(module, qualname)
    except (ImportError, AttributeError):
        found = None
    if found is not obj:
        raise errors.UnsupportedValueError(
            f"{path}: cannot save the {what} {obj!r}: the name {name} does not find it again."
        )
    return name


def _lookup(module_name: str, qualname: str) -> Any:
    module = importlib.import_module(module_name)
    parts = qualname.split(".")
    found = getattr(module, parts[0])
    for part in parts[1:]:
        # Only classes may be walked through (``Outer.Inner``); walking through a module
        # attribute would let a trusted module lead to an untrusted one.
        if not isinstance(found, type):
            raise AttributeError(f"{qualname} does not name a class member")
        found = getattr(found, part)
    return found


def _trusted_modules(kind: Kind, allow_modules: Iterable[str]) -> tuple[str, ...]:
    trusted = (_OWN_PACKAGE, *allow_modules)
    if kind != "struct":
        trusted = (*trusted, *_TRUSTED_LIBRARIES)
    return trusted


def _check_kind(obj: Any, kind: Kind) -> bool:
    if kind == "struct":
        return isinstance(obj, type) and struct.is_pytree_dataclass_type(obj)
    if kind == "variable":
        return isinstance(obj, type) and issubclass(obj, nnx.Variable)
    if kind == "type":
        # A class held as data (a dtype class, an NNX module class tagging a converted layer,
        # a node type of a stored tree structure). Restoring never instantiates it through its
        # constructor; dataclass, enum and named-tuple instances are rebuilt field by field.
        return isinstance(obj, type)
    return callable(obj) and not isinstance(obj, type)


def resolve(name: Any, kind: Kind, *, allow_modules: Iterable[str] = (), path: str = "") -> Any:
    """Finds the class or function a checkpoint names, if restoring may load it.

    Args:
        name: The ``"module:qualname"`` string from the manifest.
        kind: What the name must resolve to: ``"struct"`` (a ``pytree_dataclass`` layer or
            struct class), ``"variable"`` (an ``nnx.Variable`` subclass), ``"type"`` (any
            class held as data: a dataclass, enum or NNX module class, a tree node type) or
            ``"function"``.
        allow_modules: Extra module names whose contents (and submodules') are trusted.
        path: Where in the model the name occurs, for error messages.

    Returns:
        The class or function.

    Raises:
        UntrustedTypeError: If the name is outside the allow-list; nothing was imported.
        CorruptCheckpointError: If the name is malformed, or a trusted name does not resolve
            to an object of the expected kind.
    """
    where = f" at {path}" if path else ""
    if not isinstance(name, str) or name.count(":") != 1:
        raise errors.CorruptCheckpointError(
            f"The manifest names {name!r}{where}, which is not a 'module:qualname' reference."
        )
    if name in _registered:
        found = _registered[name]
        if not _check_kind(found, kind):
            raise errors.CorruptCheckpointError(
                f"The manifest names {name}{where} as a {kind}, but the registered object is not"
                " one."
            )
        return found
    module_name, qualname = name.split(":")
    if not (_IDENTIFIER_PATH.match(module_name) and _IDENTIFIER_PATH.match(qualname)):
        raise errors.CorruptCheckpointError(
            f"The manifest names {name!r}{where}, which is not a valid qualified name."
        )
    user_trusted = _module_in(module_name, (_OWN_PACKAGE, *allow_modules))
    if not user_trusted and _UNSAFE_LIBRARY_NAME.search(qualname.lower()):
        raise errors.UntrustedTypeError(
            f"The checkpoint needs {module_name}.{qualname}{where}, which restoring refuses to"
            " load from a library (it may do I/O); list its module in allow_modules if you"
            " really mean it."
        )
    if not _module_in(module_name, _trusted_modules(kind, allow_modules)):
        top_level = module_name.split(".")[0]
        raise errors.UntrustedTypeError(
            f"The checkpoint needs the {kind} {module_name}.{qualname}{where}, which is not a"
            f" pz_flax type; it was not imported. If you trust that code, pass"
            f" allow_modules=[{top_level!r}] (pz-flax-convert: --allow-module {top_level})."
        )
    try:
        found = _lookup(module_name, qualname)
    except (ImportError, AttributeError) as exc:
        raise errors.CorruptCheckpointError(
            f"The checkpoint needs {module_name}.{qualname}{where}, which cannot be found: {exc}"
        ) from None
    own_module = getattr(found, "__module__", None)
    lives_there = (
        own_module == module_name and getattr(found, "__qualname__", None) == qualname
    ) or (
        # A public alias of a library function (``jax.nn:relu``) is a single attribute whose
        # defining module is itself a trusted library.
        kind == "function"
        and "." not in qualname
        and isinstance(own_module, str)
        and _module_in(own_module, _trusted_modules(kind, allow_modules))
    )
    if not lives_there or not _check_kind(found, kind):
        raise errors.CorruptCheckpointError(
            f"The manifest names {name}{where} as a {kind}, but that name does not refer to one"
            " (refusing to use it)."
        )
    return found
