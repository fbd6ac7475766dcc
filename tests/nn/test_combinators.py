"""Tests for pz_flax.nn.combinators, differential against penzai 0.2.5."""

import jax
import pytest
from penzai import pz as penzai_pz

from pz_flax.nn import basic_ops
from pz_flax.nn import combinators
from pz_flax.nn import linear_and_affine
from tests.nn import helpers


def linear_pair(name: str):
    """The same square linear layer in pz_flax and in penzai (identical initialization)."""
    config = dict(input_axes={"f": 4}, output_axes={"f": 4}, parallel_axes={"h": 2})
    return (
        linear_and_affine.Linear.from_config(name, jax.random.key(0), **config),
        penzai_pz.nn.Linear.from_config(name, jax.random.key(0), **config),
    )


def test_residual_matches_penzai():
    ours, theirs = linear_pair("delta")
    x = helpers.random_named(1, {"f": 4, "h": 2, "b": 3})
    helpers.assert_same_named_array(
        combinators.Residual(ours)(x), penzai_pz.nn.Residual(theirs)(helpers.to_penzai(x))
    )


def test_residual_forwards_side_inputs():
    seen = {}

    def delta(value, **side_inputs):
        seen.update(side_inputs)
        return value * 2

    assert combinators.Residual(delta)(3.0, mask="m") == 9.0
    assert seen == {"mask": "m"}


@pytest.mark.parametrize(
    ("ours_cls", "theirs_cls"),
    [
        (combinators.BranchAndAddTogether, penzai_pz.nn.BranchAndAddTogether),
        (combinators.BranchAndMultiplyTogether, penzai_pz.nn.BranchAndMultiplyTogether),
    ],
)
def test_branches_match_penzai(ours_cls, theirs_cls):
    ours_a, theirs_a = linear_pair("a")
    ours_b, theirs_b = linear_pair("b")
    ours = ours_cls([ours_a, basic_ops.Elementwise(jax.nn.gelu), ours_b])
    theirs = theirs_cls([theirs_a, penzai_pz.nn.Elementwise(jax.nn.gelu), theirs_b])
    x = helpers.random_named(2, {"b": 3, "f": 4, "h": 2})
    helpers.assert_same_named_array(ours(x), theirs(helpers.to_penzai(x)))


def test_single_branch_is_that_branch():
    x = helpers.random_named(2, {"f": 4})
    relu = basic_ops.Elementwise(jax.nn.relu)
    helpers.assert_same_named_array(combinators.BranchAndAddTogether([relu])(x), relu(x))
    helpers.assert_same_named_array(combinators.BranchAndMultiplyTogether([relu])(x), relu(x))


@pytest.mark.parametrize(
    "cls", [combinators.BranchAndAddTogether, combinators.BranchAndMultiplyTogether]
)
def test_no_branches_is_an_error(cls):
    with pytest.raises(ValueError, match=f"{cls.__name__} requires at least one branch"):
        cls([])(1.0)


def test_branches_get_side_inputs():
    calls = []

    def branch(value, **side_inputs):
        calls.append(side_inputs)
        return value

    combinators.BranchAndAddTogether([branch, branch])(1.0, positions=5)
    assert calls == [{"positions": 5}, {"positions": 5}]


@pytest.mark.parametrize(
    "qualified_name",
    [
        "Residual.__init__",
        "Residual.__call__",
        "BranchAndAddTogether.__init__",
        "BranchAndAddTogether.__call__",
        "BranchAndMultiplyTogether.__init__",
        "BranchAndMultiplyTogether.__call__",
    ],
)
def test_signature_matches_penzai(qualified_name):
    helpers.assert_signature_matches_penzai(combinators, "penzai.nn.combinators", qualified_name)
