"""Tests for pz_flax.models.transformer.simple_decoder: structure, equivalences, training."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pz_flax import pz
from pz_flax.core import named_axes
from pz_flax.models.transformer import model_parts
from pz_flax.models.transformer import simple_decoder
from tests.models.transformer import helpers


def test_structure_shapes_and_labels():
    model = simple_decoder.build_simple_decoder(helpers.tiny_config(), jax.random.key(0))
    assert isinstance(model, model_parts.TransformerLM)
    assert model.metadata.common_head_axes == {"heads": 2}
    assert model.metadata.projection_dim == 8
    layers = model.body.sublayers
    assert [type(layer).__name__ for layer in layers] == [
        "EmbeddingLookup",
        "LayerStack",
        "RMSLayerNorm",
        "EmbeddingDecode",
    ]
    # Tied embeddings: one parameter object used for lookup and decoding.
    assert layers[0].table.embeddings is layers[-1].table.embeddings
    block = layers[1].stacked_sublayers
    assert isinstance(block, model_parts.TransformerBlock)
    assert layers[1].stack_axis == "blocks"
    _, params = pz.unbind_params(model)
    labels = {param.label for param in params}
    assert "transformer/embedder.embeddings" in labels
    assert "transformer/blocks/attention/query.weights" in labels
    assert "transformer/final_norm/scale.weights" in labels
    query = next(p for p in params if p.label == "transformer/blocks/attention/query.weights")
    assert dict(query.value.named_shape) == {
        "blocks": 2,
        "embedding": 16,
        "heads": 2,
        "projection": 8,
    }
    assert helpers.full_logits(model, helpers.random_tokens()).shape == (2, 6, 13)


def test_unstacked_untied_bf16_variant():
    config = helpers.tiny_config(
        use_layer_stack=False, tie_embeddings=False, activation_dtype=jnp.bfloat16
    )
    model = simple_decoder.build_simple_decoder(config, jax.random.key(0), name="lm")
    names = [type(layer).__name__ for layer in model.body.sublayers]
    assert names == [
        "EmbeddingLookup",
        "CastToDType",
        "TransformerBlock",
        "TransformerBlock",
        "RMSLayerNorm",
        "EmbeddingDecode",
    ]
    assert model.body.sublayers[0].table.embeddings.label == "lm/embedder.embeddings"
    assert model.body.sublayers[-1].table.embeddings.label == "lm/unembedder.embeddings"
    cast = model.body.sublayers[1]
    assert cast.dtype == jnp.bfloat16
    # Parameters stay float32, so the float32 final norm promotes the logits back.
    assert np.isfinite(helpers.full_logits(model, helpers.random_tokens())).all()


def test_slots_when_built_without_rng():
    model = simple_decoder.build_simple_decoder(helpers.tiny_config(), None)
    assert not pz.unbind_params(model)[1]
    slots = pz.select(model).at_instances_of(pz.ParameterSlot).get_sequence()
    assert "transformer/blocks/mlp/in/Linear.weights" in {slot.label for slot in slots}


def test_layer_stack_equals_unrolled_blocks():
    stacked = simple_decoder.build_simple_decoder(helpers.tiny_config(), jax.random.key(0))
    unrolled = simple_decoder.build_simple_decoder(
        helpers.tiny_config(use_layer_stack=False), jax.random.key(5)
    )
    _, stacked_params = pz.unbind_params(stacked)
    by_label = {param.label: param for param in stacked_params}
    _, unrolled_params = pz.unbind_params(unrolled)
    for param in unrolled_params:
        match = re.fullmatch(r"transformer/block_(\d+)/(.*)", param.label)
        if match:
            source = by_label[f"transformer/blocks/{match.group(2)}"].value
            param.value = source[{"blocks": int(match.group(1))}]
        else:
            param.value = by_label[param.label].value
    tokens = helpers.random_tokens()
    np.testing.assert_allclose(
        helpers.full_logits(stacked, tokens), helpers.full_logits(unrolled, tokens), atol=2e-5
    )


def test_causal_and_sliding_window():
    tokens = helpers.random_tokens(seq=6)
    data = np.asarray(tokens.unwrap("batch", "seq")).copy()
    data[:, 5] = (data[:, 5] % 12) + 1
    changed = named_axes.wrap(data, "batch", "seq")
    model = simple_decoder.build_simple_decoder(helpers.tiny_config(), jax.random.key(0))
    before, after = helpers.full_logits(model, tokens), helpers.full_logits(model, changed)
    np.testing.assert_allclose(before[:, :5], after[:, :5], atol=1e-5)
    assert not np.allclose(before[:, 5], after[:, 5])

    windowed = simple_decoder.build_simple_decoder(
        helpers.tiny_config(sliding_window_size=2, num_blocks=1), jax.random.key(0)
    )
    masks = pz.select(windowed).at_instances_of(pz.nn.ApplyCausalSlidingWindowAttentionMask)
    assert masks.count() == 1
    # With one block and a window of 2, position 5 only sees positions 4 and 5.
    data = np.asarray(tokens.unwrap("batch", "seq")).copy()
    data[:, :4] = 1
    far_changed = named_axes.wrap(data, "batch", "seq")
    np.testing.assert_allclose(
        helpers.full_logits(windowed, tokens)[:, 5],
        helpers.full_logits(windowed, far_changed)[:, 5],
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"projection_dim": 7}, "projection_dim must be even"),
        ({"num_heads": 0}, "num_heads must be a positive int"),
        ({"sliding_window_size": 0}, "sliding_window_size must be None or a positive int"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        helpers.tiny_config(**overrides)


def test_wrong_token_axes_name_the_problem():
    model = simple_decoder.build_simple_decoder(
        helpers.tiny_config(num_blocks=1), jax.random.key(0)
    )
    with pytest.raises(ValueError, match=r"EmbeddingLookup.*'embedding'"):
        model(named_axes.zeros({"seq": 3, "embedding": 2}, jnp.int32))


def test_training_reduces_loss():
    model = simple_decoder.build_simple_decoder(helpers.tiny_config(), jax.random.key(0))
    unbound, params = pz.unbind_params(model, freeze=True)
    # A short periodic sequence the model can learn in a few steps.
    tokens = named_axes.wrap(jnp.tile(jnp.array([1, 5, 9, 3]), (2, 3)), "batch", "seq")
    inputs = tokens[{"seq": pz.slice[:-1]}]
    targets = tokens[{"seq": pz.slice[1:]}]

    def loss_fn(params):
        logits = pz.bind_variables(unbound, params)(inputs)
        log_probs = named_axes.nmap(jax.nn.log_softmax)(logits.untag("vocabulary"))
        picked = named_axes.nmap(lambda row, target: row[target])(log_probs, targets)
        return -picked.untag("batch", "seq").unwrap().mean()

    optimizer = optax.adam(3e-2)

    @jax.jit
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    losses = []
    for _ in range(8):
        params, opt_state, loss = train_step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    trained = pz.bind_variables(unbound, params)
    assert isinstance(trained, model_parts.TransformerLM)
