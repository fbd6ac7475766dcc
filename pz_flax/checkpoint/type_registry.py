"""Naming classes in a checkpoint, and resolving those names safely.

A structure manifest refers to the classes of a model's layers, variables and static values
by qualified name, written ``"module:qualname"``. Resolving such a name means importing a
module and reading an attribute, which is exactly what an attacker who controls a checkpoint
would like us to do with a module of their choosing. So resolution is an allow-list, checked
*before* any import:

* pz_flax's own classes (``pz_flax`` and its submodules);
* classes registered explicitly with ``register_type``;
* classes of modules the caller lists in ``allow_modules`` (and their submodules);
* for classes held as data (not layers): NNX's module and variable classes and a few enums
  of JAX, by their public alias only (``flax.nnx:Conv``, ``jax.lax:Precision``), so that a
  name survives the libraries moving their code between files.

Functions are resolved separately, from a closed allow-list (``functions``). Names outside
the lists raise ``UntrustedTypeError`` naming the class and the ``allow_modules`` entry that
would admit it. Even inside the list, the object found must be of the expected kind (a
``pytree_dataclass`` for a layer, an ``nnx.Variable`` subclass for a variable, ...) and must
really live where the name says, so a trusted module cannot be used as a stepping stone to an
object of another module (``pz_flax.x:os.system``).
"""

from __future__ import annotations

import enum
import importlib
import re
import sys
from collections.abc import Iterable
from typing import Any
from typing import Literal

from flax import nnx

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import messages
from pz_flax.core import registry
from pz_flax.core import struct

Kind = Literal["struct", "variable", "function", "type"]

_OWN_PACKAGE = "pz_flax"

# Library namespaces whose public classes a manifest may name as data without
# ``allow_modules``, and what those classes must be: NNX's module and variable classes (kept
# by layers converted from NNX) and JAX's configuration enums (``jax.lax.Precision``).
# Restoring never calls these classes' constructors; a module class is instantiated empty and
# filled attribute by attribute, like NNX's own ``merge``.
_PUBLIC_CLASS_NAMESPACES = ("flax.nnx", "jax.lax", "jax.sharding")

_IDENTIFIER_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

# Classes and functions trusted one by one (``register_type``, ``register_function``), by the
# name a checkpoint gives them. ``trusted_objects.scoped(registration_name(obj), obj)`` trusts
# one for a ``with`` block only.
trusted_objects: registry.Registry[str, Any] = registry.Registry("checkpoint trusted objects")


def module_in(module: str, prefixes: Iterable[str]) -> bool:
    """Whether ``module`` is one of ``prefixes`` or a submodule of one."""
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def register_type(obj: Any) -> Any:
    """Trusts one class or function for restoring, without trusting its whole module.

    Usable as a class decorator. Registration lasts for the process (until
    ``unregister_type``), so a checkpoint naming the object restores without
    ``allow_modules``. Registering an object of the same name again (a reloaded module)
    replaces the earlier one.

    Args:
        obj: A class or function with an importable ``__module__`` and ``__qualname__``.

    Returns:
        ``obj`` itself.

    Raises:
        UnsupportedValueError: If ``obj`` is defined inside a function (``<locals>``) or is a
            lambda, so that no qualified name can find it again.
    """
    name = registration_name(obj)
    if "<" in name:
        raise errors.UnsupportedValueError(
            f"Cannot register {obj!r}: it is defined inside a function or is a lambda, so a"
            " checkpoint could not name it."
        )
    trusted_objects.register(name, obj, replace=True)
    return obj


def unregister_type(obj: Any) -> Any:
    """Stops trusting a class or function that ``register_type`` trusted; returns it.

    Raises:
        KeyError: If ``obj`` is not registered (under its name, by ``registration_name``).
    """
    name = registration_name(obj)
    if trusted_objects.get(name) is not obj:
        raise KeyError(f"{name} is not registered as {messages.bounded_repr(obj)}.")
    return trusted_objects.unregister(name)


def registration_name(obj: Any) -> str:
    """The key of ``obj`` in ``trusted_objects``: ``"module:qualname"``."""
    return f"{obj.__module__}:{obj.__qualname__}"


def _public_alias(obj: Any) -> str | None:
    """``"namespace:Name"`` if a public library namespace exports ``obj`` under its name."""
    name = getattr(obj, "__name__", None)
    for namespace in _PUBLIC_CLASS_NAMESPACES:
        module = sys.modules.get(namespace)
        if module is not None and isinstance(name, str) and getattr(module, name, None) is obj:
            return f"{namespace}:{name}"
    return None


def qualified_name(obj: Any, *, what: str, path: str) -> str:
    """The name under which a checkpoint refers to ``obj``: ``"module:qualname"``.

    Library classes are named by their public alias when they have one (``flax.nnx:Linear``
    rather than ``flax.nnx.nn.linear:Linear``), so that the name survives the library moving
    its code. The name is checked to find ``obj`` again, so that saving fails (clearly) where
    restoring would.

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
            f"{path}: cannot save the {what} {messages.bounded_repr(obj)}: it has no"
            " __module__/__qualname__ to name it by."
        )
    if isinstance(obj, type) and not module_in(module, (_OWN_PACKAGE,)):
        alias = _public_alias(obj)
        if alias is not None:
            return alias
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
            f"{path}: cannot save the {what} {messages.bounded_repr(obj)}: the name {name} does"
            " not find it again."
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


def _check_kind(obj: Any, kind: Kind) -> bool:
    if kind == "struct":
        return isinstance(obj, type) and struct.is_pytree_dataclass_type(obj)
    if kind == "variable":
        return isinstance(obj, type) and issubclass(obj, nnx.Variable)
    if kind == "type":
        # A class held as data (a dataclass or enum of a static field, an NNX module class
        # tagging a converted layer). Restoring never calls it; dataclass, enum and
        # named-tuple instances are rebuilt field by field.
        return isinstance(obj, type)
    return callable(obj) and not isinstance(obj, type)


def _is_public_library_class(obj: Any, kind: Kind) -> bool:
    """What a public library namespace may provide: NNX object/variable classes, enums.

    Also ``nnx.Carry``, the marker NNX's scan transforms use as an axis (``nnx.StateAxes``).
    """
    if not isinstance(obj, type):
        return False
    if kind == "variable":
        return issubclass(obj, nnx.Variable)
    return kind == "type" and (
        issubclass(obj, (nnx.Pytree, nnx.Variable, enum.Enum)) or obj is nnx.Carry
    )


def check_name_syntax(name: Any, path: str) -> None:
    """Checks that ``name`` is a ``"module:qualname"`` string of Python identifiers.

    Raises:
        CorruptCheckpointError: If it is not.
    """
    if (
        not isinstance(name, str)
        or name.count(":") != 1
        or not all(_IDENTIFIER_PATH.match(part) for part in name.split(":"))
    ):
        raise errors.CorruptCheckpointError(
            f"{path}: the manifest names {messages.bounded_repr(name)}, which is not a"
            " 'module:qualname' reference."
        )


def resolve(name: Any, kind: Kind, *, allow_modules: Iterable[str] = (), path: str = "") -> Any:
    """Finds the class (or allowed function) a checkpoint names, if restoring may load it.

    Args:
        name: The ``"module:qualname"`` string from the manifest.
        kind: What the name must resolve to: ``"struct"`` (a ``pytree_dataclass`` layer or
            struct class), ``"variable"`` (an ``nnx.Variable`` subclass), ``"type"`` (any
            class held as data: a dataclass, enum or NNX module class) or ``"function"``
            (only from ``allow_modules`` here; see ``functions.resolve_function`` for the
            allow-list).
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
    check_name_syntax(name, path or "the manifest")
    if name in trusted_objects:
        found = trusted_objects[name]
        if not _check_kind(found, kind):
            raise errors.CorruptCheckpointError(
                f"The manifest names {name}{where} as a {kind}, but the registered object is not"
                " one."
            )
        return found
    module_name, qualname = name.split(":")
    allow_modules = tuple(allow_modules)
    public_library = kind != "struct" and module_name in _PUBLIC_CLASS_NAMESPACES
    own = kind != "function" and module_in(module_name, (_OWN_PACKAGE,))
    if not (own or public_library or module_in(module_name, allow_modules)):
        top_level = module_name.split(".")[0]
        if kind == "function":
            raise errors.UntrustedTypeError(
                f"The checkpoint names the function {messages.bounded_text(name)}{where}, which"
                " is not an allow-listed array function; it was not imported. Register it with"
                " pz_flax.checkpoint.register_function, or if you trust all of that module's"
                f" code, pass allow_modules=[{top_level!r}]."
            )
        raise errors.UntrustedTypeError(
            f"The checkpoint needs the {kind} {messages.bounded_text(module_name)}."
            f"{messages.bounded_text(qualname)}{where}, which is not a pz_flax type; it was not"
            f" imported. If you trust that code, pass allow_modules=[{top_level!r}]"
            f" (pz-flax-convert: --allow-module {top_level})."
        )
    try:
        found = _lookup(module_name, qualname)
    except (ImportError, AttributeError) as exc:
        raise errors.CorruptCheckpointError(
            f"The checkpoint needs {module_name}.{qualname}{where}, which cannot be found:"
            f" {messages.bounded_text(str(exc))}"
        ) from exc
    acceptable = (
        getattr(found, "__module__", None) == module_name
        and getattr(found, "__qualname__", None) == qualname
    ) or (
        # A public alias: the object is exported here, its defining module may be private.
        public_library and "." not in qualname and _is_public_library_class(found, kind)
    )
    if not acceptable or not _check_kind(found, kind):
        raise errors.CorruptCheckpointError(
            f"The manifest names {name}{where} as a {kind}, but that name does not refer to one"
            " (refusing to use it)."
        )
    return found
