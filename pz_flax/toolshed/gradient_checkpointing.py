"""Gradient checkpointing (rematerialization) for one layer of a model.

Wrapping a block in `Checkpointed` makes reverse-mode differentiation recompute the block's
intermediate activations instead of storing them: memory for time. The usual way to apply it
is by selection, e.g. to every attention block::

    pz.select(model).at_instances_of(pz.nn.Attention).apply(gradient_checkpointing.Checkpointed)

``jax.checkpoint`` needs a pure function, while a layer may hold state variables (a KV cache,
a counter) or receive them in its side inputs (a random stream). The wrapper therefore
freezes the body's parameters (they are read-only inside a forward pass), takes every state
variable out as a frozen value, runs the body as a pure function of those values under
``jax.checkpoint``, and writes the final values back into the original variables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.nn import layer as layer_base


def _pure_call(
    body: layer_base.Layer,
    state_values: tuple[variables.StateVariableValue, ...],
    argument: Any,
    side_inputs: dict[str, Any],
) -> tuple[Any, tuple[variables.StateVariableValue, ...]]:
    return body.stateless_call(state_values, argument, **side_inputs)


@struct.pytree_dataclass
class Checkpointed(layer_base.Layer):
    """Runs ``body`` under ``jax.checkpoint``; otherwise indistinguishable from it.

    Attributes:
        body: The layer whose activations are recomputed in the backward pass.
        policy: Which intermediate values may be saved anyway, as for ``jax.checkpoint``'s
            ``policy`` (for instance ``jax.checkpoint_policies.dots_saveable``); None saves
            nothing.
    """

    body: layer_base.Layer
    policy: Callable[..., bool] | None = None

    def __call__(self, argument: Any, /, **side_inputs: Any) -> Any:
        """Calls the body on ``argument`` with rematerialized gradients."""
        (pure_body, pure_side_inputs), state_vars = variables.unbind_state_vars(
            (variables.freeze_params(self.body), side_inputs)
        )
        checkpointed = jax.checkpoint(_pure_call, policy=self.policy)
        output, final_values = checkpointed(
            pure_body, tuple(var.freeze() for var in state_vars), argument, pure_side_inputs
        )
        for var, final_value in zip(state_vars, final_values, strict=True):
            var.update(final_value)
        return output
