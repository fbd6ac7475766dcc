"""Smoke tests for the benchmarks: each one runs in quick mode and produces well-formed rows.

Nothing here asserts on a timing: the machine is shared and timings are noise at these sizes.
What is checked is that every contender ran, that the rows carry the fields the runner and
RESULTS.md rely on, that the target logic judges rows correctly, and that conversions really
reuse the NNX weight buffers.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import conversion
from benchmarks import harness
from benchmarks import named_ops
from benchmarks import run
from benchmarks import train_step
from benchmarks import tree_mode


def _assert_timing_row(row):
    for key in ("ms", "min_ms", "cpu_ms", "ratio", "min_ratio", "cpu_ratio"):
        assert math.isfinite(row[key]) and row[key] >= 0, (key, row)
    assert row["windows"] >= 1 and row["steps_per_window"] >= 1


def test_train_step_quick_times_every_contender():
    rows = train_step.run(quick=True)
    assert [row["contender"] for row in rows] == list(train_step.CONTENDERS)
    for row in rows:
        _assert_timing_row(row)
        assert row["benchmark"] == "train step"
    floor = next(row for row in rows if row["contender"] == train_step.RAW_JIT)
    assert floor["ratio"] == floor["min_ratio"] == floor["cpu_ratio"] == 1.0


def test_tree_mode_quick_times_every_contender_and_restores_graph_mode():
    from flax import nnx

    before = nnx.set_graph_mode.current_value()
    rows = tree_mode.run(quick=True)
    assert nnx.set_graph_mode.current_value() == before
    assert [row["contender"] for row in rows] == list(tree_mode.CONTENDERS)
    for row in rows:
        _assert_timing_row(row)
        assert row["benchmark"] == "tree-mode train step"


def test_targets_judge_tree_mode_rows_against_flax_tree_mode():
    case = "dispatch-bound 8x64, batch 32"
    rows = [
        _train_row(case, train_step.RAW_JIT, 1.0),
        _train_row(case, tree_mode.FLAX_TREE, 4.0),
        _train_row(case, tree_mode.PZ_FLAX_TREE_BARE, 4.2),
        _train_row(case, tree_mode.PZ_FLAX_TREE_MODULE, 4.8),
    ]
    targets = {t["target"]: t for t in run.evaluate_targets({"tree_mode": rows})}
    bare = targets[
        f"{tree_mode.PZ_FLAX_TREE_BARE}, dispatch-bound, <= 1.1x Flax's own tree-mode step"
    ]
    assert bare["status"] == "met" and bare["measured"].startswith("1.05x Flax")
    module = targets[
        f"{tree_mode.PZ_FLAX_TREE_MODULE}, dispatch-bound, <= 1.1x Flax's own tree-mode step"
    ]
    assert module["status"] == "missed" and "misses by 0.10x" in module["why"]


def test_named_ops_quick_covers_both_libraries_and_forward_contenders():
    rows = named_ops.run(quick=True)
    eager = [row for row in rows if row["benchmark"] == "eager named-axis op"]
    forward = [row for row in rows if row["benchmark"] == "jitted forward"]
    assert {row["contender"] for row in eager} == {named_ops.PENZAI, named_ops.PZ_FLAX}
    assert len(eager) == 2 * len({row["case"] for row in eager}) >= 2 * 8
    assert {"raw jax.jit", "pz_flax jax.jit (live model)"} <= {r["contender"] for r in forward}
    for row in rows:
        _assert_timing_row(row)


def test_conversion_quick_rows_show_no_copied_buffers():
    rows = conversion.run(quick=True)
    assert {row["contender"] for row in rows} == {"from_nnx", "to_nnx", "nnx.split + nnx.merge"}
    for row in rows:
        assert row["weight_arrays"] == 2 * row["layers"]
        assert row["copied_buffers"] == 0, row
        assert row["ms"] > 0


def test_copied_buffers_counts_a_real_copy():
    weights = jnp.arange(4.0)
    assert conversion.copied_buffers([weights], [weights]) == 0
    assert conversion.copied_buffers([weights], [weights + 0]) == 1


def test_time_interleaved_gives_each_contender_every_round():
    counter = {"a": 0, "b": 0}

    def step_for(name):
        def step():
            counter[name] += 1
            return jnp.zeros(())

        return step

    timings = harness.time_interleaved(
        [harness.Contender(name, step_for(name)) for name in counter],
        rounds=3,
        window_seconds=0.001,
        warmup_steps=1,
    )
    assert [timing.name for timing in timings] == ["a", "b"]
    assert all(timing.windows == 3 for timing in timings)
    assert all(count > 3 for count in counter.values())


def test_time_interleaved_rejects_zero_rounds():
    with pytest.raises(ValueError, match="rounds"):
        harness.time_interleaved([], rounds=0, window_seconds=0.01)


def test_rows_against_floor_names_a_missing_floor():
    timing = harness.Timing("a", 1.0, 1.0, (1.0,), 1.0, 1, 1)
    with pytest.raises(ValueError, match="'raw'"):
        harness.rows_against_floor([timing], "raw")


def _train_row(case, contender, cpu_ms):
    return {
        "case": case,
        "contender": contender,
        "cpu_ms": cpu_ms,
        "ms": cpu_ms,
        "cpu_ratio": cpu_ms,
        "min_ratio": cpu_ms,
        "ratio": cpu_ms,
    }


def test_targets_judge_train_step_rows():
    case = "dispatch-bound 8x64, batch 32"
    rows = [
        _train_row(case, "raw jax.jit", 1.0),
        _train_row(case, "pz_flax StatefulTrainer", 1.1),
        _train_row(case, "penzai StatefulTrainer", 12.0),
        _train_row(case, "pz_flax + jax.jit (model pytree)", 3.0),
        _train_row(case, "flax NNX model pytree + jax.jit", 2.5),
        _train_row(case, "pz_flax + jax.jit (frozen model pytree)", 3.2),
        _train_row(case, "penzai + jax.jit (frozen model pytree)", 8.0),
        _train_row("depth 100x16, batch 32", "raw jax.jit", 10.0),
        _train_row("depth 1000x16, batch 32", "raw jax.jit", 100.0),
        _train_row("depth 100x16, batch 32", "pz_flax StatefulTrainer", 10.0),
        _train_row("depth 1000x16, batch 32", "pz_flax StatefulTrainer", 190.0),
    ]
    by_target = {t["target"]: t for t in run.evaluate_targets({"train_step": rows})}
    trainer = by_target[
        "pz_flax StatefulTrainer step, dispatch-bound, <= 1.15x raw jax.jit (aim 1.02x)"
    ]
    assert trainer["status"] == "met" and "aim 1.02x missed" in trainer["measured"]
    frozen = next(t for name, t in by_target.items() if "(frozen model pytree)," in name)
    assert frozen["status"] == "missed" and "misses by 1.90x" in frozen["why"]
    against_penzai = next(t for name, t in by_target.items() if "than penzai 0.2.5's" in name)
    assert against_penzai["status"] == "met" and "2.5x faster" in against_penzai["measured"]
    # The live model is judged against Flax's own model in the same loop: 3.0 / 2.5 = 1.2x.
    live = next(t for name, t in by_target.items() if "live model pytree" in name)
    assert live["status"] == "missed" and "1.20x Flax" in live["measured"]
    penzai = next(t for name, t in by_target.items() if "penzai" in name)
    assert penzai["status"] == "met"
    depth = next(t for name, t in by_target.items() if "growth" in name)
    assert depth["status"] == "missed" and "2.00x" in depth["measured"]


def test_targets_judge_conversion_and_checkpoint_rows():
    conversion_rows = [
        {
            "case": f"{n} layers x 16 wide",
            "layers": n,
            "contender": op,
            "us_per_layer": us,
            "copied_buffers": copies,
            "weight_arrays": 2 * n,
            "weight_mib": 1.0,
            "peak_extra_fraction": 0.01,
        }
        for n, us, copies in ((10, 5.0, 0), (100, 5.0, 0), (1000, 20.0, 1))
        for op in ("from_nnx", "to_nnx")
    ]
    checkpoint_rows = [
        {"operation": "save", "contender": "orbax", "ratio_to_orbax": 1.0},
        {"operation": "save", "contender": "pz_flax", "ratio_to_orbax": 1.3, "mb_per_s": 9},
    ]
    targets = run.evaluate_targets(
        {"conversion": conversion_rows, "checkpoint_bench": checkpoint_rows}
    )
    linear = next(t for t in targets if t["target"].startswith("from_nnx time linear"))
    assert linear["status"] == "missed" and "4.00x" in linear["why"]
    copies = next(t for t in targets if "copy no weight buffer" in t["target"])
    assert copies["status"] == "missed" and copies["measured"].startswith("2 of")
    memory = next(t for t in targets if "peak extra memory" in t["target"])
    assert memory["status"] == "met"
    (checkpoint,) = [t for t in targets if t["target"].startswith("checkpoint")]
    assert checkpoint["status"] == "missed" and "1.30x" in checkpoint["measured"]


def test_main_writes_a_results_file(tmp_path, capsys):
    output = tmp_path / "RESULTS.md"
    assert run.main(["--quick", "--only", "conversion", "--output", str(output)]) == 0
    text = output.read_text()
    assert "## Machine and versions" in text and "## Targets" in text
    assert "| case | layers | contender |" in text
    assert "== conversion ==" in capsys.readouterr().out


def test_main_rejects_an_unknown_benchmark():
    with pytest.raises(SystemExit):
        run.main(["--quick", "--only", "no_such_bench"])


def test_peak_memory_sees_a_fresh_allocation():
    if not conversion.peak_memory_supported():
        pytest.skip("needs Linux /proc/self/clear_refs")
    sixteen_mib = 4 * 2**20
    result, seconds, extra = conversion.run_with_peak_memory(
        lambda: np.ones(sixteen_mib, np.float32)
    )
    assert result.nbytes == 16 * 2**20 and seconds >= 0
    assert extra >= 15 * 2**20
