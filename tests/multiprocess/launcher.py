"""Starts a JAX multi-process job on localhost, every process bounded by one deadline.

Each process is an ordinary Python interpreter told its part in the job through the
environment that `pz_flax.toolshed.sharding_util.initialize_distributed_from_environment`
reads (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), with its own
number of fake CPU devices. Collectives between CPU processes go through gloo, JAX's default
CPU collectives implementation since 0.4.x (set explicitly so an older default cannot hang the
job). Only the processes started here are ever killed, each by its own PID.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from collections.abc import Sequence

# How long the others may keep running after one process fails: long enough to print their
# own error, short enough not to wait out a collective that will never complete.
FAILURE_GRACE_S = 5.0
POLL_INTERVAL_S = 0.1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class ProcessOutcome:
    """How one process of the job ended.

    Attributes:
        process_id: Its index in the job.
        returncode: Its exit status (negative: killed by that signal).
        output: Its stdout and stderr, interleaved.
    """

    process_id: int
    returncode: int
    output: str


class JobFailedError(RuntimeError):
    """A process of the job failed or the job ran past its deadline; carries every outcome."""

    def __init__(self, reason: str, outcomes: Sequence[ProcessOutcome], tail_chars: int = 4000):
        self.outcomes = tuple(outcomes)
        details = "\n".join(
            f"--- process {o.process_id} (exit {o.returncode}) ---\n{o.output[-tail_chars:]}"
            for o in outcomes
        )
        super().__init__(f"{reason}\n{details}")


def process_environment(
    process_id: int, num_processes: int, port: int, devices_per_process: int
) -> dict[str, str]:
    """The environment of one process: the job's coordinates, CPU only, its own device count."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the test session's device count is not the job's
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(devices_per_process),
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        PYTHONUNBUFFERED="1",
    )
    if num_processes > 1:
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(num_processes),
            JAX_PROCESS_ID=str(process_id),
        )
    return env


def run_job(
    argv: Sequence[str],
    *,
    num_processes: int,
    devices_per_process: int,
    timeout_s: float,
    log_dir: str | os.PathLike,
    cwd: str | os.PathLike | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> list[ProcessOutcome]:
    """Runs ``python argv...`` as every process of a job and waits for all of them.

    Args:
        argv: The interpreter's arguments (a script and its flags, or ``-m module ...``).
        num_processes: Processes in the job; 1 runs a plain single process (no coordinator).
        devices_per_process: Fake CPU devices in each process.
        timeout_s: The deadline for the whole job, from the first start.
        log_dir: Where each process's output file goes (``process_<i>.log``).
        cwd: Working directory of the processes.
        extra_env: More environment variables for every process.

    Returns:
        Every process's outcome, in process order, when all exited with status 0.

    Raises:
        JobFailedError: If a process exits with a non-zero status (the others are killed after
            `FAILURE_GRACE_S`) or the deadline passes (all are killed); the message holds the
            end of every process's output.
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(
            f"A job needs at least one process and one device each; got {num_processes} x"
            f" {devices_per_process}."
        )
    log_dir = pathlib.Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    processes: list[subprocess.Popen] = []
    log_paths = [log_dir / f"process_{i}.log" for i in range(num_processes)]
    try:
        for process_id, log_path in enumerate(log_paths):
            env = process_environment(process_id, num_processes, port, devices_per_process)
            env.update(extra_env or {})
            with log_path.open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, *argv],
                        cwd=cwd,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
        failure = _wait_for_all(processes, time.monotonic() + timeout_s, timeout_s)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    outcomes = [
        ProcessOutcome(i, process.returncode, path.read_text(errors="replace"))
        for i, (process, path) in enumerate(zip(processes, log_paths, strict=True))
    ]
    if failure is not None:
        raise JobFailedError(failure, outcomes)
    return outcomes


def _wait_for_all(
    processes: Sequence[subprocess.Popen], deadline: float, timeout_s: float
) -> str | None:
    """Waits until every process exited; returns why the job failed, or None."""
    first_failure_at = None
    while True:
        codes = [process.poll() for process in processes]
        if all(code is not None for code in codes):
            failed = [i for i, code in enumerate(codes) if code != 0]
            return f"Process(es) {failed} failed." if failed else None
        now = time.monotonic()
        if any(code not in (None, 0) for code in codes):
            first_failure_at = first_failure_at or now
            if now - first_failure_at > FAILURE_GRACE_S:
                failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
                return f"Process(es) {failed} failed; the others were killed."
        if now > deadline:
            return f"The job ran past its {timeout_s:.0f} s deadline; every process was killed."
        time.sleep(POLL_INTERVAL_S)
