"""Temperature sampling from a `KVCachingTransformerLM`, one token per step.

The loop itself runs in Python (one model call per generated token), which
keeps it easy to read and to adapt (stop conditions, constrained sampling,
streaming). Each model call is compiled with `variable_jit`, so after the
first two calls (the prompt and the first single token) every step reuses one
compiled program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pz_flax.core import named_axes
from pz_flax.core import variables
from pz_flax.models.transformer import sampling_mode


@variables.variable_jit
def _run_model(model: sampling_mode.KVCachingTransformerLM, tokens: named_axes.NamedArray):
    return model(tokens)


def _last_real_token_logits(
    logits: named_axes.NamedArray, prompt: named_axes.NamedArray, pad_id: int
) -> named_axes.NamedArray:
    """The logits at each sequence's last non-padding prompt token."""

    def last_real_index(is_real):
        return jnp.argmax(jnp.where(is_real, jnp.arange(is_real.shape[0]), -1))

    last = named_axes.nmap(last_real_index)((prompt != pad_id).untag("seq"))
    return named_axes.nmap(lambda row, index: row[index])(logits.untag("seq"), last)


def temperature_sample_pyloop(
    model: sampling_mode.KVCachingTransformerLM,
    prompt: named_axes.NamedArray,
    rng: jax.Array,
    temperature: float = 1.0,
    max_sampling_steps: int | None = None,
) -> named_axes.NamedArray:
    """Samples a continuation of ``prompt`` for every sequence in the batch.

    The model's caches are advanced in place (the prompt and all sampled
    tokens but the last are written to them), so a second call continues
    where the first stopped.

    Args:
      model: The cached-decoding model; its caches must have room for the
        prompt.
      prompt: Token ids with the model's batch axes plus ``"seq"``; every
        sequence needs at least one non-padding token (usually beginning of
        sequence). Left padding is allowed.
      rng: PRNG key for sampling.
      temperature: Softmax temperature; 0 means greedy (argmax) decoding.
      max_sampling_steps: Maximum number of tokens to sample; defaults to
        ``model.cache_len``. Sampling also stops once the cache is full.

    Returns:
      The sampled tokens, with the batch axes plus ``"seq"`` of length the
      number of sampled tokens (the prompt is not included).

    Raises:
      ValueError: If ``temperature`` is negative or ``max_sampling_steps`` is
        not positive.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if max_sampling_steps is None:
        max_sampling_steps = model.cache_len
    if max_sampling_steps < 1:
        raise ValueError(f"max_sampling_steps must be positive, got {max_sampling_steps}.")

    next_logits = _last_real_token_logits(_run_model(model, prompt), prompt, model.pad_id)
    sampled = []
    while True:
        rng, step_key = jax.random.split(rng)
        if temperature == 0:
            next_token = named_axes.nmap(jnp.argmax)(next_logits.untag("vocabulary"))
        else:
            keys = named_axes.random_split(step_key, model.batch_axes)
            next_token = named_axes.nmap(jax.random.categorical)(
                keys, next_logits.untag("vocabulary") / temperature
            )
        next_token = next_token.astype(jnp.int32)
        sampled.append(next_token)
        cache_full = int(model.cache_end_index.value) >= model.cache_len
        if cache_full or len(sampled) >= max_sampling_steps:
            break
        step_logits = _run_model(model, named_axes.nmap(lambda t: t[None])(next_token).tag("seq"))
        next_logits = named_axes.nmap(lambda row: row[0])(step_logits.untag("seq"))
    return named_axes.stack(sampled, "seq")
