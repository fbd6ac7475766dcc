"""Named-axis operations and forward passes: pz_flax against penzai 0.2.5 and raw JAX.

Two questions, answered side by side:

* **Eager named-axis ops.** Someone exploring a model in a notebook calls ``nmap``, tags and
  untags axes, and does arithmetic on ``NamedArray``s one op at a time, outside ``jax.jit``.
  Each call's Python overhead (aligning axes, building the result) is the cost there. Every
  op runs the same code against ``pz_flax.pz`` and ``penzai.pz``; the ratio is pz_flax's time
  over penzai's.
* **Jitted forward pass.** A forward pass of the 8-layer, 64-wide MLP under ``jax.jit`` is
  dispatch-bound, so what separates the contenders is how much Python work each call does to
  hand the model to JAX. Ratios are to a raw ``jax.jit`` over a list of arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import harness
from benchmarks import train_step

PENZAI = "penzai 0.2.5"
PZ_FLAX = "pz_flax"


def _namespaces() -> dict[str, Any]:
    from penzai import pz as penzai_pz

    from pz_flax import pz

    return {PENZAI: penzai_pz, PZ_FLAX: pz}


def _eager_ops(pz_namespace, size: int) -> dict[str, Callable[[], Any]]:
    """The eager ops to time, each a no-argument callable, written once for either library."""
    nx = pz_namespace.nx
    rng = np.random.default_rng(0)
    batch_features = jnp.asarray(rng.normal(size=(size, size)), jnp.float32)
    features = jnp.asarray(rng.normal(size=(size,)), jnp.float32)
    matrix = nx.wrap(batch_features).tag("batch", "features")
    vector = nx.wrap(features).tag("features")
    transposed = nx.wrap(batch_features.T).tag("features", "batch")
    untagged = matrix.untag("features")
    dot = nx.nmap(jnp.dot)
    return {
        "wrap + tag": lambda: nx.wrap(batch_features).tag("batch", "features"),
        "untag + tag (rename)": lambda: matrix.untag("features").tag("hidden"),
        "unwrap": lambda: matrix.unwrap("features", "batch"),
        "a + b (same names, other order)": lambda: matrix + transposed,
        "a * b (broadcast over batch)": lambda: matrix * vector,
        "nmap(jnp.dot) over batch": lambda: dot(untagged, vector.untag("features")),
        "reduction .sum()": lambda: untagged.sum(),
        "order_as": lambda: matrix.order_as("features", "batch"),
    }


def _forward_contenders(size: train_step.MlpSize) -> dict[str, Callable[[], Any]]:
    """Jitted forward passes of the same MLP, each handing the model to ``jax.jit`` its way."""
    x, _ = train_step.make_batch(size)
    scale = 1.0 / np.sqrt(size.width)
    keys = jax.random.split(jax.random.key(0), size.depth)
    raw_params = [
        (scale * jax.random.normal(key, (size.width, size.width)), jnp.zeros((size.width,)))
        for key in keys
    ]

    @jax.jit
    def raw_forward(params, inputs):
        for index, (weight, bias) in enumerate(params):
            inputs = inputs @ weight + bias
            if index < len(params) - 1:
                inputs = jax.nn.relu(inputs)
        return inputs

    namespaces = _namespaces()
    contenders: dict[str, Callable[[], Any]] = {
        "raw jax.jit": lambda: raw_forward(raw_params, x),
    }

    nnx_model = train_step.NnxMlp(size, nnx.Rngs(0))
    nnx_forward = nnx.jit(lambda model, inputs: model(inputs))
    contenders["flax nnx.jit (nnx.Module)"] = lambda: nnx_forward(nnx_model, x)

    for library, pz_namespace in namespaces.items():
        model = train_step.penzai_style_mlp(pz_namespace, size)

        def forward(model, inputs, pz_namespace=pz_namespace):
            return train_step.named_forward(pz_namespace, model, inputs)

        frozen_model = pz_namespace.freeze_params(model)
        jitted = jax.jit(forward)
        contenders[f"{library} jax.jit (frozen params)"] = (
            lambda jitted=jitted, frozen_model=frozen_model: jitted(frozen_model, x)
        )
        variable_jitted = pz_namespace.variable_jit(forward)
        contenders[f"{library} variable_jit (live params)"] = (
            lambda variable_jitted=variable_jitted, model=model: variable_jitted(model, x)
        )
        if library == PZ_FLAX:
            # Only pz_flax's Parameters are JAX pytrees themselves, so only its live model can be
            # handed to plain jax.jit.
            contenders[f"{library} jax.jit (live model)"] = lambda jitted=jitted, model=model: (
                jitted(model, x)
            )
    return contenders


def run(quick: bool) -> list[dict[str, Any]]:
    """Runs the eager-op and jitted-forward benchmarks.

    Args:
        quick: Tiny arrays and a couple of short windows: checks everything runs.

    Returns:
        Rows for the eager ops (ratio to penzai) and the forward passes (ratio to raw jit).
    """
    rounds, window = (2, 0.002) if quick else (9, 0.05)
    rows = []
    array_size = 4 if quick else 64
    per_library = {name: _eager_ops(ns, array_size) for name, ns in _namespaces().items()}
    for op_name in per_library[PZ_FLAX]:
        timings = harness.time_interleaved(
            [harness.Contender(lib, ops[op_name]) for lib, ops in per_library.items()],
            rounds=rounds,
            window_seconds=window,
        )
        rows += harness.rows_against_floor(
            timings, PENZAI, benchmark="eager named-axis op", case=op_name
        )

    size = (
        train_step.MlpSize("quick forward 2x8, batch 4", depth=2, width=8, batch=4)
        if quick
        else train_step.MlpSize("forward 8x64, batch 32", depth=8, width=64, batch=32)
    )
    contenders = [harness.Contender(n, f) for n, f in _forward_contenders(size).items()]
    timings = harness.time_interleaved(contenders, rounds=rounds, window_seconds=window)
    rows += harness.rows_against_floor(
        timings, "raw jax.jit", benchmark="jitted forward", case=size.label
    )
    return rows
