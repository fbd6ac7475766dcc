"""Notebook entry points for treescope, as penzai exposes them.

pz_flax objects render through treescope's standard ``__treescope_repr__``
hook, so plain ``treescope.show`` / ``treescope.display`` already draw them.
These wrappers exist so that penzai code (``pz.show(...)``,
``pz.ts.basic_interactive_setup()``) runs unchanged, and they add what penzai's
versions add: objects still implementing the pre-``treescope`` extension
method ``__penzai_repr__`` are rendered through it.

All display functions need IPython (a notebook or an IPython shell) and raise
RuntimeError without it, as treescope's do.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import treescope

_LEGACY_REPR_METHOD = "__penzai_repr__"


def _renderer_with_legacy_repr_method() -> treescope.renderers.TreescopeRenderer:
    """The active renderer, extended to also honour ``__penzai_repr__``."""
    legacy_handler = functools.partial(
        treescope.handlers.handle_via_treescope_repr_method, method_name=_LEGACY_REPR_METHOD
    )
    return treescope.active_renderer.get().extended_with(handlers=[legacy_handler])


@contextlib.contextmanager
def _legacy_repr_scope() -> Iterator[None]:
    with treescope.active_renderer.set_scoped(_renderer_with_legacy_repr_method()):
        yield


def display(value: Any, ignore_exceptions: bool = False, roundtrip_mode: bool = False) -> None:
    """Displays a value as a foldable, interactive treescope rendering.

    Args:
      value: The value to display.
      ignore_exceptions: Render subtrees whose rendering fails with a fallback
        instead of raising.
      roundtrip_mode: Start in roundtrip mode (fully qualified, evaluable
        constructor calls) instead of the compact mode.

    Raises:
      RuntimeError: If IPython is not available.
    """
    with _legacy_repr_scope():
        treescope.display(value, ignore_exceptions=ignore_exceptions, roundtrip_mode=roundtrip_mode)


def show(*args: Any, wrap: bool = False, space_separated: bool = True) -> None:
    """Shows values on one line, like ``print``, with rich renderings.

    Args:
      *args: Values to show. Strings appear as themselves; other values as
        their treescope rendering (or their own IPython rich display).
      wrap: Wrap at the end of the line instead of scrolling.
      space_separated: Put a space between consecutive values.

    Raises:
      RuntimeError: If IPython is not available.
    """
    with _legacy_repr_scope():
        treescope.show(*args, wrap=wrap, space_separated=space_separated)


def register_as_default(streaming: bool = True, compress_html: bool = True) -> None:
    """Makes treescope IPython's default renderer for every value.

    Args:
      streaming: Show the structure at once and fill in expensive parts (such
        as array statistics) as they are computed.
      compress_html: Compress the HTML sent to the notebook.

    Raises:
      RuntimeError: If IPython is not available.
    """
    treescope.register_as_default(streaming=streaming, compress_html=compress_html)
    treescope.active_renderer.set_globally(_renderer_with_legacy_repr_method())


def basic_interactive_setup(autovisualize_arrays: bool = True) -> None:
    """One-call notebook setup: treescope as default renderer, magics, array views.

    Args:
      autovisualize_arrays: Also draw arrays (including named arrays, with
        their axis names) as colour-coded visualisations.

    Raises:
      RuntimeError: If IPython is not available.
    """
    treescope.basic_interactive_setup(autovisualize_arrays=autovisualize_arrays)
    treescope.active_renderer.set_globally(_renderer_with_legacy_repr_method())


def enable_interactive_context() -> None:
    """Does nothing; kept so that older penzai notebooks that call it still run.

    Global overrides of `ContextualValue` settings used to need switching on;
    treescope now always allows them.
    """


def disable_interactive_context() -> None:
    """Always raises: global `ContextualValue` overrides can no longer be switched off.

    Raises:
      RuntimeError: Always.
    """
    raise RuntimeError(
        "Disabling interactive context is no longer supported: global overrides of"
        " ContextualValue settings are always enabled."
    )
