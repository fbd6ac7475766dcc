"""Tests for pz_flax.core.random_stream."""

import jax
import numpy as np
import penzai.core.random_stream as pz_random_stream_oracle
import penzai.core.variables as pz_variables_oracle
from flax import nnx

from pz_flax.core import random_stream
from pz_flax.core import variables


def key_data(key):
    return np.asarray(jax.random.key_data(key)).tolist()


def test_from_base_key_starts_at_zero_with_the_default_label():
    stream = random_stream.RandomStream.from_base_key(jax.random.key(0))
    assert isinstance(stream.offset, variables.StateVariable)
    assert stream.offset.label == "random_stream_offset"
    assert int(stream.offset.value) == 0
    labelled = random_stream.RandomStream.from_base_key(jax.random.key(0), offset_label="drop")
    assert labelled.offset.get_slot() == variables.StateVariableSlot("drop")


def test_next_key_folds_in_the_offset_and_advances_it():
    base = jax.random.key(3)
    stream = random_stream.RandomStream.from_base_key(base)
    keys = [stream.next_key() for _ in range(3)]
    assert int(stream.offset.value) == 3
    assert [key_data(k) for k in keys] == [key_data(jax.random.fold_in(base, i)) for i in range(3)]
    assert len({tuple(key_data(k)) for k in keys}) == 3


def test_key_sequence_matches_penzai():
    def draw(stream_module, var_module):
        stream = stream_module.RandomStream.from_base_key(jax.random.key(42))

        @var_module.variable_jit
        def two_samples(stream):
            return jax.random.normal(stream.next_key(), (2,)), jax.random.bits(stream.next_key())

        eager = key_data(stream.next_key())
        jitted = [np.asarray(x).tolist() for x in two_samples(stream)]
        return eager, jitted, int(stream.offset.value)

    assert draw(random_stream, variables) == draw(pz_random_stream_oracle, pz_variables_oracle)


def test_stream_offset_is_nnx_state_and_advances_under_nnx_jit():
    stream = random_stream.RandomStream.from_base_key(jax.random.key(0))
    state = nnx.state(stream, variables.StateVariable)
    assert [path for path, _ in nnx.to_flat_state(state)] == [("offset",)]

    @nnx.jit
    def sample(stream):
        return jax.random.uniform(stream.next_key())

    first, second = float(sample(stream)), float(sample(stream))
    assert first != second
    assert int(stream.offset.value) == 2


def test_unbinding_the_offset_leaves_a_static_slotted_stream():
    stream = random_stream.RandomStream.from_base_key(jax.random.key(0))
    slotted, (offset,) = variables.unbind_state_vars(stream, freeze=True)
    assert slotted.offset == variables.StateVariableSlot("random_stream_offset")
    assert isinstance(offset, variables.StateVariableValue)
    rebound = variables.bind_variables(slotted, [offset], unfreeze_as_copy=True)
    rebound.next_key()
    assert int(rebound.offset.value) == 1 and int(stream.offset.value) == 0
