"""Saving and restoring whole pz_flax models with Orbax, atomically, from one or many processes.

A pz_flax checkpoint is an ordinary Orbax composite checkpoint directory with two items:

* ``arrays``: the model's arrays, written by Orbax's ``StandardCheckpointHandler`` as a tree
  of dicts keyed by the arrays' paths in the model (so plain Orbax can read them too);
* ``manifest``: the JSON structure manifest (``manifest.py``), which says how to put the
  arrays back into layers, variables and named arrays.

How a save is published (``atomic_directory``):

1. Every process calls ``save`` with the same path. The primary process draws a token for this
   save and broadcasts it (``ocp.multihost.broadcast_one_to_all``), so every process names the
   same staging directory, ``.NAME.pz_flax-TOKEN``, beside the destination.
2. Orbax writes the staging directory with its own atomicity and barriers: it exists only once
   complete (Orbax writes into ``....orbax-checkpoint-tmp`` and renames it when finished).
3. The primary process publishes it with renames only: ``NAME`` (with ``force=True``) is moved
   to ``.NAME.pz_flax-TOKEN-old``, the staging directory to ``NAME``, then the old copy is
   deleted. The other processes wait at a barrier and learn the outcome by broadcast.

At every instant ``NAME`` holds the old or the new complete checkpoint, except between the two
renames of a forced replacement, when both complete copies sit beside it; ``restore`` then
reads the newest complete one, and the next save of ``NAME`` moves it back into place before
it removes anything. Cleanup only ever deletes copies that are not the only complete one.
Nothing depends on process ids: a token is the same on every process, and which leftover is
newest is read from the tokens' timestamps.

Paths go through ``etils.epath``, as Orbax's do, so ``gs://bucket/ckpt`` and other remote
paths reach Orbax intact; ``~`` is expanded and local paths are made absolute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import functools
import json
import os
import secrets
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import traverse_util

from pz_flax._compat import orbax as orbax_compat
from pz_flax.checkpoint import errors
from pz_flax.checkpoint import manifest as manifest_lib

ARRAYS_ITEM = "arrays"
MANIFEST_ITEM = "manifest"
# The manifest's file name inside the manifest item directory, given to Orbax's JSON handler
# (it is that handler's default name too, so format-1 checkpoints have it as well).
MANIFEST_FILE = "metadata"
# Concurrent fsync calls while publishing a checkpoint (they mostly wait on the disk).
_FSYNC_THREADS = 16
# Error messages from Orbax/TensorStore are cut to this length in our messages.
_MAX_SUMMARY_CHARS = 300
# Orbax's suffix for the directory it writes before renaming it into place.
_ORBAX_TMP_SUFFIX = ocp.utils.TMP_DIR_SUFFIX
# Marks the hidden siblings of a checkpoint that a save of it creates.
_SIBLING_MARK = ".pz_flax-"
_OLD_SUFFIX = "-old"

PathLike = str | os.PathLike
ShardingSpec = jax.sharding.Sharding | Callable[[manifest_lib.ArrayEntry], Any] | None


class CheckpointKind(enum.Enum):
    """What a directory written by this module holds; ``force=True`` replaces only the same."""

    PZ_FLAX = "pz_flax checkpoint"
    NNX = "NNX (plain Orbax) checkpoint"


#### Paths and environment errors ####


def _is_remote(text: str) -> bool:
    return "://" in text


def checkpoint_path(path: PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: ``~`` expanded, local paths absolute, URIs untouched.

    Raises:
        CheckpointPathError: If the path is empty, not valid text, or of an unknown scheme.
    """
    text = os.fsdecode(path) if isinstance(path, bytes) else os.fspath(path)
    if not text.strip():
        raise errors.CheckpointPathError(
            f"The checkpoint path is empty ({text!r}; an unset variable?); name a directory."
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.CheckpointPathError(
            f"The checkpoint path {text!r} holds bytes that are not UTF-8; Orbax cannot store it."
        ) from None
    if not _is_remote(text):
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    try:
        return epath.Path(text)
    except KeyError:
        raise errors.CheckpointPathError(
            f"The checkpoint path {text} uses a scheme etils.epath does not know."
        ) from None


def _cause(exc: BaseException) -> str:
    """Names what went wrong in the environment, in words, then the raw exception."""
    text = str(exc)
    code = getattr(exc, "errno", None)
    if isinstance(exc, PermissionError) or code in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    elif code == errno.EROFS or "Read-only file system" in text:
        reason = "the filesystem is read-only"
    elif code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or "RESOURCE_EXHAUSTED" in text:
        reason = "no space left (disk full, quota or file size limit)"
    elif code == errno.ENOTDIR or isinstance(exc, NotADirectoryError | FileExistsError):
        reason = "a component of the path is a file, not a directory"
    elif isinstance(exc, ImportError | ConnectionError | TimeoutError):
        reason = "the filesystem cannot be reached"
    else:
        reason = "the storage failed"
    return f"{reason} ({exception_summary(exc)})"


@contextlib.contextmanager
def storage_errors(path: epath.Path, doing: str) -> Iterator[None]:
    """Turns an environment failure inside the block into a ``CheckpointStorageError``.

    ``doing`` completes "Cannot ... {path}", e.g. ``"write the checkpoint"``. Checkpoint errors
    pass through unchanged, and so do interrupts.
    """
    try:
        yield
    except errors.CheckpointError:
        raise
    except Exception as exc:
        raise errors.CheckpointStorageError(
            f"Cannot {doing} {path}: {_cause(exc)}.", path=str(path)
        ) from exc


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


#### What may be replaced ####


def _is_within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def directory_kind(path: epath.Path) -> CheckpointKind | None:
    """Which kind of checkpoint ``path`` holds, if any."""
    if is_pz_checkpoint(path):
        return CheckpointKind.PZ_FLAX
    if is_orbax_checkpoint(path):
        return CheckpointKind.NNX
    return None


def check_destination(
    path: PathLike,
    *,
    kind: CheckpointKind,
    force: bool,
    keep: Iterable[PathLike] = (),
) -> epath.Path:
    """Checks that a save may write ``path``, before anything is read or written.

    Without ``force`` the path must not exist. With it, an existing path must be a real
    directory (not a symbolic link) holding a checkpoint of the same ``kind``, and may not be
    the filesystem root, the home directory, the current directory, a directory containing
    one of these, or one of ``keep`` or a directory containing one of them.

    Args:
        path: The destination.
        kind: What the save writes.
        force: Whether the save may replace an existing checkpoint.
        keep: Paths that must survive the save (``pz-flax-convert`` passes its ``--in``).

    Returns:
        The destination as ``checkpoint_path`` gives it.

    Raises:
        CheckpointExistsError: If ``path`` exists and ``force`` is False.
        CheckpointPathError: If ``force`` may not replace what is at ``path``.
        CheckpointStorageError: If the filesystem cannot be asked.
    """
    path = checkpoint_path(path)
    text = os.fspath(path)
    with storage_errors(path, "look at"):
        is_link = not _is_remote(text) and os.path.islink(text)
        exists = is_link or path.exists()
    if not exists:
        if not force and path.parent.is_dir() and recoverable_copy(path) is not None:
            raise errors.CheckpointExistsError(
                f"{path} holds a checkpoint that an interrupted save left beside it; pass"
                " force=True (pz-flax-convert: --force) to replace it."
            )
        return path
    if not force:
        raise errors.CheckpointExistsError(
            f"{path} already exists; pass force=True (pz-flax-convert: --force) to replace it."
        )
    if is_link:
        raise errors.CheckpointPathError(
            f"{path} is a symbolic link; force=True replaces only a checkpoint directory, never"
            " a link (save to the link's target instead)."
        )
    if not _is_remote(text):
        real = os.path.realpath(text)
        protected = {
            "the filesystem root": os.path.realpath(os.sep),
            "your home directory": os.path.realpath(os.path.expanduser("~")),
            "the current directory": os.path.realpath(os.getcwd()),
        }
        protected.update({f"the input {item}": os.path.realpath(item) for item in map(str, keep)})
        for what, protected_path in protected.items():
            if _is_within(protected_path, real):
                relation = "is" if protected_path == real else "contains"
                raise errors.CheckpointPathError(
                    f"Refusing to replace {path}: it {relation} {what}; force=True replaces only"
                    " a checkpoint directory."
                )
    with storage_errors(path, "look at"):
        found = directory_kind(path) if path.is_dir() else None
    if found is not kind:
        holds = (
            "a file"
            if found is None and not path.is_dir()
            else (f"a {found.value}" if found else "a directory that is not a checkpoint")
        )
        raise errors.CheckpointPathError(
            f"Refusing to replace {path}: it holds {holds}, and force=True replaces only an"
            f" existing {kind.value}."
        )
    return path


#### Atomic, multi-process publishing ####


@dataclasses.dataclass(frozen=True)
class _Sibling:
    """A hidden directory beside a checkpoint, left by a save of it."""

    path: epath.Path
    token: str
    is_old: bool
    is_complete: bool


def _save_token() -> str:
    """A name part for one save, drawn by the primary process and identical on every process.

    It starts with the time in nanoseconds (hex, fixed width), so tokens sort by age.
    """
    drawn = np.frombuffer(
        time.time_ns().to_bytes(8, "big") + secrets.token_bytes(4), dtype=np.uint32
    ).astype(np.int32)
    shared = np.asarray(ocp.multihost.broadcast_one_to_all(drawn)).astype(np.uint32)
    return "".join(f"{int(part):08x}" for part in shared)


def _staging_path(path: epath.Path, token: str) -> epath.Path:
    return path.parent / f".{path.name}{_SIBLING_MARK}{token}"


def _siblings(path: epath.Path) -> list[_Sibling]:
    """The leftovers of earlier saves of ``path``, oldest first."""
    prefix = f".{path.name}{_SIBLING_MARK}"
    found = []
    for candidate in path.parent.iterdir():
        name = candidate.name
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        incomplete = rest.endswith(_ORBAX_TMP_SUFFIX)
        rest = rest.removesuffix(_ORBAX_TMP_SUFFIX)
        is_old = rest.endswith(_OLD_SUFFIX)
        token = rest.removesuffix(_OLD_SUFFIX)
        complete = not incomplete and directory_kind(candidate) is not None
        found.append(_Sibling(candidate, token, is_old, complete))
    # For one token, the new copy (not old) is the newer one.
    return sorted(found, key=lambda sibling: (sibling.token, not sibling.is_old))


def staging_leftovers(path: PathLike) -> list[epath.Path]:
    """The hidden directories that saves of ``path`` left beside it (none after a clean save)."""
    path = checkpoint_path(path)
    if not path.parent.is_dir():
        return []
    return [sibling.path for sibling in _siblings(path)]


def _interrupted_swaps(siblings: list[_Sibling]) -> dict[str, list[_Sibling]]:
    """The leftovers of forced saves killed between their two renames, by token.

    Such a save moved the previous checkpoint aside as ``...-old``; its new copy, if complete,
    is newer. A complete staging directory without an old twin is no such leftover: its save
    never published (or is still running), so it does not count as the checkpoint.
    """
    old_tokens = {sibling.token for sibling in siblings if sibling.is_old}
    swaps: dict[str, list[_Sibling]] = {}
    for sibling in siblings:
        if sibling.token in old_tokens:
            swaps.setdefault(sibling.token, []).append(sibling)
    return swaps


def recoverable_copy(path: epath.Path) -> epath.Path | None:
    """The complete copy a forced save of ``path`` killed between its renames left, if any.

    The newest such save's new copy if it is complete, else its old copy.
    """
    swaps = _interrupted_swaps(_siblings(path))
    if not swaps:
        return None
    newest = swaps[max(swaps)]
    complete = [sibling for sibling in newest if sibling.is_complete or sibling.is_old]
    return complete[-1].path


def _remove_tree(path: epath.Path) -> None:
    if path.is_dir():
        path.rmtree()
    elif path.exists():
        path.unlink()


def _recover(path: epath.Path, *, force: bool) -> None:
    """Primary process: finishes what killed saves of ``path`` left, deleting no only copy.

    If ``path`` is missing after a forced save was killed between its renames, the complete
    copy it left is moved into place. Then, with a checkpoint at ``path``, the leftovers of
    such saves are deleted. Other staging directories might belong to a save still running
    elsewhere; only ``force`` (which claims the path) deletes them.
    """
    if not path.exists():
        copy = recoverable_copy(path)
        if copy is None:
            return
        copy.rename(path)
    siblings = _siblings(path)
    swapped = {s.path for group in _interrupted_swaps(siblings).values() for s in group}
    for sibling in siblings:
        if force or sibling.path in swapped:
            _remove_tree(sibling.path)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: epath.Path) -> None:
    """Flushes every local file and directory under ``root`` to stable storage.

    Each ``fsync`` waits for a journal commit of a few milliseconds; issued from a thread pool
    they share commits, which keeps this a small fraction of the save (see
    ``benchmarks/checkpoint_bench.py``). Remote stores persist on write; nothing to do there.
    """
    if _is_remote(os.fspath(root)):
        return
    paths: list[str] = []
    for directory, _, files in os.walk(root):
        paths.extend(os.path.join(directory, name) for name in files)
        paths.append(directory)
    with futures.ThreadPoolExecutor(max_workers=min(_FSYNC_THREADS, len(paths))) as pool:
        # ``list`` re-raises the first failure, if any.
        list(pool.map(_fsync_path, paths))


def _publish(staging: epath.Path, path: epath.Path, token: str, *, force: bool) -> None:
    """Primary process: moves the complete staging directory to ``path``, by renames only."""
    if not staging.is_dir():
        raise errors.CheckpointStorageError(
            f"Cannot publish the checkpoint at {path}: its staging directory {staging} vanished"
            " (another save of the same path removed it?).",
            path=str(path),
        )
    _fsync_tree(staging)
    if path.exists():
        if not force:
            raise errors.CheckpointExistsError(
                f"{path} appeared while it was being written (another save of the same path?);"
                " it was left as it is and the new checkpoint discarded."
            )
        old = path.parent / f"{staging.name}{_OLD_SUFFIX}"
        path.rename(old)
        # A kill here leaves both complete copies beside ``path``; restore reads the newest.
        staging.rename(path)
        _fsync_tree_parent(path)
        _remove_tree(old)
        return
    try:
        staging.rename(path)
    except OSError as exc:
        if isinstance(exc, FileExistsError) or exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise errors.CheckpointExistsError(
                f"{path} appeared while it was being written (another save of the same path?);"
                " it was left as it is and the new checkpoint discarded."
            ) from None
        raise
    _fsync_tree_parent(path)


def _fsync_tree_parent(path: epath.Path) -> None:
    if not _is_remote(os.fspath(path)):
        _fsync_path(os.fspath(path.parent))


def _barrier(stage: str, token: str) -> None:
    ocp.multihost.sync_global_processes(f"pz_flax_checkpoint:{stage}:{token}")


def _all_processes_agree(succeeded: bool) -> bool:
    """The primary's outcome, on every process (a barrier too)."""
    shared = ocp.multihost.broadcast_one_to_all(np.asarray(int(succeeded), dtype=np.int32))
    return bool(int(np.asarray(shared)))


@contextlib.contextmanager
def atomic_directory(path: PathLike, *, kind: CheckpointKind, force: bool) -> Iterator[epath.Path]:
    """Publishes a checkpoint directory at ``path`` all at once, or not at all.

    Every process enters it with the same ``path``. The body writes the yielded staging path
    with an Orbax checkpointer (which creates it atomically). On normal exit the primary
    process publishes it (see the module docstring); on an exception or interrupt it deletes
    whatever the body wrote, and ``path`` is left as it was.

    Args:
        path: The destination directory.
        kind: What the body writes; ``force`` replaces only a checkpoint of this kind.
        force: Replace an existing checkpoint of the same kind.

    Yields:
        The staging directory, beside ``path`` (same filesystem, so renames are atomic), named
        the same on every process. It does not exist yet.

    Raises:
        CheckpointExistsError: If ``path`` exists and ``force`` is False.
        CheckpointPathError: If ``force`` may not replace what is at ``path``.
        CheckpointStorageError: If the filesystem fails (permissions, space, reachability).
    """
    path = check_destination(path, kind=kind, force=force)
    token = _save_token()
    staging = _staging_path(path, token)
    primary = ocp.multihost.is_primary_host(0)
    _barrier("start", token)
    if primary:
        with storage_errors(path.parent, "create the directory"):
            path.parent.mkdir(parents=True, exist_ok=True)
        with storage_errors(path, "tidy up earlier saves of"):
            _recover(path, force=force)
    _barrier("prepared", token)
    try:
        with storage_errors(path, "write the checkpoint"):
            yield staging
        failure: BaseException | None = None
        if primary:
            try:
                with storage_errors(path, "publish the checkpoint"):
                    _publish(staging, path, token, force=force)
            except errors.CheckpointError as exc:
                failure = exc
        if not _all_processes_agree(failure is None):
            if failure is not None:
                raise failure
            raise errors.CheckpointStorageError(
                f"The primary process could not publish the checkpoint at {path}; its error"
                " says why.",
                path=str(path),
            )
    finally:
        if primary:
            for leftover in (staging, staging.parent / f"{staging.name}{_ORBAX_TMP_SUFFIX}"):
                with contextlib.suppress(OSError):
                    _remove_tree(leftover)


#### Saving ####


@functools.cache
def _composite_checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**item_handlers()))


def item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """The Orbax handler of each item of a pz_flax checkpoint (shared with the step manager)."""
    return {
        ARRAYS_ITEM: ocp.StandardCheckpointHandler(),
        MANIFEST_ITEM: ocp.JsonCheckpointHandler(filename=MANIFEST_FILE),
    }


def composite_save_args(encoded: manifest_lib.EncodedModel) -> ocp.args.Composite:
    """The Orbax arguments that write an encoded model (shared with the step manager)."""
    items: dict[str, Any] = {MANIFEST_ITEM: ocp.args.JsonSave(encoded.manifest)}
    if encoded.arrays:
        # Orbax refuses empty trees; a model without arrays is all manifest.
        items[ARRAYS_ITEM] = ocp.args.StandardSave(encoded.array_tree())
    return ocp.args.Composite(**items)


def save(path: PathLike, model: Any, *, force: bool = False) -> epath.Path:
    """Saves a model (arrays, structure, axis names, labels) as a pz_flax checkpoint.

    The structure is described before anything is written, so a model holding something a
    manifest cannot describe (a lambda in a static field, say) fails without touching disk.

    With several processes (``jax.distributed``), every process calls ``save`` with the same
    path and model; each writes its own shards and the primary process publishes the result.

    Args:
        path: The checkpoint directory to create: a local path (``~`` is expanded) or a URI
            such as ``gs://bucket/ckpt``.
        model: A pz_flax model, or any tree of pz_flax structs, NNX variables, arrays, lists,
            tuples, dicts, None and Python scalars.
        force: Replace an existing pz_flax checkpoint at ``path``. The old one stays intact
            until the new one is complete. Anything else at ``path`` (another directory, a
            file, a link, the current or home directory) is refused.

    Returns:
        The checkpoint's path (absolute if local).

    Raises:
        CheckpointExistsError: If ``path`` exists and ``force`` is False.
        CheckpointPathError: If the path is unusable, or ``force`` may not replace it.
        CheckpointStorageError: If the filesystem fails; names the path and the cause.
        UnsupportedValueError: If part of the model cannot be described; names its path.
    """
    encoded = manifest_lib.encode(model)
    with atomic_directory(path, kind=CheckpointKind.PZ_FLAX, force=force) as staging:
        _composite_checkpointer().save(staging, composite_save_args(encoded))
    return checkpoint_path(path)


#### Reading ####


def checkpoint_dir(path: PathLike) -> epath.Path:
    """The directory holding the checkpoint saved at ``path``.

    That is ``path`` itself, or, when a save replacing it was killed between its two renames,
    the newest complete copy that save left beside it.

    Raises:
        CheckpointNotFoundError: If there is no checkpoint there, or it is a file.
        CheckpointStorageError: If the filesystem cannot be reached.
    """
    path = checkpoint_path(path)
    with storage_errors(path, "read"):
        if path.is_dir():
            return path
        if path.exists():
            raise errors.CheckpointNotFoundError(f"{path} is a file, not a checkpoint directory.")
        if path.parent.is_dir() and (copy := recoverable_copy(path)) is not None:
            return copy
    raise errors.CheckpointNotFoundError(f"No checkpoint at {path}: the path does not exist.")


def is_orbax_checkpoint(path: PathLike) -> bool:
    """Tells whether ``path`` looks like a finished Orbax checkpoint directory."""
    path = epath.Path(path)
    return orbax_compat.is_finished_checkpoint(path)


def is_pz_checkpoint(path: PathLike) -> bool:
    """Tells whether ``path`` is a directory holding a pz_flax manifest."""
    return (epath.Path(path) / MANIFEST_ITEM / MANIFEST_FILE).is_file()


def read_manifest(path: PathLike) -> dict[str, Any]:
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
    manifest_file = path / MANIFEST_ITEM / MANIFEST_FILE
    with storage_errors(path, "read the checkpoint at"):
        if not manifest_file.is_file():
            if (path / ARRAYS_ITEM).is_dir():
                raise errors.CorruptCheckpointError(
                    f"The checkpoint at {path} has lost its manifest ({manifest_file} is missing)."
                )
            if is_orbax_checkpoint(path):
                raise errors.CheckpointNotFoundError(
                    f"{path} is a plain Orbax checkpoint without a pz_flax manifest (an NNX"
                    " checkpoint?); read it with read_nnx_checkpoint or `pz-flax-convert"
                    " nnx-to-pz`."
                )
            raise errors.CheckpointNotFoundError(f"{path} is not a pz_flax checkpoint.")
        data = manifest_file.read_bytes()
    manifest = manifest_lib.parse_manifest_json(data, source=manifest_source(path))
    manifest_lib.read_entries(manifest, source=manifest_source(path))
    return manifest


def manifest_source(path: PathLike) -> str:
    """How messages about a checkpoint's manifest name it: the manifest file."""
    return f"The checkpoint manifest {path}/{MANIFEST_ITEM}/{MANIFEST_FILE}"


def stored_array_metadata(directory: PathLike) -> dict[tuple[str, ...], Any]:
    """Orbax's own record of the arrays in a checkpoint directory, by key path.

    Raises:
        CorruptCheckpointError: If Orbax cannot read its metadata there.
    """
    directory = epath.Path(directory)
    try:
        metadata = ocp.StandardCheckpointHandler().metadata(directory)
    except Exception as exc:
        raise errors.CorruptCheckpointError(
            f"Cannot read the arrays in {directory} (missing or damaged files):"
            f" {exception_summary(exc)}"
        ) from exc
    tree = getattr(metadata, "tree", metadata)
    if not isinstance(tree, dict):
        return {(): tree}
    flat = traverse_util.flatten_dict(tree, keep_empty_nodes=False)
    return {tuple(str(part) for part in key): value for key, value in flat.items()}


#### Cross-checking the stored array metadata ####


def array_kvstore_spec(arrays_dir: epath.Path) -> dict[str, Any] | str:
    """The TensorStore key-value store holding the arrays Orbax wrote into ``arrays_dir``."""
    base = os.fspath(arrays_dir)
    base = base if _is_remote(base) else f"file://{base}"
    if orbax_compat.holds_ocdbt_database(arrays_dir):
        return {"driver": "ocdbt", "base": base}
    # Per-array directories: store keys are appended to the URL, so it must end in a slash.
    return base.rstrip("/") + "/"


def _zarr_layout_problem(entry: manifest_lib.ArrayEntry, raw: bytes | None) -> str | None:
    """What is wrong with one array's stored zarr metadata, compared with its manifest entry."""
    if raw is None:
        return "listed in the manifest, missing from the arrays"
    try:
        metadata = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"its stored metadata is damaged ({exception_summary(exc)})"
    if not isinstance(metadata, dict):
        return "its stored metadata is damaged (not a JSON object)"
    expected = np.dtype(entry.dtype)
    if metadata.get("zarr_format") == 3:
        dtype_text = metadata.get("data_type")
        layouts = [c for c in metadata.get("codecs") or () if isinstance(c, dict)]
        endian = next(
            (c.get("configuration", {}).get("endian") for c in layouts if c.get("name") == "bytes"),
            None,
        )
        transposed = any(c.get("name") == "transpose" for c in layouts)
        byteorder_ok = endian in (None, "little") or expected.itemsize == 1
        order_ok = not transposed
    else:
        dtype_text = metadata.get("dtype")
        byteorder_ok = True
        order_ok = metadata.get("order", "C") == "C"
    try:
        stored = np.dtype(dtype_text)
    except TypeError:
        return f"its stored dtype {dtype_text!r} is not a dtype"
    shape = metadata.get("shape")
    problems = []
    if stored != expected or not byteorder_ok:
        problems.append(f"stored dtype {dtype_text!r}, the manifest says {entry.dtype}")
    if not isinstance(shape, list) or tuple(shape) != entry.shape:
        problems.append(f"stored shape {shape!r}, the manifest says {entry.shape}")
    if not order_ok:
        problems.append("stored in a transposed (Fortran) order, pz_flax writes C order")
    return "; ".join(problems) or None


def check_stored_arrays(arrays_dir: epath.Path, entries: list[manifest_lib.ArrayEntry]) -> None:
    """Checks each array's stored dtype (with byte order), shape and order against the manifest.

    Orbax casts what it reads to the requested dtype, so an edited stored dtype (``<f4`` made
    ``<i4`` or ``>f4``) or order would otherwise restore wrong values without an error. The
    stored metadata is a few hundred bytes per array, read concurrently from the same store
    the arrays come from.

    Args:
        arrays_dir: The directory Orbax wrote the arrays into (a checkpoint's ``arrays`` item,
            or a whole plain Orbax checkpoint).
        entries: What each array must be.

    Raises:
        CorruptCheckpointError: If any array's stored metadata disagrees with the manifest.
    """
    try:
        store = ts.KvStore.open(array_kvstore_spec(arrays_dir)).result()
        candidates = {entry.path: orbax_compat.array_metadata_keys(entry.key) for entry in entries}
        found: dict[str, bytes] = {}
        # One round of concurrent reads per candidate location (zarr v2 first, then v3).
        for attempt in range(len(orbax_compat.ZARR_METADATA_FILES)):
            reads = {
                path: store.read(keys[attempt])
                for path, keys in candidates.items()
                if not found.get(path)
            }
            found.update({path: read.result().value for path, read in reads.items()})
    except Exception as exc:
        raise errors.CorruptCheckpointError(
            f"Cannot read the arrays' metadata in {arrays_dir} (missing or"
            f" damaged files): {exception_summary(exc)}"
        ) from exc
    problems = []
    for entry in entries:
        problem = _zarr_layout_problem(entry, found[entry.path] or None)
        if problem:
            problems.append(f"{entry.path}: {problem}")
    if problems:
        none_found = entries and not any(found.values())
        raise errors.CorruptCheckpointError(
            f"The checkpoint arrays in {arrays_dir} are inconsistent: {'; '.join(problems[:3])}"
            + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
            + (f". If they are all there: {orbax_compat.LAYOUT_ASSUMPTION}." if none_found else "")
        )


#### Restoring ####


def default_sharding() -> jax.sharding.Sharding:
    """Where arrays go when nothing says otherwise: this process's first device.

    A local device, so that every process of a multi-process job can restore on its own.
    """
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


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
        ) from exc
    return chosen


def read_arrays(
    path: epath.Path,
    entries: list[manifest_lib.ArrayEntry],
    shardings: Iterable[jax.sharding.Sharding],
) -> list[jax.Array]:
    """Reads a checkpoint's arrays straight into the given shardings, in ``entries`` order.

    The stored metadata of each array is checked against its manifest entry first.

    Raises:
        CorruptCheckpointError: If array files are missing, damaged, or disagree with the
            manifest.
    """
    if not entries:
        return []
    if not (path / ARRAYS_ITEM).is_dir():
        raise errors.CorruptCheckpointError(
            f"The checkpoint at {path} lists {len(entries)} arrays but its '{ARRAYS_ITEM}'"
            " directory is missing."
        )
    check_stored_arrays(path / ARRAYS_ITEM, entries)
    abstract = manifest_lib.shape_dtype_structs(entries, shardings)
    abstract_tree = manifest_lib.build_array_tree(entries, abstract)
    try:
        restored = ocp.StandardCheckpointHandler().restore(
            path / ARRAYS_ITEM, args=ocp.args.StandardRestore(abstract_tree)
        )
    except Exception as exc:
        raise errors.CorruptCheckpointError(
            f"Cannot read the arrays of the checkpoint at {path} (missing or damaged files):"
            f" {exception_summary(exc)}"
        ) from exc
    arrays = []
    for entry in entries:
        node = restored
        for part in entry.key:
            node = node[part]
        if entry.prng_impl is not None:
            node = jax.random.wrap_key_data(node, impl=entry.prng_impl)
        arrays.append(node)
    return arrays


def restore(
    path: PathLike,
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

    Either way each array's stored dtype, byte order, shape and order are checked against the
    manifest before it is read. Arrays are read by Orbax directly into their final sharding, so
    restoring holds no copy of the weights beyond the restored model itself. Every process of
    a multi-process job may restore on its own; without ``sharding`` or a target, each reads
    the arrays onto its first local device.

    Args:
        path: The checkpoint directory (local, ``~``-prefixed, or a URI such as ``gs://...``).
        target: Optional model to restore into.
        allow_modules: Module names (or one name) whose classes and functions the manifest may
            name, beyond pz_flax's own. Their submodules are allowed too.
        sharding: Where to put each array: one ``jax.sharding.Sharding`` for all, or a
            callable from an ``ArrayEntry`` (path, shape, dtype, axis names) to a sharding (or
            None for the default), e.g. ``sharding_from_axis_names(mesh, {...})``. Without it,
            arrays take the sharding of the target's leaves, else this process's first device.

    Returns:
        The restored model.

    Raises:
        CheckpointNotFoundError: If ``path`` holds no pz_flax checkpoint.
        CorruptCheckpointError: If the manifest or the array files are damaged.
        CheckpointStorageError: If the filesystem cannot be read.
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
    source = manifest_source(path)
    entries = manifest_lib.read_entries(manifest, source)
    if target is None:
        # Resolve every class before reading any array: an untrusted or missing class fails
        # fast, and nothing is read for a checkpoint that cannot be rebuilt.
        manifest_lib.decode(manifest, None, allow_modules=allow_modules, source=source)
        shardings = [_pick_sharding(entry, sharding, None) for entry in entries]
        arrays = read_arrays(path, entries, shardings)
        return manifest_lib.decode(manifest, arrays, allow_modules=allow_modules, source=source)

    described = manifest_lib.encode(target, allow_abstract=True, lenient_static=True)
    problems, sources = manifest_lib.compare_manifests(manifest, described.manifest, source)
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
