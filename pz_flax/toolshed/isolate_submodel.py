"""Cutting one layer out of a big model together with what it saw during a real call.

`call_and_extract_submodel` runs the whole model once with the selected layer replaced by
a recorder, and returns an `IsolatedSubmodel`: the layer itself (parameters frozen, state
variables replaced by slots), the argument and side inputs it actually received, the output
it produced, and its state before and after. The layer can then be studied, edited and
re-run on its own, reproducing its in-context behaviour without running the rest::

    output, final_values = isolated.submodel.stateless_call(
        isolated.initial_var_values, isolated.saved_arg, **isolated.saved_side_inputs
    )
"""

from __future__ import annotations

from typing import Any

from pz_flax.core import selectors
from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.nn import layer as layer_base


@struct.pytree_dataclass
class IsolatedSubmodel(struct.Struct):
    """One recorded call of a layer taken out of a larger model.

    Attributes:
        submodel: The selected layer, with parameters frozen and state variables replaced
            by slots, so that it is a pure function of ``initial_var_values``.
        saved_arg: The argument it received; variables in it (rare) are slots.
        saved_side_inputs: The side inputs it received; variables in them (a random stream,
            say) are slots.
        saved_output: What it returned.
        initial_var_values: Values of the unbound state variables when the call started.
        final_var_values: Their values when the call ended.
    """

    submodel: layer_base.Layer
    saved_arg: Any
    saved_side_inputs: dict[str, Any]
    saved_output: Any
    initial_var_values: tuple[variables.StateVariableValue, ...] | None
    final_var_values: tuple[variables.StateVariableValue, ...] | None


@struct.pytree_dataclass
class IsolationCapturer(layer_base.Layer):
    """Stands in for the selected layer during the recording call, running and recording it.

    Attributes:
        saved_calls: One `IsolatedSubmodel` per call, in call order.
        wrapped: The layer being recorded.
    """

    saved_calls: variables.StateVariable[list[IsolatedSubmodel]]
    wrapped: layer_base.Layer

    def __call__(self, argument: Any, /, **side_inputs: Any) -> Any:
        """Runs the wrapped layer on ``argument`` and records the call."""
        frozen_layer = variables.freeze_params(self.wrapped)
        (pure_layer, pure_arg, pure_side_inputs), state_vars = variables.unbind_variables(
            (frozen_layer, argument, side_inputs)
        )
        for var in state_vars:
            if not isinstance(var, variables.StateVariable):
                raise ValueError(
                    "Expected every variable seen by the isolated layer to be a Parameter or a"
                    f" StateVariable, but got {type(var).__name__} with label {var.label!r}."
                )
        initial_values = variables.freeze_variables(state_vars)
        output = frozen_layer(argument, **side_inputs)
        final_values = variables.freeze_variables(state_vars)
        self.saved_calls.value = [
            *self.saved_calls.value,
            IsolatedSubmodel(
                submodel=pure_layer,
                saved_arg=pure_arg,
                saved_side_inputs=pure_side_inputs,
                saved_output=output,
                initial_var_values=initial_values,
                final_var_values=final_values,
            ),
        ]
        return output


def call_and_extract_submodel(
    submodel_selection: selectors.Selection[layer_base.Layer],
    argument: Any,
    /,
    **side_inputs: Any,
) -> IsolatedSubmodel | list[IsolatedSubmodel]:
    """Calls the model a selection was made in, and isolates the selected layer.

    Args:
        submodel_selection: A selection, made in a model that is a layer, of exactly one
            sublayer.
        argument: The argument to call the whole model with.
        **side_inputs: The whole model's side inputs.

    Returns:
        The `IsolatedSubmodel` of the selected layer's call, or a list of them, in call
        order, if the model called it more than once. Parameters are frozen in all of them.

    Raises:
        ValueError: If the selection does not hold exactly one layer, or was not made in a
            layer.
    """
    if submodel_selection.count() != 1:
        raise ValueError(
            "submodel_selection must contain exactly one sublayer, but it selects"
            f" {submodel_selection.count()} subtrees."
        )
    selected = submodel_selection.get()
    if not isinstance(selected, layer_base.Layer):
        raise ValueError(
            f"submodel_selection must select a layer, but it selects a {type(selected).__name__}."
        )
    model = submodel_selection.deselect()
    if not isinstance(model, layer_base.Layer):
        raise ValueError(
            "The tree that submodel_selection was built from must be a layer, but it is a"
            f" {type(model).__name__}."
        )
    capturer = IsolationCapturer(saved_calls=variables.StateVariable([]), wrapped=selected)
    submodel_selection.set(capturer)(argument, **side_inputs)
    calls = capturer.saved_calls.value
    return calls[0] if len(calls) == 1 else calls
