"""The exceptions raised by ``pz_flax.checkpoint``.

Every checkpoint failure is a ``CheckpointError``, so a caller (the ``pz-flax-convert``
command line, say) can catch one type and print a short message. The subclasses also derive
from the built-in exception a Python programmer would expect (``FileNotFoundError``,
``FileExistsError``, ``ValueError``), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

from collections.abc import Iterable


class CheckpointError(Exception):
    """Base class of every error raised while saving, inspecting or restoring a checkpoint."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path holds no checkpoint (or no checkpoint of the expected kind)."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """``save`` was asked to write over an existing path without ``force=True``."""


class CheckpointPathError(CheckpointError, ValueError):
    """The path cannot take this checkpoint: empty, not UTF-8, of an unknown scheme, or
    something ``force=True`` must not replace (a link, another kind of directory, the current
    or home directory, the input of a conversion)."""


class CheckpointStorageError(CheckpointError, OSError):
    """The filesystem failed under a checkpoint operation: permissions, a read-only or full
    disk, a file where a directory should be, an unreachable remote store.

    Attributes:
        path: The path the operation was working on.
    """

    def __init__(self, message: str, *, path: str):
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0])


class CorruptCheckpointError(CheckpointError):
    """The checkpoint exists but cannot be read: a damaged manifest or missing array files."""


class UnsupportedValueError(CheckpointError, TypeError):
    """The model holds a value the structure manifest cannot describe (a lambda, say)."""


class UntrustedTypeError(CheckpointError):
    """The manifest names a class or function that restoring is not allowed to load.

    Restoring only resolves pz_flax's own types, explicitly registered ones, and those of
    modules the caller lists in ``allow_modules``; anything else is refused before it is
    imported.
    """


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint does not fit the restore target.

    Attributes:
        mismatches: One human-readable line per differing path, e.g.
            ``"sublayers/0/weights: shape (3, 4) in the checkpoint, (3, 5) in the target"``.
    """

    def __init__(self, message: str, mismatches: Iterable[str]):
        self.mismatches = tuple(mismatches)
        listing = "\n".join(f"  {line}" for line in self.mismatches)
        super().__init__(f"{message}\n{listing}" if self.mismatches else message)
