"""No private name of flax, jax, orbax or treescope is used outside ``pz_flax/_compat/``.

Those libraries change their internals between releases; ``pz_flax/_compat/`` is the one place
that may depend on them, each use guarded and canary-tested (``tests/_compat/``). This test reads
every other module's syntax tree and reports, by file and line:

* imports of a private module (a ``_``-prefixed component, or one of flax NNX's implementation
  modules such as ``flax.nnx.graphlib``);
* ``_``-prefixed attributes of those libraries' modules (``jax._src``, ``nnx._something``);
* attributes that are private to their objects (``Variable._raw_value``, ``dtype._impl``, NNX's
  ``_pytree__`` bookkeeping);
* string literals naming private modules or classes, which code would resolve or compare against.

Docstrings are prose and are not checked.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pz_flax"
FOREIGN_ROOTS = ("flax", "jax", "jaxlib", "orbax", "treescope", "optax")
# flax.nnx's public surface is the ``flax.nnx`` namespace itself (plus ``bridge``); the modules
# behind it are implementation files that are renamed between releases.
NNX_IMPLEMENTATION_MODULES = frozenset(
    {
        "graph",
        "graphlib",
        "variablelib",
        "pytreelib",
        "object",
        "statelib",
        "filterlib",
        "reprlib",
        "tracers",
        "rnglib",
        "module",
        "extract",
        "transforms",
        "helpers",
        "spmd",
        "proxy_caller",
        "ids",
        "traversals",
        "summary",
    }
)
PRIVATE_OBJECT_ATTRIBUTES = frozenset(
    {"_raw_value", "_var_metadata", "_check_can_update", "_impl", "_trace_state"}
)
PRIVATE_STRING = re.compile(
    r"jax\._src|orbax\.checkpoint\._src|treescope\._internal|_pytree__|_ScalarMeta"
    r"|flax\.nnx\.(?:" + "|".join(sorted(NNX_IMPLEMENTATION_MODULES)) + r")\b"
)


def _is_private_module(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] not in FOREIGN_ROOTS:
        return False
    if any(part.startswith("_") for part in parts[1:]):
        return True
    return (
        parts[:2] == ["flax", "nnx"] and len(parts) > 2 and parts[2] in NNX_IMPLEMENTATION_MODULES
    )


def _docstring_nodes(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def private_uses(source: str) -> list[tuple[int, str]]:
    """``(line, description)`` for each private use of a foreign library in ``source``."""
    tree = ast.parse(source)
    foreign_aliases: set[str] = set()
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FOREIGN_ROOTS:
                    foreign_aliases.add((alias.asname or alias.name).split(".")[0])
                if _is_private_module(alias.name):
                    found.append((node.lineno, f"imports private module {alias.name}"))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] in FOREIGN_ROOTS
        ):
            for alias in node.names:
                foreign_aliases.add(alias.asname or alias.name)
                dotted = f"{node.module}.{alias.name}"
                if _is_private_module(node.module):
                    found.append((node.lineno, f"imports private {node.module}"))
                elif _is_private_module(dotted):
                    found.append((node.lineno, f"imports private {dotted}"))
    docstrings = _docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            attribute = node.attr
            if attribute.startswith("__") and attribute.endswith("__"):
                continue
            receiver = node.value
            if (
                attribute.startswith("_")
                and isinstance(receiver, ast.Name)
                and receiver.id in foreign_aliases
            ):
                found.append((node.lineno, f"uses private attribute {receiver.id}.{attribute}"))
            elif attribute in PRIVATE_OBJECT_ATTRIBUTES or attribute.startswith("_pytree__"):
                found.append((node.lineno, f"uses private attribute .{attribute}"))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            match = PRIVATE_STRING.search(node.value)
            if match:
                found.append((node.lineno, f"names private {match.group(0)!r} in a string"))
    return sorted(found)


# Format-1 checkpoints stored what flax 0.12 called its bookkeeping attributes and graph
# classes. The migration reads those names as data from old files: they are fixed by the files,
# not by the installed flax, so they are literals there and nothing is resolved from them.
STRINGS_FROM_OLD_FILES = {pathlib.PurePosixPath("pz_flax/checkpoint/migrations.py")}


def test_no_private_foreign_names_outside_compat():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = pathlib.PurePosixPath(path.relative_to(PACKAGE.parent).as_posix())
        if relative.parts[:2] == ("pz_flax", "_compat"):
            continue
        for line, description in private_uses(path.read_text()):
            if relative in STRINGS_FROM_OLD_FILES and "in a string" in description:
                continue
            offenders.append(f"{relative}:{line}: {description}")
    assert not offenders, (
        "Private names of flax/jax/orbax/treescope outside pz_flax/_compat/ (move each into"
        " _compat with a guard and a canary test):\n" + "\n".join(offenders)
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from jax._src import core", "imports private jax._src"),
        ("import jax._src.core", "imports private module jax._src.core"),
        ("from flax.nnx import graphlib", "imports private flax.nnx.graphlib"),
        ("from flax.nnx.variablelib import Variable", "imports private flax.nnx.variablelib"),
        ("import jax\njax._src", "uses private attribute jax._src"),
        ("from flax import nnx\nnnx._private_helper", "uses private attribute nnx._private_helper"),
        ("variable._raw_value = 1", "uses private attribute ._raw_value"),
        ("dtype._impl", "uses private attribute ._impl"),
        ("getattr(module, 'x')\nmodule._pytree__state", "uses private attribute ._pytree__state"),
        ("x = 'jax._src.prng'", "names private 'jax._src' in a string"),
        ("x = type(t).__name__ == '_ScalarMeta'", "names private '_ScalarMeta' in a string"),
    ],
)
def test_each_kind_of_private_use_is_found(source, expected):
    assert expected in [description for _, description in private_uses(source)]


@pytest.mark.parametrize(
    "source",
    [
        "from flax import nnx\nnnx.Variable",
        "from flax.nnx import bridge",
        "import jax\njax.tree_util.tree_map",
        "self._private_state = 1",
        "def f():\n    '''Mentions jax._src and _pytree__state in prose.'''",
        "from treescope import rendering_parts",
        "x.__class__",
    ],
)
def test_public_uses_and_prose_are_not_reported(source):
    assert private_uses(source) == []
