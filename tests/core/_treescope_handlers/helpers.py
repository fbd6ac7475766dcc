"""Rendering helpers shared by the tests of pz_flax.core._treescope_handlers."""

from typing import Any

import treescope
from treescope import layout_algorithms
from treescope import lowering
from treescope import rendering_parts


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
