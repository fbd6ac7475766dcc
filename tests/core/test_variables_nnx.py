"""Tests that pz_flax variables are genuine Flax NNX variables (state, split, Optimizer, Orbax)."""

import copy as copy_lib
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import errors as flax_errors
from flax import nnx

from pz_flax.core import named_axes
from pz_flax.core import struct
from pz_flax.core import variables


@struct.pytree_dataclass
class TinyModel(struct.Struct):
    """Weights with named axes, a bias, and a step counter that is state, not a parameter."""

    weight: variables.Parameter
    bias: variables.Parameter
    steps: variables.StateVariable

    def __call__(self, x):
        # x is named ("inp",), the weight ("inp", "out"): contract over "inp".
        hidden = named_axes.nmap(jnp.sum)((x * self.weight.value).untag("inp"))
        return hidden + self.bias.value


def make_model(seed=0):
    weight = jax.random.normal(jax.random.key(seed), (3, 2))
    return TinyModel(
        weight=variables.Parameter(
            label="weight",
            value=named_axes.wrap(weight).tag("inp", "out"),
            metadata={"trainable": True},
        ),
        bias=variables.Parameter(label="bias", value=named_axes.wrap(jnp.zeros(2)).tag("out")),
        # A float counter, so that jax.grad may differentiate the whole model.
        steps=variables.StateVariable(jnp.zeros(()), label="steps"),
    )


def loss_fn(model):
    x = named_axes.wrap(jnp.array([1.0, -2.0, 0.5])).tag("inp")
    target = named_axes.wrap(jnp.array([1.0, -1.0])).tag("out")
    error = model(x) - target
    return named_axes.nmap(jnp.sum)((error * error).untag("out")).unwrap()


def leaf_paths(state):
    return sorted("/".join(map(str, path)) for path, _ in nnx.to_flat_state(state))


def test_parameter_and_state_variable_are_nnx_variables():
    model = make_model()
    assert isinstance(model.weight, nnx.Param) and isinstance(model.weight, nnx.Variable)
    assert isinstance(model.steps, nnx.Variable) and not isinstance(model.steps, nnx.Param)
    assert isinstance(model.weight, variables.AbstractVariable)


def test_nnx_state_lists_parameters_with_paths_and_metadata():
    model = make_model()
    params = nnx.state(model, nnx.Param)
    assert leaf_paths(params) == ["bias", "weight"]
    weight = params["weight"]
    assert isinstance(weight, variables.Parameter)
    assert weight.get_metadata("label") == "weight"
    assert weight.get_metadata("axis_names") == ("inp", "out")
    assert weight.get_metadata("trainable") is True
    np.testing.assert_array_equal(weight[...], model.weight[...])
    assert leaf_paths(nnx.state(model, variables.StateVariable)) == ["steps"]


def test_split_merge_roundtrip_keeps_types_labels_names_and_values():
    model = make_model()
    graphdef, state = nnx.split(model)
    rebuilt = nnx.merge(graphdef, state)
    assert type(rebuilt) is TinyModel
    assert type(rebuilt.weight) is variables.Parameter
    assert type(rebuilt.steps) is variables.StateVariable
    assert rebuilt.weight.label == "weight"
    assert rebuilt.weight.metadata == {"trainable": True}
    assert dict(rebuilt.weight.value.named_shape) == {"inp": 3, "out": 2}
    np.testing.assert_array_equal(rebuilt.weight[...], model.weight[...])


def test_jax_tree_util_sees_through_variables_to_raw_arrays():
    model = make_model()
    leaves_with_paths = jax.tree_util.tree_flatten_with_path(model)[0]
    paths = [jax.tree_util.keystr(path) for path, _ in leaves_with_paths]
    assert paths == [".weight.value", ".bias.value", ".steps.value"]
    assert [leaf.shape for _, leaf in leaves_with_paths] == [(3, 2), (2,), ()]
    doubled = jax.tree_util.tree_map(lambda x: x * 2, model)
    assert type(doubled.weight) is variables.Parameter and doubled.weight is not model.weight
    assert doubled.weight.label == "weight"
    assert doubled.weight.get_metadata("axis_names") == ("inp", "out")


def test_jax_grad_over_the_model_returns_a_model_shaped_gradient():
    model = make_model()
    grads = jax.grad(loss_fn)(model)
    assert type(grads) is TinyModel and type(grads.weight) is variables.Parameter
    assert dict(grads.weight.value.named_shape) == {"inp": 3, "out": 2}
    # Check one entry against a central finite difference.
    eps = 1e-3
    bumped = [jax.tree_util.tree_map(lambda x: x, model) for _ in range(2)]
    for sign, copy in zip((1, -1), bumped, strict=True):
        copy.bias.set_value(model.bias[...].at[0].add(sign * eps))
    numeric = (loss_fn(bumped[0]) - loss_fn(bumped[1])) / (2 * eps)
    np.testing.assert_allclose(grads.bias[...][0], numeric, rtol=1e-2)


def test_nnx_optimizer_trains_the_struct_under_nnx_jit():
    model = make_model()
    optimizer = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        model.steps[...] += 1
        return loss

    weight_object = model.weight
    losses = [float(train_step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0] * 0.8
    assert model.weight is weight_object  # updated in place, as NNX does
    assert model.weight.get_metadata("axis_names") == ("inp", "out")
    assert model.weight.metadata == {"trainable": True}
    assert int(model.steps[...]) == 5
    assert float(loss_fn(model)) < losses[0]


def test_optax_over_the_pure_pytree():
    model = make_model()
    optimizer = optax.sgd(0.05)
    opt_state = optimizer.init(model)

    @jax.jit
    def step(model, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(model)
        updates, opt_state = optimizer.update(grads, opt_state, model)
        return optax.apply_updates(model, updates), opt_state, loss

    losses = []
    for _ in range(3):
        model, opt_state, loss = step(model, opt_state)
        losses.append(float(loss))
    assert losses[2] < losses[0]
    assert type(model.weight) is variables.Parameter and model.weight.label == "weight"
    assert dict(model.weight.value.named_shape) == {"inp": 3, "out": 2}


class Holder(nnx.Module):
    """An NNX module whose attribute is a pz_flax struct (no nnx.data wrapper needed)."""

    def __init__(self):
        self.inner = make_model()
        self.scale = nnx.Param(jnp.ones(()))

    def __call__(self, x):
        return self.inner(x) * self.scale[...]


def test_nnx_module_attribute_exposes_the_struct_parameters():
    holder = Holder()
    params = nnx.state(holder, nnx.Param)
    assert leaf_paths(params) == ["inner/bias", "inner/weight", "scale"]
    optimizer = nnx.Optimizer(holder, optax.adam(0.1), wrt=nnx.Param)

    def holder_loss(holder):
        return loss_fn(holder.inner) * holder.scale[...]

    before = np.asarray(holder.inner.weight[...])
    grads = nnx.grad(holder_loss)(holder)
    optimizer.update(holder, grads)
    assert not np.allclose(holder.inner.weight[...], before)
    assert holder.inner.weight.get_metadata("axis_names") == ("inp", "out")


def test_orbax_roundtrip_restores_values_and_metadata(tmp_path):
    model = make_model(seed=1)
    model.steps[...] = jnp.asarray(7.0)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", nnx.state(model))
    checkpointer.wait_until_finished()

    abstract = nnx.eval_shape(lambda: make_model(seed=2))
    assert abstract.weight.get_raw_value().shape == (3, 2)
    restored_state = checkpointer.restore(tmp_path / "ckpt", nnx.state(abstract))
    restored_weight = restored_state["weight"]
    assert type(restored_weight) is variables.Parameter
    assert restored_weight.get_metadata("axis_names") == ("inp", "out")
    assert restored_weight.get_metadata("trainable") is True

    fresh = make_model(seed=3)
    nnx.update(fresh, restored_state)
    np.testing.assert_array_equal(fresh.weight[...], model.weight[...])
    assert int(fresh.steps[...]) == 7
    assert fresh.weight.label == "weight"
    assert dict(fresh.weight.value.named_shape) == {"inp": 3, "out": 2}


def test_nnx_jit_propagates_state_variable_mutation():
    model = make_model()

    @nnx.jit
    def count(model):
        model.steps.value = model.steps.value + 1

    count(model)
    count(model)
    assert int(model.steps.value) == 2


def test_unhashable_metadata_is_caught_before_nnx_would_fail():
    # nnx.split hashes variable metadata; the constructor refuses such metadata up front.
    with pytest.raises(TypeError, match=r"'schedule' must be hashable.*use tuples"):
        variables.Parameter(label="w", value=1.0, metadata={"schedule": {"lr": [1, 2]}})


def test_dict_metadata_survives_nnx_split_merge_and_jit():
    # penzai code puts dicts in metadata (LayerStack's "layerstack_axes"); they are frozen so
    # that NNX can hash them.
    state = variables.StateVariable(label="s", value=0, metadata={"axes": {"stack": "shared"}})
    graphdef, nnx_state = nnx.split({"s": state})
    hash(graphdef)
    assert nnx.merge(graphdef, nnx_state)["s"].metadata == {"axes": {"stack": "shared"}}

    @nnx.jit
    def increment(tree):
        tree["s"].value = tree["s"].value + 1

    increment({"s": state})
    assert int(state.value) == 1
    assert state.metadata["axes"]["stack"] == "shared"


@pytest.mark.parametrize("vmap", [jax.vmap, nnx.vmap], ids=["jax.vmap", "nnx.vmap"])
def test_vmapping_over_a_positional_prefix_keeps_the_named_axes(vmap):
    # Axis names label the trailing axes, so a transform that strips a leading positional axis
    # sees a consistent NamedArray inside.
    rows = named_axes.wrap(jnp.arange(12.0).reshape(4, 3)).tag("layer", "b").untag("layer")
    stacked = variables.Parameter(label="stack", value=rows)
    assert stacked.value.positional_shape == (4,)
    seen_inside = []

    def row_sum(param):
        seen_inside.append((param.value.positional_shape, dict(param.value.named_shape)))
        return named_axes.nmap(jnp.sum)(param.value.untag("b")).unwrap()

    np.testing.assert_array_equal(vmap(row_sum)(stacked), [3.0, 12.0, 21.0, 30.0])
    assert seen_inside == [((), {"b": 3})]


# ------------------------------------------- NNX's own metadata, asked of NNX


def test_nnx_required_metadata_entries_are_reserved():
    for key in nnx.Variable.required_metadata:
        with pytest.raises(ValueError, match=f"{key!r} is reserved"):
            variables.Parameter(label="p", value=jnp.zeros(2), metadata={key: False})


def test_reserved_metadata_follow_the_vocabulary_nnx_reports(monkeypatch):
    # A release that renamed its bookkeeping entries (flax 0.12.1-0.12.2 spelled them
    # ``is_hijax``/``has_ref``/``is_mutable``) must get them reserved without a code change.
    from pz_flax._compat import nnx as nnx_compat

    renamed = dataclasses.replace(
        nnx_compat.nnx_metadata_keys(), required=frozenset({"is_hijax", "has_ref"})
    )
    monkeypatch.setattr(nnx_compat, "nnx_metadata_keys", lambda: renamed)
    variables._reserved_metadata_keys.cache_clear()
    try:
        with pytest.raises(ValueError, match="'is_hijax' is reserved"):
            variables.Parameter(label="p", value=jnp.zeros(2), metadata={"is_hijax": True})
    finally:
        monkeypatch.undo()
        variables._reserved_metadata_keys.cache_clear()
    assert variables.Parameter(label="p", value=0.0, metadata={"is_hijax": 1}).metadata == {
        "is_hijax": 1
    }


def test_metadata_assignment_goes_through_nnx_key_renaming():
    # Whatever NNX's own ``set_metadata`` makes of a deprecated sharding spelling (flax 0.12.4+
    # renames it to ``out_sharding``), assigning ``metadata`` makes the same of it.
    from pz_flax._compat import nnx as nnx_compat

    keys = nnx_compat.nnx_metadata_keys()
    param = variables.Parameter(
        label="w", value=named_axes.wrap(jnp.zeros((2, 3))).tag("a", "b"), metadata={"x": 1}
    )
    plain = nnx.Param(jnp.zeros((2, 3)))
    for alias in keys.sharding_aliases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            param.metadata = {alias: ("a", None), "y": 2}
            plain.set_metadata({**plain.get_metadata(), alias: ("a", None), "y": 2})
        expected = {
            key: entry
            for key, entry in plain.get_metadata().items()
            if key not in keys.required and key not in ("label", "axis_names")
        }
        assert param.metadata == expected
        assert param.label == "w" and param.value.named_shape == {"a": 2, "b": 3}
        if keys.sharding in expected:
            # NNX's own reader of sharding annotations sees it.
            spec = nnx.get_partition_spec(nnx.State({"w": param}))["w"].get_value()
            assert spec == jax.sharding.PartitionSpec("a", None)
        plain.set_metadata({key: plain.get_metadata()[key] for key in keys.required})


# ------------------------------------------- writes go through NNX's public, checked API


@pytest.mark.parametrize(
    "assign",
    [
        lambda param, new: setattr(param, "value", new),
        lambda param, new: param.set_value(new),
    ],
    ids=["value", "set_value"],
)
def test_renaming_write_from_another_trace_is_refused_and_changes_nothing(assign):
    param = variables.Parameter(label="w", value=named_axes.wrap(jnp.zeros((2, 3))).tag("a", "b"))

    @jax.jit
    def write(x):
        assign(param, named_axes.wrap(x).tag("c", "d"))
        return x

    with pytest.raises(flax_errors.TraceContextError):
        write(jnp.ones((2, 3)))
    assert param.value.named_shape == {"a": 2, "b": 3}
    assert isinstance(param.get_raw_value(), jax.Array)
    np.testing.assert_array_equal(param.get_raw_value(), np.zeros((2, 3)))


def test_label_and_metadata_writes_from_another_trace_are_refused():
    param = variables.Parameter(label="w", value=jnp.zeros(2), metadata={"x": 1})

    @jax.jit
    def relabel(x):
        param.label = "v"
        return x

    @jax.jit
    def remeta(x):
        param.metadata = {"x": 2}
        return x

    for write in (relabel, remeta):
        with pytest.raises(flax_errors.TraceContextError):
            write(1.0)
    assert param.label == "w" and param.metadata == {"x": 1}


def test_variables_stay_plain_under_nnx_hijax_and_ref_defaults():
    with nnx.var_defaults(hijax=True, ref=True):
        param = variables.Parameter(label="w", value=named_axes.wrap(jnp.zeros(3)).tag("a"))
        state = variables.StateVariable(jnp.zeros(()), label="s")
    for variable in (param, state):
        assert isinstance(variable, variables.LabeledVariable)
        assert isinstance(variable.get_raw_value(), jax.Array)
    assert param.value.named_shape == {"a": 3}


def test_deepcopy_copies_raw_value_and_metadata():
    param = variables.Parameter(
        label="w", value=named_axes.wrap(jnp.arange(3.0)).tag("a"), metadata={"m": {"k": 1}}
    )
    duplicate = copy_lib.deepcopy(param)
    assert type(duplicate) is variables.Parameter and duplicate is not param
    assert duplicate.label == "w" and duplicate.metadata == {"m": {"k": 1}}
    duplicate.value = named_axes.wrap(jnp.zeros(3)).tag("b")
    assert param.value.named_shape == {"a": 3}
    np.testing.assert_array_equal(param.get_raw_value(), np.arange(3.0))


def test_unfreezing_a_sharding_annotated_snapshot_does_not_place_it_again():
    # A variable annotated without eager placement (as NNX's eager_sharding=False variables,
    # e.g. from nnx.with_partitioning, are) must survive freeze -> unfreeze outside a mesh, and
    # inside variable_jit, where NNX would otherwise try to shard the value and find no mesh.
    from jax.sharding import PartitionSpec

    param = variables.Parameter(label="w", value=jnp.arange(16.0).reshape(2, 8))
    param.set_metadata(out_sharding=PartitionSpec(None, "model"))
    copy = param.freeze().unfreeze_as_copy()
    assert copy.metadata == param.metadata
    assert copy.metadata["out_sharding"] == PartitionSpec(None, "model")
    np.testing.assert_array_equal(copy.value, param.value)
    state = variables.StateVariable(label="s", value=jnp.zeros(8))
    state.set_metadata(out_sharding=PartitionSpec("model"))
    assert state.freeze().unfreeze_as_copy().metadata == state.metadata

    total = variables.variable_jit(lambda p: p.value.sum())(param)
    assert float(total) == float(jnp.arange(16.0).sum())
