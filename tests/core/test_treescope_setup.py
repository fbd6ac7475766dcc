"""Tests for pz_flax.core.treescope_setup and the pz.ts alias module.

IPython is not a dependency, so the display functions are exercised by standing
in for the treescope functions they delegate to, recording what renderer is
active while they run.
"""

import subprocess
import sys
from typing import Any

import jax.numpy as jnp
import penzai.pz.ts as penzai_ts
import pytest
import treescope
from treescope import rendering_parts

from pz_flax.core import named_axes as nx
from pz_flax.core import treescope_setup
from pz_flax.pz import ts


class LegacyRepr:
    """An object using penzai's pre-treescope extension hook."""

    def __penzai_repr__(self, path, subtree_renderer):
        del path, subtree_renderer
        return rendering_parts.text("<drawn by __penzai_repr__>")


def _render_with_active_renderer(value: Any) -> str:
    return treescope.render_to_text(value)


@pytest.fixture
def recorded_calls(monkeypatch):
    """Replaces treescope's IPython-bound entry points with recorders."""
    calls = []

    def recorder(name):
        def record(*args, **kwargs):
            calls.append((name, args, kwargs, _render_with_active_renderer(LegacyRepr())))

        return record

    for name in ("display", "show", "register_as_default", "basic_interactive_setup"):
        monkeypatch.setattr(treescope, name, recorder(name))
    return calls


@pytest.fixture
def restore_global_renderer():
    renderer = treescope.active_renderer.get()
    yield
    treescope.active_renderer.set_globally(renderer)


def test_legacy_hook_is_not_used_by_plain_treescope():
    assert "__penzai_repr__" not in _render_with_active_renderer(LegacyRepr())


def test_display_forwards_arguments_and_honours_legacy_hook(recorded_calls):
    value = {"x": 1}
    treescope_setup.display(value, ignore_exceptions=True, roundtrip_mode=True)
    [(name, args, kwargs, legacy_rendering)] = recorded_calls
    assert name == "display"
    assert args == (value,)
    assert kwargs == {"ignore_exceptions": True, "roundtrip_mode": True}
    assert legacy_rendering == "<drawn by __penzai_repr__>"
    # The extension is scoped to the call.
    assert "__penzai_repr__" not in _render_with_active_renderer(LegacyRepr())


def test_show_forwards_arguments_and_honours_legacy_hook(recorded_calls):
    treescope_setup.show("a", 2, wrap=True, space_separated=False)
    [(name, args, kwargs, legacy_rendering)] = recorded_calls
    assert (name, args, kwargs) == ("show", ("a", 2), {"wrap": True, "space_separated": False})
    assert legacy_rendering == "<drawn by __penzai_repr__>"


@pytest.mark.parametrize(
    ("setup", "name", "kwargs"),
    [
        (
            treescope_setup.register_as_default,
            "register_as_default",
            {"streaming": False, "compress_html": False},
        ),
        (
            treescope_setup.basic_interactive_setup,
            "basic_interactive_setup",
            {"autovisualize_arrays": False},
        ),
    ],
)
def test_global_setup_installs_legacy_hook(
    recorded_calls, restore_global_renderer, setup, name, kwargs
):
    setup(**kwargs)
    assert [(call[0], call[2]) for call in recorded_calls] == [(name, kwargs)]
    # After setup, the global renderer honours the legacy hook.
    assert _render_with_active_renderer(LegacyRepr()) == "<drawn by __penzai_repr__>"


_WITHOUT_IPYTHON = """
import sys
sys.modules["IPython"] = None  # makes ``import IPython`` fail, as if it were not installed
from pz_flax.core import treescope_setup
for call in (
    lambda: treescope_setup.show(1),
    treescope_setup.register_as_default,
    treescope_setup.basic_interactive_setup,
):
    try:
        call()
    except RuntimeError as error:
        assert "IPython" in str(error), error
    else:
        raise AssertionError("expected RuntimeError")
print("ok")
"""


def test_display_functions_need_ipython():
    # In a fresh interpreter, since treescope may have imported IPython here already.
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_IPYTHON], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_interactive_context_switches():
    assert treescope_setup.enable_interactive_context() is None
    with pytest.raises(RuntimeError, match="no longer supported"):
        treescope_setup.disable_interactive_context()


def test_defaults_match_penzai():
    import inspect

    from penzai.treescope import _compatibility_setup as penzai_setup

    for name in (
        "display",
        "show",
        "register_as_default",
        "basic_interactive_setup",
        "enable_interactive_context",
        "disable_interactive_context",
    ):
        ours = inspect.signature(getattr(treescope_setup, name))
        theirs = inspect.signature(getattr(penzai_setup, name))
        assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
            (p.name, p.kind, p.default) for p in theirs.parameters.values()
        ], name


# ---------------------------------------------------------------------------
# pz.ts
# ---------------------------------------------------------------------------


def _public_names(module) -> set[str]:
    return {name for name in dir(module) if not name.startswith("_")}


def test_ts_exports_everything_penzai_ts_does():
    missing = _public_names(penzai_ts) - _public_names(ts)
    assert not missing


def test_ts_reexports_treescope_objects_and_our_wrappers():
    for name in _public_names(penzai_ts):
        theirs = getattr(penzai_ts, name)
        if getattr(theirs, "__module__", "").startswith("penzai"):
            # penzai's own wrappers are replaced by ours.
            assert getattr(ts, name) is getattr(treescope_setup, name)
        else:
            # `==`, not `is`: `vocab_autovisualizer` is a bound classmethod.
            assert getattr(ts, name) == theirs, name
    assert set(ts.__all__) == _public_names(penzai_ts)


def test_ts_render_array_shows_axis_names():
    array = nx.wrap(jnp.arange(6.0).reshape(2, 3)).tag("batch", "features")
    figure = ts.render_array(array)
    html = treescope.lowering.render_to_html_as_root(figure.treescope_part)
    assert "batch" in html and "features" in html


def test_ts_render_to_text_uses_pz_flax_renderers():
    array = nx.wrap(jnp.ones((2, 3))).tag("batch", "features")
    assert ts.render_to_text(array).startswith("<NamedArray float32(| batch:2, features:3)")
