"""Scoped global settings (`ContextualValue`), shared with treescope.

penzai exposes ``pz.ContextualValue`` as treescope's own class rather than a
copy, and so does pz_flax: treescope's settings (``treescope.active_renderer``,
``treescope.active_autovisualizer``, ...) are instances of this exact class,
so user code that configures treescope and user code that defines its own
scoped settings use one mechanism, and ``isinstance`` checks agree across the
two libraries.

A `ContextualValue` holds a global default that can be replaced either for the
rest of the process (``set_globally``) or for the extent of a ``with`` block
(``set_scoped``); ``get`` returns the innermost scoped value, else the global
one.
"""

from __future__ import annotations

from treescope.context import ContextualValue

__all__ = ["ContextualValue"]
