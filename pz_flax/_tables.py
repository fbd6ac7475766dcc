"""How pz_flax shows a table: one style, one byte format, for every table it prints.

``pz_flax.summary`` (a model's variables) and ``pz-flax-convert inspect`` (a checkpoint's
arrays) build their tables here, so they look alike, sort paths alike and write sizes alike,
and each renders the same way in a terminal (plain text), a rich console and a notebook (HTML).
``rich`` is imported when a table is first built, not when pz_flax is imported.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import humanize

if TYPE_CHECKING:
    import rich.table


def natural_key(path: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders the numbers inside paths by value: ``layers/2`` before ``layers/10``."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", path) if part
    )


def format_bytes(size: int) -> str:
    """A human-readable byte count in binary units (``"352 Bytes"``, ``"1.5 KiB"``), by humanize."""
    return humanize.naturalsize(size, binary=True)


def new_table(
    columns: Sequence[str],
    *,
    right_aligned: Sequence[str] = (),
    title: str | None = None,
    caption: str | None = None,
) -> rich.table.Table:
    """An empty ``rich`` table in pz_flax's style: a rule under the header, text left-aligned.

    Args:
        columns: The column headers, in order. Long cells fold onto more lines.
        right_aligned: Headers of the columns holding numbers, aligned right.
        title: A line above the table.
        caption: A line below the table (totals).
    """
    import rich.box
    import rich.table

    table = rich.table.Table(
        title=title,
        caption=caption,
        box=rich.box.SIMPLE_HEAD,
        title_justify="left",
        caption_justify="left",
    )
    for header in columns:
        table.add_column(
            header,
            overflow="fold",
            justify="right" if header in right_aligned else "left",
        )
    return table


def plain_text(table: rich.table.Table, *, width: int = 120) -> str:
    """The table as plain text, ``width`` characters wide at most, without blank lines."""
    import rich.console

    console = rich.console.Console(
        file=io.StringIO(), width=width, color_system=None, force_terminal=False
    )
    console.print(table)
    lines = [line.rstrip() for line in console.file.getvalue().splitlines()]
    return "\n".join(line for line in lines if line)


def html(table: rich.table.Table, *, width: int = 160) -> str:
    """The table as an HTML fragment (a ``<pre>`` with inline styles), for notebooks."""
    import rich.console

    console = rich.console.Console(file=io.StringIO(), width=width, record=True)
    console.print(table)
    return console.export_html(inline_styles=True, code_format="<pre>{code}</pre>")
