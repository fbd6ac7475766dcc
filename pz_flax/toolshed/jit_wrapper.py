"""A layer wrapper that compiles its body with ``jax.jit`` on every call.

Meant for notebooks: wrap a model once (``Jitted(model)``) and keep calling, selecting into
and editing it as usual, with each call compiled. The body stays an ordinary sublayer, so
``pz.select(jitted).at(lambda j: j.body)...`` edits it; because the compiled function is
keyed on the body's pytree structure, an edit simply compiles a new version on the next call.

State variables inside the body (caches, counters, random streams) are threaded through the
compiled call with ``pz.variable_jit`` and updated in place afterwards, so a ``Jitted``
model behaves exactly like the un-jitted one, only faster.
"""

from __future__ import annotations

from typing import Any

from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.nn import layer as layer_base


@variables.variable_jit
def _call_compiled(body: layer_base.Layer, argument: Any, side_inputs: dict[str, Any]) -> Any:
    # One module-level jitted function (not one per wrapper) so that equal bodies share
    # their compiled versions.
    return body(argument, **side_inputs)


@struct.pytree_dataclass
class Jitted(layer_base.Layer):
    """Runs ``body`` under ``jax.jit``, with its state variables kept up to date.

    Attributes:
        body: The wrapped layer. Same inputs, outputs and side inputs as the wrapper.
    """

    body: layer_base.Layer

    def __call__(self, argument: Any, /, **side_inputs: Any) -> Any:
        """Calls the compiled body on ``argument`` with the same side inputs."""
        return _call_compiled(self.body, argument, side_inputs)
