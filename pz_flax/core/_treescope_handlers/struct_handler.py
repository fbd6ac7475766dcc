"""Treescope rendering of `pz_flax.core.struct.Struct` objects.

A struct renders as the constructor call that would rebuild it,
``TypeName(field=value, ...)``, drawn on the colour its ``treescope_color()``
method returns, so each layer type keeps one recognisable colour across a
model. Fields that are pytree children (the ones JAX, selectors and
``nnx.state`` traverse) are set in italics, to tell them apart from static
configuration at a glance.

Classes whose ``__init__`` does not take exactly their fields are shown, in
roundtrip mode, as ``TypeName.from_attributes(...)``, which is the call that
really rebuilds them.

The pieces are public so that renderers of struct subclasses (layers in
``pz_flax.nn``) can assemble the same look: `struct_colors`,
`render_struct_constructor` and `struct_attr_style_fn_for_fields`;
`render_short_struct_summary` is for mentioning a struct without its contents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Sequence

from treescope import dataclass_util
from treescope import formatting_util
from treescope import renderers
from treescope import rendering_parts

from pz_flax.core import struct

_CHILD_FIELD_CSS = "font-style: italic; color: #00225f;"


def type_color(cls: type) -> str:
    """The colour penzai gives a callable type, for that type or its pz_flax counterpart.

    Penzai hashes a layer type's qualified name into a colour. A pz_flax type hashes the
    name of its penzai counterpart (``pz_flax.nn.basic_ops.Elementwise`` as
    ``penzai.nn.basic_ops.Elementwise``), so that a model looks the same in both libraries;
    user types keep their own names.

    Args:
      cls: The type.

    Returns:
      A CSS colour.
    """
    module = cls.__module__
    if module == "pz_flax" or module.startswith("pz_flax."):
        module = "penzai" + module.removeprefix("pz_flax")
    return formatting_util.color_from_string(f"{module}.{cls.__qualname__}")


def struct_colors(node: struct.Struct) -> tuple[str | None, str | None]:
    """Returns the ``(background_color, background_pattern)`` for a struct.

    Args:
      node: The struct; its ``treescope_color()`` is either one CSS colour or a
        ``(border, fill)`` pair.

    Returns:
      The colour and pattern arguments treescope's node builders take.
    """
    return formatting_util.parse_simple_color_and_pattern_spec(
        node.treescope_color(), type(node).__name__
    )


def render_struct_constructor(node: struct.Struct) -> rendering_parts.RenderableTreePart:
    """Renders the opening of a struct's constructor call, up to ``(``.

    Args:
      node: The struct being rendered.

    Returns:
      ``TypeName(``, qualified in roundtrip mode, with ``.from_attributes``
      inserted (in roundtrip mode) when the class's ``__init__`` does not take
      its fields, since only ``from_attributes`` would then rebuild it.
    """
    type_name = rendering_parts.maybe_qualified_type_name(type(node))
    if dataclass_util.init_takes_fields(type(node)):
        return rendering_parts.siblings(type_name, "(")
    return rendering_parts.siblings(
        type_name,
        rendering_parts.roundtrip_condition(roundtrip=rendering_parts.text(".from_attributes")),
        "(",
    )


def struct_attr_style_fn_for_fields(
    fields: Sequence[dataclasses.Field],
) -> Callable[[str], rendering_parts.RenderableTreePart]:
    """Builds the function that styles each field name of a struct.

    Args:
      fields: The struct's dataclass fields.

    Returns:
      A function from field name to its rendered name: italic and dark blue for
      pytree-child fields, plain for static ones.
    """
    is_child_field = {field.name: struct.is_pytree_node_field(field) for field in fields}

    def style_field_name(field_name: str) -> rendering_parts.RenderableTreePart:
        name = rendering_parts.text(field_name)
        if is_child_field[field_name]:
            return rendering_parts.custom_style(name, css_style=_CHILD_FIELD_CSS)
        return name

    return style_field_name


def render_short_struct_summary(node: struct.Struct) -> rendering_parts.RenderableTreePart:
    """Renders a one-line ``TypeName(...)`` badge in the struct's colour.

    Used where a struct must be mentioned without showing its contents (for
    instance, when rendering a selection inside a bigger tree).

    Args:
      node: The struct to summarise.

    Returns:
      A single-line rendering.
    """
    background_color, background_pattern = struct_colors(node)
    return rendering_parts.build_one_line_tree_node(
        rendering_parts.text(type(node).__name__ + "(...)"),
        background_color=background_color,
        background_pattern=background_pattern,
    ).renderable


def render_struct(
    node: struct.Struct,
    path: str | None,
    subtree_renderer: renderers.TreescopeSubtreeRenderer,
) -> rendering_parts.RenderableTreePart | rendering_parts.RenderableAndLineAnnotations:
    """Renders a struct as a foldable, coloured constructor call.

    This is what ``Struct.__treescope_repr__`` returns.

    Args:
      node: The struct to render.
      path: The node's key path from the root, for treescope's copy-path
        button; None when unknown.
      subtree_renderer: Treescope's renderer for the struct's field values.

    Returns:
      A treescope rendering of ``node``.
    """
    fields = dataclasses.fields(node)
    background_color, background_pattern = struct_colors(node)
    children = rendering_parts.build_field_children(
        node,
        path,
        subtree_renderer,
        fields_or_attribute_names=fields,
        attr_style_fn=struct_attr_style_fn_for_fields(fields),
    )
    return rendering_parts.build_foldable_tree_node_from_children(
        prefix=render_struct_constructor(node),
        children=children,
        suffix=")",
        path=path,
        background_color=background_color,
        background_pattern=background_pattern,
    )
