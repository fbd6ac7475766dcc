"""Tests for pz_flax.checkpoint.manifest: encoding models and static values as JSON."""

from __future__ import annotations

import collections
import enum
import functools
import json
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import manifest
from pz_flax.core import variables
from tests.checkpoint import sample_models


class Color(enum.Enum):
    RED = 1
    BLUE = 2


class Pair(typing.NamedTuple):
    left: int
    right: str


def _json_round_trip(value, allow_modules=("tests",)):
    encoded = json.loads(json.dumps(manifest.encode_static(value, "here"), allow_nan=False))
    return manifest.decode_static(encoded, "here", allow_modules)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(2**70),
        1.5,
        "text",
        (1, (2, "x")),
        [1, [2.5]],
        {"b": 1, "a": (2,), 3: None},
        collections.OrderedDict([("z", 1), ("a", 2)]),
        frozenset({1, 2}),
        {3, 4},
        slice(1, None, 2),
        np.dtype("bfloat16"),
        np.float32(2.5),
        np.int8,
        Pair(1, "r"),
        variables.MetadataDict({"stack": Color.RED, "nested": {"a": (1, 2)}}),
    ],
)
def test_static_values_round_trip_through_json(value):
    decoded = _json_round_trip(value)
    assert decoded == value
    assert type(decoded) is type(value)


def test_static_values_with_identity():
    assert _json_round_trip(jnp.bfloat16) is jnp.bfloat16
    assert _json_round_trip(jax.nn.relu) is jax.nn.relu
    assert _json_round_trip(Color.BLUE) is Color.BLUE
    assert _json_round_trip(variables.Parameter) is variables.Parameter
    partial = _json_round_trip(functools.partial(jax.nn.gelu, approximate=False))
    assert partial.func is jax.nn.gelu and partial.keywords == {"approximate": False}


def test_non_finite_floats_survive_strict_json():
    assert _json_round_trip(math.inf) == math.inf
    assert _json_round_trip(-math.inf) == -math.inf
    assert math.isnan(_json_round_trip(math.nan))


def test_dataclasses_are_rebuilt_without_their_init():
    label = variables.AutoStateVarLabel(var_id=12)
    assert _json_round_trip(label) == label


def test_library_internal_types_are_not_static_values():
    # NNX's graph types and JAX tree structures were only ever held inside wrapped modules'
    # shells, which format 2 describes with its own schema.
    from flax.typing import HashableMapping

    for value in (HashableMapping({"k": 1}), jax.tree_util.tree_structure([1, 2])):
        with pytest.raises(errors.UnsupportedValueError, match="cannot describe"):
            manifest.encode_static(value, "here")


def test_unsupported_static_values_name_the_path():
    with pytest.raises(errors.UnsupportedValueError, match="here: cannot describe"):
        manifest.encode_static(object(), "here")
    with pytest.raises(errors.UnsupportedValueError, match="inside functions"):
        manifest.encode_static(lambda x: x, "here")
    with pytest.raises(errors.UnsupportedValueError):
        manifest.encode_static(jnp.ones(2), "here")


@pytest.mark.parametrize(
    "data", [["list"], {"tuple": 1}, {"nonsense": 1}, {"dict": [[1]]}, {"dtype": "nope"}]
)
def test_malformed_static_values(data):
    with pytest.raises(errors.CorruptCheckpointError, match="here"):
        manifest.decode_static(data, "here", ())


def test_encode_lists_arrays_with_paths_axis_names_and_labels():
    encoded = manifest.encode(sample_models.build_stateful())
    json.dumps(encoded.manifest, allow_nan=False)
    by_path = {entry.path: entry for entry in encoded.entries}
    weights = by_path["mlp/sublayers/0/sublayers/0/weights"]
    assert weights.axis_names == ("features", "hidden")
    assert weights.label == "in/Linear.weights"
    assert weights.key == ("mlp", "sublayers", "0", "sublayers", "0", "weights")
    assert (weights.shape, weights.dtype, weights.nbytes) == ((4, 8), "float32", 128)
    assert by_path["view/data_array"].axis_names == (None, "cols")
    # The tied parameter is stored once.
    assert "tied/0" not in by_path
    assert len(encoded.arrays) == len(encoded.entries) == 8


def test_array_keys_are_sanitised_and_unique():
    encoded = manifest.encode({"a.b": jnp.ones(1), "a_b": jnp.ones(1), "": jnp.ones(1)})
    keys = [entry.key for entry in encoded.entries]
    assert keys == [("a_b",), ("a_b~1",), ("_",)]


def test_prng_keys_are_stored_as_key_data():
    key = jax.random.key(3)
    encoded = manifest.encode({"rng": key})
    (entry,) = encoded.entries
    assert (entry.shape, entry.dtype, entry.prng_impl) == ((2,), "uint32", "threefry2x32")
    np.testing.assert_array_equal(encoded.arrays[0], jax.random.key_data(key))


def test_abstract_models_need_allow_abstract():
    abstract = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with pytest.raises(errors.UnsupportedValueError, match="abstract"):
        manifest.encode(abstract)
    assert manifest.encode(abstract, allow_abstract=True).entries[0].shape == (2,)


def test_decode_rebuilds_from_the_manifest_alone():
    model = sample_models.build_stateful()
    encoded = manifest.encode(model)
    rebuilt = manifest.decode(
        json.loads(json.dumps(encoded.manifest)), encoded.arrays, allow_modules=()
    )
    assert jax.tree_util.tree_structure(rebuilt) == jax.tree_util.tree_structure(model)


def test_read_entries_checks_the_header():
    with pytest.raises(errors.CorruptCheckpointError, match="not a pz_flax"):
        manifest.read_entries([])
    with pytest.raises(errors.CorruptCheckpointError, match=r"expected .*'arrays'.*'root'"):
        manifest.read_entries({"format": manifest.FORMAT_NAME, "format_version": 1})
    with pytest.raises(errors.CorruptCheckpointError, match="arrays/0: malformed array entry"):
        manifest.read_entries(
            {"format": manifest.FORMAT_NAME, "format_version": 1, "root": None, "arrays": [{}]}
        )


def test_compare_manifests_matches_itself_and_maps_arrays():
    model = sample_models.build_stateful()
    saved = json.loads(json.dumps(manifest.encode(model).manifest))
    problems, sources = manifest.compare_manifests(
        saved, manifest.encode(model, allow_abstract=True).manifest
    )
    assert problems == []
    assert sources == list(range(8))


def test_compare_reports_class_and_static_field_differences():
    from pz_flax.nn import basic_ops

    saved = manifest.encode([basic_ops.Elementwise(jax.nn.relu), basic_ops.Softmax("a")]).manifest
    target = manifest.encode(
        [basic_ops.Elementwise(jax.nn.gelu), basic_ops.CastToDType(jnp.float32)],
        lenient_static=True,
    ).manifest
    problems, _ = manifest.compare_manifests(saved, target)
    assert problems == [
        "0: static field fn is jax.nn:relu in the checkpoint, jax.nn:gelu in the target",
        "1: class pz_flax.nn.basic_ops:Softmax in the checkpoint,"
        " pz_flax.nn.basic_ops:CastToDType in the target",
    ]


def test_replace_arrays_keeps_structure_and_sharing():
    model = sample_models.build_stateful()
    count = len(manifest.encode(model).arrays)
    replaced = manifest.replace_arrays(model, iter(jnp.full((), i) for i in range(count)))
    assert replaced["tied"][0] is replaced["mlp"].sublayers[0].sublayers[0].weights
    assert replaced["tied"][0] is not model["tied"][0]
    assert replaced["counter"].get_raw_value() == count - 3
    assert replaced["note"] == "v1"
