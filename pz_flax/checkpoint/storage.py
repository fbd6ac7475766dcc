"""Saving and restoring whole pz_flax models with Orbax, atomically.

A pz_flax checkpoint is an ordinary Orbax composite checkpoint directory with two items:

* ``arrays``: the model's arrays, written by Orbax's ``StandardCheckpointHandler`` as a tree
  of dicts keyed by the arrays' paths in the model (so plain Orbax can read them too);
* ``manifest``: the JSON structure manifest (``manifest.py``), which says how to put the
  arrays back into layers, variables and named arrays.

Orbax already writes into a temporary directory and renames it at the end. ``save`` adds what
a single-path API needs on top: the staging directory has a unique name (two processes saving
to the same path cannot collide), every file is flushed to disk before the final rename (so
the rename never publishes data that a crash could still lose), and ``force=True`` swaps the
new checkpoint in with renames only, so the old one is removed only once the new one is in
place. A save killed at any point leaves either no checkpoint or a complete one at the path;
other checkpoints are never touched (the next save of the same path removes leftovers of
killed processes).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import re
import shutil
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import manifest as manifest_lib

ARRAYS_ITEM = "arrays"
MANIFEST_ITEM = "manifest"
# JsonCheckpointHandler's file name inside the manifest item directory.
_MANIFEST_FILE = "metadata"
# Concurrent fsync calls while publishing a checkpoint (they mostly wait on the disk).
_FSYNC_THREADS = 16
# Error messages from Orbax/TensorStore are cut to this length in our messages.
_MAX_SUMMARY_CHARS = 300
# Files Orbax writes into every checkpoint it finishes (which ones depends on the handler).
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "commit_success.txt")

ShardingSpec = jax.sharding.Sharding | Callable[[manifest_lib.ArrayEntry], Any] | None


#### Atomic directories ####


def _pid_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_leftovers(path: pathlib.Path) -> None:
    """Removes the staging/old directories that killed saves of ``path`` left behind."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.pz_flax-(?:tmp|old)-(\d+)-[0-9a-f]+")
    for sibling in path.parent.iterdir():
        match = pattern.match(sibling.name)
        if match and not _pid_is_alive(int(match.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)


def _fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: pathlib.Path) -> None:
    """Flushes every file and directory under ``root`` to stable storage.

    Each ``fsync`` waits for a journal commit of a few milliseconds; issued from a thread pool
    they share commits, which keeps this a small fraction of the save (see
    ``benchmarks/checkpoint_bench.py``).
    """
    paths: list[str] = []
    for directory, _, files in os.walk(root):
        paths.extend(os.path.join(directory, name) for name in files)
        paths.append(directory)
    with futures.ThreadPoolExecutor(max_workers=min(_FSYNC_THREADS, len(paths))) as pool:
        # ``list`` re-raises the first failure, if any.
        list(pool.map(_fsync_path, paths))


def _fsync_directory(directory: pathlib.Path) -> None:
    _fsync_path(directory)


def _hidden_sibling(path: pathlib.Path, kind: str) -> pathlib.Path:
    return path.parent / f".{path.name}.pz_flax-{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, force: bool) -> Iterator[pathlib.Path]:
    """Publishes a directory at ``path`` all at once, or not at all.

    The body writes into the yielded staging path (which does not exist yet; Orbax creates
    it). On normal exit, the staging tree is flushed to disk and renamed to ``path``; an
    existing ``path`` (only with ``force=True``) is renamed aside first and deleted after. On
    an exception, the staging tree is deleted and ``path`` is left as it was.

    Args:
        path: The destination directory.
        force: Replace an existing ``path``.

    Yields:
        The staging directory path, beside ``path`` (same filesystem, so renames are atomic).

    Raises:
        CheckpointExistsError: If ``path`` exists and ``force`` is False.
    """
    path = pathlib.Path(path).absolute()
    if os.path.lexists(path) and not force:
        raise errors.CheckpointExistsError(
            f"{path} already exists; pass force=True (pz-flax-convert: --force) to replace it."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_leftovers(path)
    staging = _hidden_sibling(path, "tmp")
    try:
        yield staging
        _fsync_tree(staging)
        if os.path.lexists(path):
            if not force:
                raise errors.CheckpointExistsError(
                    f"{path} appeared while it was being written; not replacing it."
                )
            old = _hidden_sibling(path, "old")
            os.rename(path, old)
            os.rename(staging, path)
            _fsync_directory(path.parent)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(staging, path)
            _fsync_directory(path.parent)
    finally:
        for leftover in path.parent.iterdir():
            if leftover.name.startswith(staging.name):
                shutil.rmtree(leftover, ignore_errors=True)


#### Saving ####


@functools.cache
def _composite_checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def composite_save_args(encoded: manifest_lib.EncodedModel) -> ocp.args.Composite:
    """The Orbax arguments that write an encoded model (shared with the step manager)."""
    items: dict[str, Any] = {MANIFEST_ITEM: ocp.args.JsonSave(encoded.manifest)}
    if encoded.arrays:
        # Orbax refuses empty trees; a model without arrays is all manifest.
        items[ARRAYS_ITEM] = ocp.args.StandardSave(encoded.array_tree())
    return ocp.args.Composite(**items)


def save(path: str | os.PathLike, model: Any, *, force: bool = False) -> pathlib.Path:
    """Saves a model (arrays, structure, axis names, labels) as a pz_flax checkpoint.

    The structure is described before anything is written, so a model holding something a
    manifest cannot describe (a lambda in a static field, say) fails without touching disk.

    Args:
        path: The checkpoint directory to create.
        model: A pz_flax model, or any tree of pz_flax structs, NNX variables, arrays, lists,
            tuples, dicts, None and Python scalars.
        force: Replace an existing checkpoint at ``path``. The old one stays intact until the
            new one is complete.

    Returns:
        The absolute path of the checkpoint.

    Raises:
        CheckpointExistsError: If ``path`` exists and ``force`` is False.
        UnsupportedValueError: If part of the model cannot be described; names its path.
    """
    encoded = manifest_lib.encode(model)
    with atomic_directory(path, force=force) as staging:
        _composite_checkpointer().save(staging, composite_save_args(encoded))
    return pathlib.Path(path).absolute()


#### Reading ####


def checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
    """``path`` as an absolute path, checked to be an existing directory.

    Raises:
        CheckpointNotFoundError: If it does not exist or is a file.
    """
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise errors.CheckpointNotFoundError(f"No checkpoint at {path}: the path does not exist.")
    if not path.is_dir():
        raise errors.CheckpointNotFoundError(f"{path} is a file, not a checkpoint directory.")
    return path


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """Tells whether ``path`` looks like a finished Orbax checkpoint directory."""
    path = pathlib.Path(path)
    return any((path / name).exists() for name in _ORBAX_MARKERS)


def is_pz_checkpoint(path: str | os.PathLike) -> bool:
    """Tells whether ``path`` is a directory holding a pz_flax manifest."""
    return (pathlib.Path(path) / MANIFEST_ITEM / _MANIFEST_FILE).is_file()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks the structure manifest of a pz_flax checkpoint.

    Args:
        path: The checkpoint directory.

    Returns:
        The manifest (a JSON object).

    Raises:
        CheckpointNotFoundError: If ``path`` does not exist or is not a pz_flax checkpoint.
        CorruptCheckpointError: If the manifest is missing from a checkpoint, unreadable, or
            not a manifest this version of pz_flax understands.
    """
    path = checkpoint_dir(path)
    manifest_file = path / MANIFEST_ITEM / _MANIFEST_FILE
    if not manifest_file.is_file():
        if (path / ARRAYS_ITEM).is_dir():
            raise errors.CorruptCheckpointError(
                f"The checkpoint at {path} has lost its manifest ({manifest_file} is missing)."
            )
        if is_orbax_checkpoint(path):
            raise errors.CheckpointNotFoundError(
                f"{path} is a plain Orbax checkpoint without a pz_flax manifest (an NNX"
                " checkpoint?); read it with read_nnx_checkpoint or `pz-flax-convert nnx-to-pz`."
            )
        raise errors.CheckpointNotFoundError(f"{path} is not a pz_flax checkpoint.")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.CorruptCheckpointError(
            f"The manifest of the checkpoint at {path} is damaged (not valid JSON: {exc})."
        ) from None
    manifest_lib.read_entries(manifest)
    return manifest


def _flatten_metadata_tree(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict):
        flat: dict[tuple[str, ...], Any] = {}
        for key, value in tree.items():
            flat.update(_flatten_metadata_tree(value, (*prefix, str(key))))
        return flat
    return {prefix: tree}


def stored_array_metadata(directory: pathlib.Path) -> dict[tuple[str, ...], Any]:
    """Orbax's own record of the arrays in a checkpoint directory, by key path.

    Raises:
        CorruptCheckpointError: If Orbax cannot read its metadata there.
    """
    try:
        metadata = ocp.StandardCheckpointHandler().metadata(directory)
    except Exception as exc:
        raise errors.CorruptCheckpointError(
            f"Cannot read the arrays in {directory} (missing or damaged files):"
            f" {exception_summary(exc)}"
        ) from None
    tree = getattr(metadata, "tree", metadata)
    return _flatten_metadata_tree(tree)


def exception_summary(exc: BaseException) -> str:
    """The exception type and the gist of its message, on one short line.

    TensorStore errors append a JSON spec of the whole store to their message; that and
    anything past the first line is dropped.
    """
    lines = str(exc).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec=")[0] if lines else ""
    if len(text) > _MAX_SUMMARY_CHARS:
        text = text[: _MAX_SUMMARY_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {text}"


def _check_stored_arrays(path: pathlib.Path, entries: list[manifest_lib.ArrayEntry]) -> None:
    """Checks that Orbax stored every array the manifest lists, with that shape and dtype."""
    stored = stored_array_metadata(path / ARRAYS_ITEM)
    problems = []
    for entry in entries:
        found = stored.get(entry.key)
        if found is None:
            problems.append(f"{entry.path}: listed in the manifest, missing from the arrays")
            continue
        shape = tuple(getattr(found, "shape", ()) or ())
        dtype = getattr(found, "dtype", None)
        if shape != entry.shape or (dtype is not None and np.dtype(dtype).name != entry.dtype):
            problems.append(
                f"{entry.path}: the manifest says {entry.shape} {entry.dtype}, the arrays hold"
                f" {shape} {dtype}"
            )
    if problems:
        raise errors.CorruptCheckpointError(
            f"The checkpoint at {path} is inconsistent: {'; '.join(problems[:3])}"
            + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        )


def default_sharding() -> jax.sharding.Sharding:
    """Where arrays go when nothing says otherwise: the first device."""
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _pick_sharding(
    entry: manifest_lib.ArrayEntry, sharding: ShardingSpec, target_leaf: Any
) -> jax.sharding.Sharding:
    if isinstance(sharding, jax.sharding.Sharding):
        chosen = sharding
    elif sharding is not None:
        chosen = sharding(entry)
    else:
        chosen = getattr(target_leaf, "sharding", None)
    if chosen is None:
        chosen = default_sharding()
    if not isinstance(chosen, jax.sharding.Sharding):
        raise TypeError(
            f"{entry.path}: the sharding callable returned {chosen!r}, not a jax.sharding.Sharding"
            " or None."
        )
    try:
        chosen.shard_shape(entry.shape)
    except (ValueError, TypeError, IndexError) as exc:
        raise ValueError(
            f"{entry.path}: cannot restore the array of shape {entry.shape} (axes"
            f" {entry.axis_names}) into the sharding {chosen}: {exc}"
        ) from None
    return chosen


def read_arrays(
    path: pathlib.Path,
    entries: list[manifest_lib.ArrayEntry],
    shardings: Iterable[jax.sharding.Sharding],
) -> list[jax.Array]:
    """Reads a checkpoint's arrays straight into the given shardings, in ``entries`` order.

    Raises:
        CorruptCheckpointError: If array files are missing or damaged.
    """
    if not entries:
        return []
    if not (path / ARRAYS_ITEM).is_dir():
        raise errors.CorruptCheckpointError(
            f"The checkpoint at {path} lists {len(entries)} arrays but its '{ARRAYS_ITEM}'"
            " directory is missing."
        )
    abstract = manifest_lib.shape_dtype_structs(entries, shardings)
    abstract_tree = manifest_lib.build_array_tree(entries, abstract)
    try:
        restored = ocp.StandardCheckpointHandler().restore(
            path / ARRAYS_ITEM, args=ocp.args.StandardRestore(abstract_tree)
        )
    except Exception as exc:
        # Reading Orbax's metadata first would cost every restore a second pass over the
        # array stores; it is consulted only to explain a failure precisely.
        _check_stored_arrays(path, entries)
        raise errors.CorruptCheckpointError(
            f"Cannot read the arrays of the checkpoint at {path} (missing or damaged files):"
            f" {exception_summary(exc)}"
        ) from None
    arrays = []
    for entry in entries:
        node = restored
        for part in entry.key:
            node = node[part]
        if tuple(node.shape) != entry.shape or np.dtype(node.dtype).name != entry.dtype:
            _check_stored_arrays(path, entries)
            raise errors.CorruptCheckpointError(
                f"The checkpoint at {path} is inconsistent: {entry.path} is {entry.shape}"
                f" {entry.dtype} in the manifest, but Orbax read {tuple(node.shape)} {node.dtype}."
            )
        if entry.prng_impl is not None:
            node = jax.random.wrap_key_data(node, impl=entry.prng_impl)
        arrays.append(node)
    return arrays


def restore(
    path: str | os.PathLike,
    target: Any = None,
    *,
    allow_modules: Iterable[str] | str = (),
    sharding: ShardingSpec = None,
) -> Any:
    """Restores a model saved by ``save``, with or without the code that built it.

    Without ``target``, the model is rebuilt from the manifest alone: classes are resolved by
    name (pz_flax's own, registered ones, and those of ``allow_modules``; anything else is
    refused before being imported) and instances are created field by field, without running
    any ``__init__``.

    With ``target`` (an existing model, or an abstract one whose arrays are
    ``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape``), the checkpoint must match it:
    same structure, classes, static fields, labels, axis names, shapes and dtypes. Every
    difference is reported at once. The result has the target's structure and objects
    (classes come from the target, so ``allow_modules`` is not needed) and the checkpoint's
    arrays.

    Arrays are read by Orbax directly into their final sharding, so restoring holds no copy of
    the weights beyond the restored model itself.

    Args:
        path: The checkpoint directory.
        target: Optional model to restore into.
        allow_modules: Module names (or one name) whose classes and functions the manifest may
            name, beyond pz_flax's own. Their submodules are allowed too.
        sharding: Where to put each array: one ``jax.sharding.Sharding`` for all, or a
            callable from an ``ArrayEntry`` (path, shape, dtype, axis names) to a sharding (or
            None for the default), e.g. ``sharding_from_axis_names(mesh, {...})``. Without it,
            arrays take the sharding of the target's leaves, else the first device.

    Returns:
        The restored model.

    Raises:
        CheckpointNotFoundError: If ``path`` holds no pz_flax checkpoint.
        CorruptCheckpointError: If the manifest or the array files are damaged.
        UntrustedTypeError: If the manifest names a class outside the allow-list.
        CheckpointMismatchError: If the checkpoint does not match ``target``; its
            ``mismatches`` list every differing path.
        ValueError: If a requested sharding does not fit an array.
    """
    if isinstance(allow_modules, str):
        allow_modules = (allow_modules,)
    allow_modules = tuple(allow_modules)
    path = checkpoint_dir(path)
    manifest = read_manifest(path)
    entries = manifest_lib.read_entries(manifest)
    if target is None:
        # Resolve every class before reading any array: an untrusted or missing class fails
        # fast, and nothing is read for a checkpoint that cannot be rebuilt.
        manifest_lib.decode(manifest, [None] * len(entries), allow_modules=allow_modules)
        shardings = [_pick_sharding(entry, sharding, None) for entry in entries]
        arrays = read_arrays(path, entries, shardings)
        return manifest_lib.decode(manifest, arrays, allow_modules=allow_modules)

    described = manifest_lib.encode(target, allow_abstract=True, lenient_static=True)
    problems, sources = manifest_lib.compare_manifests(manifest, described.manifest)
    if problems:
        raise errors.CheckpointMismatchError(
            f"The checkpoint at {path} does not match the target ({len(problems)}"
            f" difference{'s' if len(problems) != 1 else ''}):",
            problems,
        )
    # Read only the arrays the target has a place for, each into the sharding of that place.
    leaf_for_entry = {
        source: leaf for source, leaf in zip(sources, described.arrays) if isinstance(source, int)
    }
    wanted = sorted(leaf_for_entry)
    shardings = [_pick_sharding(entries[i], sharding, leaf_for_entry[i]) for i in wanted]
    read = dict(zip(wanted, read_arrays(path, [entries[i] for i in wanted], shardings)))
    filled = (
        source.value if isinstance(source, manifest_lib.SavedLiteral) else read[source]
        for source in sources
    )
    return manifest_lib.replace_arrays(target, filled)


def sharding_from_axis_names(
    mesh: jax.sharding.Mesh, axis_rules: dict[str, str | tuple[str, ...] | None]
) -> Callable[[manifest_lib.ArrayEntry], jax.sharding.Sharding]:
    """A ``sharding=`` callable that shards arrays by their named axes.

    Each named axis listed in ``axis_rules`` is split over the given mesh axis (or axes);
    every other axis, and every array without axis names, is replicated.

    Args:
        mesh: The device mesh.
        axis_rules: Maps a model axis name (``"embedding"``) to a mesh axis name (``"model"``),
            a tuple of mesh axis names, or None.

    Returns:
        A callable for ``restore(..., sharding=...)``.
    """

    def sharding_for(entry: manifest_lib.ArrayEntry) -> jax.sharding.Sharding:
        names = entry.axis_names or (None,) * len(entry.shape)
        spec = jax.sharding.PartitionSpec(
            *(axis_rules.get(name) if name is not None else None for name in names)
        )
        return jax.sharding.NamedSharding(mesh, spec)

    return sharding_for
