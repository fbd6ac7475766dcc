"""Tests for pz_flax.core.partitioning, differential against penzai.core.partitioning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import penzai.core.partitioning
import penzai.core.selectors
import pytest
from flax import nnx

from pz_flax.core import partitioning
from pz_flax.core import selectors

OURS = partitioning.NotInThisPartition()
THEIRS = penzai.core.partitioning.NotInThisPartition()


def to_penzai(tree):
    """Swaps our sentinel for penzai's, so the same partitions can be fed to both."""
    return jax.tree_util.tree_map(
        lambda node: THEIRS if isinstance(node, partitioning.NotInThisPartition) else node,
        tree,
        is_leaf=lambda node: isinstance(node, partitioning.NotInThisPartition),
    )


def from_penzai(tree):
    return jax.tree_util.tree_map(
        lambda node: (
            OURS if isinstance(node, penzai.core.partitioning.NotInThisPartition) else node
        ),
        tree,
        is_leaf=lambda node: isinstance(node, penzai.core.partitioning.NotInThisPartition),
    )


def example():
    return {"a": {"a1": 1, "a2": 2}, "b": {"b1": 3, "b2": 4}, "c": {"c1": 5, "c2": (6, None)}}


@pytest.mark.parametrize("at_leaves", [False, True])
def test_partition_then_combine_matches_penzai(at_leaves):
    def split(select):
        return select(example()).at(lambda t: (t["a"], t["b"]["b1"]), multiple=True)

    ours = split(selectors.select).partition(at_leaves=at_leaves)
    theirs = split(penzai.core.selectors.select).partition(at_leaves=at_leaves)
    assert ours == from_penzai(theirs)
    assert partitioning.combine(*ours) == example()
    assert partitioning.combine(*reversed(ours)) == example()


def test_partition_places_sentinels():
    selected, rest = (
        selectors.select(example()).at(lambda t: (t["a"], t["b"]["b1"]), multiple=True).partition()
    )
    assert selected == {"a": {"a1": 1, "a2": 2}, "b": {"b1": 3, "b2": OURS}, "c": OURS}
    assert rest == {"a": OURS, "b": {"b1": OURS, "b2": 4}, "c": {"c1": 5, "c2": (6, None)}}


COMBINE_CASES = {
    "leaf_level": (
        {"x": OURS, "y": {"p": OURS, "q": 2}},
        {"x": 1, "y": {"p": 5, "q": OURS}},
    ),
    "subtree_level": ({"x": OURS, "y": [1, OURS]}, {"x": {"deep": (1, 2)}, "y": OURS}),
    "three_parts": (
        {"x": 1, "y": OURS, "z": OURS},
        {"x": OURS, "y": [2], "z": OURS},
        {"x": OURS, "y": OURS, "z": None},
    ),
    "everywhere_missing": ({"x": OURS}, {"x": OURS}),
    "root_missing": (OURS, [1, 2]),
    "single": ({"x": 1},),
    "childless_nodes_in_both": ((None, OURS), (None, 3)),
}


@pytest.mark.parametrize("name", sorted(COMBINE_CASES))
def test_combine_matches_penzai(name):
    parts = COMBINE_CASES[name]
    expected = from_penzai(penzai.core.partitioning.combine(*map(to_penzai, parts)))
    assert partitioning.combine(*parts) == expected


def test_combine_of_nothing_is_the_sentinel():
    assert partitioning.combine() == OURS


def test_combine_reports_conflicting_path():
    with pytest.raises(ValueError, match=r"key path \['y'\]\[0\].*Got 1 and 2"):
        partitioning.combine({"x": OURS, "y": [1]}, {"x": 0, "y": [2]})
    with pytest.raises(ValueError, match=r"key path \['y'\]"):
        partitioning.combine({"y": [1]}, {"y": (1,)})
    with pytest.raises(ValueError, match=r"key path \(root\)"):
        partitioning.combine({"a": 1}, {"b": 1})


def test_sentinel_is_a_childless_pytree():
    assert jax.tree_util.tree_leaves({"a": OURS, "b": 1}) == [1]
    assert OURS.treescope_color() == "orange"
    assert partitioning.NotInThisPartition() == OURS


def test_combine_inside_jit_and_grad_over_one_part():
    model = {"w": jnp.arange(3.0), "b": jnp.ones(()), "p": nnx.Param(jnp.full((2,), 2.0))}
    trainable, frozen = (
        selectors.select(model).at(lambda m: (m["w"], m["p"]), multiple=True).partition()
    )

    @jax.jit
    def loss(trainable, frozen):
        full = partitioning.combine(trainable, frozen)
        return jnp.sum(full["w"] ** 2) * full["b"] + jnp.sum(full["p"][...])

    grads = jax.grad(loss)(trainable, frozen)
    np.testing.assert_allclose(grads["w"], 2 * jnp.arange(3.0))
    np.testing.assert_allclose(grads["p"][...], jnp.ones(2))
    assert isinstance(grads["b"], partitioning.NotInThisPartition)
