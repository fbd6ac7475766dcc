"""Bounded renderings of checkpoint contents for error messages.

A checkpoint is untrusted input: a label, a class name or a static value in it can be
megabytes long. Every piece of it that goes into a message goes through these helpers, so
that no message (and no CLI line) grows with the checkpoint.
"""

from __future__ import annotations

from typing import Any

# Longest rendering of one value taken from a checkpoint.
MAX_VALUE_CHARS = 120
# Longest whole message built from a checkpoint's contents.
MAX_MESSAGE_CHARS = 2000
# Most differences listed one per line in a mismatch report.
MAX_LISTED_PROBLEMS = 20


def bounded_text(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 30]}... ({len(text) - limit + 30} more characters)"


def bounded_repr(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters; never raises."""
    try:
        text = repr(value)
    except Exception:  # A repr that fails must not hide the error being reported.
        text = f"<{type(value).__name__} object>"
    return bounded_text(text, limit)


def bounded_lines(lines: list[str], limit: int = MAX_LISTED_PROBLEMS) -> list[str]:
    """The first ``limit`` lines (each bounded), plus one saying how many were left out."""
    shown = [bounded_text(line, MAX_MESSAGE_CHARS // 4) for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"... and {len(lines) - limit} more")
    return shown
