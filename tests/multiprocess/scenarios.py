"""What the multi-process job computes, written once so the single-process reference is the same.

Every function here is run both by each process of the 2-process job (`two_process_job`) and,
for the reference values, by the test session itself in one process with 8 devices; the test
then asks for equal values.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

from pz_flax.core import named_axes as nx
from pz_flax.toolshed import basic_training
from pz_flax.toolshed import sharding_util
from tests.toolshed import helpers

# The MLP's hidden axis is split over "model", the batch over "data".
STRATEGY = {"batch": "data", "hidden": "model"}
TRAIN_STEPS = 4
MESH_SHAPE = (4, 2)
AXIS_TYPES = (jax.sharding.AxisType.Auto,) * 2


def data_across_processes_mesh() -> jax.sharding.Mesh:
    """``jax.make_mesh``'s layout: with 2 processes, each holds half of the "data" axis."""
    return jax.make_mesh(MESH_SHAPE, ("data", "model"), axis_types=AXIS_TYPES)


def model_across_processes_mesh() -> jax.sharding.Mesh:
    """Every "model" pair has one device of each process (with 2 processes of 4 devices)."""
    devices = np.array(jax.devices()).reshape(MESH_SHAPE[::-1]).T
    return jax.sharding.Mesh(devices, ("data", "model"), axis_types=AXIS_TYPES)


def interleaved_mesh() -> jax.sharding.Mesh:
    """The "data" axis alternates between processes, so no process holds a block of rows."""
    by_process = np.array(jax.devices()).reshape(jax.process_count(), -1)
    return jax.sharding.Mesh(by_process.T.reshape(-1), ("data",))


def global_values(model) -> dict[str, np.ndarray]:
    """Every parameter's whole value, on the host of every process (collective)."""
    return {
        label: np.asarray(multihost_utils.process_allgather(param.get_raw_value(), tiled=True))
        for label, param in helpers.params_by_label(model).items()
    }


def local_rows_batch(mesh: jax.sharding.Mesh) -> tuple[dict[str, nx.NamedArray], slice]:
    """The regression batch as this process's loader would give it: only its own rows."""
    x, y = helpers.make_regression_batch()
    rows = sharding_util.process_local_slice("batch", x.named_shape["batch"], mesh, STRATEGY)
    local = {
        name: nx.wrap(np.asarray(value.unwrap("batch", "features"))[rows]).tag("batch", "features")
        for name, value in (("x", x), ("y", y))
    }
    batch = sharding_util.name_to_name_make_array_from_process_local_data(local, mesh, STRATEGY)
    return batch, rows


def sharded_model(mesh: jax.sharding.Mesh):
    return sharding_util.sharded_init(
        helpers.make_mlp, 0, mesh=mesh, axis_name_to_mesh_name=STRATEGY
    )


def train(mesh: jax.sharding.Mesh):
    """Trains a sharded MLP from per-process rows; returns the model, its losses, the rows."""
    model = sharded_model(mesh)
    trainer = basic_training.StatefulTrainer.build(
        jax.random.key(0), model, optax.adam(0.05), helpers.mse_loss
    )
    batch, rows = local_rows_batch(mesh)
    losses = [trainer.step(**batch)["loss"] for _ in range(TRAIN_STEPS)]
    return model, np.asarray([float(loss) for loss in losses]), rows
