"""The closed allow-list of functions a checkpoint may name.

A function held by a model (an ``Elementwise.fn``, an NNX layer's ``dot_general``) is called
when the model is used, so a checkpoint that could name any function could make the process
that restores and calls it do anything: a partial over a trusted library's tree utilities or
over pz_flax's own ``save`` is as good as a shell. Restoring therefore resolves a function name
only to:

* a known pure array function: the elementwise functions ``Elementwise`` knows
  (``pz_flax.nn.basic_ops.known_elementwise_functions``: ``jax.nn.relu``, ``jnp.tanh``, ...),
  plus the few non-elementwise array functions that layers keep as configuration
  (``jax.nn.softmax``, ``jax.lax.dot_general``, ...);
* a function the caller registered with ``register_function`` (this process only);
* a function of a module the caller lists in ``allow_modules`` (which hands that module's
  whole contents to the checkpoint: see README's threat model).

Everything else (other library functions, pz_flax internals, builtins) is refused. A
``functools.partial`` is accepted only over one of those functions with literal primitive
arguments (``None``, booleans, numbers, strings), so partials cannot chain into gadgets.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import messages
from pz_flax.checkpoint import type_registry

# Array functions that stock layers hold as configuration without being elementwise: NNX's
# Linear/Conv/Einsum keep their contraction and dtype-promotion functions, attention layers
# their normalisation. All are pure functions of their array arguments.
_NON_ELEMENTWISE_ARRAY_FUNCTIONS = {
    "jax.nn": ("softmax", "log_softmax", "standardize", "one_hot", "logsumexp"),
    "jax.numpy": ("einsum", "matmul", "dot", "tensordot"),
    "jax.lax": ("dot_general", "conv_general_dilated", "conv_transpose", "dot"),
    "flax.nnx.nn.dtypes": ("promote_dtype",),
    # Rematerialisation policies (``Checkpointed.policy``): predicates over primitives.
    "jax.checkpoint_policies": (
        "checkpoint_dots",
        "checkpoint_dots_with_no_batch_dims",
        "dots_saveable",
        "dots_with_no_batch_dims_saveable",
        "everything_saveable",
        "nothing_saveable",
    ),
}
# Array functions that public NNX layers take as constructor defaults from a private helper
# (``nnx.Bidirectional``'s ``merge_fn`` concatenates its two directions' outputs). They are
# found through the constructor's signature and named ``flax.nnx:Class.parameter`` ("the
# default of that parameter"), so the name never depends on where flax keeps the helper.
_CONSTRUCTOR_DEFAULT_FUNCTIONS = {"flax.nnx": {"Bidirectional": ("merge_fn",)}}
# Public namespaces that give a known function its checkpoint name, in order of preference.
_NAMESPACES = (
    "jax.nn",
    "jax.numpy",
    "jax.lax",
    "jax.scipy.special",
    "flax.nnx.nn.dtypes",
    "jax.checkpoint_policies",
)
# Literal types a partial may bind.
PARTIAL_ARGUMENT_TYPES = (type(None), bool, int, float, str)


def _namespace(name: str) -> Any:
    """The module or module attribute (``jax.checkpoint_policies``) called ``name``."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        parent, _, attribute = name.rpartition(".")
        return getattr(_namespace(parent), attribute)


def _until_elementwise_table_changes(compute: Callable[[], Any]) -> Callable[[], Any]:
    """Caches ``compute()`` until users change the elementwise table it reads."""
    cache: dict[str, Any] = {}

    @functools.wraps(compute)
    def cached() -> Any:
        from pz_flax.nn import basic_ops

        version = basic_ops.elementwise_function_registry.version
        if cache.get("version") != version:
            cache.update(version=version, value=compute())
        return cache["value"]

    return cached


@_until_elementwise_table_changes
def _known_functions() -> dict[str, Callable[..., Any]]:
    """Every allow-listed library function by each public name that finds it."""
    from pz_flax.nn import basic_ops

    functions = set(basic_ops.known_elementwise_functions())
    for module_name, names in _NON_ELEMENTWISE_ARRAY_FUNCTIONS.items():
        module = _namespace(module_name)
        functions.update(getattr(module, name) for name in names if hasattr(module, name))
    by_id = {id(fn): fn for fn in functions}
    by_name: dict[str, Callable[..., Any]] = {}
    for namespace_name in _NAMESPACES:
        namespace = _namespace(namespace_name)
        # By attribute name, not ``__name__``: some (JAX's remat policies) are callable objects.
        # Reading every attribute touches deprecated ones too; their warnings are not news.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attributes = {name: getattr(namespace, name, None) for name in dir(namespace)}
        for attribute, value in attributes.items():
            if by_id.get(id(value)) is value:
                by_name.setdefault(f"{namespace_name}:{attribute}", value)
    by_name.update(_constructor_default_functions())
    return by_name


def _constructor_default_functions() -> dict[str, Callable[..., Any]]:
    found = {}
    for namespace_name, classes in _CONSTRUCTOR_DEFAULT_FUNCTIONS.items():
        namespace = _namespace(namespace_name)
        for class_name, parameter_names in classes.items():
            cls = getattr(namespace, class_name, None)
            if cls is None:
                continue
            parameters = inspect.signature(cls.__init__).parameters
            for parameter_name in parameter_names:
                parameter = parameters.get(parameter_name)
                if parameter is not None and callable(parameter.default):
                    found[f"{namespace_name}:{class_name}.{parameter_name}"] = parameter.default
    return found


@_until_elementwise_table_changes
def _known_names() -> dict[int, str]:
    """The name each allow-listed function is saved under.

    A function's own public module comes first (``jax.numpy:tanh``, not its re-export
    ``jax.nn:tanh``), as format 1 named them, so that old and new manifests compare equal.
    """
    names: dict[int, str] = {}
    known = _known_functions()
    for name, fn in known.items():
        own_name = f"{getattr(fn, '__module__', '')}:{getattr(fn, '__name__', '')}"
        names.setdefault(id(fn), own_name if known.get(own_name) is fn else name)
    return names


def register_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Lets checkpoints name ``fn`` (in this process), without trusting its whole module.

    Usable as a decorator. Register only functions that are safe to call with whatever array
    arguments a model passes: a checkpoint may put a registered function into any function
    slot of the model it describes.

    Args:
        fn: A module-level function (importable by ``__module__`` and ``__qualname__``).

    Returns:
        ``fn`` itself.

    Raises:
        UnsupportedValueError: If ``fn`` is not a function with a findable name (a lambda, a
            local function, a class, a partial).
    """
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if (
        not callable(fn)
        or isinstance(fn, (type, functools.partial))
        or not isinstance(module, str)
        or not isinstance(qualname, str)
        or "<" in qualname
    ):
        raise errors.UnsupportedValueError(
            f"Cannot register {messages.bounded_repr(fn)}: register_function takes a module-level function"
            " (not a lambda, local function, class or partial)."
        )
    return type_registry.register_type(fn)


def unregister_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Stops letting checkpoints name ``fn``, which ``register_function`` allowed; returns it.

    Raises:
        KeyError: If ``fn`` is not registered.
    """
    return type_registry.unregister_type(fn)


def function_name(fn: Any, path: str) -> str:
    """The name a checkpoint stores for ``fn``: its public alias when it is allow-listed.

    Saving does not refuse functions outside the allow-list (the restoring side may allow
    their module); it refuses only what no name could find again.

    Raises:
        UnsupportedValueError: If ``fn`` cannot be named.
    """
    known = _known_names().get(id(fn))
    if known is not None and _known_functions()[known] is fn:
        return known
    return type_registry.qualified_name(fn, what="function", path=path)


def resolve_function(name: Any, *, allow_modules: Iterable[str], path: str) -> Callable[..., Any]:
    """The function a checkpoint names, if it is allow-listed, registered or allowed.

    Raises:
        UntrustedTypeError: If the function is none of those; nothing was imported.
        CorruptCheckpointError: If the name is malformed or does not find a function.
    """
    type_registry.check_name_syntax(name, path)
    found = _known_functions().get(name)
    if found is not None:
        return found
    return type_registry.resolve(name, "function", allow_modules=allow_modules, path=path)
