"""Treescope rendering of ``pz_flax.nn.Layer`` objects.

A layer renders like any struct, as the constructor call that rebuilds it (its type name,
then its sublayers, parameters and configuration as fields), on the colour its
``treescope_color()`` returns. One thing is added: a named subclass of ``Sequential`` or
``CheckedSequential`` is marked ``# Sequential`` / ``# CheckedSequential`` on its first
line, because such a block runs its sublayers in order however specific its name is, and
that is the one fact a reader of the tree needs to know about it.

A field declared with ``metadata={"treescope_always_collapse": True}`` stays on one line even
when treescope expands everything around it: layers use it for bookkeeping a reader rarely
needs (an ``NNXWrapper``'s graph definition, paths and naming settings), so that the
sublayers and parameters get the room.
"""

from __future__ import annotations

import dataclasses

from treescope import renderers
from treescope import rendering_parts

from pz_flax.core._treescope_handlers import struct_handler
from pz_flax.nn import grouping
from pz_flax.nn import layer


def _first_line_note(node: layer.Layer) -> rendering_parts.RenderableTreePart | None:
    """The ``# Sequential``-style comment for named sequential subclasses, else None."""
    for group_type in (grouping.Sequential, grouping.CheckedSequential):
        if isinstance(node, group_type) and type(node) is not group_type:
            return rendering_parts.comment_color(rendering_parts.text(f" # {group_type.__name__}"))
    return None


def handle_layer(
    node: layer.Layer,
    path: str | None,
    subtree_renderer: renderers.TreescopeSubtreeRenderer,
) -> rendering_parts.RenderableTreePart | rendering_parts.RenderableAndLineAnnotations:
    """Renders a layer as a foldable, coloured constructor call.

    Fields marked ``treescope_always_collapse`` are rendered collapsed (treescope's
    ``build_field_children`` reads the mark from the dataclass field passed to it).

    Args:
        node: The layer to render.
        path: The node's key path from the root (for treescope's copy-path button), or None.
        subtree_renderer: Treescope's renderer for the layer's field values.

    Returns:
        The rendering.
    """
    fields = dataclasses.fields(node)
    background_color, background_pattern = struct_handler.struct_colors(node)
    children = rendering_parts.build_field_children(
        node,
        path,
        subtree_renderer,
        fields_or_attribute_names=fields,
        attr_style_fn=struct_handler.struct_attr_style_fn_for_fields(fields),
    )
    return rendering_parts.build_foldable_tree_node_from_children(
        prefix=struct_handler.render_struct_constructor(node),
        children=children,
        suffix=")",
        path=path,
        background_color=background_color,
        background_pattern=background_pattern,
        first_line_annotation=_first_line_note(node),
    )
