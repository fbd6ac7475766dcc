"""Tests for pz_flax.core._treescope_handlers.selection_rendering: selections drawn as boxes."""

import collections
import dataclasses
import textwrap
from typing import Any

import jax
import jax.numpy as jnp
import pytest
import treescope
from flax import nnx
from treescope import lowering
from treescope import rendering_parts

from pz_flax.core import selectors
from pz_flax.core import struct
from pz_flax.core._treescope_handlers import selection_rendering
from tests.core.test_selectors import Pair

DictKey = jax.tree_util.DictKey


def rendering_example():
    return selectors.select({"a": 1, "b": [2, {"c": 3}], "d": None}).at(
        lambda t: (t["b"][1]["c"], t["d"]), multiple=True
    )


def strip_lines(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines())


def test_render_selection_boxes_selected_nodes():
    rendering = rendering_example().__treescope_root_repr__()
    box_top = "#╭" + "┄" * 40 + "╮"
    box_bottom = "#╰" + "┄" * 40 + "╯"
    assert strip_lines(lowering.render_to_text_as_root(rendering)) == textwrap.dedent(
        f"""\
        pz.select(
          {{
            'a': 1,
            'b': [
              2,
              {{
                'c':
                {box_top}
                # Selected:
                3
                {box_bottom}
                ,
              }},
            ],
            'd':
            {box_top}
            # Selected:
            None
            {box_bottom}
            ,
          }}
        ).at_keypaths(<2 subtrees, highlighted above>)"""
    )
    for foldable in rendering.foldables_in_this_part():
        foldable.set_expand_state(rendering_parts.ExpandState.EXPANDED)
    expanded = lowering.render_to_text_as_root(rendering)
    assert "# 2 subtrees, highlighted above" in expanded
    assert "DictKey(key='c')" in expanded


def test_render_value_expands_to_selected_nodes_without_boxes():
    rendering = selection_rendering.render_selection_to_foldable_representation(
        rendering_example(), visible_selection=False
    )
    text = lowering.render_to_text_as_root(rendering)
    assert "Selected" not in text
    assert "pz.select" not in text
    assert "'c': 3" in text


def test_render_reports_nodes_missing_from_rendering():
    selection = selectors.Selection(
        selected_by_path=collections.OrderedDict({(DictKey("zz"),): 5}),
        remainder={"a": 1},
    )
    text = lowering.render_to_text_as_root(selection.__treescope_root_repr__())
    assert "not drawn" in text
    assert "['zz']" in text


def test_rendering_variables_selects_their_value():
    tree = {"p": nnx.Param(jnp.ones(2))}
    rendering = selectors.select(tree).at_pytree_leaves().__treescope_root_repr__()
    text = lowering.render_to_text_as_root(rendering)
    assert "not drawn" not in text
    assert "# Selected:" in text


def test_is_rendering_a_selection():
    seen = []

    class Probe:
        def __treescope_repr__(self, path, subtree_renderer):
            seen.append(selection_rendering.is_rendering_a_selection())
            return rendering_parts.text("Probe()")

    treescope.render_to_text({"p": Probe()})
    selectors.select({"p": Probe()}).at(lambda t: t["p"]).__treescope_root_repr__()
    assert seen == [False, True]
    assert not selection_rendering.is_rendering_a_selection()


@pytest.mark.parametrize("method, boxed", [("show_selection", True), ("show_value", False)])
def test_show_methods_display_the_rendering(monkeypatch, method, boxed):
    displayed = []

    def fake_display(rendering, deferreds, roundtrip, ignore_exceptions):
        displayed.append((lowering.render_to_text_as_root(rendering), ignore_exceptions))

    monkeypatch.setattr(lowering, "display_streaming_as_root", fake_display)
    getattr(rendering_example(), method)(ignore_exceptions=True)
    ((text, ignore_exceptions),) = displayed
    assert ignore_exceptions
    assert ("# Selected:" in text) == boxed


def test_rendering_finds_selected_struct_fields():
    selection = selectors.select([Pair(1, {"x": 2})]).at_pytree_leaves()
    text = lowering.render_to_text_as_root(selection.__treescope_root_repr__())
    assert "not drawn" not in text
    assert text.count("# Selected:") == 2


@struct.pytree_dataclass
class DrawnTwice(struct.Struct):
    """A struct whose (buggy) renderer draws its field twice under the same key path."""

    inner: Any

    def __treescope_repr__(self, path, subtree_renderer):
        child_path = None if path is None else f"{path}.inner"
        first = subtree_renderer(self.inner, path=child_path)
        second = subtree_renderer(self.inner, path=child_path)
        return rendering_parts.siblings("DrawnTwice(", first.renderable, second.renderable, ")")


@dataclasses.dataclass
class FailsToRender:
    """A leaf whose treescope handler raises."""

    def __treescope_repr__(self, path, subtree_renderer):
        raise RuntimeError("cannot draw this")


def test_render_reports_nodes_drawn_more_than_once():
    selection = selectors.select(DrawnTwice(inner=5)).at(lambda t: t.inner)
    text = lowering.render_to_text_as_root(selection.__treescope_root_repr__())
    assert "drawn more than once" in text
    assert "['.inner']" in text
    assert text.count("# Selected:") == 2


def test_selected_nodes_are_boxed_in_cyan_in_html():
    html = lowering.render_to_html_as_root(rendering_example().__treescope_root_repr__())
    assert "border: 2px solid cyan; border-left: 2ch solid cyan;" in html
    assert "color: darkcyan; font-weight: bold;" in html
    assert "# Selected:" in html


def test_selected_nodes_carry_the_layout_mark():
    mark = selection_rendering.SelectionBoundaryLayoutMark()
    for visible_selection in (True, False):
        rendering = selection_rendering.render_selection_to_foldable_representation(
            rendering_example(), visible_selection=visible_selection
        )
        assert mark in rendering.layout_marks_in_this_part
    nothing_selected = selectors.select({"a": 1}).at_instances_of(str)
    rendering = selection_rendering.render_selection_to_foldable_representation(nothing_selected)
    assert mark not in rendering.layout_marks_in_this_part


def test_empty_selection_renders_the_tree_with_no_boxes():
    selection = selectors.select({"a": 1}).at_instances_of(str)
    text = lowering.render_to_text_as_root(selection.__treescope_root_repr__())
    assert "# Selected:" not in text
    assert "'a': 1" in text
    assert "<0 subtrees, highlighted above>" in text


def test_failing_handlers_raise_unless_exceptions_are_ignored():
    selection = selectors.select({"bad": FailsToRender(), "ok": 1}).at(lambda t: t["ok"])
    with pytest.raises(RuntimeError, match="cannot draw this"):
        selection_rendering.render_selection_to_foldable_representation(selection)
    with pytest.warns(UserWarning, match="cannot draw this"):
        rendering = selection_rendering.render_selection_to_foldable_representation(
            selection, ignore_exceptions=True
        )
    text = lowering.render_to_text_as_root(rendering)
    assert "FailsToRender" in text
    assert "# Selected:" in text


@pytest.mark.parametrize("visible_selection", [True, False])
def test_display_selection_streaming_displays_outside_roundtrip_mode(
    monkeypatch, visible_selection
):
    displayed = []

    def fake_display(rendering, deferreds, roundtrip, ignore_exceptions):
        displayed.append((lowering.render_to_text_as_root(rendering), roundtrip, ignore_exceptions))

    monkeypatch.setattr(lowering, "display_streaming_as_root", fake_display)
    selection_rendering.display_selection_streaming(
        rendering_example(), visible_selection=visible_selection
    )
    ((text, roundtrip, ignore_exceptions),) = displayed
    assert (roundtrip, ignore_exceptions) == (False, False)
    assert ("pz.select(" in text) == visible_selection
    assert "'c'" in text
