"""Treescope rendering of shape-check patterns (`ArraySpec`, `Wildcard`).

Patterns appear inside models (as the expected input of a layer, or the shape
of an uninitialised parameter), so they should read as compactly as the arrays
they describe. Collapsed, an `ArraySpec` is one line in the same notation
named arrays use, ``<ArraySpec float32(3, {n} | seq:{len}, **{rest:…})>``,
with each dimension variable in curly braces and set in a distinct colour:

* ``{n}`` is ``var("n")``; ``{heads/q}`` is ``vars_for_axes("heads", ...)["q"]``;
* ``*{batch…}`` is ``*var("batch")`` and ``**{rest:…}`` is ``**var("rest")``;
* ``any`` is the dtype ``np.generic`` (no dtype constraint).

Expanded (or in roundtrip mode) it shows the constructor call with every
field. A `Wildcard` shows as ``*`` or ``<description>``.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import numpy as np
from treescope import dtype_util
from treescope import renderers
from treescope import rendering_parts

from pz_flax.core import shapecheck

_VARIABLE_CSS = "color: #1bb2c3; font-style: italic;"
_SUMMARY_COLOR = "#1b3e73"


def _variable_text(text: str) -> rendering_parts.RenderableTreePart:
    return rendering_parts.custom_style(rendering_parts.text(text), css_style=_VARIABLE_CSS)


def _size_variable_label(name: str | tuple[str, str | int]) -> str:
    if isinstance(name, tuple):
        return "{" + f"{name[0]}/{name[1]}" + "}"
    return "{" + name + "}"


def _render_size(size: Any) -> rendering_parts.RenderableTreePart | str:
    """Renders one entry of a positional shape or one named-axis size."""
    if isinstance(size, shapecheck.DimVar):
        return _variable_text(_size_variable_label(size.name))
    if isinstance(size, shapecheck.MultiDimVar):
        return _variable_text("*{" + size.name + "…}")
    if isinstance(size, shapecheck.KnownDim):
        return str(size.size)
    return str(size)


def _render_named_entry(name: Any, size: Any) -> list[rendering_parts.RenderableTreePart | str]:
    if isinstance(name, shapecheck.MultiDimVar) and isinstance(
        size, shapecheck.RemainingAxisPlaceholder
    ):
        return [_variable_text("**{" + name.name + ":…}")]
    return [f"{name}:", _render_size(size)]


def array_spec_summary(spec: shapecheck.ArraySpec) -> rendering_parts.RenderableTreePart:
    """Renders the one-line ``dtype(positional | named)`` summary of a spec.

    Args:
      spec: The spec to summarise.

    Returns:
      The summary, e.g. ``floating(1, {n} | seq:{len})``, with variables styled.
    """
    dtype_name = "any" if spec.dtype is np.generic else dtype_util.get_dtype_name(spec.dtype)
    parts: list[rendering_parts.RenderableTreePart | str] = [dtype_name, "("]
    for index, size in enumerate(spec.shape):
        if index:
            parts.append(", ")
        parts.append(_render_size(size))
    named_entries = list(spec.named_shape.items())
    if named_entries:
        parts.append(" |" if spec.shape else "|")
        for index, (name, size) in enumerate(named_entries):
            parts.append(", " if index else " ")
            parts.extend(_render_named_entry(name, size))
    parts.append(")")
    return rendering_parts.siblings(*parts)


def handle_arraystructures(
    node: Any,
    path: str | None,
    subtree_renderer: renderers.TreescopeSubtreeRenderer,
) -> (
    rendering_parts.RenderableTreePart
    | rendering_parts.RenderableAndLineAnnotations
    | types.NotImplementedType
):
    """Renders an `ArraySpec` or a `Wildcard`; NotImplemented for anything else.

    Args:
      node: The object to render.
      path: Its key path, for treescope's copy-path button.
      subtree_renderer: Renderer for the spec's field values when expanded.

    Returns:
      The rendering, or NotImplemented so treescope tries other handlers.
    """
    if isinstance(node, shapecheck.Wildcard):
        shown = "*" if node.description is None else f"<{node.description}>"
        return rendering_parts.build_one_line_tree_node(
            line=rendering_parts.roundtrip_condition(
                roundtrip=rendering_parts.siblings(
                    rendering_parts.maybe_qualified_type_name(type(node)),
                    f"({node.description!r})",
                ),
                not_roundtrip=_variable_text(shown),
            ),
            path=path,
        )
    if isinstance(node, shapecheck.ArraySpec):
        fields = rendering_parts.build_field_children(
            node, path, subtree_renderer, fields_or_attribute_names=dataclasses.fields(node)
        )
        collapsed_label = rendering_parts.custom_text_color(
            rendering_parts.siblings("<ArraySpec ", array_spec_summary(node), ">"),
            _SUMMARY_COLOR,
        )
        return rendering_parts.build_custom_foldable_tree_node(
            label=rendering_parts.summarizable_condition(
                summary=collapsed_label,
                detail=rendering_parts.siblings(
                    rendering_parts.maybe_qualified_type_name(type(node)), "("
                ),
            ),
            contents=rendering_parts.summarizable_condition(
                detail=rendering_parts.siblings(rendering_parts.indented_children(fields), ")")
            ),
            path=path,
            expand_state=rendering_parts.ExpandState.COLLAPSED,
        )
    return NotImplemented
