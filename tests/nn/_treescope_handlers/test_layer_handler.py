"""Tests for pz_flax.nn._treescope_handlers.layer_handler: how layers render in treescope."""

import dataclasses
import re

import jax
import treescope
from treescope import lowering
from treescope import rendering_parts

from pz_flax.core import shapecheck
from pz_flax.core import struct
from pz_flax.core._treescope_handlers import struct_handler
from pz_flax.nn import grouping
from pz_flax.nn import linear_and_affine
from pz_flax.nn._treescope_handlers import layer_handler


def test_treescope_rendering_names_layers_sublayers_and_parameters():
    @struct.pytree_dataclass(has_implicitly_inherited_fields=True)
    class FeedForward(grouping.Sequential):
        pass

    model = FeedForward(
        [
            grouping.NamedGroup(
                "projection",
                [
                    linear_and_affine.Linear.from_config(
                        "proj", jax.random.key(0), {"i": 2}, {"o": 3}
                    )
                ],
            )
        ]
    )
    text = treescope.render_to_text(model)
    assert text.startswith("FeedForward( # Sequential\n")
    assert "NamedGroup(" in text
    assert "name='projection'" in text
    assert "Linear(" in text
    assert "proj.weights" in text
    assert "in_axis_names=('i',)" in text
    html = treescope.render_to_html(model, compressed=False)
    assert "FeedForward" in html and "proj.weights" in html
    roundtrip = treescope.render_to_text(model, roundtrip_mode=True)
    assert "pz_flax.nn.grouping.NamedGroup(" in roundtrip
    assert "pz_flax.nn.linear_and_affine.Linear(" in roundtrip
    plain = treescope.render_to_text(grouping.Sequential([grouping.Identity()]))
    assert plain.startswith("Sequential(")
    assert "# Sequential" not in plain


def test_checked_sequential_subclass_rendering_note():
    @struct.pytree_dataclass(has_implicitly_inherited_fields=True)
    class Block(grouping.CheckedSequential):
        pass

    # Enough sublayers that the block cannot be rendered on a single line.
    sublayers = [linear_and_affine.RenameAxes(old=f"axis_{i}", new=f"new_{i}") for i in range(8)]
    text = treescope.render_to_text(Block(shapecheck.ANY, shapecheck.ANY, sublayers))
    assert text.startswith("Block( # CheckedSequential\n")


def _renamings(count: int) -> list[linear_and_affine.RenameAxes]:
    return [linear_and_affine.RenameAxes(old=f"axis_{i}", new=f"new_{i}") for i in range(count)]


def test_each_layer_is_drawn_in_its_type_colour():
    rename = linear_and_affine.RenameAxes(old="a", new="b")
    model = grouping.Sequential([rename])
    html = treescope.render_to_html(model, compressed=False)
    # A plain layer takes a colour derived from its type ...
    rename_color = rename.treescope_color()
    assert rename_color.startswith("oklch(")
    assert f"--block-color: {rename_color}" in html
    # ... and Sequential draws its (border, fill) pair as a border colour and a fill pattern.
    border, fill_pattern = struct_handler.struct_colors(model)
    assert isinstance(model.treescope_color(), tuple)
    assert f"--block-color: {border}" in html
    assert fill_pattern in html
    assert border != rename_color


def test_sublayers_and_child_fields_are_italic_but_configuration_is_not():
    html = treescope.render_to_html(
        linear_and_affine.RenameAxes(old="a", new="b"), compressed=False
    )
    italic = re.escape("font-style: italic; color: #00225f;")
    # RenameAxes has only static configuration; a Sequential's sublayers are pytree children.
    assert not re.search(italic + r"[^>]*>old<", html)
    sequential_html = treescope.render_to_html(grouping.Sequential(_renamings(1)), compressed=False)
    assert re.search(italic + r"[^>]*>sublayers<", sequential_html)


def test_checked_sequential_itself_has_no_note():
    text = treescope.render_to_text(
        grouping.CheckedSequential(shapecheck.ANY, shapecheck.ANY, _renamings(8))
    )
    assert text.startswith("CheckedSequential(\n")
    assert "# CheckedSequential" not in text


def test_handle_layer_hands_each_field_its_key_path():
    def show_path(node, path):
        return rendering_parts.RenderableAndLineAnnotations(
            rendering_parts.text(f"<{path}>"), rendering_parts.empty_part()
        )

    rendering = layer_handler.handle_layer(
        linear_and_affine.RenameAxes(old="a", new="b"), "model[0]", show_path
    )
    text = lowering.render_to_text_as_root(
        rendering_parts.build_full_line_with_annotations(rendering)
    )
    assert text == "RenameAxes(old=<model[0].old>, new=<model[0].new>)"


@struct.pytree_dataclass
class _LayerWithBookkeeping(grouping.Sequential):
    """A sequential block with a static field marked to stay collapsed."""

    sublayers: list
    notes: dict = dataclasses.field(
        default_factory=dict,
        metadata={"pytree_node": False, "treescope_always_collapse": True},
    )
    settings: dict = dataclasses.field(default_factory=dict, metadata={"pytree_node": False})


def test_fields_marked_always_collapse_stay_on_one_line_when_all_else_expands():
    entries = {f"entry_{i}": i for i in range(3)}
    layer = _LayerWithBookkeeping(_renamings(2), notes=dict(entries), settings=dict(entries))
    with treescope.using_expansion_strategy(max_height=None, target_width=30):
        lines = treescope.render_to_text(layer).splitlines()
    assert "  notes={'entry_0': 0, 'entry_1': 1, 'entry_2': 2}," in lines
    assert "  settings={" in lines and "    'entry_0': 0," in lines
    assert "  sublayers=[" in lines
