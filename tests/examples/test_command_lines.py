"""Every example's command line: ``--help`` answers before JAX is imported, every flag is
explained, and every example has ``--quick``."""

import json
import subprocess
import sys

import pytest

from tests.examples import helpers

EXAMPLES = ("quickstart.py", "train_transformer.py", "finetune_nnx_checkpoint.py", "nnx_interop.py")

# Runs an example as a script with --help, recording the parser it builds, then reports what
# was imported and which options lack help text.
INSPECT_HELP = """
import argparse, json, runpy, sys
parsers = []
original = argparse.ArgumentParser.parse_args
def recording(self, *args, **kwargs):
    parsers.append(self)
    return original(self, *args, **kwargs)
argparse.ArgumentParser.parse_args = recording
sys.argv = [sys.argv[1], "--help"]
sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])  # as running the script does
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
options = [action for action in parsers[0]._actions if action.option_strings]
print(json.dumps({
    "heavy_imports": sorted(m for m in ("jax", "flax", "numpy", "pz_flax") if m in sys.modules),
    "without_help": [action.option_strings for action in options if not action.help],
    "options": [name for action in options for name in action.option_strings],
}))
"""


@pytest.fixture(scope="module", params=EXAMPLES)
def help_report(request):
    completed = subprocess.run(
        [sys.executable, "-c", INSPECT_HELP, str(helpers.EXAMPLES_DIR / request.param)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return completed.stdout, json.loads(completed.stdout.strip().splitlines()[-1])


def test_help_answers_before_jax_is_imported(help_report):
    printed, report = help_report
    assert printed.startswith("usage:")
    assert report["heavy_imports"] == []


def test_every_flag_has_help_text(help_report):
    _, report = help_report
    assert report["without_help"] == []


def test_every_example_has_a_quick_mode(help_report):
    _, report = help_report
    assert "--quick" in report["options"]
