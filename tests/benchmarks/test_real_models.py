"""Tests for benchmarks/real_models.py and the targets its rows are judged by."""

import pytest

from benchmarks import real_models
from benchmarks import run


def _row(model, measurement, contender, ratio):
    return {
        "benchmark": "real_models",
        "model": model,
        "measurement": measurement,
        "contender": contender,
        "ratio": ratio,
        "min_ratio": ratio,
        "cpu_ratio": ratio,
    }


def test_targets_hold_every_model_to_each_bound():
    rows = [
        _row("gemma", "eager forward", real_models.PZ_EAGER, 1.1),
        _row("mnist", "eager forward", real_models.PZ_EAGER, 1.3),
        _row("gemma", "jitted forward", real_models.PZ_JIT, 0.4),
        _row("gemma", "conversion", real_models.FROM_NNX, 2.5),
        _row("gemma", "eager forward", real_models.NNX_EAGER, 1.0),
    ]
    targets = {target["target"]: target for target in run.evaluate_targets({"real_models": rows})}
    eager = next(t for name, t in targets.items() if "eager forward" in name)
    assert eager["status"] == "missed"
    assert eager["measured"] == "gemma: 1.10x, mnist: 1.30x"
    assert "worst is mnist" in eager["why"]
    jitted = next(t for name, t in targets.items() if "nnx.jit" in name)
    conversion = next(t for name, t in targets.items() if "from_nnx" in name)
    assert jitted["status"] == conversion["status"] == "met"


def test_no_rows_no_real_model_targets():
    assert not [target for target in run.evaluate_targets({}) if "real-style" in target["target"]]


def test_real_models_is_a_listed_benchmark():
    assert "real_models" in run.BENCHMARKS


@pytest.mark.slow
def test_quick_run_measures_each_route_against_nnx():
    rows = real_models.run(quick=True)
    measured = {(row["model"], row["measurement"], row["contender"]) for row in rows}
    for model in ("mnist", "gemma"):
        for measurement, contenders in (
            ("eager forward", (real_models.NNX_EAGER, real_models.PZ_EAGER)),
            ("jitted forward", (real_models.NNX_JIT, real_models.PZ_JIT)),
            ("conversion", (real_models.SPLIT_MERGE, real_models.FROM_NNX)),
        ):
            for contender in contenders:
                assert (model, measurement, contender) in measured
    floors = [row for row in rows if row["contender"] in real_models._FLOORS.values()]
    assert floors and all(row["ratio"] == 1.0 for row in floors)
