"""Tests for pz_flax.checkpoint.manager.CheckpointManager."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import manager
from pz_flax.checkpoint import storage
from tests.checkpoint import sample_models


def _model(step: int):
    return {"w": jnp.full((3,), float(step)), "mlp": sample_models.build_mlp(seed=step)}


def test_saves_on_the_interval_keeps_the_last_and_restores_the_latest(tmp_path):
    with manager.CheckpointManager(tmp_path, save_interval_steps=2, max_to_keep=2) as steps:
        saved = [step for step in range(7) if steps.save(step, _model(step))]
        steps.wait_until_finished()
        assert saved == [0, 2, 4, 6]
        assert steps.all_steps() == [4, 6]
        assert steps.latest_step() == 6
        assert not steps.should_save(7) and steps.should_save(8)
        latest = steps.restore()
        np.testing.assert_array_equal(latest["w"], jnp.full((3,), 6.0))
        earlier = steps.restore(4, jax.eval_shape(lambda: _model(0)))
        np.testing.assert_array_equal(earlier["w"], jnp.full((3,), 4.0))
    # Each step directory is a complete checkpoint on its own; a new manager finds them.
    np.testing.assert_array_equal(storage.restore(tmp_path / "6")["w"], jnp.full((3,), 6.0))
    assert manager.CheckpointManager(tmp_path).latest_step() == 6


def test_force_saves_off_interval_but_never_overwrites(tmp_path):
    with manager.CheckpointManager(
        tmp_path, save_interval_steps=10, enable_async_checkpointing=False
    ) as steps:
        assert steps.save(10, _model(10))
        assert not steps.save(13, _model(13))
        assert steps.save(13, _model(13), force=True)
        with pytest.raises(errors.CheckpointExistsError, match="Step 13"):
            steps.save(13, _model(14), force=True)
        assert steps.all_steps() == [10, 13]


def test_restore_errors(tmp_path):
    with manager.CheckpointManager(tmp_path, enable_async_checkpointing=False) as steps:
        with pytest.raises(errors.CheckpointNotFoundError, match="No checkpoints"):
            steps.restore()
        steps.save(1, _model(1))
        with pytest.raises(errors.CheckpointNotFoundError, match=r"step 5 .*\[1\]"):
            steps.restore(5)
        with pytest.raises(errors.CheckpointMismatchError, match="w: shape"):
            steps.restore(1, {"w": jnp.zeros(2), "mlp": sample_models.build_mlp()})


@pytest.mark.parametrize(
    "kwargs, message",
    [({"save_interval_steps": 0}, "save_interval_steps"), ({"max_to_keep": 0}, "max_to_keep")],
)
def test_bad_options(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        manager.CheckpointManager(tmp_path, **kwargs)


def test_opening_finishes_an_interrupted_collection(tmp_path):
    # A run killed after saving but before collecting leaves more steps than it keeps, and
    # a collection killed after its rename leaves a step in the trash.
    with manager.CheckpointManager(tmp_path, enable_async_checkpointing=False) as steps:
        for step in range(4):
            steps.save(step, _model(step))
    trash = tmp_path / manager.TRASH_SUBDIR
    trash.mkdir()
    (tmp_path / "0").rename(trash / "0")
    reopened = manager.CheckpointManager(tmp_path, max_to_keep=2, enable_async_checkpointing=False)
    assert reopened.all_steps() == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3", manager.TRASH_SUBDIR]
    assert list(trash.iterdir()) == []
    for step in reopened.all_steps():
        np.testing.assert_array_equal(reopened.restore(step)["w"], jnp.full((3,), float(step)))
    reopened.close()


def test_collection_renames_steps_away_before_deleting_them(tmp_path, monkeypatch):
    from etils import epath

    local_path_class = type(epath.Path("/"))
    real_rmtree = local_path_class.rmtree
    deleted = []

    def recording_rmtree(self, *args, **kwargs):
        deleted.append(self)
        return real_rmtree(self, *args, **kwargs)

    monkeypatch.setattr(local_path_class, "rmtree", recording_rmtree)
    with manager.CheckpointManager(
        tmp_path, max_to_keep=2, enable_async_checkpointing=False
    ) as steps:
        for step in range(4):
            steps.save(step, _model(step))
            # At every point in between, every listed step is complete and restores.
            assert len(steps.all_steps()) <= 2
        assert steps.all_steps() == [2, 3]
    # Steps were deleted only from the trash, never in place where they are listed.
    step_dirs = [p for p in deleted if p.parent == tmp_path and p.name.isdigit()]
    assert step_dirs == []
    assert {p.name for p in deleted if p.parent.name == manager.TRASH_SUBDIR} == {"0", "1"}


_KILLED_TRAINING = """
import sys
import jax.numpy as jnp
from pz_flax.checkpoint import manager

with manager.CheckpointManager(sys.argv[1], max_to_keep=2,
                               enable_async_checkpointing=sys.argv[2] == "async") as steps:
    step = (steps.latest_step() or 0) + 1
    while True:
        steps.save(step, {"w": jnp.full((128, 128), float(step))})
        print(step, flush=True)
        step += 1
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_garbage_collection_leaves_only_restorable_steps(tmp_path, mode):
    import os
    import pathlib
    import subprocess
    import sys
    import time

    repo_root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(repo_root))
    random = np.random.default_rng(1)
    for _ in range(3):
        process = subprocess.Popen(
            [sys.executable, "-c", _KILLED_TRAINING, str(tmp_path), mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout.readline().strip(), process.stderr.read()[-2000:]
            time.sleep(random.uniform(0.0, 1.0))
            process.kill()  # our own child, by its handle
            process.communicate(timeout=60)
        finally:
            process.kill()
        steps = manager.CheckpointManager(tmp_path, max_to_keep=2)
        listed = steps.all_steps()
        assert 1 <= len(listed) <= 2
        for step in listed:
            np.testing.assert_array_equal(steps.restore(step)["w"], jnp.full((128, 128), step))
        steps.close()
        on_disk = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
        assert on_disk == listed
