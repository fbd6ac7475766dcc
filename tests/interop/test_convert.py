"""Tests of from_nnx / to_nnx: naming, overrides, errors, functions and drop-in use."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pz_flax.core import named_axes
from pz_flax.core import variables
from pz_flax.interop import convert
from pz_flax.interop import mappings
from pz_flax.interop import model_summary
from pz_flax.interop import registry
from pz_flax.interop import wrappers
from pz_flax.nn import basic_ops
from pz_flax.nn import grouping
from pz_flax.nn import layer_stack
from pz_flax.nn import linear_and_affine
from pz_flax.nn import standardization
from pz_flax.toolshed import basic_training
from tests.interop import helpers


class Block(nnx.Module):
    """A user module with its own __call__ and children of several kinds."""

    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, 4, decode=False, rngs=rngs)
        self.mlp = nnx.Sequential(
            nnx.Linear(4, 8, rngs=rngs), nnx.gelu, nnx.Linear(8, 4, rngs=rngs)
        )
        self.gate = nnx.Param(jnp.full((4,), 0.5))

    def __call__(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.gate * self.mlp(x)


def test_user_module_is_wrapped_with_converted_children_and_same_output():
    module = Block(nnx.Rngs(0))
    layer = convert.from_nnx(module)
    assert isinstance(layer, wrappers.NNXWrapper)
    assert layer.module_type is Block
    assert set(layer.children) == {"norm", "attn", "mlp"}
    assert isinstance(layer.children["attn"], wrappers.FromNNX)
    assert layer.variables["gate"].label == "gate"
    assert layer.variables["gate"].get_value() is module.gate.get_value()
    x = helpers.random_input((2, 3, 4))
    result = layer(helpers.named(x, "batch", "seq", "features")).unwrap("batch", "seq", "features")
    np.testing.assert_allclose(result, module(x), rtol=1e-6, atol=1e-6)
    helpers.assert_same_state(module, convert.to_nnx(layer))


def test_user_module_gradients_match():
    module = Block(nnx.Rngs(0))
    x = helpers.random_input((2, 3, 4))
    layer = convert.from_nnx(module)
    pz_grads = helpers.pz_parameter_grads(
        layer,
        lambda layer: jnp.sum(
            layer(helpers.named(x, "batch", "seq", "features")).unwrap("batch", "seq", "features")
            ** 2
        ),
    )
    nnx_grads = helpers.nnx_parameter_grads(module, lambda module: jnp.sum(module(x) ** 2))
    assert pz_grads.keys() == nnx_grads.keys()
    for key in nnx_grads:
        np.testing.assert_allclose(pz_grads[key], nnx_grads[key], rtol=1e-5, atol=1e-6)


def test_edit_of_a_wrapped_modules_child_is_used_and_carried_back():
    module = Block(nnx.Rngs(0))
    layer = convert.from_nnx(module)
    # Replace the MLP by a natively built pz_flax layer: the NNX parent calls it positionally.
    native_mlp = linear_and_affine.Affine.from_config(
        "mlp", jax.random.key(3), {"features": 4}, {"features": 4}
    )
    edited = layer.select().at(lambda root: root.children["mlp"]).set(native_mlp)
    x = helpers.random_input((2, 3, 4))
    result = edited(helpers.named(x, "batch", "seq", "features")).unwrap("batch", "seq", "features")
    after_attention = x + module.attn(module.norm(x))
    expected = after_attention + module.gate.get_value() * native_mlp(
        helpers.named(after_attention, "batch", "seq", "features")
    ).unwrap("batch", "seq", "features")
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
    rebuilt = convert.to_nnx(edited)
    assert type(rebuilt) is Block
    assert isinstance(rebuilt.mlp, wrappers.PzModule)
    assert rebuilt.norm.scale.get_value() is module.norm.scale.get_value()


def test_functions_convert_to_elementwise_softmax_or_wrapped_callables():
    assert convert.from_nnx(nnx.relu) == basic_ops.Elementwise(nnx.relu)
    assert convert.from_nnx(jax.nn.softmax) == basic_ops.Softmax("features")
    flatten = convert.from_nnx(
        lambda array: array.reshape(array.shape[0], -1), input_axes=("a", "b")
    )
    assert isinstance(flatten, wrappers.WrappedCallable)
    x = helpers.named(jnp.arange(12.0).reshape(2, 3, 2), "batch", "a", "b")
    assert dict(flatten(x).named_shape) == {"batch": 2, "features": 6}
    log_softmax = convert.from_nnx(jax.nn.log_softmax)
    y = helpers.random_input((2, 5))
    np.testing.assert_allclose(
        log_softmax(helpers.named(y, "batch", "features")).unwrap("batch", "features"),
        jax.nn.log_softmax(y),
    )
    assert convert.to_nnx(log_softmax).layers[0] is jax.nn.log_softmax


def test_naming_keywords_rename_axes_and_labels():
    module = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    layer = convert.from_nnx(module, features="embedding", label_prefix="model")
    weights = layer.layer.sublayers[0].weights
    assert dict(weights.value.named_shape) == {"embedding": 3, "embedding_out": 4}
    assert weights.label == "model/kernel"
    x = helpers.random_input((2, 3))
    result = layer(helpers.named(x, "batch", "embedding")).unwrap("batch", "embedding")
    np.testing.assert_allclose(result, module(x), rtol=1e-6)
    helpers.assert_same_state(module, convert.to_nnx(layer))


def test_overrides_by_class_and_by_path():
    model = nnx.Sequential(nnx.Embed(5, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 3, rngs=nnx.Rngs(1)))
    layer = convert.from_nnx(
        model,
        overrides={nnx.Embed: {"vocabulary": "token"}, "layers/1": {"label_prefix": "head"}},
    )
    embed, linear = layer.layer.sublayers
    assert embed.layer.table.vocabulary_axis == "token"
    assert linear.layer.sublayers[0].weights.label == "head/layers/1/kernel"
    ids = jnp.array([[0, 4, 2]])
    result = layer(helpers.named(ids, "batch", "seq")).unwrap("batch", "seq", "features")
    np.testing.assert_allclose(result, model(ids), rtol=1e-6)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (3, TypeError, "from_nnx expects a Flax NNX module.*int"),
        (nnx.Param(jnp.ones(2)), TypeError, "from_nnx expects.*Param"),
        (
            basic_ops.Elementwise(jax.nn.relu),
            TypeError,
            "pz_flax object Elementwise, which needs no conversion",
        ),
    ],
)
def test_from_nnx_rejects_what_it_cannot_convert(bad, error, match):
    with pytest.raises(error, match=match):
        convert.from_nnx(bad)


def test_from_nnx_rejects_unknown_naming_options():
    module = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"Unknown naming option\(s\) \['feature'\]"):
        convert.from_nnx(module, feature="x")
    with pytest.raises(TypeError, match="overrides keys"):
        convert.from_nnx(module, overrides={3: {}})
    with pytest.raises(TypeError, match="must be a string axis name"):
        convert.from_nnx(module, features=3)


def test_from_nnx_rejects_an_unconvertible_child_with_its_path():
    model = nnx.List([nnx.Linear(2, 2, rngs=nnx.Rngs(0))])
    layer = convert.from_nnx(model)
    assert isinstance(layer, list)
    with pytest.raises(TypeError, match=r"to_nnx expects a pz_flax layer, got builtins\.int"):
        convert.to_nnx(3)
    with pytest.raises(TypeError, match="NNX module Linear, which needs no conversion"):
        convert.to_nnx(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def _native_mlp():
    key = jax.random.key(0)
    return grouping.Sequential(
        [
            linear_and_affine.Affine.from_config("in", key, {"features": 3}, {"features": 8}),
            basic_ops.Elementwise(jax.nn.relu),
            standardization.LayerNorm.from_config("norm", key, {"features": 8}),
            linear_and_affine.Affine.from_config("out", key, {"features": 8}, {"features": 2}),
        ]
    )


def test_to_nnx_of_native_layer_is_a_trainable_module_called_like_the_layer():
    layer = _native_mlp()
    module = convert.to_nnx(layer)
    assert isinstance(module, wrappers.PzModule)
    x = helpers.random_input((4, 3))
    expected = layer(helpers.named(x, "batch", "features")).unwrap("batch", "features")
    np.testing.assert_allclose(module(x), expected, rtol=1e-6)
    named_result = module(helpers.named(x, "batch", "features"))
    assert isinstance(named_result, named_axes.NamedArray)
    params = nnx.state(module, nnx.Param)
    assert len(jax.tree_util.tree_leaves(params)) == 6
    optimizer = nnx.Optimizer(module, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def train_step(module, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda module: jnp.mean(module(x) ** 2))(module)
        optimizer.update(module, grads)
        return loss

    losses = [float(train_step(module, optimizer, x)) for _ in range(3)]
    assert losses[-1] < losses[0]
    # The module trains the layer's own parameters.
    trained = layer(helpers.named(x, "batch", "features")).unwrap("batch", "features")
    assert float(jnp.mean(trained**2)) < losses[0]


def test_to_nnx_native_builds_nnx_layers():
    layer = _native_mlp()
    module = convert.to_nnx(layer, native=True)
    assert type(module) is nnx.Sequential
    assert [type(sub) for sub in module.layers] == [
        nnx.Linear,
        type(jax.nn.relu),
        nnx.LayerNorm,
        nnx.Linear,
    ]
    x = helpers.random_input((4, 3))
    expected = layer(helpers.named(x, "batch", "features")).unwrap("batch", "features")
    np.testing.assert_allclose(module(x), expected, rtol=1e-4, atol=1e-5)
    first_weights = layer.sublayers[0].sublayers[0].weights
    assert module.layers[0].kernel.get_value() is first_weights.get_value()


def test_to_nnx_native_of_a_single_function_layer_is_a_module():
    module = convert.to_nnx(basic_ops.Elementwise(jax.nn.relu), native=True)
    assert isinstance(module, nnx.Sequential)
    np.testing.assert_array_equal(module(jnp.array([-1.0, 2.0])), jnp.array([0.0, 2.0]))


def test_pz_layer_as_attribute_of_an_nnx_module_trains_under_nnx_jit():
    class Model(nnx.Module):
        def __init__(self):
            self.body = _native_mlp()
            self.head = nnx.Linear(2, 1, rngs=nnx.Rngs(0))

        def __call__(self, x):
            hidden = self.body(helpers.named(x, "batch", "features")).unwrap("batch", "features")
            return self.head(hidden)

    model = Model()
    assert len(jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))) == 8
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x = helpers.random_input((8, 3))
    before = model.body.sublayers[0].sublayers[0].weights.get_value()

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda model: jnp.mean((model(x) - 1.0) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    assert not np.allclose(model.body.sublayers[0].sublayers[0].weights.get_value(), before)
    # Plain jax.jit over the split state works too.
    graphdef, state = nnx.split(model)
    result = jax.jit(lambda state: nnx.merge(graphdef, state)(x))(state)
    np.testing.assert_allclose(result, model(x), rtol=1e-5)


def test_nnx_module_inside_pz_sequential_under_jax_jit_and_nnx_jit():
    conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    pooled = convert.from_nnx(
        lambda array: jnp.mean(array, axis=(1, 2)),
        input_axes=("height", "width", "features"),
        output_axes=("features",),
    )
    head = linear_and_affine.Affine.from_config(
        "head", jax.random.key(1), {"features": 4}, {"features": 2}
    )
    model = grouping.Sequential([convert.from_nnx(conv), pooled, head])
    images = helpers.random_input((2, 5, 5, 3))
    named_images = helpers.named(images, "batch", "height", "width", "features")
    expected = head(helpers.named(jnp.mean(conv(images), axis=(1, 2)), "batch", "features"))
    result = jax.jit(lambda model, x: model(x))(model, named_images)
    np.testing.assert_allclose(
        result.unwrap("batch", "features"), expected.unwrap("batch", "features"), rtol=1e-5
    )
    module = convert.to_nnx(model)
    optimizer = nnx.Optimizer(module, optax.sgd(0.05), wrt=nnx.Param)

    @nnx.jit
    def train_step(module, optimizer):
        loss, grads = nnx.value_and_grad(lambda module: jnp.mean(module(images) ** 2))(module)
        optimizer.update(module, grads)
        return loss

    losses = [float(train_step(module, optimizer)) for _ in range(3)]
    assert losses[-1] < losses[0]
    conv_kernel = model.sublayers[0].variables["kernel"]
    assert not np.allclose(conv_kernel.get_value(), conv.kernel.get_value())


def test_batch_norm_statistics_are_state_variables_updated_in_training():
    norm = nnx.BatchNorm(3, use_running_average=False, momentum=0.5, rngs=nnx.Rngs(0))
    layer = convert.from_nnx(norm)
    assert isinstance(layer.variables["mean"], variables.StateVariable)
    assert isinstance(layer.variables["scale"], variables.Parameter)
    assert dict(layer.variables["mean"].value.named_shape) == {"features": 3}
    x = helpers.random_input((6, 3)) + 2.0
    layer(helpers.named(x, "batch", "features"))
    expected_mean = 0.5 * jnp.mean(x, axis=0)
    np.testing.assert_allclose(layer.variables["mean"].get_value(), expected_mean, rtol=1e-5)
    rebuilt = convert.to_nnx(layer)
    np.testing.assert_allclose(rebuilt.mean.get_value(), expected_mean, rtol=1e-5)
    # Under variable_jit the update flows out of the compiled function too.
    from pz_flax.core import variables as variables_lib

    step = variables_lib.variable_jit(lambda layer, x: layer(x))
    step(layer, helpers.named(x, "batch", "features"))
    np.testing.assert_allclose(
        layer.variables["mean"].get_value(), 0.75 * jnp.mean(x, axis=0), rtol=1e-5
    )


def test_batch_norm_statistics_update_through_a_pz_module_under_nnx_jit():
    norm = nnx.BatchNorm(3, use_running_average=False, momentum=0.5, rngs=nnx.Rngs(0))
    layer = grouping.Sequential([convert.from_nnx(norm)])
    module = convert.to_nnx(layer)
    x = helpers.random_input((6, 3)) + 2.0
    nnx.jit(lambda module, x: module(x))(module, x)
    np.testing.assert_allclose(
        layer.sublayers[0].variables["mean"].get_value(), 0.5 * jnp.mean(x, axis=0), rtol=1e-5
    )


def test_wrapped_module_with_own_rng_stream_advances_it():
    module = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
    layer = convert.from_nnx(module)
    count = layer.variables["rngs/count"]
    x = helpers.named(jnp.ones((2, 8)), "batch", "features")
    first = layer(x).unwrap("batch", "features")
    second = layer(x).unwrap("batch", "features")
    assert int(count.get_value()) == 2
    assert not np.array_equal(first, second)
    reference = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(first, reference(jnp.ones((2, 8))))


def test_to_nnx_native_covers_embeddings_norms_and_dropout():
    from pz_flax.nn import dropout
    from pz_flax.nn import embeddings

    key = jax.random.key(0)
    table = embeddings.EmbeddingTable.from_config(
        "embed", key, vocab_size=6, embedding_axes={"features": 4}
    )
    model = grouping.Sequential(
        [
            embeddings.EmbeddingLookup(table),
            standardization.RMSLayerNorm.from_config("norm", key, {"features": 4}),
            dropout.DisabledDropout(drop_rate=0.1, share_across_axes=()),
        ]
    )
    module = convert.to_nnx(model, native=True)
    assert [type(sub) for sub in module.layers] == [nnx.Embed, nnx.RMSNorm, nnx.Dropout]
    assert module.layers[2].deterministic is True
    ids = jnp.array([[0, 5, 2]])
    expected = model(helpers.named(ids, "batch", "seq")).unwrap("batch", "seq", "features")
    np.testing.assert_allclose(module(ids), expected, rtol=1e-5, atol=1e-6)


#### Shared (tied) modules and variables ####


class SharedLinearEverywhere(nnx.Module):
    """One Linear reached under two attributes, inside a Sequential and inside a List."""

    def __init__(self, rngs):
        shared = nnx.Linear(4, 4, rngs=rngs)
        # Assigned before ``first`` so conversion meets it at ``second``, while nnx.state lists
        # it under ``first`` (NNX sorts attribute names).
        self.second = shared
        self.first = shared
        self.mlp = nnx.Sequential(shared, nnx.relu, shared)
        self.heads = nnx.List([shared, nnx.Linear(4, 4, rngs=rngs)])

    def __call__(self, x):
        hidden = self.mlp(self.first(x)) + self.second(x)
        return self.heads[0](hidden) + self.heads[1](hidden)


class TiedProjection(nnx.Module):
    """Shared ``nnx.Param`` objects: a tied kernel between two Linears, and a tied vector."""

    def __init__(self, rngs):
        self.encoder = nnx.Linear(4, 4, rngs=rngs)
        self.decoder = nnx.Linear(4, 4, use_bias=False, rngs=rngs)
        self.decoder.kernel = self.encoder.kernel
        # The encoder's bias, also used directly by this (wrapped) module.
        self.shift = self.encoder.bias

    def __call__(self, x):
        return self.decoder(nnx.relu(self.encoder(x))) + self.shift


def _run_named(layer, x):
    return layer(helpers.named(x, "batch", "features")).unwrap("batch", "features")


def test_shared_module_becomes_one_layer_and_one_module_again():
    module = SharedLinearEverywhere(nnx.Rngs(0))
    layer = convert.from_nnx(module)
    shared = layer.children["first"]
    assert isinstance(shared, wrappers.FromNNX)
    assert layer.children["second"] is shared
    mlp = layer.children["mlp"].layer
    assert mlp.sublayers[0] is shared and mlp.sublayers[2] is shared
    assert layer.children["heads"][0] is shared
    assert layer.children["heads"][1] is not shared
    # Labelled by the path nnx.state lists the shared module under.
    assert shared.layer.sublayers[0].weights.label == "first/kernel"
    x = helpers.random_input((3, 4))
    np.testing.assert_allclose(_run_named(layer, x), module(x), rtol=1e-6, atol=1e-6)

    rebuilt = convert.to_nnx(layer)
    helpers.assert_same_state(module, rebuilt)
    assert list(helpers.flat_state(rebuilt)) == list(helpers.flat_state(module))
    assert rebuilt.first is rebuilt.second is rebuilt.mlp.layers[0] is rebuilt.mlp.layers[2]
    assert rebuilt.heads[0] is rebuilt.first and rebuilt.heads[1] is not rebuilt.first
    np.testing.assert_array_equal(rebuilt(x), module(x))


def test_shared_module_in_a_list_root_and_path_overrides_at_its_nnx_path():
    shared = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    model = nnx.List([shared, nnx.Linear(3, 3, rngs=nnx.Rngs(1)), shared])
    layers = convert.from_nnx(model, overrides={"0": {"label_prefix": "tied"}})
    assert layers[0] is layers[2] and layers[1] is not layers[0]
    assert layers[0].layer.sublayers[0].weights.label == "tied/0/kernel"
    rebuilt = convert.to_nnx(layers)
    helpers.assert_same_state(model, rebuilt)
    assert rebuilt[0] is rebuilt[2]


def test_shared_param_becomes_one_parameter_and_one_nnx_variable_again():
    module = TiedProjection(nnx.Rngs(0))
    layer = convert.from_nnx(module)
    encoder = layer.children["encoder"].layer
    decoder = layer.children["decoder"].layer
    kernel = encoder.sublayers[0].weights
    assert decoder.sublayers[0].weights is kernel
    # NNX lists the kernel under "decoder" (sorted first), so that is its label.
    assert kernel.label == "decoder/kernel"
    assert layer.variables["shift"] is encoder.sublayers[-1].bias
    assert layer.variables["shift"].label == "encoder/bias"
    assert kernel.get_value() is module.encoder.kernel.get_value()
    x = helpers.random_input((3, 4))
    np.testing.assert_allclose(_run_named(layer, x), module(x), rtol=1e-6, atol=1e-6)

    rebuilt = convert.to_nnx(layer)
    helpers.assert_same_state(module, rebuilt)
    assert rebuilt.decoder.kernel is rebuilt.encoder.kernel
    assert rebuilt.shift is rebuilt.encoder.bias
    np.testing.assert_array_equal(rebuilt(x), module(x))
    # One row per distinct variable, as nnx.state has one entry per distinct variable.
    rows = model_summary.summary_rows(layer)
    assert sorted(row.label for row in rows) == sorted(helpers.flat_state(module))


def test_tied_weight_gradient_and_training_step_match_nnx():
    module = TiedProjection(nnx.Rngs(0))
    reference = nnx.clone(module)
    layer = convert.from_nnx(module)
    x = helpers.random_input((5, 4))
    target = helpers.random_input((5, 4), seed=2)

    # Gradients with respect to each distinct parameter (unbinding extracts a shared one once).
    unbound, values = variables.unbind_params(layer, freeze=True)
    assert sorted(value.label for value in values) == ["decoder/kernel", "encoder/bias"]

    def pz_loss(values):
        bound = variables.bind_variables(unbound, values, unfreeze_as_copy=True)
        return jnp.mean((_run_named(bound, x) - target) ** 2)

    pz_grads = {value.label: value.value for value in jax.jit(jax.grad(pz_loss))(list(values))}
    nnx_grads = helpers.nnx_parameter_grads(
        reference, lambda module: jnp.mean((module(x) - target) ** 2)
    )
    assert pz_grads.keys() == nnx_grads.keys()
    for key, grad in nnx_grads.items():
        pz_grad = pz_grads[key]
        if isinstance(pz_grad, named_axes.NamedArrayBase):
            pz_grad = pz_grad.unwrap(*_stored_axis_names(layer, key))
        np.testing.assert_allclose(pz_grad, grad, rtol=1e-5, atol=1e-6)

    # One SGD step through the pz form updates the tied kernel once, exactly as NNX does.
    def loss_fn(*, model, state, rng, x, target):
        del rng
        return jnp.mean((_run_named(model, x) - target) ** 2), state, None

    trainer = basic_training.StatefulTrainer.build(
        jax.random.key(0), layer, optax.sgd(0.1), loss_fn
    )
    trainer.step(x=x, target=target)
    optimizer = nnx.Optimizer(reference, optax.sgd(0.1), wrt=nnx.Param)
    grads = nnx.grad(lambda module: jnp.mean((module(x) - target) ** 2))(reference)
    optimizer.update(reference, grads)
    rebuilt = convert.to_nnx(layer)
    assert rebuilt.decoder.kernel is rebuilt.encoder.kernel
    for key, variable in helpers.flat_state(reference).items():
        np.testing.assert_allclose(
            helpers.flat_state(rebuilt)[key].get_value(), variable.get_value(), rtol=1e-5, atol=1e-6
        )


def _stored_axis_names(layer, label):
    """The stored axis-name order of the parameter labelled ``label`` in ``layer``."""
    _, values = variables.unbind_params(layer)
    (parameter,) = [value for value in values if value.label == label]
    return parameter.get_metadata()["axis_names"]


def test_variable_shared_under_different_axis_names_wraps_the_later_user():
    class TiedEmbedding(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(4, 4, rngs=rngs)
            self.unembed = nnx.Linear(4, 4, use_bias=False, rngs=rngs)
            self.unembed.kernel = self.embed.embedding

        def __call__(self, ids):
            return self.unembed(self.embed(ids))

    module = TiedEmbedding(nnx.Rngs(0))
    layer = convert.from_nnx(module)
    table = layer.children["embed"].layer.table.embeddings
    assert dict(table.value.named_shape) == {"vocabulary": 4, "features": 4}
    # A Linear cannot name the Embed's table (vocabulary, features): it is wrapped, and runs
    # on the very same Parameter.
    unembed = layer.children["unembed"]
    assert isinstance(unembed, wrappers.NNXWrapper)
    assert unembed.variables["kernel"] is table
    with pytest.raises(ValueError, match="shared with 'embed/embedding'"):
        convert.from_nnx(module, strict=True)
    ids = jnp.array([[0, 3, 1]])
    result = layer(helpers.named(ids, "batch", "seq")).unwrap("batch", "seq", "features")
    np.testing.assert_allclose(result, module(ids), rtol=1e-6, atol=1e-6)
    rebuilt = convert.to_nnx(layer)
    helpers.assert_same_state(module, rebuilt)
    assert rebuilt.unembed.kernel is rebuilt.embed.embedding


def test_to_nnx_native_keeps_shared_layers_and_parameters_shared():
    key = jax.random.key(0)
    shared = linear_and_affine.Affine.from_config("shared", key, {"features": 3}, {"features": 3})
    other = linear_and_affine.Affine.from_config("other", key, {"features": 3}, {"features": 3})
    # The shared layer's weights with another layer's bias: a tied kernel.
    tied = linear_and_affine.Affine([*shared.sublayers[:-1], other.sublayers[-1]])
    model = grouping.Sequential([shared, basic_ops.Elementwise(jax.nn.relu), shared, tied])
    module = convert.to_nnx(model, native=True)
    first, _, third, fourth = module.layers
    assert first is third
    assert fourth.kernel is first.kernel and fourth.bias is not first.bias
    assert len(helpers.flat_state(module)) == 3
    x = helpers.random_input((2, 3))
    np.testing.assert_allclose(module(x), _run_named(model, x), rtol=1e-5, atol=1e-6)


#### What conversion remembers between models (it must never change a result) ####


class _Decline(registry.LayerMapping):
    """A mapping for nnx.Linear that declines every module."""

    nnx_type = nnx.Linear

    def to_pz(self, module, context):
        raise registry.MappingNotApplicable("declined by the test")

    def to_nnx(self, layer, context, config):
        return None


class _Lossy(mappings.LinearMapping):
    """LinearMapping, except that its rebuilt module loses the bias setting."""

    def build(self, layer, context, naming, config):
        module = super().build(layer, context, naming, config)
        if module is not None:
            module.use_bias = not module.use_bias
        return module


def test_a_remembered_verdict_follows_the_mapping_registry():
    def linear():
        return nnx.Linear(3, 4, rngs=nnx.Rngs(0))

    assert isinstance(convert.from_nnx(linear()), wrappers.FromNNX)
    with registry.mapping_registry.scoped(nnx.Linear, _Decline(), replace=True):
        declined = convert.from_nnx(linear())
        assert isinstance(declined, wrappers.NNXWrapper)
        assert "declined by the test" in declined.wrapped_because
    with registry.mapping_registry.scoped(nnx.Linear, _Lossy(), replace=True):
        # Same class, same settings, same shapes as a module already found exact: the
        # replacement's rebuild is checked again, and it is not exact.
        lossy = convert.from_nnx(linear())
        assert isinstance(lossy, wrappers.NNXWrapper)
        assert "use_bias=True" in lossy.wrapped_because
        with pytest.raises(ValueError, match=r"Linear at <root> with _Lossy: .*use_bias=True"):
            convert.from_nnx(linear(), strict=True)
    assert isinstance(convert.from_nnx(linear()), wrappers.FromNNX)
    with registry.mapping_registry.isolated():
        registry.unregister_mapping(nnx.Linear)
        assert isinstance(convert.from_nnx(linear()), wrappers.NNXWrapper)
    assert isinstance(convert.from_nnx(linear()), wrappers.FromNNX)


def test_modules_of_one_class_with_other_settings_or_shapes_convert_by_their_own():
    def pair(**settings):
        return nnx.List(
            [
                nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                nnx.Linear(3, 4, rngs=nnx.Rngs(0), **settings),
            ]
        )

    plain, highest = convert.from_nnx(pair(precision=jax.lax.Precision.HIGHEST))
    assert isinstance(plain, wrappers.FromNNX)
    assert isinstance(highest, wrappers.NNXWrapper)
    assert "precision=Precision.HIGHEST" in highest.wrapped_because
    with pytest.raises(ValueError, match=r"Linear at 1 with LinearMapping: .*precision"):
        convert.from_nnx(pair(precision=jax.lax.Precision.HIGHEST), strict=True)
    # Other metadata on a variable is another graph definition too.
    annotated = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    annotated.kernel.set_metadata("note", "kept")
    converted = convert.from_nnx(annotated)
    assert converted.layer.sublayers[0].weights.get_metadata()["note"] == "kept"
    # A stack of Linear layers and a single one: the same class and settings, other shapes.
    stacked = nnx.vmap(lambda key: nnx.Linear(3, 3, rngs=nnx.Rngs(key)))(
        jax.random.split(jax.random.key(0), 2)
    )
    for _ in range(2):
        assert isinstance(convert.from_nnx(stacked), layer_stack.LayerStack)
        assert isinstance(convert.from_nnx(nnx.Linear(3, 3, rngs=nnx.Rngs(0))), wrappers.FromNNX)


class _Setting(nnx.Module):
    """A user module with one setting and one weight, for what conversion remembers."""

    def __init__(self, setting, rngs, dtype=jnp.float32):
        self.setting = setting
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (3,), dtype))

    def __call__(self, x):
        return x * self.weight


class _TwoWeights(nnx.Module):
    def __init__(self, shared):
        self.first = nnx.Param(jnp.ones((3,)))
        self.second = self.first if shared else nnx.Param(jnp.ones((3,)))

    def __call__(self, x):
        return x * self.first * self.second


def _structure_pairs():
    rngs = nnx.Rngs(0)
    flagged = _Setting(3, rngs)
    flagged.setting = nnx.data(3)
    annotated = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    annotated.kernel.set_metadata("note", "kept")
    return {
        "same settings": (nnx.Linear(3, 4, rngs=rngs), nnx.Linear(3, 4, rngs=rngs)),
        "other features": (nnx.Linear(3, 4, rngs=rngs), nnx.Linear(3, 5, rngs=rngs)),
        "other weight dtype": (
            nnx.Linear(3, 4, rngs=rngs),
            nnx.Linear(3, 4, param_dtype=jnp.bfloat16, rngs=rngs),
        ),
        "other metadata": (nnx.Linear(3, 4, rngs=nnx.Rngs(0)), annotated),
        "int against float": (_Setting(1, rngs), _Setting(1.0, rngs)),
        "int against bool": (_Setting(1, rngs), _Setting(True, rngs)),
        "static against data": (_Setting(3, rngs), flagged),
        "shared against distinct": (_TwoWeights(shared=True), _TwoWeights(shared=False)),
        "other array shape": (_Setting(1, rngs), _Setting(1, rngs, dtype=jnp.bfloat16)),
    }


@pytest.mark.parametrize("case", sorted(_structure_pairs()))
def test_the_remembered_structure_is_as_fine_as_the_graph_definition(case):
    first, second = _structure_pairs()[case]
    same_structure = convert._structure(first) == convert._structure(second)
    shapes = [
        [(np.shape(leaf), jnp.result_type(leaf)) for leaf in jax.tree.leaves(nnx.state(module))]
        for module in (first, second)
    ]
    same_graph = nnx.graphdef(first) == nnx.graphdef(second) and shapes[0] == shapes[1]
    # Equal structures must mean equal graph definitions and shapes; the structure may be
    # finer (1 and 1.0 are equal settings to a graph definition, but different ones).
    assert same_structure == (case == "same settings")
    assert same_graph or not same_structure


def test_wrapped_modules_of_one_layout_keep_their_own_settings():
    modules = [_Setting(setting, nnx.Rngs(0)) for setting in (1, 1.0, True, 2, 1)]
    for _ in range(2):  # the second time, the shells' layouts are remembered
        for module in modules:
            back = convert.to_nnx(convert.from_nnx(module))
            assert type(back.setting) is type(module.setting)
            assert back.setting == module.setting
            helpers.assert_same_state(back, module)


def test_shared_variables_of_a_remembered_layout_stay_shared():
    for _ in range(2):
        shared, distinct = _TwoWeights(shared=True), _TwoWeights(shared=False)
        shared_layer, distinct_layer = convert.from_nnx(shared), convert.from_nnx(distinct)
        assert list(shared_layer.variables) == ["first"]
        assert list(distinct_layer.variables) == ["first", "second"]
        shared_back, distinct_back = convert.to_nnx(shared_layer), convert.to_nnx(distinct_layer)
        assert shared_back.second is shared_back.first
        assert distinct_back.second is not distinct_back.first
        helpers.assert_same_state(shared_back, shared)
        helpers.assert_same_state(distinct_back, distinct)


class _StackedBlock(nnx.Module):
    def __init__(self, dim, dtype, rngs):
        self.linear = nnx.Linear(dim, dim, param_dtype=dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(dim, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.linear(x))


def _stack_of(size, dim, dtype):
    @nnx.split_rngs(splits=size)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return _StackedBlock(dim, dtype, rngs)

    return create(nnx.Rngs(0))


@pytest.mark.parametrize(
    "size, dim, dtype",
    [(2, 4, jnp.float32), (3, 4, jnp.float32), (3, 4, jnp.bfloat16), (3, 5, jnp.float32)],
)
def test_stacks_of_other_sizes_and_dtypes_convert_by_their_own(size, dim, dtype):
    for _ in range(2):  # the second time, the stack's layout is remembered
        held = nnx.List([_stack_of(size, dim, dtype)])  # to_nnx rebuilds a stack as a child
        (layer,) = convert.from_nnx(held)
        assert isinstance(layer, layer_stack.LayerStack)
        assert layer.stack_axis_size == size
        stacked_arrays = {
            f"0/{path}": variable.get_value()
            for path, variable in helpers.flat_state(held[0]).items()
        }
        converted = {variable.label: variable for variable in variables.unbind_variables(layer)[1]}
        assert converted.keys() == stacked_arrays.keys()
        for label, variable in converted.items():
            # The whole stacked array, not a copy or a slice of it.
            assert variable.get_raw_value() is stacked_arrays[label]
            assert variable.value.named_shape[layer.stack_axis] == size
            assert variable.get_raw_value().dtype == dtype
        helpers.assert_same_state(held, convert.to_nnx([layer]))


@pytest.mark.parametrize("make_stack", ["linear", "user_block"])
def test_a_stack_at_the_root_comes_back_as_its_own_class(make_stack):
    if make_stack == "linear":
        stack = nnx.vmap(lambda key: nnx.Linear(4, 4, rngs=nnx.Rngs(key)))(
            jax.random.split(jax.random.key(0), 3)
        )
    else:
        stack = _stack_of(3, 4, jnp.float32)
    layer = convert.from_nnx(stack)
    assert isinstance(layer, layer_stack.LayerStack)
    back = convert.to_nnx(layer)
    assert type(back) is type(stack)
    helpers.assert_same_state(stack, back)


def test_a_stack_axis_named_like_a_layer_axis_is_refused():
    held = nnx.List([_stack_of(2, 4, jnp.float32)])
    with pytest.raises(ValueError, match=r"Repeated axis names.*'features', 'features'"):
        convert.from_nnx(held, stack="features")


def test_first_slices_of_arrays_on_different_devices():
    first, second = jax.devices()[:2]
    arrays = [
        jax.device_put(jnp.arange(6.0).reshape(3, 2), first),
        jax.device_put(jnp.arange(3.0) + 10, second),
    ]
    slices = convert._first_slices(arrays)
    np.testing.assert_array_equal(slices[0], arrays[0][0])
    np.testing.assert_array_equal(slices[1], arrays[1][0])
    together = convert._first_slices([arrays[0], jax.device_put(arrays[1], first)])
    np.testing.assert_array_equal(together[1], arrays[1][0])


class _Tied(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(4, 4, rngs=rngs)
        self.second = nnx.Linear(4, 4, rngs=rngs)
        self.second.kernel = self.first.kernel
        self.again = self.first

    def __call__(self, x):
        return self.again(self.second(self.first(x)))


def test_shared_variables_and_modules_stay_shared_in_every_conversion():
    module = _Tied(nnx.Rngs(0))
    for _ in range(3):  # later conversions reuse what the first one worked out
        layer = convert.from_nnx(module)
        first = layer.children["first"].layer.sublayers[0].weights
        assert layer.children["second"].layer.sublayers[0].weights is first
        assert layer.children["again"] is layer.children["first"]
        assert first.get_raw_value() is module.first.kernel.get_value()
        back = convert.to_nnx(layer)
        assert back.second.kernel is back.first.kernel and back.again is back.first
        helpers.assert_same_state(back, module)


def test_conversion_leaves_the_module_untouched():
    module = Block(nnx.Rngs(0))
    module.extra = basic_ops.Elementwise(jax.nn.relu)  # a pz_flax attribute, kept by the shell
    graphdef, state = nnx.split(module)
    arrays = [variable.get_value() for _, variable in nnx.to_flat_state(state)]
    layer = convert.from_nnx(module)
    assert set(layer.children) == {"norm", "attn", "mlp"}
    assert set(layer.pz_attributes) == {"extra"}
    after_graphdef, after_state = nnx.split(module)
    assert after_graphdef == graphdef
    assert all(
        variable.get_value() is array
        for (_, variable), array in zip(nnx.to_flat_state(after_state), arrays, strict=True)
    )
