"""Multi-process checkpoint save: pz_flax against plain Orbax, in one 2-process JAX job.

Both processes of a localhost job (``tests/multiprocess/launcher.py``: gloo collectives, CPU
devices) hold half of every array of a stack of named-axis ``Linear`` layers (sharded over a
mesh that spans both processes; 113 MB in the full run) and save it together:

* with plain Orbax: ``StandardCheckpointHandler`` on a dict of the same global arrays, called
  from every process (Orbax's own multi-process save: each process writes its shards, the
  primary finalizes between barriers);
* with ``pz_flax.checkpoint.save`` on the model, called from every process (the same Orbax
  save plus the structure manifest and the atomic publish of the staging directory).

Contenders alternate round by round, each into a fresh directory; every round starts after a
barrier, so both processes time the same save. Each figure is the median over rounds of the
slower process's time. The target is pz_flax <= 1.1x plain Orbax (``ratio_to_orbax``).

Run: ``python -m benchmarks.multiprocess_save`` (``--quick`` for a smoke run). The module
also exposes ``run(quick)`` like the other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
JOB_TIMEOUT_S = 540
CONTENDERS = ("orbax", "pz_flax")


def sizes(quick: bool) -> tuple[int, int, int, int]:
    """Layers, rows, columns and timed rounds."""
    return (2, 256, 1024, 1) if quick else (9, 1024, 3072, 15)


def _worker(scratch: pathlib.Path, quick: bool) -> None:
    """One process of the job: builds its shards, times both saves, writes its timings."""
    from pz_flax.toolshed import sharding_util

    sharding_util.initialize_distributed_from_environment()  # before anything touches JAX

    import jax
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

    from benchmarks import checkpoint_bench
    from pz_flax import checkpoint
    from pz_flax import pz

    workdir = scratch / "saves"
    workdir.mkdir(parents=True, exist_ok=True)

    layers, rows, cols, rounds = sizes(quick)
    mesh = jax.make_mesh((jax.device_count(),), ("shards",))
    model, _ = checkpoint_bench.build_model(layers, rows, cols)
    model = sharding_util.name_to_name_device_put(model, mesh, {"outputs": "shards"})
    arrays = {str(param.label): param.get_raw_value() for param in pz.unbind_params(model)[1]}
    orbax_checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    actions = {
        "orbax": lambda path: orbax_checkpointer.save(path, args=ocp.args.StandardSave(arrays)),
        "pz_flax": lambda path: checkpoint.save(path, model),
    }

    def timed_save(name: str, path: pathlib.Path) -> float:
        multihost_utils.sync_global_devices(f"before {path.name}")
        start = time.perf_counter()
        actions[name](path)
        elapsed = time.perf_counter() - start
        multihost_utils.sync_global_devices(f"after {path.name}")
        if jax.process_index() == 0:
            shutil.rmtree(path)
        return elapsed

    for name in CONTENDERS:  # warm both paths (thread pools, compiled copies) untimed
        timed_save(name, workdir / f"warmup_{name}")
    timings: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for round_index in range(rounds):
        order = CONTENDERS if round_index % 2 == 0 else CONTENDERS[::-1]
        for name in order:
            timings[name].append(timed_save(name, workdir / f"round{round_index}_{name}"))
    megabytes = sum(array.nbytes for array in arrays.values()) / 1e6
    out_file = scratch / f"timings_{jax.process_index()}.json"
    out_file.write_text(json.dumps({"megabytes": megabytes, "timings": timings}))


def run(quick: bool) -> list[dict[str, Any]]:
    """Runs the 2-process job and summarises it.

    Args:
        quick: Tiny arrays and one round: checks everything runs, measures nothing meaningful.

    Returns:
        One row per contender: ``contender``, ``processes``, ``megabytes``, ``rounds``,
        ``median_s`` and ``min_s`` (over rounds, of the slower process's time), ``mb_per_s``
        and ``ratio_to_orbax`` (median time over plain Orbax's).
    """
    from tests.multiprocess import launcher

    repo_root = pathlib.Path(__file__).resolve().parents[1]
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="pz_flax_multiprocess_save_"))
    try:
        flags = ["--quick"] if quick else []
        launcher.run_job(
            ["-m", "benchmarks.multiprocess_save", "--worker", str(scratch), *flags],
            num_processes=NUM_PROCESSES,
            devices_per_process=DEVICES_PER_PROCESS,
            timeout_s=JOB_TIMEOUT_S,
            log_dir=scratch / "logs",
            cwd=repo_root,
        )
        reports = [
            json.loads((scratch / f"timings_{i}.json").read_text()) for i in range(NUM_PROCESSES)
        ]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # A collective save is done when its slowest process is.
    slowest = {
        name: [max(times) for times in zip(*(r["timings"][name] for r in reports))]
        for name in CONTENDERS
    }
    megabytes = reports[0]["megabytes"]
    baseline = statistics.median(slowest["orbax"])
    return [
        {
            "contender": name,
            "processes": f"{NUM_PROCESSES} x {DEVICES_PER_PROCESS} cpu",
            "megabytes": round(megabytes, 1),
            "rounds": len(slowest[name]),
            "median_s": round(statistics.median(slowest[name]), 4),
            "min_s": round(min(slowest[name]), 4),
            "mb_per_s": round(megabytes / statistics.median(slowest[name]), 1),
            "ratio_to_orbax": round(statistics.median(slowest[name]) / baseline, 3),
        }
        for name in CONTENDERS
    ]


def main(argv: list[str] | None = None) -> None:
    """Prints the benchmark table (or, with ``--worker``, runs one process of the job)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument(
        "--worker",
        type=pathlib.Path,
        default=None,
        help="internal: run one process of the job, writing timings under this directory",
    )
    args = parser.parse_args(argv)
    if args.worker is not None:
        _worker(args.worker, args.quick)
        return
    rows = run(quick=args.quick)
    header = tuple(rows[0])
    widths = [max(len(h), *(len(str(row[h])) for row in rows)) for h in header]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(row[h]).ljust(w) for h, w in zip(header, widths)))


if __name__ == "__main__":
    main(sys.argv[1:])
