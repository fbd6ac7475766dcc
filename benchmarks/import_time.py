"""Import time: ``import pz_flax`` and its entry points against ``import flax.nnx`` and penzai.

Each statement runs in a fresh interpreter, which times only the statement itself (so the
interpreter's own start-up is not counted). Every library is timed as an installed one is
imported: from cached bytecode. pip byte-compiles what it installs into site-packages, but
not an editable checkout, and ``PYTHONDONTWRITEBYTECODE`` (set in some environments) keeps
Python from caching the checkout's bytecode itself, so pz_flax would otherwise be compiled
from source on every run while flax is not. The interpreters therefore share a private
bytecode cache (``PYTHONPYCACHEPREFIX``, in a temporary folder, so the tree is not written
to), filled by one untimed run of each statement. Rounds are interleaved (every statement once per
round, in rotating order) so that load from other processes lands on all of them alike, and
each figure is the median over rounds; ratios are to ``import flax.nnx`` in the same round.

Targets: a bare ``import pz_flax`` within 1.1x ``import flax.nnx`` (it loads no subpackage:
they are imported on first use). The other rows say what a first use costs.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile

REFERENCE = "import flax.nnx"
STATEMENTS = (
    REFERENCE,
    "import penzai",
    "import pz_flax",
    "from pz_flax import pz",
    "import pz_flax; pz_flax.checkpoint.save",
)

_TIMER = (
    "import time\n"
    "start = time.perf_counter()\n"
    "exec({statement!r})\n"
    "print(time.perf_counter() - start)\n"
)


def bytecode_cached_environment(cache_dir: str) -> dict[str, str]:
    """The environment for interpreters that read and write bytecode under ``cache_dir``."""
    environment = {**os.environ, "PYTHONPYCACHEPREFIX": cache_dir}
    environment.pop("PYTHONDONTWRITEBYTECODE", None)
    return environment


def time_statement(statement: str, environment: dict[str, str] | None = None) -> float:
    """Seconds that ``statement`` takes to run in a fresh interpreter (in ``environment``)."""
    completed = subprocess.run(
        [sys.executable, "-c", _TIMER.format(statement=statement)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env=environment,
    )
    return float(completed.stdout.split()[-1])


def run(quick: bool) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="pz_flax_import_bytecode_") as cache_dir:
        return _measure(2 if quick else 7, bytecode_cached_environment(cache_dir))


def _measure(rounds: int, environment: dict[str, str]) -> list[dict]:
    for statement in STATEMENTS:  # fills the bytecode cache
        time_statement(statement, environment)
    seconds: dict[str, list[float]] = {statement: [] for statement in STATEMENTS}
    ratios: dict[str, list[float]] = {statement: [] for statement in STATEMENTS}
    for round_index in range(rounds):
        shift = round_index % len(STATEMENTS)
        order = STATEMENTS[shift:] + STATEMENTS[:shift]
        measured = {statement: time_statement(statement, environment) for statement in order}
        for statement, value in measured.items():
            seconds[statement].append(value)
            ratios[statement].append(value / measured[REFERENCE])
    return [
        {
            "benchmark": "import time",
            "statement": statement,
            "s": round(statistics.median(seconds[statement]), 3),
            "min_s": round(min(seconds[statement]), 3),
            "ratio_to_flax_nnx": round(statistics.median(ratios[statement]), 3),
            "rounds": rounds,
        }
        for statement in STATEMENTS
    ]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
