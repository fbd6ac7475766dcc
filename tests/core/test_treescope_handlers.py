"""Tests for pz_flax.core._treescope_handlers (structs, named arrays, shape-check patterns).

Renderings are compared as text with penzai's renderings of the equivalent penzai
objects (module paths swapped), and HTML renderings are searched for colours and
axis names.
"""

import collections
import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import penzai.core.named_axes as penzai_nx
import penzai.core.shapecheck as penzai_chk
import penzai.core.struct as penzai_struct
import pytest
import treescope
from treescope import layout_algorithms
from treescope import lowering
from treescope import ndarray_adapters
from treescope import rendering_parts
from treescope import type_registries

from pz_flax.core import named_axes as nx
from pz_flax.core import shapecheck as chk
from pz_flax.core import struct
from pz_flax.core._treescope_handlers import named_axes_handlers
from pz_flax.core._treescope_handlers import shapecheck_handlers
from pz_flax.core._treescope_handlers import struct_handler


def render_text(value: Any, depth: int, roundtrip: bool = False) -> str:
    """Renders ``value`` to text with foldables expanded to ``depth``."""
    rendering = rendering_parts.build_full_line_with_annotations(
        treescope.active_renderer.get().to_foldable_representation(value)
    )
    layout_algorithms.expand_to_depth(rendering, depth)
    return lowering.render_to_text_as_root(rendering, roundtrip=roundtrip)


def render_html(value: Any) -> str:
    return treescope.render_to_html(value, compressed=False)


def assert_renders_like_penzai(ours: Any, theirs: Any, depths=(0, 1, 2)):
    for depth in depths:
        for roundtrip in (False, True):
            expected = render_text(theirs, depth, roundtrip).replace("penzai.", "pz_flax.")
            assert render_text(ours, depth, roundtrip) == expected, (depth, roundtrip)


# ---------------------------------------------------------------------------
# Structs.
# ---------------------------------------------------------------------------


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
    assert render_text(value, 1, roundtrip=True).startswith(
        "tests.core.test_treescope_handlers.Scale(\n"
    )
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
        "tests.core.test_treescope_handlers.BuiltFromWidth.from_attributes(table=[0, 1, 2])"
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


# ---------------------------------------------------------------------------
# Named arrays.
# ---------------------------------------------------------------------------


def _named(module):
    return module.NamedArray(
        named_axes=collections.OrderedDict({"bar": 5, "baz": 7}),
        data_array=jnp.arange(3 * 5 * 7).reshape((3, 5, 7)),
    )


def _view(module):
    return module.NamedArrayView(
        data_shape=(3, 5, 7),
        data_axis_for_logical_axis=(1,),
        data_axis_for_name={"foo": 0, "baz": 2},
        data_array=jnp.arange(3 * 5 * 7).reshape((3, 5, 7)),
    )


def test_named_array_summary_line():
    assert render_text(_named(nx), 0) == (
        "<NamedArray int32(3 | bar:5, baz:7) [≥0, ≤104] zero:1 nonzero:104 (wrapping jax.Array)>"
    )
    assert render_text(_view(nx), 0) == (
        "<NamedArrayView int32(5 | foo:3, baz:7) [≥0, ≤104] zero:1 nonzero:104"
        " (wrapping jax.Array)>"
    )


@pytest.mark.parametrize("build", [_named, _view], ids=["NamedArray", "NamedArrayView"])
def test_named_array_rendering_matches_penzai(build):
    assert_renders_like_penzai(build(nx), build(penzai_nx))


@pytest.mark.parametrize(
    "build",
    [
        lambda m: m.wrap(jnp.float32(2.5)),
        lambda m: m.wrap(jnp.ones((2, 3))),
        lambda m: m.wrap(jnp.ones((2, 3), jnp.bfloat16)).tag("a", "b"),
        lambda m: m.wrap(jnp.arange(4.0)).tag("only"),
        lambda m: m.wrap(jnp.zeros((2, 3, 4))).tag("x", "y", "z").untag("y", "x"),
        lambda m: m.wrap(np.arange(6).reshape(2, 3)).tag("a", "b"),
    ],
    ids=["scalar", "unnamed", "bfloat16", "one_axis", "view", "numpy"],
)
def test_more_named_arrays_render_like_penzai(build):
    assert_renders_like_penzai(build(nx), build(penzai_nx), depths=(0, 1))


def test_named_array_in_a_struct_shows_axis_names():
    model = Scale(weight=nx.wrap(jnp.ones((4, 2))).tag("in", "out"))
    text = render_text(model, 1)
    assert "weight=<NamedArray float32(| in:4, out:2)" in text


def test_traced_named_array_renders_without_statistics():
    captured = {}

    def f(x):
        captured["text"] = render_text(nx.wrap(x).tag("a"), 0)
        captured["penzai"] = render_text(penzai_nx.wrap(x).tag("a"), 0)
        return x

    jax.jit(f)(jnp.zeros(3))
    assert captured["text"].startswith("<NamedArray float32(| a:3) (wrapping ")
    assert captured["text"] == captured["penzai"]


def test_invalid_named_array_falls_back_to_fields():
    broken = nx.NamedArray(named_axes=collections.OrderedDict({"a": 5}), data_array=jnp.zeros((3,)))
    assert named_axes_handlers.handle_named_arrays(broken, None, None) is NotImplemented
    text = render_text(broken, 1)
    assert "named_axes=OrderedDict({'a': 5})" in text


def test_named_array_handler_ignores_other_objects():
    assert named_axes_handlers.handle_named_arrays(jnp.zeros(2), None, None) is NotImplemented


def test_summary_without_device_data():
    summary, contained = named_axes_handlers.named_array_and_contained_type_summary(
        nx.wrap(jnp.ones((2, 3))).tag("a", "b"), inspect_device_data=False
    )
    assert (summary, contained) == ("float32(| a:2, b:3)", "jax.Array")
    summary, _ = named_axes_handlers.named_array_and_contained_type_summary(
        nx.wrap(jnp.ones((2, 3))).tag("a", "b").untag("b"), inspect_device_data=False
    )
    assert summary == "float32(3 | a:2)"
    summary, _ = named_axes_handlers.named_array_and_contained_type_summary(
        nx.wrap(jnp.ones((2,))), inspect_device_data=False
    )
    assert summary == "float32(2 |)"
    summary, contained = named_axes_handlers.named_array_and_contained_type_summary(
        _numpy_backed(), inspect_device_data=True
    )
    # Statistics are only computed for JAX arrays.
    assert (summary, contained) == ("float64(| a:2)", "numpy.ndarray")


def _numpy_backed():
    return nx.NamedArray(named_axes=collections.OrderedDict({"a": 2}), data_array=np.ones(2))


# ---------------------------------------------------------------------------
# Named arrays in treescope's array visualiser.
# ---------------------------------------------------------------------------


def test_adapter_is_found_for_named_arrays():
    array = nx.wrap(jnp.zeros((2, 3))).tag("a", "b")
    assert isinstance(
        type_registries.lookup_ndarray_adapter(array), named_axes_handlers.NamedArrayAdapter
    )


def test_adapter_axis_info_matches_penzai():
    data = np.arange(4 * 5).reshape((4, 5))
    cases = [
        lambda m: m.wrap(data).tag("rows", "cols"),
        lambda m: m.wrap(data).tag("rows", "cols").untag("cols"),
        lambda m: m.wrap(data).tag("rows", "cols").untag("cols", "rows"),
        lambda m: m.wrap(data),
    ]
    adapter = named_axes_handlers.NamedArrayAdapter()
    for build in cases:
        ours = adapter.get_axis_info_for_array_data(build(nx))
        theirs = type_registries.lookup_ndarray_adapter(
            build(penzai_nx)
        ).get_axis_info_for_array_data(build(penzai_nx))
        assert ours == theirs
    assert adapter.get_axis_info_for_array_data(cases[1](nx)) == (
        ndarray_adapters.NamedPositionlessAxisInfo("rows", 4),
        ndarray_adapters.PositionalAxisInfo(0, 5),
    )


def _array_html(figure) -> str:
    return lowering.render_to_html_as_root(figure.treescope_part)


@pytest.mark.parametrize(
    "build",
    [
        lambda: nx.wrap(jnp.arange(12.0).reshape(3, 4)).tag("rows", "cols"),
        lambda: nx.wrap(jnp.arange(12.0).reshape(3, 4)).tag("rows", "cols").untag("cols"),
        lambda: nx.NamedArray(
            named_axes=collections.OrderedDict({"rows": 3, "cols": 4}),
            data_array=np.arange(12).reshape(3, 4),
        ),
    ],
    ids=["named", "view", "numpy"],
)
def test_render_array_shows_axis_names(build):
    array = build()
    html = _array_html(treescope.render_array(array))
    assert "rows" in html
    masked = _array_html(treescope.render_array(array, valid_mask=array > 4))
    assert "rows" in masked


def test_render_array_with_partial_masks():
    array = nx.wrap(jnp.arange(24.0).reshape(2, 3, 4)).tag("a", "b", "c").untag("c")
    # Mask naming only some axes, and a plain positional mask.
    only_b = nx.wrap(jnp.array([True, False, True])).tag("b")
    assert "a" in _array_html(treescope.render_array(array, valid_mask=only_b))
    positional = jnp.array([True, True, False, True])
    assert "a" in _array_html(treescope.render_array(array, valid_mask=positional))


def test_adapter_truncation_aligns_mask_with_data_layout():
    array = nx.wrap(jnp.arange(6).reshape(2, 3)).tag("a", "b").untag("b")
    mask = nx.wrap(jnp.array([True, False])).tag("a")
    data, mask_data = named_axes_handlers.NamedArrayAdapter().get_array_data_with_truncation(
        array, mask, (None, None)
    )
    np.testing.assert_array_equal(data, np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(mask_data, [[True] * 3, [False] * 3])


def test_bad_masks_are_explained():
    array = nx.wrap(jnp.zeros((2, 3))).tag("a", "b").untag("b")
    adapter = named_axes_handlers.NamedArrayAdapter()
    extra_name = nx.wrap(jnp.ones((2,), bool)).tag("z")
    with pytest.raises(ValueError, match=r"axis names \['z'\]"):
        adapter.get_array_data_with_truncation(array, extra_name, (None, None))
    wrong_positional = jnp.ones((5,), bool)
    with pytest.raises(ValueError, match=r"positional shape \(5,\) does not broadcast"):
        adapter.get_array_data_with_truncation(array, wrong_positional, (None, None))


def test_adapter_summaries_and_metadata():
    adapter = named_axes_handlers.NamedArrayAdapter()
    array = nx.wrap(jnp.ones((2, 3))).tag("a", "b")
    assert adapter.get_array_summary(array, fast=True) == (
        "NamedArray float32(| a:2, b:3) (wrapping jax.Array)"
    )
    assert adapter.get_array_summary(array, fast=False).startswith(
        "NamedArray float32(| a:2, b:3) ≈1.0"
    )
    assert adapter.get_numpy_dtype(array) == np.dtype("float32")
    assert adapter.should_autovisualize(array)
    assert not adapter.should_autovisualize(_numpy_backed())
    sharding = adapter.get_sharding_info_for_array_data(array)
    assert sharding.shard_shape == (2, 3)
    assert adapter.get_sharding_info_for_array_data(_numpy_backed()) is None


def test_sharded_named_array_sharding_info():
    devices = np.array(jax.devices()[:2])
    if len(devices) < 2:
        pytest.skip("needs two devices")
    mesh = jax.sharding.Mesh(devices, ("d",))
    data = jax.device_put(
        jnp.zeros((4, 6)),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d", None)),
    )
    info = named_axes_handlers.NamedArrayAdapter().get_sharding_info_for_array_data(
        nx.wrap(data).tag("rows", "cols")
    )
    assert info.shard_shape == (2, 6)
    assert len(info.device_index_to_shard_slices) == 2
    assert "rows" in _array_html(treescope.render_array_sharding(nx.wrap(data).tag("rows", "cols")))


# ---------------------------------------------------------------------------
# Shape-check patterns.
# ---------------------------------------------------------------------------


def _spec(module):
    return module.ArraySpec(
        shape=(1, module.var("one"), 2, *module.var("many")),
        named_shape={
            "foo": module.var("foo"),
            **module.var("bar"),
            **module.vars_for_axes("baz", {"x": 2, "y": None}),
        },
        dtype=np.floating,
    )


def test_array_spec_summary_line():
    assert render_text(_spec(chk), 0) == (
        "<ArraySpec floating(1, {one}, 2, *{many…} | foo:{foo}, **{bar:…}, x:2, y:{baz/y})>"
    )
    assert render_text(chk.ArraySpec(shape=(3,)), 0) == "<ArraySpec any(3)>"
    assert render_text(chk.ArraySpec(named_shape={"a": 1}, dtype=jnp.int8), 0) == (
        "<ArraySpec int8(| a:1)>"
    )


@pytest.mark.parametrize(
    "build",
    [
        _spec,
        lambda m: m.ArraySpec(),
        lambda m: m.ArraySpec(shape=(2, 3), dtype=jnp.float32),
        lambda m: {"input": m.ArraySpec(named_shape={"seq": m.var("n")}), "extra": m.ANY},
        lambda m: m.Wildcard("input to body"),
    ],
    ids=["full", "empty", "concrete", "in_dict", "wildcard"],
)
def test_pattern_rendering_matches_penzai(build):
    assert_renders_like_penzai(build(chk), build(penzai_chk))


def test_wildcards():
    assert render_text(chk.ANY, 0) == "*"
    assert render_text(chk.Wildcard("anything"), 0) == "<anything>"
    assert render_text(chk.Wildcard("anything"), 0, roundtrip=True) == (
        "pz_flax.core.shapecheck.Wildcard('anything')"
    )


def test_dimension_variables_are_coloured_in_html():
    html = render_html(_spec(chk))
    assert "color: #1bb2c3; font-style: italic;" in html
    assert "{one}" in html


def test_shapecheck_handler_ignores_other_objects():
    assert shapecheck_handlers.handle_arraystructures(3, None, None) is NotImplemented
