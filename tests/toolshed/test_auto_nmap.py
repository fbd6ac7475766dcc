import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz as penzai_pz
from penzai.toolshed import auto_nmap as penzai_auto_nmap

from pz_flax import pz
from pz_flax.toolshed import auto_nmap
from tests.toolshed.twin_models import assert_same_named


def test_constructors_return_named_arrays():
    njnp = auto_nmap.wrap_module(jnp)
    array = njnp.array([1, 2, 3])
    assert isinstance(array, pz.nx.NamedArrayBase)
    assert array.positional_shape == (3,) and dict(array.named_shape) == {}
    spaced = njnp.linspace(-0.5, 0.5, 10).tag("bar")
    assert spaced.positional_shape == () and dict(spaced.named_shape) == {"bar": 10}


def test_submodules_are_wrapped_recursively():
    njax = auto_nmap.wrap_module(jax)
    assert isinstance(njax.random, auto_nmap.AutoNmapModuleWrapper)
    uniform = njax.random.uniform(jax.random.key(0), (5, 10)).tag("baz", "qux")
    assert dict(uniform.named_shape) == {"baz": 5, "qux": 10}


def test_functions_map_over_named_axes_like_penzai():
    data = np.array([[1, 2, 3], [5, 6, 4]])
    ours = auto_nmap.wrap_module(jax).lax.top_k(
        pz.nx.wrap(data).tag("foo", "bar").untag("bar"), k=2
    )
    theirs = penzai_auto_nmap.wrap_module(jax).lax.top_k(
        penzai_pz.nx.wrap(data).tag("foo", "bar").untag("bar"), k=2
    )
    for our_part, their_part in zip(ours, theirs, strict=True):
        assert our_part.positional_shape == their_part.positional_shape == (2,)
        assert_same_named(our_part.tag("k"), their_part.tag("k"))
    np.testing.assert_array_equal(ours[0].tag("k").unwrap("foo", "k"), [[3, 2], [6, 5]])
    np.testing.assert_array_equal(ours[1].tag("k").unwrap("foo", "k"), [[2, 1], [1, 0]])


def test_norm_maps_over_remaining_named_axes():
    array = pz.nx.wrap(jnp.arange(12.0).reshape(3, 4)).tag("rows", "features")
    norms = auto_nmap.wrap_module(jnp).linalg.norm(array.untag("features"))
    np.testing.assert_allclose(
        norms.unwrap("rows"), np.linalg.norm(np.arange(12.0).reshape(3, 4), axis=1), rtol=1e-6
    )


def test_non_callable_attribute_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match=r"jax.numpy.pi is a float"):
        _ = auto_nmap.wrap_module(jnp).pi


def test_missing_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError):
        _ = auto_nmap.wrap_module(jnp).no_such_function


def test_wrapper_can_be_copied():
    import copy

    wrapped = auto_nmap.wrap_module(jnp)
    assert copy.copy(wrapped)._module is jnp
