"""Canaries for what pz_flax assumes about the files Orbax writes.

``pz_flax._compat.orbax`` knows two things about Orbax's on-disk layout that Orbax has no public
API for: which files mark a finished checkpoint directory, and where each array's zarr metadata
lives. These tests write checkpoints with plain Orbax, as an NNX user does, and fail naming the
assumption if a release of orbax-checkpoint changes either.
"""

from __future__ import annotations

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from etils import epath

from pz_flax._compat import orbax as orbax_compat
from pz_flax.checkpoint import storage

FINISHED_ASSUMPTION = (
    "pz_flax._compat.orbax assumes a finished Orbax checkpoint directory holds one of"
    f" {orbax_compat.FINISHED_CHECKPOINT_FILES}"
)


def _save(directory: epath.Path, tree, *, use_ocdbt: bool) -> epath.Path:
    # The PyTree handler takes ``use_ocdbt`` in every supported Orbax release (the standard
    # handler, which wraps it, does not in 0.11.20, the oldest supported).
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt))
    checkpointer.save(directory, args=ocp.args.PyTreeSave(tree))
    return directory


@pytest.fixture(scope="module")
def tree():
    return {"layer": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "bias": np.ones(3)}


@pytest.mark.parametrize("use_ocdbt", [True, False])
def test_a_finished_orbax_checkpoint_is_recognised(tmp_path, tree, use_ocdbt):
    path = _save(epath.Path(tmp_path / "ckpt"), tree, use_ocdbt=use_ocdbt)
    assert orbax_compat.is_finished_checkpoint(path), FINISHED_ASSUMPTION
    assert orbax_compat.holds_ocdbt_database(path) == use_ocdbt, (
        "pz_flax._compat.orbax assumes Orbax's OCDBT arrays are marked by a manifest.ocdbt file"
    )


def test_an_ordinary_directory_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert not orbax_compat.is_finished_checkpoint(epath.Path(tmp_path))


@pytest.mark.parametrize("use_ocdbt", [True, False])
def test_each_arrays_zarr_metadata_is_where_pz_flax_reads_it(tmp_path, tree, use_ocdbt):
    path = _save(epath.Path(tmp_path / "ckpt"), tree, use_ocdbt=use_ocdbt)
    store = ts.KvStore.open(storage.array_kvstore_spec(path)).result()
    for key_path, array in (
        (("layer", "kernel"), tree["layer"]["kernel"]),
        (("bias",), tree["bias"]),
    ):
        found = [
            store.read(key).result().value for key in orbax_compat.array_metadata_keys(key_path)
        ]
        raw = next((value for value in found if value), None)
        assert raw is not None, f"{orbax_compat.LAYOUT_ASSUMPTION}; nothing for {key_path}"
        metadata = json.loads(raw)
        assert metadata["shape"] == list(array.shape), orbax_compat.LAYOUT_ASSUMPTION
