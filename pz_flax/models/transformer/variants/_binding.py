"""Putting converted weights into a freshly built transformer (shared by every variant).

Every converter (Gemma checkpoints, Hugging Face models) follows the same recipe: build the
model structure with parameter slots (``init_base_rng=None``), translate each source weight
into a named array under its pz_flax label, and bind the values into the slots. The
translated values are checked against the shapes and dtypes the builder would have
initialized, so a checkpoint that does not fit the configuration fails with the label and
both shapes, instead of somewhere inside the first forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from pz_flax.core import named_axes
from pz_flax.core import variables
from pz_flax.nn import parameters


def _expected_parameters(build: Callable[[jax.Array | None], Any]) -> dict[str, Any]:
    """Label -> abstract named value of every parameter ``build`` would initialize."""

    def initial_values():
        # Unbinding inside the trace keeps a shared parameter (tied embeddings) one entry.
        _, params = variables.unbind_params(build(jax.random.key(0)))
        return {param.label: param.value for param in params}

    return jax.eval_shape(initial_values)


def _describe(value: Any) -> str:
    return f"{np.dtype(value.dtype).name}{dict(value.named_shape)}"


def bind_converted_parameters(
    build: Callable[[jax.Array | None], Any],
    label_prefix: str,
    shared: Mapping[str, named_axes.NamedArray],
    per_block: Sequence[Mapping[str, named_axes.NamedArray]],
    use_layer_stack: bool,
    source: str,
) -> Any:
    """Builds a model with ``build`` and fills its parameters with converted values.

    Args:
      build: Builds the model from a base PRNG key (None: parameter slots).
      label_prefix: Prefix of every parameter label (the model's ``name``).
      shared: Values of the parameters outside the blocks, keyed by label without
        the prefix (e.g. ``"embedder.embeddings"``).
      per_block: For each block in order, its values keyed by label without the
        block part (e.g. ``"attention/query.weights"``).
      use_layer_stack: Whether the blocks are one `LayerStack` along ``"blocks"``
        (their values are stacked) or written out as ``block_{i}``.
      source: What the values were converted from, for error messages.

    Returns:
      The model, with every parameter bound.

    Raises:
      ValueError: If a converted value's axes, sizes or dtype differ from what
        the configuration implies, or a parameter has no value.
    """
    values = dict(shared)
    if use_layer_stack:
        for key in per_block[0]:
            values[f"blocks/{key}"] = named_axes.stack(
                [block[key] for block in per_block], "blocks"
            )
    else:
        for index, block in enumerate(per_block):
            values.update({f"block_{index}/{key}": value for key, value in block.items()})
    values = {f"{label_prefix}/{key}": value for key, value in values.items()}

    expected = _expected_parameters(build)
    missing = sorted(set(expected) - set(values))
    if missing:
        raise ValueError(f"{source}: no value for the parameters {missing}.")
    for label, value in values.items():
        want = expected.get(label)
        if want is None:
            raise ValueError(f"{source}: converted a value for {label!r}, which the model lacks.")
        if dict(value.named_shape) != dict(want.named_shape) or value.dtype != want.dtype:
            raise ValueError(
                f"{source}: parameter {label!r} should be {_describe(want)} for this"
                f" configuration, but the converted value is {_describe(value)}."
            )

    model = variables.bind_variables(
        build(None),
        [variables.Parameter(value=value, label=label) for label, value in values.items()],
    )
    parameters.assert_no_parameter_slots(model)
    return model
