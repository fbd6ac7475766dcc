"""Import time: ``import pz_flax`` and its entry points against ``import flax.nnx`` and penzai.

Each statement runs in a fresh interpreter, which times only the statement itself (so the
interpreter's own start-up is not counted). Rounds are interleaved (every statement once per
round, in rotating order) so that load from other processes lands on all of them alike, and
each figure is the median over rounds; ratios are to ``import flax.nnx`` in the same round.

Targets: a bare ``import pz_flax`` within 1.1x ``import flax.nnx`` (it loads no subpackage:
they are imported on first use). The other rows say what a first use costs.
"""

from __future__ import annotations

import statistics
import subprocess
import sys

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


def time_statement(statement: str) -> float:
    """Seconds that ``statement`` takes to run in a fresh interpreter."""
    completed = subprocess.run(
        [sys.executable, "-c", _TIMER.format(statement=statement)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return float(completed.stdout.split()[-1])


def run(quick: bool) -> list[dict]:
    rounds = 2 if quick else 7
    seconds: dict[str, list[float]] = {statement: [] for statement in STATEMENTS}
    ratios: dict[str, list[float]] = {statement: [] for statement in STATEMENTS}
    for round_index in range(rounds):
        shift = round_index % len(STATEMENTS)
        order = STATEMENTS[shift:] + STATEMENTS[:shift]
        measured = {statement: time_statement(statement) for statement in order}
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
