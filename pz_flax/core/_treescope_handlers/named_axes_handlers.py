"""Treescope rendering of `NamedArray` and `NamedArrayView`.

Two integrations:

* `handle_named_arrays` renders a named array in a tree. Collapsed it is one
  line, ``<NamedArray float32(3 | batch:8, features:16) ≈0.1 ±1.0 [≥-2, ≤2]
  (wrapping jax.Array)>``: the positional shape before ``|``, then every axis
  name with its size, then (for concrete arrays) statistics of the data.
  Expanded, it shows its fields like any struct.
* `NamedArrayAdapter` lets treescope's array visualiser
  (``treescope.render_array``, the automatic array visualisation in
  notebooks) draw a named array with its axes labelled by name rather than
  by position in the underlying data.

Both are reached through the hooks named arrays define themselves
(``__treescope_repr__`` and ``__treescope_ndarray_adapter__``), which import
this module only when treescope first renders a named array.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax
import numpy as np
from treescope import dtype_util
from treescope import lowering
from treescope import ndarray_adapters
from treescope import renderers
from treescope import rendering_parts
from treescope import type_registries
from treescope.external import jax_support

from pz_flax.core import named_axes
from pz_flax.core._treescope_handlers import struct_handler


def _contained_type_name(data_array: Any) -> str:
    """Names the kind of array a named array wraps, for its summary line."""
    if isinstance(data_array, np.ndarray):
        return "numpy.ndarray"
    if isinstance(data_array, jax.Array) and not isinstance(data_array, jax.core.Tracer):
        return "jax.Array"
    return type(data_array).__name__


def _can_summarize_data(data_array: Any) -> bool:
    return isinstance(data_array, jax.Array) and jax_support.safe_to_summarize(data_array)


def named_array_and_contained_type_summary(
    named_array: named_axes.NamedArray | named_axes.NamedArrayView,
    inspect_device_data: bool = True,
) -> tuple[str, str]:
    """Summarises a valid named array as text.

    Args:
      named_array: The array to summarise; must pass ``check_valid()``.
      inspect_device_data: Whether the summary may look at the array's values
        (statistics such as mean, range and zero count), which needs device
        computation. Without it only dtype and shapes are shown.

    Returns:
      ``(summary, contained_type)``: the summary, e.g.
      ``"float32(3 | batch:8) ≈0.0 ±1.0 [≥-1.6, ≤1.6] nonzero:24"``, and the
      name of the wrapped array type, e.g. ``"jax.Array"``.
    """
    contained_type = _contained_type_name(named_array.data_array)
    if (
        inspect_device_data
        and isinstance(named_array, named_axes.NamedArray)
        and not named_array.named_shape
    ):
        # With no names the array is just its data: show it as itself when short.
        data_repr = repr(named_array.unwrap())
        if "\n" not in data_repr:
            return data_repr, contained_type

    positional = ", ".join(str(size) for size in named_array.positional_shape)
    named = ", ".join(f"{name}:{size}" for name, size in named_array.named_shape.items())
    # The bar separates positional from named axes; it follows any positional
    # axes even without names, so that "(2, 3 |)" reads as "no named axes".
    shape_text = f"{positional} |" if positional else ("|" if named else "")
    if named:
        shape_text += f" {named}"
    summary = f"{dtype_util.get_dtype_name(named_array.dtype)}({shape_text})"
    if inspect_device_data and _can_summarize_data(named_array.data_array):
        summary += jax_support.summarize_array_data(named_array.data_array)
    return summary, contained_type


def handle_named_arrays(
    node: Any,
    path: str | None,
    subtree_renderer: renderers.TreescopeSubtreeRenderer,
) -> (
    rendering_parts.RenderableTreePart
    | rendering_parts.RenderableAndLineAnnotations
    | types.NotImplementedType
):
    """Renders a `NamedArray` or `NamedArrayView`; NotImplemented otherwise.

    An invalid named array (e.g. with inconsistent shape bookkeeping, as can
    happen mid-construction) is left to the generic struct renderer, which
    shows its fields as they are.

    Args:
      node: The object to render.
      path: Its key path, for treescope's copy-path button.
      subtree_renderer: Renderer for the fields when expanded.

    Returns:
      The rendering, or NotImplemented.
    """
    if not isinstance(node, named_axes.NamedArray | named_axes.NamedArrayView):
        return NotImplemented
    try:
        node.check_valid()
    except ValueError:
        return NotImplemented

    def build_label(inspect_device_data: bool) -> rendering_parts.RenderableTreePart:
        summary, contained_type = named_array_and_contained_type_summary(
            node, inspect_device_data=inspect_device_data
        )
        collapsed = rendering_parts.abbreviation_color(
            rendering_parts.text(f"<{type(node).__name__} {summary} (wrapping {contained_type})>")
        )
        expanded = rendering_parts.siblings(
            rendering_parts.maybe_qualified_type_name(type(node)),
            "(",
            rendering_parts.fold_condition(
                expanded=rendering_parts.comment_color(rendering_parts.text("  # " + summary))
            ),
        )
        return rendering_parts.summarizable_condition(summary=collapsed, detail=expanded)

    fields = dataclasses.fields(node)
    field_children = rendering_parts.build_field_children(
        node,
        path,
        subtree_renderer,
        fields_or_attribute_names=fields,
        attr_style_fn=struct_handler.struct_attr_style_fn_for_fields(fields),
    )
    return rendering_parts.build_custom_foldable_tree_node(
        # Statistics need device work; render the shape-only label first and fill
        # the statistics in when treescope renders deferred parts.
        label=lowering.maybe_defer_rendering(
            main_thunk=lambda _: build_label(inspect_device_data=True),
            placeholder_thunk=lambda: build_label(inspect_device_data=False),
        ),
        contents=rendering_parts.summarizable_condition(
            detail=rendering_parts.siblings(rendering_parts.indented_children(field_children), ")")
        ),
        path=path,
        expand_state=rendering_parts.ExpandState.COLLAPSED,
    )


def _mask_data_like(array: named_axes.NamedArrayView, mask: Any) -> jax.Array | np.ndarray:
    """Broadcasts a validity mask to ``array``'s shape and data-axis layout.

    Args:
      array: The array being visualised.
      mask: A named array, or a plain array broadcastable against ``array``'s
        positional shape (it then applies equally along every named axis).

    Returns:
      Mask data with exactly the layout of ``array.data_array``.

    Raises:
      ValueError: If the mask has axis names the array lacks, or a positional
        shape that does not broadcast to the array's.
    """
    if not isinstance(mask, named_axes.NamedArrayBase):
        mask = named_axes.wrap(mask)
    extra_names = set(mask.named_shape) - set(array.named_shape)
    if extra_names:
        raise ValueError(
            f"The valid mask has axis names {sorted(map(str, extra_names))} that the array"
            f" (named shape {dict(array.named_shape)}) does not have."
        )
    try:
        broadcast_positional = np.broadcast_shapes(mask.positional_shape, array.positional_shape)
    except ValueError:
        broadcast_positional = None
    if broadcast_positional != tuple(array.positional_shape):
        raise ValueError(
            f"The valid mask's positional shape {mask.positional_shape} does not broadcast to"
            f" the array's positional shape {array.positional_shape}."
        )
    return mask.broadcast_like(array).order_like(array).data_array


class NamedArrayAdapter(ndarray_adapters.NDArrayAdapter[named_axes.NamedArrayBase]):
    """Lets treescope's array visualiser draw named arrays with named axes.

    Treescope draws the *data* array and asks the adapter what each data axis
    means. A named axis is reported as "named, positionless" (labelled by its
    name), a positional axis by its logical position, which for a
    `NamedArrayView` can differ from its position in the data.
    """

    def get_axis_info_for_array_data(
        self, array: named_axes.NamedArrayBase
    ) -> tuple[ndarray_adapters.AxisInfo, ...]:
        view = array.as_namedarrayview()
        info_by_data_axis: dict[int, ndarray_adapters.AxisInfo] = {}
        for name, data_axis in view.data_axis_for_name.items():
            info_by_data_axis[data_axis] = ndarray_adapters.NamedPositionlessAxisInfo(
                axis_name=name, size=view.data_shape[data_axis]
            )
        for logical_index, data_axis in enumerate(view.data_axis_for_logical_axis):
            info_by_data_axis[data_axis] = ndarray_adapters.PositionalAxisInfo(
                axis_logical_index=logical_index, size=view.data_shape[data_axis]
            )
        return tuple(info_by_data_axis[axis] for axis in range(len(view.data_shape)))

    def get_array_data_with_truncation(
        self,
        array: named_axes.NamedArrayBase,
        mask: Any,
        edge_items_per_axis: tuple[int | None, ...],
    ) -> tuple[np.ndarray, np.ndarray]:
        view = array.as_namedarrayview()
        data = view.data_array
        mask_data = None if mask is None else _mask_data_like(view, mask)
        data_adapter = type_registries.lookup_ndarray_adapter(data)
        if data_adapter is None:
            raise TypeError(
                f"Cannot visualise a named array wrapping {type(data).__name__}: treescope has"
                " no array adapter for it."
            )
        if isinstance(data, np.ndarray) and mask_data is not None:
            mask_data = np.asarray(mask_data)
        return data_adapter.get_array_data_with_truncation(
            array=data, mask=mask_data, edge_items_per_axis=edge_items_per_axis
        )

    def get_array_summary(self, array: named_axes.NamedArrayBase, fast: bool) -> str:
        summary, contained_type = named_array_and_contained_type_summary(
            array, inspect_device_data=not fast
        )
        return f"{type(array).__name__} {summary} (wrapping {contained_type})"

    def get_numpy_dtype(self, array: named_axes.NamedArrayBase) -> np.dtype | None:
        return array.dtype if isinstance(array.dtype, np.dtype) else None

    def get_sharding_info_for_array_data(
        self, array: named_axes.NamedArrayBase
    ) -> ndarray_adapters.ShardingInfo | None:
        # Both named array types keep their data in ``data_array``; reading it directly (not
        # through ``as_namedarrayview``, which validates) keeps non-array contents, such as the
        # ``Sharding`` objects ``sharding_util.name_to_name_sharding`` returns, renderable.
        data = array.data_array
        if not isinstance(data, jax.Array):
            return None
        return jax_support.JAXArrayAdapter().get_sharding_info_for_array_data(data)

    def should_autovisualize(self, array: named_axes.NamedArrayBase) -> bool:
        data = array.data_array
        return (
            isinstance(data, jax.Array)
            and not isinstance(data, jax.core.Tracer)
            and not data.is_deleted()
        )
