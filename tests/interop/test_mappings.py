"""Tests of every shipped mapping: forward equality, bit-identical round trip, gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pz_flax.core import variables
from pz_flax.interop import convert
from pz_flax.interop import mappings
from pz_flax.interop import wrappers
from pz_flax.nn import attention
from pz_flax.nn import basic_ops
from pz_flax.nn import combinators
from pz_flax.nn import dropout
from pz_flax.nn import embeddings
from pz_flax.nn import grouping
from pz_flax.nn import linear_and_affine
from pz_flax.nn import standardization
from tests.interop import helpers

BSF = ("batch", "seq", "features")


def _rngs():
    return nnx.Rngs(0)


# (id, module factory, input shape, input names, output names, integer input bound, pz class)
CASES = [
    (
        "linear",
        lambda: nnx.Linear(3, 4, rngs=_rngs()),
        (2, 3),
        ("batch", "features"),
        ("batch", "features"),
        None,
        linear_and_affine.Affine,
    ),
    (
        "linear_no_bias",
        lambda: nnx.Linear(3, 4, use_bias=False, rngs=_rngs()),
        (2, 5, 3),
        BSF,
        BSF,
        None,
        linear_and_affine.LinearInPlace,
    ),
    (
        "linear_image",
        lambda: nnx.Linear(3, 2, rngs=_rngs()),
        (2, 4, 4, 3),
        ("batch", "height", "width", "features"),
        ("batch", "height", "width", "features"),
        None,
        linear_and_affine.Affine,
    ),
    (
        "linear_general_out",
        lambda: nnx.LinearGeneral(3, (2, 2), rngs=_rngs()),
        (2, 3),
        ("batch", "features"),
        ("batch", "features_0", "features_1"),
        None,
        linear_and_affine.Affine,
    ),
    (
        "linear_general_in",
        lambda: nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=_rngs()),
        (2, 2, 3),
        ("batch", "features_0", "features_1"),
        ("batch", "features"),
        None,
        linear_and_affine.Affine,
    ),
    (
        "einsum",
        lambda: nnx.Einsum("nta,ahb->nthb", (3, 2, 4), (2, 4), rngs=_rngs()),
        (2, 5, 3),
        BSF,
        ("batch", "seq", "features_0", "features_1"),
        None,
        linear_and_affine.Affine,
    ),
    (
        "embed",
        lambda: nnx.Embed(10, 4, rngs=_rngs()),
        (2, 5),
        ("batch", "seq"),
        BSF,
        10,
        embeddings.EmbeddingLookup,
    ),
    (
        "layer_norm",
        lambda: nnx.LayerNorm(3, rngs=_rngs()),
        (2, 5, 3),
        BSF,
        BSF,
        None,
        standardization.LayerNorm,
    ),
    (
        "layer_norm_scale_only",
        lambda: nnx.LayerNorm(3, use_bias=False, epsilon=1e-3, rngs=_rngs()),
        (2, 3),
        ("batch", "features"),
        ("batch", "features"),
        None,
        standardization.LayerNorm,
    ),
    (
        # Without a scale, the shift alone gives the feature count and the parameter dtype.
        "layer_norm_shift_only_bfloat16",
        lambda: nnx.LayerNorm(3, use_scale=False, param_dtype=jnp.bfloat16, rngs=_rngs()),
        (2, 3),
        ("batch", "features"),
        ("batch", "features"),
        None,
        standardization.LayerNorm,
    ),
    (
        "rms_norm",
        lambda: nnx.RMSNorm(3, rngs=_rngs()),
        (2, 5, 3),
        BSF,
        BSF,
        None,
        standardization.RMSLayerNorm,
    ),
    (
        "rms_norm_no_scale",
        lambda: nnx.RMSNorm(3, use_scale=False, rngs=_rngs()),
        (2, 3),
        ("batch", "features"),
        ("batch", "features"),
        None,
        standardization.RMSLayerNorm,
    ),
    (
        "dropout_deterministic",
        lambda: nnx.Dropout(0.3, deterministic=True),
        (2, 3),
        ("batch", "features"),
        ("batch", "features"),
        None,
        dropout.DisabledDropout,
    ),
    (
        "dropout_rate_zero",
        lambda: nnx.Dropout(0.0, deterministic=False),
        (2, 3),
        ("batch", "features"),
        ("batch", "features"),
        None,
        dropout.DisabledDropout,
    ),
    (
        "attention",
        lambda: nnx.MultiHeadAttention(2, 8, decode=False, rngs=_rngs()),
        (2, 5, 8),
        BSF,
        BSF,
        None,
        attention.Attention,
    ),
    (
        "attention_no_bias",
        lambda: nnx.MultiHeadAttention(
            2, 4, qkv_features=8, out_features=6, use_bias=False, decode=False, rngs=_rngs()
        ),
        (1, 3, 4),
        BSF,
        BSF,
        None,
        attention.Attention,
    ),
    (
        "sequential",
        lambda: nnx.Sequential(
            nnx.Linear(3, 4, rngs=_rngs()), nnx.relu, nnx.Linear(4, 2, rngs=_rngs()), jax.nn.softmax
        ),
        (2, 3),
        ("batch", "features"),
        ("batch", "features"),
        None,
        grouping.Sequential,
    ),
    (
        "lora",
        lambda: nnx.LoRA(3, 2, 4, b_initializer=nnx.initializers.normal(), rngs=_rngs()),
        (2, 3),
        ("batch", "features"),
        ("batch", "features"),
        None,
        grouping.Sequential,
    ),
    (
        "lora_with_base",
        lambda: nnx.LoRA(
            3,
            2,
            4,
            base_module=nnx.Linear(3, 4, rngs=_rngs()),
            b_initializer=nnx.initializers.normal(),
            rngs=_rngs(),
        ),
        (2, 3),
        ("batch", "features"),
        ("batch", "features"),
        None,
        combinators.BranchAndAddTogether,
    ),
    (
        "lora_linear",
        lambda: nnx.LoRALinear(
            3, 4, lora_rank=2, b_initializer=nnx.initializers.normal(), rngs=_rngs()
        ),
        (2, 3),
        ("batch", "features"),
        ("batch", "features"),
        None,
        combinators.BranchAndAddTogether,
    ),
]
IDS = [case[0] for case in CASES]
# Dropouts have no parameters; one attention configuration is enough for gradients.
GRADIENT_CASES = [
    case for case in CASES if not case[0].startswith("dropout") and case[0] != "attention_no_bias"
]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_equals_nnx(case):
    _, factory, shape, in_names, out_names, bound, pz_class = case
    module = factory()
    x = helpers.random_input(shape, integer_below=bound)
    layer = convert.from_nnx(module)
    assert isinstance(layer, wrappers.FromNNX)
    assert type(layer.layer) is pz_class
    assert layer.nnx_type is type(module)
    result = layer(helpers.named(x, *in_names)).unwrap(*out_names)
    # NNX's LayerNorm computes the variance as E[x^2] - E[x]^2 (use_fast_variance), which
    # loses ~1e-5 relative to the centered formula pz_flax's Standardize uses.
    tolerance = 1e-4 if "norm" in case[0] else 1e-5
    np.testing.assert_allclose(result, module(x), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_round_trip_is_bit_identical_and_copies_nothing(case):
    module = case[1]()
    helpers.assert_same_state(module, convert.to_nnx(convert.from_nnx(module)))


@pytest.mark.parametrize(
    "case",
    GRADIENT_CASES,
    ids=[case[0] for case in GRADIENT_CASES],
)
def test_gradients_equal_nnx(case):
    _, factory, shape, in_names, out_names, bound, _ = case
    module = factory()
    x = helpers.random_input(shape, integer_below=bound)
    weights = helpers.random_input(module(x).shape, seed=7)
    layer = convert.from_nnx(module)

    def pz_loss(layer):
        return jnp.sum(layer(helpers.named(x, *in_names)).unwrap(*out_names) * weights)

    def nnx_loss(module):
        return jnp.sum(module(x) * weights)

    pz_grads = helpers.pz_parameter_grads(layer, pz_loss)
    nnx_grads = helpers.nnx_parameter_grads(module, nnx_loss)
    assert pz_grads.keys() == nnx_grads.keys()
    for key in nnx_grads:
        np.testing.assert_allclose(pz_grads[key], nnx_grads[key], rtol=1e-4, atol=1e-5)


def test_converted_linear_weights_are_named_and_selectable():
    module = nnx.Linear(3, 4, rngs=_rngs())
    layer = convert.from_nnx(module)
    linears = layer.select().at_instances_of(linear_and_affine.Linear).get_sequence()
    assert len(linears) == 1
    weights = linears[0].weights
    assert weights.label == "kernel"
    assert dict(weights.value.named_shape) == {"features": 3, "features_out": 4}
    assert weights.get_value() is module.kernel.get_value()


def test_round_trip_carries_selector_edit():
    module = nnx.Linear(3, 4, rngs=_rngs())
    layer = convert.from_nnx(module)
    new_kernel = jnp.arange(12.0).reshape(3, 4)
    edited = (
        layer.select()
        .at_instances_of(linear_and_affine.Linear)
        .apply(
            lambda linear: dataclasses.replace(
                linear,
                weights=variables.Parameter(
                    value=helpers.named(new_kernel, "features", "features_out"), label="kernel"
                ),
            )
        )
    )
    rebuilt = convert.to_nnx(edited)
    assert type(rebuilt) is nnx.Linear
    assert rebuilt.kernel.get_value() is new_kernel
    assert rebuilt.bias.get_value() is module.bias.get_value()


def test_round_trip_reorders_axes_of_a_transposed_edit():
    module = nnx.Linear(3, 4, rngs=_rngs())
    layer = convert.from_nnx(module)
    linear = layer.layer.sublayers[0]
    transposed = variables.Parameter(
        value=helpers.named(module.kernel.get_value().T, "features_out", "features"),
        label="kernel",
    )
    edited = (
        layer.select()
        .at(lambda root: root.layer.sublayers[0])
        .set(dataclasses.replace(linear, weights=transposed))
    )
    rebuilt = convert.to_nnx(edited)
    np.testing.assert_array_equal(rebuilt.kernel.get_value(), module.kernel.get_value())


def test_edit_that_nnx_cannot_express_is_kept_in_an_adapter():
    module = nnx.Linear(3, 4, rngs=_rngs())
    layer = convert.from_nnx(module)
    edited = (
        layer.select()
        .at(lambda root: root.layer)
        .apply(lambda affine: grouping.Sequential([affine, basic_ops.Elementwise(jax.nn.relu)]))
    )
    adapter = convert.to_nnx(edited)
    assert isinstance(adapter, wrappers.PzModule)
    x = helpers.random_input((2, 3))
    np.testing.assert_allclose(adapter(x), jax.nn.relu(module(x)), rtol=1e-6)
    native = convert.to_nnx(edited, native=True)
    assert type(native) is nnx.Sequential
    assert type(native.layers[0]) is nnx.Linear
    np.testing.assert_allclose(native(x), jax.nn.relu(module(x)), rtol=1e-6)
    rescaled = (
        layer.select()
        .at(lambda root: root.layer)
        .apply(
            lambda affine: grouping.Sequential([affine, linear_and_affine.ConstantRescale(by=2.0)])
        )
    )
    with pytest.raises(ValueError, match="ConstantRescale has no native NNX counterpart"):
        convert.to_nnx(rescaled, native=True)


def test_edited_epsilon_is_carried_over():
    module = nnx.LayerNorm(3, rngs=_rngs())
    layer = convert.from_nnx(module)
    edited = (
        layer.select()
        .at_instances_of(standardization.Standardize)
        .apply(lambda standardize: dataclasses.replace(standardize, epsilon=0.5))
    )
    assert convert.to_nnx(edited).epsilon == 0.5


@pytest.mark.parametrize(
    "factory",
    [
        lambda: nnx.Linear(3, 4, dtype=jnp.bfloat16, rngs=_rngs()),
        lambda: nnx.LinearGeneral(3, 4, axis=0, rngs=_rngs()),
        lambda: nnx.LayerNorm(3, reduction_axes=(-2, -1), rngs=_rngs()),
        lambda: nnx.Dropout(0.3, rngs=_rngs()),
        lambda: nnx.Dropout(0.3, deterministic=None),
        lambda: nnx.MultiHeadAttention(2, 8, dropout_rate=0.1, rngs=_rngs()),
        lambda: nnx.MultiHeadAttention(2, 8, num_kv_heads=1, rngs=_rngs()),
        lambda: nnx.Einsum("ab,cb->ac", (4, 3), rngs=_rngs()),
        lambda: nnx.List([nnx.Linear(2, 2, rngs=_rngs()), 3]),
    ],
    ids=[
        "dtype",
        "leading_axis",
        "two_axes",
        "own_rng",
        "per_call",
        "attn_dropout",
        "gqa",
        "einsum_kernel_order",
        "mixed_list",
    ],
)
def test_configurations_without_exact_named_form_are_wrapped(factory):
    module = factory()
    layer = convert.from_nnx(module)
    assert isinstance(layer, wrappers.NNXWrapper)
    helpers.assert_same_state(module, convert.to_nnx(layer))
    with pytest.raises(ValueError, match="Cannot convert"):
        convert.from_nnx(module, strict=True)


def test_wrapped_bfloat16_linear_keeps_nnx_numerics():
    module = nnx.Linear(3, 4, dtype=jnp.bfloat16, rngs=_rngs())
    x = helpers.random_input((2, 3))
    result = convert.from_nnx(module)(helpers.named(x, "batch", "features"))
    assert result.dtype == jnp.bfloat16
    np.testing.assert_array_equal(result.unwrap("batch", "features"), module(x))


def test_active_dropout_maps_to_stochastic_dropout_with_side_input_stream():
    from pz_flax.core import random_stream

    module = nnx.Dropout(0.5, deterministic=False)
    layer = convert.from_nnx(module)
    assert type(layer.layer) is dropout.StochasticDropout
    x = helpers.named(jnp.ones((4, 6)), "batch", "features")
    stream = random_stream.RandomStream.from_base_key(jax.random.key(0))
    result = layer(x, random_stream=stream).unwrap("batch", "features")
    assert set(np.unique(np.asarray(result)).tolist()) <= {0.0, 2.0}
    helpers.assert_same_state(module, convert.to_nnx(layer))


def test_list_and_dict_become_containers():
    items = nnx.List([nnx.Linear(2, 3, rngs=_rngs()), nnx.relu])
    converted = convert.from_nnx(items)
    assert isinstance(converted, list)
    assert isinstance(converted[0], wrappers.FromNNX)
    assert isinstance(converted[1], basic_ops.Elementwise)
    assert converted[0].layer.sublayers[0].weights.label == "0/kernel"
    helpers.assert_same_state(items, convert.to_nnx(converted))
    table = nnx.Dict({"proj": nnx.Linear(2, 3, rngs=_rngs())})
    converted_dict = convert.from_nnx(table)
    assert set(converted_dict) == {"proj"}
    helpers.assert_same_state(table, convert.to_nnx(converted_dict))


def test_structures_match_detects_changed_scalars_and_structure():
    rescale = linear_and_affine.ConstantRescale(by=0.5)
    assert mappings.structures_match(rescale, linear_and_affine.ConstantRescale(by=0.5))
    assert not mappings.structures_match(rescale, linear_and_affine.ConstantRescale(by=0.25))
    assert not mappings.structures_match(rescale, grouping.Sequential([rescale]))
    vector = linear_and_affine.ConstantRescale(by=jnp.ones(2))
    assert not mappings.structures_match(vector, linear_and_affine.ConstantRescale(by=jnp.ones(3)))


#### Mappings decline only with MappingNotApplicable; other failures are reported ####


class Gain(nnx.Module):
    """A user layer with weights: multiplies the features by a learned vector."""

    def __init__(self, features, *, rngs):
        self.gain = nnx.Param(jax.random.normal(rngs.params(), (features,)))

    def __call__(self, x):
        return x * self.gain[...]


class GainMapping(mappings.ReversibleMapping):
    """A user's mapping written on the public base class: only to_pz and build."""

    nnx_type = Gain
    pz_types = ()

    def to_pz(self, module, context):
        return linear_and_affine.Linear(
            weights=context.parameter(module.gain, "gain", (context.naming.features,)),
            in_axis_names=(),
            out_axis_names=(),
        )

    def build(self, layer, context, naming, config):
        if type(layer) is not linear_and_affine.Linear:
            return None
        array = context.array(layer.weights, (naming.features,))
        return context.construct(
            Gain, array.shape[0], variables_by_path={"gain": (layer.weights, array)}
        )


class _Blocks(nnx.Module):
    def __init__(self, block):
        self.blocks = nnx.List([nnx.Linear(3, 3, rngs=_rngs()), block])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_a_user_mapping_on_the_public_base_class_round_trips():
    from pz_flax import interop

    assert interop.ReversibleMapping is mappings.ReversibleMapping
    module = Gain(3, rngs=_rngs())
    with interop.mapping_registry.scoped(Gain, GainMapping()):
        layer = convert.from_nnx(module)
        assert type(layer.layer) is linear_and_affine.Linear
        assert layer.layer.weights.label == "gain"
        x = helpers.random_input((2, 3))
        np.testing.assert_allclose(
            layer(helpers.named(x, "batch", "features")).unwrap("batch", "features"),
            module(x),
            rtol=1e-6,
        )
        rebuilt = convert.to_nnx(layer)
        assert type(rebuilt) is Gain
        helpers.assert_same_state(module, rebuilt)
        assert rebuilt.gain.get_value() is module.gain.get_value()
        # Edits the class cannot represent are declined by the structure check, not dropped.
        extended = dataclasses.replace(
            layer, layer=grouping.Sequential([layer.layer, basic_ops.Elementwise(jax.nn.relu)])
        )
        assert isinstance(convert.to_nnx(extended), wrappers.PzModule)
        renamed = (
            layer.select()
            .at(lambda root: root.layer.weights)
            .apply(
                lambda weights: variables.Parameter(
                    value=weights.value.untag("features").tag("channels"), label="gain"
                )
            )
        )
        assert isinstance(convert.to_nnx(renamed), wrappers.PzModule)
    assert isinstance(convert.from_nnx(module), wrappers.NNXWrapper)


def test_a_bug_in_to_pz_is_reported_with_the_module_path_instead_of_wrapping():
    class BuggyGainMapping(GainMapping):
        def to_pz(self, module, context):
            return super().to_pz(module, context, "an extra argument")

    model = _Blocks(Gain(3, rngs=_rngs()))
    with (
        mappings.registry.mapping_registry.scoped(Gain, BuggyGainMapping()),
        pytest.raises(mappings.registry.MappingError) as raised,
    ):
        convert.from_nnx(model)
    message = str(raised.value)
    assert "BuggyGainMapping failed converting the Gain at blocks/1" in message
    assert "TypeError" in message
    assert isinstance(raised.value.__cause__, TypeError)
    # Inside a mapped container the failure stays the child's: the container's mapping passes
    # it on instead of reporting it as its own.
    sequential = nnx.Sequential(nnx.Linear(3, 3, rngs=_rngs()), Gain(3, rngs=_rngs()))
    with (
        mappings.registry.mapping_registry.scoped(Gain, BuggyGainMapping()),
        pytest.raises(mappings.registry.MappingError) as raised,
    ):
        convert.from_nnx(sequential)
    assert "BuggyGainMapping failed converting the Gain at layers/1" in str(raised.value)
    assert "SequentialMapping" not in str(raised.value)


def test_a_flax_change_a_builtin_mapping_does_not_expect_is_reported_not_wrapped():
    class OutdatedLinearMapping(mappings.LinearMapping):
        # As if a Flax release had renamed an attribute the mapping reads.
        def to_pz(self, module, context):
            return module.has_bias

    module = nnx.Linear(3, 4, rngs=_rngs())
    with (
        mappings.registry.mapping_registry.scoped(
            nnx.Linear, OutdatedLinearMapping(), replace=True
        ),
        pytest.raises(mappings.registry.MappingError, match=r"Linear at <root>") as raised,
    ):
        convert.from_nnx(module)
    assert isinstance(raised.value.__cause__, AttributeError)
    assert type(convert.from_nnx(module).layer) is linear_and_affine.Affine


def test_a_bug_in_build_is_reported_by_both_directions():
    class BuggyBuildMapping(GainMapping):
        pz_types = (linear_and_affine.Linear,)

        def build(self, layer, context, naming, config):
            return {}["gain"]

    module = Gain(3, rngs=_rngs())
    native = linear_and_affine.Linear(
        weights=variables.Parameter(value=helpers.named(jnp.ones(3), "features"), label="g"),
        in_axis_names=(),
        out_axis_names=(),
    )
    with mappings.registry.mapping_registry.scoped(Gain, BuggyBuildMapping()):
        with pytest.raises(mappings.registry.MappingError, match="Gain at <root>"):
            convert.from_nnx(module)
        with pytest.raises(
            mappings.registry.MappingError, match=r"BuggyBuildMapping.to_nnx failed on a Linear"
        ) as raised:
            convert.to_nnx(native, native=True)
    assert isinstance(raised.value.__cause__, KeyError)


def test_declining_mappings_still_say_which_setting_forced_a_wrapper():
    wrapped = convert.from_nnx(nnx.Dropout(0.3, rngs=_rngs()))
    assert wrapped.wrapped_because.startswith("DropoutMapping: it holds its own RNG stream")
    wrapped = convert.from_nnx(nnx.LayerNorm(3, reduction_axes=(-2, -1), rngs=_rngs()))
    assert "reduction_axes=-1" in wrapped.wrapped_because
    with pytest.raises(ValueError, match="LayerNormMapping: only reduction_axes=-1"):
        convert.from_nnx(nnx.LayerNorm(3, reduction_axes=(-2, -1), rngs=_rngs()), strict=True)


def _replace_sublayer(layer, select, replacement):
    return layer.select().at(select).set(replacement)


@pytest.mark.parametrize(
    ("factory", "edit"),
    [
        (
            lambda: nnx.MultiHeadAttention(2, 8, decode=False, rngs=_rngs()),
            lambda layer: _replace_sublayer(
                layer, lambda root: root.layer.input_to_query, basic_ops.Elementwise(jnp.tanh)
            ),
        ),
        (
            lambda: nnx.MultiHeadAttention(2, 8, decode=False, rngs=_rngs()),
            lambda layer: _replace_sublayer(
                layer,
                lambda root: root.layer.attn_value_to_output,
                grouping.Sequential([basic_ops.Elementwise(jnp.tanh)]),
            ),
        ),
        (
            lambda: nnx.Embed(5, 3, rngs=_rngs()),
            lambda layer: _replace_sublayer(
                layer,
                lambda root: root.layer.table.embeddings,
                variables.Parameter(value=jnp.ones((5, 3)), label="embedding"),
            ),
        ),
        (
            lambda: nnx.LoRA(3, 2, 3, rngs=_rngs()),
            lambda layer: _replace_sublayer(
                layer, lambda root: root.layer.sublayers[0], basic_ops.Elementwise(jnp.tanh)
            ),
        ),
        (
            lambda: nnx.Linear(3, 4, rngs=_rngs()),
            lambda layer: _replace_sublayer(
                layer, lambda root: root.layer, linear_and_affine.Affine([])
            ),
        ),
        (
            lambda: nnx.Linear(3, 4, rngs=_rngs()),
            lambda layer: _replace_sublayer(
                layer, lambda root: root.layer.sublayers[0].weights, jnp.ones((3, 4))
            ),
        ),
        (
            lambda: nnx.MultiHeadAttention(2, 8, decode=False, rngs=_rngs()),
            lambda layer: _replace_sublayer(
                layer,
                lambda root: root.layer.attn_value_to_output.sublayers[1],
                layer.layer.attn_value_to_output.sublayers[1].sublayers[0],
            ),
        ),
    ],
    ids=[
        "attention_query_not_a_sequential",
        "attention_output_too_short",
        "positional_embedding_table",
        "lora_path_not_linear",
        "empty_affine",
        "constant_weights",
        "attention_output_bias_removed",
    ],
)
def test_edits_of_another_shape_are_declined_not_reported(factory, edit):
    layer = edit(convert.from_nnx(factory()))
    assert isinstance(convert.to_nnx(layer), wrappers.PzModule)


def test_a_natively_built_norm_without_parameters_is_declined():
    norm = standardization.LayerNorm([standardization.Standardize(across=("features",))])
    with pytest.raises(ValueError, match="LayerNorm has no native NNX counterpart"):
        convert.to_nnx(norm, native=True)
