"""The public API as user code types it: run by pytest, and type-checked by mypy.

``.ci/stages/10-typecheck.sh`` runs mypy over this file and ``pz_flax`` (see pyproject's
``[tool.mypy]``). Each ``assert_type`` states what a user's type checker must infer from
pz_flax's public signatures, through ``py.typed``; at run time it is a no-op, so pytest checks
that the same code actually runs.
"""

import pathlib
from typing import Any
from typing import assert_type

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import pz_flax
from pz_flax import checkpoint
from pz_flax import pz
from pz_flax.models.transformer import simple_decoder
from pz_flax.toolshed import basic_training
from pz_flax.toolshed import lora


def make_mlp() -> pz.nn.Sequential:
    return pz.nn.Sequential(
        [
            pz.nn.Affine.from_config("hidden", jax.random.key(0), {"features": 3}, {"neurons": 4}),
            pz.nn.Elementwise(jax.nn.relu),
            pz.nn.Affine.from_config("out", jax.random.key(1), {"neurons": 4}, {"features": 2}),
        ]
    )


def test_named_arrays_and_layers() -> None:
    x = pz.nx.wrap(jnp.ones((2, 3))).tag("batch", "features")
    assert_type(x, pz.nx.NamedArray)
    linear = pz.nn.Linear.from_config("proj", jax.random.key(0), {"features": 3}, {"neurons": 4})
    # As in penzai: an output axis named like an input axis gives a LinearInPlace.
    assert_type(linear, pz.nn.Linear | pz.nn.LinearInPlace)
    assert isinstance(linear, pz.nn.Linear)
    y = linear(x)
    assert_type(y, pz.nx.NamedArray)
    assert_type(y.unwrap("batch", "neurons"), jax.Array)
    assert y.named_shape == {"batch": 2, "neurons": 4}


def test_selectors_and_variables() -> None:
    mlp = make_mlp()
    selection = pz.select(mlp).at_instances_of(pz.nn.Elementwise)
    assert_type(selection, pz.Selection[pz.nn.Elementwise])
    gelu = selection.apply(lambda _: pz.nn.Elementwise(jax.nn.gelu))
    labels = [p.label for p in pz.select(gelu).at_instances_of(pz.Parameter).get_sequence()]
    assert len(labels) == 4 and str(labels[0]).startswith("hidden")
    skeleton, params = pz.unbind_params(mlp)
    assert_type(params, tuple[pz.Parameter, ...])
    assert isinstance(pz.bind_variables(skeleton, params), pz.nn.Sequential)


def test_interop_and_training() -> None:
    module = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    layer = pz_flax.from_nnx(module)
    back = pz_flax.to_nnx(layer)
    assert isinstance(back, nnx.Linear)
    inputs = np.ones((4, 3), np.float32)
    x = pz.nx.wrap(inputs).tag("batch", "features")

    def loss_fn(*, model: Any, state: Any, rng: Any, x: pz.nx.NamedArray) -> Any:
        loss = model(x).unwrap("batch", "features").sum()
        return loss, state, {"loss": loss}

    trainer = basic_training.StatefulTrainer.build(
        jax.random.key(0), layer, optax.sgd(1e-3), loss_fn
    )
    assert_type(trainer, basic_training.StatefulTrainer)
    assert "loss" in trainer.step(x=x)


def test_models_lora_and_checkpoints(tmp_path: pathlib.Path) -> None:
    config = simple_decoder.SimpleDecoderConfig(
        vocab_size=8, embedding_dim=4, num_heads=1, projection_dim=4, mlp_hidden_dim=8, num_blocks=1
    )
    lm = simple_decoder.build_simple_decoder(config, jax.random.key(0))
    assert_type(lm, pz_flax.models.transformer.model_parts.TransformerLM)
    adapted = lora.loraify_linears_in_selection(
        pz.select(make_mlp()).at_instances_of(pz.nn.Linear), 2, jax.random.key(1)
    )
    saved = checkpoint.save(tmp_path / "ckpt", adapted)
    assert saved.exists()
    restored = checkpoint.restore(tmp_path / "ckpt")
    assert isinstance(restored, pz.nn.Sequential)
