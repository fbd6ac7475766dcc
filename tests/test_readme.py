"""README's promises: the two set-up commands, and Python examples that run as printed."""

import codeop
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

MAIN_JOB = (
    'python3 -m venv .venv && .venv/bin/pip install -e ".[examples]"'
    " && .venv/bin/python examples/quickstart.py"
)
TESTS = (
    'python3 -m venv .venv && .venv/bin/pip install -e ".[test]"'
    " && .venv/bin/python -m pytest -n auto"
)


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_starts_with_exactly_the_two_setup_commands():
    first_block = code_blocks("bash")[0]
    assert first_block.splitlines() == [MAIN_JOB, TESTS]
    assert README.index(first_block) < README.index("\n## ")


def test_ci_runs_the_readme_test_command_and_ruff():
    ci_script = (ROOT / ".ci" / "run").read_text()
    pattern = re.search(r"grep -m1 -E '(.*)' README.md", ci_script).group(1)
    matches = [line for line in README.splitlines() if re.match(pattern, line)]
    assert matches[0] == TESTS
    assert "ruff check ." in ci_script


def repl_syntax_errors(block: str) -> list[tuple[int, str]]:
    """Lines of ``block`` that raise SyntaxError when pasted into Python's interactive prompt.

    The classic REPL (Python 3.11, 3.12) compiles each statement as soon as it is complete and
    ends an indented block only at a blank line, so a statement right after a ``for`` or
    ``def`` body without a blank line in between is a SyntaxError there, though it runs as a
    script. ``codeop.compile_command`` is the REPL's own compiler.
    """
    pending: list[str] = []
    errors = []
    for number, line in enumerate(block.splitlines(), start=1):
        pending.append(line)
        try:
            complete = codeop.compile_command("\n".join(pending), "<README>", "single")
        except SyntaxError:
            errors.append((number, line))
            pending = []
            continue
        if complete is not None:
            pending = []
    return errors


def test_repl_syntax_errors_finds_a_statement_glued_to_a_loop():
    assert repl_syntax_errors("for i in range(2):\n    x = i\nprint(x)\n") == [(3, "print(x)")]
    assert repl_syntax_errors("for i in range(2):\n    x = i\n\nprint(x)\n") == []


def test_python_examples_paste_into_the_interactive_prompt():
    for block in code_blocks("python"):
        assert repl_syntax_errors(block) == [], block


def test_python_examples_run_as_printed(tmp_path):
    script = "\n\n".join(code_blocks("python"))
    assert "five lines" in README.lower() and len(code_blocks("python")[0].splitlines()) == 5
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        # As on a user's machine: the test suite's 8 fake CPU devices are not inherited.
        env={
            **{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
            "PYTHONPATH": str(ROOT),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "{'batch': 2, 'neurons': 4}" in completed.stdout
    assert "{'batch': 64, 'target': 1}" in completed.stdout
    assert "Sequential gelu" in completed.stdout
    assert "{'batch': 1, 'seq': 4, 'vocabulary': 32}" in completed.stdout
    for trained_with in (
        "StatefulTrainer",
        "jax.jit",
        "jax.jit over raw arrays",
        "nnx.Optimizer",
        "sharded",
    ):
        loss = float(
            re.search(rf"{re.escape(trained_with)} loss: ([0-9.e+-]+)", completed.stdout)[1]
        )
        assert loss < 0.5, (trained_with, completed.stdout)


def test_checkpoint_conversion_walkthrough_runs_as_printed(tmp_path):
    """The bash walk-through, run in a scratch copy of the repository root's layout.

    It calls ``.venv/bin/python`` and ``.venv/bin/pz-flax-convert``. Where README's set-up
    command made that environment (as in CI) it is used as it is; otherwise a stand-in
    ``.venv`` runs this interpreter with the checkout on ``PYTHONPATH``.
    """
    walkthrough = next(block for block in code_blocks("bash") if "pz-flax-convert" in block)
    installed = ROOT / ".venv"
    if (installed / "bin" / "pz-flax-convert").exists():
        (tmp_path / ".venv").symlink_to(installed)  # the whole venv, so it finds pyvenv.cfg
    else:
        venv_bin = tmp_path / ".venv" / "bin"
        venv_bin.mkdir(parents=True)
        for tool, run in (
            ("python", sys.executable),
            ("pz-flax-convert", f"{sys.executable} -m conversion_tools.convert_checkpoint"),
        ):
            (venv_bin / tool).write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec {run} "$@"\n')
            (venv_bin / tool).chmod(0o755)
    completed = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", walkthrough],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "{'batch': 3, 'features': 2}" in completed.stdout
    assert "bit-identical: True" in completed.stdout
