"""Layers that group other layers: sequences, named groups, structure checks.

Grouping layers carry no computation of their own. They exist so that a model's tree
mirrors how its author thinks about it ("the attention block", "the MLP"), which is what
makes selecting, rendering and patching parts of a model convenient. Helpers at the end of
the module flatten nested groups when that structure gets in the way.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax

from pz_flax.core import shapecheck
from pz_flax.core import struct
from pz_flax.core import variables as variables_lib
from pz_flax.nn import layer as layer_base

_GROUP_GREY = "#cdcdcd"


def _tinted(accent: str) -> tuple[str, str]:
    """A (border, fill) colour pair whose fill is a pale version of the border colour."""
    return accent, f"color-mix(in oklab, {accent} 25%, white)"


def _color_for_subclass(cls: type[Any]) -> str:
    from pz_flax.core._treescope_handlers import struct_handler

    return struct_handler.type_color(cls)


def _run_in_order(sublayers: Sequence[Any], value: Any, side_inputs: dict[str, Any]) -> Any:
    """Feeds ``value`` through each sublayer, giving each its index as a JAX name scope."""
    for index, sublayer in enumerate(sublayers):
        with jax.named_scope(str(index)):
            value = sublayer(value, **side_inputs)
    return value


@struct.pytree_dataclass
class Sequential(layer_base.Layer):
    """Calls its sublayers one after the other, sharing the side inputs.

    The most common container. A recommended pattern for reusable blocks is to subclass
    ``Sequential`` under a descriptive name (``MLP``, ``TransformerBlock``) and give the
    subclass a ``from_config`` classmethod that builds its sublayers; the subclass's name
    then appears in treescope and can be used to select the block, while the block stays an
    ordinary, editable list of layers.

    To keep that promise ("a ``Sequential`` subclass just runs its children in order"),
    subclasses may not override ``__call__``; trying to raises ``TypeError`` when the
    subclass is defined. Hold a ``Sequential`` as a field of your own layer instead if you
    need different control flow. See also ``CheckedSequential`` for a variant that checks
    its input and output structure.

    Attributes:
        sublayers: The layers to call in order. Usually ``Layer`` instances, but any
            callable pytree taking ``(value, **side_inputs)`` works.
    """

    sublayers: list[layer_base.Layer]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__:
            raise TypeError(
                f"{cls.__qualname__} overrides __call__, but subclasses of Sequential must"
                " not: a Sequential (sub)class always runs its sublayers in order. Subclass"
                " Layer instead, holding a Sequential as a field if useful."
            )

    @typing.final
    def __call__(self, value: Any, **side_inputs: Any) -> Any:
        """Runs each sublayer on the previous one's output.

        Args:
            value: The input of the first sublayer.
            **side_inputs: Passed unchanged to every sublayer.

        Returns:
            The output of the last sublayer (``value`` itself if there are none).
        """
        return _run_in_order(self.sublayers, value, side_inputs)

    def treescope_color(self) -> str | tuple[str, str]:
        if type(self) is Sequential:
            return _tinted(_GROUP_GREY)
        return _tinted(_color_for_subclass(type(self)))


@struct.pytree_dataclass
@typing.final
class NamedGroup(layer_base.Layer):
    """Runs its sublayers in order under a human-readable name.

    The name is for people and tools: it labels the group in treescope, it can be selected
    on (``select(model).at_instances_of(NamedGroup).where(lambda g: g.name == "mlp")``), and
    it becomes a JAX name scope while the group runs, so it appears in jaxprs, HLO metadata
    and profiler traces. With no sublayers the group is an identity that just names the
    activation passing through it, a convenient anchor for inserting layers later.

    Prefer ``NamedGroup`` for ad-hoc grouping and a ``Sequential`` subclass for a reusable
    block built by a classmethod. ``NamedGroup`` itself cannot be subclassed (``TypeError``).

    Attributes:
        name: The group's name; static (not a pytree leaf).
        sublayers: The layers to call in order.
    """

    name: str = dataclasses.field(metadata={"pytree_node": False})
    sublayers: Sequence[layer_base.Layer]

    def __init_subclass__(cls, **kwargs):
        raise TypeError(
            f"NamedGroup cannot be subclassed (attempted by {cls.__qualname__}); subclass"
            " Sequential, or write your own Layer, instead."
        )

    def __call__(self, value: Any, **side_inputs: Any) -> Any:
        """Runs each sublayer on the previous one's output, inside ``jax.named_scope(name)``.

        Args:
            value: The input of the first sublayer.
            **side_inputs: Passed unchanged to every sublayer.

        Returns:
            The output of the last sublayer (``value`` itself if there are none).
        """
        with jax.named_scope(self.name):
            return _run_in_order(self.sublayers, value, side_inputs)

    def treescope_color(self) -> tuple[str, str]:
        from treescope import formatting_util

        return _tinted(formatting_util.color_from_string(self.name))


@struct.pytree_dataclass
class CheckedSequential(layer_base.Layer):
    """A ``Sequential`` that checks the structure of its input and of its output.

    The two annotations may share dimension variables (``pz.chk.var("n")``), which lets a
    block state, e.g., that its output has the same batch axes as its input. A value that
    does not match raises ``pz.chk.StructureMismatchError`` naming which side failed.

    Attributes:
        input_like: Expected input structure: a pytree of ``pz.chk.ArraySpec`` nodes.
        output_like: Expected output structure, checked with the dimension variables
            bound while checking the input.
        sublayers: The layers to call in order.
    """

    input_like: shapecheck.StructureAnnotation = dataclasses.field(
        metadata={"pytree_node": False, "treescope_always_collapse": True}
    )
    output_like: shapecheck.StructureAnnotation = dataclasses.field(
        metadata={"pytree_node": False, "treescope_always_collapse": True}
    )
    sublayers: list[layer_base.Layer]

    @typing.final
    def __call__(self, value: Any, **side_inputs: Any) -> Any:
        """Checks the input, runs the sublayers in order, then checks the output.

        Args:
            value: The input; must match ``input_like``.
            **side_inputs: Passed unchanged to every sublayer.

        Returns:
            The output of the last sublayer, which matched ``output_like``.
        """
        dimension_values = shapecheck.check_structure(
            value,
            self.input_like,
            error_prefix=f"While checking the input of {type(self).__name__}:\n",
        )
        value = _run_in_order(self.sublayers, value, side_inputs)
        shapecheck.check_structure(
            value,
            self.output_like,
            known_vars=dimension_values,
            error_prefix=f"While checking the output of {type(self).__name__}:\n",
        )
        return value

    def input_structure(self) -> shapecheck.StructureAnnotation:
        return self.input_like

    def output_structure(self) -> shapecheck.StructureAnnotation:
        return self.output_like

    def treescope_color(self) -> str | tuple[str, str]:
        if type(self) is CheckedSequential:
            return _GROUP_GREY
        return _color_for_subclass(type(self)), _GROUP_GREY


@struct.pytree_dataclass
class Identity(layer_base.Layer):
    """Returns its input unchanged; a placeholder where a layer is structurally required."""

    @typing.final
    def __call__(self, value: Any, **_unused_side_inputs: Any) -> Any:
        """Returns ``value``."""
        return value

    def treescope_color(self) -> tuple[str, str]:
        return _tinted(_GROUP_GREY)


@struct.pytree_dataclass
@typing.final
class CheckStructure(layer_base.Layer):
    """Passes its input through after checking it against an expected structure.

    Insert one between two layers to document, and enforce, the shape of the activation
    there.

    Attributes:
        expected: The expected structure: a pytree of ``pz.chk.ArraySpec`` nodes.
    """

    expected: Any

    def __call__(self, value: Any, **_unused_side_inputs: Any) -> Any:
        """Returns ``value``, raising ``pz.chk.StructureMismatchError`` if it does not match."""
        shapecheck.check_structure(
            value, self.expected, error_prefix="While checking a CheckStructure layer:\n"
        )
        return value

    def input_structure(self) -> shapecheck.StructureAnnotation:
        return self.expected

    def output_structure(self) -> shapecheck.StructureAnnotation:
        return self.expected

    def treescope_color(self) -> str:
        return _GROUP_GREY


def is_sequential_or_named(tree: Any) -> bool:
    """Tells whether ``tree`` is a ``Sequential`` / ``CheckedSequential`` (or subclass) or a ``NamedGroup``."""
    return isinstance(tree, Sequential | CheckedSequential | NamedGroup)


def is_anonymous_sequential(tree: Any) -> bool:
    """Tells whether ``tree`` is exactly a ``Sequential``, not a named subclass of it."""
    return type(tree) is Sequential


def _map_immediate_children(node: Any, fn: Callable[[Any], Any]) -> Any:
    """Rebuilds ``node`` with ``fn`` applied to each of its direct pytree children.

    Variables are returned as they are: they are NNX pytree nodes, but rebuilding one from
    its leaves would create a new object and silently break the sharing of a variable
    between the places that reference it.
    """
    if isinstance(node, variables_lib.AbstractVariable):
        return node
    children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda child: child is not node)
    if jax.tree_util.treedef_is_leaf(treedef):
        return node
    return jax.tree_util.tree_unflatten(treedef, [fn(child) for child in children])


def inline_groups(
    tree: Any,
    parent_filter: Callable[[Any], bool],
    child_filter: Callable[[Any], bool],
) -> Any:
    """Splices the sublayers of matching child groups into their parent groups.

    Wherever a group (``Sequential``, ``CheckedSequential`` or ``NamedGroup``, including
    subclasses) satisfying ``parent_filter`` directly contains a group satisfying
    ``child_filter``, the child is replaced by its own sublayers. The tree is processed
    bottom-up, so a node matching both filters is first flattened itself and can then be
    inlined into its parent: repeated nesting collapses completely. Only the
    ``sublayers`` field of a parent is changed; its other fields are kept.

    ``inline_anonymous_sequentials`` covers the usual case.

    Args:
        tree: The pytree (usually a model) to process.
        parent_filter: Selects the groups that may absorb their children.
        child_filter: Selects the groups that may be dissolved into their parent.

    Returns:
        A copy of ``tree`` with the matching groups inlined.
    """

    def process(node: Any) -> Any:
        node = _map_immediate_children(node, process)
        if not (is_sequential_or_named(node) and parent_filter(node)):
            return node
        flattened = []
        for sublayer in node.sublayers:
            if is_sequential_or_named(sublayer) and child_filter(sublayer):
                flattened.extend(sublayer.sublayers)
            else:
                flattened.append(sublayer)
        return type(node).from_attributes(**{**node.attributes_dict(), "sublayers": flattened})

    return process(tree)


def inline_anonymous_sequentials(tree: Any) -> Any:
    """Dissolves plain ``Sequential`` nodes (not subclasses) into their parent groups.

    Named subclasses and ``NamedGroup`` nodes are kept, since their names carry meaning.

    Args:
        tree: The pytree (usually a model) to process.

    Returns:
        A copy of ``tree`` with anonymous sequentials inlined.
    """
    return inline_groups(
        tree, parent_filter=is_sequential_or_named, child_filter=is_anonymous_sequential
    )
