import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pz_flax import pz
from pz_flax.models import simple_mlp
from pz_flax.toolshed import jit_wrapper
from tests.toolshed.stateful_layers import CountCalls


def _dropout_model():
    mlp = simple_mlp.DropoutMLP.from_config(
        name="mlp", init_base_rng=jax.random.key(42), feature_sizes=[8, 16, 8], drop_rate=0.2
    )
    counter = CountCalls(pz.StateVariable(0, label="counter"))
    return pz.nn.Sequential([mlp, counter]), counter


def test_jitted_matches_eager_and_updates_state():
    model, counter = _dropout_model()
    x = pz.nx.arange("features", 8).astype(jnp.float32)
    stream = pz.RandomStream.from_base_key(jax.random.key(123))
    eager = model(x, random_stream=stream)
    assert stream.offset.value == 1

    jitted = jit_wrapper.Jitted(model)
    stream = pz.RandomStream.from_base_key(jax.random.key(123))
    compiled = jitted(x, random_stream=stream)
    np.testing.assert_array_equal(eager.unwrap("features"), compiled.unwrap("features"))
    assert stream.offset.value == 1
    assert counter.calls.value == 2


@pz.pytree_dataclass
class _TraceCounting(pz.nn.Layer):
    """Scales its input; counts Python-level executions (= traces under jit) in ``log``."""

    scale: float = dataclasses.field(metadata={"pytree_node": False})
    log: list = dataclasses.field(default_factory=list, metadata={"pytree_node": False})

    def __call__(self, value, **_unused):
        self.log.append(self.scale)
        return value * self.scale


def test_body_is_compiled_once_and_recompiled_after_an_edit():
    layer = _TraceCounting(scale=2.0)
    jitted = jit_wrapper.Jitted(layer)
    x = pz.nx.wrap(jnp.ones(3)).tag("a")
    for _ in range(3):
        np.testing.assert_array_equal(jitted(x).unwrap("a"), [2.0, 2.0, 2.0])
    assert layer.log == [2.0]  # traced once, then served from the compile cache

    edited = (
        pz.select(jitted).at(lambda j: j.body).apply(lambda b: dataclasses.replace(b, scale=5.0))
    )
    np.testing.assert_array_equal(edited(x).unwrap("a"), [5.0, 5.0, 5.0])
    assert layer.log == [2.0, 5.0]


def test_jitted_output_is_a_concrete_array_not_a_tracer():
    out = jit_wrapper.Jitted(_TraceCounting(scale=3.0))(pz.nx.wrap(jnp.arange(2.0)).tag("a"))
    assert isinstance(out.data_array, jax.Array) and not isinstance(out.data_array, jax.core.Tracer)
