"""Wrapped NNX modules in a checkpoint: pz_flax's own, versioned description.

An ``NNXWrapper`` keeps the part of an NNX module that has no pz_flax form as a
``ModuleShell``: the module's graph definition without its converted children. NNX's graph
definition types are private and change between releases (``graph.py`` became ``graphlib.py``
in flax 0.12.5; node fields changed twice), so a checkpoint never stores them. It stores the
module instead, as NNX users know it::

    {"nnx_module": "flax.nnx:Conv",
     "attributes": [{"name": "kernel", "data": true,
                     "variable": "flax.nnx:Param", "metadata": [[key, value], ...]},
                    {"name": "bias", "data": true, "value": null},
                    {"name": "in_features", "data": false, "value": 5}, ...]}

that is: the class by its public name; each attribute with whether NNX treats it as data, and
either its variable (class and metadata; the arrays live in the wrapper's ``variables``), a
module it keeps inside the shell (``"module"``: described the same way) or its static value
(``static_codec``). Restoring builds the module from that without running
its ``__init__`` and takes the graph definition of the result.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from pz_flax._compat import nnx_modules
from pz_flax.checkpoint import errors
from pz_flax.checkpoint import messages
from pz_flax.checkpoint import static_codec
from pz_flax.checkpoint import type_registry
from pz_flax.checkpoint.static_codec import expect

TAG = static_codec.MODULE_SHELL_TAG
# A variable rebuilt for a shell holds no array: the shell only describes the module.
_PLACEHOLDER = jax.ShapeDtypeStruct((), np.float32)


def is_module_shell(value: Any) -> bool:
    from pz_flax.interop import wrappers

    return isinstance(value, wrappers.ModuleShell)


def encode_shell(shell: Any, path: str) -> dict[str, Any]:
    """Describes a ``ModuleShell`` by its module's class and attributes.

    Raises:
        UnsupportedValueError: If an attribute is none of: a static value, a variable, None,
            or a module (described the same way).
    """
    return _describe(nnx_modules.module_of_graphdef(shell.graphdef), path)


def _describe(module: nnx.Pytree, path: str) -> dict[str, Any]:
    attributes = []
    # Static attributes first: an unnameable function among them is the likelier problem,
    # and the one worth reporting.
    in_order = sorted(nnx_modules.module_attributes(module), key=lambda attribute: attribute[2])
    for name, value, is_data in in_order:
        where = f"{path} (attribute {name})"
        entry: dict[str, Any] = {"name": name, "data": is_data}
        if isinstance(value, nnx.Variable):
            entry["variable"] = type_registry.qualified_name(
                type(value), what="variable class", path=where
            )
            entry["metadata"] = static_codec.encode_variable_metadata(value.get_metadata(), where)
        elif isinstance(value, nnx.Pytree):
            # An NNX object the wrapper keeps inside the shell (an ``nnx.Rngs`` stream, say).
            entry["module"] = _describe(value, where)
        elif is_data and value is not None:
            raise errors.UnsupportedValueError(
                f"{where}: cannot save the wrapped {type(module).__name__}: its data attribute"
                f" {name} holds a {type(value).__name__}, which is neither a variable, a module"
                " nor None."
            )
        else:
            entry["value"] = static_codec.encode(value, where)
        attributes.append(entry)
    return {
        TAG: type_registry.qualified_name(type(module), what="NNX module class", path=path),
        "attributes": attributes,
    }


def decode_shell(data: dict[str, Any], context: static_codec.DecodeContext) -> Any:
    """Rebuilds a ``ModuleShell`` from its description, validating it.

    Raises:
        Corrupt: If the description is malformed.
        UntrustedTypeError: If it names a class outside the allow-lists.
    """
    from pz_flax.interop import wrappers

    return wrappers.ModuleShell(nnx.graphdef(_build(data, context)))


def _build(data: Any, context: static_codec.DecodeContext) -> nnx.Pytree:
    expect(
        isinstance(data, dict) and data.keys() == {TAG, "attributes"},
        f"a module description has the keys {TAG} and attributes",
    )
    cls = context.resolve(data[TAG], "type")
    expect(issubclass(cls, nnx.Pytree), f"{cls.__qualname__} is not an NNX module class")
    attributes = []
    seen: set[str] = set()
    entries = static_codec.expect_list(data["attributes"], "a module's attributes")
    for i, entry in enumerate(entries):
        at = context.at("attributes", i)
        expect(isinstance(entry, dict), "a module attribute is an object")
        name = entry.get("name")
        expect(
            isinstance(name, str)
            and name.isidentifier()
            and not name.startswith("__")
            and name not in nnx_modules.BOOKKEEPING_ATTRIBUTES
            and name not in seen,
            f"bad or repeated module attribute name {messages.bounded_repr(name)}",
        )
        seen.add(name)
        is_data = entry.get("data")
        expect(isinstance(is_data, bool), f"attribute {name}: data must be a boolean")
        if "variable" in entry:
            expect(entry.keys() == {"name", "data", "variable", "metadata"}, "bad variable entry")
            variable_cls = at.resolve(entry["variable"], "variable")
            static_codec.check_variable_class(variable_cls)
            metadata = static_codec.decode_variable_metadata(entry["metadata"], at.at("metadata"))
            value = static_codec.build_variable(variable_cls, _PLACEHOLDER, metadata)
        elif "module" in entry:
            expect(entry.keys() == {"name", "data", "module"}, "bad module entry")
            value = _build(entry["module"], at.at("module"))
        else:
            expect(entry.keys() == {"name", "data", "value"}, "bad attribute entry")
            value = static_codec.decode(entry["value"], at.at("value"))
            expect(
                not is_data or value is None,
                f"attribute {name}: a data attribute is a variable, a module or None",
            )
        attributes.append((name, value, is_data))
    return nnx_modules.empty_module_with(cls, attributes)
