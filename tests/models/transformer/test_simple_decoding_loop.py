"""Tests for pz_flax.models.transformer.simple_decoding_loop."""

import jax
import numpy as np
import pytest

from pz_flax.core import named_axes
from pz_flax.models.transformer import sampling_mode
from pz_flax.models.transformer import simple_decoder
from pz_flax.models.transformer import simple_decoding_loop
from tests.models.transformer import helpers


@pytest.fixture(scope="module")
def model():
    return simple_decoder.build_simple_decoder(helpers.TINY_CONFIG, jax.random.key(0))


def _prompt():
    return named_axes.wrap(np.array([[3, 4, 5], [0, 6, 7]], np.int32), "batch", "seq")


def test_greedy_decoding_follows_full_forward_argmax(model):
    cached = sampling_mode.KVCachingTransformerLM.from_uncached(model, 8, {"batch": 2})
    sampled = simple_decoding_loop.temperature_sample_pyloop(
        cached, _prompt(), jax.random.key(0), temperature=0.0, max_sampling_steps=4
    )
    assert dict(sampled.named_shape) == {"batch": 2, "seq": 4}
    assert int(cached.cache_end_index.value) == 3 + 3
    prompt = np.asarray(_prompt().unwrap("batch", "seq"))
    tokens = np.asarray(sampled.unwrap("batch", "seq"))
    # Row 0 has no padding, so its full forward pass needs no position adjustment.
    sequence = np.concatenate([prompt[0], tokens[0]])[None]
    logits = helpers.full_logits(model, named_axes.wrap(sequence, "batch", "seq"))
    np.testing.assert_array_equal(tokens[0], logits[0, 2:6].argmax(-1))


def test_sampling_is_reproducible_and_stops_when_cache_is_full(model):
    def sample(seed):
        cached = sampling_mode.KVCachingTransformerLM.from_uncached(model, 8, {"batch": 2})
        out = simple_decoding_loop.temperature_sample_pyloop(
            cached, _prompt(), jax.random.key(seed), temperature=1.5
        )
        return cached, np.asarray(out.unwrap("batch", "seq"))

    cached, first = sample(1)
    _, again = sample(1)
    np.testing.assert_array_equal(first, again)
    # Three prompt tokens and five fed-back samples fill the cache of 8; the sixth sample
    # is returned but never written.
    assert first.shape == (2, 6)
    assert int(cached.cache_end_index.value) == 8
    assert ((first >= 0) & (first < helpers.TINY_CONFIG.vocab_size)).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"max_sampling_steps": 0}, "max_sampling_steps must be positive"),
    ],
)
def test_argument_errors(model, kwargs, message):
    cached = sampling_mode.KVCachingTransformerLM.from_uncached(model, 8, {"batch": 2})
    with pytest.raises(ValueError, match=message):
        simple_decoding_loop.temperature_sample_pyloop(
            cached, _prompt(), jax.random.key(0), **kwargs
        )
