"""The Mistral architecture: a `llamalike_common` transformer, converted from Hugging Face.

Mistral models are Llama-like with sliding-window attention. This module adds the
conversion of ``transformers.MistralForCausalLM`` models (the ``huggingface`` extra). The
sliding window is applied by the causal mask, with and without a key/value cache.
"""

from __future__ import annotations

from typing import Any

from pz_flax.models.transformer import model_parts
from pz_flax.models.transformer.variants import _huggingface
from pz_flax.models.transformer.variants import llamalike_common

MistralForCausalLM = Any


def mistral_from_huggingface_model(
    model: MistralForCausalLM,
    upcast_activations_to_float32: bool = False,
    use_layer_stack: bool = False,
) -> model_parts.TransformerLM:
    """Converts a Hugging Face ``MistralForCausalLM`` to a pz_flax `TransformerLM`.

    Args:
      model: The PyTorch model (float32 or bfloat16 parameters).
      upcast_activations_to_float32: Run activations (and caches) in float32.
      use_layer_stack: Stack the decoder blocks in a `LayerStack`.

    Returns:
      The converted model.

    Raises:
      RuntimeError: If ``transformers`` is not installed.
      ValueError: If ``model`` is not a ``MistralForCausalLM``, or its configuration
        changes a setting the conversion does not implement (those are named).
    """
    _huggingface.check_model_and_config(
        model,
        "MistralForCausalLM",
        "MistralConfig",
        _huggingface.LLAMALIKE_CONFIG_ATTRIBUTES | {"sliding_window"},
    )
    return llamalike_common.llamalike_from_huggingface_model(
        model,
        upcast_activations_to_float32=upcast_activations_to_float32,
        use_layer_stack=use_layer_stack,
    )
