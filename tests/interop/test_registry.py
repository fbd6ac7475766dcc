"""Tests of the mapping registry: user mappings, elementwise functions, contexts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pz_flax.core import variables
from pz_flax.interop import convert
from pz_flax.interop import naming
from pz_flax.interop import registry
from pz_flax.interop import wrappers
from pz_flax.nn import basic_ops
from pz_flax.nn import linear_and_affine
from tests.interop import helpers


class Scale(nnx.Module):
    """A user layer: multiplies the features by a learned vector."""

    def __init__(self, features, *, rngs):
        self.scale = nnx.Param(jax.random.normal(rngs.params(), (features,)))

    def __call__(self, x):
        return x * self.scale[...]


class ScaleMapping(registry.LayerMapping):
    nnx_type = Scale
    pz_types = ()

    def to_pz(self, module, context):
        features = context.naming.features
        return linear_and_affine.Linear(
            weights=context.parameter(module.scale, "scale", (features,)),
            in_axis_names=(),
            out_axis_names=(),
        )

    def to_nnx(self, layer, context, config):
        if type(layer) is not linear_and_affine.Linear or layer.in_axis_names:
            return None
        names = tuple(layer.weights.value.named_shape)
        array = context.array(layer.weights, names)
        return context.construct(
            Scale, array.shape[0], variables_by_path={"scale": (layer.weights, array)}
        )


@pytest.fixture
def scale_mapping():
    mapping = registry.register_mapping(ScaleMapping())
    yield mapping
    registry.unregister_mapping(Scale)


def test_user_mapping_converts_both_ways(scale_mapping):
    assert registry.get_mapping(Scale) is scale_mapping
    assert registry.registered_mappings()[Scale] is scale_mapping
    module = Scale(3, rngs=nnx.Rngs(0))
    layer = convert.from_nnx(module)
    assert isinstance(layer, wrappers.FromNNX)
    assert type(layer.layer) is linear_and_affine.Linear
    x = helpers.random_input((2, 3))
    result = layer(helpers.named(x, "batch", "features")).unwrap("batch", "features")
    np.testing.assert_allclose(result, module(x), rtol=1e-6)
    helpers.assert_same_state(module, convert.to_nnx(layer))


def test_without_a_mapping_the_user_class_is_wrapped():
    module = Scale(3, rngs=nnx.Rngs(0))
    assert registry.get_mapping(Scale) is None
    assert isinstance(convert.from_nnx(module), wrappers.NNXWrapper)


def test_register_rejects_duplicates_and_bad_input(scale_mapping):
    with pytest.raises(ValueError, match="already has the mapping ScaleMapping"):
        registry.register_mapping(ScaleMapping())
    replacement = registry.register_mapping(ScaleMapping(), replace=True)
    assert registry.get_mapping(Scale) is replacement
    with pytest.raises(TypeError, match="expects a LayerMapping instance, got str"):
        registry.register_mapping("mapping")

    class NoType(ScaleMapping):
        nnx_type = None

    with pytest.raises(TypeError, match="nnx_type must be an NNX module class"):
        registry.register_mapping(NoType())
    with pytest.raises(KeyError, match="No mapping is registered"):
        registry.unregister_mapping(int)


def test_a_mapping_that_does_not_round_trip_exactly_falls_back_to_a_wrapper():
    class LossyMapping(ScaleMapping):
        def to_nnx(self, layer, context, config):
            module = super().to_nnx(layer, context, config)
            module.extra = 1  # a static attribute the original does not have
            return module

    registry.register_mapping(LossyMapping())
    try:
        module = Scale(3, rngs=nnx.Rngs(0))
        assert isinstance(convert.from_nnx(module), wrappers.NNXWrapper)
        with pytest.raises(ValueError, match="different graph definition"):
            convert.from_nnx(module, strict=True)
    finally:
        registry.unregister_mapping(Scale)


def test_mapping_naming_overrides_apply_to_its_class():
    class RenamingMapping(ScaleMapping):
        naming = {"features": "channels"}

    registry.register_mapping(RenamingMapping())
    try:
        layer = convert.from_nnx(Scale(3, rngs=nnx.Rngs(0)))
        assert dict(layer.layer.weights.value.named_shape) == {"channels": 3}
    finally:
        registry.unregister_mapping(Scale)


def test_register_elementwise_function():
    def cube(x):
        return x**3

    assert not registry.is_elementwise_function(cube)
    assert isinstance(convert.from_nnx(cube), wrappers.WrappedCallable)
    registry.register_elementwise_function(cube)
    assert registry.is_elementwise_function(cube)
    assert convert.from_nnx(cube) == basic_ops.Elementwise(cube)
    assert not registry.is_elementwise_function([])
    with pytest.raises(TypeError, match="expects a callable"):
        registry.register_elementwise_function(3)


def test_context_array_returns_stored_array_or_reorders():
    array = jnp.arange(6.0).reshape(2, 3)
    parameter = variables.Parameter(value=helpers.named(array, "a", "b"), label="w")
    context = registry.ToNNXContext(
        naming=naming.DEFAULT_NAMING, native=False, convert_child=lambda layer: layer
    )
    assert context.array(parameter, ("a", "b")) is array
    np.testing.assert_array_equal(context.array(parameter, ("b", "a")), array.T)
    with pytest.raises(ValueError, match=r"exactly the named axes \('a', 'c'\)"):
        context.array(parameter, ("a", "c"))
    with pytest.raises(ValueError, match="got named axes"):
        context.array(parameter, None)
    positional = variables.Parameter(value=array, label="p")
    assert context.array(positional, None) is array
    with pytest.raises(ValueError, match="is a positional array"):
        context.array(positional, ("a", "b"))


def test_context_construct_checks_variables():
    context = registry.ToNNXContext(
        naming=naming.DEFAULT_NAMING, native=False, convert_child=lambda layer: layer
    )
    kernel = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"missing \['bias'\]"):
        context.construct(nnx.Linear, 2, 3, variables_by_path={"kernel": (None, kernel)})
    with pytest.raises(ValueError, match=r"'kernel' needs shape \(2, 3\)"):
        context.construct(
            nnx.Linear,
            2,
            3,
            use_bias=False,
            variables_by_path={"kernel": (None, jnp.ones((3, 2)))},
        )
    module = context.construct(
        nnx.Linear, 2, 3, use_bias=False, variables_by_path={"kernel": (None, kernel)}
    )
    assert module.kernel.get_value() is kernel


def test_context_parameter_carries_nnx_metadata():
    module = nnx.Linear(2, 3, kernel_metadata={"note": "frozen"}, rngs=nnx.Rngs(0))
    context = registry.FromNNXContext(
        naming=naming.DEFAULT_NAMING, path=("encoder",), convert_child=None
    )
    parameter = context.parameter(module.kernel, "kernel", ("features", "features_out"))
    assert parameter.label == "encoder/kernel"
    assert parameter.metadata == {"note": "frozen"}
    assert parameter.get_value() is module.kernel.get_value()
    with pytest.raises(ValueError, match="cannot take the axis names"):
        context.parameter(module.kernel, "kernel", ("features",))
    rebuilt = convert.to_nnx(convert.from_nnx(module))
    assert rebuilt.kernel.get_metadata()["note"] == "frozen"


def test_unhashable_metadata_is_not_carried_and_the_module_is_wrapped():
    module = nnx.Linear(2, 3, kernel_metadata={"tags": ["a", "b"]}, rngs=nnx.Rngs(0))
    assert registry.user_metadata(module.kernel) == {}
    layer = convert.from_nnx(module)
    assert isinstance(layer, wrappers.NNXWrapper)
    rebuilt = convert.to_nnx(layer)
    assert rebuilt.kernel.get_metadata()["tags"] == ["a", "b"]
