"""Step-numbered checkpoints for training loops, over Orbax's ``CheckpointManager``.

A training loop wants three things from checkpointing: save every N steps without thinking
about it, keep only the last K checkpoints, and resume from the newest one. Orbax's
``CheckpointManager`` does all three (asynchronously, with atomic step directories);
``CheckpointManager`` here feeds it pz_flax models, writing each step directory in the same
layout as ``save``, so a step directory is also a checkpoint ``restore`` can read on its own.

Garbage collection must survive being killed: a step Orbax deletes in place could be left
half-deleted yet still listed. So old steps are first *renamed* into a trash subdirectory
(Orbax's ``todelete_subdir``; one atomic rename, after which the step is no longer listed) and
the trash is emptied afterwards. Opening a directory also finishes an interrupted collection:
it deletes the steps beyond ``max_to_keep`` and empties the trash. Every process of a
multi-process job creates the manager and calls ``save``; Orbax coordinates them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_manager as ocp_checkpoint_manager

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import manifest as manifest_lib
from pz_flax.checkpoint import storage

# Where collected steps wait to be deleted; not a number, so never listed as a step.
TRASH_SUBDIR = "pz_flax-deleted-steps"


class CheckpointManager:
    """Saves a model every N steps, keeps the last K, and restores the latest.

    Each step is written to ``directory/<step>`` as a pz_flax checkpoint (arrays plus
    structure manifest), so ``pz_flax.checkpoint.restore(directory / "100")`` or ``pz-flax-convert
    inspect`` work on a single step too.

    Example::

        with CheckpointManager("runs/mlp", save_interval_steps=100, max_to_keep=3) as manager:
            for step in range(start, num_steps):
                model = train_step(model, ...)
                manager.save(step, model)
        model = CheckpointManager("runs/mlp").restore()   # the latest step, no code needed

    Attributes:
        directory: The directory holding the step subdirectories.
    """

    def __init__(
        self,
        directory: storage.PathLike,
        *,
        save_interval_steps: int = 1,
        max_to_keep: int | None = None,
        enable_async_checkpointing: bool = True,
    ):
        """Opens (creating if needed) a directory of step checkpoints.

        Args:
            directory: Where the step subdirectories live (local, ``~``-prefixed, or a URI).
            save_interval_steps: ``save`` writes only steps that are multiples of this
                (and, as in Orbax, the first step it is given while the directory is empty).
            max_to_keep: Keep at most this many of the newest steps; None keeps all.
            enable_async_checkpointing: Write arrays in a background thread, so ``save``
                returns as soon as the arrays are copied off the devices. ``restore``,
                ``wait_until_finished`` and ``close`` wait for pending writes.
        """
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}.")
        self.directory = storage.checkpoint_path(directory)
        self._max_to_keep = max_to_keep
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            max_to_keep=max_to_keep,
            enable_async_checkpointing=enable_async_checkpointing,
            create=True,
            todelete_subdir=TRASH_SUBDIR,
        )
        with storage.storage_errors(self.directory, "open the checkpoint directory"):
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers=storage.item_handlers(),
            )
            self._finish_collection()

    def _finish_collection(self) -> None:
        """Deletes steps beyond ``max_to_keep`` and empties the trash (a killed GC's leftovers).

        Steps go through the trash, so that this too can be killed at any instant.
        """
        steps = sorted(self._manager.all_steps())
        if self._max_to_keep is not None:
            for step in steps[: max(0, len(steps) - self._max_to_keep)]:
                self._manager.delete(step)
        trash = self.directory / TRASH_SUBDIR
        if ocp.multihost.is_primary_host(0) and trash.exists():
            for collected in trash.iterdir():
                collected.rmtree()

    def should_save(self, step: int) -> bool:
        """Tells whether ``save(step, ...)`` would write a checkpoint."""
        return self._manager.should_save(step)

    def save(self, step: int, model: Any, *, force: bool = False) -> bool:
        """Saves ``model`` as step ``step`` if the save interval says so.

        Args:
            step: The training step.
            model: The model (any tree ``pz_flax.checkpoint.save`` accepts).
            force: Save even if ``step`` is not on the save interval (Orbax's meaning of
                ``force``; an existing step is never overwritten).

        Returns:
            Whether a checkpoint was started.

        Raises:
            CheckpointExistsError: If step ``step`` was already saved.
            UnsupportedValueError: If part of the model cannot be described.
            CheckpointStorageError: If the filesystem fails.
        """
        if not force and not self._manager.should_save(step):
            return False
        encoded = manifest_lib.encode(model)
        with storage.storage_errors(self.step_path(step), "write the checkpoint"):
            try:
                return self._manager.save(
                    step, args=storage.composite_save_args(encoded), force=force
                )
            except ocp_checkpoint_manager.StepAlreadyExistsError:
                raise errors.CheckpointExistsError(
                    f"Step {step} already has a checkpoint in {self.directory}."
                ) from None

    def latest_step(self) -> int | None:
        """The newest saved step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step, oldest first; at most ``max_to_keep`` (the newest ones).

        A step past the limit may exist for a moment while its collection is pending (or
        after a kill, until the directory is opened again); it is not listed.
        """
        steps = sorted(self._manager.all_steps())
        return steps if self._max_to_keep is None else steps[-self._max_to_keep :]

    def step_path(self, step: int) -> epath.Path:
        """The directory of step ``step`` (a complete pz_flax checkpoint once written)."""
        return self.directory / str(step)

    def restore(
        self,
        step: int | None = None,
        target: Any = None,
        *,
        allow_modules: Iterable[str] | str = (),
        sharding: storage.ShardingSpec = None,
    ) -> Any:
        """Restores a step (the latest by default); see ``pz_flax.checkpoint.restore``.

        Args:
            step: The step to restore; None for the newest.
            target: Optional model (concrete or abstract) to restore into.
            allow_modules: Modules whose classes the manifest may name, beyond pz_flax's.
            sharding: A sharding, or a callable from ``ArrayEntry`` to a sharding.

        Returns:
            The restored model.

        Raises:
            CheckpointNotFoundError: If there is no such step (or no step at all).
        """
        self._manager.wait_until_finished()
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise errors.CheckpointNotFoundError(f"No checkpoints in {self.directory}.")
        elif step not in self.all_steps():
            raise errors.CheckpointNotFoundError(
                f"No checkpoint for step {step} in {self.directory}; saved steps:"
                f" {self.all_steps()}."
            )
        return storage.restore(
            self.step_path(step), target, allow_modules=allow_modules, sharding=sharding
        )

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves (and their garbage collection) are done."""
        self._manager.wait_until_finished()
        self._finish_collection()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's resources."""
        self._manager.wait_until_finished()
        self._finish_collection()
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
