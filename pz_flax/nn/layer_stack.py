"""Stacks of identically structured layers, run under ``jax.lax.scan``.

A deep model usually repeats one block N times. Writing the N blocks out makes
``jax.jit`` trace and compile the block N times; a `LayerStack` instead stores
*one* block whose arrays carry an extra named "stack" axis, and runs it under
``jax.lax.scan``, which traces the block once and feeds it one slice of every
stacked array per step.

What gets sliced is decided by axis name, not by position: any named array in
the block (a parameter value, a constant, a per-layer state) that has the
stack axis is sliced; everything else is shared by all layers. State variables
have to declare which of the two they are, because a state's value may change
while the stack runs: their metadata entry ``"layerstack_axes"`` maps each
stack axis name to a `LayerStackVarBehavior` (``SHARED`` states are threaded
through the scan carry, ``PER_LAYER`` states are sliced like parameters and
their per-layer updates stacked back).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from collections.abc import Hashable
from typing import Any

import jax

from pz_flax.core import named_axes
from pz_flax.core import struct
from pz_flax.core import tree_util as pz_tree_util
from pz_flax.core import variables
from pz_flax.nn import layer as layer_base

_METADATA_KEY = "layerstack_axes"


class LayerStackVarBehavior(enum.Enum):
    """How a state variable inside a `LayerStack` relates to the stack axis.

    Attributes:
      SHARED: One value for the whole stack (e.g. a step counter); each layer
        sees the value left by the previous one. Its arrays must not have the
        stack axis.
      PER_LAYER: One slice per layer along the stack axis (e.g. each layer's
        key/value cache); every array of its value must have the stack axis.
    """

    SHARED = enum.auto()
    PER_LAYER = enum.auto()


@dataclasses.dataclass(frozen=True)
class LayerStackGetAttrKey(pz_tree_util.CustomGetAttrKey):
    """Path key of a `LayerStack` field, recording which axis it is stacked on.

    Every key path that passes through a layer stack contains one of these, so
    code that walks a model by path (e.g. a pass that adds a cache variable to
    every attention layer) can tell which stack axes the subtree lives under;
    see `layerstack_axes_from_keypath`.

    Attributes:
      name: The field name.
      stack_axis: The stack axis of the enclosing `LayerStack`.
      stack_axis_size: Its size (number of stacked layers).
    """

    name: str
    stack_axis: named_axes.AxisName
    stack_axis_size: int


def _stacked_leaf_paths(tree: Any, stack_axis: named_axes.AxisName) -> list[tuple[Any, Any]]:
    """The (path, named array) pairs of ``tree`` whose array has ``stack_axis``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=named_axes.is_namedarray)[0]
    return [
        (path, leaf)
        for path, leaf in leaves
        if isinstance(leaf, named_axes.NamedArrayBase) and stack_axis in leaf.named_shape
    ]


@struct.pytree_dataclass
class LayerStack(layer_base.Layer):
    """A sequence of identically structured layers, run under ``jax.lax.scan``.

    ``stacked_sublayers`` is one layer whose arrays have an extra named axis
    ``stack_axis`` wherever they differ between layers. Calling the stack calls
    that layer ``stack_axis_size`` times, each time with slice ``i`` of every
    stacked array, feeding each output into the next call; side inputs are the
    same for every layer. The result equals calling the unstacked layers one
    after the other.

    State variables inside the stack need a ``"layerstack_axes"`` metadata
    entry giving their `LayerStackVarBehavior` for ``stack_axis``.
    (`from_sublayer_builder` and `KVCachingAttention.from_uncached` add it.)
    State variables passed as side inputs (e.g. a random stream) are always
    shared. Parameters need nothing: they are read-only while the stack runs.

    Attributes:
      stacked_sublayers: The layer, with ``stack_axis`` on its per-layer arrays.
      stack_axis: Name of the stack axis.
      stack_axis_size: Number of layers.
    """

    stacked_sublayers: layer_base.Layer
    stack_axis: named_axes.AxisName = dataclasses.field(metadata={"pytree_node": False})
    stack_axis_size: int = dataclasses.field(metadata={"pytree_node": False})

    def _check_stacked_sizes(self, tree: Any) -> None:
        """Rejects arrays whose stack axis size differs from ``stack_axis_size``."""
        for path, leaf in _stacked_leaf_paths(tree, self.stack_axis):
            size = leaf.named_shape[self.stack_axis]
            if size != self.stack_axis_size:
                raise ValueError(
                    f"LayerStack with stack_axis {self.stack_axis!r} of size"
                    f" {self.stack_axis_size} found that axis with size {size} in the"
                    f" array at {pz_tree_util.pretty_keystr(path, tree)} (named_shape"
                    f" {dict(leaf.named_shape)})."
                )

    def _split_state_vars(self, sublayer_vars, side_input_vars):
        """Sorts state variables into scan-carried (shared) and scanned (per-layer).

        Returns:
          ``(vars_by_label, shared_values, per_layer_values)``, the values being
          frozen snapshots, per-layer ones with the stack axis moved to a
          leading positional axis so ``scan`` can slice it.
        """
        vars_by_label = {}
        shared_values = []
        per_layer_values = []
        for var in side_input_vars:
            vars_by_label[var.label] = var
            shared_values.append(var.freeze())

        for var in sublayer_vars:
            behaviors = var.metadata.get(_METADATA_KEY)
            if behaviors is None or self.stack_axis not in behaviors:
                raise ValueError(
                    f"State variable {var.label!r} is inside a LayerStack over"
                    f" {self.stack_axis!r}, but its metadata does not say whether it is"
                    f" shared or per-layer: give it metadata"
                    f" {{'{_METADATA_KEY}': {{{self.stack_axis!r}:"
                    " LayerStackVarBehavior.SHARED or .PER_LAYER}}."
                )
            behavior = behaviors[self.stack_axis]
            if behavior == LayerStackVarBehavior.SHARED:
                stacked = _stacked_leaf_paths(var.value, self.stack_axis)
                if stacked:
                    bad_paths = [pz_tree_util.pretty_keystr(path, var.value) for path, _ in stacked]
                    raise ValueError(
                        f"State variable {var.label!r} is SHARED across stack axis"
                        f" {self.stack_axis!r}, but that axis appears in its value at"
                        f" {bad_paths}."
                    )
                if var.label in vars_by_label:
                    if vars_by_label[var.label] is not var:
                        raise ValueError(
                            f"A side input and a variable inside the LayerStack are"
                            f" different variables with the same label {var.label!r}."
                        )
                    continue
                vars_by_label[var.label] = var
                shared_values.append(var.freeze())
            elif behavior == LayerStackVarBehavior.PER_LAYER:
                if var.label in vars_by_label:
                    raise ValueError(
                        f"Per-layer state variable {var.label!r} cannot also be passed as a"
                        " side input."
                    )
                leaves, treedef = jax.tree_util.tree_flatten(
                    var.value, is_leaf=named_axes.is_namedarray
                )
                if not all(
                    isinstance(leaf, named_axes.NamedArrayBase)
                    and self.stack_axis in leaf.named_shape
                    for leaf in leaves
                ):
                    raise ValueError(
                        f"State variable {var.label!r} is PER_LAYER along stack axis"
                        f" {self.stack_axis!r}, so every leaf of its value must be a named"
                        f" array with that axis; its value is {var.value!r}."
                    )
                self._check_stacked_sizes(var.value)
                vars_by_label[var.label] = var
                per_layer_values.append(
                    variables.StateVariableValue(
                        value=treedef.unflatten(
                            [
                                leaf.untag_prefix(self.stack_axis).with_positional_prefix()
                                for leaf in leaves
                            ]
                        ),
                        label=var.label,
                        metadata=var.metadata,
                    )
                )
            else:
                raise ValueError(
                    f"Unknown LayerStackVarBehavior {behavior!r} for state variable {var.label!r}."
                )
        return vars_by_label, shared_values, per_layer_values

    def __call__(self, argument: Any, /, **side_inputs: Any) -> Any:
        """Runs the stacked layers in order under ``jax.lax.scan``.

        Args:
          argument: Input of the first layer; every layer's output must have
            the same structure, shapes and dtypes as its input.
          **side_inputs: Passed unchanged to every layer. State variables here
            are shared by all layers.

        Returns:
          The output of the last layer. State variables (in the stack and in
          the side inputs) are updated in place.

        Raises:
          ValueError: If a stacked array has the wrong stack axis size, a state
            variable lacks (or contradicts) its stack behavior, or a variable of
            another kind (e.g. a Parameter) is passed as a side input.
        """
        # Parameters are only read, so freezing them turns them into plain
        # pytrees whose stacked arrays scan can slice like any other.
        frozen_sublayer = variables.freeze_params(self.stacked_sublayers)
        pure_sublayer, sublayer_vars = variables.unbind_state_vars(frozen_sublayer)
        pure_side_inputs, side_input_vars = variables.unbind_state_vars(side_inputs)
        _, other_vars = variables.unbind_variables((pure_sublayer, pure_side_inputs))
        if other_vars:
            raise ValueError(
                "LayerStack can only thread StateVariables through its scan; found"
                f" variables of type {sorted({type(var).__name__ for var in other_vars})}"
                f" with labels {[var.label for var in other_vars]} (parameters must be"
                " inside the stacked layer, not side inputs)."
            )
        self._check_stacked_sizes(pure_sublayer)

        vars_by_label, shared_values, per_layer_values = self._split_state_vars(
            sublayer_vars, side_input_vars
        )

        sublayer_leaves, sublayer_treedef = jax.tree_util.tree_flatten(
            pure_sublayer, is_leaf=named_axes.is_namedarray
        )
        is_stacked = [
            isinstance(leaf, named_axes.NamedArrayBase) and self.stack_axis in leaf.named_shape
            for leaf in sublayer_leaves
        ]
        scanned_arrays = [
            leaf.untag_prefix(self.stack_axis).with_positional_prefix()
            for leaf, stacked in zip(sublayer_leaves, is_stacked)
            if stacked
        ]

        def one_layer(carry, sliced):
            layer_input, shared_states = carry
            array_slices, per_layer_states = sliced
            slices = iter(array_slices)
            layer = sublayer_treedef.unflatten(
                [
                    next(slices) if stacked else leaf
                    for leaf, stacked in zip(sublayer_leaves, is_stacked)
                ]
            )
            layer_output, new_states = layer.stateless_call(
                [*shared_states, *per_layer_states], layer_input, **pure_side_inputs
            )
            new_by_label = {state.label: state for state in new_states}
            new_shared = [new_by_label[state.label] for state in shared_states]
            # Canonical layout keeps the stacked output's leading axis positional.
            new_per_layer = [
                jax.tree_util.tree_map(
                    lambda leaf: leaf.with_positional_prefix(),
                    new_by_label[state.label],
                    is_leaf=named_axes.is_namedarray,
                )
                for state in per_layer_states
            ]
            # The carry must keep one pytree structure across steps, so undo
            # any axis reordering the layer did.
            new_carry = named_axes.order_like((layer_output, new_shared), carry)
            return new_carry, new_per_layer

        (output, final_shared), stacked_per_layer = jax.lax.scan(
            one_layer,
            init=(argument, shared_values),
            xs=(scanned_arrays, per_layer_values),
            length=self.stack_axis_size,
            # Tracing happens once either way; unrolling the compiled loop (as
            # penzai does) lets XLA fuse across layers and skips per-step
            # dynamic slicing, which wins for the moderate depths of most models.
            unroll=True,
        )
        for state in final_shared:
            vars_by_label[state.label].value = state.value
        for state in stacked_per_layer:
            vars_by_label[state.label].value = jax.tree_util.tree_map(
                lambda leaf: leaf.tag_prefix(self.stack_axis),
                state.value,
                is_leaf=named_axes.is_namedarray,
            )
        return output

    def key_for_field(self, field_name: str) -> Hashable:
        """Path keys of a stack's fields carry the stack axis (see `LayerStackGetAttrKey`)."""
        return LayerStackGetAttrKey(
            name=field_name, stack_axis=self.stack_axis, stack_axis_size=self.stack_axis_size
        )

    @classmethod
    def from_sublayer_builder(
        cls,
        builder: Callable[..., layer_base.Layer],
        stack_axis: named_axes.AxisName,
        stack_axis_size: int,
        init_base_rng: jax.Array | None,
        builder_kwargs: dict[str, Any],
    ) -> LayerStack:
        """Builds ``stack_axis_size`` independently initialized layers as one stack.

        The builder runs once under ``jax.vmap`` over split PRNG keys, so
        every array it derives from the key gets the stack axis and everything
        else is built once and shared.

        Args:
          builder: Builds one layer; called as ``builder(init_base_rng=key,
            **builder_kwargs)``. Every variable it returns must be created
            inside it and hold only named arrays; every other array that
            depends on the key must be a named array too.
          stack_axis: Name of the new stack axis.
          stack_axis_size: Number of layers.
          init_base_rng: Base PRNG key, split into one key per layer; or None
            to build with parameter slots (then the builder gets None).
          builder_kwargs: Extra keyword arguments for the builder.

        Returns:
          A `LayerStack` whose per-layer arrays and variables carry
          ``stack_axis``; state variables are marked ``PER_LAYER``.

        Raises:
          ValueError: If a variable holds non-named array data, or a state
            variable already has a stack behavior for ``stack_axis``.
        """
        structure_holder = []

        def build_one(key):
            sublayer = builder(init_base_rng=key, **builder_kwargs)
            unbound, frozen_vars = variables.unbind_variables(sublayer, freeze=True)
            var_leaves = jax.tree_util.tree_leaves(frozen_vars, is_leaf=named_axes.is_namedarray)
            if not all(isinstance(leaf, named_axes.NamedArrayBase) for leaf in var_leaves):
                raise ValueError(
                    "Variables built by a LayerStack builder must hold only NamedArrays (so"
                    " the stack axis can be added to them by name), but found"
                    f" {[type(leaf).__name__ for leaf in var_leaves]}."
                )
            leaves, treedef = jax.tree_util.tree_flatten(
                (unbound, frozen_vars), is_leaf=named_axes.is_namedarray
            )
            structure_holder.append(treedef)
            named = {
                index: leaf.with_positional_prefix()
                for index, leaf in enumerate(leaves)
                if isinstance(leaf, named_axes.NamedArrayBase)
            }
            unnamed = {
                index: leaf
                for index, leaf in enumerate(leaves)
                if not isinstance(leaf, named_axes.NamedArrayBase)
            }
            return named, unnamed

        keys = None if init_base_rng is None else jax.random.split(init_base_rng, stack_axis_size)
        named, unnamed = jax.vmap(build_one, out_axes=(0, None), axis_size=stack_axis_size)(keys)
        (treedef,) = structure_holder
        leaves = [
            named[index].tag_prefix(stack_axis) if index in named else unnamed[index]
            for index in range(treedef.num_leaves)
        ]
        stacked_unbound, stacked_values = treedef.unflatten(leaves)

        new_variables = []
        for frozen in stacked_values:
            if isinstance(frozen, variables.ParameterValue):
                new_variables.append(frozen.unfreeze_as_copy())
            elif isinstance(frozen, variables.StateVariableValue):
                if stack_axis in frozen.metadata.get(_METADATA_KEY, {}):
                    raise ValueError(
                        f"State variable {frozen.label!r} already has a LayerStack behavior"
                        f" for axis {stack_axis!r}; cannot stack it along it again."
                    )
                behaviors = {
                    **frozen.metadata.get(_METADATA_KEY, {}),
                    stack_axis: LayerStackVarBehavior.PER_LAYER,
                }
                new_variables.append(
                    variables.StateVariable(
                        value=frozen.value,
                        label=frozen.label,
                        metadata={**frozen.metadata, _METADATA_KEY: behaviors},
                    )
                )
            else:
                raise ValueError(
                    f"LayerStack cannot stack variables of type {type(frozen).__name__}"
                    f" (label {frozen.label!r})."
                )
        return cls(
            stacked_sublayers=variables.bind_variables(stacked_unbound, new_variables),
            stack_axis=stack_axis,
            stack_axis_size=stack_axis_size,
        )


def layerstack_axes_from_keypath(keypath: tuple[Any, ...]) -> dict[named_axes.AxisName, int]:
    """The stack axes (name to size) that enclose the subtree at ``keypath``.

    A model pass that inserts a new variable somewhere inside a `LayerStack`
    must give it those axes (for a per-layer value) and a matching
    ``"layerstack_axes"`` metadata entry; this recovers them from the path.

    Args:
      keypath: A JAX key path into a model, e.g. a key of
        ``Selection.selected_by_path``.

    Returns:
      ``{stack_axis: stack_axis_size}`` for every `LayerStack` the path goes
      through (empty if none).
    """
    return {
        key.stack_axis: key.stack_axis_size
        for key in keypath
        if isinstance(key, LayerStackGetAttrKey)
    }
