"""Tests for pz_flax.nn.basic_ops, differential against penzai 0.2.5."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz as penzai_pz

from pz_flax.core import named_axes as nx
from pz_flax.nn import basic_ops
from tests.nn import helpers

# Spread the inputs wider than unit normal so the nonlinearities see their saturated regions.
random_named = functools.partial(helpers.random_named, scale=3.0)


@pytest.mark.parametrize("fn", [jax.nn.relu, jax.nn.gelu, jnp.tanh, jax.nn.silu])
def test_elementwise_matches_penzai(fn):
    x = random_named(0, {"foo": 3, "bar": 2})
    helpers.assert_same_named_array(
        basic_ops.Elementwise(fn)(x), penzai_pz.nn.Elementwise(fn)(helpers.to_penzai(x))
    )


def test_elementwise_sees_only_positional_axes():
    # nmap hands the function one element per named position: summing over "everything"
    # must therefore leave each element unchanged.
    x = random_named(0, {"foo": 3})
    helpers.assert_same_named_array(basic_ops.Elementwise(jnp.sum)(x), x)
    row = nx.wrap(jnp.arange(6.0).reshape(2, 3)).tag_prefix("rows")
    summed = basic_ops.Elementwise(jnp.sum)(row)
    np.testing.assert_allclose(summed.unwrap("rows"), [3.0, 12.0])


def test_elementwise_on_plain_array():
    np.testing.assert_array_equal(
        basic_ops.Elementwise(jax.nn.relu)(jnp.array([-1.0, 2.0])), [0.0, 2.0]
    )


def test_elementwise_function_is_static():
    layer = basic_ops.Elementwise(jax.nn.relu)
    assert jax.tree_util.tree_leaves(layer) == []


@pytest.mark.parametrize("axes", ["foo", ("foo", "bar"), ("baz",)])
def test_softmax_matches_penzai(axes):
    x = random_named(1, {"foo": 3, "bar": 4, "baz": 5})
    helpers.assert_same_named_array(
        basic_ops.Softmax(axes)(x), penzai_pz.nn.Softmax(axes)(helpers.to_penzai(x))
    )


def test_softmax_normalizes_jointly():
    out = basic_ops.Softmax(("foo", "bar"))(random_named(1, {"foo": 3, "bar": 4, "baz": 5}))
    np.testing.assert_allclose(out.unwrap("baz", "foo", "bar").sum(axis=(1, 2)), 1.0, rtol=1e-6)


def test_softmax_missing_axis_error():
    with pytest.raises(ValueError, match=r"without axis 'nope'.*\{'foo': 3\}"):
        basic_ops.Softmax(("foo", "nope"))(random_named(1, {"foo": 3}))


def test_cast_to_dtype():
    x = random_named(0, {"foo": 3})
    cast = basic_ops.CastToDType(jnp.bfloat16)
    helpers.assert_same_named_array(
        cast(x), penzai_pz.nn.CastToDType(jnp.bfloat16)(helpers.to_penzai(x))
    )
    tree = cast({"named": x, "plain": jnp.ones(2, jnp.float32)})
    assert tree["named"].dtype == jnp.bfloat16
    assert dict(tree["named"].named_shape) == {"foo": 3}
    assert tree["plain"].dtype == jnp.bfloat16


def test_tanh_soft_cap_matches_penzai():
    x = random_named(2, {"foo": 4, "bar": 3})
    ours = basic_ops.TanhSoftCap(soft_cap=2.5)(x)
    helpers.assert_same_named_array(
        ours, penzai_pz.nn.TanhSoftCap(soft_cap=2.5)(helpers.to_penzai(x))
    )
    assert float(jnp.max(jnp.abs(ours.unwrap("foo", "bar")))) < 2.5


def test_tanh_soft_cap_is_a_pytree_child():
    layer = basic_ops.TanhSoftCap(soft_cap=jnp.asarray(2.0))
    assert len(jax.tree_util.tree_leaves(layer)) == 1
    x = random_named(2, {"foo": 4})
    jitted = jax.jit(lambda layer, value: layer(value))(layer, x)
    helpers.assert_same_named_array(jitted, basic_ops.TanhSoftCap(soft_cap=2.0)(x))


@pytest.mark.parametrize(
    "fn",
    [
        jax.nn.relu,
        functools.partial(jax.nn.gelu, approximate=False),
        functools.partial(jax.nn.leaky_relu, negative_slope=0.2),
    ],
)
def test_known_elementwise_fast_path_equals_nmap(fn):
    x = random_named(3, {"foo": 3, "bar": 2, "baz": 4})
    view = x.untag("baz", "foo").tag("baz", "foo")  # a different storage order
    for value in (x, view, nx.wrap(x.unwrap("foo", "bar", "baz")).tag_prefix("foo")):
        ours = basic_ops.Elementwise(fn)(value)
        expected = nx.nmap(fn)(value)
        assert dict(ours.named_shape) == dict(expected.named_shape)
        assert ours.positional_shape == expected.positional_shape
        names = tuple(expected.named_shape)
        np.testing.assert_allclose(
            ours.untag_prefix(*names).unwrap(), expected.untag_prefix(*names).unwrap(), rtol=1e-6
        )


def test_partial_with_array_argument_keeps_nmap_semantics():
    # The slope array is not a scalar, so the function is vmapped: each named element meets
    # the whole slope vector and gains a positional axis.
    fn = functools.partial(jax.nn.leaky_relu, negative_slope=jnp.array([0.1, 0.2, 0.3]))
    out = basic_ops.Elementwise(fn)(random_named(0, {"foo": 2}))
    assert out.positional_shape == (3,)
    assert dict(out.named_shape) == {"foo": 2}


@pytest.mark.parametrize(
    "qualified_name",
    [
        "Elementwise.__init__",
        "Elementwise.__call__",
        "Softmax.__init__",
        "Softmax.__call__",
        "CastToDType.__init__",
        "CastToDType.__call__",
        "TanhSoftCap.__init__",
        "TanhSoftCap.__call__",
    ],
)
def test_signature_matches_penzai(qualified_name):
    helpers.assert_signature_matches_penzai(basic_ops, "penzai.nn.basic_ops", qualified_name)


def _double(x):
    return 2 * x


def test_builtin_elementwise_functions_are_declared_once_with_their_names():
    table = basic_ops.elementwise_function_registry
    assert table[jax.nn.relu] == "jax.nn.relu"
    assert table[jnp.tanh] == "jax.numpy.tanh"
    for fn in (jax.nn.gelu, jax.nn.identity, jnp.exp, jax.lax.erf):
        assert basic_ops.is_elementwise_function(fn)
    assert basic_ops.known_elementwise_functions() == frozenset(table)
    # Not elementwise: reductions and functions that mix elements.
    for fn in (jnp.sum, jax.nn.softmax, jnp.cumsum):
        assert not basic_ops.is_elementwise_function(fn)


def test_register_and_unregister_elementwise_function():
    with basic_ops.elementwise_function_registry.isolated():
        assert basic_ops.register_elementwise_function(_double) is _double
        assert basic_ops.elementwise_function_registry[_double] == "_double"
        assert _double in basic_ops.known_elementwise_functions()
        assert basic_ops.unregister_elementwise_function(_double) == "_double"
        assert not basic_ops.is_elementwise_function(_double)
        with pytest.raises(KeyError, match=r"_double is not in the elementwise functions"):
            basic_ops.unregister_elementwise_function(_double)
    assert not basic_ops.is_elementwise_function(_double)


def test_register_elementwise_function_errors():
    with pytest.raises(TypeError, match="expects a callable, got 3"):
        basic_ops.register_elementwise_function(3)
    with pytest.raises(ValueError, match=r"jax\.nn\.relu is already in the elementwise"):
        basic_ops.register_elementwise_function(jax.nn.relu)

    class Unhashable:
        __hash__ = None

        def __call__(self, x):
            return x

    with pytest.raises(TypeError, match="must be hashable"):
        basic_ops.register_elementwise_function(Unhashable())
    assert not basic_ops.is_elementwise_function([])
    with basic_ops.elementwise_function_registry.isolated():
        basic_ops.register_elementwise_function(jax.nn.relu, "rectifier", replace=True)
        assert basic_ops.elementwise_function_registry[jax.nn.relu] == "rectifier"
    assert basic_ops.elementwise_function_registry[jax.nn.relu] == "jax.nn.relu"


def test_declaring_a_function_elementwise_switches_elementwise_to_the_data_array():
    # Elementwise trusts the declaration: a declared function is called once on the whole data
    # array, an undeclared one per element under nmap's vmap (it sees a scalar).
    seen_shapes = []

    def recording_double(value):
        seen_shapes.append(value.shape)
        return 2 * value

    x = random_named(0, {"foo": 3, "bar": 2})
    undeclared = basic_ops.Elementwise(recording_double)(x)
    assert seen_shapes == [()]
    with basic_ops.elementwise_function_registry.scoped(recording_double, "double"):
        declared = basic_ops.Elementwise(recording_double)(x)
    assert seen_shapes == [(), (3, 2)]
    helpers.assert_same_named_array(declared, undeclared)
    basic_ops.Elementwise(recording_double)(x)
    assert seen_shapes[-1] == ()


def test_the_checkpoint_allow_list_reads_the_same_table():
    from pz_flax.checkpoint import errors
    from pz_flax.checkpoint import functions

    def resolve(name):
        return functions.resolve_function(name, allow_modules=(), path="fn")

    assert resolve("jax.nn:identity") is jax.nn.identity
    assert functions.function_name(jax.nn.relu, "fn") == "jax.nn:relu"
    # A JAX function declared elementwise becomes nameable for as long as it is declared.
    with pytest.raises(errors.UntrustedTypeError):
        resolve("jax.numpy:cbrt")
    with basic_ops.elementwise_function_registry.scoped(jnp.cbrt, "cbrt"):
        assert resolve("jax.numpy:cbrt") is jnp.cbrt
        assert functions.function_name(jnp.cbrt, "fn") == "jax.numpy:cbrt"
    with pytest.raises(errors.UntrustedTypeError):
        resolve("jax.numpy:cbrt")
