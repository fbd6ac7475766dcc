"""pz_flax models and ``PzModule`` under NNX tree mode (``nnx.set_graph_mode(False)``).

In tree mode NNX transforms treat modules as plain JAX pytrees instead of walking an object
graph. A pz_flax model already is a pytree whose variables are NNX variables, so every NNX
transform must accept it unchanged and compute what graph mode and plain JAX compute. Each
test compares against a reference computed another way (graph mode, ``jax.grad``, a Python
loop, Optax over the pytree): bit-identical where both sides run the same operations in one
compiled program, within float32 rounding otherwise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pz_flax import pz
from pz_flax.core import tree_util
from pz_flax.core import variables
from pz_flax.interop.wrappers import PzModule
from pz_flax.models import simple_mlp
from pz_flax.models.transformer import simple_decoder
from tests.models.transformer import helpers as transformer_helpers

FEATURE_SIZES = (4, 6, 4)
LEARNING_RATE = 1e-2


@pytest.fixture
def tree_mode():
    """Runs the test with NNX's global mode set to tree mode, and restores it afterwards."""
    before = nnx.set_graph_mode.current_value()
    with nnx.set_graph_mode(False):
        assert nnx.set_graph_mode.current_value() is False
        yield
    assert nnx.set_graph_mode.current_value() == before


def make_mlp(seed: int = 0) -> simple_mlp.MLP:
    return simple_mlp.MLP.from_config(jax.random.key(seed), list(FEATURE_SIZES))


def make_inputs(seed: int = 1, batch: int = 3) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, FEATURE_SIZES[0]), jnp.float32)


def named_forward(layer, inputs: jax.Array) -> jax.Array:
    return layer(pz.nx.wrap(inputs).tag("batch", "features")).unwrap("batch", "features")


def mse_loss(layer, inputs: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(named_forward(layer, inputs) - 1.0))


def params_by_label(tree) -> dict:
    """Every parameter's raw value, by label, as NumPy arrays (copied, safe from later steps)."""
    return {
        str(param.label): np.array(param.get_raw_value()) for param in pz.unbind_params(tree)[1]
    }


def assert_same_params(actual: dict, expected: dict, *, exact: bool = True):
    assert actual.keys() == expected.keys()
    for label, value in expected.items():
        if exact:
            np.testing.assert_array_equal(actual[label], value, err_msg=label)
        else:
            np.testing.assert_allclose(actual[label], value, rtol=1e-6, atol=1e-6, err_msg=label)


class Holder(nnx.Module):
    """The idiom of NNX code that owns a pz_flax layer: an attribute of an ``nnx.Module``."""

    def __init__(self, layer):
        self.layer = layer


def test_fixture_switches_nnx_into_tree_mode(tree_mode):
    # Tree mode's observable contract: a Variable reachable twice is refused, where graph
    # mode would deduplicate it.
    shared = variables.Parameter(value=jnp.ones(2), label="shared")
    with pytest.raises(ValueError, match="Duplicate"):
        nnx.jit(lambda pair: pair[0][...] + pair[1][...])((shared, shared))
    assert np.asarray(
        nnx.jit(lambda pair: pair[0][...] + pair[1][...], graph=True)((shared, shared))
    ).tolist() == [2.0, 2.0]


def test_jit_forward_equals_plain_jax_and_graph_mode(tree_mode):
    model, inputs = make_mlp(), make_inputs()
    tree_out = nnx.jit(named_forward)(model, inputs)
    graph_out = nnx.jit(named_forward, graph=True)(model, inputs)
    jax_out = jax.jit(named_forward)(model, inputs)
    np.testing.assert_array_equal(tree_out, jax_out)
    np.testing.assert_array_equal(tree_out, graph_out)
    np.testing.assert_allclose(tree_out, named_forward(model, inputs), rtol=1e-6, atol=1e-6)


def test_jit_returns_a_model_with_the_same_structure_and_labels(tree_mode):
    model = make_mlp()
    doubled = nnx.jit(lambda m: jax.tree.map(lambda x: 2 * x, m))(model)
    assert jax.tree.structure(doubled) == jax.tree.structure(model)
    expected = {label: 2 * value for label, value in params_by_label(model).items()}
    assert_same_params(params_by_label(doubled), expected)


def test_grad_equals_jax_grad(tree_mode):
    model, inputs = make_mlp(), make_inputs()
    tree_grads = nnx.jit(nnx.grad(mse_loss))(model, inputs)
    jax_grads = jax.jit(jax.grad(mse_loss))(model, inputs)
    assert jax.tree.structure(tree_grads) == jax.tree.structure(model)
    assert_same_params(params_by_label(tree_grads), params_by_label(jax_grads))
    assert all(np.any(value != 0) for value in params_by_label(tree_grads).values())


def _train_with_nnx_optimizer(owner, forward_owner, steps: int, *, graph: bool):
    """``steps`` Adam steps of ``nnx.jit`` + ``nnx.Optimizer``; returns the losses."""
    with nnx.set_graph_mode(graph):
        optimizer = nnx.Optimizer(owner, optax.adam(LEARNING_RATE), wrt=nnx.Param)
    inputs = make_inputs()

    @nnx.jit(graph=graph)
    def train_step(owner, optimizer, inputs):
        loss, grads = nnx.value_and_grad(lambda o: mse_loss(forward_owner(o), inputs), graph=graph)(
            owner
        )
        optimizer.update(owner, grads)
        return loss

    with nnx.set_graph_mode(graph):
        return [float(train_step(owner, optimizer, inputs)) for _ in range(steps)]


def _train_with_optax_over_the_pytree(model, steps: int):
    """The same steps as a plain ``jax.jit`` + Optax loop over the model pytree."""
    optimizer = optax.adam(LEARNING_RATE)
    inputs = make_inputs()

    @jax.jit
    def train_step(model, opt_state):
        loss, grads = jax.value_and_grad(mse_loss)(model, inputs)
        updates, opt_state = optimizer.update(grads, opt_state, model)
        return optax.apply_updates(model, updates), opt_state, loss

    opt_state, losses = optimizer.init(model), []
    for _ in range(steps):
        model, opt_state, loss = train_step(model, opt_state)
        losses.append(float(loss))
    return model, losses


@pytest.mark.parametrize("owner_kind", ["bare pz_flax model", "nnx.Module attribute"])
def test_optimizer_steps_equal_graph_mode_and_optax(tree_mode, owner_kind):
    steps = 3
    if owner_kind == "bare pz_flax model":
        tree_owner, graph_owner = make_mlp(), Holder(make_mlp())
        tree_model, forward_tree = tree_owner, lambda owner: owner
    else:
        tree_owner, graph_owner = Holder(make_mlp()), Holder(make_mlp())
        tree_model, forward_tree = tree_owner.layer, lambda owner: owner.layer
    initial = params_by_label(tree_model)
    tree_losses = _train_with_nnx_optimizer(tree_owner, forward_tree, steps, graph=False)
    graph_losses = _train_with_nnx_optimizer(
        graph_owner, lambda owner: owner.layer, steps, graph=True
    )
    optax_model, optax_losses = _train_with_optax_over_the_pytree(make_mlp(), steps)

    trained = params_by_label(tree_model)
    # The optimizer updated the caller's own variables in place, as in graph mode.
    assert all(np.any(trained[label] != initial[label]) for label in initial)
    assert tree_losses[-1] < tree_losses[0]
    assert tree_losses == graph_losses == optax_losses
    assert_same_params(trained, params_by_label(graph_owner.layer))
    assert_same_params(trained, params_by_label(optax_model))


def test_state_variable_mutation_inside_jit_reaches_the_caller(tree_mode):
    @pz.pytree_dataclass
    class CountCalls(pz.nn.Layer):
        calls: pz.StateVariable

        def __call__(self, argument, /, **side_inputs):
            self.calls.value = self.calls.value + 1
            return argument

    layer = CountCalls(pz.StateVariable(value=jnp.zeros((), jnp.int32), label="calls"))
    counting = nnx.jit(lambda layer, x: layer(x))
    for _ in range(3):
        counting(layer, jnp.ones(2))
    assert int(layer.calls.value) == 3


def test_split_and_merge_round_trip(tree_mode):
    model = make_mlp()
    graphdef, state = nnx.split(model)
    rebuilt = nnx.merge(graphdef, state)
    assert type(rebuilt) is type(model)
    assert jax.tree.structure(rebuilt) == jax.tree.structure(model)
    assert_same_params(params_by_label(rebuilt), params_by_label(model))
    assert all(
        type(variable) is variables.Parameter
        for variable in jax.tree.leaves(state, is_leaf=tree_util.is_variable_node)
    )


def test_vmap_over_the_batch_equals_the_batched_call(tree_mode):
    model, inputs = make_mlp(), make_inputs(batch=5)
    per_example = nnx.vmap(
        lambda layer, row: layer(pz.nx.wrap(row).tag("features")).unwrap("features"),
        in_axes=(None, 0),
    )
    np.testing.assert_allclose(
        per_example(model, inputs), named_forward(model, inputs), rtol=1e-6, atol=1e-6
    )


def test_vmap_builds_an_ensemble_equal_to_separately_built_models(tree_mode):
    keys = jax.random.split(jax.random.key(3), 2)
    build = lambda key: simple_mlp.MLP.from_config(key, list(FEATURE_SIZES))  # noqa: E731
    ensemble = nnx.vmap(build)(keys)
    assert jax.tree.structure(ensemble) == jax.tree.structure(build(keys[0]))
    stacked = params_by_label(ensemble)
    for index, key in enumerate(keys):
        member = params_by_label(build(key))
        assert_same_params({label: value[index] for label, value in stacked.items()}, member)

    inputs = make_inputs()
    outputs = nnx.vmap(named_forward, in_axes=(0, None))(ensemble, inputs)
    for index in range(len(keys)):
        member = jax.tree.map(lambda leaf, i=index: leaf[i], ensemble)
        np.testing.assert_allclose(
            outputs[index], named_forward(member, inputs), rtol=1e-6, atol=1e-6
        )


def test_scan_carries_activations_through_a_broadcast_model(tree_mode):
    model, inputs = make_mlp(), make_inputs()
    repeat = nnx.scan(
        lambda layer, carry, _: (layer(carry), None),
        in_axes=(None, nnx.Carry, 0),
        out_axes=(nnx.Carry, 0),
    )
    named = pz.nx.wrap(inputs).tag("batch", "features")
    scanned, _ = repeat(model, named, jnp.arange(3))
    expected = named
    for _ in range(3):
        expected = model(expected)
    np.testing.assert_allclose(
        scanned.unwrap("batch", "features"),
        expected.unwrap("batch", "features"),
        rtol=1e-5,
        atol=1e-6,
    )


def test_scan_over_stacked_layers_equals_a_loop_and_differentiates(tree_mode):
    keys = jax.random.split(jax.random.key(4), 3)
    square = (FEATURE_SIZES[0], FEATURE_SIZES[0])
    stacked = nnx.vmap(lambda key: simple_mlp.MLP.from_config(key, list(square)))(keys)
    inputs = make_inputs()

    def through_stack(stack, x):
        run = nnx.scan(lambda carry, layer: (layer(carry), None), in_axes=(nnx.Carry, 0))
        out, _ = run(pz.nx.wrap(x).tag("batch", "features"), stack)
        return out.unwrap("batch", "features")

    def through_loop(stack, x):
        named = pz.nx.wrap(x).tag("batch", "features")
        for index in range(len(keys)):
            named = jax.tree.map(lambda leaf, i=index: leaf[i], stack)(named)
        return named.unwrap("batch", "features")

    np.testing.assert_allclose(
        through_stack(stacked, inputs), through_loop(stacked, inputs), rtol=1e-5, atol=1e-6
    )
    loss = lambda forward: lambda stack: jnp.sum(forward(stack, inputs) ** 2)  # noqa: E731
    scan_grads = params_by_label(nnx.grad(loss(through_stack))(stacked))
    loop_grads = params_by_label(jax.grad(loss(through_loop))(stacked))
    assert_same_params(scan_grads, loop_grads, exact=False)


def test_remat_keeps_values_and_gradients(tree_mode):
    model, inputs = make_mlp(), make_inputs()
    rematted = nnx.remat(named_forward)
    np.testing.assert_array_equal(
        nnx.jit(rematted)(model, inputs), nnx.jit(named_forward)(model, inputs)
    )
    remat_grads = nnx.jit(nnx.grad(lambda m: jnp.sum(rematted(m, inputs) ** 2)))(model)
    plain_grads = nnx.jit(nnx.grad(lambda m: jnp.sum(named_forward(m, inputs) ** 2)))(model)
    assert_same_params(params_by_label(remat_grads), params_by_label(plain_grads), exact=False)


def test_pz_module_jit_grad_and_optimizer_equal_graph_mode(tree_mode):
    inputs = make_inputs()
    tree_module, graph_module = PzModule(make_mlp()), PzModule(make_mlp())
    np.testing.assert_array_equal(
        nnx.jit(lambda m, x: m(x))(tree_module, inputs),
        nnx.jit(lambda m, x: m(x), graph=True)(graph_module, inputs),
    )

    def train(module, graph):
        with nnx.set_graph_mode(graph):
            optimizer = nnx.Optimizer(module, optax.adam(LEARNING_RATE), wrt=nnx.Param)

        @nnx.jit(graph=graph)
        def train_step(module, optimizer):
            loss, grads = nnx.value_and_grad(
                lambda m: jnp.mean(jnp.square(m(inputs) - 1.0)), graph=graph
            )(module)
            optimizer.update(module, grads)
            return loss

        with nnx.set_graph_mode(graph):
            return [float(train_step(module, optimizer)) for _ in range(3)]

    assert train(tree_module, graph=False) == train(graph_module, graph=True)
    # PzModule's variables are the layer's own: training the module trained the layer.
    assert_same_params(params_by_label(tree_module.layer), params_by_label(graph_module.layer))
    untrained = params_by_label(make_mlp())
    trained = params_by_label(tree_module.layer)
    assert all(np.any(trained[label] != untrained[label]) for label in untrained)


def test_shared_parameters_are_refused_by_name_and_train_once_unbound(tree_mode):
    """Tree mode cannot see two references to one variable (tied embeddings) as one.

    NNX refuses such a model and names both paths; unbinding the parameters first (each
    variable then appears exactly once) and binding them inside the transform is the
    tree-mode way, and computes what graph mode computes on the tied model.
    """
    model = simple_decoder.build_simple_decoder(transformer_helpers.TINY_CONFIG, jax.random.key(0))
    tokens = transformer_helpers.random_tokens()
    with pytest.raises(ValueError, match=r"embedder\.embeddings[\s\S]*found at paths"):
        nnx.jit(lambda m, t: m(t))(model, tokens)

    skeleton, params = pz.unbind_params(model)
    graph_logits = nnx.jit(lambda m, t: m(t), graph=True)(model, tokens)
    tree_logits = nnx.jit(lambda s, p, t: pz.bind_variables(s, p)(t))(skeleton, params, tokens)
    np.testing.assert_array_equal(
        tree_logits.unwrap("batch", "seq", "vocabulary"),
        graph_logits.unwrap("batch", "seq", "vocabulary"),
    )

    def token_loss(model):
        logits = model(tokens).unwrap("batch", "seq", "vocabulary")
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    tree_optimizer = nnx.Optimizer(params, optax.adam(LEARNING_RATE), wrt=nnx.Param)

    @nnx.jit
    def tree_step(skeleton, params, optimizer):
        grads = nnx.grad(lambda p: token_loss(pz.bind_variables(skeleton, p)))(params)
        optimizer.update(params, grads)

    graph_holder = Holder(
        simple_decoder.build_simple_decoder(transformer_helpers.TINY_CONFIG, jax.random.key(0))
    )
    with nnx.set_graph_mode(True):
        graph_optimizer = nnx.Optimizer(graph_holder, optax.adam(LEARNING_RATE), wrt=nnx.Param)

    @nnx.jit(graph=True)
    def graph_step(holder, optimizer):
        grads = nnx.grad(lambda h: token_loss(h.layer), graph=True)(holder)
        optimizer.update(holder, grads)

    before = params_by_label(model)
    for _ in range(2):
        tree_step(skeleton, params, tree_optimizer)
        with nnx.set_graph_mode(True):
            graph_step(graph_holder, graph_optimizer)
    trained = params_by_label(model)
    assert (
        trained["transformer/embedder.embeddings"].tolist()
        != before["transformer/embedder.embeddings"].tolist()
    )
    # Graph mode sums the tied table's gradient over both of its uses; so does the unbound
    # tree-mode step, which sees the table once.
    assert_same_params(trained, params_by_label(graph_holder.layer), exact=False)
