"""NNX <-> pz_flax conversion: time and memory against model size, and proof of zero copies.

``pz_flax.interop.from_nnx`` turns an NNX module into a pz_flax layer and ``to_nnx`` turns it
back. Both should cost time proportional to the number of modules and parameters (a walk over
the object graph), and neither should copy a weight: the pz_flax ``Parameter``s hold the very
arrays the NNX ``nnx.Param``s held. The reference point is NNX's own functional round trip,
``nnx.split`` followed by ``nnx.merge``, which walks the same graph and copies nothing either.

For each model size this reports the median time of each operation, the time per layer (so
linear scaling shows as a flat column), how many weight buffers the conversion copied (by
comparing ``unsafe_buffer_pointer()`` of every array before and after), and the peak extra
resident memory during the conversion as a fraction of the weights' size. Peak memory is read
from Linux's ``VmHWM`` (high-water mark of resident memory), which is reset before each
measurement through ``/proc/self/clear_refs``; it counts XLA's host buffers, which Python's
``tracemalloc`` cannot see, so a copied weight would show up in it.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _resident_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line.")
    return int(match.group(1))


def peak_memory_supported() -> bool:
    """Whether this process can reset and read its resident-memory high-water mark (Linux)."""
    try:
        _CLEAR_REFS.write_text("5")
        _resident_kib("VmHWM")
    except OSError:
        return False
    return True


def run_with_peak_memory(action: Callable[[], Any]) -> tuple[Any, float, int]:
    """Runs ``action`` once; returns its result, the seconds it took, and peak extra bytes.

    The peak is the resident high-water mark during the call minus the resident size just
    before it (the result is kept alive, so memory it legitimately holds counts too).
    Conversions do no device work, so nothing needs blocking on.
    """
    gc.collect()
    _CLEAR_REFS.write_text("5")  # Resets VmHWM to the current resident size.
    before = _resident_kib("VmRSS")
    start = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - start
    return result, seconds, 1024 * (_resident_kib("VmHWM") - before)


def _median_seconds(action: Callable[[], Any], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def build_nnx_mlp(layers: int, width: int, zeros: bool = False) -> nnx.Sequential:
    """An ``nnx.Sequential`` of ``layers`` ``nnx.Linear(width, width)`` with ReLU between."""
    rngs = nnx.Rngs(0)
    init_kwargs = (
        {"kernel_init": nnx.initializers.zeros_init()} if zeros else {}
    )  # Zeros initialise a gigabyte of weights far faster than random draws do.
    modules: list[Any] = []
    for index in range(layers):
        modules.append(nnx.Linear(width, width, rngs=rngs, **init_kwargs))
        if index < layers - 1:
            modules.append(nnx.relu)
    return nnx.Sequential(*modules)


def _buffer_pointers(arrays: list[jax.Array]) -> list[int]:
    return [array.unsafe_buffer_pointer() for array in arrays]


def _weight_arrays_of_pz_layer(layer: Any) -> list[jax.Array]:
    from pz_flax.core import variables

    _, found = variables.unbind_variables(layer)
    return [variable.get_raw_value() for variable in found]


def copied_buffers(original: list[jax.Array], converted: list[jax.Array]) -> int:
    """How many of ``original``'s buffers are not among ``converted``'s (by buffer address)."""
    converted_pointers = set(_buffer_pointers(converted))
    return sum(pointer not in converted_pointers for pointer in _buffer_pointers(original))


def measure_size(layers: int, width: int, *, repeats: int, zeros: bool = False) -> list[dict]:
    """Converts one model both ways and through split/merge; returns one row per operation."""
    from pz_flax import interop

    model = build_nnx_mlp(layers, width, zeros=zeros)
    nnx_arrays = jax.tree_util.tree_leaves(nnx.state(model))
    jax.block_until_ready(nnx_arrays)
    weight_bytes = sum(array.nbytes for array in nnx_arrays)
    measure_memory = peak_memory_supported()

    def memory_of(action):
        if not measure_memory:
            return None
        _, _, extra = run_with_peak_memory(action)
        return extra

    layer = interop.from_nnx(model)
    back = interop.to_nnx(layer)

    def split_merge():
        graphdef, state = nnx.split(model)
        return nnx.merge(graphdef, state)

    merged = split_merge()
    operations: list[tuple[str, Callable[[], Any], list[jax.Array]]] = [
        ("from_nnx", lambda: interop.from_nnx(model), _weight_arrays_of_pz_layer(layer)),
        ("to_nnx", lambda: interop.to_nnx(layer), jax.tree_util.tree_leaves(nnx.state(back))),
        (
            "nnx.split + nnx.merge",
            split_merge,
            jax.tree_util.tree_leaves(nnx.state(merged)),
        ),
    ]
    rows = []
    case = f"{layers} layers x {width} wide ({weight_bytes / 2**20:.1f} MiB)"
    for name, action, converted_arrays in operations:
        seconds = _median_seconds(action, repeats)
        extra = memory_of(action)
        rows.append(
            {
                "benchmark": "conversion",
                "case": case,
                "layers": layers,
                "contender": name,
                "ms": 1e3 * seconds,
                "us_per_layer": 1e6 * seconds / layers,
                "weight_arrays": len(nnx_arrays),
                "copied_buffers": copied_buffers(nnx_arrays, converted_arrays),
                "weight_mib": weight_bytes / 2**20,
                "peak_extra_mib": None if extra is None else extra / 2**20,
                "peak_extra_fraction": None if extra is None else extra / weight_bytes,
            }
        )
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    """Runs the conversion benchmarks.

    Args:
        quick: Two tiny models and one repeat: checks everything runs.

    Returns:
        One row per (model size, operation).
    """
    if quick:
        return measure_size(2, 8, repeats=1) + measure_size(4, 8, repeats=1)
    rows = []
    for layers in (10, 100, 1000):
        rows += measure_size(layers, 16, repeats=5 if layers < 1000 else 3)
    # About a gibibyte of weights: 16 layers of 4096 x 4096 float32 (64 MiB each).
    rows += measure_size(16, 4096, repeats=3, zeros=True)
    return rows
