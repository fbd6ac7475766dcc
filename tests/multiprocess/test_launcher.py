"""Tests for the localhost job launcher: environment, failures and deadlines (no JAX inside)."""

import socket
import time

import pytest

from tests.multiprocess import launcher

PRINT_ROLE = (
    "import os; print(os.environ['JAX_PROCESS_ID'], os.environ['JAX_NUM_PROCESSES'],"
    " os.environ['JAX_COORDINATOR_ADDRESS'], os.environ['JAX_NUM_CPU_DEVICES'],"
    " 'XLA_FLAGS' in os.environ)"
)


def test_each_process_is_told_its_part_in_the_job(tmp_path):
    outcomes = launcher.run_job(
        ["-c", PRINT_ROLE], num_processes=2, devices_per_process=3, timeout_s=60, log_dir=tmp_path
    )
    assert [o.returncode for o in outcomes] == [0, 0]
    printed = [o.output.split() for o in outcomes]
    assert [words[:2] for words in printed] == [["0", "2"], ["1", "2"]]
    assert printed[0][2] == printed[1][2] and printed[0][2].startswith("127.0.0.1:")
    assert all(words[3:] == ["3", "False"] for words in printed)
    assert (tmp_path / "process_1.log").read_text() == outcomes[1].output


def test_a_single_process_job_has_no_coordinator(tmp_path):
    script = "import os; print('JAX_COORDINATOR_ADDRESS' in os.environ)"
    (outcome,) = launcher.run_job(
        ["-c", script], num_processes=1, devices_per_process=1, timeout_s=60, log_dir=tmp_path
    )
    assert outcome.output.strip() == "False"


def test_a_failing_process_fails_the_job_and_the_others_are_killed(tmp_path):
    script = (
        "import os, sys, time\n"
        "if os.environ['JAX_PROCESS_ID'] == '1': print('broken'); sys.exit(3)\n"
        "time.sleep(120)"
    )
    start = time.monotonic()
    with pytest.raises(launcher.JobFailedError, match=r"Process\(es\) \[1\] failed") as failure:
        launcher.run_job(
            ["-c", script], num_processes=2, devices_per_process=1, timeout_s=100, log_dir=tmp_path
        )
    assert time.monotonic() - start < launcher.FAILURE_GRACE_S + 30
    sleeper, failed = failure.value.outcomes
    assert failed.returncode == 3 and "broken" in failed.output
    assert sleeper.returncode < 0  # killed by a signal, not left running
    assert "--- process 1 (exit 3) ---\nbroken" in str(failure.value)


def test_a_job_past_its_deadline_is_killed(tmp_path):
    with pytest.raises(launcher.JobFailedError, match="ran past its 1 s deadline") as failure:
        launcher.run_job(
            ["-c", "import time; time.sleep(120)"],
            num_processes=2,
            devices_per_process=1,
            timeout_s=1,
            log_dir=tmp_path,
        )
    assert all(outcome.returncode < 0 for outcome in failure.value.outcomes)


def test_impossible_jobs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one process and one device each; got 0 x 4"):
        launcher.run_job(
            ["-c", "pass"], num_processes=0, devices_per_process=4, timeout_s=1, log_dir=tmp_path
        )


def test_free_port_can_be_bound():
    port = launcher.free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", port))
