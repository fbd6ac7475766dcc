"""The same small models built in pz_flax and in penzai, for differential toolshed tests."""

import jax
import numpy as np
from penzai import pz as penzai_pz

from pz_flax import pz


def _weights(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32) / 2


def twin_mlps():
    """``(ours, penzai's)``: features(4) -> hidden(8) -> tanh -> features(3), equal weights.

    Returns:
        The pz_flax model and the penzai model, with labels ``w1`` and ``w2``.
    """
    w1, w2 = _weights(0, (4, 8)), _weights(1, (8, 3))

    def build(lib):
        return lib.nn.Sequential(
            [
                lib.nn.Linear(
                    weights=lib.Parameter(
                        value=lib.nx.wrap(w1).tag("features", "hidden"), label="w1"
                    ),
                    in_axis_names=("features",),
                    out_axis_names=("hidden",),
                ),
                lib.nn.Elementwise(jax.nn.tanh),
                lib.nn.Linear(
                    weights=lib.Parameter(
                        value=lib.nx.wrap(w2).tag("hidden", "features"), label="w2"
                    ),
                    in_axis_names=("hidden",),
                    out_axis_names=("features",),
                ),
            ]
        )

    return build(pz), build(penzai_pz)


def twin_inputs(batch: int = 5):
    """``(ours, penzai's)``: the same ``batch`` x ``features`` (4) NamedArray in each library."""
    data = _weights(2, (batch, 4))
    return pz.nx.wrap(data).tag("batch", "features"), penzai_pz.nx.wrap(data).tag(
        "batch", "features"
    )


def assert_same_named(ours, theirs, rtol: float = 1e-6, atol: float = 1e-6):
    """Same named shape and the same values (compared in one axis order)."""
    assert dict(ours.named_shape) == dict(theirs.named_shape)
    names = tuple(theirs.named_shape)
    np.testing.assert_allclose(
        np.asarray(ours.unwrap(*names)), np.asarray(theirs.unwrap(*names)), rtol=rtol, atol=atol
    )
