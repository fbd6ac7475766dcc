"""Summaries of what a checkpoint holds, without loading its arrays.

Works on pz_flax checkpoints (paths, axis names and labels come from the manifest) and on
plain Orbax checkpoints such as NNX ones (paths, shapes and dtypes from Orbax's metadata).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import manifest as manifest_lib
from pz_flax.checkpoint import storage


@dataclasses.dataclass(frozen=True)
class CheckpointSummary:
    """The contents of a checkpoint, array by array.

    Attributes:
        path: The checkpoint directory.
        kind: ``"pz_flax"`` (with a structure manifest) or ``"orbax"`` (arrays only, e.g. NNX).
        root_class: The model's top-level class (pz_flax checkpoints only).
        entries: One entry per array.
    """

    path: pathlib.Path
    kind: str
    root_class: str | None
    entries: tuple[manifest_lib.ArrayEntry, ...]

    @property
    def total_bytes(self) -> int:
        """The size of all arrays, in bytes."""
        return sum(entry.nbytes for entry in self.entries)

    def format_table(self) -> str:
        """A plain-text table: path, axis names, shape, dtype, size; then a total line."""
        header = ("path", "axis names", "shape", "dtype", "size")
        rows = [
            (
                entry.path,
                _axis_names_text(entry.axis_names),
                repr(entry.shape),
                entry.dtype,
                format_bytes(entry.nbytes),
            )
            for entry in self.entries
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [
            f"{self.kind} checkpoint {self.path}"
            + (f" (model: {self.root_class})" if self.root_class else ""),
            "  ".join(text.ljust(width) for text, width in zip(header, widths)).rstrip(),
            "  ".join("-" * width for width in widths),
        ]
        lines += ["  ".join(t.ljust(w) for t, w in zip(row, widths)).rstrip() for row in rows]
        lines.append(
            f"{len(self.entries)} arrays, {sum(e.size for e in self.entries):,} elements,"
            f" {format_bytes(self.total_bytes)}"
        )
        return "\n".join(lines)


def _axis_names_text(axis_names: tuple[str | None, ...] | None) -> str:
    if axis_names is None:
        return "-"
    return "(" + ", ".join("_" if name is None else str(name) for name in axis_names) + ")"


def format_bytes(size: int) -> str:
    """A human-readable byte count: ``"512 B"``, ``"1.5 KiB"``, ``"3.2 MiB"``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointSummary:
    """Lists the arrays of a pz_flax or plain Orbax checkpoint without reading them.

    Args:
        path: The checkpoint directory.

    Returns:
        The summary.

    Raises:
        CheckpointNotFoundError: If ``path`` is not a checkpoint directory.
        CorruptCheckpointError: If its manifest or Orbax metadata cannot be read.
    """
    path = pathlib.Path(path).absolute()
    if storage.is_pz_checkpoint(path):
        manifest = storage.read_manifest(path)
        root = manifest["root"]
        root_class = root.get("struct") if isinstance(root, dict) else None
        entries = tuple(manifest_lib.read_entries(manifest))
        return CheckpointSummary(path, "pz_flax", root_class, entries)
    if not storage.is_orbax_checkpoint(storage.checkpoint_dir(path)):
        raise errors.CheckpointNotFoundError(
            f"{path} is neither a pz_flax nor an Orbax checkpoint."
        )
    stored = storage.stored_array_metadata(path)
    entries = tuple(
        manifest_lib.ArrayEntry(
            path="/".join(key),
            key=key,
            shape=tuple(int(dim) for dim in getattr(metadata, "shape", ())),
            dtype=np.dtype(metadata.dtype).name,
        )
        for key, metadata in sorted(stored.items())
    )
    if not entries:
        raise errors.CorruptCheckpointError(f"The Orbax checkpoint at {path} lists no arrays.")
    return CheckpointSummary(path, "orbax", None, entries)
