import io
import sys

import IPython.core.debugger
import pytest

from pz_flax.toolshed import patch_ipdb


@pytest.fixture(autouse=True)
def _restore_debugger_hook():
    original = IPython.core.debugger.Pdb.displayhook
    yield
    IPython.core.debugger.Pdb.displayhook = original
    patch_ipdb.old_displayhook = None


def test_patch_routes_debugger_values_to_ipython_display(monkeypatch):
    shown = []
    monkeypatch.setattr(patch_ipdb.IPython.display, "display", shown.append)
    patch_ipdb.patch_ipdb()
    debugger = IPython.core.debugger.Pdb(stdin=io.StringIO(), stdout=io.StringIO())
    debugger.displayhook({"a": 1})
    debugger.displayhook(None)
    assert shown == [{"a": 1}]


def test_patched_debugger_displays_an_evaluated_expression(monkeypatch):
    shown = []
    monkeypatch.setattr(patch_ipdb.IPython.display, "display", shown.append)
    patch_ipdb.patch_ipdb()
    debugger = IPython.core.debugger.Pdb(stdin=io.StringIO(), stdout=io.StringIO())
    value_in_frame = [1, 2, 3]  # noqa: F841 (read by the debugger command below)
    debugger.reset()
    debugger.setup(sys._getframe(), None)
    debugger.default("value_in_frame")  # what typing an expression at the prompt runs
    assert shown == [[1, 2, 3]]


def test_unpatch_restores_the_original_hook():
    original = IPython.core.debugger.Pdb.displayhook
    patch_ipdb.patch_ipdb()
    assert IPython.core.debugger.Pdb.displayhook is patch_ipdb.displayhook_with_ipython
    patch_ipdb.unpatch_ipdb()
    assert IPython.core.debugger.Pdb.displayhook is original
    assert patch_ipdb.old_displayhook is None


def test_patching_twice_needs_force_and_keeps_the_original():
    original = IPython.core.debugger.Pdb.displayhook
    patch_ipdb.patch_ipdb()
    with pytest.raises(ValueError, match="already been patched"):
        patch_ipdb.patch_ipdb()
    patch_ipdb.patch_ipdb(force=True)
    patch_ipdb.unpatch_ipdb()
    assert IPython.core.debugger.Pdb.displayhook is original


def test_unpatch_errors():
    with pytest.raises(RuntimeError, match="not patched"):
        patch_ipdb.unpatch_ipdb()
    patch_ipdb.patch_ipdb()
    IPython.core.debugger.Pdb.displayhook = lambda self, obj: None
    with pytest.raises(RuntimeError, match="replaced"):
        patch_ipdb.unpatch_ipdb()
