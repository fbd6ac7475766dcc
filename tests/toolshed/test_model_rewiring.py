import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz as penzai_pz
from penzai.toolshed import model_rewiring as penzai_rewiring

from pz_flax import pz
from pz_flax.toolshed import model_rewiring
from tests.toolshed.twin_models import assert_same_named

_ATTENTION = np.array(
    [[[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0]]], np.float32
)


def test_knock_out_heads_matches_penzai():
    def run(lib, tool):
        layer = tool.KnockOutAttentionHeads(head_mask=lib.nx.wrap(jnp.array([1, 0])).tag("worlds"))
        return layer(lib.nx.wrap(_ATTENTION).tag("heads", "seq", "kv_seq"))

    ours, theirs = run(pz, model_rewiring), run(penzai_pz, penzai_rewiring)
    assert_same_named(ours, theirs)
    # World 1 (mask 0) attends only to the first key.
    np.testing.assert_array_equal(ours[{"worlds": 1}].unwrap("heads", "seq", "kv_seq")[..., 0], 1)


def _rewiring(lib, tool):
    return tool.RewireComputationPaths(
        worlds_axis="worlds",
        world_ordering=("a", "b", "c", "d", "e"),
        taking={
            "a": tool.From("a"),
            "b": tool.From("b", weight=0.5),
            "c": (),
            "d": tool.From("a"),
            "e": (
                tool.From("a", lib.nx.wrap(jnp.array([1, 0])).tag("switch")),
                tool.From("b", lib.nx.wrap(jnp.array([0, 1])).tag("switch")),
            ),
        },
    )


def test_rewire_computation_paths_matches_penzai():
    data = np.arange(1, 21, dtype=np.float32).reshape(5, 4)
    ours = _rewiring(pz, model_rewiring)(pz.nx.wrap(data).tag("worlds", "features"))
    theirs = _rewiring(penzai_pz, penzai_rewiring)(
        penzai_pz.nx.wrap(data).tag("worlds", "features")
    )
    assert_same_named(ours, theirs)
    np.testing.assert_array_equal(
        ours.unwrap("switch", "worlds", "features")[1],
        [data[0], data[1] * 0.5, np.zeros(4), data[0], data[1]],
    )
    matrix = _rewiring(pz, model_rewiring).path_matrix()
    assert matrix.positional_shape == (5, 5) and dict(matrix.named_shape) == {"switch": 2}


def test_rewire_rejects_bad_world_tables():
    missing = model_rewiring.RewireComputationPaths(
        worlds_axis="worlds", world_ordering=("a", "b"), taking={"a": model_rewiring.From("a")}
    )
    with pytest.raises(ValueError, match="one entry per world"):
        missing.path_matrix()
    unknown = model_rewiring.RewireComputationPaths(
        worlds_axis="worlds",
        world_ordering=("a",),
        taking={"a": model_rewiring.From("z")},
    )
    with pytest.raises(ValueError, match="'z'"):
        unknown.path_matrix()


def _linearized(lib, tool):
    def target(stuff):
        return {"a": stuff["a"] ** 2, "b": stuff["b"] ** 3}

    return tool.LinearizeAndAdjust(
        linearize_around=lambda x: {
            "a": x,
            "b": lib.nx.wrap(jnp.array([1.0, 2.0, 3.0])).tag("foo"),
        },
        evaluate_at=lambda x: {
            "a": x + 1.0,
            "b": lib.nx.wrap(jnp.array([4.0, 5.0, 6.0])).tag("bar"),
        },
        target=target,
    )


def test_linearize_and_adjust_matches_penzai_and_first_order_expansion():
    ours = _linearized(pz, model_rewiring)(10.0)
    theirs = _linearized(penzai_pz, penzai_rewiring)(10.0)
    np.testing.assert_allclose(ours["a"].unwrap(), theirs["a"].unwrap())
    np.testing.assert_allclose(ours["a"].unwrap(), 10.0**2 + 2 * 10.0 * 1.0)
    assert_same_named(ours["b"], theirs["b"])
    primal, point = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])
    expected = primal[:, None] ** 3 + 3 * primal[:, None] ** 2 * (point[None, :] - primal[:, None])
    np.testing.assert_allclose(ours["b"].unwrap("foo", "bar"), expected, rtol=1e-6)


def test_linearize_is_exact_when_both_points_agree():
    layer = model_rewiring.LinearizeAndAdjust(
        linearize_around=pz.nn.Identity(),
        evaluate_at=pz.nn.Identity(),
        target=pz.nn.Elementwise(jnp.sin),
    )
    x = pz.nx.wrap(jnp.linspace(0.0, 1.0, 5)).tag("a")
    np.testing.assert_allclose(layer(x).unwrap("a"), jnp.sin(x.unwrap("a")), rtol=1e-6)


def test_linearize_rejects_mismatched_structures():
    layer = model_rewiring.LinearizeAndAdjust(
        linearize_around=lambda x: (x,), evaluate_at=lambda x: [x], target=lambda x: x
    )
    with pytest.raises(ValueError, match="same structure"):
        layer(jnp.ones(2))


def test_rewiring_is_jittable():
    data = pz.nx.wrap(np.arange(1, 21, dtype=np.float32).reshape(5, 4)).tag("worlds", "features")
    layer = _rewiring(pz, model_rewiring)
    jitted = jax.jit(lambda model, x: model(x))(layer, data)
    assert_same_named(jitted, layer(data))
