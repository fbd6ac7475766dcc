"""Reading PyTorch ``transformers`` models (the ``huggingface`` extra).

The converters import this module only when called, so pz_flax never needs PyTorch or
``transformers`` unless a Hugging Face model is actually converted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_INSTALL_HINT = "install the extra with `pip install 'pz_flax[huggingface]'`"

# Configuration entries that never change what the converted model computes.
_IGNORED_CONFIG_ATTRIBUTES = frozenset(
    {
        "max_position_embeddings",
        "torch_dtype",
        "dtype",
        "architectures",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "_attn_implementation_autoset",
        "_name_or_path",
        "transformers_version",
        "use_cache",
        "initializer_range",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)

# The configuration entries `llamalike_common.llamalike_from_huggingface_model` reads.
LLAMALIKE_CONFIG_ATTRIBUTES = frozenset(
    {
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_hidden_layers",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_parameters",
        "vocab_size",
    }
)


def import_transformers() -> Any:
    """Imports ``transformers``, or explains how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeError(
            f"Converting a Hugging Face model needs `transformers` and `torch`: {_INSTALL_HINT}."
        ) from exc
    return transformers


def check_model_and_config(
    model: Any, class_name: str, config_class_name: str, handled: Iterable[str]
) -> None:
    """Rejects models of another class, or whose configuration the conversion ignores.

    Every configuration entry must be handled by the conversion, irrelevant to the
    computation, or equal to the default of ``config_class_name`` (whose defaults are the
    architecture the conversion implements).

    Args:
      model: The model to convert.
      class_name: The ``transformers`` class the converter expects.
      config_class_name: Its configuration class.
      handled: Configuration entries the conversion reads.

    Raises:
      RuntimeError: If ``transformers`` is not installed.
      ValueError: If the model is of another class or has unsupported settings (all are
        named).
    """
    transformers = import_transformers()
    expected_class = getattr(transformers, class_name)
    if type(model) is not expected_class:
        raise ValueError(
            f"Expected a transformers.{class_name}, but got {type(model).__module__}."
            f"{type(model).__qualname__}."
        )
    defaults = getattr(transformers, config_class_name)().to_dict()
    accepted = _IGNORED_CONFIG_ATTRIBUTES | set(handled)
    unsupported = {
        key: value
        for key, value in model.config.to_dict().items()
        if key not in accepted and not (key in defaults and defaults[key] == value)
    }
    if unsupported:
        raise ValueError(
            f"Converting a {class_name} does not support these configuration settings:"
            f" {unsupported!r}."
        )


def parameter_dtype(model: Any) -> np.dtype:
    """The JAX dtype of the model's parameters (float32 or bfloat16)."""
    dtypes = {"torch.float32": jnp.float32, "torch.bfloat16": jnp.bfloat16}
    name = str(model.dtype)
    if name not in dtypes:
        raise ValueError(
            f"Hugging Face models can be converted from float32 or bfloat16, not {name}."
        )
    return np.dtype(dtypes[name])


def head_dim(hf_config: Any) -> int:
    """Per-head size: ``head_dim`` when the configuration sets one, else hidden/heads."""
    explicit = getattr(hf_config, "head_dim", None)
    return explicit or hf_config.hidden_size // hf_config.num_attention_heads


def rope_setting(hf_config: Any, name: str) -> Any:
    """A RoPE setting, from the flat attribute or from ``rope_parameters``.

    Recent ``transformers`` releases moved RoPE settings (``rope_theta``,
    ``partial_rotary_factor``) into a ``rope_parameters`` dict; older ones keep flat
    attributes.

    Raises:
      ValueError: If the setting is in neither place, or ``rope_parameters`` asks for a
        RoPE scaling type other than the default (which the converted model lacks).
    """
    rope_parameters = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"RoPE scaling of type {rope_type!r} is not supported.")
    value = getattr(hf_config, name, None)
    if value is None:
        value = rope_parameters.get(name)
    if value is None:
        raise ValueError(f"The configuration sets no {name!r}.")
    return value


def rope_theta(hf_config: Any) -> float:
    """The RoPE wavelength of a Hugging Face configuration."""
    return float(rope_setting(hf_config, "rope_theta"))


def state_dict_as_jax(model: Any) -> dict[str, jax.Array]:
    """The model's weights as JAX arrays (through DLPack, bfloat16 included)."""
    return {
        key: jnp.asarray(jax.dlpack.from_dlpack(tensor.detach().contiguous()))
        for key, tensor in model.state_dict().items()
    }
