"""Tests for pz_flax.checkpoint.module_schema and its NNX assumptions (pz_flax._compat)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest
from flax import nnx

from pz_flax._compat import nnx_modules
from pz_flax.checkpoint import errors
from pz_flax.checkpoint import manifest
from pz_flax.checkpoint import static_codec
from pz_flax.interop import wrappers


def _shell_of(module):
    return wrappers.ModuleShell(nnx.graphdef(module))


def _round_trip(shell):
    encoded = json.loads(json.dumps(manifest.encode_static(shell, "here")))
    return encoded, manifest.decode_static(encoded, "here", ())


@pytest.mark.parametrize(
    "module",
    [
        nnx.Conv(3, 2, kernel_size=(1,), rngs=nnx.Rngs(0)),
        nnx.Linear(2, 3, use_bias=False, rngs=nnx.Rngs(0)),
        nnx.Einsum("ab,bc->ac", (2, 3), bias_shape=None, rngs=nnx.Rngs(0)),
        nnx.BatchNorm(2, rngs=nnx.Rngs(0)),
        nnx.Dropout(0.5, rngs=nnx.Rngs(1)),  # keeps an RngStream module inside
    ],
    ids=["conv", "linear-no-bias", "einsum-no-bias", "batchnorm", "dropout-with-rngs"],
)
def test_shells_round_trip_to_equal_graph_definitions(module):
    shell = _shell_of(module)
    encoded, decoded = _round_trip(shell)
    assert decoded == shell and hash(decoded) == hash(shell)
    text = json.dumps(encoded)
    assert "GraphDef" not in text and "graphlib" not in text
    assert encoded["nnx_module"] == f"flax.nnx:{type(module).__name__}"


def test_none_attributes_are_data_attributes():
    encoded, _ = _round_trip(_shell_of(nnx.Linear(2, 3, use_bias=False, rngs=nnx.Rngs(0))))
    bias = next(entry for entry in encoded["attributes"] if entry["name"] == "bias")
    assert bias == {"name": "bias", "data": True, "value": None}


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda e: e.update(nnx_module="flax.nnx:Param"), "not an NNX module"),
        (
            lambda e: e["attributes"].append({"name": "__class__", "data": False, "value": 1}),
            "name",
        ),
        (lambda e: e["attributes"].append(dict(e["attributes"][0])), "repeated"),
        (lambda e: e["attributes"][0].update(data="yes"), "boolean"),
        (lambda e: e["attributes"][0].update(extra=1), "bad"),
        (lambda e: e.update(attributes={}), "list"),
    ],
)
def test_malformed_module_descriptions(edit, problem):
    encoded, _ = _round_trip(_shell_of(nnx.Linear(2, 3, rngs=nnx.Rngs(0))))
    edit(encoded)
    with pytest.raises(errors.CorruptCheckpointError, match=problem):
        manifest.decode_static(encoded, "here", ())


def test_modules_of_untrusted_classes_are_refused():
    encoded, _ = _round_trip(_shell_of(nnx.Linear(2, 3, rngs=nnx.Rngs(0))))
    encoded["nnx_module"] = "mymodels:Evil"
    with pytest.raises(errors.UntrustedTypeError, match="allow_modules"):
        manifest.decode_static(encoded, "here", ())


def test_data_attributes_the_schema_cannot_describe_are_refused_on_save():
    class HoldsArray(nnx.Module):
        def __init__(self):
            self.table = nnx.data([nnx.Param(jnp.ones(2))])

    with pytest.raises(errors.UnsupportedValueError, match="table"):
        static_codec.encode(_shell_of(HoldsArray()), "here")


def test_canary_nnx_module_internals():
    """pz_flax._compat.nnx_modules assumes flax 0.12's module bookkeeping; this names it."""
    module = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    assert set(nnx_modules.BOOKKEEPING_ATTRIBUTES) <= set(vars(module)), (
        "NNX modules no longer keep _pytree__nodes/_pytree__state"
    )
    attributes = nnx_modules.module_attributes(module)
    rebuilt = nnx_modules.empty_module_with(type(module), attributes)
    assert nnx.graphdef(rebuilt) == nnx.graphdef(module)
    assert isinstance(nnx.graphdef(module).num_leaves, int), "GraphDef.num_leaves is gone"
