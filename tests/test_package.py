"""The package around the code: lazy imports, version, licence and metadata, the wheel.

Which modules an import loads is checked in a fresh interpreter each time (this process has
long since imported everything). How long ``import pz_flax`` takes is a benchmark
(``python -m benchmarks.import_time``), not a test.
"""

import email
import importlib
import json
import os
import pathlib
import pkgutil
import re
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile

import pytest

import pz_flax

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def modules_loaded_by(statement: str) -> set[str]:
    """Runs ``statement`` in a fresh interpreter; returns the module names it loaded."""
    script = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return set(json.loads(completed.stdout.splitlines()[-1]))


def public_subpackages(package_dir: pathlib.Path) -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.iter_modules([str(package_dir)])
        if info.ispkg and not info.name.startswith("_")
    )


def public_modules(package_dir: pathlib.Path) -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.iter_modules([str(package_dir)])
        if not info.name.startswith("_")
    )


# --- Lazy submodules -------------------------------------------------------------------------


def test_bare_import_loads_no_subpackage_and_no_jax():
    loaded = modules_loaded_by("import pz_flax")
    assert sorted(name for name in loaded if name.startswith("pz_flax.")) == ["pz_flax._lazy"]
    for heavy in ("jax", "flax", "orbax.checkpoint", "treescope"):
        assert heavy not in loaded, heavy


def test_every_public_subpackage_is_an_attribute_after_a_bare_import():
    names = public_subpackages(ROOT / "pz_flax")
    assert {"checkpoint", "core", "interop", "nn", "pz", "toolshed", "models"} <= set(names)
    script = "import pz_flax\n" + "\n".join(
        f"assert pz_flax.{name}.__name__ == 'pz_flax.{name}', {name!r}" for name in names
    )
    loaded = modules_loaded_by(script + "\nassert callable(pz_flax.checkpoint.save)")
    assert {f"pz_flax.{name}" for name in names} <= loaded
    assert set(pz_flax.__all__) >= set(names)
    assert set(names) <= set(dir(pz_flax))


def test_checkpoint_save_after_a_bare_import(tmp_path):
    script = f"""
import jax
import pz_flax
layer = pz_flax.pz.nn.Linear.from_config("w", jax.random.key(0), {{"a": 2}}, {{"b": 3}})
pz_flax.checkpoint.save({str(tmp_path / "ckpt")!r}, layer)
restored = pz_flax.checkpoint.restore({str(tmp_path / "ckpt")!r})
assert restored.weights.value.named_shape == {{"a": 2, "b": 3}}
"""
    modules_loaded_by(script)


def test_top_level_functions_load_interop_on_first_use():
    loaded = modules_loaded_by("import pz_flax\nassert pz_flax.from_nnx.__name__ == 'from_nnx'")
    assert "pz_flax.interop" in loaded
    assert pz_flax.from_nnx is pz_flax.interop.from_nnx
    assert pz_flax.to_nnx is pz_flax.interop.to_nnx
    assert pz_flax.summary is pz_flax.interop.summary


def test_core_module_alone_loads_neither_interop_nor_checkpoints():
    loaded = modules_loaded_by("import pz_flax.core.named_axes")
    for not_wanted in ("pz_flax.interop", "pz_flax.checkpoint", "pz_flax.nn", "orbax.checkpoint"):
        assert not_wanted not in loaded, not_wanted


def test_pz_namespace_does_not_register_interop_mappings():
    loaded = modules_loaded_by("from pz_flax import pz\npz.nn.Linear")
    assert "pz_flax.interop" not in loaded
    assert "pz_flax.interop.mappings" not in loaded
    assert "orbax.checkpoint" not in loaded


@pytest.mark.parametrize("package", ["core", "nn"])
def test_every_module_of_core_and_nn_is_an_attribute(package):
    subpackage = getattr(pz_flax, package)
    names = public_modules(ROOT / "pz_flax" / package)
    assert sorted(subpackage.__all__) == names
    script = "import pz_flax\n" + "\n".join(
        f"assert pz_flax.{package}.{name}.__name__ == 'pz_flax.{package}.{name}'" for name in names
    )
    modules_loaded_by(script)
    assert set(names) <= set(dir(subpackage))


def test_pz_namespace_import_loads_nothing_until_a_name_is_used():
    loaded = modules_loaded_by("from pz_flax import pz")
    assert sorted(name for name in loaded if name.startswith("pz_flax")) == [
        "pz_flax",
        "pz_flax._lazy",
        "pz_flax.pz",
    ]
    assert "jax" not in loaded and "flax" not in loaded
    loaded = modules_loaded_by("from pz_flax import pz\npz.nn.Linear")
    assert "pz_flax.nn.linear_and_affine" in loaded
    assert "pz_flax.nn.attention" not in loaded and "pz_flax.core.selectors" not in loaded


def _type_checking_imports(path: pathlib.Path) -> dict[str, tuple[str, str | None]]:
    """Public name -> (module, attribute or None for a module) under ``if TYPE_CHECKING``."""
    import ast

    (block,) = [
        node
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
    ]
    names = {}
    for statement in block.body:
        for alias in statement.names:
            names[alias.asname or alias.name] = (statement.module, alias.name)
    return names


@pytest.mark.parametrize("namespace", ["pz_flax.pz", "pz_flax.pz.nn"])
def test_lazy_names_are_what_the_type_checking_imports_say(namespace):
    """Type checkers read the ``TYPE_CHECKING`` imports, users get the lazy table: one list."""
    module = importlib.import_module(namespace)
    path = ROOT / (
        namespace.replace(".", "/") + ("/__init__.py" if namespace == "pz_flax.pz" else ".py")
    )
    declared = _type_checking_imports(path)
    assert set(declared) == set(module.__all__)
    assert set(module.__all__) <= set(dir(module))
    for name, (source_module, attribute) in declared.items():
        source = importlib.import_module(source_module)
        expected = getattr(source, attribute, None)
        if expected is None:  # ``from package import submodule``
            expected = importlib.import_module(f"{source_module}.{attribute}")
        assert getattr(module, name) is expected, name


@pytest.mark.parametrize("package", ["pz_flax", "pz_flax.core", "pz_flax.nn", "pz_flax.pz"])
def test_unknown_attribute_raises_attribute_error_naming_it(package):
    module = importlib.import_module(package)
    with pytest.raises(
        AttributeError, match=rf"module '{re.escape(package)}' has no attribute 'nope'"
    ):
        module.nope  # noqa: B018
    assert not hasattr(module, "nope")


# --- Version, licence, metadata --------------------------------------------------------------


def test_version_has_a_single_source():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pz_flax.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", pz_flax.__version__)
    literal = f'"{pz_flax.__version__}"'
    sources = [
        ROOT / "pyproject.toml",
        *(ROOT / "pz_flax").rglob("*.py"),
        *(ROOT / "conversion_tools").rglob("*.py"),
    ]
    hard_coded = [
        str(path.relative_to(ROOT))
        for path in sources
        if path != ROOT / "pz_flax" / "__init__.py" and literal in path.read_text()
    ]
    assert hard_coded == []


def test_licence_is_apache_2_in_spdx_form_with_its_file():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    licence = (ROOT / "LICENSE").read_text()
    assert licence.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in licence
    # PEP 639: a licence expression replaces the "License ::" classifiers (setuptools refuses both).
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    build_requires = PYPROJECT["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(7[7-9]|[89]\d)(\.\d+)*", r) for r in build_requires)


def test_classifiers_match_the_supported_pythons():
    project = PYPROJECT["project"]
    minimum = re.fullmatch(r">=3\.(\d+)", project["requires-python"])[1]
    listed = sorted(
        int(c.rsplit(".", 1)[1])
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert listed and listed[0] == int(minimum)
    assert "Typing :: Typed" in project["classifiers"]
    assert project["authors"] and project["urls"]


def test_changelog_has_a_section_for_this_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[?{re.escape(pz_flax.__version__)}\]?", changelog, flags=re.M)


def test_contributing_names_the_commands_it_documents():
    contributing = (ROOT / "CONTRIBUTING.md").read_text()
    for command in (
        "-m 'not slow'",
        "-m slow",
        "bash .ci/run",
        "ruff check .",
        ".ci/stages/10-typecheck.sh",
        ".ci/stages/20-docs.sh",
        "python -m benchmarks",
    ):
        assert command in contributing, command
    for stage in ("10-typecheck.sh", "20-docs.sh"):
        assert (ROOT / ".ci" / "stages" / stage).exists()


# --- The wheel, and an install outside the repository ------------------------------------------


def fresh_clone_copy(destination: pathlib.Path) -> pathlib.Path:
    """Copies what a fresh clone of the working tree would hold: tracked and unignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory):
    checkout = fresh_clone_copy(tmp_path_factory.mktemp("clone"))
    wheel_dir = tmp_path_factory.mktemp("wheels")
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(wheel_dir), "."],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (wheel,) = wheel_dir.glob("pz_flax-*.whl")
    return wheel, completed.stdout + completed.stderr


@pytest.mark.slow
def test_wheel_holds_only_pz_flax_with_py_typed_and_licence(built_wheel):
    wheel, build_log = built_wheel
    assert wheel.name.startswith(f"pz_flax-{pz_flax.__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = f"pz_flax-{pz_flax.__version__}.dist-info"
        assert {name.split("/")[0] for name in names} == {"pz_flax", dist_info}
        assert "pz_flax/py.typed" in names
        assert f"{dist_info}/licenses/LICENSE" in names
        assert not [name for name in names if "/tests/" in name or "__pycache__" in name]
        metadata = email.message_from_bytes(archive.read(f"{dist_info}/METADATA"))
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert metadata["Version"] == pz_flax.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert "Typing :: Typed" in metadata.get_all("Classifier")
    assert re.search(r"^pz-flax-convert = pz_flax\.cli:main$", entry_points, flags=re.M)
    # setuptools warns about licence forms it is phasing out; this build must not trigger any.
    assert not re.search(r"(?i)(deprecat|warning).*licen[cs]e", build_log), build_log[-3000:]


@pytest.mark.slow
def test_wheel_installed_outside_the_repository_runs_cli_quickstart_and_readme(
    built_wheel, tmp_path
):
    wheel, _ = built_wheel
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site_packages = pathlib.Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # The dependencies come from this interpreter's environment (appended to sys.path, so the
    # installed wheel comes first and this environment's editable pz_flax hook never runs).
    dependency_dirs = [p for p in sys.path if p.endswith("site-packages")]
    (site_packages / "dependencies.pth").write_text("\n".join(dependency_dirs) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)],
        capture_output=True,
        check=True,
        timeout=300,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}

    def run(*argv):
        completed = subprocess.run(
            [str(a) for a in argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert completed.returncode == 0, (argv, completed.stdout[-2000:], completed.stderr[-3000:])
        return completed.stdout

    location = run(python, "-c", "import pz_flax; print(pz_flax.__file__)")
    assert pathlib.Path(location.strip()).is_relative_to(site_packages)
    assert "nnx-to-pz" in run(env_dir / "bin" / "pz-flax-convert", "--help")
    assert run(env_dir / "bin" / "pz-flax-convert", "--version").split() == [
        "pz-flax-convert",
        pz_flax.__version__,
    ]
    readme = (ROOT / "README.md").read_text()
    five_lines = re.findall(r"^```python\n(.*?)^```", readme, flags=re.S | re.M)[0]
    assert "{'batch': 2, 'neurons': 4}" in run(python, "-c", five_lines)
    quickstart_log = run(
        python,
        ROOT / "examples" / "quickstart.py",
        "--epochs",
        "2",
        "--hidden",
        "32",
        "--out-dir",
        tmp_path / "quickstart_out",
    )
    assert "accuracy" in quickstart_log.lower()
    assert (tmp_path / "quickstart_out").is_dir()


# --- Documentation ---------------------------------------------------------------------------


def all_public_modules(package_dir: pathlib.Path, prefix: str) -> list[str]:
    names = []
    for info in pkgutil.iter_modules([str(package_dir)]):
        if info.name.startswith("_"):
            continue
        names.append(f"{prefix}.{info.name}")
        if info.ispkg:
            names += all_public_modules(package_dir / info.name, f"{prefix}.{info.name}")
    return names


def test_api_reference_documents_every_public_module():
    pages = "".join(page.read_text() for page in (ROOT / "docs" / "api").glob("*.md"))
    documented = set(re.findall(r"^\.\. automodule:: (\S+)$", pages, flags=re.M))
    # The pz alias namespace re-exports names documented under their defining modules.
    expected = {
        name
        for name in all_public_modules(ROOT / "pz_flax", "pz_flax")
        if name != "pz_flax.pz" and not name.startswith("pz_flax.pz.")
    }
    assert sorted(expected - documented) == []
    assert sorted(documented - expected - {"pz_flax"}) == []


def test_every_notebook_is_in_the_table_of_contents_and_committed_without_outputs():
    index = (ROOT / "docs" / "index.md").read_text()
    notebooks = sorted((ROOT / "docs" / "notebooks").glob("*.ipynb"))
    assert len(notebooks) == 5
    for notebook in notebooks:
        assert f"notebooks/{notebook.stem}\n" in index, notebook.name
        cells = json.loads(notebook.read_text())["cells"]
        code = [cell for cell in cells if cell["cell_type"] == "code"]
        # The docs build executes every notebook; stored outputs would only go stale.
        assert code and all(not cell["outputs"] for cell in code), notebook.name


def test_docs_build_executes_notebooks_with_warnings_as_errors():
    stage = (ROOT / ".ci" / "stages" / "20-docs.sh").read_text()
    assert 'pip install --quiet -e ".[docs]"' in stage
    assert re.search(r"sphinx -W\b.* docs docs/_build/html", stage)
    conf = (ROOT / "docs" / "conf.py").read_text()
    assert 'nb_execution_mode = "force"' in conf
    assert "nb_execution_raise_on_error = True" in conf
    assert set(PYPROJECT["project"]["optional-dependencies"]["docs"]) >= {
        "sphinx>=8",
        "myst-nb>=1.1",
    }
