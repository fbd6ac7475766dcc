"""Tests for pz_flax.toolshed.basic_training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import errors as flax_errors

from pz_flax.core import named_axes as nx
from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.nn import grouping
from pz_flax.nn import layer
from pz_flax.nn import linear_and_affine
from pz_flax.toolshed import basic_training
from tests.toolshed import helpers


@struct.pytree_dataclass
class CountCalls(layer.Layer):
    """Passes its input through and counts how often it ran (a state variable)."""

    count: variables.StateVariable

    def __call__(self, x, **_unused_side_inputs):
        self.count.value = self.count.value + 1
        return x


def make_model():
    # Both layers keep the axis name "features", so the first one is an in-place Linear.
    return helpers.make_mlp(hidden_axis="features")


def raw_weights(model):
    return {p.label: np.asarray(p.get_raw_value()) for p in variables.unbind_params(model)[1]}


def test_loss_goes_down_and_model_is_updated_in_place():
    model = make_model()
    before = raw_weights(model)
    trainer = basic_training.StatefulTrainer.build(
        jax.random.key(0), model, optax.adam(0.05), helpers.mse_loss
    )
    x, y = helpers.make_regression_batch()
    losses = [float(trainer.step(x=x, y=y)["loss"]) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    after = raw_weights(model)
    assert all(not np.array_equal(before[k], after[k]) for k in before)
    assert trainer.model is model
    assert int(trainer.state.value.step) == 30


def test_step_matches_hand_written_optax_loop():
    x, y = helpers.make_regression_batch()
    model = make_model()
    trainer = basic_training.StatefulTrainer.build(
        jax.random.key(0), model, optax.sgd(0.1), helpers.mse_loss
    )
    reference = make_model()
    skeleton, params = variables.unbind_params(reference, freeze=True)
    tx = optax.sgd(0.1)
    opt_state = tx.init(params)

    @jax.jit
    def reference_step(params, opt_state):
        def loss(params):
            return helpers.mse_loss(
                model=variables.bind_variables(skeleton, params), state=None, rng=None, x=x, y=y
            )[0]

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(3):
        trainer.step(x=x, y=y)
        params, opt_state = reference_step(params, opt_state)
    ours = raw_weights(model)
    for param in params:
        np.testing.assert_allclose(ours[param.label], param.value.data_array, rtol=1e-6, atol=1e-7)


def test_every_variable_group_gets_its_own_values_whatever_the_label_order():
    # The step hands each group's raw values to the compiled function as a tuple and reads
    # them back by position: labels that sort differently from the model's order, a frozen
    # parameter between two trainable ones and a state variable must all land where they came from.
    x, y = helpers.make_regression_batch()

    def build(counting: bool):
        counter = variables.StateVariable(jnp.zeros((), jnp.int32), label="b_calls")
        key = jax.random.key(3)
        return grouping.Sequential(
            [
                linear_and_affine.Linear.from_config(
                    "z_in", jax.random.fold_in(key, 0), {"features": 4}, {"hidden": 8}
                ),
                CountCalls(counter) if counting else grouping.Sequential([]),
                linear_and_affine.Linear.from_config(
                    "m_mid", jax.random.fold_in(key, 1), {"hidden": 8}, {"hidden2": 8}
                ),
                linear_and_affine.Linear.from_config(
                    "a_out", jax.random.fold_in(key, 2), {"hidden2": 8}, {"features": 2}
                ),
            ]
        )

    frozen_label = "m_mid.weights"
    model = build(counting=True)
    helpers.params_by_label(model)[frozen_label].metadata = {"trainable": False}
    trainer = basic_training.StatefulTrainer.build(
        jax.random.key(0), model, optax.sgd(0.1), helpers.mse_loss
    )
    # The same math without the counter (an identity), whose state the reference need not carry.
    reference = build(counting=False)
    skeleton, params = variables.unbind_params(reference, freeze=True)
    trainable = {p.label: p for p in params if p.label != frozen_label}
    fixed = [p for p in params if p.label == frozen_label]

    def loss(trainable_values):
        bound = variables.bind_variables(skeleton, (*trainable_values.values(), *fixed))
        return helpers.mse_loss(model=bound, state=None, rng=None, x=x, y=y)[0]

    @jax.jit
    def reference_step(trainable_values):
        grads = jax.grad(loss)(trainable_values)
        return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, trainable_values, grads)

    for _ in range(3):
        trainer.step(x=x, y=y)
        trainable = reference_step(trainable)
    ours = raw_weights(model)
    assert list(ours) == ["z_in.weights", "m_mid.weights", "a_out.weights"]
    for label, param in trainable.items():
        np.testing.assert_allclose(ours[label], param.value.data_array, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(ours[frozen_label], fixed[0].value.data_array)
    assert int(model.sublayers[1].count.value) == 3


def test_non_trainable_parameters_are_left_alone():
    model = make_model()
    frozen = variables.unbind_params(model)[1][0]
    frozen.metadata = {"trainable": False}
    before = raw_weights(model)
    trainer = basic_training.StatefulTrainer.build(
        jax.random.key(0), model, optax.adam(0.05), helpers.mse_loss
    )
    x, y = helpers.make_regression_batch()
    for _ in range(3):
        trainer.step(x=x, y=y)
    after = raw_weights(model)
    np.testing.assert_array_equal(after[frozen.label], before[frozen.label])
    assert not all(np.array_equal(after[k], before[k]) for k in before)


def test_state_variables_and_loss_state_are_carried():
    counter = variables.StateVariable(jnp.zeros((), jnp.int32), label="calls")
    model = grouping.Sequential([CountCalls(counter), make_model()])

    def loss_with_state(*, model, state, rng, x, y):
        loss, _, aux = helpers.mse_loss(model=model, state=None, rng=rng, x=x, y=y)
        return loss, state + 1, {**aux, "rng": jax.random.key_data(rng)}

    trainer = basic_training.StatefulTrainer.build(
        jax.random.key(0), model, optax.adam(0.01), loss_with_state, initial_loss_fn_state=10
    )
    x, y = helpers.make_regression_batch()
    rngs = [np.asarray(trainer.step(x=x, y=y)["rng"]) for _ in range(3)]
    assert int(counter.value) == 3
    assert int(trainer.state.value.loss_fn_state) == 13
    assert not np.array_equal(rngs[0], rngs[1])


def test_donated_states_give_same_result_and_release_old_buffers():
    x, y = helpers.make_regression_batch()
    plain_model, donated_model = make_model(), make_model()
    plain = basic_training.StatefulTrainer.build(
        jax.random.key(0), plain_model, optax.adam(0.05), helpers.mse_loss
    )
    donated = basic_training.StatefulTrainer.build(
        jax.random.key(0), donated_model, optax.adam(0.05), helpers.mse_loss, donate_states=True
    )
    first_param = variables.unbind_params(donated_model)[1][0]
    old_buffer = first_param.get_raw_value()
    for _ in range(3):
        plain.step(x=x, y=y)
        donated.step(x=x, y=y)
    assert old_buffer.is_deleted()
    ours, theirs = raw_weights(donated_model), raw_weights(plain_model)
    for label in ours:
        np.testing.assert_array_equal(ours[label], theirs[label])


def test_unjitted_trainer_matches_jitted():
    x, y = helpers.make_regression_batch()
    jitted_model, eager_model = make_model(), make_model()
    jitted = basic_training.StatefulTrainer.build(
        jax.random.key(0), jitted_model, optax.adam(0.05), helpers.mse_loss
    )
    eager = basic_training.StatefulTrainer.build(
        jax.random.key(0), eager_model, optax.adam(0.05), helpers.mse_loss, jit=False
    )
    for _ in range(2):
        np.testing.assert_allclose(
            jitted.step(x=x, y=y)["loss"], eager.step(x=x, y=y)["loss"], rtol=1e-5
        )


def test_optimizer_sees_parameters_by_label():
    model = make_model()
    x, y = helpers.make_regression_batch()
    only_output = optax.multi_transform(
        {"train": optax.sgd(0.1), "freeze": optax.set_to_zero()},
        lambda params: {label: "train" if label == "out.weights" else "freeze" for label in params},
    )
    before = raw_weights(model)
    trainer = basic_training.StatefulTrainer.build(
        jax.random.key(0), model, only_output, helpers.mse_loss
    )
    trainer.step(x=x, y=y)
    after = raw_weights(model)
    assert set(before) == {"hidden.weights", "out.weights"}
    np.testing.assert_array_equal(after["hidden.weights"], before["hidden.weights"])
    assert not np.array_equal(after["out.weights"], before["out.weights"])


def test_labels_that_print_alike_are_refused():
    model = grouping.Sequential(
        [
            linear_and_affine.AddBias(
                variables.Parameter(value=nx.zeros({"features": 2}), label=1), new_axis_names=()
            ),
            linear_and_affine.AddBias(
                variables.Parameter(value=nx.zeros({"features": 2}), label="1"), new_axis_names=()
            ),
        ]
    )
    with pytest.raises(variables.VariableConflictError, match="print as '1'"):
        basic_training.StatefulTrainer.build(
            jax.random.key(0), model, optax.sgd(0.1), helpers.mse_loss
        )


# ------------------------------------------------ steps inside an outer transformation


def _all_concrete(model) -> bool:
    leaves = jax.tree_util.tree_leaves(model)
    return all(not isinstance(leaf, jax.core.Tracer) for leaf in leaves)


@pytest.mark.parametrize(
    "transform",
    [
        lambda step: jax.jit(step)(),
        lambda step: jax.vmap(lambda _: step())(jnp.arange(2)),
        lambda step: jax.grad(lambda x: step() * x)(1.0),
    ],
    ids=["jit", "vmap", "grad"],
)
def test_step_inside_an_outer_transformation_raises_at_that_step(transform):
    model = make_model()
    trainer = basic_training.StatefulTrainer.build(
        jax.random.key(0), model, optax.adam(0.05), helpers.mse_loss
    )
    x, y = helpers.make_regression_batch()
    trainer.step(x=x, y=y)
    before = raw_weights(model)
    with pytest.raises(flax_errors.TraceContextError, match=r"StatefulTrainer\.step"):
        transform(lambda: trainer.step(x=x, y=y)["loss"])
    # Nothing was written: no tracer leaked into the model or the trainer state.
    assert _all_concrete(model) and _all_concrete(trainer.state.value)
    after = raw_weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert int(trainer.state.value.step) == 1
    trainer.step(x=x, y=y)
    assert int(trainer.state.value.step) == 2


def test_building_inside_a_transformation_with_an_outer_model_is_refused():
    model = make_model()
    before = raw_weights(model)

    @jax.jit
    def build_and_step(x, y):
        trainer = basic_training.StatefulTrainer.build(
            jax.random.key(0), model, optax.adam(0.05), helpers.mse_loss
        )
        return trainer.step(x=x, y=y)["loss"]

    with pytest.raises(flax_errors.TraceContextError, match=r"StatefulTrainer\.build"):
        build_and_step(*helpers.make_regression_batch())
    assert _all_concrete(model)
    after = raw_weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_a_trainer_built_inside_a_transformation_steps_there():
    # Model, trainer and steps all live in one trace: nothing escapes it, so this is allowed.
    x, y = helpers.make_regression_batch()

    @jax.jit
    def train_twice(x, y):
        model = make_model()
        trainer = basic_training.StatefulTrainer.build(
            jax.random.key(0), model, optax.sgd(0.1), helpers.mse_loss
        )
        first = trainer.step(x=x, y=y)["loss"]
        second = trainer.step(x=x, y=y)["loss"]
        return first, second

    first, second = train_twice(x, y)
    assert float(second) < float(first)


def test_steps_without_the_unchecked_fast_route_train_identically(monkeypatch):
    x, y = helpers.make_regression_batch()
    fast_model = make_model()
    fast = basic_training.StatefulTrainer.build(
        jax.random.key(0), fast_model, optax.adam(0.05), helpers.mse_loss
    )
    fast_losses = [float(fast.step(x=x, y=y)["loss"]) for _ in range(3)]

    from pz_flax._compat import nnx as nnx_compat

    monkeypatch.setattr(nnx_compat, "raw_value_slot_is_usable", lambda: False)
    checked_model = make_model()
    checked = basic_training.StatefulTrainer.build(
        jax.random.key(0), checked_model, optax.adam(0.05), helpers.mse_loss
    )
    checked_losses = [float(checked.step(x=x, y=y)["loss"]) for _ in range(3)]
    np.testing.assert_allclose(checked_losses, fast_losses, rtol=1e-6)
    fast_weights, checked_weights = raw_weights(fast_model), raw_weights(checked_model)
    for key, value in fast_weights.items():
        np.testing.assert_allclose(checked_weights[key], value, rtol=1e-6, atol=1e-7)
