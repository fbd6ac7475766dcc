"""Tests for pz_flax.checkpoint.nnx_checkpoints: plain NNX checkpoints to and from pz_flax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import nnx_checkpoints
from pz_flax.checkpoint import storage
from pz_flax.core import named_axes
from pz_flax.interop import to_nnx
from tests.checkpoint import sample_models


def _save_nnx(path, module):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, nnx.state(module))
    checkpointer.wait_until_finished()


def _assert_states_identical(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(nnx.state(a) if isinstance(a, nnx.Module) else a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(nnx.state(b) if isinstance(b, nnx.Module) else b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def nnx_checkpoint(tmp_path_factory):
    module = sample_models.make_nnx_model()
    path = tmp_path_factory.mktemp("nnx") / "ckpt"
    _save_nnx(path, module)
    return module, path


def test_nnx_to_pz_to_nnx_is_bit_identical(nnx_checkpoint, tmp_path):
    module, path = nnx_checkpoint
    layer = nnx_checkpoints.read_nnx_checkpoint(path, sample_models.make_nnx_model)
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    out = layer(named_axes.wrap(x).tag("seq", "features")).unwrap("seq", "features")
    np.testing.assert_allclose(out, module(x), rtol=1e-6)

    storage.save(tmp_path / "pz", layer)
    restored = storage.restore(tmp_path / "pz")
    nnx_checkpoints.write_nnx_checkpoint(tmp_path / "nnx2", restored)
    # Plain Orbax, no pz_flax involved, restores it into the NNX model's abstract state.
    abstract = nnx.state(nnx.eval_shape(sample_models.make_nnx_model))
    state = ocp.StandardCheckpointer().restore(tmp_path / "nnx2", abstract)
    _assert_states_identical(state, nnx.state(module))
    _assert_states_identical(to_nnx(restored), module)


def test_load_nnx_module_into_a_sharding(nnx_checkpoint):
    module, path = nnx_checkpoint
    mesh = jax.make_mesh((8,), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    loaded = nnx_checkpoints.load_nnx_module(
        path, sample_models.make_nnx_model, sharding=replicated
    )
    assert type(loaded) is type(module)
    assert all(leaf.sharding == replicated for leaf in jax.tree_util.tree_leaves(nnx.state(loaded)))
    _assert_states_identical(loaded, module)


def test_wrong_factory_reports_every_differing_path(nnx_checkpoint):
    _, path = nnx_checkpoint
    with pytest.raises(errors.CheckpointMismatchError) as caught:
        nnx_checkpoints.load_nnx_module(path, sample_models.make_wider_nnx_model)
    text = "\n".join(caught.value.mismatches)
    assert "layers/0/kernel/value: shape (3, 5) in the checkpoint, (3, 6) in the model" in text
    assert "layers/2/scale/value: shape (5,)" in text
    with pytest.raises(errors.CheckpointMismatchError, match="not in the model"):
        nnx_checkpoints.load_nnx_module(path, lambda: nnx.Linear(3, 5, rngs=nnx.Rngs(0)))


def test_factory_errors_and_wrong_inputs(nnx_checkpoint, tmp_path):
    _, path = nnx_checkpoint

    def broken():
        raise RuntimeError("no weights today")

    with pytest.raises(errors.CheckpointError, match=r"factory.*no weights today"):
        nnx_checkpoints.load_nnx_module(path, broken)
    with pytest.raises(errors.CheckpointError, match=r"not an nnx\.Module"):
        nnx_checkpoints.load_nnx_module(path, lambda: jnp.ones(2))
    with pytest.raises(errors.CheckpointNotFoundError, match="does not exist"):
        nnx_checkpoints.load_nnx_module(tmp_path / "nothing", sample_models.make_nnx_model)
    storage.save(tmp_path / "pz", {"w": jnp.ones(2)})
    with pytest.raises(errors.CheckpointNotFoundError, match="is a pz_flax checkpoint"):
        nnx_checkpoints.load_nnx_module(tmp_path / "pz", sample_models.make_nnx_model)
    with pytest.raises(errors.CheckpointNotFoundError, match="plain Orbax checkpoint"):
        storage.restore(path)


def test_write_is_atomic_and_refuses_to_overwrite(nnx_checkpoint, tmp_path):
    module, _ = nnx_checkpoint
    destination = tmp_path / "out"
    nnx_checkpoints.write_nnx_checkpoint(destination, module)
    with pytest.raises(errors.CheckpointExistsError, match="already exists"):
        nnx_checkpoints.write_nnx_checkpoint(destination, module)
    nnx_checkpoints.write_nnx_checkpoint(destination, module, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(errors.UnsupportedValueError, match="no arrays"):
        nnx_checkpoints.write_nnx_checkpoint(tmp_path / "empty", nnx.Sequential(nnx.relu))


def test_native_pz_layer_as_nnx_checkpoint(tmp_path):
    layer = sample_models.build_mlp()
    nnx_checkpoints.write_nnx_checkpoint(tmp_path / "nnx", layer)
    abstract = nnx.state(nnx.eval_shape(lambda: to_nnx(sample_models.build_mlp())))
    state = ocp.StandardCheckpointer().restore(tmp_path / "nnx", abstract)
    _assert_states_identical(state, nnx.state(to_nnx(layer)))


class _ModelWithRngs(nnx.Module):
    """A model holding typed PRNG key arrays (nnx.Rngs state), as dropout models do."""

    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=7))


def test_nnx_checkpoint_with_prng_key_arrays_reads_back(tmp_path):
    module = _ModelWithRngs(nnx.Rngs(0))
    module.dropout.rngs()  # advance the stream: the count must come back too
    _save_nnx(tmp_path / "nnx", module)
    loaded = nnx_checkpoints.load_nnx_module(tmp_path / "nnx", lambda: _ModelWithRngs(nnx.Rngs(1)))
    original_keys = jax.tree_util.tree_leaves(nnx.state(module, nnx.RngKey))
    loaded_keys = jax.tree_util.tree_leaves(nnx.state(loaded, nnx.RngKey))
    assert [key.dtype for key in loaded_keys] == [key.dtype for key in original_keys]
    for a, b in zip(original_keys, loaded_keys):
        np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
    assert int(loaded.dropout.rngs.count[...]) == 1
    np.testing.assert_array_equal(loaded.linear.kernel[...], module.linear.kernel[...])
    layer = nnx_checkpoints.read_nnx_checkpoint(
        tmp_path / "nnx", lambda: _ModelWithRngs(nnx.Rngs(1))
    )
    converted_keys = [
        leaf
        for leaf in jax.tree_util.tree_leaves(layer)
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    ]
    assert len(converted_keys) == len(original_keys)


def test_read_defaults_to_this_process_first_local_device(nnx_checkpoint):
    _, path = nnx_checkpoint
    loaded = nnx_checkpoints.load_nnx_module(path, sample_models.make_nnx_model)
    for leaf in jax.tree_util.tree_leaves(nnx.state(loaded)):
        assert leaf.sharding.device_set == {jax.local_devices()[0]}


def test_edited_stored_dtype_of_an_nnx_checkpoint_is_caught(nnx_checkpoint, tmp_path):
    import json
    import shutil

    import tensorstore as ts

    _, path = nnx_checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{copy}"}).result()
    key = "layers.0.kernel.value/.zarray"
    metadata = json.loads(store.read(key).result().value)
    store.write(key, json.dumps({**metadata, "dtype": ">f4"}).encode()).result()
    with pytest.raises(
        errors.CorruptCheckpointError, match=r"layers/0/kernel/value: stored dtype '>f4'"
    ):
        nnx_checkpoints.load_nnx_module(copy, sample_models.make_nnx_model)


def test_nnx_checkpoint_without_ocdbt_loads(tmp_path):
    # Orbax's per-array layout (``use_ocdbt=False``, the default of older Orbax releases): the
    # stored-metadata check must find each array's zarr metadata there too.
    module = sample_models.make_nnx_model()
    # The PyTree handler (which the standard one wraps) takes `use_ocdbt` in every supported
    # Orbax release; the standard handler does not in 0.11.20, the oldest supported.
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False))
    checkpointer.save(tmp_path / "ckpt", args=ocp.args.PyTreeSave(nnx.state(module)))
    assert not (tmp_path / "ckpt" / "manifest.ocdbt").exists()
    restored = nnx_checkpoints.load_nnx_module(tmp_path / "ckpt", sample_models.make_nnx_model)
    _assert_states_identical(restored, module)
