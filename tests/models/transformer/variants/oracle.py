"""Running the same transformer in penzai 0.2.5 and in pz_flax, to compare their numbers.

Both libraries initialize a parameter from the base key and its label alone, so building
the same configuration with the same key gives the same weights in both; every comparison
below therefore starts from independently built models, not from copied weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz as penzai_pz
from penzai.models.transformer import sampling_mode as penzai_sampling_mode
from penzai.models.transformer import simple_decoding_loop as penzai_decoding_loop

from pz_flax import pz
from pz_flax.models.transformer import sampling_mode
from pz_flax.models.transformer import simple_decoding_loop

# Float32 rounding: the two libraries contract in different orders (pz_flax skips vmaps
# for elementwise ops), so equal models agree to a few ulps of the logits' magnitude.
ATOL = 2e-5
RTOL = 2e-5


def penzai_twin(config_class, config):
    """The same configuration dataclass, rebuilt as its penzai counterpart."""
    fields = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    return config_class(**fields)


def tokens(library, batch: int = 2, seq: int = 7, vocab_size: int = 17, seed: int = 3):
    """Random non-padding token ids (never 0) with axes ``batch``, ``seq``."""
    data = jax.random.randint(jax.random.key(seed), (batch, seq), 1, vocab_size)
    return library.nx.wrap(data).tag("batch", "seq")


@jax.jit
def _pz_flax_forward(model, token_ids):
    return model(token_ids)


@jax.jit
def _penzai_forward(model, token_ids):
    return model(token_ids)


def logits(model, token_ids) -> np.ndarray:
    """Uncached ``(batch, seq, vocabulary)`` logits of a pz_flax model."""
    out = _pz_flax_forward(pz.freeze_params(model), token_ids)
    return np.asarray(out.unwrap("batch", "seq", "vocabulary"), np.float32)


def penzai_logits(model, token_ids) -> np.ndarray:
    """Uncached ``(batch, seq, vocabulary)`` logits of a penzai model."""
    out = _penzai_forward(penzai_pz.freeze_params(model), token_ids)
    return np.asarray(out.unwrap("batch", "seq", "vocabulary"), np.float32)


@pz.variable_jit
def _pz_flax_cached_call(model, token_ids):
    return model(token_ids)


@penzai_pz.variable_jit
def _penzai_cached_call(model, token_ids):
    return model(token_ids)


def _split_calls(token_ids, library, prompt_len: int):
    seq = token_ids.named_shape["seq"]
    pieces = [token_ids[{"seq": library.slice[:prompt_len]}]]
    pieces += [token_ids[{"seq": library.slice[i : i + 1]}] for i in range(prompt_len, seq)]
    return pieces


def cached_logits(model, token_ids, cache_len: int = 10, prompt_len: int = 3) -> np.ndarray:
    """Logits of a pz_flax model fed a prompt, then one token per call, with KV caches."""
    cached = sampling_mode.KVCachingTransformerLM.from_uncached(model, cache_len, {"batch": 2})
    pieces = [_pz_flax_cached_call(cached, p) for p in _split_calls(token_ids, pz, prompt_len)]
    out = pz.nx.concatenate(pieces, "seq")
    return np.asarray(out.unwrap("batch", "seq", "vocabulary"), np.float32)


def penzai_cached_logits(model, token_ids, cache_len: int = 10, prompt_len: int = 3):
    """`cached_logits` for a penzai model."""
    cached = penzai_sampling_mode.KVCachingTransformerLM.from_uncached(
        model, cache_len, {"batch": 2}
    )
    calls = _split_calls(token_ids, penzai_pz, prompt_len)
    out = penzai_pz.nx.concatenate([_penzai_cached_call(cached, p) for p in calls], "seq")
    return np.asarray(out.unwrap("batch", "seq", "vocabulary"), np.float32)


def sampled_tokens(model, prompt, steps: int = 4, seed: int = 9) -> np.ndarray:
    """Tokens sampled by pz_flax's decoding loop at temperature 1."""
    cached = sampling_mode.KVCachingTransformerLM.from_uncached(model, 12, {"batch": 2})
    out = simple_decoding_loop.temperature_sample_pyloop(
        cached, prompt, jax.random.key(seed), max_sampling_steps=steps
    )
    return np.asarray(out.unwrap("batch", "seq"))


def penzai_sampled_tokens(model, prompt, steps: int = 4, seed: int = 9) -> np.ndarray:
    """Tokens sampled by penzai's decoding loop at temperature 1."""
    cached = penzai_sampling_mode.KVCachingTransformerLM.from_uncached(model, 12, {"batch": 2})
    out = penzai_decoding_loop.temperature_sample_pyloop(
        cached, prompt, jax.random.key(seed), max_sampling_steps=steps
    )
    return np.asarray(out.unwrap("batch", "seq"))


def assert_same_parameters(model, penzai_model) -> None:
    """Same labels, axis names and values (bit for bit) in both models."""
    _, ours = pz.unbind_params(model)
    _, theirs = penzai_pz.unbind_params(penzai_model)
    ours = {p.label: p.value for p in ours}
    theirs = {p.label: p.value for p in theirs}
    assert sorted(ours) == sorted(theirs)
    for label, value in ours.items():
        assert dict(value.named_shape) == dict(theirs[label].named_shape), label
        names = tuple(value.named_shape)
        np.testing.assert_array_equal(
            np.asarray(value.unwrap(*names).astype(jnp.float32)),
            np.asarray(theirs[label].unwrap(*names).astype(jnp.float32)),
            err_msg=label,
        )
