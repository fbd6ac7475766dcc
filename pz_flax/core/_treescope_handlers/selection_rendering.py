"""Treescope rendering of selections: the tree drawn whole, with selected subtrees boxed.

Printing a ``Selection`` field by field (an ``OrderedDict`` of key paths next to a remainder
full of holes) says little. Instead the tree the selection describes is rendered as usual,
and every node whose key path is selected gets a highlighted box; the view is expanded just
enough to show all the boxes. The output reads as code that rebuilds the selection:
``pz.select(<tree>).at_keypaths(<the selected paths>)``.

Selected nodes are recognised by key path: treescope hands each handler the ``keystr`` path
of the node it renders, and that is compared with the ``keystr`` of each selected path. So
this relies on handlers giving nodes the same paths as JAX does (a mismatch is reported at
the top of the rendering instead of being silently dropped).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax
import treescope
from treescope import context
from treescope import layout_algorithms
from treescope import lowering
from treescope import renderers
from treescope import rendering_parts

from pz_flax.core import selectors


@dataclasses.dataclass
class _SelectionRenderState:
    """What the wrapper hook needs while one selection is being rendered.

    Attributes:
        selected_paths: ``keystr`` of every selected key path.
        seen_paths: Selected paths already rendered once.
        repeated_paths: Selected paths rendered more than once (a handler bug).
        draw_boxes: Whether to draw visible boxes, or only mark the nodes for layout.
    """

    selected_paths: frozenset[str]
    seen_paths: set[str] = dataclasses.field(default_factory=set)
    repeated_paths: set[str] = dataclasses.field(default_factory=set)
    draw_boxes: bool = True


_active_state: context.ContextualValue[_SelectionRenderState | None] = context.ContextualValue(
    module=__name__, qualname="_active_state", initial_value=None
)


def is_rendering_a_selection() -> bool:
    """Tells whether treescope is currently rendering a ``Selection`` (for other handlers)."""
    return _active_state.get() is not None


@dataclasses.dataclass(frozen=True)
class SelectionBoundaryLayoutMark:
    """Layout mark put on each selected node, so the layout can expand down to them."""


def _box_selected_node(
    node: Any, path: str | None, node_renderer: renderers.TreescopeSubtreeRenderer
) -> rendering_parts.RenderableAndLineAnnotations | types.NotImplementedType:
    """Treescope wrapper hook: renders selected nodes marked (and boxed) and others as usual."""
    state = _active_state.get()
    if state is None or path is None or path not in state.selected_paths:
        return NotImplemented
    if path in state.seen_paths:
        state.repeated_paths.add(path)
    state.seen_paths.add(path)

    inner = node_renderer(node, path)
    marked = rendering_parts.with_layout_mark(inner.renderable, SelectionBoundaryLayoutMark())
    if not state.draw_boxes:
        return rendering_parts.RenderableAndLineAnnotations(
            renderable=marked, annotations=inner.annotations
        )
    label = rendering_parts.fold_condition(
        expanded=rendering_parts.custom_style(
            rendering_parts.text("# Selected:"), css_style="color: darkcyan; font-weight: bold;"
        )
    )
    boxed = rendering_parts.in_outlined_box(
        rendering_parts.on_separate_lines([label, marked]),
        css_style="border: 2px solid cyan; border-left: 2ch solid cyan;",
    )
    return rendering_parts.siblings_with_annotations(
        rendering_parts.build_custom_foldable_tree_node(contents=boxed),
        extra_annotations=[inner.annotations],
    )


def render_selection_to_foldable_representation(
    selection: selectors.Selection,
    visible_selection: bool = True,
    ignore_exceptions: bool = False,
) -> rendering_parts.RenderableTreePart:
    """Renders a selection (or the tree it selects in) as treescope's foldable representation.

    Args:
        selection: The selection to render.
        visible_selection: If True, render the selection itself: the tree with the selected
            subtrees boxed, as ``pz.select(...).at_keypaths(...)``. If False, render only the
            tree, with no boxes, but still expanded down to the selected subtrees.
        ignore_exceptions: Render subtrees whose handlers fail as a fallback instead of
            raising (for display hooks, where failing loudly helps nobody).

    Returns:
        The rendering, laid out so that every selected subtree is visible.
    """
    base_renderer = treescope.active_renderer.get()
    state = _SelectionRenderState(
        selected_paths=frozenset(jax.tree_util.keystr(k) for k in selection.selected_by_path),
        draw_boxes=visible_selection,
    )
    with _active_state.set_scoped(state):
        tree_rendering = rendering_parts.build_full_line_with_annotations(
            base_renderer.extended_with(
                wrapper_hooks=[_box_selected_node]
            ).to_foldable_representation(selection.deselect(), ignore_exceptions=ignore_exceptions)
        )

    problems = []
    never_rendered = state.selected_paths - state.seen_paths
    if never_rendered:
        problems.append(
            "# Some selected nodes were not drawn: a treescope handler gives them key paths"
            f" that differ from JAX's. Missing: {sorted(never_rendered)}"
        )
    if state.repeated_paths:
        problems.append(
            "# Some selected nodes were drawn more than once: a treescope handler reuses key"
            f" paths. Repeated: {sorted(state.repeated_paths)}"
        )

    layout_algorithms.expand_to_layout_marks(
        tree_rendering, marks=[SelectionBoundaryLayoutMark()], collapse_weak_others=True
    )
    layout_algorithms.expand_for_balanced_layout(tree_rendering)

    if visible_selection:
        paths_rendering = rendering_parts.build_full_line_with_annotations(
            base_renderer.to_foldable_representation(
                tuple(selection.selected_by_path),
                ignore_exceptions=ignore_exceptions,
                root_keypath=None,
            )
        )
        layout_algorithms.expand_for_balanced_layout(paths_rendering)
        count = selection.count()
        paths_node = rendering_parts.build_custom_foldable_tree_node(
            label=rendering_parts.comment_color(
                rendering_parts.fold_condition(
                    collapsed=rendering_parts.text(f"<{count} subtrees, highlighted above>"),
                    expanded=rendering_parts.text(f"# {count} subtrees, highlighted above"),
                )
            ),
            contents=rendering_parts.fold_condition(
                expanded=rendering_parts.indented_children([paths_rendering])
            ),
            expand_state=rendering_parts.ExpandState.COLLAPSED,
        )
        result = rendering_parts.siblings(
            rendering_parts.comment_color(rendering_parts.text("pz.select(")),
            rendering_parts.indented_children([tree_rendering]),
            rendering_parts.comment_color(rendering_parts.text(").at_keypaths(")),
            paths_node.renderable,
            rendering_parts.comment_color(rendering_parts.text(")")),
        )
    else:
        result = tree_rendering

    if problems:
        result = rendering_parts.on_separate_lines(
            [
                rendering_parts.error_color(
                    rendering_parts.on_separate_lines([rendering_parts.text(p) for p in problems])
                ),
                result,
            ]
        )
    return result


def display_selection_streaming(
    selection: selectors.Selection,
    visible_selection: bool = True,
    ignore_exceptions: bool = False,
):
    """Displays a selection in IPython (``Selection.show_selection`` / ``show_value``).

    Args:
        selection: The selection to display.
        visible_selection: Show the selection with boxes (True) or only the tree, expanded to
            the selected subtrees (False). See `render_selection_to_foldable_representation`.
        ignore_exceptions: Render failing subtrees as a fallback instead of raising.
    """
    with lowering.collecting_deferred_renderings() as deferreds:
        rendering = render_selection_to_foldable_representation(
            selection, visible_selection=visible_selection, ignore_exceptions=ignore_exceptions
        )
    lowering.display_streaming_as_root(
        rendering, deferreds, roundtrip=False, ignore_exceptions=ignore_exceptions
    )
