"""Tests for pz_flax.core._treescope_handlers.struct_handler.

Renderings are compared as text with penzai's renderings of the equivalent penzai structs,
and HTML renderings are searched for colours and field styles.
"""

import dataclasses
import re
from typing import Any

import penzai.core.struct as penzai_struct
import pytest
from treescope import lowering
from treescope import rendering_parts

from pz_flax.core import struct
from pz_flax.core._treescope_handlers import struct_handler
from tests.core._treescope_handlers.helpers import render_html
from tests.core._treescope_handlers.helpers import render_text


@struct.pytree_dataclass
class Scale(struct.Struct):
    """A callable struct: rendered in its type's colour."""

    weight: Any
    name: str = dataclasses.field(default="scale", metadata={"pytree_node": False})

    def __call__(self, x):
        return x * self.weight


@struct.pytree_dataclass
class Config(struct.Struct):
    """A non-callable struct: rendered without colour."""

    sizes: Any


@struct.pytree_dataclass
class Tinted(struct.Struct):
    """A struct choosing a (border, fill) colour pair."""

    value: Any

    def treescope_color(self):
        return ("#ff0000", "#00ff00")


@struct.pytree_dataclass
class BuiltFromWidth(struct.Struct):
    """A struct whose __init__ does not take its fields."""

    table: Any

    def __init__(self, width: int):
        self.table = list(range(width))


@penzai_struct.pytree_dataclass
class PenzaiScale(penzai_struct.Struct):
    weight: Any
    name: str = dataclasses.field(default="scale", metadata={"pytree_node": False})

    def __call__(self, x):
        return x * self.weight


def test_struct_renders_as_constructor_call():
    value = Scale(weight=[1, 2], name="s")
    assert render_text(value, 0) == "Scale(weight=[1, 2], name='s')"
    assert render_text(value, 1) == "Scale(\n  weight=[1, 2],\n  name='s',\n)"
    assert render_text(value, 1, roundtrip=True).startswith(f"{__name__}.Scale(\n")
    assert repr(value) == "Scale(weight=[1, 2], name='s')"


def test_struct_rendering_matches_penzai():
    ours = Scale(weight=[1, 2], name="s")
    theirs = PenzaiScale(weight=[1, 2], name="s")
    for depth in (0, 1):
        assert render_text(ours, depth) == render_text(theirs, depth).replace(
            "PenzaiScale", "Scale"
        )


def test_callable_struct_html_uses_its_type_colour():
    value = Scale(weight=1.0)
    color = value.treescope_color()
    assert color.startswith("oklch(")
    assert f"--block-color: {color}" in render_html(value)
    # The colour is a function of the type, so another instance gets the same one.
    assert Scale(weight=2.0).treescope_color() == color


def test_non_callable_struct_is_transparent():
    value = Config(sizes=(1, 2))
    assert value.treescope_color() == "transparent"
    assert "oklch(" not in render_html(value)


def test_border_and_fill_colour_pair():
    html = render_html(Tinted(value=3))
    assert "--block-color: #ff0000" in html
    assert "linear-gradient(#00ff00,#00ff00)" in html


def test_child_fields_are_styled_differently_from_static_fields():
    html = render_html(Scale(weight=1.0, name="n"))
    italic = re.escape("font-style: italic; color: #00225f;")
    assert re.search(italic + r"[^>]*>weight<", html)
    assert not re.search(italic + r"[^>]*>name<", html)


def test_custom_init_struct_roundtrips_through_from_attributes():
    value = BuiltFromWidth(3)
    assert render_text(value, 0) == "BuiltFromWidth(table=[0, 1, 2])"
    assert render_text(value, 0, roundtrip=True) == (
        f"{__name__}.BuiltFromWidth.from_attributes(table=[0, 1, 2])"
    )


def test_struct_helpers():
    constructor = struct_handler.render_struct_constructor(Scale(weight=1))
    assert lowering.render_to_text_as_root(constructor) == "Scale("
    summary = struct_handler.render_short_struct_summary(Scale(weight=1))
    assert lowering.render_to_text_as_root(summary) == "Scale(...)"
    assert struct_handler.struct_colors(Config(sizes=1)) == ("transparent", None)
    style = struct_handler.struct_attr_style_fn_for_fields(dataclasses.fields(Scale))
    assert lowering.render_to_text_as_root(style("weight")) == "weight"
    assert lowering.render_to_text_as_root(style("name")) == "name"
    with pytest.raises(KeyError):
        style("not_a_field")


def test_nested_structs_and_paths():
    model = Scale(weight=Config(sizes=[Scale(weight=2)]))
    assert render_text(model, 0) == (
        "Scale(weight=Config(sizes=[Scale(weight=2, name='scale')]), name='scale')"
    )
    html = render_html(model)
    # Copy-path buttons carry each node's key path.
    assert ".weight.sizes[0]" in html


def test_struct_colors_of_callable_and_paired_structs():
    value = Scale(weight=1)
    assert struct_handler.struct_colors(value) == (value.treescope_color(), None)
    assert struct_handler.struct_colors(Tinted(value=1)) == (
        "#ff0000",
        "linear-gradient(#00ff00,#00ff00)",
    )


def test_render_struct_constructor_in_roundtrip_mode():
    plain = struct_handler.render_struct_constructor(Scale(weight=1))
    assert lowering.render_to_text_as_root(plain, roundtrip=True) == f"{__name__}.Scale("
    custom_init = struct_handler.render_struct_constructor(BuiltFromWidth(2))
    assert lowering.render_to_text_as_root(custom_init) == "BuiltFromWidth("
    assert lowering.render_to_text_as_root(custom_init, roundtrip=True) == (
        f"{__name__}.BuiltFromWidth.from_attributes("
    )


def test_child_field_style_is_italic_only_for_pytree_children():
    style = struct_handler.struct_attr_style_fn_for_fields(dataclasses.fields(Scale))
    assert "font-style: italic" in lowering.render_to_html_as_root(style("weight"))
    assert "font-style: italic" not in lowering.render_to_html_as_root(style("name"))


def test_short_summary_is_drawn_in_the_struct_colour():
    value = Scale(weight=[1, 2, 3])
    html = lowering.render_to_html_as_root(struct_handler.render_short_struct_summary(value))
    assert f"--block-color: {value.treescope_color()}" in html
    assert "Scale(...)" in html
    # The contents are not shown, only the type.
    assert "weight" not in html


def test_render_struct_hands_each_field_its_key_path():
    def show_path(node, path):
        return rendering_parts.RenderableAndLineAnnotations(
            rendering_parts.text(f"<{node!r} at {path}>"), rendering_parts.empty_part()
        )

    rendering = struct_handler.render_struct(Scale(weight=7, name="w"), "root", show_path)
    text = lowering.render_to_text_as_root(
        rendering_parts.build_full_line_with_annotations(rendering)
    )
    assert text == "Scale(weight=<7 at root.weight>, name=<'w' at root.name>)"
    no_path = struct_handler.render_struct(Config(sizes=1), None, show_path)
    text = lowering.render_to_text_as_root(
        rendering_parts.build_full_line_with_annotations(no_path)
    )
    assert text == "Config(sizes=<1 at None>)"
