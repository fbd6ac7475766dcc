import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import pz_flax
from pz_flax import pz
from pz_flax.toolshed import unflaxify


class _DenseStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x)
        x = nn.LayerNorm()(x)
        x = nn.relu(x)
        return nn.Dense(3, use_bias=False)(x)


class _ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.LayerNorm()(x)
        x = nn.gelu(x)
        x = nn.Conv(2, (3, 3), strides=2)(x)
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


class _BatchNormed(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(6)(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)


class _WithDropout(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dropout(0.5, deterministic=False)(nn.Dense(16)(x))


class _Encoder(nn.Module):
    def setup(self):
        self.dense = nn.Dense(16)

    def __call__(self, x):
        return self.dense(x)

    def encode(self, x):
        return self.dense(x) * 2


def _init(module, *args, **kwargs):
    return module.init(jax.random.key(0), *args, **kwargs)


@pytest.mark.parametrize(
    ("module", "shape"),
    [(_DenseStack(), (5, 4)), (_ConvNet(), (2, 8, 8, 3))],
    ids=["dense", "conv"],
)
def test_outputs_match_linen_apply(module, shape):
    x = jax.random.normal(jax.random.key(1), shape)
    variables = _init(module, x)
    layer = unflaxify.unflaxify_apply(module, variables, x)
    expected = module.apply(variables, x)
    np.testing.assert_allclose(
        layer(unflaxify.ArgsAndKwargs.capture(x)), expected, rtol=1e-6, atol=1e-6
    )
    # Under jit too, through penzai's variable-aware jit.
    jitted = pz.variable_jit(lambda model, value: model(unflaxify.ArgsAndKwargs.capture(value)))
    np.testing.assert_allclose(jitted(layer, x), expected, rtol=1e-6, atol=1e-6)


def test_parameters_are_labelled_pz_parameters_holding_linen_arrays():
    x = jnp.ones((2, 4))
    variables = _init(_DenseStack(), x)
    layer = unflaxify.unflaxify_apply(_DenseStack(), variables, x)
    _, params = pz.unbind_params(layer)
    by_label = {p.label: p.value for p in params}
    assert set(by_label) == {
        "Dense_0/kernel",
        "Dense_0/bias",
        "LayerNorm_0/scale",
        "LayerNorm_0/bias",
        "Dense_1/kernel",
    }
    np.testing.assert_array_equal(
        by_label["Dense_0/kernel"], variables["params"]["Dense_0"]["kernel"]
    )


def test_editing_a_parameter_changes_the_output():
    x = jnp.ones((2, 4))
    variables = _init(_DenseStack(), x)
    layer = unflaxify.unflaxify_apply(_DenseStack(), variables, x)
    zeroed = (
        pz.select(layer)
        .at_instances_of(pz.Parameter)
        .where(lambda p: p.label == "Dense_1/kernel")
        .apply(lambda p: pz.Parameter(value=jnp.zeros_like(p.value), label=p.label))
    )
    np.testing.assert_array_equal(zeroed(unflaxify.ArgsAndKwargs.capture(x)), np.zeros((2, 3)))


def test_mutable_collections_are_written_back():
    module = _BatchNormed()
    x = jax.random.normal(jax.random.key(2), (8, 3))
    variables = _init(module, x, train=False)
    layer = unflaxify.unflaxify_apply(module, variables, x, train=True, mutable=["batch_stats"])
    assert layer.mutable_collections == ("batch_stats",)
    out = layer(unflaxify.ArgsAndKwargs.capture(x, train=True))
    expected, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    _, state = pz.unbind_state_vars(layer)
    by_label = {v.label: v.value for v in state}
    np.testing.assert_allclose(
        by_label["BatchNorm_0/mean"], updates["batch_stats"]["BatchNorm_0"]["mean"], rtol=1e-6
    )
    # Evaluation mode reads the written-back statistics.
    new_variables = {**variables, **updates}
    np.testing.assert_allclose(
        layer(unflaxify.ArgsAndKwargs.capture(x, train=False)),
        module.apply(new_variables, x, train=False),
        rtol=1e-5,
        atol=1e-6,
    )


def test_random_streams_drive_linen_rngs():
    module = _WithDropout()
    x = jnp.ones((4, 3))
    variables = _init(module, x)
    layer = unflaxify.unflaxify_apply(module, variables, x, rngs={"dropout": jax.random.key(5)})
    assert layer.rng_names == frozenset({"dropout"})
    with pytest.raises(TypeError, match="'dropout'"):
        layer(unflaxify.ArgsAndKwargs.capture(x))
    stream = pz.RandomStream.from_base_key(jax.random.key(7))
    first = layer(unflaxify.ArgsAndKwargs.capture(x), random_streams={"dropout": stream})
    second = layer(unflaxify.ArgsAndKwargs.capture(x), random_streams={"dropout": stream})
    assert stream.offset.value == 2
    assert np.any(first == 0) and not np.array_equal(first, second)


def test_method_by_name_or_function():
    module = _Encoder()
    x = jnp.ones((1, 3))
    variables = _init(module, x)
    expected = module.apply(variables, x, method="encode")
    for method in ("encode", _Encoder.encode):
        layer = unflaxify.unflaxify_apply(module, variables, x, method=method)
        assert layer.method_name == "encode"
        np.testing.assert_allclose(layer(unflaxify.ArgsAndKwargs.capture(x)), expected, rtol=1e-6)


def test_round_trips_through_nnx():
    x = jnp.ones((2, 4))
    module = _DenseStack()
    variables = _init(module, x)
    layer = unflaxify.unflaxify_apply(module, variables, x)
    nnx_module = pz_flax.to_nnx(layer.body)
    np.testing.assert_allclose(nnx_module(x), module.apply(variables, x), rtol=1e-6)
    assert len(nnx.to_flat_state(nnx.state(nnx_module, nnx.Param))) == 5


def test_bad_inputs_fail_at_construction():
    x = jnp.ones((2, 4))
    module = _DenseStack()
    variables = _init(module, x)
    with pytest.raises(ValueError, match="collection names"):
        unflaxify.unflaxify_apply(module, [variables], x)
    with pytest.raises(ValueError, match="no method 'missing'"):
        unflaxify.unflaxify_apply(module, variables, x, method="missing")
    with pytest.raises(TypeError, match="mutable"):
        unflaxify.unflaxify_apply(module, variables, x, mutable=3)
    with pytest.raises(Exception, match="Dense_0"):
        unflaxify.unflaxify_apply(module, variables, jnp.ones((2, 7)))


def test_args_and_kwargs_capture():
    captured = unflaxify.ArgsAndKwargs.capture(1, 2, train=True)
    assert captured.args == (1, 2) and captured.kwargs == {"train": True}


def test_checkpoint_save_refuses_linen_layers_with_a_clear_error(tmp_path):
    from pz_flax import checkpoint

    x = jnp.ones((2, 4))
    module = _DenseStack()
    layer = unflaxify.unflaxify_apply(module, _init(module, x), x)
    with pytest.raises(checkpoint.UnsupportedValueError, match="cannot save"):
        checkpoint.save(tmp_path / "ckpt", layer)
    assert not (tmp_path / "ckpt").exists()
