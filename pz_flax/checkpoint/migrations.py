"""Reading manifests of older formats: one migration per format version, JSON to JSON.

Every manifest format pz_flax ever wrote keeps restoring. A manifest of format ``n`` is
turned into format ``n + 1`` by ``_MIGRATIONS[n]``, repeatedly, before it is validated and
decoded, so the decoder only ever knows the current format. The golden checkpoints under
``tests/checkpoint/golden/`` (written by each format's release) prove it, bit for bit.

Format 1 (pz_flax 0.1) differs from format 2 in two ways:

* library classes were named by their defining module (``flax.nnx.nn.linear:Conv``,
  ``flax.nnx.variablelib:Param``); format 2 names them by public alias (``flax.nnx:Conv``);
* a wrapped NNX module's shell was NNX's private graph definition (``GraphDef``, ``NodeDef``,
  ``VariableDef``, ``Static``, ``NodeAttr`` of ``flax.nnx.graphlib``, or of ``flax.nnx.graph``
  before flax 0.12.5) encoded field by field; format 2 describes the module itself
  (``module_schema``). The migration reads the old encoding by the types' short names, never
  resolving them, so it does not depend on where flax keeps them today.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from pz_flax.checkpoint import messages
from pz_flax.checkpoint import module_schema
from pz_flax.checkpoint.static_codec import expect
from pz_flax.checkpoint.static_codec import expect_list
from pz_flax.checkpoint.static_codec import expect_pairs

# Deepest JSON nesting a migration walks (well below the interpreter's recursion limit).
_MAX_WALK_DEPTH = 400
_NNX_NAMESPACE = "flax.nnx"
_SHELL_CLASS = "pz_flax.interop.wrappers:ModuleShell"
# The one-key (or, for variables, model-node) objects whose string names a library class.
_CLASS_NAME_TAGS = ("type", "variable", "enum", "namedtuple", "dataclass")


def upgrade(manifest: dict[str, Any], current_version: int) -> dict[str, Any]:
    """``manifest`` migrated to ``current_version`` (itself if it is already current).

    Raises:
        Corrupt: If an old manifest is malformed where a migration reads it.
    """
    version = manifest["format_version"]
    while version < current_version:
        manifest = _MIGRATIONS[version](manifest)
        version += 1
        manifest["format_version"] = version
    return manifest


def _public_class_name(name: str) -> str:
    """``flax.nnx.<module>:Name`` as ``flax.nnx:Name`` when flax.nnx exports that name."""
    module_name, _, qualname = name.partition(":")
    if not module_name.startswith(_NNX_NAMESPACE + ".") or "." in qualname:
        return name
    nnx_module = sys.modules.get(_NNX_NAMESPACE)
    if nnx_module is None or not hasattr(nnx_module, qualname):
        return name
    return f"{_NNX_NAMESPACE}:{qualname}"


def _dataclass_fields(data: Any, short_name: str, where: str) -> dict[str, Any]:
    """The fields of a format-1 dataclass encoding of the NNX type ``short_name``."""
    expect(
        isinstance(data, dict)
        and isinstance(data.get("dataclass"), str)
        and data["dataclass"].endswith(":" + short_name)
        and data["dataclass"].startswith(_NNX_NAMESPACE + "."),
        f"{where}: expected a format-1 {short_name}",
    )
    return dict(expect_pairs(data.get("fields"), f"{where}: the fields of {short_name}"))


def _dataclass_short_name(data: Any) -> str:
    name = data.get("dataclass") if isinstance(data, dict) else None
    return name.rpartition(":")[2] if isinstance(name, str) else ""


def _listed(data: Any, where: str) -> list[Any]:
    expect(isinstance(data, dict) and data.keys() == {"list"}, f"{where}: expected a list")
    return expect_list(data["list"], where)


def _class_name(data: Any, where: str) -> str:
    expect(
        isinstance(data, dict) and isinstance(data.get("type"), str), f"{where}: expected a class"
    )
    return _public_class_name(data["type"])


def _metadata_pairs(data: Any, where: str) -> list[list[Any]]:
    expect(
        isinstance(data, dict) and data.keys() == {"hashable_mapping"},
        f"{where}: expected variable metadata",
    )
    return expect_pairs(data["hashable_mapping"], where)


def _shell_from_graphdef(graphdef: Any, where: str) -> dict[str, Any]:
    """A format-2 module description from a format-1 ``GraphDef`` encoding.

    A format-1 shell is one module whose attributes are static values, variables and NNX's
    own bookkeeping (``_pytree__state``, ``_pytree__nodes``); its converted children were
    removed before it was saved.
    """
    fields = _dataclass_fields(graphdef, "GraphDef", where)
    nodes = _listed(fields.get("nodes"), f"{where}: nodes")
    attributes = _listed(fields.get("attributes"), f"{where}: attributes")
    expect(nodes, f"{where}: a graph definition has nodes")
    root = _dataclass_fields(nodes[0], "NodeDef", f"{where}: node 0")
    count = root.get("num_attributes")
    expect(type(count) is int and 0 <= count <= len(attributes), f"{where}: bad attribute count")
    next_node = 1
    data_flags: dict[str, bool] = {}
    described = []
    for i, item in enumerate(attributes[:count]):
        at = f"{where}: attribute {i}"
        expect(isinstance(item, dict) and item.keys() == {"tuple"}, f"{at}: expected a pair")
        name, attribute = expect_list(item["tuple"], at, 2)
        expect(isinstance(name, str), f"{at}: attribute names are strings")
        kind = _dataclass_short_name(attribute)
        if kind == "Static":
            value = _dataclass_fields(attribute, "Static", at).get("value")
            if name == "_pytree__nodes":
                data_flags = dict(_metadata_pairs(value, at))
            else:
                described.append({"name": name, "value": value})
            continue
        expect(kind == "NodeAttr", f"{at}: unknown attribute kind {messages.bounded_repr(kind)}")
        expect(next_node < len(nodes), f"{at}: the graph definition lacks a node")
        node = nodes[next_node]
        next_node += 1
        node_kind = _dataclass_short_name(node)
        node_fields = _dataclass_fields(node, node_kind, f"{at}: node")
        if node_kind == "VariableDef":
            described.append(
                {
                    "name": name,
                    "variable": _class_name(node_fields.get("type"), at),
                    "metadata": _metadata_pairs(node_fields.get("metadata"), at),
                }
            )
        else:
            # Format 1 could hold nothing but NNX's own state object as a node attribute.
            expect(
                node_kind == "NodeDef" and name == "_pytree__state",
                f"{at}: format-1 shells hold no nested nodes",
            )
    for entry in described:
        entry["data"] = bool(data_flags.get(entry["name"], "variable" in entry))
    return {
        module_schema.TAG: _class_name(root.get("type"), f"{where}: node 0"),
        "attributes": sorted(described, key=lambda entry: entry["name"]),
    }


def _format_1_to_2(manifest: dict[str, Any]) -> dict[str, Any]:
    def walk(value: Any, where: str, depth: int) -> Any:
        expect(depth < _MAX_WALK_DEPTH, f"{where}: nested deeper than {_MAX_WALK_DEPTH} levels")
        if isinstance(value, list):
            return [walk(item, f"{where}/{i}", depth + 1) for i, item in enumerate(value)]
        if not isinstance(value, dict):
            return value
        if value.get("dataclass") == _SHELL_CLASS:
            shell_fields = dict(expect_pairs(value.get("fields"), f"{where}: shell fields"))
            expect(shell_fields.keys() == {"graphdef"}, f"{where}: a shell holds a graphdef")
            return walk(_shell_from_graphdef(shell_fields["graphdef"], where), where, depth + 1)
        migrated = {key: walk(item, f"{where}/{key}", depth + 1) for key, item in value.items()}
        for tag in _CLASS_NAME_TAGS:
            if isinstance(migrated.get(tag), str) and (tag != "type" or len(migrated) == 1):
                migrated[tag] = _public_class_name(migrated[tag])
        if isinstance(migrated.get(module_schema.TAG), str):
            migrated[module_schema.TAG] = _public_class_name(migrated[module_schema.TAG])
        return migrated

    return walk(manifest, "", 0)


_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _format_1_to_2}
