"""One process of the 2-process x 4-device job that `test_two_processes` launches.

Run as ``python -m tests.multiprocess.two_process_job OUT_DIR [--checkpoints]`` by
`launcher.run_job`, which sets the job's environment. Each process writes what it observed to
``OUT_DIR/process_<index>.npz`` (values are gathered, so both files describe the whole job);
checkpoints go to ``OUT_DIR/shared``, the directory every process sees.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np

from pz_flax.toolshed import sharding_util
from tests.multiprocess import scenarios

CHECKPOINT = "shared/checkpoint"
MANAGED = "shared/managed"
NNX_CHECKPOINT = "shared/nnx"


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(f"process {jax.process_index()}: {message}")


def same_sharding(restored, trained) -> bool:
    return all(
        restored[label]
        .get_raw_value()
        .sharding.is_equivalent_to(param.get_raw_value().sharding, param.get_raw_value().ndim)
        for label, param in trained.items()
    )


def checkpoint_results(out_dir: pathlib.Path, model, mesh) -> dict[str, np.ndarray]:
    """Saves and restores ``model`` from every process, in every way the job covers."""
    from flax import nnx

    from pz_flax import checkpoint
    from pz_flax import interop
    from tests.toolshed import helpers

    results = {}
    trained = helpers.params_by_label(model)
    target = sharding_util.name_to_name_sharding(
        model, mesh, scenarios.STRATEGY, as_shape_dtype_struct=True
    )

    checkpoint.save(out_dir / CHECKPOINT, model)
    restored = checkpoint.restore(out_dir / CHECKPOINT, target=target)
    check(same_sharding(helpers.params_by_label(restored), trained), "restore lost the sharding")
    results.update(prefixed("restored", scenarios.global_values(restored)))
    # Without a target every array lands on one device of *this* process.
    local = checkpoint.restore(out_dir / CHECKPOINT)
    for param in helpers.params_by_label(local).values():
        check(
            param.get_raw_value().is_fully_addressable,
            f"a default restore is not local: {param.get_raw_value().sharding}",
        )
    results.update(prefixed("restored_local", local_values(local)))

    with checkpoint.CheckpointManager(out_dir / MANAGED, max_to_keep=2) as manager:
        for step in (1, 2, 3):
            manager.save(step, model)
        manager.wait_until_finished()
        results["managed/steps"] = np.asarray(manager.all_steps())
        latest = manager.restore(target=target)
    check(same_sharding(helpers.params_by_label(latest), trained), "manager restore lost sharding")
    results.update(prefixed("managed", scenarios.global_values(latest)))

    checkpoint.write_nnx_checkpoint(out_dir / NNX_CHECKPOINT, model)

    def factory() -> nnx.Module:
        return interop.to_nnx(helpers.make_mlp(0))

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    read = checkpoint.read_nnx_checkpoint(out_dir / NNX_CHECKPOINT, factory, sharding=replicated)
    results.update(prefixed("nnx", scenarios.global_values(read)))
    read_local = checkpoint.read_nnx_checkpoint(out_dir / NNX_CHECKPOINT, factory)
    results.update(prefixed("nnx_local", local_values(read_local)))
    return results


def local_values(model) -> dict[str, np.ndarray]:
    from tests.toolshed import helpers

    return {
        label: np.asarray(param.get_raw_value())
        for label, param in helpers.params_by_label(model).items()
    }


def prefixed(prefix: str, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}/{label}": value for label, value in values.items()}


def main(argv: list[str]) -> None:
    out_dir = pathlib.Path(argv[0])
    joined = sharding_util.initialize_distributed_from_environment()
    check(joined and jax.process_count() == 2, f"not in a 2-process job: {jax.process_count()}")
    check(jax.device_count() == 8 and jax.local_device_count() == 4, "expected 2 x 4 devices")
    results = {}

    model_mesh = scenarios.model_across_processes_mesh()
    check(
        all({d.process_index for d in pair} == {0, 1} for pair in model_mesh.devices),
        "the model axis does not span both processes",
    )
    results.update(prefixed("init", scenarios.global_values(scenarios.sharded_model(model_mesh))))

    trained = {}
    for name, mesh in (
        ("model_across", model_mesh),
        ("data_across", scenarios.data_across_processes_mesh()),
    ):
        model, losses, rows = scenarios.train(mesh)
        trained[name] = (model, mesh)
        results[f"{name}/losses"] = losses
        results[f"{name}/rows"] = np.asarray([rows.start, rows.stop])
        results.update(prefixed(name, scenarios.global_values(model)))

    try:
        sharding_util.process_local_slice("data", 8, scenarios.interleaved_mesh())
    except ValueError as error:
        results["interleaved_error"] = np.asarray(str(error))

    if "--checkpoints" in argv:
        results.update(checkpoint_results(out_dir, *trained["model_across"]))
    np.savez(out_dir / f"process_{jax.process_index()}.npz", **results)


if __name__ == "__main__":
    main(sys.argv[1:])
