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
        min_ms: The fastest window's time per step, in milliseconds.
        windows: How many timed windows the median is taken over.
        steps_per_window: How many steps each window runs.
    """

    name: str
    median_ms: float
    min_ms: float
    windows: int
    steps_per_window: int


def _run_window(step: Callable[[], Any], steps: int) -> float:
    """Runs ``steps`` steps, blocks on the last result, returns the seconds per step."""
    start = time.perf_counter()
    result = None
    for _ in range(steps):
        result = step()
    jax.block_until_ready(result)
    return (time.perf_counter() - start) / steps


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
            from its warm-up speed, so slow and fast contenders get comparably long windows.
        warmup_steps: Untimed steps per contender (compilation, caches) before the rounds.
        max_steps_per_window: Upper bound on steps per window.

    Returns:
        One `Timing` per contender, in the order given.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}.")
    steps_per_window = []
    for contender in contenders:
        jax.block_until_ready(contender.step())
        per_step = _run_window(contender.step, max(1, warmup_steps))
        steps = int(window_seconds / max(per_step, 1e-7))
        steps_per_window.append(min(max_steps_per_window, max(1, steps)))

    per_step_seconds: list[list[float]] = [[] for _ in contenders]
    for round_index in range(rounds):
        for offset in range(len(contenders)):
            index = (round_index + offset) % len(contenders)
            # Collect the previous window's garbage now, so that a collection it provoked does
            # not land in this contender's window. The collector stays on inside windows: the
            # garbage a contender makes per step is part of its cost.
            gc.collect()
            per_step_seconds[index].append(
                _run_window(contenders[index].step, steps_per_window[index])
            )

    return [
        Timing(
            name=contender.name,
            median_ms=1e3 * statistics.median(samples),
            min_ms=1e3 * min(samples),
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
