"""Tests for pz_flax.core.variables: penzai's variable API (labels, slots, bind/unbind, jit)."""

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import penzai.core.named_axes as pz_named_axes_oracle
import penzai.core.variables as pz_variables_oracle
import pytest
import treescope
from flax import errors as flax_errors

from pz_flax.core import named_axes
from pz_flax.core import variables


def named(array, *names):
    return named_axes.wrap(jnp.asarray(array)).tag(*names)


# ---------------------------------------------------------------- construction and values


@pytest.mark.parametrize("variable_type", [variables.Parameter, variables.StateVariable])
def test_label_value_metadata_roundtrip(variable_type):
    variable = variable_type(value=1, label="var1", metadata={"a": "b"})
    assert variable.value == 1
    assert variable.label == "var1"
    assert variable.metadata == {"a": "b"}
    variable.value = [1, 2, 3]
    assert [int(x) for x in variable.value] == [1, 2, 3]
    # penzai converts every leaf to a JAX array on assignment.
    assert all(isinstance(x, jax.Array) for x in variable.value)


def test_namedarray_value_is_stored_positionally_with_axis_names_as_metadata():
    data = np.arange(6.0).reshape(2, 3)
    param = variables.Parameter(label="w", value=named(data, "a", "b"))
    assert isinstance(param.get_raw_value(), jax.Array)
    np.testing.assert_array_equal(param.get_raw_value(), data)
    np.testing.assert_array_equal(param[...], data)
    assert param.get_metadata("axis_names") == ("a", "b")
    view = param.value
    assert isinstance(view, named_axes.NamedArray)
    assert dict(view.named_shape) == {"a": 2, "b": 3}
    np.testing.assert_array_equal(view.unwrap("a", "b"), data)


def test_plain_values_become_jax_arrays_and_jax_arrays_are_kept_as_they_are():
    array = jnp.arange(4.0)
    assert variables.Parameter(label="kept", value=array).get_raw_value() is array
    converted = variables.Parameter(label="converted", value=np.arange(4.0)).get_raw_value()
    assert isinstance(converted, jax.Array)
    np.testing.assert_array_equal(converted, np.arange(4.0))
    named_value = named(array, "a")
    assert variables.Parameter(label="named", value=named_value).get_raw_value() is array


def test_namedarrayview_value_is_canonicalised():
    data = np.arange(24.0).reshape(2, 3, 4)
    view = named(data, "a", "b", "c").untag("b")  # positional axis in the middle: a view
    assert isinstance(view, named_axes.NamedArrayView)
    param = variables.Parameter(label="v", value=view)
    assert param.get_raw_value().shape == (3, 2, 4)
    assert param.get_metadata("axis_names") == ("a", "c")
    stored = param.value
    assert stored.positional_shape == (3,)
    np.testing.assert_array_equal(stored.tag_prefix("b").unwrap("a", "b", "c"), data)


def test_positional_prefix_survives_a_leading_axis_change():
    # Axis names describe the trailing axes only, so a leading batch axis added by a
    # vectorizing transform (raw value replaced directly, as NNX does) keeps them correct.
    param = variables.Parameter(label="w", value=named(np.ones((2, 3)), "a", "b"))
    param.set_value(jnp.zeros((5, 2, 3)))
    assert param.value.positional_shape == (5,)
    assert dict(param.value.named_shape) == {"a": 2, "b": 3}


def test_raw_value_with_too_few_axes_for_its_names_is_reported():
    param = variables.Parameter(label="w", value=named(np.ones((2, 3)), "a", "b"))
    param.set_value(jnp.zeros((3,)))
    with pytest.raises(ValueError, match=r"'w'.*\('a', 'b'\).*\(3,\)"):
        _ = param.value


def test_assigning_plain_value_drops_axis_names_and_namedarray_sets_them():
    param = variables.Parameter(label="w", value=named(np.ones((2, 3)), "a", "b"))
    param.value = jnp.zeros(4)
    assert not param.has_metadata("axis_names")
    assert isinstance(param.value, jax.Array)
    param.value = named(np.ones(4), "z")
    assert param.get_metadata("axis_names") == ("z",)
    assert dict(param.value.named_shape) == {"z": 4}


def test_set_value_keeps_names_for_raw_arrays_and_accepts_namedarrays():
    param = variables.Parameter(label="w", value=named(np.ones((2, 3)), "a", "b"))
    param.set_value(jnp.full((2, 3), 7.0))
    assert param.get_metadata("axis_names") == ("a", "b")
    param.set_value(named(np.zeros((3, 2)), "b", "a"))
    assert param.get_metadata("axis_names") == ("b", "a")
    np.testing.assert_array_equal(param.value.unwrap("a", "b"), np.zeros((2, 3)))
    with pytest.raises(TypeError, match="Cannot assign a NamedArray to an index"):
        param.set_value(named(np.zeros(3), "b"), index=0)


def test_label_and_metadata_are_assignable():
    param = variables.Parameter(label="w", value=1.0, metadata={"trainable": True})
    param.label = "renamed"
    param.metadata = {"trainable": False, "note": "x"}
    assert param.label == "renamed"
    assert param.get_slot() == variables.ParameterSlot("renamed")
    assert param.metadata == {"trainable": False, "note": "x"}
    assert param.get_metadata("trainable") is False


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"label": ["unhashable"]}, TypeError, "label must be hashable"),
        ({"metadata": {1: "x"}}, TypeError, "keys must be strings.*1"),
        ({"metadata": {"label": "x"}}, ValueError, "'label' is reserved"),
        ({"metadata": {"axis_names": ("a",)}}, ValueError, "'axis_names' is reserved"),
        ({"metadata": {"tags": ["a"]}}, TypeError, "'tags' must be hashable"),
    ],
)
def test_invalid_labels_and_metadata_are_rejected(kwargs, error, message):
    arguments = {"label": "w", "value": 1.0} | kwargs
    with pytest.raises(error, match=message):
        variables.Parameter(**arguments)


def test_dict_metadata_is_frozen_and_reads_like_penzai():
    metadata = {"layerstack_axes": {"stack": "shared"}, "nested": ({"a": {"b": 1}},), "n": 1}
    ours = variables.StateVariable(label="s", value=0, metadata=metadata)
    oracle = pz_variables_oracle.StateVariable(label="s", value=0, metadata=metadata)
    assert ours.metadata == oracle.metadata == metadata
    assert ours.metadata["layerstack_axes"]["stack"] == "shared"
    assert ours.freeze().metadata == metadata
    assert ours.freeze().unfreeze_as_copy().metadata == metadata
    frozen = ours.metadata["layerstack_axes"]
    assert isinstance(frozen, variables.MetadataDict)
    assert isinstance(ours.metadata["nested"][0]["a"], variables.MetadataDict)
    assert hash(frozen) == hash(variables.MetadataDict({"stack": "shared"}))
    with pytest.raises(TypeError):
        frozen["stack"] = "per_layer"
    ours.metadata = {"layerstack_axes": {"stack": "per_layer"}}
    assert ours.metadata == {"layerstack_axes": {"stack": "per_layer"}}


def test_metadata_dict_is_a_read_only_mapping():
    frozen = variables.MetadataDict({"b": 2, "a": 1})
    assert list(frozen) == ["b", "a"]
    assert len(frozen) == 2
    assert frozen == {"a": 1, "b": 2}
    assert frozen != {"a": 1}
    assert frozen != [("b", 2), ("a", 1)]
    assert repr(frozen) == "{'b': 2, 'a': 1}"
    with pytest.raises(KeyError, match="'c'"):
        frozen["c"]
    with pytest.raises(TypeError, match="unhashable"):
        hash(variables.MetadataDict({"a": [1]}))
    assert "MetadataDict" in treescope.render_to_text(frozen)


def test_invalid_metadata_assignment_is_rejected():
    param = variables.Parameter(label="w", value=1.0)
    with pytest.raises(TypeError, match="must be hashable"):
        param.label = {}
    with pytest.raises(ValueError, match="reserved"):
        param.metadata = {"hijax": True}


def test_variables_compare_and_hash_by_identity():
    first = variables.Parameter(label="w", value=1.0)
    twin = variables.Parameter(label="w", value=1.0)
    assert first == first
    assert first != twin
    assert len({first, twin, first}) == 2


def test_copies_and_pickles_are_variables_with_the_same_label_and_names():
    param = variables.Parameter(
        label="w", value=named(np.ones((2, 3)), "a", "b"), metadata={"trainable": False}
    )
    for duplicate in (copy.deepcopy(param), pickle.loads(pickle.dumps(param))):
        assert type(duplicate) is variables.Parameter and duplicate is not param
        assert duplicate.label == "w" and duplicate.metadata == {"trainable": False}
        assert dict(duplicate.value.named_shape) == {"a": 2, "b": 3}
        duplicate.value = jnp.zeros(2)
        assert param.get_raw_value().shape == (2, 3)


def test_abstract_classes_cannot_be_instantiated():
    with pytest.raises(TypeError):
        variables.LabeledVariable(label="x", value=1)
    with pytest.raises(TypeError):
        variables.AbstractVariable()


# ---------------------------------------------------------------- automatic labels


def test_auto_labels_are_unique():
    first = variables.StateVariable(value=1)
    second = variables.StateVariable(value=2)
    assert isinstance(first.label, variables.AutoStateVarLabel)
    assert first.label == variables.AutoStateVarLabel(id(first))
    assert first.label != second.label


def test_scoped_auto_labels_count_per_scope_and_nest():
    with variables.scoped_auto_state_var_labels():
        var_1 = variables.StateVariable(value=1)
        with variables.scoped_auto_state_var_labels(group="inner"):
            var_2 = variables.StateVariable(value=2)
            var_3 = variables.StateVariable(value=3)
        var_4 = variables.StateVariable(value=4)
        explicit = variables.StateVariable(value=5, label="mine")
    after = variables.StateVariable(value=6)
    assert var_1.label == variables.ScopedStateVarLabel(group=None, index=0)
    assert var_2.label == variables.ScopedStateVarLabel(group="inner", index=0)
    assert var_3.label == variables.ScopedStateVarLabel(group="inner", index=1)
    assert var_4.label == variables.ScopedStateVarLabel(group=None, index=1)
    assert explicit.label == "mine"
    assert isinstance(after.label, variables.AutoStateVarLabel)


def test_scoped_labels_reset_when_the_block_raises():
    with pytest.raises(RuntimeError), variables.scoped_auto_state_var_labels(group="g"):
        raise RuntimeError("boom")
    assert isinstance(variables.StateVariable(value=1).label, variables.AutoStateVarLabel)


def test_labels_of_different_kinds_sort_against_each_other():
    labels = [
        variables.ScopedStateVarLabel(group="g", index=1),
        variables.AutoStateVarLabel(5),
        variables.ScopedStateVarLabel(group="g", index=0),
    ]
    ordered = sorted(labels)
    scoped = [label for label in ordered if isinstance(label, variables.ScopedStateVarLabel)]
    assert [label.index for label in scoped] == [0, 1]


def test_variable_created_and_mutated_inside_a_transform():
    def with_local_variable(x):
        variable = variables.StateVariable(value=100)
        variable.value = variable.value + x
        return variable.value

    np.testing.assert_array_equal(
        jax.vmap(with_local_variable)(jnp.arange(4)), jnp.arange(100, 104)
    )


def test_mutating_an_outer_variable_inside_a_trace_is_refused():
    # penzai leaks the tracer silently; NNX's trace-level check turns it into an error.
    counter = variables.StateVariable(value=0, label="count")

    def bump(x):
        counter.value = counter.value + x
        return x

    with pytest.raises(flax_errors.TraceContextError):
        jax.jit(bump)(1)


# ---------------------------------------------------------------- unbind / bind / freeze


def make_tree():
    var_1 = variables.StateVariable(value=1, label="foo")
    var_2 = variables.StateVariable(value=2, label="bar")
    param = variables.Parameter(value=1, label="foo")
    tree = {
        "var_1": var_1,
        "var_2": var_2,
        "param": param,
        "inner": [var_1, var_2],
        "something_else": "something else",
    }
    return tree, var_1, var_2, param


def test_unbind_all_variables_leaves_slots_and_dedupes():
    tree, var_1, var_2, param = make_tree()
    slotted, extracted = variables.unbind_variables(tree)
    assert slotted == {
        "var_1": variables.StateVariableSlot("foo"),
        "var_2": variables.StateVariableSlot("bar"),
        "param": variables.ParameterSlot("foo"),
        "inner": [variables.StateVariableSlot("foo"), variables.StateVariableSlot("bar")],
        "something_else": "something else",
    }
    assert len(extracted) == 3
    assert all(a is b for a, b in zip(extracted, (var_1, var_2, param), strict=True))


def test_unbind_frozen_returns_snapshots():
    tree, var_1, var_2, param = make_tree()
    _, extracted = variables.unbind_variables(tree, freeze=True)
    assert extracted == (var_1.freeze(), var_2.freeze(), param.freeze())
    assert isinstance(extracted[2], variables.ParameterValue)


def test_unbind_state_vars_with_predicate():
    tree, var_1, var_2, param = make_tree()
    slotted, extracted = variables.unbind_state_vars(tree, lambda var: var.label == "foo")
    assert slotted["var_1"] == variables.StateVariableSlot("foo")
    assert slotted["var_2"] is var_2
    assert slotted["param"] is param
    assert slotted["inner"] == [variables.StateVariableSlot("foo"), var_2]
    assert len(extracted) == 1 and extracted[0] is var_1


def test_unbind_params_only_takes_parameters():
    tree, _, _, param = make_tree()
    slotted, extracted = variables.unbind_params(tree, freeze=True)
    assert extracted == (param.freeze(),)
    assert slotted["param"] == variables.ParameterSlot("foo")
    assert isinstance(slotted["var_1"], variables.StateVariable)


def test_unbind_conflict_names_the_slot_and_both_paths():
    first = variables.StateVariable(value=1, label="dup")
    second = variables.StateVariable(value=2, label="dup")
    with pytest.raises(variables.VariableConflictError, match=r"'dup'.*\['a'\].*\['b'\]"):
        variables.unbind_variables({"a": first, "b": second})


def test_unbind_conflict_with_an_existing_slot():
    variable = variables.StateVariable(value=1, label="taken")
    tree = {"slot": variables.StateVariableSlot("taken"), "var": variable}
    with pytest.raises(variables.VariableConflictError, match=r"'taken'.*already present"):
        variables.unbind_variables(tree)


def test_unbind_treats_jax_arrays_inside_variables_as_part_of_the_variable():
    param = variables.Parameter(label="w", value=named(np.ones((2, 3)), "a", "b"))
    slotted, _ = variables.unbind_variables({"p": param, "x": jnp.zeros(2)})
    leaves = jax.tree_util.tree_leaves(slotted)
    assert len(leaves) == 1 and leaves[0].shape == (2,)


def test_bind_variables_fills_every_matching_slot():
    var_1 = variables.StateVariable(value=1, label="var_1")
    var_2 = variables.Parameter(value=2, label="var_2")
    slotted = {
        "var_1": variables.StateVariableSlot("var_1"),
        "var_2": variables.ParameterSlot("var_2"),
        "inner": [variables.StateVariableSlot("var_1"), variables.ParameterSlot("var_2")],
        "something_else": "something else",
    }
    bound = variables.bind_variables(slotted, [var_1, var_2])
    assert bound["var_1"] is var_1 and bound["inner"][0] is var_1
    assert bound["var_2"] is var_2 and bound["inner"][1] is var_2
    assert bound["something_else"] == "something else"


def test_bind_and_unfreeze_makes_one_new_variable_per_slot():
    slotted = {
        "var_1": variables.StateVariableSlot("var_1"),
        "var_2": variables.ParameterSlot("var_2"),
        "inner": [variables.StateVariableSlot("var_1"), variables.ParameterSlot("var_2")],
    }
    bound = variables.bind_variables(
        slotted,
        [
            variables.StateVariableValue(value=1, label="var_1"),
            variables.ParameterValue(value=2, label="var_2"),
        ],
        unfreeze_as_copy=True,
    )
    assert isinstance(bound["var_1"], variables.StateVariable)
    assert isinstance(bound["var_2"], variables.Parameter)
    assert bound["inner"][0] is bound["var_1"] and bound["inner"][1] is bound["var_2"]
    assert bound["var_2"].value == 2


def test_bind_errors():
    slotted = {"a": variables.ParameterSlot("a")}
    param_a = variables.Parameter(label="a", value=1)
    with pytest.raises(ValueError, match="same slot"):
        variables.bind_variables(slotted, [param_a, variables.Parameter(label="a", value=2)])
    with pytest.raises(ValueError, match=r"No slot in the tree matches.*'b'"):
        variables.bind_variables(slotted, [param_a, variables.Parameter(label="b", value=2)])
    with pytest.raises(ValueError, match=r"needs frozen variable values.*Parameter"):
        variables.bind_variables(slotted, [param_a], unfreeze_as_copy=True)
    bound = variables.bind_variables(
        slotted, [param_a, variables.Parameter(label="b", value=2)], allow_unused=True
    )
    assert bound["a"] is param_a


def test_slots_raise_unbound_variable_error_on_value():
    with pytest.raises(variables.UnboundVariableError, match="ParameterSlot"):
        _ = variables.ParameterSlot("w").value
    with pytest.raises(variables.UnboundVariableError, match="StateVariableSlot"):
        _ = variables.StateVariableSlot("s").value


def test_slots_are_hashable_static_pytrees():
    slot = variables.ParameterSlot("w")
    assert jax.tree_util.tree_leaves(slot) == []
    assert hash(slot) == hash(variables.ParameterSlot("w"))
    assert slot != variables.StateVariableSlot("w")


def test_freeze_unfreeze_roundtrip():
    variable = variables.StateVariable(value=1.0, label="var_1", metadata={"foo": "bar"})
    frozen = variable.freeze()
    assert frozen == variables.StateVariableValue(value=1.0, label="var_1", metadata={"foo": "bar"})
    copy = frozen.unfreeze_as_copy()
    assert copy is not variable
    assert (copy.value, copy.label, copy.metadata) == (1.0, "var_1", {"foo": "bar"})
    assert copy.get_slot() == frozen.get_slot() == variable.get_slot()


def test_frozen_value_of_a_named_parameter_is_a_namedarray_pytree():
    param = variables.Parameter(label="w", value=named(np.ones((2, 3)), "a", "b"))
    frozen = param.freeze()
    assert isinstance(frozen.value, named_axes.NamedArray)
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, frozen)
    restored = doubled.unfreeze_as_copy()
    assert restored.get_metadata("axis_names") == ("a", "b")
    np.testing.assert_array_equal(restored[...], 2 * np.ones((2, 3)))


def test_freeze_variables_all_and_filtered():
    var_1 = variables.StateVariable(value=1, label="var_1")
    var_2 = variables.Parameter(value=2, label="var_2")
    tree = {"var_1": var_1, "var_2": var_2, "inner": [var_1, var_2], "other": "x"}
    frozen = variables.freeze_variables(tree)
    assert frozen == {
        "var_1": var_1.freeze(),
        "var_2": var_2.freeze(),
        "inner": [var_1.freeze(), var_2.freeze()],
        "other": "x",
    }
    partly = variables.freeze_state_vars(tree, lambda var: var.label == "var_1")
    assert partly["var_1"] == var_1.freeze() and partly["var_2"] is var_2
    params_only = variables.freeze_params(tree)
    assert params_only["var_1"] is var_1 and params_only["var_2"] == var_2.freeze()


def test_update_copies_a_matching_snapshot_and_rejects_others():
    variable = variables.StateVariable(value=1, label="s")
    variable.update(variables.StateVariableValue(value=5, label="s"))
    assert variable.value == 5
    with pytest.raises(ValueError, match=r"different slot.*'other'"):
        variable.update(variables.StateVariableValue(value=5, label="other"))
    with pytest.raises(ValueError, match="different slot"):
        variable.update(variables.ParameterValue(value=5, label="s"))


def test_mutable_state_protocol_methods():
    variable = variables.StateVariable(value=1, label="var1")
    state = variable.__get_state_as_jax_pytree__()
    assert state == variables.StateVariableValue(value=1, label="var1")
    rebuilt = state.__jax_pytree_state_to_new_variable__()
    assert isinstance(rebuilt, variables.StateVariable) and rebuilt is not variable
    assert (rebuilt.value, rebuilt.label) == (1, "var1")
    variable.__set_state_from_jax_pytree__(variables.StateVariableValue(value=2, label="var1"))
    assert variable.value == 2


# ---------------------------------------------------------------- variable_jit


@pytest.mark.parametrize(
    ("donate_variables", "donate_other"), [(False, False), (True, False), (True, True)]
)
def test_variable_jit_propagates_mutations(donate_variables, donate_other):
    var_1 = variables.StateVariable(value=1, label="var_1")
    var_2 = variables.StateVariable(value=2, label="var_2")
    tree = {"var_1": var_1, "var_2": var_2, "inner": [var_1, var_2], "x": jnp.ones(3)}

    def mutate(tree, increment, something_else):
        assert something_else == "static"
        tree["var_1"].value += increment
        tree["var_2"].value += 10 * increment
        return tree["inner"][0].value + tree["inner"][1].value

    extra = {"donate_argnames": ["increment"]} if donate_other else {}
    compiled = variables.variable_jit(
        mutate, static_argnames="something_else", donate_variables=donate_variables, **extra
    )
    result = compiled(tree, jnp.asarray(100), "static")
    assert (int(var_1.value), int(var_2.value), int(result)) == (101, 1002, 1103)
    assert compiled.__name__ == "mutate"
    assert "Variable-aware" in compiled.__doc__


def test_variable_jit_donates_variable_buffers_only_when_asked():
    def step(param, state):
        state.value = state.value + param.value.sum()
        return state.value

    param = variables.Parameter(label="p", value=jnp.ones(3))
    state = variables.StateVariable(jnp.zeros(()), label="s")
    kept_before = state.get_raw_value()
    variables.variable_jit(step)(param, state)
    assert not kept_before.is_deleted()

    donated_before = state.get_raw_value()
    variables.variable_jit(step, donate_variables=True)(param, state)
    assert donated_before.is_deleted()
    assert float(state.value) == 6.0


def test_variable_jit_keeps_named_values():
    def scale(param):
        param.value = param.value * 2
        return param.value

    param = variables.Parameter(label="w", value=named(np.ones((2, 3)), "a", "b"))
    result = variables.variable_jit(scale)(param)
    assert dict(result.named_shape) == {"a": 2, "b": 3}
    assert param.get_metadata("axis_names") == ("a", "b")
    np.testing.assert_array_equal(param[...], 2 * np.ones((2, 3)))


def test_variable_jit_accepts_var_keyword_functions():
    def add(counter, **kwargs):
        counter.value = counter.value + kwargs["amount"]
        return counter.value

    counter = variables.StateVariable(0, label="c")
    variables.variable_jit(add)(counter, amount=3)
    assert int(counter.value) == 3


def test_variable_jit_out_shardings_apply_to_the_result():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    counter = variables.StateVariable(0, label="c")

    def bump(counter):
        counter.value = counter.value + 1
        return counter.value * 2

    result = variables.variable_jit(bump, out_shardings=sharding)(counter)
    assert result.sharding == sharding and int(counter.value) == 1


def test_variable_jit_refuses_returned_variables():
    def bad(x):
        return [1, 2, variables.Parameter(label="foo", value=x)]

    with pytest.raises(ValueError, match="Returning a variable"):
        variables.variable_jit(bad)(10)


# ---------------------------------------------------------------- rendering


def test_treescope_repr_shows_label_metadata_and_named_value():
    param = variables.Parameter(
        label="w", value=named(np.ones((2, 3)), "a", "b"), metadata={"trainable": False}
    )
    text = treescope.render_to_text(param)
    assert text.startswith("Parameter(")
    for fragment in ("label='w'", "trainable", "a:2", "b:3"):
        assert fragment in text
    assert "Parameter(label='w'" in repr(param)
    assert str(param) == repr(param)


# ---------------------------------------------------------------- differential vs penzai


def run_unbind_bind_scenario(var_module, wrap):
    """The same script on either implementation; returns comparable plain results."""
    shared = var_module.StateVariable(value=wrap(np.arange(3.0)), label="shared")
    param = var_module.Parameter(label="w", value=wrap(np.ones(3)), metadata={"k": "v"})
    tree = {"a": shared, "b": [param, shared], "c": 3}
    slotted, frozen = var_module.unbind_variables(tree, freeze=True)
    frozen = [jax.tree_util.tree_map(lambda x: x + 1, value) for value in frozen]
    rebound = var_module.bind_variables(slotted, frozen, unfreeze_as_copy=True)
    _, only_params = var_module.unbind_params(rebound)

    def describe(value):
        return (
            type(value).__name__,
            value.label,
            value.metadata,
            np.asarray(value.value.unwrap("i")).tolist(),
        )

    return (
        [
            type(leaf).__name__
            for leaf in jax.tree_util.tree_leaves(slotted, is_leaf=lambda x: True)
        ],
        [describe(value) for value in frozen],
        [describe(value) for value in only_params],
        rebound["a"] is rebound["b"][1],
    )


def test_unbind_bind_matches_penzai():
    ours = run_unbind_bind_scenario(variables, lambda a: named(a, "i"))
    oracle = run_unbind_bind_scenario(
        pz_variables_oracle, lambda a: pz_named_axes_oracle.wrap(jnp.asarray(a)).tag("i")
    )
    assert ours == oracle


def test_conflict_and_unused_errors_match_penzai():
    for var_module in (variables, pz_variables_oracle):
        first = var_module.Parameter(label="x", value=1)
        second = var_module.Parameter(label="x", value=1)
        with pytest.raises(var_module.VariableConflictError):
            var_module.unbind_variables([first, second])
        with pytest.raises(ValueError):
            var_module.bind_variables([var_module.ParameterSlot("y")], [first])


def test_variable_jit_matches_penzai():
    def program(var_module):
        counter = var_module.StateVariable(value=0, label="n")
        param = var_module.Parameter(label="w", value=jnp.arange(3.0))

        def step(counter, param, scale):
            counter.value = counter.value + 1
            param.value = param.value * scale
            return param.value.sum()

        compiled = var_module.variable_jit(step, donate_variables=True)
        results = [float(compiled(counter, param, 2.0)) for _ in range(2)]
        return results, int(counter.value), np.asarray(param.value).tolist()

    assert program(variables) == program(pz_variables_oracle)


def test_value_of_a_placeholder_raw_value_is_the_placeholder_and_renders():
    param = variables.Parameter(value=named_axes.zeros({"a": 2}), label="p")
    placeholder = jax.tree_util.tree_map(lambda _: "hole", param)
    assert placeholder.value == "hole"
    assert "hole" in treescope.render_to_text(placeholder)


def test_parameter_replace_and_copy_store_a_named_array_like_value_does():
    original = variables.Parameter(
        value=named_axes.wrap(jnp.zeros((2, 3))).tag("a", "b"), label="w"
    )
    replacement = named_axes.wrap(jnp.ones((4, 5))).tag("c", "d")
    for replaced in (original.replace(replacement), original.copy(value=replacement)):
        assert type(replaced) is variables.Parameter
        assert replaced.label == "w"
        assert not named_axes.is_namedarray(replaced.get_raw_value())
        assert replaced.get_raw_value().shape == (4, 5)
        assert dict(replaced.value.named_shape) == {"c": 4, "d": 5}
    # A raw value keeps the axis names, as set_value does.
    kept = original.replace(jnp.full((2, 3), 7.0))
    assert dict(kept.value.named_shape) == {"a": 2, "b": 3}


# ---------------------------------------------------------------- models as jax.jit pytrees


def _labelled_model():
    from pz_flax import pz

    return pz.nn.Sequential(
        [
            pz.nn.Affine.from_config(
                name="layer",
                init_base_rng=jax.random.key(0),
                input_axes={"features": 3},
                output_axes={"features": 2},
            ),
            pz.nn.Elementwise(jax.nn.relu),
        ]
    )


def _described(tree):
    """Everything about a model but its array values: structure, kinds, labels, metadata."""
    described = []
    for node in jax.tree_util.tree_leaves(
        tree, is_leaf=lambda x: isinstance(x, (variables.Parameter, variables.ParameterValue))
    ):
        if isinstance(node, (variables.Parameter, variables.ParameterValue)):
            value = node.value
            described.append(
                (type(node), node.label, node.metadata, dict(value.named_axes), value.dtype)
            )
    return jax.tree_util.tree_structure(tree), described


@pytest.mark.parametrize("frozen", [False, True], ids=["live", "frozen"])
def test_model_passes_tree_map_and_jit_keeping_labels_metadata_and_values(frozen):
    from pz_flax import pz

    model = _labelled_model()
    if frozen:
        model = pz.freeze_params(model)
    structure, described = _described(model)
    assert len(described) == 2
    for transform in (
        lambda m: jax.tree_util.tree_map(lambda leaf: leaf, m),
        jax.jit(lambda m: m),
        jax.jit(lambda m: jax.tree_util.tree_map(lambda leaf: leaf * 1.0, m)),
    ):
        rebuilt = transform(model)
        assert _described(rebuilt) == (structure, described)
        for before, after in zip(
            jax.tree_util.tree_leaves(model), jax.tree_util.tree_leaves(rebuilt), strict=True
        ):
            np.testing.assert_array_equal(after, before)
    inputs = named(np.ones((4, 3)), "batch", "features")
    np.testing.assert_array_equal(
        jax.jit(lambda m, x: m(x).unwrap("batch", "features"))(model, inputs),
        model(inputs).unwrap("batch", "features"),
    )


def test_frozen_parameter_rebuilt_by_jax_is_still_a_validated_snapshot():
    value = named(np.arange(3.0), "features")
    snapshot = variables.ParameterValue(label="w", value=value, metadata={"trainable": False})
    rebuilt = jax.jit(lambda s: s)(snapshot)
    assert type(rebuilt) is variables.ParameterValue
    assert (rebuilt.label, rebuilt.metadata) == ("w", {"trainable": False})
    unfrozen = rebuilt.unfreeze_as_copy()
    assert unfrozen.label == "w" and unfrozen.metadata == {"trainable": False}
    # Construction-time validation of what becomes a variable still rejects bad input.
    bad = variables.ParameterValue(label="w", value=value, metadata={1: "not a str key"})
    with pytest.raises(TypeError, match="metadata keys must be strings"):
        bad.unfreeze_as_copy()
    with pytest.raises(TypeError, match="label must be hashable"):
        variables.Parameter(label=["unhashable"], value=value)
