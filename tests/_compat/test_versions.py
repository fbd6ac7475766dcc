"""The supported version range: what pyproject declares, CI tests and this process runs on.

pyproject's ``dependencies`` state the range; ``.ci/constraints-oldest.txt`` pins the oldest
set, which ``.ci/stages/40-oldest-versions.sh`` tests. These checks keep the three in step: a
floor raised in one place and not the other, or a test run on versions outside the range,
fails here with the package and both versions named.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[2]
OLDEST_CONSTRAINTS = ROOT / ".ci" / "constraints-oldest.txt"
OLDEST_STAGE = ROOT / ".ci" / "stages" / "40-oldest-versions.sh"


def declared_requirements() -> dict[str, Requirement]:
    """pyproject's runtime dependencies, by canonical distribution name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    return {canonicalize_name(req.name): req for req in requirements}


def floor(specifier: SpecifierSet) -> str | None:
    """The version a ``>=`` clause names, or None when the specifier has no lower bound."""
    floors = [clause.version for clause in specifier if clause.operator == ">="]
    return floors[0] if len(floors) == 1 else None


def parse_pins(text: str, source: str) -> dict[str, str]:
    """``name==version`` lines (comments and blank lines skipped), by canonical name."""
    pins: dict[str, str] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        clauses = list(Requirement(line).specifier)
        if len(clauses) != 1 or clauses[0].operator != "==":
            raise ValueError(f"{source}:{number}: {line!r} is not an exact pin (name==version)")
        pins[canonicalize_name(Requirement(line).name)] = clauses[0].version
    return pins


def oldest_pins() -> dict[str, str]:
    return parse_pins(OLDEST_CONSTRAINTS.read_text(), str(OLDEST_CONSTRAINTS.relative_to(ROOT)))


def test_every_runtime_dependency_declares_a_tested_floor():
    for requirement in declared_requirements().values():
        assert floor(requirement.specifier) is not None, (
            f"pyproject's dependency {requirement} has no single '>=' floor; the floor is the"
            " version the oldest-versions CI stage tests"
        )


@pytest.mark.parametrize("name", sorted(declared_requirements()))
def test_installed_version_is_inside_the_declared_range(name):
    requirement = declared_requirements()[name]
    installed = importlib.metadata.version(requirement.name)
    assert requirement.specifier.contains(installed, prereleases=True), (
        f"{requirement.name} {installed} is installed, outside pyproject's range"
        f" '{requirement.specifier}': these tests do not cover the supported range"
    )


def test_oldest_constraints_pin_every_floor_exactly():
    pins = oldest_pins()
    for name, requirement in declared_requirements().items():
        assert name in pins, f"{OLDEST_CONSTRAINTS.name} does not pin {requirement.name}"
        assert pins[name] == floor(requirement.specifier), (
            f"{OLDEST_CONSTRAINTS.name} pins {requirement.name}=={pins[name]} but pyproject's"
            f" floor is {floor(requirement.specifier)}: CI would test another version than"
            " the one declared"
        )


def test_oldest_constraints_fit_every_declared_cap():
    # Pins of packages pyproject does not list (numpy, tensorstore, ...) fix the rest of the
    # oldest environment; they must not contradict a declared range either.
    declared = declared_requirements()
    for name, version in oldest_pins().items():
        if name in declared:
            assert declared[name].specifier.contains(version, prereleases=True), (
                f"{OLDEST_CONSTRAINTS.name} pins {name}=={version}, outside pyproject's"
                f" '{declared[name].specifier}'"
            )


def test_oldest_stage_installs_with_the_constraints_and_runs_a_named_subset():
    script = OLDEST_STAGE.read_text()
    assert "-c .ci/constraints-oldest.txt" in script
    runs_canaries = re.search(r"^\s*tests/_compat(/test_versions\.py)? \\$", script, flags=re.M)
    assert runs_canaries, (
        "the oldest-versions stage must run this module (or all of tests/_compat), so that it"
        " checks the versions it installed against pyproject's range"
    )
    assert ".venv/" not in script.replace(".venv-oldest/", ""), (
        "the oldest-versions stage must use its own virtual environment, never .venv"
    )


def test_parse_pins_rejects_a_range_naming_the_line():
    with pytest.raises(ValueError, match=r"pins.txt:2: 'jax>=0.8' is not an exact pin"):
        parse_pins("flax==0.12.3\njax>=0.8\n", "pins.txt")


def test_parse_pins_skips_comments_and_canonicalizes_names():
    text = "# the oldest set\n\nOrbax_Checkpoint==0.11.20  # first to import with jax 0.10\n"
    assert parse_pins(text, "pins.txt") == {"orbax-checkpoint": "0.11.20"}


def test_floor_needs_exactly_one_lower_bound():
    assert floor(SpecifierSet(">=0.12.3,<0.13")) == "0.12.3"
    assert floor(SpecifierSet("<0.13")) is None
    assert floor(SpecifierSet("==0.12.3")) is None
