"""Tests for pz_flax.checkpoint.errors: the exception hierarchy and the messages users see.

Each error is raised here by a real failing call of the checkpoint API, so the tests check
both that the right type reaches the caller and that its message names the problem.
"""

from __future__ import annotations

import shutil
from typing import Any

import jax.numpy as jnp
import pytest

import pz_flax.checkpoint
from pz_flax.checkpoint import errors
from pz_flax.checkpoint import storage
from pz_flax.core import struct


@struct.pytree_dataclass
class ProjectLayer(struct.Struct):
    """A struct from a module restore does not trust unless the caller allows it."""

    weight: Any


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("errors") / "ckpt"
    storage.save(path, {"w": jnp.ones(3)})
    return path


@pytest.mark.parametrize(
    "error_type, builtin_type",
    [
        (errors.CheckpointNotFoundError, FileNotFoundError),
        (errors.CheckpointExistsError, FileExistsError),
        (errors.UnsupportedValueError, TypeError),
        (errors.CheckpointMismatchError, ValueError),
        (errors.CheckpointPathError, ValueError),
        (errors.CheckpointStorageError, OSError),
    ],
)
def test_errors_are_checkpoint_errors_and_the_expected_builtin(error_type, builtin_type):
    assert issubclass(error_type, errors.CheckpointError)
    assert issubclass(error_type, builtin_type)


@pytest.mark.parametrize("error_type", [errors.CorruptCheckpointError, errors.UntrustedTypeError])
def test_damage_and_distrust_are_not_mistaken_for_other_failures(error_type):
    assert issubclass(error_type, errors.CheckpointError)
    # A damaged or untrusted checkpoint is there: not a missing file, nor a bad argument.
    for builtin_type in (OSError, ValueError, TypeError):
        assert not issubclass(error_type, builtin_type)


def test_storage_error_keeps_its_path_and_message():
    error = errors.CheckpointStorageError("Cannot write /x: permission denied.", path="/x")
    assert error.path == "/x" and str(error) == "Cannot write /x: permission denied."
    assert isinstance(error, OSError) and error.errno is None
    assert pz_flax.checkpoint.CheckpointStorageError is errors.CheckpointStorageError
    assert pz_flax.checkpoint.CheckpointPathError is errors.CheckpointPathError


def test_checkpoint_error_is_a_plain_exception():
    assert errors.CheckpointError.__mro__[1:] == (Exception, BaseException, object)


def test_errors_are_exported_by_the_package():
    for name in (
        "CheckpointError",
        "CheckpointNotFoundError",
        "CheckpointExistsError",
        "CorruptCheckpointError",
        "UnsupportedValueError",
        "UntrustedTypeError",
        "CheckpointMismatchError",
    ):
        assert getattr(pz_flax.checkpoint, name) is getattr(errors, name)


def test_restore_of_a_missing_path(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError) as caught:
        pz_flax.checkpoint.restore(missing)
    assert type(caught.value) is errors.CheckpointNotFoundError
    assert str(caught.value) == f"No checkpoint at {missing}: the path does not exist."


def test_save_over_an_existing_checkpoint(saved):
    with pytest.raises(FileExistsError) as caught:
        pz_flax.checkpoint.save(saved, {"w": jnp.zeros(3)})
    assert type(caught.value) is errors.CheckpointExistsError
    assert str(caught.value).startswith(f"{saved} already exists; pass force=True")


def test_save_of_an_unsupported_value(tmp_path):
    with pytest.raises(TypeError, match="object") as caught:
        pz_flax.checkpoint.save(tmp_path / "ckpt", {"thing": object()})
    assert type(caught.value) is errors.UnsupportedValueError
    assert "thing" in str(caught.value)
    assert not (tmp_path / "ckpt").exists()


def test_restore_into_a_target_of_another_shape(saved):
    with pytest.raises(ValueError) as caught:
        pz_flax.checkpoint.restore(saved, target={"w": jnp.ones(4)})
    error = caught.value
    assert type(error) is errors.CheckpointMismatchError
    assert isinstance(error.mismatches, tuple)
    (line,) = error.mismatches
    assert line.startswith("w: shape")
    assert "(3,)" in line and "(4,)" in line
    # The message lists every mismatch, indented, under its first line.
    assert str(error) == (
        f"The checkpoint at {saved} does not match the target (1 difference):\n  {line}"
    )


def test_restore_of_a_damaged_manifest(saved, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    (copy / "manifest" / "metadata").write_text("{")
    with pytest.raises(errors.CheckpointError) as caught:
        pz_flax.checkpoint.restore(copy)
    assert type(caught.value) is errors.CorruptCheckpointError
    assert "not valid JSON" in str(caught.value)


def test_restore_of_a_type_from_an_unlisted_module(tmp_path):
    path = tmp_path / "ckpt"
    pz_flax.checkpoint.save(path, ProjectLayer(weight=jnp.ones(2)))
    with pytest.raises(errors.CheckpointError) as caught:
        pz_flax.checkpoint.restore(path)
    assert type(caught.value) is errors.UntrustedTypeError
    assert f"{__name__}.ProjectLayer" in str(caught.value)
    restored = pz_flax.checkpoint.restore(path, allow_modules=__name__)
    assert type(restored) is ProjectLayer


def test_mismatch_error_message_lists_each_mismatch():
    error = errors.CheckpointMismatchError(
        "The checkpoint does not fit:", ["a: shape (1,)", "b: dtype int8"]
    )
    assert str(error) == "The checkpoint does not fit:\n  a: shape (1,)\n  b: dtype int8"
    assert error.mismatches == ("a: shape (1,)", "b: dtype int8")


def test_mismatch_error_without_mismatches_is_just_the_message():
    error = errors.CheckpointMismatchError("Nothing to list.", [])
    assert str(error) == "Nothing to list."
    assert error.mismatches == ()


def test_mismatch_error_accepts_any_iterable_of_lines():
    error = errors.CheckpointMismatchError(
        "does not fit", (line for line in ["a: shape", "b: dtype"])
    )
    assert error.mismatches == ("a: shape", "b: dtype")
    assert str(error) == "does not fit\n  a: shape\n  b: dtype"
