"""Seeded fuzzing of checkpoint manifests: no code runs, no raw crash, no unbounded message.

Each round takes a saved checkpoint's manifest, replaces one node somewhere in it with a
mutation (junk of every JSON type, deep nesting, huge numbers, gadgets: partials over
trusted-namespace functions, pz_flax internals, hooks), and restores it with and without a
target. Every outcome must be a restored model or a ``CheckpointError`` with a short
message; the marker file that the gadgets would write must never appear, and a restored model
must hold, at every path it shares with the saved one, exactly the saved array. A second test
does the same with Orbax's per-array (zarr) metadata: dtype, byte order, order, shape.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import shutil

import numpy as np
import pytest

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import manifest
from pz_flax.checkpoint import storage
from tests.checkpoint import sample_models

_ROUNDS = 500
_MAX_MESSAGE = 4000


def _gadgets(marker: str) -> list:
    return [
        {"function": "pz_flax.checkpoint.storage:save"},
        {"function": "builtins:open"},
        {"function": "os:system"},
        {"function": "jax.tree_util:tree_map"},
        {
            "partial": {
                "func": {"function": "pz_flax.checkpoint.storage:save"},
                "args": [marker],
                "keywords": [["force", True]],
            }
        },
        {
            "partial": {
                "func": {"function": "jax.tree_util:tree_map"},
                "args": [],
                "keywords": [["f", {"function": "builtins:print"}]],
            }
        },
        ["on_get_value", {"function": "builtins:exec"}],
        {"dataclass": "pz_flax.checkpoint.storage:ShardingSpec", "fields": []},
        {"struct": "subprocess:Popen", "fields": {}, "static": {}},
        {"type": "pz_flax.checkpoint.storage:os"},
        {"nnx_filter": "OfType", "args": [{"type": "pz_flax.checkpoint.storage:os"}]},
        {"nnx_filter": "Not", "args": [{"function": "builtins:exec"}]},
        {"state_axes": [[{"ellipsis": None}, {"function": "pz_flax.checkpoint.storage:save"}]]},
    ]


def _junk(rng: random.Random, marker: str):
    choices = [
        None,
        True,
        -1,
        10**300,
        1e308,
        "x" * rng.choice([0, 5, 100_000]),
        [],
        {},
        [[]] * 3,
        {"array": rng.randint(-2, 20)},
        {"literal": {"function": "jax.nn:relu"}},
        {"variable_ref": rng.randint(-1, 5)},
        {"dtype": []},
        {"tuple": 3},
        {"slice": [None, "a", 1]},
        {"float": "1e999"},
        {"enum": "jax.lax:Precision", "member": "NOPE"},
        {"nnx_module": "flax.nnx:Linear", "attributes": [{"name": "__class__"}]},
        {"ellipsis": rng.choice([None, 0])},
        {"nnx_filter": rng.choice(["All", "PathIn", "WithTag", 3]), "args": [rng.randint(-1, 2)]},
        {"state_axes": [[{"ellipsis": None}, rng.choice([0, -1, 2.5, "x", None])]]},
    ]
    nested = current = []
    for _ in range(rng.choice([1, 50, 2000])):
        current.append([])
        current = current[0]
    choices.append(nested)
    return rng.choice(choices + _gadgets(marker))


def _locations(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _locations(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _locations(item, (*path, index))


def _replace(manifest, path, new):
    if not path:
        return new
    node = manifest
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = new
    return manifest


def _arrays_by_path(model) -> dict[str, np.ndarray]:
    encoded = manifest.encode(model)
    return {entry.path: np.asarray(array) for entry, array in zip(encoded.entries, encoded.arrays)}


def _assert_no_array_moved(restored, expected: dict[str, np.ndarray]) -> None:
    """Whatever a mutation changed, no path of the model may hold another path's array."""
    for path, array in _arrays_by_path(restored).items():
        if path in expected:
            assert array.dtype == expected[path].dtype, path
            assert array.tobytes() == expected[path].tobytes(), path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    model = sample_models.build_stateful()
    storage.save(directory / "ckpt", model)
    return directory, model


def test_fuzzed_manifests_never_run_code_or_crash(saved):
    directory, model = saved
    checkpoint = directory / "ckpt"
    manifest_file = checkpoint / "manifest" / "metadata"
    original = json.loads(manifest_file.read_text())
    locations = list(_locations(original))
    marker = directory / "MARKER"
    target = model
    expected_arrays = _arrays_by_path(model)
    rng = random.Random(1234)
    outcomes = {"restored": 0, "refused": 0}
    for _ in range(_ROUNDS):
        mutated = copy.deepcopy(original)
        for _ in range(rng.choice([1, 1, 2])):
            # A second mutation may aim at a spot the first one removed.
            with contextlib.suppress(KeyError, IndexError, TypeError):
                mutated = _replace(mutated, rng.choice(locations), _junk(rng, str(marker)))
        try:
            text = json.dumps(mutated)
        except (RecursionError, ValueError):
            continue
        manifest_file.write_text(text)
        for kwargs in ({}, {"target": target}):
            try:
                restored = storage.restore(checkpoint, **kwargs)
                outcomes["restored"] += 1
                _assert_no_array_moved(restored, expected_arrays)
            except errors.CheckpointError as exc:
                outcomes["refused"] += 1
                assert len(str(exc)) < _MAX_MESSAGE, str(exc)[:500]
            assert not marker.exists()
    manifest_file.write_text(json.dumps(original))
    assert outcomes["refused"] > _ROUNDS


_ZARR_MUTATIONS = {
    "dtype": ["<i4", "<u4", ">f4", "<f8", "|b1", "<f2", "bogus", 7, None],
    "order": ["F", "X", None],
    "shape": [[1], [2, 2, 2], [10**12], [-1], "8", None],
    "chunks": [[1], [10**9], None],
    "fill_value": ["NaN", 10**400, [1]],
    "zarr_format": [3, "2", None],
}


def test_fuzzed_stored_array_metadata_never_restores_wrong_values(saved, tmp_path):
    from tests.checkpoint.test_storage import _edit_stored_zarr_metadata

    directory, model = saved
    expected_arrays = _arrays_by_path(model)
    entries = manifest.encode(model).entries
    rng = random.Random(99)
    refused = 0
    for round_index in range(_ROUNDS // 10):
        copy_dir = tmp_path / f"round{round_index}"
        shutil.copytree(directory / "ckpt", copy_dir)
        entry = rng.choice(entries)
        field = rng.choice(sorted(_ZARR_MUTATIONS))
        _edit_stored_zarr_metadata(
            copy_dir, ".".join(entry.key), **{field: rng.choice(_ZARR_MUTATIONS[field])}
        )
        for target in (None, model):
            try:
                restored = storage.restore(copy_dir, target)
            except errors.CheckpointError as exc:
                refused += 1
                assert len(str(exc)) < _MAX_MESSAGE, str(exc)[:500]
            else:
                _assert_no_array_moved(restored, expected_arrays)
        shutil.rmtree(copy_dir)
    assert refused > _ROUNDS // 10
