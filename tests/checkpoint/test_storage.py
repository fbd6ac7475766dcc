"""Tests for pz_flax.checkpoint.storage: save/restore, targets, sharding, atomicity, damage."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import nnx_checkpoints
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
import os, signal, sys, time
import jax.numpy as jnp
from pz_flax.checkpoint import storage

destination, point = sys.argv[1], sys.argv[2]
old_copy = f".{os.path.basename(destination)}.pz_flax-"

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "writing-arrays":
    import orbax.checkpoint as ocp
    ocp.StandardCheckpointHandler.async_save = die
elif point == "before-publish":
    storage._fsync_tree = die
elif point in ("between-renames", "removing-old"):
    real_rename, real_rmtree = os.rename, __import__("shutil").rmtree
    def rename(src, dst):
        real_rename(src, dst)
        if point == "between-renames" and os.fspath(src) == destination:
            die()
    os.rename = rename
    if point == "removing-old":
        import etils.epath
        local_path_class = type(etils.epath.Path("/"))
        def rmtree(self, *args, **kwargs):
            if os.path.basename(os.fspath(self)).startswith(old_copy):
                victim = os.path.join(os.fspath(self), sorted(os.listdir(self))[0])
                (real_rmtree if os.path.isdir(victim) else os.remove)(victim)
                die()
            return real_rmtree(os.fspath(self))
        local_path_class.rmtree = rmtree
step = 0
while True:  # "anytime": saves again and again until the parent kills it
    step += 1
    storage.save(destination, {"w": jnp.full((256, 256), float(step)), "b": jnp.arange(7)},
                 force=True)
    print(step, flush=True)
"""


def _complete_value(destination: pathlib.Path) -> float:
    """The step a killed save loop last published, checking that restore gets all of it."""
    restored = storage.restore(destination)
    np.testing.assert_array_equal(restored["b"], np.arange(7))
    values = np.unique(np.asarray(restored["w"]))
    assert values.shape == (1,), values
    return float(values[0])


def _start_killed_save(destination: pathlib.Path, point: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(destination), point],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _assert_recovers(destination: pathlib.Path, allowed: set[float]) -> None:
    """A killed save left a restorable checkpoint; the next forced save sweeps the rest."""
    assert _complete_value(destination) in allowed
    storage.save(destination, {"w": jnp.full((256, 256), -1.0), "b": jnp.arange(7)}, force=True)
    assert _complete_value(destination) == -1.0
    prefix = f".{destination.name}."
    assert [p.name for p in destination.parent.iterdir() if p.name.startswith(prefix)] == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "point", ["writing-arrays", "before-publish", "between-renames", "removing-old"]
)
def test_forced_save_killed_at_each_step_keeps_a_complete_checkpoint(tmp_path, point):
    destination = tmp_path / "ckpt"
    storage.save(destination, {"w": jnp.full((256, 256), 0.0), "b": jnp.arange(7)})
    neighbour = tmp_path / "neighbour"
    storage.save(neighbour, {"w": jnp.ones(3)})
    process = _start_killed_save(destination, point)
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()  # only if the timeout struck; this is our own child
    assert process.returncode == -9, (stdout, stderr[-2000:])
    # Killed during the first save: the old (0) or, once both renames happened, the new (1).
    _assert_recovers(destination, {0.0, 1.0})
    assert _leaves_equal(storage.restore(neighbour), {"w": jnp.ones(3)})


@pytest.mark.slow
def test_forced_saves_killed_at_random_instants_keep_a_complete_checkpoint(tmp_path):
    destination = tmp_path / "ckpt"
    storage.save(destination, {"w": jnp.full((256, 256), 0.0), "b": jnp.arange(7)})
    random = np.random.default_rng(0)
    for _ in range(4):
        process = _start_killed_save(destination, "anytime")
        try:
            first = process.stdout.readline()  # one save done: the loop is warm
            assert first.strip(), process.stderr.read()[-2000:]
            time.sleep(random.uniform(0.0, 0.4))
            process.kill()  # our own child, by its handle
            printed = first + process.communicate(timeout=60)[0]
        finally:
            process.kill()
        published = [float(line) for line in printed.split()]
        # The last reported step, the one after it (killed after publishing, before printing).
        _assert_recovers(destination, {published[-1], published[-1] + 1})


def test_restore_finds_the_complete_copy_a_kill_between_renames_left(tmp_path):
    destination = tmp_path / "ckpt"
    storage.save(destination, {"w": jnp.zeros(3)})
    token = "0" * 24
    # What a forced save killed between its renames leaves: the old and the new beside.
    storage.save(tmp_path / f".ckpt.pz_flax-{token}", {"w": jnp.ones(3)})
    destination.rename(tmp_path / f".ckpt.pz_flax-{token}-old")
    assert not destination.exists()
    assert _leaves_equal(storage.restore(destination), {"w": jnp.ones(3)})
    # The path counts as taken: a plain save is refused and touches nothing.
    with pytest.raises(errors.CheckpointExistsError, match="interrupted save"):
        storage.save(destination, {"w": jnp.full(3, 2.0)})
    assert _leaves_equal(storage.restore(destination), {"w": jnp.ones(3)})
    # A forced one replaces it and sweeps both copies.
    storage.save(destination, {"w": jnp.full(3, 2.0)}, force=True)
    assert _leaves_equal(storage.restore(destination), {"w": jnp.full(3, 2.0)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_unfinished_staging_of_another_save_survives_a_plain_save(tmp_path):
    running = tmp_path / ".ckpt.pz_flax-ffffffffffffffffffffffff.orbax-checkpoint-tmp"
    running.mkdir()  # might be a save still writing on another host
    storage.save(tmp_path / "ckpt", {"w": jnp.ones(3)})
    assert running.is_dir()
    storage.save(tmp_path / "ckpt", {"w": jnp.ones(3)}, force=True)  # force claims the path
    assert not running.exists()


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
        # Bytes of distinct device buffers. Some jax/orbax releases (jax 0.10.0 with orbax
        # 0.11.20) keep each restored array's shards alive as arrays of their own; those are
        # views of the array's buffer, not copies, so buffers are counted, not arrays.
        buffers = {}
        for array in jax.live_arrays():
            for shard in array.addressable_shards:
                buffers[shard.device, shard.data.unsafe_buffer_pointer()] = shard.data.nbytes
        return sum(buffers.values())

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


#### What force=True may replace ####


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
    """Runs the test inside a scratch current directory holding one precious file."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "precious.txt").write_text("keep me")
    monkeypatch.chdir(workdir)
    return workdir


@pytest.mark.parametrize("path", ["", ".", "./", "  "])
def test_force_never_replaces_the_current_directory_or_an_empty_path(in_tmp_cwd, path):
    with pytest.raises(errors.CheckpointError) as caught:
        storage.save(path, {"w": jnp.ones(2)}, force=True)
    assert isinstance(caught.value, errors.CheckpointPathError)
    assert (in_tmp_cwd / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in in_tmp_cwd.iterdir()) == ["precious.txt"]


def test_force_refuses_parents_of_the_current_directory_root_and_home(in_tmp_cwd, monkeypatch):
    home = in_tmp_cwd.parent / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for protected in (in_tmp_cwd.parent, pathlib.Path("/"), home, "~"):
        with pytest.raises(errors.CheckpointPathError, match="Refusing to replace") as caught:
            storage.save(protected, {"w": jnp.ones(2)}, force=True)
        assert str(pathlib.Path(os.path.expanduser(str(protected))).absolute()) in str(caught.value)
    assert (in_tmp_cwd / "precious.txt").exists()


def test_force_replaces_only_a_checkpoint_of_the_same_kind(tmp_path):
    plain = tmp_path / "photos"
    plain.mkdir()
    (plain / "cat.jpg").write_text("x")
    with pytest.raises(errors.CheckpointPathError, match=r"photos.*not a checkpoint"):
        storage.save(plain, {"w": jnp.ones(2)}, force=True)
    assert (plain / "cat.jpg").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(errors.CheckpointPathError, match="holds a file"):
        storage.save(tmp_path / "file", {"w": jnp.ones(2)}, force=True)
    nnx_dir = tmp_path / "nnx"
    nnx_checkpoints.write_nnx_checkpoint(nnx_dir, sample_models.make_nnx_model())
    with pytest.raises(errors.CheckpointPathError, match=r"NNX \(plain Orbax\) checkpoint"):
        storage.save(nnx_dir, {"w": jnp.ones(2)}, force=True)
    assert storage.directory_kind(nnx_dir) is storage.CheckpointKind.NNX
    storage.save(tmp_path / "pz", {"w": jnp.ones(2)})
    with pytest.raises(errors.CheckpointPathError, match="pz_flax checkpoint"):
        nnx_checkpoints.write_nnx_checkpoint(
            tmp_path / "pz", sample_models.make_nnx_model(), force=True
        )
    storage.save(tmp_path / "pz", {"w": jnp.zeros(2)}, force=True)
    assert _leaves_equal(storage.restore(tmp_path / "pz"), {"w": jnp.zeros(2)})


def test_force_refuses_symbolic_links_and_keep_paths(tmp_path):
    real = tmp_path / "real"
    storage.save(real, {"w": jnp.ones(2)})
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(errors.CheckpointPathError, match=r"link.*symbolic link"):
        storage.save(link, {"w": jnp.zeros(2)}, force=True)
    assert link.is_symlink() and _leaves_equal(storage.restore(real), {"w": jnp.ones(2)})
    with pytest.raises(errors.CheckpointExistsError):
        storage.save(link, {"w": jnp.zeros(2)})
    for kept in (real, real / "arrays"):
        with pytest.raises(errors.CheckpointPathError, match="the input"):
            storage.check_destination(
                real, kind=storage.CheckpointKind.PZ_FLAX, force=True, keep=[kept]
            )


#### Paths and environment failures ####


def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    written = storage.save("~/ckpt", {"w": jnp.ones(2)})
    assert pathlib.Path(written) == tmp_path / "ckpt"
    assert not (tmp_path / "~").exists()
    assert _leaves_equal(storage.restore("~/ckpt"), {"w": jnp.ones(2)})


def test_undecodable_path_bytes_and_unknown_schemes(tmp_path):
    undecodable = os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xff\xfe")
    with pytest.raises(errors.CheckpointPathError, match="not UTF-8"):
        storage.save(undecodable, {"w": jnp.ones(2)})
    with pytest.raises(errors.CheckpointPathError, match="not UTF-8"):
        storage.restore(undecodable)
    with pytest.raises(errors.CheckpointPathError, match="scheme"):
        storage.save("nosuchscheme://bucket/ckpt", {"w": jnp.ones(2)})


def test_parent_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(errors.CheckpointStorageError) as caught:
        storage.save(tmp_path / "file" / "ckpt", {"w": jnp.ones(2)})
    assert str(tmp_path / "file") in str(caught.value)
    assert "is a file, not a directory" in str(caught.value)
    assert caught.value.path == str(tmp_path / "file")


@pytest.mark.parametrize(
    "failure, reason",
    [
        (PermissionError(13, "Permission denied"), "permission denied"),
        (OSError(30, "Read-only file system"), "read-only"),
        (
            ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left"),
            "no space left",
        ),
    ],
)
def test_write_failures_name_the_path_and_cause_and_leave_nothing(
    tmp_path, monkeypatch, failure, reason
):
    import orbax.checkpoint as ocp

    def failing_save(self, directory, *args, **kwargs):
        pathlib.Path(f"{directory}.orbax-checkpoint-tmp", "arrays").mkdir(parents=True)
        raise failure

    monkeypatch.setattr(ocp.Checkpointer, "save", failing_save)
    with pytest.raises(errors.CheckpointStorageError, match=reason) as caught:
        storage.save(tmp_path / "ckpt", {"w": jnp.ones(2)})
    assert str(tmp_path / "ckpt") in str(caught.value)
    assert isinstance(caught.value, OSError)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_leaves_no_staging_directory(tmp_path):
    # RLIMIT_FSIZE makes every write past 64 KiB fail with EFBIG, as a full disk would.
    completed = _run_python(
        """
        import resource, signal, sys
        import jax.numpy as jnp
        from pz_flax.checkpoint import errors, storage
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
        try:
            storage.save(sys.argv[1], {"w": jnp.arange(1 << 20, dtype=jnp.float32)})
        except errors.CheckpointStorageError as exc:
            print("refused:", exc)
        """,
        str(tmp_path / "ckpt"),
    )
    assert "refused: Cannot write the checkpoint" in completed.stdout, completed.stderr[-2000:]
    assert str(tmp_path / "ckpt") in completed.stdout
    assert list(tmp_path.iterdir()) == []


def test_racing_plain_saves_one_wins_the_other_is_told(tmp_path, monkeypatch):
    destination = tmp_path / "ckpt"
    real_publish = storage._publish

    def publish_after_a_rival(staging, path, token, *, force):
        if not destination.exists():  # a rival save publishes first, while this one writes
            monkeypatch.setattr(storage, "_publish", real_publish)
            storage.save(destination, {"w": jnp.zeros(2)})
        real_publish(staging, path, token, force=force)

    monkeypatch.setattr(storage, "_publish", publish_after_a_rival)
    with pytest.raises(errors.CheckpointExistsError, match="appeared while it was being written"):
        storage.save(destination, {"w": jnp.ones(2)})
    assert _leaves_equal(storage.restore(destination), {"w": jnp.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


#### Remote paths ####


def test_remote_paths_reach_orbax_intact(tmp_path, monkeypatch):
    """``gs://`` stays a URI all the way to Orbax and TensorStore.

    The remote filesystem is etils' mock over a local folder; Orbax and TensorStore are
    replaced at their entry points by recorders that do the work on the local folder.
    """
    import orbax.checkpoint as ocp
    import tensorstore as ts
    from etils import epath

    bucket = tmp_path / "bucket"
    bucket.mkdir()

    def local(path) -> str:
        return os.fspath(path).replace("gs://bucket", str(bucket))

    reached = []
    real_save, real_restore, real_open = (
        ocp.Checkpointer.save,
        ocp.StandardCheckpointHandler.restore,
        ts.KvStore.open,
    )

    def orbax_save(self, directory, *args, **kwargs):
        reached.append(os.fspath(directory))
        return real_save(self, local(directory), *args, **kwargs)

    def orbax_restore(self, directory, *args, **kwargs):
        reached.append(os.fspath(directory))
        return real_restore(self, epath.Path(local(directory)), *args, **kwargs)

    def kvstore_open(spec, *args, **kwargs):
        if not (isinstance(spec, dict) and spec.get("base", "").startswith("gs://")):
            return real_open(spec, *args, **kwargs)  # Orbax's own use, on local paths
        reached.append(spec["base"])
        return real_open({**spec, "base": "file://" + local(spec["base"])}, *args, **kwargs)

    monkeypatch.setattr(ocp.Checkpointer, "save", orbax_save)
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore", orbax_restore)
    monkeypatch.setattr(ts.KvStore, "open", kvstore_open)
    monkeypatch.chdir(tmp_path)
    with epath.testing.mock_epath(
        exists=lambda fn, path: os.path.exists(local(path)),
        isdir=lambda fn, path: os.path.isdir(local(path)),
        makedirs=lambda fn, path, *a, **k: os.makedirs(local(path), exist_ok=True),
        listdir=lambda fn, path: os.listdir(local(path)),
        rename=lambda fn, path, dst: os.rename(local(path), local(dst)),
        rmtree=lambda fn, path: shutil.rmtree(local(path)),
        open=lambda fn, path, *a, **k: open(local(path), *a, **k),
    ):
        written = storage.save("gs://bucket/run/ckpt", {"w": jnp.ones(2)})
        restored = storage.restore("gs://bucket/run/ckpt")
    assert os.fspath(written) == "gs://bucket/run/ckpt"
    assert reached[0].startswith("gs://bucket/run/.ckpt.pz_flax-"), reached
    assert reached[1:] == ["gs://bucket/run/ckpt/arrays", "gs://bucket/run/ckpt/arrays"]
    assert _leaves_equal(restored, {"w": jnp.ones(2)})
    assert not (tmp_path / "gs:").exists()
    assert sorted(p.name for p in (bucket / "run").iterdir()) == ["ckpt"]


def test_unreachable_remote_filesystem_is_a_clear_error():
    # No gcsfs or TensorFlow in this environment: Google Storage cannot be reached.
    with pytest.raises(
        errors.CheckpointStorageError, match=r"gs://no-bucket/ckpt.*cannot be reached"
    ):
        storage.save("gs://no-bucket/ckpt", {"w": jnp.ones(2)})
    with pytest.raises(errors.CheckpointStorageError, match="cannot be reached"):
        storage.restore("gs://no-bucket/ckpt")


#### Multi-process layout ####


def test_every_process_gets_the_same_staging_name_from_the_primary(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    broadcasts, staged = [], []
    real_broadcast = ocp.multihost.broadcast_one_to_all

    def broadcast(value, *args, **kwargs):
        broadcasts.append(np.asarray(value).copy())
        return real_broadcast(value, *args, **kwargs)

    real_save = ocp.Checkpointer.save

    def orbax_save(self, directory, *args, **kwargs):
        staged.append(os.fspath(directory))
        return real_save(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.multihost, "broadcast_one_to_all", broadcast)
    monkeypatch.setattr(ocp.Checkpointer, "save", orbax_save)
    storage.save(tmp_path / "ckpt", {"w": jnp.ones(2)})
    token = "".join(f"{int(part) & 0xFFFFFFFF:08x}" for part in broadcasts[0])
    assert staged == [str(tmp_path / f".ckpt.pz_flax-{token}")]
    assert str(os.getpid()) not in staged[0].rsplit("-", 1)[-1]
    assert len(broadcasts) == 2  # the token, then the primary's publishing outcome


def test_default_sharding_is_a_local_device():
    assert storage.default_sharding().device_set == {jax.local_devices()[0]}


#### Stored array metadata ####


def _edit_stored_zarr_metadata(checkpoint: pathlib.Path, key: str, **changes) -> None:
    """Rewrites one array's zarr metadata inside Orbax's OCDBT store, as an attacker could."""
    import tensorstore as ts

    store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{checkpoint / 'arrays'}"}).result()
    metadata = json.loads(store.read(f"{key}/.zarray").result().value)
    metadata.update(changes)
    store.write(f"{key}/.zarray", json.dumps(metadata).encode()).result()


@pytest.mark.parametrize(
    "changes, reported",
    [
        ({"dtype": "<i4"}, "stored dtype '<i4'"),
        ({"dtype": "<u4"}, "stored dtype '<u4'"),
        ({"dtype": ">f4"}, "stored dtype '>f4'"),
        ({"order": "F"}, "stored in a transposed (Fortran) order"),
        ({"shape": [4, 2]}, "stored shape [4, 2]"),
    ],
)
def test_edited_stored_array_metadata_is_caught_with_and_without_target(
    tmp_path, changes, reported
):
    model = {"w": jnp.arange(8.0).reshape(2, 4), "b": jnp.ones(3)}
    storage.save(tmp_path / "ckpt", model)
    _edit_stored_zarr_metadata(tmp_path / "ckpt", "w", **changes)
    for target in (None, model, jax.eval_shape(lambda: model)):
        with pytest.raises(errors.CorruptCheckpointError, match=rf"w: {re.escape(reported)}"):
            storage.restore(tmp_path / "ckpt", target)
