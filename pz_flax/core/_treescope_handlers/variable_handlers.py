"""Treescope rendering of ``Parameter`` and ``StateVariable`` objects.

Expanded, a variable shows its ``label``, ``value`` and ``metadata`` like any constructor
call. Collapsed, which is how it appears inside a folded layer, it is one short line::

    Parameter(label='hidden.weights', value=float32(| pixels:64, neurons:128) ≈0.0 ±0.1 [≥-0.3, ≤0.3] nonzero:8192)

the value reduced to its dtype, shape, axis names and summary statistics, and ``metadata``
left out when empty. Written out in full, the collapsed value (``<NamedArray ... (wrapping
jax.Array)>``) and an empty ``metadata={}`` make every parameter line of a model several
hundred pixels longer without saying more. Values that are not arrays (counters, ``None``)
keep the full rendering, since they are short already. Roundtrip mode always renders in full.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from treescope import lowering
from treescope import renderers
from treescope import rendering_parts
from treescope import repr_lib
from treescope import type_registries

from pz_flax.core import named_axes
from pz_flax.core._treescope_handlers import named_axes_handlers

_FIELDS = ("label", "value", "metadata")


def _is_summarizable(value: Any) -> bool:
    if isinstance(value, named_axes.NamedArray | named_axes.NamedArrayView):
        try:
            value.check_valid()
        except ValueError:
            return False
        return True
    # A 0-d plain array prints as its value, which is shorter than any summary.
    is_array = isinstance(value, jax.Array | np.ndarray) and np.ndim(value) > 0
    return is_array and not isinstance(value, jax.core.Tracer)


def _value_summary(value: Any, inspect_device_data: bool) -> rendering_parts.RenderableTreePart:
    """``float32(| a:3, b:4) ≈…`` for named arrays; treescope's array summary for others."""
    if named_axes.is_namedarray(value):
        summary, _ = named_axes_handlers.named_array_and_contained_type_summary(
            value, inspect_device_data=inspect_device_data
        )
        return rendering_parts.text(summary)
    adapter = type_registries.lookup_ndarray_adapter(value)
    return adapter.get_array_summary(value, fast=not inspect_device_data)


def render_labeled_variable(
    variable: Any,
    path: str | None,
    subtree_renderer: renderers.TreescopeSubtreeRenderer,
) -> rendering_parts.RenderableTreePart | rendering_parts.RenderableAndLineAnnotations:
    """Renders a ``Parameter`` or ``StateVariable``: compact when collapsed, in full when open.

    This is what ``LabeledVariable.__treescope_repr__`` returns.

    Args:
        variable: The variable.
        path: Its key path from the root, for treescope's copy-path button; None if unknown.
        subtree_renderer: Treescope's renderer for the fields.

    Returns:
        The rendering.
    """
    value = variable.value
    if not _is_summarizable(value):
        return repr_lib.render_object_constructor(
            type(variable),
            {name: getattr(variable, name) for name in _FIELDS},
            path,
            subtree_renderer,
            roundtrippable=False,
            color=variable.treescope_color(),
        )

    metadata = variable.metadata
    metadata_text = f", metadata={dict(metadata)!r}" if metadata else ""

    def compact_fields(inspect_device_data: bool) -> rendering_parts.RenderableTreePart:
        summary = _value_summary(value, inspect_device_data)
        return rendering_parts.siblings(
            rendering_parts.text(f"label={variable.label!r}, value="),
            rendering_parts.abbreviation_color(summary),
            rendering_parts.text(metadata_text),
        )

    collapsed = lowering.maybe_defer_rendering(
        main_thunk=lambda _: compact_fields(inspect_device_data=True),
        placeholder_thunk=lambda: compact_fields(inspect_device_data=False),
    )
    field_children = rendering_parts.build_field_children(
        variable, path, subtree_renderer, fields_or_attribute_names=_FIELDS
    )
    color, pattern = _colors(variable)
    return rendering_parts.build_foldable_tree_node_from_children(
        prefix=rendering_parts.siblings(
            rendering_parts.maybe_qualified_type_name(type(variable)),
            "(",
            rendering_parts.roundtrip_condition(
                not_roundtrip=rendering_parts.fold_condition(collapsed=collapsed)
            ),
        ),
        # Fields appear only when the node is open (or in roundtrip mode, which is exact).
        children=[
            rendering_parts.roundtrip_condition(
                roundtrip=child, not_roundtrip=rendering_parts.fold_condition(expanded=child)
            )
            for child in field_children
        ],
        suffix=")",
        path=path,
        background_color=color,
        background_pattern=pattern,
    )


def _colors(variable: Any) -> tuple[str | None, str | None]:
    from treescope import formatting_util

    return formatting_util.parse_simple_color_and_pattern_spec(
        variable.treescope_color(), type(variable).__name__
    )
