"""Tests for pz_flax.core._treescope_handlers.named_axes_handlers.

Renderings are compared as text with penzai's renderings of the equivalent penzai named
arrays (module paths swapped), and HTML renderings are searched for axis names.
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import penzai.core.named_axes as penzai_nx
import pytest
import treescope
from treescope import lowering
from treescope import ndarray_adapters
from treescope import type_registries

from pz_flax.core import named_axes as nx
from pz_flax.core._treescope_handlers import named_axes_handlers
from tests.core._treescope_handlers.helpers import assert_renders_like_penzai
from tests.core._treescope_handlers.helpers import render_html
from tests.core._treescope_handlers.helpers import render_text
from tests.core._treescope_handlers.test_struct_handler import Scale

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


def test_summary_with_device_data():
    summary, contained = named_axes_handlers.named_array_and_contained_type_summary(
        nx.wrap(jnp.array([[0.0, 2.0, 4.0]])).tag("row", "col")
    )
    assert contained == "jax.Array"
    assert summary == "float32(| row:1, col:3) ≈2.0 ±1.6 [≥0.0, ≤4.0] zero:1 nonzero:2"
    # An unnamed array is its data: shown as the array itself.
    summary, _ = named_axes_handlers.named_array_and_contained_type_summary(nx.wrap(jnp.arange(3)))
    assert summary == repr(jnp.arange(3))


def test_html_rendering_names_type_and_axes():
    html = render_html(nx.wrap(jnp.ones((2, 3))).tag("batch", "features"))
    assert "NamedArray" in html
    assert "batch:2, features:3" in html
    assert "wrapping jax.Array" in html


def test_expanded_rendering_lists_the_fields_under_the_summary():
    text = render_text(nx.wrap(jnp.ones((2, 3))).tag("batch", "features"), 1)
    first_line, *field_lines = text.splitlines()
    assert first_line.startswith("NamedArray(  # float32(| batch:2, features:3) ≈1.0")
    assert field_lines[0] == "  named_axes=OrderedDict({'batch': 2, 'features': 3}),"
    assert field_lines[1].startswith("  data_array=<jax.Array float32(2, 3)")


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


def test_adapter_rejects_data_treescope_cannot_visualise():
    # An abstract array has a shape and dtype but no data to draw.
    abstract = jax.ShapeDtypeStruct((2,), jnp.float32)
    array = nx.NamedArray(named_axes=collections.OrderedDict({"a": 2}), data_array=abstract)
    with pytest.raises(TypeError, match="wrapping ShapeDtypeStruct"):
        named_axes_handlers.NamedArrayAdapter().get_array_data_with_truncation(array, None, (None,))


def test_adapter_does_not_autovisualise_deleted_arrays():
    data = jnp.ones((2,))
    array = nx.wrap(data).tag("a")
    data.delete()
    assert not named_axes_handlers.NamedArrayAdapter().should_autovisualize(array)


def _sharding_named_arrays():
    """The output of ``name_to_name_sharding`` (a NamedArray of Sharding objects), both libraries."""
    from penzai import pz as penzai_pz
    from penzai.toolshed import sharding_util as penzai_sharding_util

    from pz_flax.toolshed import sharding_util

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "y"))
    ours = sharding_util.name_to_name_sharding(
        nx.ones({"a": 4, "b": 8}), mesh, {"a": "x", "b": "y"}
    )
    theirs = penzai_sharding_util.name_to_name_sharding(
        penzai_pz.nx.ones({"a": 4, "b": 8}), mesh, {"a": "x", "b": "y"}
    )
    return ours, theirs


@pytest.mark.parametrize("autovisualize", [False, True])
def test_named_array_of_shardings_renders_like_penzai(autovisualize):
    ours, theirs = _sharding_named_arrays()
    assert isinstance(ours.data_array, jax.sharding.Sharding)
    autovisualizer = treescope.ArrayAutovisualizer() if autovisualize else None
    with treescope.active_autovisualizer.set_scoped(autovisualizer):
        for depth in (0, 1, 2):
            expected = render_text(theirs, depth).replace("penzai.", "pz_flax.")
            assert _without_addresses(render_text(ours, depth)) == _without_addresses(expected)
        # Rendering must not fall back to an error display (the autovisualizer used to raise
        # "NamedArray.data_array must contain a jax or numpy array").
        html = render_html(ours)
    assert "must contain a jax or numpy array" not in html
    assert "NamedSharding" in html


def test_adapter_does_not_autovisualise_or_shard_non_arrays():
    ours, _ = _sharding_named_arrays()
    adapter = named_axes_handlers.NamedArrayAdapter()
    assert adapter.should_autovisualize(ours) is False
    assert adapter.get_sharding_info_for_array_data(ours) is None


def _without_addresses(text: str) -> str:
    return re.sub(r" at 0x[0-9a-f]+", " at 0x…", text)
