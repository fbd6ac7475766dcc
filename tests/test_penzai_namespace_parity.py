"""Every public name of penzai 0.2.5 exists in pz_flax under the same path.

Penzai code must run with ``penzai`` replaced by ``pz_flax`` in its imports. This test walks
penzai's user-facing namespaces (``pz``, ``pz.nn``, ``pz.nx``, ``pz.ts``, ``pz.chk``) and every
module of ``penzai.toolshed`` and ``penzai.models``, and checks that pz_flax has each name.
Names pz_flax leaves out on purpose are listed in `DELIBERATELY_ABSENT` (and in README's
"Differences from penzai"); nothing is skipped silently.
"""

import ast
import importlib
import pathlib
import pkgutil
import types

import penzai
import pytest
from penzai import pz as penzai_pz

# (module path relative to the package, name) pairs pz_flax does not have, with the reason.
DELIBERATELY_ABSENT = {
    # unflaxify goes through flax.nnx.bridge.ToNNX and from_nnx: one layer per Linen call,
    # whose variables are labelled by from_nnx, instead of penzai's re-ified submodule calls.
    ("toolshed.unflaxify", "InterceptedFlaxScopeData"): "no per-submodule scope records",
    ("toolshed.unflaxify", "FlaxVarLabel"): "variables carry from_nnx's path labels",
}

# Names other modules' owners have yet to add; this set shrinks to empty as they land.
NOT_YET_IN_PZ_FLAX: set[tuple[str, str]] = set()

# Alias namespaces: everything they expose is public. The others are real modules, whose
# public names are what they define at top level (not what they import).
_ALIAS_NAMESPACES = {"pz": penzai_pz, "pz.nn": penzai_pz.nn, "pz.ts": penzai_pz.ts}
_MODULE_NAMESPACES = {"pz.nx": penzai_pz.nx, "pz.chk": penzai_pz.chk}


def _penzai_modules(subpackage: str) -> dict[str, types.ModuleType]:
    package = importlib.import_module(f"penzai.{subpackage}")
    modules = {subpackage: package}
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
        modules[info.name.removeprefix("penzai.")] = importlib.import_module(info.name)
    return modules


def _defined_names(module: types.ModuleType) -> set[str]:
    """Public names a module defines at top level: functions, classes and assignments."""
    names = set()
    for node in ast.parse(pathlib.Path(module.__file__).read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_")}


def _alias_names(namespace: types.ModuleType) -> set[str]:
    return {name for name in dir(namespace) if not name.startswith("_") and name != "annotations"}


def _cases():
    cases = [(key, _alias_names(namespace)) for key, namespace in _ALIAS_NAMESPACES.items()]
    cases += [(key, _defined_names(namespace)) for key, namespace in _MODULE_NAMESPACES.items()]
    for subpackage in ("toolshed", "models"):
        for key, module in _penzai_modules(subpackage).items():
            cases.append((key, _defined_names(module)))
    return [pytest.param(key, names, id=key) for key, names in cases]


def _pz_flax_counterpart(key: str):
    if key.startswith("pz"):
        namespace = importlib.import_module("pz_flax.pz")
        for part in key.split(".")[1:]:
            namespace = getattr(namespace, part)
        return namespace
    return importlib.import_module(f"pz_flax.{key}")


@pytest.mark.parametrize(("key", "penzai_names"), _cases())
def test_every_public_penzai_name_exists(key, penzai_names):
    ours = _pz_flax_counterpart(key)
    missing = {name for name in penzai_names if not hasattr(ours, name)}
    expected_absent = {
        name for (module, name) in {*DELIBERATELY_ABSENT, *NOT_YET_IN_PZ_FLAX} if module == key
    }
    assert missing - expected_absent == set(), (
        f"pz_flax.{key} lacks {sorted(missing - expected_absent)}"
    )
    # A listed absence that pz_flax now has is stale: remove it (and its README line).
    assert expected_absent <= missing, (
        f"pz_flax.{key} now has {sorted(expected_absent - missing)}; drop them from the"
        " absence lists at the top of this file"
    )


def test_the_walk_covers_every_namespace_the_contract_names():
    keys = {param.values[0] for param in _cases()}
    assert {"pz", "pz.nn", "pz.nx", "pz.ts", "pz.chk"} <= keys
    toolshed = {key.removeprefix("toolshed.") for key in keys if key.startswith("toolshed.")}
    assert toolshed == {
        "auto_nmap", "basic_training", "gradient_checkpointing", "isolate_submodel",
        "jit_wrapper", "lora", "model_rewiring", "patch_ipdb", "save_intermediates",
        "sharding_util", "token_visualization", "unflaxify",
    }  # fmt: skip
    variants = {key for key in keys if key.startswith("models.transformer.variants.")}
    assert len(variants) == 5 and "models.simple_mlp" in keys
    assert penzai.__version__ == "0.2.5"


def test_deliberate_absences_name_real_penzai_names():
    cases = {param.values[0]: param.values[1] for param in _cases()}
    for module, name in {*DELIBERATELY_ABSENT, *NOT_YET_IN_PZ_FLAX}:
        assert name in cases[module], (module, name)
