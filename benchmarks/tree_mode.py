"""The Adam step of ``train_step`` under NNX tree mode, pz_flax next to Flax's own model.

NNX's tree mode (``nnx.jit(graph=False)``, or ``nnx.set_graph_mode(False)`` globally) treats
modules as plain JAX pytrees instead of walking an object graph, which is what a pz_flax model
already is. Same problem and same math as ``train_step`` (dense ReLU MLP, MSE loss, Adam):

* ``raw jax.jit``: the floor, as in ``train_step``.
* ``flax nnx.jit(graph=False) + nnx.Optimizer``: Flax's ``nnx.Linear`` MLP in tree mode.
* ``pz_flax nnx.jit(graph=False) + nnx.Optimizer (bare model)``: the penzai-style pz_flax model
  handed to NNX directly: in tree mode any pytree of NNX variables is trainable.
* ``pz_flax nnx.jit(graph=False) + nnx.Optimizer (in nnx.Module)``: the same model as an
  attribute of an ``nnx.Module``, as NNX code holds one.

The target is pz_flax within 1.1x of Flax's own tree-mode step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from benchmarks import harness
from benchmarks import train_step

FLAX_TREE = "flax nnx.jit(graph=False) + nnx.Optimizer"
PZ_FLAX_TREE_BARE = "pz_flax nnx.jit(graph=False) + nnx.Optimizer (bare model)"
PZ_FLAX_TREE_MODULE = "pz_flax nnx.jit(graph=False) + nnx.Optimizer (in nnx.Module)"


def flax_tree_step(size: train_step.MlpSize) -> Callable[[], Any]:
    """Flax's ``nnx.Linear`` MLP, trained in tree mode."""
    model = train_step.NnxMlp(size, nnx.Rngs(0))
    return train_step.nnx_optimizer_step(model, lambda m, inputs: m(inputs), size, graph=False)


def pz_flax_tree_bare_step(size: train_step.MlpSize) -> Callable[[], Any]:
    """The pz_flax model itself as what ``nnx.Optimizer`` trains, in tree mode."""
    from pz_flax import pz

    model = train_step.penzai_style_mlp(pz, size)
    return train_step.nnx_optimizer_step(
        model, lambda m, inputs: train_step.named_forward(pz, m, inputs), size, graph=False
    )


def pz_flax_tree_module_step(size: train_step.MlpSize) -> Callable[[], Any]:
    """The pz_flax model as an ``nnx.Module`` attribute, in tree mode."""
    from pz_flax import pz

    holder = train_step.PzFlaxHolder(train_step.penzai_style_mlp(pz, size))
    return train_step.nnx_optimizer_step(
        holder,
        lambda m, inputs: train_step.named_forward(pz, m.layer, inputs),
        size,
        graph=False,
    )


CONTENDERS: dict[str, Callable[[train_step.MlpSize], Callable[[], Any]]] = {
    train_step.RAW_JIT: train_step.raw_jit_step,
    FLAX_TREE: flax_tree_step,
    PZ_FLAX_TREE_BARE: pz_flax_tree_bare_step,
    PZ_FLAX_TREE_MODULE: pz_flax_tree_module_step,
}


def measure(
    size: train_step.MlpSize, *, rounds: int, window_seconds: float
) -> list[dict[str, Any]]:
    """Times every contender on one problem size; returns one row per contender."""
    contenders = [harness.Contender(name, build(size)) for name, build in CONTENDERS.items()]
    timings = harness.time_interleaved(contenders, rounds=rounds, window_seconds=window_seconds)
    return harness.rows_against_floor(
        timings, train_step.RAW_JIT, benchmark="tree-mode train step", case=size.label
    )


def run(quick: bool) -> list[dict[str, Any]]:
    """Runs the tree-mode train-step benchmarks.

    Args:
        quick: A tiny size and short windows: checks everything runs, measures nothing.

    Returns:
        One row per (problem size, contender).
    """
    if quick:
        small = train_step.MlpSize("quick 2x8, batch 4", depth=2, width=8, batch=4)
        return measure(small, rounds=2, window_seconds=0.002)
    dispatch_bound = train_step.MlpSize(
        "dispatch-bound 8x64, batch 32", depth=8, width=64, batch=32
    )
    compute_bound = train_step.MlpSize(
        "compute-bound 8x512, batch 256", depth=8, width=512, batch=256
    )
    return measure(dispatch_bound, rounds=25, window_seconds=0.06) + measure(
        compute_bound, rounds=15, window_seconds=0.15
    )
