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
