"""Tests for pz_flax.models.transformer._assembly, the pieces every decoder shares."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from pz_flax import pz
from pz_flax.models.transformer import _assembly
from pz_flax.models.transformer import simple_decoder
from pz_flax.models.transformer.variants import gpt_neox
from pz_flax.models.transformer.variants import llamalike_common
from tests.models.transformer import helpers
from tests.models.transformer.variants import test_gpt_neox
from tests.models.transformer.variants import test_llamalike_common


@pytest.mark.parametrize(
    ("num_kv_heads", "multiplier", "shared", "query_only"),
    [
        (4, 1, {"heads": 4}, {}),
        (1, 4, {}, {"query_heads": 4}),
        (2, 3, {"head_groups": 2}, {"query_heads": 3}),
    ],
    ids=["multi_head", "multi_query", "grouped_query"],
)
def test_head_layout_names_heads_by_what_shares_them(num_kv_heads, multiplier, shared, query_only):
    layout = _assembly.HeadLayout.for_heads(num_kv_heads, multiplier)
    assert (layout.shared_axes, layout.query_axes) == (shared, query_only)
    letters = [*layout.shared_letters.values(), *layout.query_letters.values()]
    assert layout.shared_letters.keys() == shared.keys()
    assert layout.query_letters.keys() == query_only.keys()
    assert len(set(letters)) == len(letters)


def test_named_option_names_the_setting_and_the_choices():
    assert _assembly.named_option({"a": 1, "b": 2}, "b", "variant") == 2
    with pytest.raises(ValueError, match=r"Unsupported variant 'c'; expected one of \['a', 'b'\]"):
        _assembly.named_option({"a": 1, "b": 2}, "c", "variant")


def test_written_out_blocks_get_their_index_only_when_asked():
    calls = []

    def builder(name, init_base_rng, config, **extra):
        calls.append((name, extra))
        return pz.nn.Identity()

    for pass_index in (False, True):
        calls.clear()
        blocks = _assembly.decoder_blocks(
            builder,
            name="m",
            init_base_rng=None,
            config=None,
            num_blocks=2,
            use_layer_stack=False,
            pass_block_index=pass_index,
        )
        assert len(blocks) == 2
        expected_extra = [{"block_index": i} if pass_index else {} for i in range(2)]
        assert calls == [(f"m/block_{i}", extra) for i, extra in enumerate(expected_extra)]


@pytest.mark.parametrize("activation_dtype", [jnp.float32, jnp.bfloat16])
def test_every_model_casts_embeddings_only_to_a_different_activation_dtype(activation_dtype):
    models = [
        simple_decoder.build_simple_decoder(
            helpers.tiny_config(use_layer_stack=False, activation_dtype=activation_dtype),
            jax.random.key(0),
        ),
        gpt_neox.build_gpt_neox_transformer(
            test_gpt_neox.make_config(activation_dtype=activation_dtype), jax.random.key(0)
        ),
        llamalike_common.build_llamalike_transformer(
            dataclasses.replace(
                test_llamalike_common.make_config("multi_head_swiglu_untied"),
                activation_dtype=activation_dtype,
            ),
            jax.random.key(0),
        ),
    ]
    tokens = pz.nx.wrap(jnp.arange(5)).tag("seq")
    for model in models:
        casts = pz.select(model).at_instances_of(pz.nn.CastToDType).count()
        assert casts == (0 if activation_dtype == jnp.float32 else 1), type(model)
        assert model.metadata.activation_dtype == activation_dtype
        logits = model(tokens, token_positions=pz.nx.arange("seq", 5))
        assert dict(logits.named_shape) == {"seq": 5, "vocabulary": model.metadata.vocab_size}
