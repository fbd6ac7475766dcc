"""Tests for pz_flax.checkpoint.storage: save/restore, targets, sharding, atomicity, damage."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import storage
from pz_flax.core import variables
from tests.checkpoint import sample_models

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _leaves_equal(a, b) -> bool:
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    return tree_a == tree_b and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(leaves_a, leaves_b)
    )


def _run_python(code: str, *args: str, env_extra: dict | None = None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def model():
    return sample_models.build_stateful()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    storage.save(path, model)
    return path


def test_round_trip_rebuilds_the_exact_model(model, saved):
    restored = storage.restore(saved)
    assert _leaves_equal(restored, model)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(model)
    mlp, restored_mlp = model["mlp"], restored["mlp"]
    assert type(restored_mlp) is type(mlp)
    x = sample_models.sample_input()
    np.testing.assert_array_equal(
        restored_mlp(x).unwrap("batch", "features"), mlp(x).unwrap("batch", "features")
    )
    # Static fields (functions, dtypes), labels, axis names, sharing and plain values survive.
    assert restored_mlp.sublayers[1].fn is jax.nn.gelu
    assert restored_mlp.sublayers[-1].dtype is jnp.bfloat16
    weights = restored_mlp.sublayers[0].sublayers[0].weights
    assert weights.label == "in/Linear.weights"
    assert weights.value.named_shape == {"features": 4, "hidden": 8}
    assert restored["tied"][0] is weights
    assert isinstance(restored["counter"], variables.StateVariable)
    assert restored["counter"].label == "counter"
    assert restored["view"].named_shape == model["view"].named_shape
    assert (restored["note"], restored["scale"]) == ("v1", 2.5)


def test_restore_in_a_fresh_process_needs_no_model_code(model, saved, tmp_path):
    expected = np.asarray(model["mlp"](sample_models.sample_input()).unwrap("batch", "features"))
    np.save(tmp_path / "expected.npy", expected.astype(np.float32))
    result = _run_python(
        """
        import sys
        import numpy as np
        from pz_flax.checkpoint import restore
        from pz_flax.core import named_axes
        model = restore(sys.argv[1])
        assert not [name for name in sys.modules if name.startswith("tests")], "test code loaded"
        x = named_axes.wrap(np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(2, 4))
        out = model["mlp"](x.tag("batch", "features")).unwrap("batch", "features")
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.load(sys.argv[2]))
        print(type(model["mlp"]).__qualname__, model["mlp"].sublayers[0].sublayers[0].weights.label)
        """,
        str(saved),
        str(tmp_path / "expected.npy"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["Sequential", "in/Linear.weights"]


def test_save_refuses_an_existing_path_unless_forced(model, tmp_path):
    path = tmp_path / "ckpt"
    storage.save(path, {"w": jnp.ones(3)})
    with pytest.raises(errors.CheckpointExistsError, match="already exists"):
        storage.save(path, model)
    storage.save(path, {"w": jnp.zeros(2)}, force=True)
    np.testing.assert_array_equal(storage.restore(path)["w"], jnp.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging leftovers


def test_save_refuses_unsupported_values_before_writing(tmp_path):
    from pz_flax.nn import basic_ops

    with pytest.raises(errors.UnsupportedValueError, match=r"0 \(field fn\).*lambda"):
        storage.save(tmp_path / "ckpt", [basic_ops.Elementwise(lambda x: x)])
    with pytest.raises(errors.UnsupportedValueError, match="object"):
        storage.save(tmp_path / "ckpt", {"thing": object()})
    assert not list(tmp_path.iterdir())


def test_model_without_arrays_round_trips(tmp_path):
    from pz_flax.nn import basic_ops

    model = basic_ops.Softmax(("a", "b"))
    storage.save(tmp_path / "ckpt", model)
    assert storage.restore(tmp_path / "ckpt") == model


def _abstract(model):
    """An abstract copy: arrays become ShapeDtypeStructs (ties between variables are lost)."""
    arrays_only = {key: value for key, value in model.items() if key not in ("note", "scale")}
    return dict(model, **jax.eval_shape(lambda: arrays_only))


def test_restore_into_an_abstract_target(model, saved):
    abstract = _abstract(model)
    assert abstract["tied"][0] is not abstract["mlp"].sublayers[0].sublayers[0].weights
    restored = storage.restore(saved, abstract)
    assert _leaves_equal(restored, model)
    # The untied copy in the target is filled from the one shared array of the checkpoint.
    assert restored["tied"][0].get_raw_value() is (
        restored["mlp"].sublayers[0].sublayers[0].weights.get_raw_value()
    )


def test_restore_into_a_target_that_ties_what_the_checkpoint_does_not(tmp_path):
    from pz_flax.core import named_axes

    def parameter(value):
        return variables.Parameter(label="p", value=named_axes.wrap(value).tag("a"))

    separate = [parameter(jnp.ones(2)), parameter(jnp.zeros(2))]
    storage.save(tmp_path / "ckpt", separate)
    shared = parameter(jnp.ones(2))
    with pytest.raises(errors.CheckpointMismatchError, match="1: the target shares"):
        storage.restore(tmp_path / "ckpt", [shared, shared])


def test_restore_into_a_concrete_target_uses_its_classes(model, saved):
    other = sample_models.build_stateful(seed=7)
    restored = storage.restore(saved, other)
    assert _leaves_equal(restored, model)
    assert not _leaves_equal(other, model)


def test_restore_reports_every_mismatching_path(saved):
    target = sample_models.build_stateful()
    mlp = target["mlp"]
    linear = mlp.sublayers[0].sublayers[0]
    renamed = variables.Parameter(
        label="in/Linear.weights",
        value=linear.weights.value.untag("features", "hidden").tag("features", "width"),
    )
    wider = sample_models.build_mlp(hidden=16).sublayers[4]
    mlp = mlp.select().at(lambda m: m.sublayers[0].sublayers[0].weights).set(renamed)
    mlp = mlp.select().at(lambda m: m.sublayers[4]).set(wider)
    target = dict(target, mlp=mlp, counter=jnp.zeros((), jnp.float32), note="v2")
    target["tied"] = [renamed]
    with pytest.raises(errors.CheckpointMismatchError) as caught:
        storage.restore(saved, target)
    mismatches = caught.value.mismatches
    text = "\n".join(mismatches)
    assert "mlp/sublayers/0/sublayers/0/weights: axis names ('features', 'hidden')" in text
    assert "mlp/sublayers/4/weights: shape (8, 4) in the checkpoint, (16, 4) in the target" in text
    assert "mlp/sublayers/4: static field in_axis_names" not in text  # same names, other size
    assert "counter: variable pz_flax.core.variables:StateVariable in the checkpoint" in text
    assert "note: value 'v1' in the checkpoint, 'v2' in the target" in text
    assert len(mismatches) >= 4


def test_restore_reports_dtype_and_missing_paths(saved):
    target = sample_models.build_stateful()
    target = {key: value for key, value in target.items() if key != "scale"}
    target["extra"] = jnp.ones(2)
    target["offsets"] = target["offsets"].astype(jnp.bfloat16)
    with pytest.raises(errors.CheckpointMismatchError) as caught:
        storage.restore(saved, target)
    text = "\n".join(caught.value.mismatches)
    assert "scale: in the checkpoint, not in the target" in text
    assert "extra: in the target, not in the checkpoint" in text
    assert "offsets/data_array: dtype float32 in the checkpoint, bfloat16 in the target" in text


def _mesh():
    assert len(jax.devices()) == 8, "tests/conftest.py provides 8 CPU devices"
    return jax.make_mesh((2, 4), ("data", "model"))


def test_restore_with_a_sharding_callable_by_axis_names(model, saved):
    mesh = _mesh()
    restored = storage.restore(
        saved, sharding=storage.sharding_from_axis_names(mesh, {"hidden": "model", "rows": "data"})
    )
    weights = restored["mlp"].sublayers[0].sublayers[0].weights.get_raw_value()
    assert weights.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert len(weights.addressable_shards) == 8
    assert weights.addressable_shards[0].data.shape == (4, 2)
    offsets = restored["offsets"].data_array
    assert offsets.sharding.spec == jax.sharding.PartitionSpec("data", None)
    assert _leaves_equal(restored, model)


def test_restore_into_a_sharded_abstract_target(model, saved):
    mesh = _mesh()
    column = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def with_sharding(leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        sharding = column if leaf.shape == (4, 8) else replicated
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    abstract = jax.tree_util.tree_map(with_sharding, _abstract(model))
    restored = storage.restore(saved, abstract)
    weights = restored["mlp"].sublayers[0].sublayers[0].weights.get_raw_value()
    assert weights.sharding == column
    assert restored["counter"].get_raw_value().sharding == replicated
    assert _leaves_equal(restored, model)


def test_one_sharding_for_everything_and_a_bad_one(saved):
    mesh = _mesh()
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    restored = storage.restore(saved, sharding=replicated)
    assert all(
        leaf.sharding == replicated
        for leaf in jax.tree_util.tree_leaves(restored)
        if isinstance(leaf, jax.Array)
    )
    too_many = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
    with pytest.raises(ValueError, match=r"1/bias: cannot restore the array of shape \(8,\)"):
        storage.restore(saved, sharding=too_many)
    with pytest.raises(TypeError, match=r"not a jax\.sharding\.Sharding"):
        storage.restore(saved, sharding=lambda entry: "model")


def test_missing_path_and_non_checkpoints(tmp_path):
    with pytest.raises(errors.CheckpointNotFoundError, match="does not exist"):
        storage.restore(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(errors.CheckpointNotFoundError, match="is a file"):
        storage.restore(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.CheckpointNotFoundError, match="not a pz_flax checkpoint"):
        storage.restore(tmp_path / "empty")


def _copy_of(saved: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    return copy


def _edit_manifest(checkpoint: pathlib.Path, edit) -> None:
    """Rewrites the checkpoint's JSON manifest after ``edit`` has changed it in place."""
    manifest_file = checkpoint / "manifest" / "metadata"
    manifest = json.loads(manifest_file.read_text())
    edit(manifest)
    manifest_file.write_text(json.dumps(manifest))


def _mlp_node(manifest: dict) -> dict:
    """The manifest node of the ``mlp`` entry of the saved dict."""
    return next(value for key, value in manifest["root"]["dict"] if key == "mlp")


def test_corrupt_manifest_is_reported(saved, tmp_path):
    copy = _copy_of(saved, tmp_path)
    manifest_file = copy / "manifest" / "metadata"
    text = manifest_file.read_text()
    manifest_file.write_text(text[: len(text) // 2])
    with pytest.raises(errors.CorruptCheckpointError, match=r"damaged.*not valid JSON"):
        storage.restore(copy)
    manifest_file.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(errors.CorruptCheckpointError, match="not a pz_flax checkpoint manifest"):
        storage.restore(copy)
    manifest = json.loads(text)
    manifest["format_version"] = 99
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(errors.CorruptCheckpointError, match="version 99"):
        storage.restore(copy)
    manifest_file.unlink()
    with pytest.raises(errors.CorruptCheckpointError, match="lost its manifest"):
        storage.restore(copy)


def test_manifest_naming_unknown_fields_is_reported(saved, tmp_path):
    copy = _copy_of(saved, tmp_path)
    _edit_manifest(copy, lambda manifest: _mlp_node(manifest)["static"].update(surprise=1))
    with pytest.raises(errors.CorruptCheckpointError, match=r"mlp: .*'surprise'"):
        storage.restore(copy)


# Orbax's reader thread reports the damaged files once more as an unraisable exception.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_missing_and_damaged_array_files_are_reported(saved, tmp_path):
    copy = _copy_of(saved, tmp_path)
    data_files = [p for p in (copy / "arrays").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    for file in data_files:
        file.write_bytes(file.read_bytes()[:7])
    with pytest.raises(errors.CorruptCheckpointError, match="Cannot read the arrays") as caught:
        storage.restore(copy)
    assert len(str(caught.value)) < 600 and "\n" not in str(caught.value)
    for file in data_files:
        file.unlink()
    with pytest.raises(errors.CorruptCheckpointError):
        storage.restore(copy)
    shutil.rmtree(copy / "arrays")
    with pytest.raises(errors.CorruptCheckpointError, match="lists 8 arrays"):
        storage.restore(copy)


def test_manifest_listing_an_array_the_store_lacks(saved, tmp_path):
    copy = _copy_of(saved, tmp_path)

    def lose_and_reshape_arrays(manifest):
        manifest["arrays"][0]["key"] = ["nowhere"]
        manifest["arrays"][1]["shape"] = [3, 3]

    _edit_manifest(copy, lose_and_reshape_arrays)
    with pytest.raises(errors.CorruptCheckpointError, match=r"missing from the arrays.*says"):
        storage.restore(copy)


_KILLED_SAVE = """
import os, signal, sys
import jax.numpy as jnp
from pz_flax.checkpoint import storage

destination, point = sys.argv[1], sys.argv[2]
model = {"w": jnp.full((256, 256), 2.0), "b": jnp.arange(7)}

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "writing-arrays":
    import orbax.checkpoint as ocp
    ocp.StandardCheckpointHandler.async_save = die
elif point == "before-publish":
    storage._fsync_tree = die
elif point == "between-renames":
    real_rename = os.rename
    def rename(src, dst):
        real_rename(src, dst)
        if os.fspath(src) == destination:
            die()
    os.rename = rename
storage.save(destination, model, force=True)
print("not killed")
"""


@pytest.mark.parametrize("existing", [False, True])
def test_killed_saves_never_leave_a_wrong_checkpoint(tmp_path, existing):
    neighbour = tmp_path / "neighbour"
    storage.save(neighbour, {"w": jnp.ones(3)})
    points = ["writing-arrays", "before-publish"] + (["between-renames"] if existing else [])
    old = {"w": jnp.full((256, 256), 1.0), "b": jnp.arange(7)}
    new = {"w": jnp.full((256, 256), 2.0), "b": jnp.arange(7)}
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    processes = {}
    for point in points:
        destination = tmp_path / point
        if existing:
            storage.save(destination, old)
        processes[point] = subprocess.Popen(
            [sys.executable, "-c", _KILLED_SAVE, str(destination), point],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    for point, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == -9, (point, stdout, stderr[-2000:])
        destination = tmp_path / point
        if destination.exists():
            # Whatever is at the path is complete: the old model, or (never half of) the new.
            assert _leaves_equal(storage.restore(destination), old if existing else new), point
        else:
            assert point == "between-renames" or not existing, point
            with pytest.raises(errors.CheckpointNotFoundError):
                storage.restore(destination)
        if existing and point != "between-renames":
            assert destination.exists(), point
        # The next save of the same path succeeds and sweeps the dead process's leftovers.
        storage.save(destination, new, force=True)
        assert _leaves_equal(storage.restore(destination), new)
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{point}.")]
        assert leftovers == [], leftovers
    assert _leaves_equal(storage.restore(neighbour), {"w": jnp.ones(3)})


def test_restore_of_an_untrusted_type_fails_before_reading_arrays(saved, tmp_path):
    copy = _copy_of(saved, tmp_path)
    _edit_manifest(
        copy, lambda manifest: _mlp_node(manifest).update(struct="my_project.layers:Sequential")
    )
    shutil.rmtree(copy / "arrays")  # would be a corrupt-checkpoint error if reached
    with pytest.raises(errors.UntrustedTypeError, match=r"my_project\.layers\.Sequential at mlp"):
        storage.restore(copy)
    with pytest.raises(errors.CorruptCheckpointError, match="cannot be found"):
        storage.restore(copy, allow_modules="my_project")


def test_restore_keeps_no_copies_besides_the_model(tmp_path):
    model = {"w": jnp.arange(4096.0).reshape(64, 64), "b": jnp.ones(64)}
    storage.save(tmp_path / "ckpt", model)
    del model

    def live_bytes():
        return sum(array.nbytes for array in jax.live_arrays())

    before = live_bytes()
    restored = storage.restore(tmp_path / "ckpt")
    model_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(restored))
    assert live_bytes() - before == model_bytes


def test_sharded_models_save_and_restore(tmp_path):
    mesh = _mesh()
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
    weights = jax.device_put(jnp.arange(32.0).reshape(4, 8), sharding)
    storage.save(tmp_path / "ckpt", {"w": weights})
    restored = storage.restore(tmp_path / "ckpt")["w"]
    np.testing.assert_array_equal(restored, weights)
    assert restored.sharding == storage.default_sharding()
    assert storage.restore(tmp_path / "ckpt", sharding=sharding)["w"].sharding == sharding
