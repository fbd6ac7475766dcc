"""Tests for pz_flax.core._treescope_handlers.shapecheck_handlers.

Renderings are compared as text with penzai's renderings of the equivalent penzai patterns
(module paths swapped), and HTML renderings are searched for the variable colours.
"""

import jax.numpy as jnp
import numpy as np
import penzai.core.shapecheck as penzai_chk
import pytest
from treescope import lowering

from pz_flax.core import shapecheck as chk
from pz_flax.core._treescope_handlers import shapecheck_handlers
from tests.core._treescope_handlers.helpers import assert_renders_like_penzai
from tests.core._treescope_handlers.helpers import render_html
from tests.core._treescope_handlers.helpers import render_text


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


def test_array_spec_summary_renders_each_kind_of_dimension():
    def summary(spec):
        return lowering.render_to_text_as_root(shapecheck_handlers.array_spec_summary(spec))

    assert summary(_spec(chk)) == (
        "floating(1, {one}, 2, *{many…} | foo:{foo}, **{bar:…}, x:2, y:{baz/y})"
    )
    assert summary(chk.ArraySpec()) == "any()"
    assert summary(chk.ArraySpec(shape=(chk.var("n"),), dtype=jnp.float32)) == "float32({n})"
    assert summary(chk.ArraySpec(named_shape={**chk.var("rest")}, dtype=jnp.bool_)) == (
        "bool(| **{rest:…})"
    )


def test_array_spec_summary_styles_only_the_variables():
    spec = chk.ArraySpec(shape=(4, chk.var("n")), named_shape={"seq": 8})
    html = lowering.render_to_html_as_root(shapecheck_handlers.array_spec_summary(spec))
    assert html.count("color: #1bb2c3; font-style: italic;") == 1
    assert "{n}" in html


def test_collapsed_array_spec_is_drawn_in_the_summary_colour():
    html = render_html(chk.ArraySpec(shape=(2,)))
    assert "#1b3e73" in html
    assert "ArraySpec" in html


def test_expanded_array_spec_shows_its_fields():
    text = render_text(chk.ArraySpec(shape=(2, chk.var("n")), dtype=jnp.float32), 1)
    assert text.splitlines()[0] == "ArraySpec("
    assert "  shape=(2, DimVar(name='n'))," in text
    assert text.endswith(")")


def test_wildcard_without_description_roundtrips_with_none():
    assert render_text(chk.ANY, 0, roundtrip=True) == "pz_flax.core.shapecheck.Wildcard(None)"
    assert "color: #1bb2c3; font-style: italic;" in render_html(chk.ANY)
