"""Rich values in the IPython debugger: ``p model`` in ``%debug`` drawn by treescope.

IPython's debugger prints the value of an expression typed at its prompt through
``Pdb.displayhook``, as plain ``repr`` text. `patch_ipdb` replaces that hook on IPython's
``Pdb`` class (so every debugger subclass that does not override it changes too) with one
that sends the value to ``IPython.display.display``, which draws it with treescope once
treescope is IPython's default renderer (``pz.ts.register_as_default()``).
``unpatch_ipdb`` puts the original hook back.

``displayhook`` is not a documented extension point of ``pdb``; patching the class is the one
place that reaches the debugger however it was started (``%debug``, ``breakpoint()`` in
IPython, ``ipdb.set_trace()``).
"""

from __future__ import annotations

from typing import Any

import IPython.core.debugger
import IPython.display

# The hook that was in place before `patch_ipdb`; None while unpatched.
old_displayhook = None


def displayhook_with_ipython(self: Any, obj: Any) -> None:
    """Debugger display hook: shows ``obj`` with IPython's rich display (skips None).

    Args:
        self: The debugger instance (unused: the display does not depend on it).
        obj: The value of the expression entered at the debugger prompt.
    """
    del self
    # Like the standard hook, an expression evaluating to None prints nothing.
    if obj is not None:
        IPython.display.display(obj)


def patch_ipdb(force: bool = False) -> None:
    """Makes the IPython debugger display values with ``IPython.display.display``.

    Args:
        force: Patch even if already patched. The hook `unpatch_ipdb` restores stays the
            one from before the first patch.

    Raises:
        ValueError: If the debugger is already patched and ``force`` is False.
    """
    global old_displayhook
    if old_displayhook is not None and not force:
        raise ValueError("IPython.core.debugger.Pdb.displayhook has already been patched!")
    current_hook = IPython.core.debugger.Pdb.displayhook
    if current_hook is not displayhook_with_ipython:
        old_displayhook = current_hook
    IPython.core.debugger.Pdb.displayhook = displayhook_with_ipython


def unpatch_ipdb() -> None:
    """Gives the IPython debugger back the display hook it had before `patch_ipdb`.

    Raises:
        RuntimeError: If the debugger is not patched, or its hook was replaced by something
            else since.
    """
    global old_displayhook
    if old_displayhook is None:
        raise RuntimeError("The IPython debugger is not patched: call patch_ipdb() first.")
    if IPython.core.debugger.Pdb.displayhook is not displayhook_with_ipython:
        raise RuntimeError(
            "IPython.core.debugger.Pdb.displayhook was replaced by something other than"
            " patch_ipdb since patching; not overwriting it."
        )
    IPython.core.debugger.Pdb.displayhook = old_displayhook
    old_displayhook = None
