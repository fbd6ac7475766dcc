import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pz_flax import pz
from pz_flax.models import simple_mlp
from pz_flax.toolshed import gradient_checkpointing
from tests.toolshed.stateful_layers import CountCalls
from tests.toolshed.twin_models import twin_inputs
from tests.toolshed.twin_models import twin_mlps


def test_checkpointed_matches_plain_call_and_updates_state():
    mlp = simple_mlp.DropoutMLP.from_config(
        name="mlp", init_base_rng=jax.random.key(42), feature_sizes=[8, 16, 8], drop_rate=0.2
    )
    counter = CountCalls(pz.StateVariable(0, label="counter"))
    model = pz.nn.Sequential([mlp, counter])
    x = pz.nx.arange("features", 8).astype(jnp.float32)
    stream = pz.RandomStream.from_base_key(jax.random.key(123))
    plain = model(x, random_stream=stream)
    assert stream.offset.value == 1

    stream = pz.RandomStream.from_base_key(jax.random.key(123))
    checkpointed = gradient_checkpointing.Checkpointed(model)(x, random_stream=stream)
    np.testing.assert_array_equal(plain.unwrap("features"), checkpointed.unwrap("features"))
    assert stream.offset.value == 1
    assert counter.calls.value == 2


def _loss_and_grad(model, x):
    unbound, params = pz.unbind_params(model)

    def loss(values):
        out, _ = unbound.stateless_call(values, x)
        return jnp.sum(out.unwrap("batch", "features") ** 2)

    return jax.value_and_grad(loss)(tuple(p.freeze() for p in params)), loss, params


def test_gradients_equal_and_the_backward_pass_rematerializes():
    model, _ = twin_mlps()
    x, _ = twin_inputs()
    (plain_loss, plain_grads), _, _ = _loss_and_grad(model, x)
    wrapped = gradient_checkpointing.Checkpointed(model)
    (ckpt_loss, ckpt_grads), loss, params = _loss_and_grad(wrapped, x)
    np.testing.assert_allclose(plain_loss, ckpt_loss, rtol=1e-6)
    for ours, reference in zip(ckpt_grads, plain_grads, strict=True):
        np.testing.assert_allclose(
            ours.value.unwrap(*reference.value.named_shape),
            reference.value.unwrap(*reference.value.named_shape),
            rtol=1e-6,
        )
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(tuple(p.freeze() for p in params)))
    assert "checkpoint" in jaxpr or "remat" in jaxpr


def test_policy_is_passed_to_jax_checkpoint(monkeypatch):
    seen = {}
    real_checkpoint = jax.checkpoint

    def recording_checkpoint(fun, **kwargs):
        seen.update(kwargs)
        return real_checkpoint(fun, **kwargs)

    monkeypatch.setattr(jax, "checkpoint", recording_checkpoint)
    model, _ = twin_mlps()
    x, _ = twin_inputs()
    policy = jax.checkpoint_policies.dots_saveable
    gradient_checkpointing.Checkpointed(model, policy=policy)(x)
    assert seen == {"policy": policy}


def test_errors_from_the_body_propagate():
    model, _ = twin_mlps()
    with pytest.raises(Exception, match="features"):
        gradient_checkpointing.Checkpointed(model)(pz.nx.ones({"batch": 2, "other": 4}))
