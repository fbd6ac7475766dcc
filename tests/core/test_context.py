"""Tests for pz_flax.core.context."""

import treescope
import treescope.context

from pz_flax.core import context


def test_contextual_value_is_treescopes_class():
    # Shared with treescope, so treescope's own settings are instances of it.
    assert context.ContextualValue is treescope.context.ContextualValue
    assert isinstance(treescope.active_renderer, context.ContextualValue)


def test_scoped_and_global_values():
    setting = context.ContextualValue(10, module=__name__, qualname="setting")
    assert setting.get() == 10
    with setting.set_scoped(3):
        assert setting.get() == 3
        with setting.set_scoped(4):
            assert setting.get() == 4
        assert setting.get() == 3
    assert setting.get() == 10
    setting.set_globally(7)
    assert setting.get() == 7
    with setting.set_scoped(1):
        assert setting.get() == 1
    assert setting.get() == 7


def test_scoped_value_is_restored_after_an_exception():
    setting = context.ContextualValue("outer")
    try:
        with setting.set_scoped("inner"):
            raise KeyError("boom")
    except KeyError:
        pass
    assert setting.get() == "outer"
