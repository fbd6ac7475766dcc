"""Checkpoints that keep a model's structure and axis names, on Orbax.

``save(path, model)`` writes the model's arrays with Orbax plus a JSON structure manifest
(layer classes, static fields, labels, axis names), so that ``restore(path)`` rebuilds the
exact model in a process that never imported the code that built it. Restoring (and using
the restored model) never runs code a checkpoint chose: classes resolve only through pz_flax's
own types, NNX's public classes, registered types and the modules the caller passes in
``allow_modules``; functions only through a closed allow-list of pure array functions,
``register_function`` and ``allow_modules``. Registrations live in one table,
``trusted_objects`` (``unregister_type``/``unregister_function`` undo them; its ``scoped``
trusts an object for a ``with`` block only).

* ``save`` / ``restore``: single checkpoints; atomic writes; restore into an existing or
  abstract target with a report of every mismatching path; restore into shardings.
* ``CheckpointManager``: step-numbered checkpoints for training loops (save every N steps,
  keep the last K, restore the latest).
* ``read_nnx_checkpoint`` / ``write_nnx_checkpoint``: plain NNX (``nnx.state``) checkpoints
  to and from pz_flax layers, through ``pz_flax.interop``.
* ``inspect_checkpoint``: a table of paths, axis names, shapes, dtypes and sizes.
"""

from pz_flax.checkpoint.errors import CheckpointError
from pz_flax.checkpoint.errors import CheckpointExistsError
from pz_flax.checkpoint.errors import CheckpointMismatchError
from pz_flax.checkpoint.errors import CheckpointNotFoundError
from pz_flax.checkpoint.errors import CheckpointPathError
from pz_flax.checkpoint.errors import CheckpointStorageError
from pz_flax.checkpoint.errors import CorruptCheckpointError
from pz_flax.checkpoint.errors import UnsupportedValueError
from pz_flax.checkpoint.errors import UntrustedTypeError
from pz_flax.checkpoint.functions import register_function
from pz_flax.checkpoint.functions import unregister_function
from pz_flax.checkpoint.inspection import CheckpointSummary
from pz_flax.checkpoint.inspection import inspect_checkpoint
from pz_flax.checkpoint.manager import CheckpointManager
from pz_flax.checkpoint.manifest import FORMAT_VERSION
from pz_flax.checkpoint.manifest import ArrayEntry
from pz_flax.checkpoint.nnx_checkpoints import load_nnx_module
from pz_flax.checkpoint.nnx_checkpoints import read_nnx_checkpoint
from pz_flax.checkpoint.nnx_checkpoints import write_nnx_checkpoint
from pz_flax.checkpoint.storage import read_manifest
from pz_flax.checkpoint.storage import restore
from pz_flax.checkpoint.storage import save
from pz_flax.checkpoint.storage import sharding_from_axis_names
from pz_flax.checkpoint.type_registry import register_type
from pz_flax.checkpoint.type_registry import registration_name
from pz_flax.checkpoint.type_registry import trusted_objects
from pz_flax.checkpoint.type_registry import unregister_type

__all__ = [
    "FORMAT_VERSION",
    "ArrayEntry",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointPathError",
    "CheckpointStorageError",
    "CheckpointSummary",
    "CorruptCheckpointError",
    "UnsupportedValueError",
    "UntrustedTypeError",
    "inspect_checkpoint",
    "load_nnx_module",
    "read_manifest",
    "read_nnx_checkpoint",
    "register_function",
    "register_type",
    "registration_name",
    "restore",
    "save",
    "sharding_from_axis_names",
    "trusted_objects",
    "unregister_function",
    "unregister_type",
    "write_nnx_checkpoint",
]
