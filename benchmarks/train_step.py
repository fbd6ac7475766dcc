"""One Adam training step on a dense ReLU MLP, done ten ways, timed side by side.

Every contender computes the same thing: ``depth`` dense layers of ``width`` units (a weight
matrix and a bias each, ReLU between layers), a mean-squared-error loss against a fixed target,
and an Adam update of every weight and bias. They differ only in how the model is held and how
the step is dispatched:

* ``raw jax.jit``: the floor. Parameters are a list of ``(weight, bias)`` arrays and the step is
  one ``jax.jit`` function of ``(params, opt_state, x, y)``. Every figure is reported as a ratio
  to this one.
* ``flax nnx.jit``: an ``nnx.Module`` of ``nnx.Linear`` layers trained with ``nnx.jit`` and
  ``nnx.Optimizer``, as in Flax's own tutorials.
* ``penzai StatefulTrainer``: penzai 0.2.5's model and trainer, as in penzai's tutorials.
* ``pz_flax StatefulTrainer``: the same penzai-style model built with pz_flax, trained with
  pz_flax's ``StatefulTrainer.step``.
* ``pz_flax + jax.jit (model pytree)``: the hand-written loop a user writes once they know that a
  pz_flax model is a JAX pytree: ``jax.jit`` of a step that takes the model itself, takes
  ``jax.grad`` with respect to it and applies Optax updates to it.
* ``pz_flax + jax.jit (frozen model pytree)``: the same loop over ``pz.freeze_params(model)``,
  penzai's own idiom for passing a model to ``jax.jit``: every parameter is a ``ParameterValue``
  struct, so the whole model is a tree of structs.
* ``penzai + jax.jit (frozen model pytree)``: penzai 0.2.5 running that loop on its own frozen
  model (penzai refuses a model with live parameters in ``jax.jit``).
* ``flax NNX model pytree + jax.jit``: Flax's ``nnx.Linear`` MLP handed to ``jax.jit`` as a
  pytree, as Flax's "Module & Pytree" guide does: the same loop, the same number of
  ``nnx.Param`` variables as the live pz_flax model, hence the floor of any live-variable model.
* ``pz_flax + jax.jit (param dict)``: the same loop with the parameters unbound once into a
  dict of raw arrays (label -> array), the model rebuilt inside the traced step.
* ``pz_flax + nnx.jit``: the pz_flax model as an attribute of an ``nnx.Module``, trained with
  ``nnx.jit`` and ``nnx.Optimizer`` exactly like the Flax contender.

At a small size the step is dominated by Python dispatch overhead, which is what separates the
contenders; at a large size the matrix multiplies dominate and everyone should converge to the
floor. The depth sweep shows how per-step cost grows with the number of parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks import harness

LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class MlpSize:
    """The shape of one benchmark problem.

    Attributes:
        label: Human-readable name for the table.
        depth: Number of dense layers.
        width: Units per layer (input and output widths too).
        batch: Examples per step.
    """

    label: str
    depth: int
    width: int
    batch: int


def make_batch(size: MlpSize) -> tuple[jax.Array, jax.Array]:
    x_key, y_key = jax.random.split(jax.random.key(1))
    x = jax.random.normal(x_key, (size.batch, size.width), jnp.float32)
    y = jax.random.normal(y_key, (size.batch, size.width), jnp.float32)
    return x, y


def _mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(prediction - target))


# ---------------------------------------------------------------------------------------------
# raw jax.jit: the floor.


def raw_jit_step(size: MlpSize) -> Callable[[], Any]:
    """A ``jax.jit`` Adam step over a list of ``(weight, bias)`` arrays."""
    keys = jax.random.split(jax.random.key(0), size.depth)
    scale = 1.0 / jnp.sqrt(size.width)
    params = [
        (scale * jax.random.normal(key, (size.width, size.width)), jnp.zeros((size.width,)))
        for key in keys
    ]
    optimizer = optax.adam(LEARNING_RATE)
    x, y = make_batch(size)

    def forward(params, inputs):
        for index, (weight, bias) in enumerate(params):
            inputs = inputs @ weight + bias
            if index < len(params) - 1:
                inputs = jax.nn.relu(inputs)
        return inputs

    @jax.jit
    def train_step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(lambda p: _mse(forward(p, inputs), targets))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    carry = {"params": params, "opt_state": optimizer.init(params)}

    def step():
        carry["params"], carry["opt_state"], loss = train_step(
            carry["params"], carry["opt_state"], x, y
        )
        return loss

    return step


# ---------------------------------------------------------------------------------------------
# Flax NNX.


class NnxMlp(nnx.Module):
    def __init__(self, size: MlpSize, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [nnx.Linear(size.width, size.width, rngs=rngs) for _ in range(size.depth)]
        )

    def __call__(self, inputs):
        for index, layer in enumerate(self.layers):
            inputs = layer(inputs)
            if index < len(self.layers) - 1:
                inputs = jax.nn.relu(inputs)
        return inputs


def nnx_optimizer_step(
    model: Any, forward, size: MlpSize, *, graph: bool = True
) -> Callable[[], Any]:
    """The tutorial ``nnx.jit`` + ``nnx.Optimizer`` step for ``model`` (called as ``forward``).

    Args:
        model: What the optimizer trains: an ``nnx.Module``, or in tree mode any pytree of NNX
            variables (a bare pz_flax model).
        forward: ``forward(model, inputs)`` gives the predictions.
        size: The problem size (for the batch).
        graph: NNX's graph mode (True, the default and the tutorials' mode) or tree mode
            (False: ``nnx.jit(graph=False)``, modules flattened as plain pytrees).
    """
    with nnx.set_graph_mode(graph):
        optimizer = nnx.Optimizer(model, optax.adam(LEARNING_RATE), wrt=nnx.Param)
    x, y = make_batch(size)

    @nnx.jit(graph=graph)
    def train_step(model, optimizer, inputs, targets):
        loss, grads = nnx.value_and_grad(lambda m: _mse(forward(m, inputs), targets), graph=graph)(
            model
        )
        # The optimizer reads NNX's global mode; inside the step it must match the jit's.
        with nnx.set_graph_mode(graph):
            optimizer.update(model, grads)
        return loss

    return lambda: train_step(model, optimizer, x, y)


def nnx_step(size: MlpSize) -> Callable[[], Any]:
    """Flax's tutorial step on an ``nnx.Module`` of ``nnx.Linear`` layers."""
    model = NnxMlp(size, nnx.Rngs(0))
    return nnx_optimizer_step(model, lambda m, inputs: m(inputs), size)


# ---------------------------------------------------------------------------------------------
# penzai 0.2.5 and pz_flax: the same layer code, against either library's `pz` namespace.


def penzai_style_mlp(pz_namespace, size: MlpSize):
    layers = []
    for index in range(size.depth):
        layers.append(
            pz_namespace.nn.Affine.from_config(
                name=f"layer{index}",
                init_base_rng=jax.random.key(index),
                input_axes={"features": size.width},
                output_axes={"features": size.width},
            )
        )
        if index < size.depth - 1:
            layers.append(pz_namespace.nn.Elementwise(jax.nn.relu))
    return pz_namespace.nn.Sequential(layers)


def named_forward(pz_namespace, model, inputs: jax.Array) -> jax.Array:
    named_inputs = pz_namespace.nx.wrap(inputs).tag("batch", "features")
    return model(named_inputs).unwrap("batch", "features")


def _trainer_loss(pz_namespace):
    def loss_fn(*, model, state, rng, inputs, targets):
        del rng
        loss = _mse(named_forward(pz_namespace, model, inputs), targets)
        return loss, state, loss

    return loss_fn


def penzai_trainer_step(size: MlpSize) -> Callable[[], Any]:
    """penzai 0.2.5's ``StatefulTrainer`` on penzai's own layers."""
    from penzai import pz as penzai_pz
    from penzai.toolshed import basic_training as penzai_training

    trainer = penzai_training.StatefulTrainer.build(
        root_rng=jax.random.key(2),
        model=penzai_style_mlp(penzai_pz, size),
        optimizer_def=optax.adam(LEARNING_RATE),
        loss_fn=_trainer_loss(penzai_pz),
    )
    x, y = make_batch(size)
    return lambda: trainer.step(inputs=x, targets=y)


def _pz_flax_namespace():
    from pz_flax import pz

    return pz


def pz_flax_trainer_step(size: MlpSize) -> Callable[[], Any]:
    """pz_flax's ``StatefulTrainer`` on the penzai-style model."""
    from pz_flax.toolshed import basic_training

    pz = _pz_flax_namespace()
    trainer = basic_training.StatefulTrainer.build(
        root_rng=jax.random.key(2),
        model=penzai_style_mlp(pz, size),
        optimizer_def=optax.adam(LEARNING_RATE),
        loss_fn=_trainer_loss(pz),
    )
    x, y = make_batch(size)
    return lambda: trainer.step(inputs=x, targets=y)


def model_pytree_step(model: Any, forward, size: MlpSize) -> Callable[[], Any]:
    """Hand-written ``jax.jit`` + Optax loop that takes ``model`` itself as the pytree.

    Args:
        model: Any pytree model whose float leaves are all trained.
        forward: ``forward(model, inputs)`` gives the predictions.
        size: The problem size (for the batch).
    """
    optimizer = optax.adam(LEARNING_RATE)
    x, y = make_batch(size)

    @jax.jit
    def train_step(model, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(lambda m: _mse(forward(m, inputs), targets))(model)
        updates, opt_state = optimizer.update(grads, opt_state, model)
        return optax.apply_updates(model, updates), opt_state, loss

    carry = {"model": model, "opt_state": optimizer.init(model)}

    def step():
        carry["model"], carry["opt_state"], loss = train_step(
            carry["model"], carry["opt_state"], x, y
        )
        return loss

    return step


def pz_flax_model_pytree_step(size: MlpSize) -> Callable[[], Any]:
    """The pytree loop over the pz_flax model with its live ``Parameter`` variables."""
    pz = _pz_flax_namespace()
    return model_pytree_step(penzai_style_mlp(pz, size), functools.partial(named_forward, pz), size)


def pz_flax_frozen_model_step(size: MlpSize) -> Callable[[], Any]:
    """The pytree loop over ``pz.freeze_params`` of the pz_flax model (penzai's idiom)."""
    pz = _pz_flax_namespace()
    return model_pytree_step(
        pz.freeze_params(penzai_style_mlp(pz, size)), functools.partial(named_forward, pz), size
    )


def penzai_frozen_model_step(size: MlpSize) -> Callable[[], Any]:
    """The pytree loop over penzai 0.2.5's own frozen model."""
    from penzai import pz as penzai_pz

    return model_pytree_step(
        penzai_pz.freeze_params(penzai_style_mlp(penzai_pz, size)),
        functools.partial(named_forward, penzai_pz),
        size,
    )


def nnx_model_pytree_step(size: MlpSize) -> Callable[[], Any]:
    """The pytree loop over Flax's ``nnx.Linear`` MLP, an NNX module being a JAX pytree."""
    return model_pytree_step(NnxMlp(size, nnx.Rngs(0)), lambda m, inputs: m(inputs), size)


def pz_flax_param_dict_step(size: MlpSize) -> Callable[[], Any]:
    """Hand-written ``jax.jit`` + Optax loop over a label -> raw array dict of parameters."""
    pz = _pz_flax_namespace()
    optimizer = optax.adam(LEARNING_RATE)
    x, y = make_batch(size)
    skeleton, params = pz.unbind_params(penzai_style_mlp(pz, size))
    templates = {str(param.label): param for param in params}

    @jax.jit
    def train_step(raw_params, opt_state, inputs, targets):
        def loss_fn(raw):
            model = pz.bind_variables(
                skeleton, [templates[key].replace(value) for key, value in raw.items()]
            )
            return _mse(named_forward(pz, model, inputs), targets)

        loss, grads = jax.value_and_grad(loss_fn)(raw_params)
        updates, opt_state = optimizer.update(grads, opt_state, raw_params)
        return optax.apply_updates(raw_params, updates), opt_state, loss

    raw_params = {key: param.get_raw_value() for key, param in templates.items()}
    carry = {"params": raw_params, "opt_state": optimizer.init(raw_params)}

    def step():
        carry["params"], carry["opt_state"], loss = train_step(
            carry["params"], carry["opt_state"], x, y
        )
        return loss

    return step


class PzFlaxHolder(nnx.Module):
    """A pz_flax layer as an attribute of an ``nnx.Module``, as NNX code holds one."""

    def __init__(self, layer):
        self.layer = layer


def pz_flax_nnx_step(size: MlpSize) -> Callable[[], Any]:
    """The pz_flax model inside an ``nnx.Module``, trained with ``nnx.jit`` + ``nnx.Optimizer``."""
    pz = _pz_flax_namespace()
    holder = PzFlaxHolder(penzai_style_mlp(pz, size))
    return nnx_optimizer_step(holder, lambda m, inputs: named_forward(pz, m.layer, inputs), size)


RAW_JIT = "raw jax.jit"
FLAX_MODEL_PYTREE = "flax NNX model pytree + jax.jit"
PZ_FLAX_FROZEN_MODEL_PYTREE = "pz_flax + jax.jit (frozen model pytree)"
CONTENDERS: dict[str, Callable[[MlpSize], Callable[[], Any]]] = {
    RAW_JIT: raw_jit_step,
    "flax nnx.jit + nnx.Optimizer": nnx_step,
    "penzai StatefulTrainer": penzai_trainer_step,
    "pz_flax StatefulTrainer": pz_flax_trainer_step,
    "pz_flax + jax.jit (model pytree)": pz_flax_model_pytree_step,
    FLAX_MODEL_PYTREE: nnx_model_pytree_step,
    PZ_FLAX_FROZEN_MODEL_PYTREE: pz_flax_frozen_model_step,
    "penzai + jax.jit (frozen model pytree)": penzai_frozen_model_step,
    "pz_flax + jax.jit (param dict)": pz_flax_param_dict_step,
    "pz_flax + nnx.jit + nnx.Optimizer": pz_flax_nnx_step,
}

# The depth sweep leaves out the contenders whose per-step Python cost is already known to be
# tens of times the floor: at 1000 layers they would take most of the time budget to say so.
DEPTH_SWEEP_CONTENDERS = (
    RAW_JIT,
    "pz_flax StatefulTrainer",
    "pz_flax + jax.jit (model pytree)",
    "pz_flax + jax.jit (param dict)",
    "flax nnx.jit + nnx.Optimizer",
)
DEEPEST_CONTENDERS = (RAW_JIT, "pz_flax StatefulTrainer", "pz_flax + jax.jit (param dict)")


def measure(
    size: MlpSize,
    contender_names: tuple[str, ...] | list[str],
    *,
    rounds: int,
    window_seconds: float,
) -> list[dict[str, Any]]:
    """Times the named contenders on one problem size; returns one row per contender."""
    contenders = [harness.Contender(name, CONTENDERS[name](size)) for name in contender_names]
    timings = harness.time_interleaved(contenders, rounds=rounds, window_seconds=window_seconds)
    return harness.rows_against_floor(timings, RAW_JIT, benchmark="train step", case=size.label)


def run(quick: bool) -> list[dict[str, Any]]:
    """Runs the train-step benchmarks.

    Args:
        quick: Tiny sizes and a couple of short windows: checks everything runs, measures
            nothing meaningful.

    Returns:
        One row per (problem size, contender).
    """
    if quick:
        small = MlpSize("quick 2x8, batch 4", depth=2, width=8, batch=4)
        return measure(small, list(CONTENDERS), rounds=2, window_seconds=0.002)

    rows = []
    dispatch_bound = MlpSize("dispatch-bound 8x64, batch 32", depth=8, width=64, batch=32)
    rows += measure(dispatch_bound, list(CONTENDERS), rounds=25, window_seconds=0.06)
    compute_bound = MlpSize("compute-bound 8x512, batch 256", depth=8, width=512, batch=256)
    rows += measure(compute_bound, list(CONTENDERS), rounds=15, window_seconds=0.15)
    for depth, contenders in (
        (100, DEPTH_SWEEP_CONTENDERS),
        (300, DEPTH_SWEEP_CONTENDERS),
        # Compiling a 1000-layer step takes about a minute per contender on two cores, so the
        # deepest point keeps only the floor and pz_flax's two fast paths.
        (1000, DEEPEST_CONTENDERS),
    ):
        deep = MlpSize(f"depth {depth}x16, batch 32", depth=depth, width=16, batch=32)
        rows += measure(deep, contenders, rounds=7, window_seconds=0.2)
    return rows
