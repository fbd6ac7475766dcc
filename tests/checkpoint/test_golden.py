"""Checkpoints written by every released manifest format keep restoring, bit for bit.

The golden checkpoints under ``golden/format1/`` were written by the format-1 release
(``golden/make_format1_goldens.py``); they must restore with today's code, without a target
and into a freshly built target, with every stored array bit for bit, and compute the outputs
that release computed (up to the last-place rounding of XLA's kernels, which changes between
jax releases).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pz_flax.checkpoint import storage
from pz_flax.core import named_axes
from tests.checkpoint.golden import make_format1_goldens as goldens

_FORMAT1 = pathlib.Path(__file__).parent / "golden" / "format1"


def _inputs(case: str) -> named_axes.NamedArray:
    _, reference = goldens.CASES[case]()
    stored = np.load(_FORMAT1 / f"{case}.input.npy")
    np.testing.assert_array_equal(stored, np.asarray(reference.unwrap(*reference.named_shape)))
    return named_axes.wrap(stored).tag(*reference.named_shape)


def _assert_matches_golden_output(output: np.ndarray, expected: np.ndarray) -> None:
    # np.save keeps bfloat16 as raw 2-byte records: reinterpret them as the output's dtype.
    assert output.shape == expected.shape
    assert output.dtype.itemsize == expected.dtype.itemsize
    expected = expected.view(output.dtype)
    # XLA's elementwise kernels (tanh, exp, ...) may move a result by an ulp between jax
    # releases: a few ulps of the output's dtype, relative to the output's scale, is rounding.
    eps = float(jax.numpy.finfo(output.dtype).eps)
    expected_32, output_32 = expected.astype(np.float32), output.astype(np.float32)
    scale = float(np.abs(expected_32).max())
    np.testing.assert_allclose(output_32, expected_32, rtol=4 * eps, atol=4 * eps * scale)


def _array_bytes(leaves) -> list[tuple[tuple[int, ...], str, bytes]]:
    # A restored model's leaves also hold its static settings (strings, Python numbers), and a
    # variable shared by two parts of the model (stored once) appears once per part.
    unique = {id(leaf): leaf for leaf in leaves if isinstance(leaf, jax.Array | np.ndarray)}
    arrays = [np.asarray(leaf) for leaf in unique.values()]
    return sorted((array.shape, str(array.dtype), array.tobytes()) for array in arrays)


def _stored_array_bytes(case: str) -> list[tuple[tuple[int, ...], str, bytes]]:
    # The arrays as plain Orbax reads them from the checkpoint, independent of pz_flax.
    stored = ocp.PyTreeCheckpointer().restore((_FORMAT1 / case / storage.ARRAYS_ITEM).resolve())
    return _array_bytes(jax.tree_util.tree_leaves(stored))


@pytest.mark.parametrize("case", sorted(goldens.CASES))
def test_format1_checkpoints_restore_bit_exactly(case):
    manifest = json.loads((_FORMAT1 / case / "manifest" / "metadata").read_text())
    assert manifest["format_version"] == 1
    restored = storage.restore(_FORMAT1 / case)
    assert _array_bytes(jax.tree_util.tree_leaves(restored)) == _stored_array_bytes(case)
    output = goldens.run_case(restored, _inputs(case))
    _assert_matches_golden_output(output, np.load(_FORMAT1 / f"{case}.output.npy"))


# ``from_nnx`` itself evolves (its wrappers gain settings), so a wrapped module converted
# today is a different target; checkpoints of natively built pz_flax models must fit.
@pytest.mark.parametrize("case", sorted(set(goldens.CASES) - {"wrapped_nnx"}))
def test_format1_checkpoints_restore_into_todays_models(case):
    target, _ = goldens.CASES[case]()
    restored = storage.restore(_FORMAT1 / case, target=target)
    without_target = storage.restore(_FORMAT1 / case)
    leaves = zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(without_target))
    for got, want in leaves:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_format1_wrapped_modules_restore_under_pre_0_12_5_names(tmp_path):
    # flax 0.12.5 renamed flax.nnx.graph to flax.nnx.graphlib; format-1 checkpoints written
    # before that name the old module. The migration reads the graph types by short name.
    copy = tmp_path / "old_names"
    shutil.copytree(_FORMAT1 / "wrapped_nnx", copy)
    manifest_file = copy / "manifest" / "metadata"
    text = manifest_file.read_text().replace("flax.nnx.graphlib:", "flax.nnx.graph:")
    manifest_file.write_text(text.replace("flax.nnx.variablelib:", "flax.nnx.variables:"))
    restored = storage.restore(copy)
    output = goldens.run_case(restored, _inputs("wrapped_nnx"))
    _assert_matches_golden_output(output, np.load(_FORMAT1 / "wrapped_nnx.output.npy"))


def test_resaving_a_format1_checkpoint_writes_format2_with_versions(tmp_path):
    restored = storage.restore(_FORMAT1 / "wrapped_nnx")
    storage.save(tmp_path / "again", restored)
    manifest = json.loads((tmp_path / "again" / "manifest" / "metadata").read_text())
    assert manifest["format_version"] == 2
    assert set(manifest["writer"]) == {"pz_flax", "jax", "flax", "orbax-checkpoint"}
    text = json.dumps(manifest)
    assert "graphlib" not in text and "GraphDef" not in text
    assert '"flax.nnx:Conv"' in text and "flax.nnx.nn.linear" not in text
    again = storage.restore(tmp_path / "again")
    output = goldens.run_case(again, _inputs("wrapped_nnx"))
    _assert_matches_golden_output(output, np.load(_FORMAT1 / "wrapped_nnx.output.npy"))
