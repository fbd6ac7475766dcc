"""Tiny, randomly initialized Hugging Face models built locally (no download).

Tests that use them skip when the ``huggingface`` extra (``transformers``, ``torch``) is
not installed; CI installs it.
"""

from __future__ import annotations

import numpy as np
import pytest

from pz_flax import pz
from tests.models.transformer.variants import oracle

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

VOCAB = 23


def build(model_class: str, config_class: str, dtype=None, **config):
    """A ``transformers.<model_class>`` with random weights, in eager attention mode."""
    torch.manual_seed(0)
    hf_config = getattr(transformers, config_class)(vocab_size=VOCAB, **config)
    hf_config._attn_implementation = "eager"
    model = getattr(transformers, model_class)(hf_config).eval()
    # Spread the weights: the default initializer's 0.02 scale makes every logit ~0.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model if dtype is None else model.to(dtype)


def token_ids(batch: int = 2, seq: int = 7) -> np.ndarray:
    return np.random.default_rng(5).integers(1, VOCAB, (batch, seq))


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor(tokens)).logits
    return out.float().numpy()


def assert_logits_match(converted, model, tokens: np.ndarray | None = None, atol=1e-4):
    """The converted model's logits equal the PyTorch model's, full pass and cached."""
    tokens = token_ids() if tokens is None else tokens
    expected = torch_logits(model, tokens)
    named = pz.nx.wrap(tokens).tag("batch", "seq")
    np.testing.assert_allclose(oracle.logits(converted, named), expected, atol=atol, rtol=1e-4)
    np.testing.assert_allclose(
        oracle.cached_logits(converted, named, prompt_len=4), expected, atol=atol, rtol=1e-4
    )
