"""Tests for pz_flax.nn.grouping."""

import dataclasses
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz as penzai_pz

from pz_flax.core import named_axes as nx
from pz_flax.core import shapecheck
from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.nn import basic_ops
from pz_flax.nn import grouping
from pz_flax.nn import layer as layer_base
from pz_flax.nn import linear_and_affine
from tests.nn import helpers


@struct.pytree_dataclass
class TaggedIdentity(grouping.Identity):
    """An identity layer carrying a comment, so that tree comparisons are meaningful."""

    comment: str = dataclasses.field(metadata={"pytree_node": False})


@struct.pytree_dataclass(has_implicitly_inherited_fields=True)
class MySequential(grouping.Sequential):
    pass


@pytest.mark.parametrize("which", ["sequential", "named_group", "checked"])
def test_group_calls_children_in_order_with_side_inputs(which):
    layer_1 = mock.MagicMock(return_value=2)
    layer_2 = mock.MagicMock(return_value="foo")
    layer_3 = mock.MagicMock(return_value=(1, 2, 3))
    sublayers = [layer_1, layer_2, layer_3]
    if which == "named_group":
        group = grouping.NamedGroup("some_name", sublayers)
    elif which == "checked":
        group = grouping.CheckedSequential(shapecheck.ANY, shapecheck.ANY, sublayers)
    else:
        group = grouping.Sequential(sublayers)
    assert group(1, some_side_input="bar") == (1, 2, 3)
    layer_1.assert_called_once_with(1, some_side_input="bar")
    layer_2.assert_called_once_with(2, some_side_input="bar")
    layer_3.assert_called_once_with("foo", some_side_input="bar")


def test_empty_groups_are_identities():
    assert grouping.Sequential([])(5) == 5
    assert grouping.NamedGroup("activation", [])(5, side=1) == 5
    assert grouping.Identity()("x", anything=3) == "x"


def test_sequential_matches_penzai():
    x = nx.wrap(jax.random.normal(jax.random.key(0), (2, 3))).tag("b", "f")
    ours = grouping.Sequential(
        [basic_ops.Elementwise(jax.nn.relu), linear_and_affine.ConstantRescale(2.0)]
    )
    theirs = penzai_pz.nn.Sequential(
        [penzai_pz.nn.Elementwise(jax.nn.relu), penzai_pz.nn.ConstantRescale(2.0)]
    )
    expected = theirs(penzai_pz.nx.wrap(np.asarray(x.unwrap("b", "f"))).tag("b", "f"))
    np.testing.assert_allclose(ours(x).unwrap("b", "f"), expected.unwrap("b", "f"), rtol=1e-6)


def test_sequential_subclass_may_not_override_call():
    with pytest.raises(TypeError, match="BadSequential overrides __call__"):

        class BadSequential(grouping.Sequential):
            def __call__(self, value, **side_inputs):
                return value


def test_sequential_subclass_with_custom_init_runs_children():
    @struct.pytree_dataclass
    class Doubler(grouping.Sequential):
        sublayers: list[layer_base.Layer]

        def __init__(self, times: int):
            self.sublayers = [linear_and_affine.ConstantRescale(2.0)] * times

    assert Doubler(3)(1.0) == 8.0
    assert isinstance(Doubler(1), grouping.Sequential)


def test_named_group_cannot_be_subclassed():
    with pytest.raises(TypeError, match="NamedGroup cannot be subclassed"):

        class MyGroup(grouping.NamedGroup):
            pass


def test_named_group_name_is_static_and_in_name_scope():
    group = grouping.NamedGroup("mlp_block", [basic_ops.Elementwise(jnp.sin)])
    assert jax.tree_util.tree_leaves(group) == []
    jaxpr = jax.make_jaxpr(lambda v: group(v))(jnp.ones(3))
    name_stacks = [str(eqn.source_info.name_stack) for eqn in jaxpr.eqns]
    assert "mlp_block/0" in name_stacks


def test_checked_sequential_checks_input_and_output():
    n = shapecheck.var("n")
    layer = grouping.CheckedSequential(
        input_like=shapecheck.ArraySpec(named_shape={"f": n}),
        output_like=shapecheck.ArraySpec(named_shape={"f": n}),
        sublayers=[basic_ops.Elementwise(jax.nn.relu)],
    )
    x = nx.ones({"f": 4})
    assert dict(layer(x).named_shape) == {"f": 4}
    assert layer.input_structure() is layer.input_like
    assert layer.output_structure() is layer.output_like
    with pytest.raises(shapecheck.StructureMismatchError, match="input of CheckedSequential"):
        layer(nx.ones({"g": 4}))
    shrinking = dataclasses.replace(layer, sublayers=[lambda v, **_: v[{"f": slice(0, 2)}]])
    with pytest.raises(shapecheck.StructureMismatchError, match="output of CheckedSequential"):
        shrinking(x)


def test_check_structure_layer():
    layer = grouping.CheckStructure(shapecheck.ArraySpec(named_shape={"f": 3}))
    x = nx.ones({"f": 3})
    assert layer(x) is x
    assert layer.input_structure() == layer.output_structure() == layer.expected
    with pytest.raises(shapecheck.StructureMismatchError, match="CheckStructure"):
        layer(nx.ones({"f": 2}))


def test_group_predicates():
    checked = grouping.CheckedSequential(shapecheck.ANY, shapecheck.ANY, [])
    assert grouping.is_anonymous_sequential(grouping.Sequential([]))
    assert not grouping.is_anonymous_sequential(MySequential([]))
    assert not grouping.is_anonymous_sequential(grouping.NamedGroup("a", []))
    for group in (grouping.Sequential([]), MySequential([]), grouping.NamedGroup("a", []), checked):
        assert grouping.is_sequential_or_named(group)
    assert not grouping.is_sequential_or_named(grouping.Identity())
    assert not grouping.is_sequential_or_named([1])


def _nested_model():
    return grouping.Sequential(
        [
            TaggedIdentity("1"),
            grouping.Sequential(
                [
                    TaggedIdentity("2"),
                    grouping.Sequential([TaggedIdentity("3")]),
                    grouping.NamedGroup(
                        "foo",
                        [
                            TaggedIdentity("4"),
                            grouping.Sequential([TaggedIdentity("5"), TaggedIdentity("6")]),
                        ],
                    ),
                    TaggedIdentity("7"),
                    MySequential([TaggedIdentity("8"), TaggedIdentity("9")]),
                    TaggedIdentity("10"),
                ]
            ),
            TaggedIdentity("11"),
        ]
    )


def test_inline_anonymous_sequentials():
    expected = grouping.Sequential(
        [
            TaggedIdentity("1"),
            TaggedIdentity("2"),
            TaggedIdentity("3"),
            grouping.NamedGroup(
                "foo", [TaggedIdentity("4"), TaggedIdentity("5"), TaggedIdentity("6")]
            ),
            TaggedIdentity("7"),
            MySequential([TaggedIdentity("8"), TaggedIdentity("9")]),
            TaggedIdentity("10"),
            TaggedIdentity("11"),
        ]
    )
    assert grouping.inline_anonymous_sequentials(_nested_model()) == expected


def test_inline_groups_with_custom_filters_keeps_other_fields():
    checked = grouping.CheckedSequential(
        shapecheck.ANY,
        shapecheck.ANY,
        [TaggedIdentity("a"), grouping.NamedGroup("inner", [TaggedIdentity("b")])],
    )
    inlined = grouping.inline_groups(
        {"model": checked},
        parent_filter=lambda node: isinstance(node, grouping.CheckedSequential),
        child_filter=lambda node: isinstance(node, grouping.NamedGroup),
    )
    assert inlined == {
        "model": grouping.CheckedSequential(
            shapecheck.ANY, shapecheck.ANY, [TaggedIdentity("a"), TaggedIdentity("b")]
        )
    }
    # Nothing matches the parent filter: the tree comes back equal.
    model = _nested_model()
    assert grouping.inline_groups(model, lambda node: False, lambda node: True) == model


def test_inline_keeps_shared_variables_shared():
    counter = variables.StateVariable(value=0, label="counter")
    shared = linear_and_affine.Linear.from_config("lin", jax.random.key(0), {"i": 2}, {"i2": 2})
    model = grouping.Sequential(
        [grouping.Sequential([shared, TaggedIdentity("x")]), {"state": counter}, shared]
    )
    inlined = grouping.inline_anonymous_sequentials(model)
    assert inlined.sublayers[0].weights is shared.weights
    assert inlined.sublayers[2]["state"] is counter
    assert inlined.sublayers[3].weights is shared.weights


@pytest.mark.parametrize(
    "qualified_name",
    [
        "Sequential.__init__",
        "Sequential.__call__",
        "NamedGroup.__init__",
        "NamedGroup.__call__",
        "CheckedSequential.__init__",
        "CheckedSequential.__call__",
        "Identity.__call__",
        "CheckStructure.__init__",
        "CheckStructure.__call__",
        "inline_groups",
        "inline_anonymous_sequentials",
        "is_anonymous_sequential",
        "is_sequential_or_named",
    ],
)
def test_signature_matches_penzai(qualified_name):
    helpers.assert_signature_matches_penzai(grouping, "penzai.nn.grouping", qualified_name)
