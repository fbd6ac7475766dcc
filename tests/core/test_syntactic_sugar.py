"""Tests for pz_flax.core.syntactic_sugar (``pz.slice``)."""

import builtins

import penzai.core.syntactic_sugar as penzai_sugar
import pytest

from pz_flax.core import syntactic_sugar


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda s: s[1:3], builtins.slice(1, 3, None)),
        (lambda s: s[::-1], builtins.slice(None, None, -1)),
        (lambda s: s[:], builtins.slice(None, None, None)),
        (lambda s: s[2], 2),
        (lambda s: s[1:, None, ...], (builtins.slice(1, None, None), None, Ellipsis)),
    ],
)
def test_slice_returns_the_index_expression(build, expected):
    assert build(syntactic_sugar.slice) == expected
    # Differential check: penzai's pz.slice builds the same objects.
    assert build(syntactic_sugar.slice) == build(penzai_sugar.slice)


def test_slice_is_an_immutable_slicelike_instance():
    assert isinstance(syntactic_sugar.slice, syntactic_sugar.SliceLike)
    with pytest.raises(AttributeError):
        syntactic_sugar.slice.anything = 1
