"""The training examples, unchanged, as 2-process x 2-CPU-device JAX jobs on localhost.

Each process loads its own rows and takes part in every checkpoint save; process 0 alone
prints, draws the progress bar and writes side files.
"""

import json

import numpy as np
import pytest

from pz_flax import checkpoint
from pz_flax import pz
from tests.examples import helpers
from tests.multiprocess import launcher

pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 300


def run_example(file_name: str, flags: list[str], log_dir) -> list[str]:
    """Runs an example as a 2-process job; returns each process's output."""
    outcomes = launcher.run_job(
        [str(helpers.EXAMPLES_DIR / file_name), *flags],
        num_processes=2,
        devices_per_process=2,
        timeout_s=JOB_TIMEOUT_S,
        log_dir=log_dir,
        cwd=helpers.EXAMPLES_DIR.parent,
    )
    return [outcome.output for outcome in outcomes]


def test_train_transformer_as_a_two_process_job(tmp_path):
    out_dir = tmp_path / "out"
    primary, other = run_example(
        "train_transformer.py",
        ["--quick", "--steps", "6", "--sample-chars", "5", "--out-dir", str(out_dir)],
        tmp_path / "logs",
    )
    assert "mesh: 4 cpu device(s) in 2 process(es)" in primary
    assert primary.count("6/6 loss") == 1 and "\r" not in primary
    for line in ("corpus:", "mesh:", "loss:", "outputs:"):
        assert line not in other
    assert "6/6" not in other
    samples = json.loads((out_dir / "samples.json").read_text())["samples"]
    assert len(samples) == 2 and all(text.startswith("the ") for text in samples)
    _, params = pz.unbind_params(checkpoint.restore(out_dir / "checkpoint"))
    assert params and all(np.all(np.isfinite(p.get_raw_value())) for p in params)


def test_quickstart_as_a_two_process_job(tmp_path):
    out_dir = tmp_path / "out"
    primary, other = run_example(
        "quickstart.py", ["--quick", "--epochs", "2", "--out-dir", str(out_dir)], tmp_path / "logs"
    )
    # The example exits non-zero if the restored or converted model disagreed.
    assert "predictions identical: True" in primary and "test accuracy" in primary
    assert "test accuracy" not in other and "2/2" not in other
    assert (out_dir / "model.html").is_file() and (out_dir / "loss_curve.png").is_file()


def test_finetune_nnx_checkpoint_as_a_two_process_job(tmp_path):
    out_dir = tmp_path / "out"
    primary, other = run_example(
        "finetune_nnx_checkpoint.py", ["--quick", "--out-dir", str(out_dir)], tmp_path / "logs"
    )
    for stage in range(1, 7):
        assert f"[{stage}]" in primary and f"[{stage}]" not in other
    assert "all of them adapter parameters: True" in primary
