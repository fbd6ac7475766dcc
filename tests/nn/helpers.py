"""Shared helpers for the ``pz_flax.nn`` tests."""

import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz as penzai_pz

from pz_flax.core import named_axes as nx


def random_named(
    key_index: int, named_shape: dict, dtype=jnp.float32, scale: float = 1.0
) -> nx.NamedArray:
    """Standard-normal data times ``scale``, with one named axis per ``named_shape`` entry."""
    data = jax.random.normal(jax.random.key(key_index), tuple(named_shape.values()), dtype)
    return nx.wrap(data * scale).tag(*named_shape)


def to_penzai(array: nx.NamedArray):
    """The same values and axis names as a penzai NamedArray, for differential checks."""
    names = tuple(array.named_shape)
    return penzai_pz.nx.wrap(np.asarray(array.unwrap(*names))).tag(*names)


def assert_same_named_array(ours, theirs, rtol: float = 1e-6, atol: float = 1e-6):
    """Same axis names and sizes, no positional axes, same dtype, and the same values.

    Values are compared in a common axis order, since the two libraries may keep the named axes
    of equal results in different data-array orders.
    """
    assert dict(ours.named_shape) == dict(theirs.named_shape)
    assert not ours.positional_shape
    assert ours.dtype == theirs.dtype
    names = tuple(theirs.named_shape)
    np.testing.assert_allclose(
        np.asarray(ours.unwrap(*names)), np.asarray(theirs.unwrap(*names)), rtol=rtol, atol=atol
    )


def signature_summary(fn):
    """Parameter names, kinds and simple defaults: what callers of the API depend on.

    Defaults that are not plain scalars or strings (initializers, sentinels) are summarised as
    ``"obj"``: their identity differs between the two libraries by construction, but whether a
    parameter *has* such a default is still part of the contract.
    """
    return [
        (p.name, p.kind, p.default if isinstance(p.default, int | float | str | None) else "obj")
        for p in inspect.signature(fn).parameters.values()
    ]


def assert_signature_matches_penzai(ours_module, penzai_module_name: str, qualified_name: str):
    """Checks that ``qualified_name`` has the same call signature in pz_flax and in penzai.

    Args:
      ours_module: The pz_flax module holding our version, e.g. ``pz_flax.nn.basic_ops``.
      penzai_module_name: Import path of penzai's counterpart, e.g. ``"penzai.nn.basic_ops"``.
      qualified_name: Dotted attribute path inside both modules, e.g. ``"Softmax.__call__"``.
    """
    ours = ours_module
    theirs = importlib.import_module(penzai_module_name)
    for part in qualified_name.split("."):
        ours, theirs = getattr(ours, part), getattr(theirs, part)
    assert signature_summary(ours) == signature_summary(theirs), qualified_name
