"""Reading and writing plain Flax NNX checkpoints from and to pz_flax models.

The usual NNX checkpoint is ``nnx.state(model)`` saved with ``ocp.StandardCheckpointer``; it
holds arrays only, and restoring it needs the code that builds the model. These functions
connect such checkpoints to pz_flax models through the interop bridge (``from_nnx`` /
``to_nnx``):

* ``read_nnx_checkpoint(path, factory)``: build the NNX model's *structure* abstractly with
  ``nnx.eval_shape(factory)`` (no weights are initialized), restore the arrays into it, and
  convert it to a pz_flax layer;
* ``write_nnx_checkpoint(path, layer)``: convert a pz_flax layer to an NNX module and save its
  ``nnx.state``, so that plain Orbax restores it into
  ``nnx.state(nnx.eval_shape(factory))``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import manifest as manifest_lib
from pz_flax.checkpoint import storage


def _key_text(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _abstract_module(factory: Callable[[], nnx.Module]) -> nnx.Module:
    try:
        module = nnx.eval_shape(factory)
    except Exception as exc:
        raise errors.CheckpointError(
            f"The model factory {getattr(factory, '__qualname__', factory)!r} failed:"
            f" {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(module, nnx.Module):
        raise errors.CheckpointError(
            f"The model factory returned a {type(module).__name__}, not an nnx.Module."
        )
    return module


def _stored_form(leaf: Any) -> Any:
    """What Orbax stores for an abstract leaf: a typed key array is stored as its key data."""
    return jax.eval_shape(jax.random.key_data, leaf) if manifest_lib.is_prng_key(leaf) else leaf


def load_nnx_module(
    path: storage.PathLike,
    factory: Callable[[], nnx.Module],
    *,
    sharding: jax.sharding.Sharding | None = None,
) -> nnx.Module:
    """Restores an NNX checkpoint (a saved ``nnx.state``) into the module ``factory`` builds.

    The factory runs under ``nnx.eval_shape``, so it only describes the structure; no weights
    are initialized and only the restored arrays are ever allocated. Typed PRNG key arrays
    (``nnx.Rngs`` state) are read from their stored key data.

    Args:
        path: The Orbax checkpoint directory (local, ``~``-prefixed, or a URI).
        factory: A zero-argument callable building the NNX module (e.g.
            ``lambda: MyModel(rngs=nnx.Rngs(0))``).
        sharding: Sharding for every array; default: the abstract state's own shardings (if the
            factory annotated any), else this process's first device.

    Returns:
        The NNX module with the checkpoint's weights.

    Raises:
        CheckpointNotFoundError: If ``path`` holds no checkpoint.
        CheckpointMismatchError: If the checkpoint's arrays do not fit the factory's model;
            every differing path is listed.
        CorruptCheckpointError: If the array files cannot be read.
    """
    path = storage.checkpoint_dir(path)
    if storage.is_pz_checkpoint(path):
        raise errors.CheckpointNotFoundError(
            f"{path} is a pz_flax checkpoint, not an NNX one; read it with"
            " pz_flax.checkpoint.restore."
        )
    stored = storage.stored_array_metadata(path)
    graphdef, abstract_state = nnx.split(_abstract_module(factory))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    problems = []
    expected_keys = set()
    placed = []
    wanted = []
    for key_path, leaf in leaves:
        key = tuple(_key_text(part) for part in key_path)
        expected_keys.add(key)
        where = "/".join(key)
        found = stored.get(key)
        expected = _stored_form(leaf)
        wanted.append(
            manifest_lib.ArrayEntry(
                path=where,
                key=key,
                shape=tuple(expected.shape),
                dtype=np.dtype(expected.dtype).name,
            )
        )
        if found is None:
            problems.append(f"{where}: in the model, not in the checkpoint")
        else:
            stored_shape = tuple(found.shape)
            stored_dtype = np.dtype(found.dtype).name
            if stored_shape != tuple(expected.shape):
                problems.append(
                    f"{where}: shape {stored_shape} in the checkpoint, {tuple(expected.shape)} in"
                    " the model"
                )
            if stored_dtype != np.dtype(expected.dtype).name:
                problems.append(
                    f"{where}: dtype {stored_dtype} in the checkpoint,"
                    f" {np.dtype(expected.dtype).name} in the model"
                )
        chosen = sharding or getattr(leaf, "sharding", None) or storage.default_sharding()
        placed.append(jax.ShapeDtypeStruct(expected.shape, expected.dtype, sharding=chosen))
    for key in sorted(stored.keys() - expected_keys):
        problems.append(f"{'/'.join(key)}: in the checkpoint, not in the model")
    if problems:
        raise errors.CheckpointMismatchError(
            f"The NNX checkpoint at {path} does not fit the factory's model ({len(problems)}"
            f" difference{'s' if len(problems) != 1 else ''}):",
            problems,
        )
    # Orbax casts what it reads to the requested dtype: check what is stored, byte order too.
    storage.check_stored_arrays(path, wanted)
    try:
        restored = ocp.StandardCheckpointHandler().restore(
            path, args=ocp.args.StandardRestore(jax.tree_util.tree_unflatten(treedef, placed))
        )
    except Exception as exc:
        raise errors.CorruptCheckpointError(
            f"Cannot read the arrays of the NNX checkpoint at {path}: {storage.exception_summary(exc)}"
        ) from exc
    # Where the abstract state asks for typed keys, Orbax may hand back their key data.
    values = [
        jax.random.wrap_key_data(value, impl=manifest_lib.prng_impl_name(leaf.dtype, entry.path))
        if manifest_lib.is_prng_key(leaf) and not manifest_lib.is_prng_key(value)
        else value
        for (_, leaf), entry, value in zip(leaves, wanted, treedef.flatten_up_to(restored))
    ]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))


def read_nnx_checkpoint(
    path: storage.PathLike,
    factory: Callable[[], nnx.Module],
    *,
    sharding: jax.sharding.Sharding | None = None,
    **naming: Any,
) -> Any:
    """Reads an NNX checkpoint as a pz_flax layer.

    Args:
        path: The Orbax checkpoint of ``nnx.state(model)``.
        factory: A zero-argument callable building the NNX module; only its structure is used.
        sharding: Optional sharding for every array.
        **naming: Passed to ``pz_flax.interop.from_nnx`` (axis naming overrides).

    Returns:
        The pz_flax layer, with the checkpoint's weights.

    Raises:
        CheckpointNotFoundError, CheckpointMismatchError, CorruptCheckpointError: As
            ``load_nnx_module``.
    """
    from pz_flax.interop import from_nnx  # interop sits below checkpoint; imported on use

    return from_nnx(load_nnx_module(path, factory, sharding=sharding), **naming)


def write_nnx_checkpoint(path: storage.PathLike, model: Any, *, force: bool = False) -> epath.Path:
    """Writes a pz_flax layer (or an NNX module) as a plain NNX checkpoint.

    The result is ``nnx.state(to_nnx(model))`` saved by Orbax's standard handler, so NNX users
    restore it with ``ocp.StandardCheckpointer().restore(path, nnx.state(nnx.eval_shape(
    factory)))``. The write is atomic, crash-safe and multi-process like ``save``'s: every
    process calls it with the same path.

    Args:
        path: The checkpoint directory to create (local, ``~``-prefixed, or a URI).
        model: A pz_flax layer (converted with ``pz_flax.interop.to_nnx``) or an ``nnx.Module``.
        force: Replace an existing NNX checkpoint at ``path`` (nothing else).

    Returns:
        The checkpoint's path (absolute if local).

    Raises:
        CheckpointExistsError: If ``path`` exists and ``force`` is False.
        CheckpointPathError: If the path is unusable, or ``force`` may not replace it.
        CheckpointStorageError: If the filesystem fails.
    """
    if isinstance(model, nnx.Module):
        module = model
    else:
        from pz_flax.interop import to_nnx

        module = to_nnx(model)
    state = nnx.state(module)
    if not jax.tree_util.tree_leaves(state):
        raise errors.UnsupportedValueError("The model has no arrays; Orbax cannot save it.")
    with storage.atomic_directory(path, kind=storage.CheckpointKind.NNX, force=force) as staging:
        ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
            staging, args=ocp.args.StandardSave(state)
        )
    return storage.checkpoint_path(path)
