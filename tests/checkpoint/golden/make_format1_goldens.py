"""Writes the golden format-1 checkpoints under ``tests/checkpoint/golden/format1/``.

Run with the format-1 release (the pz_flax commit that still wrote ``format_version`` 1),
from the repository root::

    python -m tests.checkpoint.golden.make_format1_goldens

Each case is a checkpoint directory ``<case>/`` plus ``<case>.input.npy`` (the fixed input)
and ``<case>.output.npy`` (the model's output on it, as that release computed it).
``test_golden.py`` restores every case with today's code and compares its output, and its
arrays, bit for bit. The files are committed; never regenerate them with a newer release, or
they would stop proving that old checkpoints keep restoring.
"""

from __future__ import annotations

import functools
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from pz_flax.checkpoint import storage
from pz_flax.core import named_axes
from pz_flax.core import variables
from pz_flax.nn import basic_ops
from pz_flax.nn import grouping
from pz_flax.nn import layer_stack
from pz_flax.nn import linear_and_affine
from pz_flax.nn import standardization
from tests.checkpoint import sample_models

GOLDEN_DIR = pathlib.Path(__file__).parent / "format1"


def _named_input():
    return named_axes.wrap(jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32).reshape(2, 4)).tag(
        "batch", "features"
    )


def _mlp_case():
    """Sequential, Affine, Linear, LayerNorm, ConstantRescale, CastToDType, Elementwise."""
    return sample_models.build_mlp(seed=1), _named_input()


def _activations_case():
    """Elementwise over plain, partial and jnp functions; Softmax; a labelled, annotated param."""
    weights = variables.Parameter(
        value=named_axes.wrap(jnp.arange(16, dtype=jnp.float32).reshape(4, 4) / 10).tag(
            "features", "out"
        ),
        label="mix/weights",
        metadata={"note": "golden", "stack": (1, 2)},
    )
    model = grouping.Sequential(
        [
            basic_ops.Elementwise(functools.partial(jax.nn.leaky_relu, negative_slope=0.2)),
            basic_ops.Elementwise(jnp.tanh),
            linear_and_affine.Linear(
                weights=weights, in_axis_names=("features",), out_axis_names=("out",)
            ),
            basic_ops.Elementwise(jax.nn.silu),
            basic_ops.Softmax("out"),
        ]
    )
    return model, _named_input()


def _stack_case():
    """A LayerStack of two affine layers with RMS normalization."""

    def builder(init_base_rng):
        return grouping.Sequential(
            [
                linear_and_affine.Affine.from_config(
                    name="block",
                    init_base_rng=init_base_rng,
                    input_axes={"features": 4},
                    output_axes={"features": 4},
                ),
                standardization.RMSStandardize(across=("features",)),
                basic_ops.Elementwise(jax.nn.relu),
            ]
        )

    model = layer_stack.LayerStack.from_sublayer_builder(
        builder=builder,
        stack_axis="layers",
        stack_axis_size=2,
        init_base_rng=jax.random.key(2),
        builder_kwargs={},
    )
    return model, _named_input()


def _state_case():
    """A state variable, a tied parameter and named-array constants in plain containers."""
    model = sample_models.build_stateful(seed=3)
    return model, _named_input()


def _wrapped_nnx_case():
    """An NNX model converted by from_nnx: native mappings plus wrapped Conv and BatchNorm."""
    from pz_flax.interop import convert

    model = convert.from_nnx(sample_models.make_nnx_model())
    inputs = named_axes.wrap(jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(2, 2, 3))
    return model, inputs.tag("batch", "seq", "features")


def run_case(model, inputs):
    """The output a golden case is checked against (its model called on its input)."""
    if isinstance(model, dict):
        # The state case is a dict of parts; its MLP is the callable part.
        return np.asarray(model["mlp"](inputs).unwrap("batch", "features"))
    output = model(inputs)
    return np.asarray(output.unwrap(*output.named_shape))


CASES = {
    "mlp": _mlp_case,
    "activations": _activations_case,
    "layer_stack": _stack_case,
    "state": _state_case,
    "wrapped_nnx": _wrapped_nnx_case,
}


def main() -> None:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for name, make in CASES.items():
        model, inputs = make()
        directory = GOLDEN_DIR / name
        if directory.exists():
            shutil.rmtree(directory)
        storage.save(directory, model)
        np.save(GOLDEN_DIR / f"{name}.input.npy", np.asarray(inputs.unwrap(*inputs.named_shape)))
        np.save(GOLDEN_DIR / f"{name}.output.npy", run_case(model, inputs))
        print(f"wrote {directory}")


if __name__ == "__main__":
    main()
