"""Malformed manifests give a bounded ``CorruptCheckpointError`` naming the checkpoint's manifest
file and the manifest path, with and without a target (findings 9 and 10 of issue 10).
"""

from __future__ import annotations

import contextlib
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from pz_flax._compat import nnx as nnx_compat
from pz_flax.checkpoint import errors
from pz_flax.checkpoint import manifest as manifest_lib
from pz_flax.checkpoint import static_codec
from pz_flax.checkpoint import storage
from pz_flax.core import named_axes
from tests.checkpoint import sample_models


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("malformed") / "ckpt"
    model = sample_models.build_stateful()
    storage.save(directory, model)
    return directory, model


@contextlib.contextmanager
def _manifest_text(saved, text):
    """The saved checkpoint with its manifest file replaced by ``text`` for the duration."""
    manifest_file = saved[0] / "manifest" / "metadata"
    original = manifest_file.read_text()
    manifest_file.write_text(text)
    try:
        yield
    finally:
        manifest_file.write_text(original)


def _edited(saved, edit):
    checkpoint, _ = saved
    manifest = json.loads((checkpoint / "manifest" / "metadata").read_text())
    edit(manifest)
    return manifest


def _restore_both_ways(saved):
    checkpoint, model = saved
    for target in (None, model):
        with pytest.raises(errors.CorruptCheckpointError) as caught:
            storage.restore(checkpoint, target)
        message = str(caught.value)
        assert "manifest/metadata" in message, message
        assert len(message) < 3000
        yield message


def _deep(depth):
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda m: m["root"]["dict"][0].__setitem__(1, json.loads(_deep(500))), "root/dict/0"),
        (lambda m: m["arrays"][0].__setitem__("shape", [float("inf"), 2]), None),
        (lambda m: m["arrays"][0].__setitem__("dtype", []), "arrays/0"),
        (lambda m: m["arrays"][0].__setitem__("prng_impl", 3), "arrays/0"),
        (lambda m: m["arrays"][0].__setitem__("prng_impl", {"a": 1}), "arrays/0"),
        (lambda m: m["root"]["dict"][0][1].__setitem__("struct", 7), "root/dict/0"),
        (
            lambda m: m["root"]["dict"][0][1]["static"].__setitem__(
                "x", {"treedef": {"type": {"class": "mymodels:Unregistered"}}}
            ),
            "root/dict/0",
        ),
        (lambda m: m.__setitem__("format_version", 10**30), None),
        (lambda m: m.pop("root"), None),
        (lambda m: m["root"].__setitem__("dict", "nope"), "root"),
    ],
)
def test_malformed_manifests_are_corrupt_checkpoint_errors(saved, mutate, where):
    with _manifest_text(saved, json.dumps(_edited(saved, mutate))):
        for message in _restore_both_ways(saved):
            if where is not None:
                assert f"manifest path {where}" in message, message


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,  # deeper than the JSON parser's recursion
        '{"format": "pz_flax.checkpoint", "format_version": ' + "9" * 5000 + "}",
        '{"format": "pz_flax.checkpoint", "format_version": 2, "x": Infinity}',
        '{"format": "pz_flax.checkpoint", "format_version": NaN}',
        "\xff\xfe not json",
    ],
)
def test_unparsable_manifests(saved, text):
    with _manifest_text(saved, text):
        for message in _restore_both_ways(saved):
            assert "damaged" in message


def test_not_a_manifest_names_the_file(saved):
    with _manifest_text(saved, json.dumps({"format": "something else"})):
        for message in _restore_both_ways(saved):
            assert "not a pz_flax checkpoint manifest" in message


def test_huge_values_give_bounded_messages(saved):
    def huge(manifest):
        manifest["arrays"][0]["label"] = {"x" * 10_000_000: 1}
        manifest["root"]["dict"][0][1]["struct"] = "m" * 10_000_000 + ":X"

    with _manifest_text(saved, json.dumps(_edited(saved, huge))):
        list(_restore_both_ways(saved))


def test_mismatch_reports_are_bounded(tmp_path):
    many = {f"w{i}": jnp.ones(2) for i in range(500)}
    storage.save(tmp_path / "ckpt", many)
    other = {f"w{i}": jnp.ones(3) for i in range(500)}
    with pytest.raises(errors.CheckpointMismatchError) as caught:
        storage.restore(tmp_path / "ckpt", jax.eval_shape(lambda: other))
    assert len(caught.value.mismatches) == 500
    assert all(len(line) < 600 for line in caught.value.mismatches)


#### Internal errors are not damage ####


def _raise(exception_type):
    def broken(*args, **kwargs):
        raise exception_type("a bug inside pz_flax")

    return broken


@pytest.mark.parametrize("exception_type", [TypeError, KeyError, AttributeError, ValueError])
@pytest.mark.parametrize(
    "module, function_name",
    [
        (manifest_lib, "_check_field_types"),
        (static_codec, "decode_variable_metadata"),
        (static_codec, "check_variable_class"),
    ],
)
def test_an_internal_error_surfaces_as_itself(
    saved, monkeypatch, exception_type, module, function_name
):
    # A pz_flax bug (or a library change) while decoding a sound manifest must not read as a
    # damaged checkpoint: the user would throw away a good checkpoint.
    monkeypatch.setattr(module, function_name, _raise(exception_type))
    checkpoint, model = saved
    for target in (None, model):
        with pytest.raises(exception_type, match="a bug inside pz_flax"):
            storage.restore(checkpoint, target)


def test_damage_found_by_the_classes_themselves_is_chained():
    # A named array whose axis sizes disagree with its data: the class's own check says so.
    named = named_axes.wrap(jnp.ones((2, 3))).tag("a", "b")
    encoded = manifest_lib.encode(named)
    encoded.manifest["root"]["static"]["named_axes"]["ordered_dict"][1][1] = 4
    with pytest.raises(errors.CorruptCheckpointError, match="invalid named array") as caught:
        manifest_lib.decode(encoded.manifest, encoded.arrays, allow_modules=(), source="ckpt")
    assert "manifest path root" in str(caught.value)
    cause = caught.value.__cause__
    while cause is not None and not isinstance(cause, ValueError):
        cause = cause.__cause__
    assert isinstance(cause, ValueError)


def test_variables_lacking_nnx_required_metadata_get_nnx_defaults():
    # A manifest written by an older flax (or by hand) may lack entries NNX now requires on
    # every variable; NNX's own defaults fill them in, rather than a KeyError deep in NNX.
    encoded = manifest_lib.encode({"p": nnx.Param(jnp.ones(4))})
    variable_node = encoded.manifest["root"]["dict"][0][1]
    variable_node["metadata"] = [["note", "kept"]]
    restored = manifest_lib.decode(encoded.manifest, encoded.arrays, allow_modules=())
    metadata = restored["p"].get_metadata()
    assert metadata["note"] == "kept"
    assert nnx_compat.nnx_metadata_keys().required <= metadata.keys()
    assert metadata == nnx.Param(jnp.ones(4), note="kept").get_metadata()
