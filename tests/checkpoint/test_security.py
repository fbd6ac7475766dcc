"""A checkpoint names only data: no function outside the allow-list, no partial gadget, no
hook, no swapped array, no value of the wrong kind (findings 1-3, 8 and 11 of issue 10); and
what real NNX models hold (bias-free layers, sharding annotations: 16, 17) saves.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import functions
from pz_flax.checkpoint import storage
from pz_flax.checkpoint import type_registry
from pz_flax.interop import convert
from pz_flax.nn import basic_ops
from pz_flax.nn import grouping
from pz_flax.nn import standardization


def _manifest_file(path):
    return path / "manifest" / "metadata"


def _edit(path, edit):
    manifest = json.loads(_manifest_file(path).read_text())
    edit(manifest)
    _manifest_file(path).write_text(json.dumps(manifest))


def _saved_elementwise(tmp_path):
    checkpoint = tmp_path / "ckpt"
    storage.save(checkpoint, grouping.Sequential([basic_ops.Elementwise(jax.nn.relu)]))
    return checkpoint


def _set_fn(encoded_fn):
    def edit(manifest):
        layer = manifest["root"]["fields"]["sublayers"]["list"][0]
        layer["static"]["fn"] = encoded_fn

    return edit


@pytest.mark.parametrize(
    "encoded_fn",
    [
        # Finding 3: a partial over pz_flax's own save deletes a directory on use.
        {
            "partial": {
                "func": {"function": "pz_flax.checkpoint.storage:save"},
                "args": ["VICTIM"],
                "keywords": [["force", True]],
            }
        },
        # Finding 1: partial chains over trusted-namespace functions.
        {
            "partial": {
                "func": {"function": "jax.tree_util:tree_map"},
                "args": [],
                "keywords": [],
            }
        },
        {
            "partial": {
                "func": {
                    "partial": {
                        "func": {"function": "jax.nn:relu"},
                        "args": [],
                        "keywords": [],
                    }
                },
                "args": [],
                "keywords": [],
            }
        },
        # A partial over an allow-listed function whose argument is not a literal.
        {
            "partial": {
                "func": {"function": "jax.nn:gelu"},
                "args": [{"function": "jax.nn:relu"}],
                "keywords": [],
            }
        },
        {"function": "jax.tree_util:tree_map"},
        {"function": "operator:methodcaller"},
        {"function": "pz_flax.checkpoint.storage:save"},
        {"function": "builtins:exec"},
    ],
)
def test_functions_outside_the_allow_list_are_refused(tmp_path, encoded_fn):
    checkpoint = _saved_elementwise(tmp_path)
    victim = tmp_path / "VICTIM"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    _edit(checkpoint, _set_fn(encoded_fn))
    with pytest.raises((errors.UntrustedTypeError, errors.CorruptCheckpointError)):
        storage.restore(checkpoint)
    assert (victim / "precious.txt").read_text() == "keep"


def test_allow_listed_partials_with_literal_arguments_restore(tmp_path):
    layer = basic_ops.Elementwise(functools.partial(jax.nn.leaky_relu, negative_slope=0.3))
    storage.save(tmp_path / "ckpt", layer)
    restored = storage.restore(tmp_path / "ckpt")
    assert restored.fn.func is jax.nn.leaky_relu and restored.fn.keywords == {"negative_slope": 0.3}


def test_registered_functions_restore_until_unregistered(tmp_path):
    storage.save(tmp_path / "ckpt", basic_ops.Elementwise(np.tanh))
    with pytest.raises(errors.UntrustedTypeError, match="register_function"):
        storage.restore(tmp_path / "ckpt")
    with type_registry.trusted_objects.isolated():
        assert functions.register_function(np.tanh) is np.tanh
        assert storage.restore(tmp_path / "ckpt").fn is np.tanh
        assert functions.unregister_function(np.tanh) is np.tanh
        with pytest.raises(errors.UntrustedTypeError):
            storage.restore(tmp_path / "ckpt")
        with pytest.raises(KeyError, match="numpy:tanh"):
            functions.unregister_function(np.tanh)
    with pytest.raises(errors.UnsupportedValueError):
        functions.register_function(functools.partial(np.tanh))


def test_a_scoped_function_is_trusted_inside_the_block_only(tmp_path):
    storage.save(tmp_path / "ckpt", basic_ops.Elementwise(np.tanh))
    name = type_registry.registration_name(np.tanh)
    with type_registry.trusted_objects.scoped(name, np.tanh):
        assert storage.restore(tmp_path / "ckpt").fn is np.tanh
    assert name not in type_registry.trusted_objects
    with pytest.raises(errors.UntrustedTypeError):
        storage.restore(tmp_path / "ckpt")


def _hooked_parameter(hook_key):
    param = nnx.Param(jnp.ones(3))
    metadata = {**param.get_metadata(), hook_key: jax.nn.relu}
    return nnx.Param.from_metadata(jnp.ones(3), metadata)


@pytest.mark.parametrize("hook_key", ["on_get_value", "on_set_value", "get_value_hooks"])
def test_variable_hooks_are_never_saved(tmp_path, hook_key):
    with pytest.raises(errors.UnsupportedValueError, match="hook"):
        storage.save(tmp_path / "ckpt", {"w": _hooked_parameter(hook_key)})
    assert not (tmp_path / "ckpt").exists()


def test_variable_hooks_in_a_manifest_are_refused(tmp_path):
    storage.save(tmp_path / "ckpt", {"w": nnx.Param(jnp.ones(3))})

    def add_hook(manifest):
        variable = manifest["root"]["dict"][0][1]
        variable["metadata"].append(["on_get_value", {"function": "jax.nn:relu"}])

    _edit(tmp_path / "ckpt", add_hook)
    with pytest.raises(errors.CorruptCheckpointError, match="hook"):
        storage.restore(tmp_path / "ckpt")


def test_swapped_array_references_are_caught(tmp_path):
    model = {"a": jnp.zeros(3), "b": jnp.ones(3)}
    storage.save(tmp_path / "ckpt", model)

    def swap(manifest):
        pairs = manifest["root"]["dict"]
        pairs[0][1], pairs[1][1] = pairs[1][1], pairs[0][1]

    _edit(tmp_path / "ckpt", swap)
    with pytest.raises(errors.CorruptCheckpointError, match="swapped"):
        storage.restore(tmp_path / "ckpt")
    with pytest.raises(errors.CorruptCheckpointError, match="swapped"):
        storage.restore(tmp_path / "ckpt", target=model)


@pytest.mark.parametrize("bad", [{"function": "jax.nn:relu"}, "a string", [1]])
def test_static_fields_are_type_checked(tmp_path, bad):
    layer = standardization.RMSStandardize(across=("features",), epsilon=1e-6)
    storage.save(tmp_path / "ckpt", layer)

    def corrupt_epsilon(manifest):
        root = manifest["root"]
        where = root["static"] if "epsilon" in root["static"] else root["fields"]
        where["epsilon"] = bad if "epsilon" in root["static"] else {"literal": bad}

    _edit(tmp_path / "ckpt", corrupt_epsilon)
    with pytest.raises(errors.CorruptCheckpointError):
        storage.restore(tmp_path / "ckpt")
    with pytest.raises(errors.CheckpointError):
        storage.restore(tmp_path / "ckpt", target=jax.eval_shape(lambda: layer))


@pytest.mark.parametrize("layer_cls", [nnx.Linear, nnx.Conv])
def test_bias_free_wrapped_modules_save_and_restore(tmp_path, layer_cls):
    kwargs = {"kernel_size": (1,)} if layer_cls is nnx.Conv else {}
    module = nnx.Sequential(layer_cls(3, 4, use_bias=False, rngs=nnx.Rngs(0), **kwargs))
    model = convert.from_nnx(module)
    storage.save(tmp_path / "ckpt", model)
    restored = storage.restore(tmp_path / "ckpt")
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(model)
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(model)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_sharding_metadata_round_trips(tmp_path):
    mesh = jax.make_mesh((2,), ("model",))
    spec = jax.sharding.PartitionSpec("model", None)
    model = {
        "spec": nnx.Param(jnp.ones((2, 3)), out_sharding=("model", None), eager_sharding=False),
        "named": nnx.Param(
            jnp.ones((2, 3)),
            out_sharding=jax.sharding.NamedSharding(mesh, spec),
            eager_sharding=False,
        ),
        "pspec": nnx.Param(jnp.ones((2, 3)), out_sharding=spec, eager_sharding=False),
    }
    storage.save(tmp_path / "ckpt", model)
    restored = storage.restore(tmp_path / "ckpt")
    assert restored["spec"].get_metadata()["out_sharding"] == ("model", None)
    assert restored["pspec"].get_metadata()["out_sharding"] == spec
    named = restored["named"].get_metadata()["out_sharding"]
    assert named.spec == spec and dict(named.mesh.shape) == {"model": 2}


@pytest.mark.parametrize(
    "fn",
    [
        jax.nn.gelu,
        jax.nn.relu,
        jnp.tanh,
        jax.nn.softmax,
        jax.lax.dot_general,
        jax.lax.conv_general_dilated,
        jax.checkpoint_policies.dots_saveable,
    ],
)
def test_the_allow_list_covers_what_layers_hold(fn):
    name = functions.function_name(fn, "p")
    assert ":" in name and "._" not in name
    assert functions.resolve_function(name, allow_modules=(), path="p") is fn
