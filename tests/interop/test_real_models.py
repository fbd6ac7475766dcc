"""End to end on NNX models written the way Flax users write them (see ``real_models``).

Every model goes through every step: convert, forward (equal to NNX's to float32 rounding),
round trip to its own class with a bit-identical ``nnx.state``, equal gradients, a selector
edit that reaches the NNX side, training with ``nnx.Optimizer`` after ``to_nnx``, and a
checkpoint saved and restored in a fresh process.
"""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pz_flax import pz
from pz_flax.checkpoint import errors
from pz_flax.checkpoint import storage
from pz_flax.core import named_axes
from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.interop import convert
from pz_flax.interop import wrappers
from pz_flax.nn import layer as layer_base
from pz_flax.nn import layer_stack
from tests.interop import helpers
from tests.interop import real_models

CASES = [make_case() for make_case in real_models.ALL_CASES]
IDS = [case.name for case in CASES]


@struct.pytree_dataclass
class ScaleByName(layer_base.Layer):
    """Multiplies its input by a named array (broadcast by axis name): head ablation."""

    factor: named_axes.NamedArray

    def __call__(self, value, **_unused_side_inputs):
        return value * self.factor


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _pz_call(layer, case, inputs=None):
    named = named_axes.wrap(case.inputs if inputs is None else inputs).tag(*case.input_names)
    return _first(layer(named, **case.call_kwargs)).unwrap(*case.output_names)


def _nnx_call(module, case, inputs=None):
    return _first(module(case.inputs if inputs is None else inputs, **case.call_kwargs))


def _assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_converts_runs_like_nnx_and_round_trips_to_its_own_class(case):
    module = case.make()
    layer = convert.from_nnx(module)
    # Round trip first: the calls below advance batch statistics and RNG counters.
    helpers.assert_same_state(module, convert.to_nnx(layer))
    _assert_close(_pz_call(layer, case), _nnx_call(module, case))
    # The state the calls changed is written back, so both worlds stay in step.
    _assert_close(_pz_call(layer, case), _nnx_call(module, case))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_equal_nnx_gradients(case):
    module = case.make()
    module.eval()  # deterministic: gradients of one fixed function
    layer = convert.from_nnx(module)
    pz_grads = helpers.pz_parameter_grads(layer, lambda layer: case.loss(_pz_call(layer, case)))
    nnx_grads = helpers.nnx_parameter_grads(
        module, lambda module: case.loss(_nnx_call(module, case))
    )
    nnx_param_grads = {
        path: grad
        for path, grad in nnx_grads.items()
        if isinstance(helpers.flat_state(module)[path], nnx.Param)
    }
    assert pz_grads.keys() == nnx_param_grads.keys()
    for label, grad in pz_grads.items():
        _assert_close(grad, nnx_param_grads[label])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_selector_edit_reaches_the_nnx_model(case):
    module = case.make()
    module.eval()
    layer = convert.from_nnx(module)
    # Zero the first parameter with a selector; the rebuilt NNX model computes the edit.
    target = pz.select(layer).at_instances_of(variables.Parameter).get_sequence()[0]
    edited = (
        pz.select(layer)
        .at_instances_of(variables.Parameter)
        .where(lambda parameter: parameter is target)
        .apply(lambda parameter: parameter.replace(jnp.zeros_like(parameter.get_raw_value())))
    )
    rebuilt = convert.to_nnx(edited)
    assert type(rebuilt) is type(module)
    rebuilt_state = helpers.flat_state(rebuilt)
    assert not np.any(rebuilt_state[target.label].get_value())
    rebuilt.eval()
    _assert_close(_nnx_call(rebuilt, case), _pz_call(edited, case))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_training_after_to_nnx_matches_training_the_original(case):
    original, converted = case.make(), convert.to_nnx(convert.from_nnx(case.make()))

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda model: case.loss(_nnx_call(model, case)))(model)
        optimizer.update(model, grads)
        return loss

    losses = {}
    for name, model in (("original", original), ("converted", converted)):
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        losses[name] = [float(step(model, optimizer)) for _ in range(3)]
    assert losses["converted"][-1] < losses["converted"][0]
    np.testing.assert_allclose(losses["converted"], losses["original"], rtol=1e-5)
    for path, variable in helpers.flat_state(original).items():
        after = helpers.flat_state(converted)[path].get_value()
        if jnp.issubdtype(jnp.asarray(after).dtype, jnp.floating):
            _assert_close(after, variable.get_value())


def test_stacked_layers_become_a_layer_stack_over_a_named_axis():
    case = real_models.scan_case()
    module = case.make()
    layer = convert.from_nnx(module)
    stack = layer.children["blocks"]
    assert isinstance(stack, layer_stack.LayerStack)
    assert (stack.stack_axis, stack.stack_axis_size) == ("layers", 3)
    kernel = stack.stacked_sublayers.children["linear"].layer.sublayers[0].weights
    assert dict(kernel.value.named_shape) == {"layers": 3, "features": 8, "features_out": 8}
    assert kernel.get_raw_value() is module.blocks.linear.kernel.get_value()
    # The LayerStack alone runs the blocks one after the other, like the model's nnx.scan.
    x = named_axes.wrap(case.inputs).tag(*case.input_names)
    _assert_close(stack(x).unwrap(*case.output_names), module(case.inputs))
    renamed = convert.from_nnx(module, stack="blocks")
    assert renamed.children["blocks"].stack_axis == "blocks"


def test_language_model_logits_are_named_vocabulary():
    case = real_models.gemma_case()
    layer = convert.from_nnx(case.make())
    named = named_axes.wrap(case.inputs).tag(*case.input_names)
    assert dict(layer(named, **case.call_kwargs).named_shape) == {
        "batch": 2,
        "seq": 5,
        "vocabulary": 19,
    }


def test_missing_call_argument_of_a_decoder_is_an_error():
    case = real_models.qwen_case()
    layer = convert.from_nnx(case.make())
    named = named_axes.wrap(case.inputs).tag(*case.input_names)
    with pytest.raises(TypeError, match=r"QwenDecoder needs the call argument\(s\) \['cache'\]"):
        layer(named, positions=case.call_kwargs["positions"], attention_mask=jnp.ones((2, 5, 5)))


def test_kv_cache_side_input_is_forwarded_and_returned():
    case = real_models.qwen_case()
    module = case.make()
    layer = convert.from_nnx(module)
    cache = module.init_cache(2, 8)
    mask = jnp.concatenate([case.call_kwargs["attention_mask"], jnp.zeros((2, 5, 3), bool)], -1)
    kwargs = {**case.call_kwargs, "cache": cache, "attention_mask": mask}
    named = named_axes.wrap(case.inputs).tag(*case.input_names)
    logits, new_cache = layer(named, **kwargs)
    expected_logits, expected_cache = module(case.inputs, **kwargs)
    _assert_close(logits.unwrap(*case.output_names), expected_logits)
    assert int(jnp.asarray(new_cache[0]["end"])) == 5
    _assert_close(
        new_cache[0]["k"].unwrap("batch", "seq", "features_0", "features_1"),
        expected_cache[0]["k"],
    )


def test_dropout_rngs_and_deterministic_are_call_arguments():
    case = real_models.mnist_case()
    module = case.make()
    layer = convert.from_nnx(module)
    named = named_axes.wrap(case.inputs).tag(*case.input_names)
    result = layer(named, rngs=nnx.Rngs(dropout=5)).unwrap(*case.output_names)
    _assert_close(result, module(case.inputs, rngs=nnx.Rngs(dropout=5)))


def test_explicit_dtypes_map_natively_and_casts_say_why_they_are_wrapped():
    layer = convert.from_nnx(real_models.gemma_case().make())
    natives = {
        found.nnx_type
        for found in pz.select(layer).at_instances_of(wrappers.FromNNX).get_sequence()
    }
    assert {nnx.Einsum, nnx.Linear, nnx.Embed} <= natives
    casting = nnx.Linear(2, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert "dtype=bfloat16" in convert.from_nnx(casting).wrapped_because
    with pytest.raises(ValueError, match="dtype=bfloat16 with param_dtype=float32"):
        convert.from_nnx(casting, strict=True)


def test_sharded_model_converts_and_runs_outside_a_mesh_without_resharding():
    case = real_models.minigpt_case()
    module = case.make()
    layer = convert.from_nnx(module)
    kernel = module.blocks[0].up.kernel
    converted = pz.select(layer).at_instances_of(variables.Parameter).get_sequence()
    by_label = {parameter.label: parameter for parameter in converted}
    up_kernel = by_label["blocks/0/up/kernel"]
    assert up_kernel.get_raw_value() is kernel.get_value()
    assert up_kernel.get_metadata()["out_sharding"] == kernel.get_metadata()["out_sharding"]
    assert up_kernel.get_metadata()["eager_sharding"] is False
    helpers.assert_same_state(module, convert.to_nnx(layer))


def test_one_dimensional_conv_without_its_seq_axis_is_an_error():
    layer = convert.from_nnx(nnx.Conv(3, 4, (3,), rngs=nnx.Rngs(0)))
    x = helpers.random_input((2, 7, 3))
    with pytest.raises(ValueError, match=r"Conv .*no axis named \['seq'\]"):
        layer(helpers.named(x[:, 0], "batch", "features"))
    # The seq axis is found by name, wherever it is.
    swapped = layer(helpers.named(jnp.swapaxes(x, 0, 1), "seq", "batch", "features"))
    _assert_close(
        swapped.unwrap("batch", "seq", "features"), nnx.Conv(3, 4, (3,), rngs=nnx.Rngs(0))(x)
    )


def _attention_weights_recorder(layer):
    """The ViT with a recorder after every attention softmax, and the recorders."""
    from pz_flax.nn import attention
    from pz_flax.nn import basic_ops
    from pz_flax.toolshed import save_intermediates

    recorded = (
        pz.select(layer)
        .at_instances_of(attention.Attention)
        .at(lambda block: block.query_key_to_attn)
        .at_instances_of(basic_ops.Softmax)
        .insert_after(save_intermediates.SaveIntermediate())
    )
    recorders = pz.select(recorded).at_instances_of(save_intermediates.SaveIntermediate)
    return recorded, recorders.get_sequence()


def test_vit_workflow_select_capture_ablate_swap_back_to_nnx_and_train():
    from pz_flax.nn import attention
    from pz_flax.nn import basic_ops
    from pz_flax.nn import standardization

    case = real_models.vit_case()
    module = case.make()
    layer = convert.from_nnx(module)
    baseline = _pz_call(layer, case)

    # Every attention block, found by type.
    blocks = pz.select(layer).at_instances_of(attention.Attention).get_sequence()
    assert len(blocks) == 2

    # The attention weights of each layer, as named arrays.
    recorded, recorders = _attention_weights_recorder(layer)
    _assert_close(_pz_call(recorded, case), baseline)
    weights = recorders[0].saved.value
    assert dict(weights.named_shape) == {"batch": 2, "seq": 5, "heads": 2, "kv_seq": 5}
    _assert_close(weights.untag("kv_seq").sum().unwrap("batch", "seq", "heads"), 1.0)

    # Ablate head 1 of the first block by its name: its attention weights become zero.
    keep = named_axes.wrap(jnp.array([1.0, 0.0])).tag("heads")
    ablated = (
        pz.select(recorded)
        .at_instances_of(attention.Attention)
        .pick_nth_selected(0)
        .at(lambda block: block.query_key_to_attn)
        .at_instances_of(basic_ops.Softmax)
        .insert_after(ScaleByName(keep))
    )
    ablated_output = _pz_call(ablated, case)
    assert not np.allclose(ablated_output, baseline)
    # Swap the final LayerNorm for a pz_flax RMS norm.
    swapped = (
        pz.select(ablated)
        .at_instances_of(wrappers.FromNNX)
        .where(lambda found: found.nnx_type is nnx.LayerNorm)
        .pick_nth_selected(4)
        .apply(
            lambda found: standardization.RMSLayerNorm.from_config(
                name="final_norm", init_base_rng=jax.random.key(0), across_axes={"features": 8}
            )
        )
    )
    swapped_output = _pz_call(swapped, case)
    assert not np.allclose(swapped_output, ablated_output)

    # Back to the user's own class: the NNX model computes the edited model.
    rebuilt = convert.to_nnx(swapped)
    assert type(rebuilt) is real_models.ViT
    assert isinstance(rebuilt.norm, wrappers.PzModule)
    _assert_close(rebuilt(case.inputs), swapped_output)

    # And keeps training with nnx.Optimizer.
    optimizer = nnx.Optimizer(rebuilt, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda model: case.loss(model(case.inputs)))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(rebuilt, optimizer)) for _ in range(4)]
    assert losses[-1] < losses[0]


def test_gemma_workflow_select_attention_ablate_a_head_and_back_to_nnx():
    from pz_flax.nn import grouping

    case = real_models.gemma_case()
    module = case.make()
    layer = convert.from_nnx(module)
    baseline = _pz_call(layer, case)
    attention_blocks = (
        pz.select(layer)
        .at_instances_of(wrappers.NNXWrapper)
        .where(lambda wrapper: wrapper.module_type is real_models.GemmaAttention)
    )
    # Wrappers of user classes nest: select inside each block.
    blocks = pz.select(layer).at_instances_of(list).get_sequence()[0]
    attention_blocks = [block.children["attn"] for block in blocks]
    assert all(block.module_type is real_models.GemmaAttention for block in attention_blocks)
    # Ablate head 0 of the first layer: zero its slice of the output projection's input.
    keep = named_axes.wrap(jnp.array([0.0, 1.0, 1.0, 1.0])).tag("features_0")
    output_projection = attention_blocks[0].children["attn_vec_einsum"]
    ablated_projection = wrappers.FromNNX(
        layer=grouping.Sequential([ScaleByName(keep), output_projection.layer]),
        nnx_type=output_projection.nnx_type,
        nnx_config=output_projection.nnx_config,
    )
    ablated = (
        pz.select(layer)
        .at_instances_of(wrappers.FromNNX)
        .where(lambda found: found is output_projection)
        .set(ablated_projection)
    )
    ablated_output = _pz_call(ablated, case)
    assert not np.allclose(ablated_output, baseline)
    rebuilt = convert.to_nnx(ablated)
    assert type(rebuilt) is real_models.GemmaStyleDecoder
    assert isinstance(rebuilt.layers[0].attn.attn_vec_einsum, wrappers.PzModule)
    _assert_close(_nnx_call(rebuilt, case), ablated_output)
    del attention_blocks


def _restore_in_fresh_process(path, expected, case_name, tmp_path):
    np.save(tmp_path / "expected.npy", np.asarray(expected))
    script = textwrap.dedent(
        f"""
        import numpy as np
        from pz_flax.checkpoint import storage
        from pz_flax.core import named_axes
        from tests.interop import real_models
        case = [make() for make in real_models.ALL_CASES if make().name == {case_name!r}][0]
        layer = storage.restore({str(path)!r}, allow_modules=["tests.interop.real_models"])
        named = named_axes.wrap(case.inputs).tag(*case.input_names)
        output = layer(named, **case.call_kwargs)
        output = output[0] if isinstance(output, tuple) else output
        np.testing.assert_allclose(
            output.unwrap(*case.output_names), np.load({str(tmp_path / "expected.npy")!r}),
            rtol=2e-5, atol=2e-5,
        )
        print("restored")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd="."
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "restored" in done.stdout


# Models whose checkpoint save is a known limitation of the manifest's static codec; strict, so
# the mark must go as soon as the limitation is lifted.
_CHECKPOINT_LIMITATIONS: dict[str, str] = {}
CHECKPOINT_CASES = [
    pytest.param(
        case,
        id=case.name,
        marks=pytest.mark.xfail(
            strict=True,
            raises=errors.UnsupportedValueError,
            reason=_CHECKPOINT_LIMITATIONS[case.name],
        ),
    )
    if case.name in _CHECKPOINT_LIMITATIONS
    else pytest.param(case, id=case.name)
    for case in CASES
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_checkpoint_save_and_restore_in_a_fresh_process(case, tmp_path):
    module = case.make()
    module.eval()
    layer = convert.from_nnx(module)
    expected = _pz_call(layer, case)
    path = storage.save(tmp_path / "checkpoint", layer)
    _restore_in_fresh_process(path, expected, case.name, tmp_path)
