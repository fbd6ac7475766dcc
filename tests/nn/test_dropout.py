"""Tests for pz_flax.nn.dropout, with penzai 0.2.5 as the differential oracle."""

import jax
import numpy as np
import pytest
from penzai import pz as penzai_pz

from pz_flax.core import named_axes
from pz_flax.core import random_stream
from pz_flax.core import variables
from pz_flax.nn import dropout
from pz_flax.nn import grouping

SHAPE = {"batch": 4, "seq": 5, "features": 6}


def _inputs():
    data = np.asarray(jax.random.normal(jax.random.key(0), tuple(SHAPE.values())))
    return named_axes.wrap(data, *SHAPE), penzai_pz.nx.wrap(data, *SHAPE)


@pytest.mark.parametrize("share", [(), ("seq",), ("batch", "features")])
def test_matches_penzai_with_same_stream(share):
    ours_in, theirs_in = _inputs()
    ours_stream = random_stream.RandomStream.from_base_key(jax.random.key(7))
    theirs_stream = penzai_pz.RandomStream.from_base_key(jax.random.key(7))
    ours_layer = dropout.StochasticDropout(0.4, share_across_axes=share)
    theirs_layer = penzai_pz.nn.StochasticDropout(0.4, share_across_axes=share)
    for _ in range(2):  # two calls: each draws a fresh key from the stream
        ours = ours_layer(ours_in, random_stream=ours_stream)
        theirs = theirs_layer(theirs_in, random_stream=theirs_stream)
        assert dict(ours.named_shape) == dict(theirs.named_shape)
        np.testing.assert_allclose(
            np.asarray(ours.unwrap(*SHAPE)), np.asarray(theirs.unwrap(*SHAPE)), rtol=1e-6
        )
    assert int(ours_stream.offset.value) == 2


def test_mask_is_shared_along_shared_axes_and_rescales():
    ours_in = named_axes.ones(SHAPE)
    stream = random_stream.RandomStream.from_base_key(jax.random.key(1))
    out = dropout.StochasticDropout(0.5, share_across_axes=("seq",))(ours_in, random_stream=stream)
    values = np.asarray(out.unwrap("batch", "seq", "features"))
    assert set(np.unique(values)) <= {0.0, 2.0}
    # Every "seq" slice sees the same mask.
    np.testing.assert_array_equal(values, np.broadcast_to(values[:, :1, :], values.shape))
    assert 0 < (values == 0).mean() < 1


def test_custom_stream_name_and_missing_stream_error():
    layer = dropout.StochasticDropout(0.1, random_stream_input_name="rng")
    ours_in, _ = _inputs()
    stream = random_stream.RandomStream.from_base_key(jax.random.key(1))
    assert dict(layer(ours_in, rng=stream).named_shape) == SHAPE
    with pytest.raises(KeyError, match=r"StochasticDropout.*'rng'.*random_stream"):
        layer(ours_in, random_stream=stream)


def test_disable_and_enable_round_trip():
    layer = dropout.StochasticDropout(0.3, share_across_axes=("seq",), random_stream_input_name="r")
    disabled = layer.disable()
    assert isinstance(disabled, dropout.DisabledDropout)
    assert isinstance(disabled, grouping.Identity)
    assert disabled.enable() == layer
    ours_in, _ = _inputs()
    # A disabled dropout needs no stream and leaves its input alone.
    assert disabled(ours_in) is ours_in


def test_maybe_dropout():
    assert dropout.maybe_dropout(None) == dropout.DisabledDropout(
        drop_rate=0.0, share_across_axes=()
    )
    assert dropout.maybe_dropout(0.2, ("seq",), "r") == dropout.StochasticDropout(
        drop_rate=0.2, share_across_axes=("seq",), random_stream_input_name="r"
    )


def test_dropout_under_variable_jit_advances_the_stream():
    ours_in, _ = _inputs()
    layer = dropout.StochasticDropout(0.5)
    stream = random_stream.RandomStream.from_base_key(jax.random.key(3))

    @variables.variable_jit
    def apply(x, stream):
        return layer(x, random_stream=stream)

    first = apply(ours_in, stream)
    second = apply(ours_in, stream)
    assert int(stream.offset.value) == 2
    assert not np.array_equal(np.asarray(first.unwrap(*SHAPE)), np.asarray(second.unwrap(*SHAPE)))
