"""Timing helpers shared by every benchmark: interleaved windows, medians, ratios.

The machine these benchmarks run on is shared, so any single timing can be inflated by someone
else's work. Two things make the comparisons fair anyway:

* Contenders are timed in *round-robin windows*: one window of contender A, then one of B, then
  one of C, and again, for several rounds. A burst of outside load lands on whichever windows
  were running at the time, spread across contenders instead of ruining one of them.
* Each contender's figure is the *median* over its windows, which ignores the few windows that
  a burst hit hard.

A window runs a step function several times back to back and blocks on the last result only,
so JAX's asynchronous dispatch overlaps Python work with device work exactly as it does in a
real training loop; the reported figure is wall time per step at steady state.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Contender:
    """One way of doing the thing being measured.

    Attributes:
        name: Row label in the results table.
        step: Runs one step and returns something to block on (arrays, or a pytree of them).
    """

    name: str
    step: Callable[[], Any]


@dataclasses.dataclass(frozen=True)
class Timing:
    """The per-step timings of one contender.

    Attributes:
        name: The contender's name.
        median_ms: Median over windows of the wall time per step, in milliseconds.
        min_ms: The fastest window's wall time per step, in milliseconds.
        wall_samples_ms: The wall time per step of each window, in round order.
        cpu_median_ms: Median over windows of this process's CPU time per step, in
            milliseconds. Other sessions' load inflates wall time by making this process wait
            for a core but barely changes CPU time, which makes it a cross-check on a shared
            machine. It counts every thread, so where XLA computes while Python dispatches the
            next step it exceeds wall time.
        windows: How many timed windows the median is taken over.
        steps_per_window: How many steps each window runs.
    """

    name: str
    median_ms: float
    min_ms: float
    wall_samples_ms: tuple[float, ...]
    cpu_median_ms: float
    windows: int
    steps_per_window: int


def _run_window(step: Callable[[], Any], steps: int) -> tuple[float, float]:
    """Runs ``steps`` steps, blocks on the last result; returns wall and CPU seconds per step."""
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    result = None
    for _ in range(steps):
        result = step()
    jax.block_until_ready(result)
    return (
        (time.perf_counter() - start_wall) / steps,
        (time.process_time() - start_cpu) / steps,
    )


def _steps_filling(step: Callable[[], Any], seconds: float, max_steps: int) -> int:
    """How many steps of ``step`` fill ``seconds``, measured by running them (doubling)."""
    steps = 1
    while steps < max_steps:
        if _run_window(step, steps)[0] * steps >= seconds / 2:
            per_step, _ = _run_window(step, steps)
            return min(max_steps, max(1, round(seconds / per_step)))
        steps *= 2
    return max_steps


def time_interleaved(
    contenders: list[Contender],
    *,
    rounds: int,
    window_seconds: float,
    warmup_steps: int = 3,
    max_steps_per_window: int = 10_000,
) -> list[Timing]:
    """Times contenders against each other in round-robin windows.

    Args:
        contenders: The contenders; each one's first warm-up call compiles it.
        rounds: How many windows each contender gets; each round visits every contender once,
            starting from a different one so no contender always follows the same neighbour.
        window_seconds: Target length of a window. Each contender's steps per window are sized
            from a calibration run after warm-up, so slow and fast contenders get comparably
            long windows.
        warmup_steps: Untimed steps per contender (compilation, caches) before the rounds.
        max_steps_per_window: Upper bound on steps per window.

    Returns:
        One `Timing` per contender, in the order given.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}.")
    steps_per_window = []
    for contender in contenders:
        jax.block_until_ready(contender.step())  # Compiles.
        _run_window(contender.step, warmup_steps)
        steps_per_window.append(
            _steps_filling(contender.step, window_seconds, max_steps_per_window)
        )

    per_step_seconds: list[list[tuple[float, float]]] = [[] for _ in contenders]
    for round_index in range(rounds):
        for offset in range(len(contenders)):
            index = (round_index + offset) % len(contenders)
            # Collect the previous window's young garbage now, so that a collection it provoked
            # does not land in this contender's window (a full collection would cost more than a
            # window on a big heap). The collector stays on inside windows: the garbage a
            # contender makes per step is part of its cost.
            gc.collect(1)
            per_step_seconds[index].append(
                _run_window(contenders[index].step, steps_per_window[index])
            )

    return [
        Timing(
            name=contender.name,
            median_ms=1e3 * statistics.median(wall for wall, _ in samples),
            min_ms=1e3 * min(wall for wall, _ in samples),
            wall_samples_ms=tuple(1e3 * wall for wall, _ in samples),
            cpu_median_ms=1e3 * statistics.median(cpu for _, cpu in samples),
            windows=len(samples),
            steps_per_window=steps,
        )
        for contender, samples, steps in zip(
            contenders, per_step_seconds, steps_per_window, strict=True
        )
    ]


def time_once(function: Callable[[], Any], *, repeats: int) -> float:
    """Median wall time in milliseconds of ``function()`` (blocked on) over ``repeats`` calls."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function())
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def rows_against_floor(
    timings: list[Timing], floor_name: str, **labels: Any
) -> list[dict[str, Any]]:
    """Turns timings into result rows with ratios to the contender named ``floor_name``.

    Args:
        timings: One problem's timings, including the floor's.
        floor_name: The contender every ratio is taken against.
        **labels: Columns copied into every row (``benchmark``, ``case``, ...).

    Returns:
        One dict per timing: the labels, ``contender``, wall and CPU milliseconds per step, and
        three ratios to the floor: ``ratio``, the median over rounds of this contender's window
        time over the floor's window time *in the same round* (pairing windows that ran
        seconds apart cancels slow drifts in outside load); ``min_ratio``, best window over
        best window; and ``cpu_ratio``, median CPU time over median CPU time.
    """
    by_name = {timing.name: timing for timing in timings}
    if floor_name not in by_name:
        raise ValueError(f"No timing named {floor_name!r} among {sorted(by_name)}.")
    floor = by_name[floor_name]
    return [
        {
            **labels,
            "contender": timing.name,
            "ms": timing.median_ms,
            "min_ms": timing.min_ms,
            "cpu_ms": timing.cpu_median_ms,
            "ratio": statistics.median(
                mine / theirs
                for mine, theirs in zip(timing.wall_samples_ms, floor.wall_samples_ms, strict=True)
            ),
            "min_ratio": timing.min_ms / floor.min_ms,
            "cpu_ratio": timing.cpu_median_ms / floor.cpu_median_ms,
            "windows": timing.windows,
            "steps_per_window": timing.steps_per_window,
        }
        for timing in timings
    ]
