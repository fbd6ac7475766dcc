"""Shared helpers for the transformer tests: a tiny configuration, tokens and full-pass logits."""

import dataclasses

import jax
import numpy as np

from pz_flax.core import named_axes
from pz_flax.core import variables
from pz_flax.models.transformer import simple_decoder

# Small enough to compile and run in a fraction of a second, yet with several heads and blocks
# so that head and layer-stack handling are exercised.
TINY_CONFIG = simple_decoder.SimpleDecoderConfig(
    vocab_size=13,
    embedding_dim=16,
    num_heads=2,
    projection_dim=8,
    mlp_hidden_dim=24,
    num_blocks=2,
)


def tiny_config(**overrides) -> simple_decoder.SimpleDecoderConfig:
    """``TINY_CONFIG`` with some fields replaced."""
    return dataclasses.replace(TINY_CONFIG, **overrides)


def random_tokens(batch: int = 2, seq: int = 6, seed: int = 1) -> named_axes.NamedArray:
    """Random non-padding token ids (never 0) with axes ``batch`` and ``seq``."""
    data = jax.random.randint(jax.random.key(seed), (batch, seq), 1, TINY_CONFIG.vocab_size)
    return named_axes.wrap(data, "batch", "seq")


@jax.jit
def _forward(model, tokens):
    return model(tokens)


def full_logits(model, tokens: named_axes.NamedArray) -> np.ndarray:
    """Logits of one uncached forward pass, as a ``(batch, seq, vocabulary)`` array.

    One jitted function serves every test module, so equal model structures compile once.
    """
    out = _forward(variables.freeze_params(model), tokens)
    return np.asarray(out.unwrap("batch", "seq", "vocabulary"))
