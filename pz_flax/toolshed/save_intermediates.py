"""Recording the values (or just the shapes) that flow between a model's layers.

`SaveIntermediate` is an identity layer that keeps the last value it saw in a state variable;
`SaveIntermediateShape` keeps only that value's structure (``pz.chk.as_array_structure``),
which costs no memory and survives ``jax.jit``. `saving_all_intermediates` returns a copy of a
model with one of them between every pair of consecutive layers, at every depth, so that after
a single call every activation of the model can be read off the copy.

Each value is recorded once: a recorder goes between sublayers of a sequential group (not
also inside its neighbours), none is put after an ``Identity`` (its output is its input),
and a non-sequential layer is surrounded by a new ``Sequential`` holding a recorder on each
side. Recording every activation of a large model uses a lot of memory; this is a tool for
small models and for parts of big ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pz_flax.core import selectors
from pz_flax.core import shapecheck
from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.nn import grouping
from pz_flax.nn import layer as layer_base

_GROUP_TYPES = grouping.Sequential | grouping.NamedGroup | grouping.CheckedSequential


@struct.pytree_dataclass
class SaveIntermediate(layer_base.Layer):
    """Passes its input through, keeping it in ``saved.value``.

    Attributes:
        saved: The variable holding the last value seen (None before the first call).
    """

    saved: variables.StateVariable[Any | None] = dataclasses.field(
        default_factory=lambda: variables.StateVariable(None)
    )

    def __call__(self, value: Any, /, **_unused_side_inputs: Any) -> Any:
        """Records ``value`` and returns it unchanged."""
        self.saved.value = value
        return value


@struct.pytree_dataclass
class SaveIntermediateShape(layer_base.Layer):
    """Passes its input through, keeping its structure (shapes, axis names, dtypes).

    Attributes:
        saved: The variable holding the last structure seen (None before the first call).
            The structure has no array leaves, so it leaves a jitted call as static data.
    """

    saved: variables.StateVariable[Any | None] = dataclasses.field(
        default_factory=lambda: variables.StateVariable(None)
    )

    def __call__(self, value: Any, /, **_unused_side_inputs: Any) -> Any:
        """Records the structure of ``value`` and returns ``value`` unchanged."""
        self.saved.value = shapecheck.as_array_structure(value)
        return value


def saving_all_intermediates(
    model: layer_base.Layer,
    intermediates_group: str | None = "intermediates",
    shapes_only: bool = False,
) -> layer_base.Layer:
    """Returns a copy of ``model`` that records the value before and after every layer.

    Args:
        model: The model (or any layer) to instrument; it is not modified.
        intermediates_group: Group name for the recorders' variable labels
            (``pz.scoped_auto_state_var_labels``), so that they are easy to find and unbind
            together; None gives them unique automatic labels instead.
        shapes_only: Record `SaveIntermediateShape` structures instead of values.

    Returns:
        The instrumented copy. Call it like ``model``, then read each recorder's
        ``saved.value``.
    """
    recorder_type = SaveIntermediateShape if shapes_only else SaveIntermediate

    def instrument_group(group: layer_base.Layer, record_ends: bool) -> layer_base.Layer:
        """Recorders between a group's sublayers; also before the first and after the last
        when ``record_ends`` (i.e. when nothing outside the group records them already)."""
        sublayers = group.sublayers
        new_sublayers = [recorder_type()] if record_ends else []
        for index, sublayer in enumerate(sublayers):
            new_sublayers.append(instrument_inside(sublayer))
            is_last = index == len(sublayers) - 1
            if not isinstance(sublayer, grouping.Identity) and (record_ends or not is_last):
                new_sublayers.append(recorder_type())
        return dataclasses.replace(group, sublayers=new_sublayers)

    def instrument_inside(node: layer_base.Layer) -> layer_base.Layer:
        """Instruments the inside of ``node``, whose input and output are recorded already."""
        if isinstance(node, _GROUP_TYPES):
            return instrument_group(node, record_ends=False)
        return (
            selectors.select(node)
            .at_children()
            .at_instances_of(layer_base.Layer)
            .apply(instrument_around)
        )

    def instrument_around(node: layer_base.Layer) -> layer_base.Layer:
        """Instruments ``node`` and records its input and output too."""
        if isinstance(node, _GROUP_TYPES):
            return instrument_group(node, record_ends=True)
        if isinstance(node, grouping.Identity):
            return grouping.Sequential([recorder_type(), instrument_inside(node)])
        return grouping.Sequential([recorder_type(), instrument_inside(node), recorder_type()])

    if intermediates_group is None:
        return instrument_around(model)
    with variables.scoped_auto_state_var_labels(intermediates_group):
        return instrument_around(model)
