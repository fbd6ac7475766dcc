"""Tests for pz_flax.toolshed.sharding_util, on 8 fake CPU devices (see tests/conftest.py)."""

import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from pz_flax import checkpoint
from pz_flax.core import named_axes as nx
from pz_flax.toolshed import basic_training
from pz_flax.toolshed import sharding_util
from tests.toolshed import helpers

STRATEGY = {"batch": "data", "hidden": "model"}


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == 8, "tests/conftest.py should fake 8 CPU devices"
    # Auto axes: XLA's partitioner propagates shardings (JAX 0.10 defaults to Explicit axes,
    # where every sharded contraction must state its output sharding).
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def sharded_training_setup(mesh, loss_fn=helpers.mse_loss):
    """The MLP and the batch placed on ``mesh`` by ``STRATEGY``, and a trainer for the model.

    Returns:
        ``(model, trainer, x, y)`` with the sharded model, inputs and targets.
    """
    model = sharding_util.name_to_name_device_put(helpers.make_mlp(), mesh, STRATEGY)
    trainer = basic_training.StatefulTrainer.build(
        jax.random.key(0), model, optax.adam(0.05), loss_fn
    )
    x, y = (
        sharding_util.name_to_name_device_put(array, mesh, STRATEGY)
        for array in helpers.make_regression_batch()
    )
    return model, trainer, x, y


def test_named_and_positional_axes_in_views_and_arrays(mesh):
    named = nx.wrap(jnp.zeros((8, 3))).tag("hidden", "other")
    partly_positional = named.untag("other")  # a view, or an array with a positional axis
    for value in (named, partly_positional):
        spec = sharding_util.name_to_name_sharding(value, mesh, STRATEGY).data_array.spec
        hidden_axis = value.data_array.shape.index(8)
        expected = [None, None]
        expected[hidden_axis] = "model"
        assert tuple(spec) + (None,) * (2 - len(spec)) == tuple(expected)


def test_named_data_axis_positions_are_respected(mesh):
    array = nx.wrap(jnp.zeros((5, 8))).tag("other", "hidden")
    sharding = sharding_util.name_to_name_sharding(array, mesh, STRATEGY)
    assert sharding.data_array.spec == P(None, "model")
    as_struct = sharding_util.name_to_name_sharding(
        array, mesh, STRATEGY, as_shape_dtype_struct=True
    )
    assert as_struct.data_array.shape == (5, 8)
    assert as_struct.data_array.sharding.spec == P(None, "model")


def test_tree_type_aliases_are_penzai_s_and_annotate_the_signatures():
    penzai_sharding_util = pytest.importorskip("penzai.toolshed.sharding_util")
    for alias in ("PyTreeOfArrays", "PyTreeOfNamedArrays", "PyTreeOfShardings"):
        assert getattr(sharding_util, alias) is getattr(penzai_sharding_util, alias), alias
    hints = typing.get_type_hints(sharding_util.name_to_name_sharding)
    assert hints["tree"] is sharding_util.PyTreeOfNamedArrays
    assert hints["return"] is sharding_util.PyTreeOfShardings


def test_identity_mapping_by_default(mesh):
    array = nx.wrap(jnp.zeros((4, 2))).tag("data", "model")
    assert sharding_util.name_to_name_sharding(array, mesh).data_array.spec == P("data", "model")


def test_unnamed_arrays_are_refused_with_their_path_or_replicated(mesh):
    tree = {"named": nx.wrap(jnp.zeros(8)).tag("hidden"), "plain": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"\['plain'\].*no axis names"):
        sharding_util.name_to_name_sharding(tree, mesh, STRATEGY)
    shardings = sharding_util.name_to_name_sharding(
        tree, mesh, STRATEGY, ignore_unnamed_arrays=True
    )
    assert shardings["plain"] is None


def test_unknown_mesh_axis_is_refused(mesh):
    with pytest.raises(ValueError, match="'hidden' is mapped to mesh axis 'tensor'"):
        sharding_util.name_to_name_sharding(
            nx.wrap(jnp.zeros(8)).tag("hidden"), mesh, {"hidden": "tensor"}
        )


def test_device_put_splits_model_parameters(mesh):
    model = sharding_util.name_to_name_device_put(helpers.make_mlp(), mesh, STRATEGY)
    params = helpers.params_by_label(model)
    hidden = params["hidden.weights"].get_raw_value()
    assert hidden.shape == (4, 8)
    assert {shard.data.shape for shard in hidden.addressable_shards} == {(4, 4)}
    assert params["hidden.weights"].value.named_shape == {"features": 4, "hidden": 8}


def test_sharded_init_creates_sharded_parameters(mesh):
    model = sharding_util.sharded_init(
        helpers.make_mlp, 0, mesh=mesh, axis_name_to_mesh_name=STRATEGY
    )
    params = helpers.params_by_label(model)
    out_weights = params["out.weights"].get_raw_value()
    assert {shard.data.shape for shard in out_weights.addressable_shards} == {(4, 2)}
    unsharded = helpers.params_by_label(helpers.make_mlp(0))["out.weights"]
    np.testing.assert_array_equal(out_weights, unsharded.get_raw_value())


def test_constrain_layers_apply_under_jit(mesh):
    x, _ = helpers.make_regression_batch()
    by_name = sharding_util.ConstrainShardingByName(mesh, STRATEGY)
    out = jax.jit(lambda v: by_name(v))(x)
    assert out.data_array.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P("data")), 2)
    explicit = sharding_util.ConstrainSharding(jax.sharding.NamedSharding(mesh, P("data")))
    out = jax.jit(lambda a: explicit(a))(x.data_array)
    assert out.sharding.spec == P("data")


def test_sharded_training_matches_single_device(mesh):
    x, y = helpers.make_regression_batch()
    single_model = helpers.make_mlp()
    single = basic_training.StatefulTrainer.build(
        jax.random.key(0), single_model, optax.adam(0.05), helpers.mse_loss
    )
    sharded_model, sharded, sx, sy = sharded_training_setup(mesh)
    for _ in range(5):
        np.testing.assert_allclose(
            single.step(x=x, y=y)["loss"], sharded.step(x=sx, y=sy)["loss"], rtol=1e-5
        )
    hidden = helpers.params_by_label(sharded_model)["hidden.weights"]
    assert {s.data.shape for s in hidden.get_raw_value().addressable_shards} == {(4, 4)}


def test_queued_sharded_steps_on_cpu_devices_do_not_deadlock(mesh):
    """Many multi-device CPU steps in a row, never read back until the end."""
    _, trainer, sx, sy = sharded_training_setup(mesh)
    for _ in range(50):
        aux = trainer.step(x=sx, y=sy)
    assert float(aux["loss"]) < 1.0


def test_sharded_trainer_traces_its_step_once(mesh):
    traces = []

    def counting_loss(**kwargs):
        traces.append(1)  # runs only while JAX traces the step
        return helpers.mse_loss(**kwargs)

    _, trainer, sx, sy = sharded_training_setup(mesh, counting_loss)
    for _ in range(3):
        trainer.step(x=sx, y=sy)
    assert len(traces) == 1
    assert trainer.state.value.step.sharding.mesh.shape == mesh.shape


def test_trained_sharded_model_checkpoints_and_restores_into_the_same_sharding(mesh, tmp_path):
    model, trainer, x, y = sharded_training_setup(mesh)
    for _ in range(3):
        trainer.step(x=x, y=y)
    checkpoint.save(tmp_path / "ckpt", model)
    target = sharding_util.name_to_name_sharding(model, mesh, STRATEGY, as_shape_dtype_struct=True)
    restored = checkpoint.restore(tmp_path / "ckpt", target=target)
    trained = helpers.params_by_label(model)
    for label, param in helpers.params_by_label(restored).items():
        np.testing.assert_array_equal(param.get_raw_value(), trained[label].get_raw_value())
        restored_array, trained_array = param.get_raw_value(), trained[label].get_raw_value()
        assert restored_array.sharding.is_equivalent_to(trained_array.sharding, trained_array.ndim)
        assert param.value.named_shape == trained[label].value.named_shape


def test_process_local_slice_in_one_process_is_every_row(mesh):
    assert sharding_util.process_local_slice("batch", 16, mesh, STRATEGY) == slice(0, 16)
    assert sharding_util.process_local_slice("unsplit", 5, mesh, STRATEGY) == slice(0, 5)
    # The identity strategy by default: "data" names a mesh axis.
    assert sharding_util.process_local_slice("data", 8, mesh) == slice(0, 8)


def test_process_local_slice_refuses_uneven_sizes_and_unknown_mesh_axes(mesh):
    with pytest.raises(ValueError, match=r"'batch' has 6 rows, which do not split evenly over"):
        sharding_util.process_local_slice("batch", 6, mesh, STRATEGY)
    with pytest.raises(ValueError, match="'batch' is mapped to mesh axis 'rows'"):
        sharding_util.process_local_slice("batch", 8, mesh, {"batch": "rows"})


def test_process_local_data_builds_what_device_put_builds(mesh):
    x, y = helpers.make_regression_batch()
    view = nx.wrap(np.arange(16.0 * 8).reshape(16, 8)).tag("batch", "hidden").untag("hidden")
    local = {"x": x, "y": y, "view": view}
    built = sharding_util.name_to_name_make_array_from_process_local_data(local, mesh, STRATEGY)
    expected = sharding_util.name_to_name_device_put(local, mesh, STRATEGY)
    for key in local:
        assert type(built[key]) is type(local[key])
        assert built[key].named_shape == local[key].named_shape
        assert built[key].positional_shape == local[key].positional_shape
        got, want = built[key].data_array, expected[key].data_array
        np.testing.assert_array_equal(got, want)
        assert got.sharding.is_equivalent_to(want.sharding, want.ndim), key
    assert built["x"].data_array.sharding.spec == P("data", None)


def test_process_local_data_with_the_whole_axis_given(mesh):
    x, _ = helpers.make_regression_batch()
    built = sharding_util.name_to_name_make_array_from_process_local_data(
        x, mesh, STRATEGY, global_axis_sizes={"batch": 16}
    )
    np.testing.assert_array_equal(built.data_array, x.data_array)
    assert {shard.data.shape for shard in built.data_array.addressable_shards} == {(4, 4)}


def test_process_local_data_errors_name_the_path_and_axis(mesh):
    x, _ = helpers.make_regression_batch()
    with pytest.raises(ValueError, match=r"\['plain'\] has type ndarray, not NamedArray"):
        sharding_util.name_to_name_make_array_from_process_local_data(
            {"named": x, "plain": np.zeros(4)}, mesh, STRATEGY
        )
    with pytest.raises(ValueError, match=r"Axis 'batch' of the value at \['x'\] has 6 local rows"):
        sharding_util.name_to_name_make_array_from_process_local_data(
            {"x": nx.wrap(np.zeros((6, 4))).tag("batch", "features")}, mesh, STRATEGY
        )
    with pytest.raises(
        ValueError,
        match=r"Axis 'batch' .* holds rows \[0, 32\) of 32, i\.e\. 32 rows, but was given 16",
    ):
        sharding_util.name_to_name_make_array_from_process_local_data(
            x, mesh, STRATEGY, global_axis_sizes={"batch": 32}
        )
    with pytest.raises(ValueError, match="'batch' is mapped to mesh axis 'rows'"):
        sharding_util.name_to_name_make_array_from_process_local_data(x, mesh, {"batch": "rows"})


def test_without_a_coordinator_the_process_stays_single(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert sharding_util.initialize_distributed_from_environment() is False
    assert jax.process_count() == 1


@pytest.mark.parametrize("variable", ["JAX_NUM_PROCESSES", "JAX_PROCESS_ID"])
def test_a_malformed_job_environment_is_named(monkeypatch, variable):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    monkeypatch.setenv(variable, "two")
    with pytest.raises(ValueError, match=f"{variable} must be an integer, got 'two'"):
        sharding_util.initialize_distributed_from_environment()
