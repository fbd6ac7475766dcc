"""Tests for pz_flax.models.transformer.model_parts."""

import dataclasses

import jax.numpy as jnp
import pytest

from pz_flax import pz
from pz_flax.core import named_axes
from pz_flax.models.transformer import model_parts


@pz.pytree_dataclass
class RecordSideInputs(pz.nn.Layer):
    """Returns the tokens together with the side inputs it was called with."""

    def __call__(self, tokens, **side_inputs):
        return tokens, side_inputs


METADATA = model_parts.TransformerMetadata(
    common_head_axes={"heads": 2},
    query_only_head_axes={},
    embedding_dim=8,
    projection_dim=4,
    mlp_hidden_dim=16,
    vocab_size=10,
    activation_dtype=jnp.float32,
)


def test_default_token_positions_count_along_seq():
    model = model_parts.TransformerLM(body=RecordSideInputs(), metadata=METADATA)
    tokens = named_axes.zeros({"batch": 2, "seq": 4}, jnp.int32)
    _, side_inputs = model(tokens, extra=1)
    assert side_inputs["extra"] == 1
    positions = side_inputs["token_positions"]
    assert dict(positions.named_shape) == {"seq": 4}
    assert positions.unwrap("seq").tolist() == [0, 1, 2, 3]


def test_explicit_token_positions_are_forwarded():
    model = model_parts.TransformerLM(body=RecordSideInputs(), metadata=METADATA)
    positions = named_axes.arange("seq", 5, 8)
    _, side_inputs = model(named_axes.zeros({"seq": 3}, jnp.int32), token_positions=positions)
    assert side_inputs["token_positions"] is positions


@pytest.mark.parametrize(
    "tokens",
    [
        named_axes.zeros({"batch": 2}, jnp.int32),
        named_axes.zeros({"batch": 2, "seq": 3}, jnp.int32).untag("batch"),
    ],
)
def test_tokens_need_a_seq_axis_and_no_positional_axes(tokens):
    model = model_parts.TransformerLM(body=RecordSideInputs(), metadata=METADATA)
    with pytest.raises(ValueError, match=r"TransformerLM expects token ids with a 'seq' axis"):
        model(tokens)


def test_metadata_is_frozen_and_static():
    with pytest.raises(dataclasses.FrozenInstanceError):
        METADATA.vocab_size = 3  # type: ignore[misc]
    model = model_parts.TransformerLM(body=RecordSideInputs(), metadata=METADATA)
    # The metadata is static (part of the tree structure, not a leaf).
    assert model.tree_flatten()[1].static_fields["metadata"] is METADATA


def test_block_and_feedforward_are_sequentials():
    block = model_parts.TransformerBlock([pz.nn.Identity()])
    feedforward = model_parts.TransformerFeedForward([pz.nn.Identity()])
    assert isinstance(block, pz.nn.Sequential)
    assert isinstance(feedforward, pz.nn.Sequential)
    assert block(3) == 3
    accent, background = block.treescope_color()
    assert accent.startswith("oklch(") and "color-mix" in background
