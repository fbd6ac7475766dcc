"""What the examples share: flag checks, and running alone or as a multi-process JAX job.

The same script runs unchanged in both settings. Launched alone it is a one-process job over
the local devices. Launched once per process with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set (README, "Multi-host"), or under a cluster
manager JAX recognises, it joins the job in `join` and then:

* builds its mesh over the devices of *all* processes (`data_parallel_mesh`);
* loads only the rows of each batch its own devices hold (`own_rows`, `global_batch`);
* calls every checkpoint save on every process (they are collective);
* prints, shows progress bars and writes side files on process 0 only (`log`, `progress`,
  `is_primary`).

This module imports nothing heavy at the top, so that an example can import it, and check its
flags with `require_positive`, before JAX is imported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# Batches are split over the mesh's only axis by their "batch" axis: data parallelism.
DATA_PARALLEL = {"batch": "data"}


def require_positive(parser, args, flags) -> None:
    """Stops with a usage error naming the first of ``flags`` (attribute names) that is < 1."""
    for flag in flags:
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")


def join() -> None:
    """Joins the multi-process job this process was launched in, if any (before any JAX use)."""
    from pz_flax.toolshed import sharding_util

    sharding_util.initialize_distributed_from_environment()


def is_primary() -> bool:
    """Whether this process is the one that prints and writes side files (process 0)."""
    import jax

    return jax.process_index() == 0


def log(*values: Any) -> None:
    """``print`` on process 0 only, so a job's log holds each line once."""
    if is_primary():
        print(*values, flush=True)


@contextlib.contextmanager
def progress(total: int, description: str) -> Iterator[Any]:
    """A ``rich`` progress bar on stderr (process 0 only); yields ``update(done, status)``.

    On a terminal the bar redraws in place; when stderr is a file or a pipe, ``rich`` draws it
    once, when it finishes, so logs get one clean line instead of carriage-return updates.
    """
    from rich import progress as rich_progress
    from rich.console import Console

    columns = (
        rich_progress.TextColumn("[progress.description]{task.description}"),
        rich_progress.BarColumn(),
        rich_progress.MofNCompleteColumn(),
        rich_progress.TextColumn("{task.fields[status]}"),
        rich_progress.TimeElapsedColumn(),
        rich_progress.TimeRemainingColumn(),
    )
    with rich_progress.Progress(
        *columns, console=Console(stderr=True), disable=not is_primary()
    ) as bar:
        task = bar.add_task(description, total=total, status="")

        def update(done: int, status: str) -> None:
            bar.update(task, completed=done, status=status)

        yield update


def data_parallel_mesh():
    """A one-axis mesh ``data`` over every device of every process.

    ``Auto`` axes let XLA propagate shardings inside ``jax.jit``.
    """
    import jax

    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def global_batch_size(requested: int, mesh) -> int:
    """``requested`` rounded up to a multiple of the mesh size, so every device gets rows."""
    return -(-requested // mesh.devices.size) * mesh.devices.size


def own_rows(rows, mesh):
    """The part of a global batch (an array whose first axis is the batch) this process loads.

    Every process here computes the same global batch indices (the examples' data is small);
    a real loader would read only these rows.
    """
    from pz_flax.toolshed import sharding_util

    return rows[sharding_util.process_local_slice("batch", len(rows), mesh, DATA_PARALLEL)]


def global_batch(local_tree: Any, mesh) -> Any:
    """This process's NamedArrays, assembled into global ones split by ``batch`` over ``data``."""
    from pz_flax.toolshed import sharding_util

    return sharding_util.name_to_name_make_array_from_process_local_data(
        local_tree, mesh, DATA_PARALLEL
    )


def replicated(model: Any, mesh) -> Any:
    """A copy of ``model`` on ``mesh``, every array whole on every device (no data moves).

    For values every process computed identically (same seed, same data), such as a model
    loaded or built on each process's own device; Orbax saves and ``jax.jit`` steps in a
    multi-process job want global arrays like these. Variables are copied once each, so
    weights shared between layers stay shared. Works on any pytree, ``nnx.State`` included.
    """
    import jax
    import numpy as np

    from pz_flax import pz

    everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(array):
        local = np.asarray(array)
        return jax.make_array_from_process_local_data(everywhere, local, local.shape)

    # Arrays outside pz_flax variables (an nnx.State's, say) stay in the skeleton.
    skeleton, frozen = pz.unbind_variables(model, freeze=True)
    return pz.bind_variables(
        jax.tree.map(place, skeleton), jax.tree.map(place, frozen), unfreeze_as_copy=True
    )


def host_local(model: Any) -> Any:
    """A copy of ``model`` with every array whole on this process's default device (collective).

    Lets each process evaluate, sample from or convert a model that lives on the global mesh,
    with inputs of its own. Variables are gathered once each, so weights shared between layers
    stay shared in the copy.
    """
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    from pz_flax import pz

    skeleton, frozen = pz.unbind_variables(model, freeze=True)
    gathered = jax.tree.map(
        jnp.asarray, multihost_utils.process_allgather((skeleton, frozen), tiled=True)
    )
    return pz.bind_variables(*gathered, unfreeze_as_copy=True)
