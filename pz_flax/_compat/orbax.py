"""Private details of Orbax that pz_flax depends on, each in one guarded place.

Rules for every entry in this module:

* a comment says why the private route is needed (what public API is missing) and since which
  release the assumption holds;
* the access is guarded: when a release breaks the assumption, the code falls back to a public
  route or raises an error that names the assumption and this module;
* a canary test in ``tests/_compat/`` checks the assumption against the installed release and
  fails with a message naming it.
"""

from __future__ import annotations

from etils import epath

#### Which files a finished Orbax checkpoint directory holds ####

# Telling an Orbax checkpoint from an ordinary directory (so that ``force=True`` replaces only a
# checkpoint, and so that restore can say "this is an NNX checkpoint") needs to know what Orbax
# leaves in a directory it has finished writing. Orbax has no public "is this a checkpoint"
# test (``ocp.utils.is_checkpoint_finalized`` only says whether a path is not a temporary
# one), so these are the file names it writes, as of orbax-checkpoint 0.11: the checkpoint
# metadata file every ``Checkpointer`` writes, the pytree metadata of the standard and pytree
# handlers, the OCDBT manifest, and the commit marker of remote (GCS) stores. Any one of them
# marks a checkpoint. The canary in ``tests/_compat/test_orbax.py`` saves with plain Orbax and
# checks that one of them appears.
FINISHED_CHECKPOINT_FILES = (
    "_CHECKPOINT_METADATA",
    "_METADATA",
    "manifest.ocdbt",
    "commit_success.txt",
)


def is_finished_checkpoint(path: epath.Path) -> bool:
    """Whether ``path`` holds one of the files Orbax writes into every finished checkpoint."""
    return any((path / name).exists() for name in FINISHED_CHECKPOINT_FILES)


#### Where Orbax keeps each array's zarr metadata ####

# Orbax casts what it reads to the dtype it is asked for, so checking the stored dtype (byte
# order included), shape and memory order of each array means reading the zarr metadata that
# TensorStore keeps next to the array's chunks. Orbax's public metadata API
# (``StandardCheckpointHandler.metadata``) gives shape and dtype without byte order or order,
# so the store is read directly. As of orbax-checkpoint 0.11: an array's store is named by its
# key path joined with dots; inside an OCDBT database (a ``manifest.ocdbt`` file in the item
# directory) or in plain per-array directories; with zarr v2 metadata in ``.zarray``, or zarr v3
# in ``zarr.json``. The canary in ``tests/_compat/test_orbax.py`` reads an array saved by plain
# Orbax this way. When a release moves the metadata, every array reads as missing, and the
# error says this layout may be why (``LAYOUT_ASSUMPTION``).
_ARRAY_NAME_SEPARATOR = "."
_OCDBT_MANIFEST = "manifest.ocdbt"
ZARR_METADATA_FILES = (".zarray", "zarr.json")
LAYOUT_ASSUMPTION = (
    "pz_flax._compat.orbax expects Orbax to keep each array's zarr metadata under"
    " '<key path joined by dots>/.zarray' or '/zarr.json'"
)


def holds_ocdbt_database(arrays_dir: epath.Path) -> bool:
    """Whether Orbax wrote the arrays in ``arrays_dir`` into one OCDBT database."""
    return (arrays_dir / _OCDBT_MANIFEST).exists()


def array_metadata_keys(key_path: tuple[str, ...]) -> tuple[str, ...]:
    """The store keys that may hold the zarr metadata of the array at ``key_path``, in order."""
    name = _ARRAY_NAME_SEPARATOR.join(key_path)
    return tuple(f"{name}/{file}" for file in ZARR_METADATA_FILES)
