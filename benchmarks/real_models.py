"""Converted real-style NNX models against NNX itself: eager calls, jitted calls, conversion.

The models are the test suite's stand-ins for the NNX code Flax teams have
(``tests/interop/real_models.py``: a Gemma-style and a Qwen-style decoder, a ResNet, a ViT,
Flax's MNIST CNN, a scan-over-layers MLP, a sharded MiniGPT and a bidirectional RNN), mostly
user classes with their own ``__call__`` that pz_flax wraps around stock layers it converts.
Three things are measured side by side for each, in one process and in round-robin windows
(see ``benchmarks.harness``), each as a ratio to NNX doing the same:

* **eager forward**: ``layer(x, **side_inputs)`` against ``model(x, **kwargs)``, what a
  notebook or an interpretability session does all day. Target: at most 1.2x.
* **jitted forward**: the converted model under ``pz.variable_jit`` (the penzai way to jit a
  model whose wrapped modules may update state) against ``nnx.jit``. Target: no slower.
* **conversion**: ``from_nnx(model)`` against ``nnx.split`` + ``nnx.merge`` of the same
  model, the graph walk NNX itself does. Target: at most 3x.

A model whose code sows values is called under ``nnx.capture`` on the NNX side (see
``_contenders``). Inputs are the test cases' own (tiny batches), so every figure is dispatch-bound: it measures
the Python each route adds around the same computation, which is what the ratios are about.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from benchmarks import harness

# The case names of tests/interop/real_models.py, in its order.
CASES = ("gemma", "qwen", "resnet", "vit", "mnist", "scan_mlp", "minigpt", "birnn")
NNX_EAGER = "NNX eager"
PZ_EAGER = "pz_flax eager"
NNX_JIT = "nnx.jit"
PZ_JIT = "pz_flax variable_jit"
SPLIT_MERGE = "nnx.split + nnx.merge"
FROM_NNX = "from_nnx"


def _cases() -> list[Any]:
    # The models live with the tests that check their conversion; import them at run time so
    # that importing this module stays cheap.
    from tests.interop import real_models

    return [make_case() for make_case in real_models.ALL_CASES]


def _contenders(case: Any) -> dict[str, list[harness.Contender]]:
    """The contenders of each measurement for one model, by measurement."""
    from pz_flax import interop
    from pz_flax.core import named_axes
    from pz_flax.core import variables

    model = case.make()
    layer = interop.from_nnx(model)
    named_input = named_axes.wrap(case.inputs).tag(*case.input_names)
    kwargs = case.call_kwargs

    # A model that sows (the Gemma-style one keeps its attention weights) runs under
    # nnx.capture, Flax's route for sown values: called bare, NNX would keep every call's
    # values on the module, so its state would grow and nnx.jit would retrace on every call.
    # pz_flax collects sown values per call the same way.
    _, sown = nnx.capture(model, nnx.Intermediate)(case.inputs, **kwargs)

    def nnx_call(module, inputs):
        if sown:
            return nnx.capture(module)(inputs, **kwargs)
        return module(inputs, **kwargs)

    nnx_jitted = nnx.jit(nnx_call)
    pz_jitted = variables.variable_jit(lambda converted, inputs: converted(inputs, **kwargs))

    def split_merge():
        graphdef, state = nnx.split(model)
        return nnx.merge(graphdef, state)

    return {
        "eager forward": [
            harness.Contender(NNX_EAGER, lambda: nnx_call(model, case.inputs)),
            harness.Contender(PZ_EAGER, lambda: layer(named_input, **kwargs)),
        ],
        "jitted forward": [
            harness.Contender(NNX_JIT, lambda: nnx_jitted(model, case.inputs)),
            harness.Contender(PZ_JIT, lambda: pz_jitted(layer, named_input)),
        ],
        "conversion": [
            harness.Contender(SPLIT_MERGE, lambda: jax.tree_util.tree_leaves(split_merge())),
            harness.Contender(FROM_NNX, lambda: jax.tree_util.tree_leaves(interop.from_nnx(model))),
        ],
    }


_FLOORS = {"eager forward": NNX_EAGER, "jitted forward": NNX_JIT, "conversion": SPLIT_MERGE}


def run(quick: bool) -> list[dict[str, Any]]:
    """Runs the real-model benchmarks.

    Args:
        quick: Two models, two short rounds: checks everything runs.

    Returns:
        One row per (model, measurement, contender), with ratios to NNX's contender.
    """
    rows = []
    cases = _cases()
    if quick:
        cases = [case for case in cases if case.name in ("mnist", "gemma")]
    for case in cases:
        for measurement, contenders in _contenders(case).items():
            try:
                timings = harness.time_interleaved(
                    contenders,
                    rounds=2 if quick else 5,
                    window_seconds=0.05 if quick else 0.15,
                    warmup_steps=1 if quick else 3,
                )
            except Exception as error:  # a route that fails on this model is reported, not timed
                print(f"[real_models] {case.name}: {measurement} not measured: {error!r:.300}")
                continue
            rows += harness.rows_against_floor(
                timings,
                _FLOORS[measurement],
                benchmark="real_models",
                case=f"{case.name}: {measurement}",
                model=case.name,
                measurement=measurement,
            )
        jax.clear_caches()
    return rows
