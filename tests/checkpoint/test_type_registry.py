"""Tests for pz_flax.checkpoint.type_registry: naming objects and resolving names safely."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import functions
from pz_flax.checkpoint import storage
from pz_flax.checkpoint import type_registry
from pz_flax.core import variables
from pz_flax.nn import basic_ops
from pz_flax.nn import grouping


def test_qualified_names_prefer_public_aliases():
    assert functions.function_name(jax.nn.relu, "p") == "jax.nn:relu"
    assert functions.function_name(jnp.tanh, "p") == "jax.numpy:tanh"
    assert type_registry.qualified_name(nnx.Linear, what="c", path="p") == "flax.nnx:Linear"
    assert type_registry.qualified_name(nnx.Param, what="c", path="p") == "flax.nnx:Param"
    assert (
        type_registry.qualified_name(grouping.Sequential, what="c", path="p")
        == "pz_flax.nn.grouping:Sequential"
    )


def test_qualified_name_refuses_what_cannot_be_found_again():
    def local_function(x):
        return x

    with pytest.raises(errors.UnsupportedValueError, match=r"at/here.*inside functions"):
        type_registry.qualified_name(local_function, what="function", path="at/here")
    with pytest.raises(errors.UnsupportedValueError, match="no __module__"):
        type_registry.qualified_name(object(), what="function", path="p")


def test_resolve_own_and_library_names():
    assert type_registry.resolve("pz_flax.nn.grouping:Sequential", "struct") is grouping.Sequential
    assert type_registry.resolve("pz_flax.core.variables:Parameter", "variable") is (
        variables.Parameter
    )
    assert functions.resolve_function("jax.nn:relu", allow_modules=(), path="p") is jax.nn.relu
    assert type_registry.resolve("flax.nnx:Linear", "type") is nnx.Linear
    # Defining-module names of library classes are not accepted: they move between releases.
    with pytest.raises(errors.UntrustedTypeError):
        type_registry.resolve("flax.nnx.nn.linear:Linear", "type")


def test_resolve_checks_the_kind():
    with pytest.raises(errors.CorruptCheckpointError, match="as a struct"):
        type_registry.resolve("pz_flax.core.variables:Parameter", "struct")
    with pytest.raises(errors.CorruptCheckpointError, match="as a variable"):
        type_registry.resolve("pz_flax.nn.grouping:Sequential", "variable")
    with pytest.raises(errors.CorruptCheckpointError, match="as a function"):
        type_registry.resolve(
            "pz_flax.nn.grouping:Sequential", "function", allow_modules=["pz_flax"]
        )


def test_library_modules_are_not_trusted_for_layer_classes():
    with pytest.raises(errors.UntrustedTypeError, match="allow_modules=\\['flax'\\]"):
        type_registry.resolve("flax.nnx.nn.linear:Linear", "struct")


def test_trusted_modules_are_no_stepping_stone():
    # pz_flax.checkpoint.storage imports ``os``; the name must not reach os.system through it.
    with pytest.raises(errors.CorruptCheckpointError):
        type_registry.resolve(
            "pz_flax.checkpoint.storage:os.system", "function", allow_modules=["pz_flax"]
        )
    with pytest.raises(errors.CorruptCheckpointError):
        type_registry.resolve("pz_flax.checkpoint.storage:shutil", "type")
    # A re-exported name whose object lives elsewhere is refused for classes.
    with pytest.raises(errors.CorruptCheckpointError, match="does not refer"):
        type_registry.resolve("pz_flax.nn.grouping:struct", "type")
    with pytest.raises(errors.UntrustedTypeError):
        type_registry.resolve("os:system", "function")
    with pytest.raises(errors.UntrustedTypeError):
        type_registry.resolve("builtins:eval", "function")


@pytest.mark.parametrize("name", ["no_colon", "a:b:c", "1bad:Name", "ok:bad name", 42])
def test_malformed_names(name):
    with pytest.raises(errors.CorruptCheckpointError):
        type_registry.resolve(name, "struct")


def test_planted_module_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported.txt"
    planted = tmp_path / "planted_payload.py"
    planted.write_text(
        f"open({str(marker)!r}, 'w').write('pwned')\n"
        "from pz_flax.nn.grouping import Sequential as Evil\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = tmp_path / "ckpt"
    storage.save(checkpoint, grouping.Sequential([basic_ops.Elementwise(jax.nn.relu)]))
    manifest_file = checkpoint / "manifest" / "metadata"
    for field, planted_name in [
        ("struct", "planted_payload:Evil"),
        ("fn", "planted_payload:Evil"),
    ]:
        manifest = json.loads(manifest_file.read_text())
        if field == "struct":
            manifest["root"]["struct"] = planted_name
        else:
            layer = manifest["root"]["fields"]["sublayers"]["list"][0]
            layer["static"]["fn"] = {"function": planted_name}
        manifest_file.write_text(json.dumps(manifest))
        with pytest.raises(errors.UntrustedTypeError) as caught:
            storage.restore(checkpoint)
        message = str(caught.value)
        assert "planted_payload.Evil" in message
        assert "allow_modules=['planted_payload']" in message
        assert "planted_payload" not in sys.modules
        assert not marker.exists()


def test_allow_modules_admits_a_module_and_its_submodules(tmp_path, monkeypatch):
    package = tmp_path / "user_models"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "layers.py").write_text(
        "import dataclasses\n"
        "from pz_flax.core import struct\n"
        "from pz_flax.nn import layer\n"
        "@struct.pytree_dataclass\n"
        "class Double(layer.Layer):\n"
        "    factor: float = dataclasses.field(metadata={'pytree_node': False})\n"
        "    def __call__(self, x, **side_inputs):\n"
        "        return x * self.factor\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from user_models import layers

    storage.save(tmp_path / "ckpt", layers.Double(2.0))
    with pytest.raises(errors.UntrustedTypeError, match=r"user_models\.layers\.Double"):
        storage.restore(tmp_path / "ckpt")
    assert storage.restore(tmp_path / "ckpt", allow_modules=["user_models"]) == layers.Double(2.0)
    assert storage.restore(tmp_path / "ckpt", allow_modules="user_models.layers").factor == 2.0
    with pytest.raises(errors.UntrustedTypeError):
        storage.restore(tmp_path / "ckpt", allow_modules=["user_model"])  # a prefix is not enough


def test_register_type_trusts_one_class(tmp_path, monkeypatch):
    (tmp_path / "registered_models.py").write_text(
        "from pz_flax.core import struct\n"
        "from pz_flax.nn import layer\n"
        "@struct.pytree_dataclass\n"
        "class Noop(layer.Layer):\n"
        "    def __call__(self, x, **side_inputs):\n"
        "        return x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import registered_models

    storage.save(tmp_path / "ckpt", registered_models.Noop())
    with pytest.raises(errors.UntrustedTypeError):
        storage.restore(tmp_path / "ckpt")
    with type_registry.trusted_objects.isolated():
        assert type_registry.register_type(registered_models.Noop) is registered_models.Noop
        assert isinstance(storage.restore(tmp_path / "ckpt"), registered_models.Noop)
        # Registering again (a reloaded module) replaces, it does not fail.
        assert type_registry.register_type(registered_models.Noop) is registered_models.Noop
        assert type_registry.unregister_type(registered_models.Noop) is registered_models.Noop
        with pytest.raises(errors.UntrustedTypeError):
            storage.restore(tmp_path / "ckpt")
    assert "registered_models:Noop" not in type_registry.trusted_objects


def test_unregister_type_refuses_what_was_not_registered():
    with type_registry.trusted_objects.isolated():
        with pytest.raises(KeyError, match=r"pz_flax\.nn\.basic_ops:Elementwise"):
            type_registry.unregister_type(basic_ops.Elementwise)
        # Another object under the same name is not the one registered.
        type_registry.trusted_objects.register(
            type_registry.registration_name(basic_ops.Elementwise), basic_ops.Softmax
        )
        with pytest.raises(KeyError, match="not registered as"):
            type_registry.unregister_type(basic_ops.Elementwise)


def test_a_registered_object_of_the_wrong_kind_is_refused():
    name = "tests.checkpoint.nowhere:Thing"
    with type_registry.trusted_objects.scoped(name, basic_ops.Elementwise):
        assert type_registry.resolve(name, "struct") is basic_ops.Elementwise
        with pytest.raises(errors.CorruptCheckpointError, match="registered object is not"):
            type_registry.resolve(name, "variable")


def test_register_type_refuses_local_classes():
    class Local:
        pass

    with pytest.raises(errors.UnsupportedValueError, match="inside a function"):
        type_registry.register_type(Local)


@pytest.mark.parametrize(
    "name", ["jax.numpy:load", "jax:pure_callback", "jax.debug:callback", "numpy:save"]
)
def test_library_functions_that_could_do_io_are_refused(name):
    with pytest.raises(errors.UntrustedTypeError):
        functions.resolve_function(name, allow_modules=(), path="p")


def test_numpy_functions_need_allow_modules(tmp_path):
    import numpy as np

    storage.save(tmp_path / "ckpt", basic_ops.Elementwise(np.tanh))
    with pytest.raises(errors.UntrustedTypeError, match="allow_modules=\\['numpy'\\]"):
        storage.restore(tmp_path / "ckpt")
    assert storage.restore(tmp_path / "ckpt", allow_modules=["numpy"]).fn is np.tanh
