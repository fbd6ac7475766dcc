"""Small models shared by the checkpoint tests, built only from pz_flax's own classes.

Restoring one of these in a fresh process must not need this module: the checkpoint has to
carry everything.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pz_flax.core import named_axes
from pz_flax.core import variables
from pz_flax.nn import basic_ops
from pz_flax.nn import grouping
from pz_flax.nn import linear_and_affine
from pz_flax.nn import standardization


def build_mlp(seed: int = 0, hidden: int = 8):
    """A named-axis MLP with a bf16 cast, a Python-scalar child and a non-trivial activation."""
    key = jax.random.key(seed)
    return grouping.Sequential(
        [
            linear_and_affine.Affine.from_config(
                name="in",
                init_base_rng=key,
                input_axes={"features": 4},
                output_axes={"hidden": hidden},
            ),
            basic_ops.Elementwise(jax.nn.gelu),
            standardization.LayerNorm.from_config(
                name="norm", init_base_rng=key, across_axes={"hidden": hidden}
            ),
            linear_and_affine.ConstantRescale(by=0.5),
            linear_and_affine.Linear.from_config(
                name="out",
                init_base_rng=key,
                input_axes={"hidden": hidden},
                output_axes={"features": 4},
            ),
            basic_ops.CastToDType(jnp.bfloat16),
        ]
    )


def build_stateful(seed: int = 0):
    """A dict model with a state variable, a tied parameter, and named-array constants."""
    mlp = build_mlp(seed)
    tied = mlp.sublayers[0].sublayers[0].weights
    counter = variables.StateVariable(jnp.zeros((), jnp.int32), label="counter")
    offsets = named_axes.wrap(jnp.linspace(0.5, 1.5, 6).reshape(2, 3)).tag("rows", "cols")
    return {
        "mlp": mlp,
        "counter": counter,
        "tied": [tied],
        "offsets": offsets,
        "view": offsets.untag("rows"),
        "note": "v1",
        "scale": 2.5,
    }


def sample_input():
    return named_axes.wrap(jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)).tag("batch", "features")


def make_nnx_model(width: int = 5):
    """An NNX model mixing layers with pz_flax mappings and wrapped ones (Conv, BatchNorm)."""
    from flax import nnx

    return nnx.Sequential(
        nnx.Linear(3, width, rngs=nnx.Rngs(0)),
        nnx.relu,
        nnx.LayerNorm(width, rngs=nnx.Rngs(1)),
        nnx.Conv(width, 2, kernel_size=(1,), rngs=nnx.Rngs(2)),
        nnx.BatchNorm(2, use_running_average=True, rngs=nnx.Rngs(3)),
    )


def make_wider_nnx_model():
    """Same layers as ``make_nnx_model`` but wider: a wrong factory for its checkpoints."""
    return make_nnx_model(width=6)
