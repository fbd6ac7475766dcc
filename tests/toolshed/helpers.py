"""Shared helpers for the toolshed tests: a small MLP, a regression batch and its loss."""

import jax
import jax.numpy as jnp

from pz_flax.core import named_axes as nx
from pz_flax.core import variables
from pz_flax.nn import basic_ops
from pz_flax.nn import grouping
from pz_flax.nn import linear_and_affine


def make_mlp(seed: int = 0, hidden_axis: str = "hidden") -> grouping.Sequential:
    """A two-layer tanh MLP from ``features`` (4) through ``hidden_axis`` (8) to ``features`` (2).

    Args:
        seed: Seed of the parameter initialization.
        hidden_axis: Name of the hidden axis; ``"features"`` makes both layers map an axis to
            itself, which exercises the in-place (renaming) form of ``Linear``.

    Returns:
        The model, with labels ``hidden.weights`` and ``out.weights``.
    """
    key = jax.random.key(seed)
    return grouping.Sequential(
        [
            linear_and_affine.Linear.from_config(
                "hidden", jax.random.fold_in(key, 0), {"features": 4}, {hidden_axis: 8}
            ),
            basic_ops.Elementwise(jax.nn.tanh),
            linear_and_affine.Linear.from_config(
                "out", jax.random.fold_in(key, 1), {hidden_axis: 8}, {"features": 2}
            ),
        ]
    )


def make_regression_batch() -> tuple[nx.NamedArray, nx.NamedArray]:
    """Sixteen ``(x, y)`` examples with axes ``batch`` and ``features``, ``y`` linear in ``x``."""
    x = jax.random.normal(jax.random.key(1), (16, 4))
    y = jnp.stack([x[:, 0] - x[:, 1], x[:, 2] * 0.5], axis=-1)
    return nx.wrap(x).tag("batch", "features"), nx.wrap(y).tag("batch", "features")


def mse_loss(*, model, state, rng, x, y):
    """Mean squared error, in the loss-function form that ``StatefulTrainer`` expects."""
    del rng
    error = nx.nmap(jnp.mean)(((model(x) - y) ** 2).untag("batch", "features")).unwrap()
    return error, state, {"loss": error}


def params_by_label(model) -> dict[str, variables.Parameter]:
    """The model's parameters, keyed by label."""
    return {param.label: param for param in variables.unbind_params(model)[1]}
