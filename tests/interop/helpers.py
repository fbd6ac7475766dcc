"""Shared helpers for the NNX interop tests: cases, gradients and state comparisons."""

import jax
import jax.numpy as jnp
from flax import nnx

from pz_flax.core import named_axes
from pz_flax.core import variables


def named(x, *names):
    return named_axes.wrap(x).tag(*names)


def flat_state(module):
    """``{"a/b": variable}`` for every variable of an NNX module."""
    return {
        "/".join(str(part) for part in path): variable
        for path, variable in nnx.to_flat_state(nnx.state(module))
    }


def assert_same_state(original, rebuilt):
    """Same class, same graph definition, same paths, and the very same arrays."""
    assert type(rebuilt) is type(original)
    assert nnx.graphdef(rebuilt) == nnx.graphdef(original)
    before, after = flat_state(original), flat_state(rebuilt)
    assert before.keys() == after.keys()
    for key in before:
        assert type(after[key]) is type(before[key]), key
        assert after[key].get_value() is before[key].get_value(), key


def pz_parameter_grads(layer, loss):
    """Gradients of ``loss(layer)`` by parameter label."""
    # One compiled function instead of many eagerly dispatched operations: faster on CPU.
    grads = jax.jit(jax.grad(loss, allow_int=True))(layer)
    is_parameter = lambda node: isinstance(node, variables.Parameter)  # noqa: E731
    return {
        leaf.label: leaf.get_value()
        for leaf in jax.tree_util.tree_leaves(grads, is_leaf=is_parameter)
        if is_parameter(leaf)
    }


def nnx_parameter_grads(module, loss):
    """Gradients of ``loss(module)`` by NNX path."""
    grads = nnx.jit(nnx.grad(loss))(module)
    return {
        "/".join(str(part) for part in path): variable.get_value()
        for path, variable in nnx.to_flat_state(grads)
    }


def random_input(shape, seed=1, integer_below=None):
    key = jax.random.key(seed)
    if integer_below is not None:
        return jax.random.randint(key, shape, 0, integer_below)
    return jax.random.normal(key, shape, jnp.float32)
