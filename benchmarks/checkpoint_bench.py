"""Checkpoint throughput: pz_flax save/restore against plain Orbax on the same arrays.

pz_flax checkpoints are Orbax checkpoints plus a JSON structure manifest, a staging directory
flushed to disk, and an atomic rename. This benchmark measures what those cost: it saves and
restores the same arrays (a stack of named-axis ``Linear`` layers, 113 MB in the full run)

* with plain Orbax: ``StandardCheckpointHandler`` on a dict of arrays, restored into an
  abstract dict (what an Orbax user does);
* with ``pz_flax.checkpoint.save`` / ``restore`` (rebuilding the model from the manifest, no
  target), and ``restore`` into an abstract target.

Contenders run in round-robin order, each into a fresh directory, and each figure is the
median over rounds, so a burst of load from other processes spreads over all contenders.
The target is pz_flax <= 1.1x plain Orbax's time (ratio column).

Run: ``python -m benchmarks.checkpoint_bench`` (add ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from pz_flax.checkpoint import storage
from pz_flax.core import named_axes
from pz_flax.core import variables
from pz_flax.nn import grouping
from pz_flax.nn import linear_and_affine


def build_model(layers: int, rows: int, cols: int) -> tuple[Any, dict[str, jax.Array]]:
    """A stack of ``Linear`` layers and the same arrays as a plain dict for Orbax."""
    arrays = {
        f"layer{i}": jax.random.normal(jax.random.key(i), (rows, cols), jnp.float32)
        for i in range(layers)
    }
    model = grouping.Sequential(
        [
            linear_and_affine.Linear(
                weights=variables.Parameter(
                    label=f"{name}.weights", value=named_axes.wrap(array).tag("inputs", "outputs")
                ),
                in_axis_names=("inputs",),
                out_axis_names=("outputs",),
            )
            for name, array in arrays.items()
        ]
    )
    jax.block_until_ready(arrays)
    return model, arrays


def _timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(action())
    return time.perf_counter() - start


def run(quick: bool) -> list[dict[str, Any]]:
    """Measures save and restore throughput of pz_flax and plain Orbax side by side.

    Args:
        quick: A ~2 MB model and one round: checks everything runs, measures nothing
            meaningful.

    Returns:
        One row per contender: ``operation``, ``contender``, ``megabytes``, ``median_s``,
        ``mb_per_s`` and ``ratio_to_orbax`` (median time over plain Orbax's median time).
    """
    layers, rows, cols, rounds = (2, 256, 1024, 1) if quick else (9, 1024, 3072, 7)
    model, arrays = build_model(layers, rows, cols)
    megabytes = sum(array.nbytes for array in arrays.values()) / 1e6
    abstract_arrays = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), arrays
    )
    abstract_model = jax.eval_shape(lambda: model)
    orbax_handler = ocp.StandardCheckpointHandler()
    orbax_checkpointer = ocp.Checkpointer(orbax_handler)

    workdir = Path(tempfile.mkdtemp(prefix="pz_flax_checkpoint_bench_"))
    # Files kept between the save and restore halves of each round.
    orbax_dir, pz_dir = workdir / "orbax", workdir / "pz"

    def orbax_save():
        orbax_checkpointer.save(orbax_dir, args=ocp.args.StandardSave(arrays), force=True)

    def pz_save():
        storage.save(pz_dir, model, force=True)

    contenders: list[tuple[str, str, Callable[[], Any]]] = [
        ("save", "orbax", orbax_save),
        ("save", "pz_flax", pz_save),
        (
            "restore",
            "orbax",
            lambda: orbax_handler.restore(
                orbax_dir, args=ocp.args.StandardRestore(abstract_arrays)
            ),
        ),
        ("restore", "pz_flax", lambda: storage.restore(pz_dir)),
        ("restore", "pz_flax (abstract target)", lambda: storage.restore(pz_dir, abstract_model)),
    ]
    timings: dict[tuple[str, str], list[float]] = {(op, name): [] for op, name, _ in contenders}
    try:
        orbax_save()  # warm both paths (imports, thread pools) outside the timed rounds
        pz_save()
        for _ in range(rounds):
            for operation, name, action in contenders:
                if operation == "save":
                    shutil.rmtree(orbax_dir if name == "orbax" else pz_dir, ignore_errors=True)
                timings[operation, name].append(_timed(action))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rows_out = []
    for operation, name, _ in contenders:
        median = statistics.median(timings[operation, name])
        baseline = statistics.median(timings[operation, "orbax"])
        rows_out.append(
            {
                "operation": operation,
                "contender": name,
                "megabytes": round(megabytes, 1),
                "median_s": round(median, 4),
                "mb_per_s": round(megabytes / median, 1),
                "ratio_to_orbax": round(median / baseline, 3),
            }
        )
    return rows_out


def main(argv: list[str] | None = None) -> None:
    """Prints the benchmark table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args(argv)
    rows = run(quick=args.quick)
    header = ("operation", "contender", "megabytes", "median_s", "mb_per_s", "ratio_to_orbax")
    widths = [max(len(h), *(len(str(row[h])) for row in rows)) for h in header]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(row[h]).ljust(w) for h, w in zip(header, widths)))


if __name__ == "__main__":
    main()
