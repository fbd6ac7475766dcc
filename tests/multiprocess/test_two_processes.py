"""Training and checkpointing in a 2-process x 4-CPU-device job on localhost (jax.distributed).

The job (`two_process_job`) runs `scenarios` in both processes; the reference runs the same
scenarios here, in one process with 8 devices. Values must agree to float32 rounding.
"""

import pathlib

import jax
import numpy as np
import pytest

from tests.multiprocess import launcher
from tests.multiprocess import scenarios
from tests.multiprocess import two_process_job
from tests.toolshed import helpers

pytestmark = pytest.mark.slow

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 300
LABELS = ("hidden.weights", "out.weights")
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Runs the job once; returns its directory and what each process recorded."""
    out_dir = tmp_path_factory.mktemp("two_process_job")
    launcher.run_job(
        ["-m", "tests.multiprocess.two_process_job", str(out_dir), "--checkpoints"],
        num_processes=2,
        devices_per_process=4,
        timeout_s=JOB_TIMEOUT_S,
        log_dir=out_dir / "logs",
        cwd=REPO_ROOT,
    )
    return out_dir, [dict(np.load(out_dir / f"process_{i}.npz")) for i in range(2)]


@pytest.fixture(scope="module")
def reference():
    """The single-process run of the same training, on this session's 8 devices."""
    assert jax.device_count() == 8
    model, losses, rows = scenarios.train(scenarios.data_across_processes_mesh())
    return {"losses": losses, "rows": rows, **scenarios.global_values(model)}


def assert_params_close(results, prefix, expected):
    for label in LABELS:
        np.testing.assert_allclose(
            results[f"{prefix}/{label}"], expected[label], err_msg=f"{prefix}/{label}", **TOLERANCE
        )


def test_sharded_init_equals_single_process_init(job):
    _, processes = job
    unsharded = {
        label: np.asarray(param.get_raw_value())
        for label, param in helpers.params_by_label(helpers.make_mlp(0)).items()
    }
    for results in processes:
        for label in LABELS:
            np.testing.assert_array_equal(results[f"init/{label}"], unsharded[label])


@pytest.mark.parametrize("mesh_name", ["model_across", "data_across"])
def test_training_from_per_process_rows_matches_one_process(job, reference, mesh_name):
    _, processes = job
    assert reference["rows"] == slice(0, 16)
    for results in processes:
        np.testing.assert_allclose(results[f"{mesh_name}/losses"], reference["losses"], **TOLERANCE)
        assert_params_close(results, mesh_name, reference)
    # Where "data" lies inside each process, both load every row; where it spans the two
    # processes, each loads its own half.
    expected_rows = {"model_across": [[0, 16], [0, 16]], "data_across": [[0, 8], [8, 16]]}
    assert [results[f"{mesh_name}/rows"].tolist() for results in processes] == expected_rows[
        mesh_name
    ]


def test_rows_interleaved_over_processes_are_refused(job):
    _, processes = job
    for index, results in enumerate(processes):
        message = str(results["interleaved_error"])
        assert f"this process (index {index}) holds the non-contiguous ranges" in message
        assert "Axis 'data'" in message


def test_checkpoint_saved_by_both_processes_restores_into_the_same_sharding(job, reference):
    _, processes = job
    for results in processes:
        assert_params_close(results, "restored", reference)
        # Restored without a target: each process gets the values on one of its own devices.
        assert_params_close(results, "restored_local", reference)


def test_checkpoint_manager_from_both_processes(job, reference):
    _, processes = job
    for results in processes:
        assert results["managed/steps"].tolist() == [2, 3]
        assert_params_close(results, "managed", reference)


def test_nnx_checkpoint_written_and_read_by_both_processes(job, reference):
    _, processes = job
    for results in processes:
        assert_params_close(results, "nnx", reference)
        assert_params_close(results, "nnx_local", reference)


def test_job_checkpoint_restores_in_a_fresh_single_device_process(job, reference, tmp_path):
    out_dir, _ = job
    launcher.run_job(
        [
            "-m", "tests.multiprocess.fresh_restore",
            str(out_dir / two_process_job.CHECKPOINT), str(tmp_path / "restored.npz"),
        ],
        num_processes=1,
        devices_per_process=1,
        timeout_s=120,
        log_dir=tmp_path / "logs",
        cwd=REPO_ROOT,
    )  # fmt: skip
    restored = dict(np.load(tmp_path / "restored.npz"))
    assert restored.keys() == set(LABELS)
    assert_params_close({f"fresh/{k}": v for k, v in restored.items()}, "fresh", reference)
