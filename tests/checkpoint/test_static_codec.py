"""Tests for ``pz_flax.checkpoint.static_codec``: the static values NNX transforms keep.

``nnx.RNN`` and the other NNX transform wrappers hold filters, ``nnx.StateAxes`` and
``Ellipsis`` as static configuration. Each must survive a JSON round trip equal and of the same
type, and a crafted manifest must only ever produce those types.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import functions
from pz_flax.checkpoint import manifest
from pz_flax.checkpoint import static_codec
from pz_flax.core import variables


def _round_trip(value):
    encoded = json.loads(json.dumps(manifest.encode_static(value, "here"), allow_nan=False))
    return manifest.decode_static(encoded, "here", ())


FILTERS = [
    Ellipsis,
    nnx.Param,
    nnx.RngState,
    variables.Parameter,
    "dropout",
    True,
    False,
    (nnx.Param, "batch_stats"),
    [nnx.Param, ...],
    nnx.WithTag("carry"),
    nnx.PathContains("kernel"),
    nnx.PathContains(3, exact=False),
    nnx.OfType(nnx.BatchStat),
    nnx.Any(nnx.Param, "dropout"),
    nnx.All(nnx.Param, nnx.Not(nnx.PathContains("bias"))),
    nnx.Not(nnx.RngState),
    nnx.Everything(),
    nnx.Nothing(),
]


@pytest.mark.parametrize("value", FILTERS, ids=repr)
def test_nnx_filters_round_trip(value):
    decoded = _round_trip(value)
    assert decoded == value
    assert type(decoded) is type(value)


@pytest.mark.parametrize(
    "value",
    [
        nnx.StateAxes({...: nnx.Carry}),
        nnx.StateAxes({nnx.Param: 0, nnx.RngState: None, ...: nnx.Carry}),
        nnx.StateAxes([(nnx.Any(nnx.Param, "x"), 1), ((nnx.BatchStat, "y"), None)]),
    ],
    ids=repr,
)
def test_state_axes_round_trip_in_order(value):
    decoded = _round_trip(value)
    assert type(decoded) is nnx.StateAxes
    assert decoded == value
    assert list(decoded.items()) == list(value.items())


def test_ellipsis_and_carry_keep_their_identity():
    assert _round_trip(...) is Ellipsis
    assert _round_trip(nnx.Carry) is nnx.Carry
    (axis,) = _round_trip(nnx.StateAxes({...: nnx.Carry})).axes
    assert axis is nnx.Carry


def test_filters_are_named_by_their_public_nnx_names():
    encoded = manifest.encode_static(nnx.All(nnx.OfType(nnx.Param), nnx.WithTag("t")), "here")
    assert encoded == {
        "nnx_filter": "All",
        "args": [
            {"nnx_filter": "OfType", "args": [{"type": "flax.nnx:Param"}]},
            {"nnx_filter": "WithTag", "args": ["t"]},
        ],
    }


def test_bidirectional_default_merge_function_has_a_stable_name():
    merge = nnx.Bidirectional(
        nnx.RNN(nnx.SimpleCell(2, 3, rngs=nnx.Rngs(0))),
        nnx.RNN(nnx.SimpleCell(2, 3, rngs=nnx.Rngs(1))),
        rngs=nnx.Rngs(2),
    ).merge_fn
    name = functions.function_name(merge, "here")
    assert name == "flax.nnx:Bidirectional.merge_fn"
    assert functions.resolve_function(name, allow_modules=(), path="here") is merge
    a, b = jnp.ones((2, 3)), jnp.zeros((2, 4))
    np.testing.assert_array_equal(merge(a, b), jnp.concatenate([a, b], axis=-1))


def test_jax_scalar_types_are_recognised_without_private_names():
    for scalar_type in (jnp.float32, jnp.bfloat16, jnp.int8, jnp.bool_):
        assert manifest.encode_static(scalar_type, "here") == {
            "jnp_scalar_type": np.dtype(scalar_type).name
        }
        assert _round_trip(scalar_type) is scalar_type
    assert manifest.encode_static(np.float32, "here") == {"np_scalar_type": "float32"}


@pytest.mark.parametrize(
    "data, problem",
    [
        ({"ellipsis": 1}, "ellipsis value is null"),
        ({"nnx_filter": "PathIn", "args": []}, "not an NNX filter class"),
        ({"nnx_filter": "__init__", "args": []}, "not an NNX filter class"),
        ({"nnx_filter": ["All"], "args": []}, "not an NNX filter class"),
        ({"nnx_filter": "WithTag", "args": [3]}, "does not take"),
        ({"nnx_filter": "WithTag", "args": []}, "does not take"),
        ({"nnx_filter": "PathContains", "args": ["k", 1]}, "does not take"),
        ({"nnx_filter": "PathContains", "args": [{"list": [1]}, True]}, "does not take"),
        ({"nnx_filter": "OfType", "args": ["flax.nnx:Param"]}, "does not take"),
        ({"nnx_filter": "Everything", "args": [True]}, "does not take"),
        # A function is a valid NNX filter, but never one a checkpoint may hold.
        ({"nnx_filter": "Not", "args": [{"function": "jax.nn:relu"}]}, "does not take"),
        ({"nnx_filter": "Any", "args": [{"slice": [1, 2, 3]}]}, "does not take"),
        ({"nnx_filter": "Any", "args": {}}, "must be a list"),
        ({"nnx_filter": "All"}, "keys"),
        ({"state_axes": [[{"function": "jax.nn:relu"}, 0]]}, "is not an NNX filter"),
        ({"state_axes": [[{"ellipsis": None}, "0"]]}, "StateAxes axis"),
        ({"state_axes": [[{"ellipsis": None}, 1.5]]}, "StateAxes axis"),
        ({"state_axes": [[{"ellipsis": None}, {"type": "flax.nnx:Param"}]]}, "StateAxes axis"),
        ({"state_axes": [[{"ellipsis": None}]]}, "2 items"),
        ({"state_axes": {"a": 1}}, "must be a list"),
    ],
)
def test_malformed_transform_values_are_corrupt(data, problem):
    with pytest.raises(errors.CorruptCheckpointError, match=problem) as caught:
        manifest.decode_static(data, "here", ())
    assert "here" in str(caught.value)


def test_filter_classes_resolve_only_through_the_allow_list():
    data = {"nnx_filter": "OfType", "args": [{"type": "os:PathLike"}]}
    with pytest.raises(errors.UntrustedTypeError, match="os"):
        manifest.decode_static(data, "here", ())
    # nnx.Carry is the one plain class flax.nnx may provide as data, and only by its alias.
    with pytest.raises(errors.UntrustedTypeError):
        manifest.decode_static({"type": "flax.nnx.transforms.iteration:Carry"}, "here", ())


def test_unsupported_filters_name_the_path():
    with pytest.raises(errors.UnsupportedValueError, match="here: cannot save the function PathIn"):
        manifest.encode_static(nnx.filterlib.PathIn(("a",)), "here")
    with pytest.raises(errors.UnsupportedValueError, match="lambdas"):
        manifest.encode_static(nnx.StateAxes({(lambda path, x: True): 0}), "here")


def test_every_filter_class_nnx_exports_is_covered():
    # A filter class that flax adds to nnx's public namespace needs a row in the codec's
    # table, or models holding it stop saving.
    exported = {
        name
        for name, value in vars(nnx.filterlib).items()
        if isinstance(value, type) and getattr(nnx, name, None) is value and name != "HasTag"
    }
    assert exported == set(static_codec._FILTER_CLASSES)


def test_prng_keys_of_each_builtin_implementation_are_named():
    for impl in ("threefry2x32", "rbg", "unsafe_rbg"):
        key = jax.random.key(0, impl=impl)
        (entry,) = manifest.encode({"key": key}).entries
        assert entry.prng_impl == impl
        (abstract_entry,) = manifest.encode(
            {"key": jax.ShapeDtypeStruct(key.shape, key.dtype)}, allow_abstract=True
        ).entries
        assert (abstract_entry.prng_impl, abstract_entry.shape) == (impl, entry.shape)
