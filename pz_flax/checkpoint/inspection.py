"""Summaries of what a checkpoint holds, without loading its arrays.

Works on pz_flax checkpoints (paths, axis names and labels come from the manifest) and on
plain Orbax checkpoints such as NNX ones (paths, shapes and dtypes from Orbax's metadata).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import rich.table
from etils import epath

from pz_flax import _tables
from pz_flax._tables import format_bytes
from pz_flax._tables import natural_key
from pz_flax.checkpoint import errors
from pz_flax.checkpoint import manifest as manifest_lib
from pz_flax.checkpoint import storage


@dataclasses.dataclass(frozen=True)
class CheckpointSummary:
    """The contents of a checkpoint, array by array.

    Renders as its table in rich consoles and notebooks (``rich.print(summary)``).

    Attributes:
        path: The checkpoint directory.
        kind: ``"pz_flax"`` (with a structure manifest) or ``"orbax"`` (arrays only, e.g. NNX).
        root_class: The model's top-level class (pz_flax checkpoints only).
        entries: One entry per array, in the checkpoint's order.
    """

    path: epath.Path
    kind: str
    root_class: str | None
    entries: tuple[manifest_lib.ArrayEntry, ...]

    @property
    def total_bytes(self) -> int:
        """The size of all arrays, in bytes."""
        return sum(entry.nbytes for entry in self.entries)

    def title(self) -> str:
        """What the table is of: kind, path and model class."""
        model = f" (model: {self.root_class})" if self.root_class else ""
        return f"{self.kind} checkpoint {self.path}{model}"

    def totals(self) -> str:
        """The line under the table: arrays, elements and bytes in all."""
        elements = sum(entry.size for entry in self.entries)
        return (
            f"{len(self.entries)} arrays, {elements:,} elements, {format_bytes(self.total_bytes)}"
        )

    def table(self, *, titled: bool = True) -> rich.table.Table:
        """A ``rich`` table: path, axis names, shape, dtype, size; paths sorted naturally.

        Args:
            titled: Put ``title()`` above and ``totals()`` below it.
        """
        table = _tables.new_table(
            ("path", "axis names", "shape", "dtype", "size"),
            right_aligned=("size",),
            title=self.title() if titled else None,
            caption=self.totals() if titled else None,
        )
        for entry in sorted(self.entries, key=lambda entry: natural_key(entry.path)):
            table.add_row(
                entry.path,
                _axis_names_text(entry.axis_names),
                repr(entry.shape),
                entry.dtype,
                format_bytes(entry.nbytes),
            )
        return table

    def format_table(self, width: int = 120) -> str:
        """The title line, the table (``width`` columns at most) and the totals, as plain text."""
        return "\n".join(
            [self.title(), _tables.plain_text(self.table(titled=False), width=width), self.totals()]
        )

    def __rich__(self) -> rich.table.Table:
        return self.table()


def _axis_names_text(axis_names: tuple[str | None, ...] | None) -> str:
    if axis_names is None:
        return "-"
    return "(" + ", ".join("_" if name is None else str(name) for name in axis_names) + ")"


def inspect_checkpoint(path: storage.PathLike) -> CheckpointSummary:
    """Lists the arrays of a pz_flax or plain Orbax checkpoint without reading them.

    Args:
        path: The checkpoint directory.

    Returns:
        The summary.

    Raises:
        CheckpointNotFoundError: If ``path`` is not a checkpoint directory.
        CorruptCheckpointError: If its manifest or Orbax metadata cannot be read.
    """
    path = storage.checkpoint_dir(path)
    if storage.is_pz_checkpoint(path):
        manifest = storage.read_manifest(path)
        root = manifest["root"]
        root_class = root.get("struct") if isinstance(root, dict) else None
        entries = tuple(manifest_lib.read_entries(manifest))
        return CheckpointSummary(path, "pz_flax", root_class, entries)
    if not storage.is_orbax_checkpoint(path):
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
        for key, metadata in sorted(stored.items(), key=lambda item: natural_key("/".join(item[0])))
    )
    if not entries:
        raise errors.CorruptCheckpointError(f"The Orbax checkpoint at {path} lists no arrays.")
    return CheckpointSummary(path, "orbax", None, entries)
