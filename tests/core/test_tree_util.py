"""Tests for pz_flax.core.tree_util, differential against penzai.core.tree_util."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import penzai.core.struct
import penzai.core.tree_util
import pytest
from flax import nnx

from pz_flax.core import struct
from pz_flax.core import tree_util

DictKey = jax.tree_util.DictKey
SequenceKey = jax.tree_util.SequenceKey
GetAttrKey = jax.tree_util.GetAttrKey


@struct.pytree_dataclass
class Outer(struct.Struct):
    body: Any
    extra: Any


@penzai.core.struct.pytree_dataclass
class PenzaiOuter(penzai.core.struct.Struct):
    body: Any
    extra: Any


@dataclasses.dataclass(frozen=True)
class StackedKey(tree_util.CustomGetAttrKey):
    axis: str


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass
class KeyedBox:
    """A pytree node whose path key is a ``CustomGetAttrKey`` subclass."""

    content: Any

    def tree_flatten_with_keys(self):
        return [(StackedKey("content", axis="layers"), self.content)], None

    def tree_flatten(self):
        return [self.content], None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(*children)


ONE_LEVEL_CASES = {
    "int_leaf": 3,
    "array_leaf": jnp.ones(2),
    "none": None,
    "empty_tuple": (),
    "empty_dict": {},
    "dict": {"b": [1, 2], "a": None},
    "ordered_dict": collections.OrderedDict([("z", 1), ("a", (2,))]),
    "list_of_nodes": [1, (2, 3), {"x": 4}],
    "partial": jax.tree_util.Partial(lambda a, b: a, 1, b=2),
}


@pytest.mark.parametrize("name", sorted(ONE_LEVEL_CASES))
def test_flatten_exactly_one_level_matches_penzai(name):
    tree = ONE_LEVEL_CASES[name]
    ours = tree_util.tree_flatten_exactly_one_level(tree)
    theirs = penzai.core.tree_util.tree_flatten_exactly_one_level(tree)
    if theirs is None:
        assert ours is None
        return
    keyed_children, treedef = ours
    their_children, their_treedef = theirs
    assert treedef == their_treedef
    assert [key for key, _ in keyed_children] == [key for key, _ in their_children]
    assert all(
        ours_c is theirs_c for (_, ours_c), (_, theirs_c) in zip(keyed_children, their_children)
    )


def test_flatten_exactly_one_level_round_trips_and_keeps_grandchildren():
    tree = {"a": [1, {"deep": 2}], "b": None}
    keyed_children, treedef = tree_util.tree_flatten_exactly_one_level(tree)
    assert keyed_children == [(DictKey("a"), [1, {"deep": 2}]), (DictKey("b"), None)]
    assert treedef.unflatten([child for _, child in keyed_children]) == tree
    assert treedef.unflatten(["x", "y"]) == {"a": "x", "b": "y"}


def test_flatten_exactly_one_level_of_structs_and_variables():
    keyed_children, _ = tree_util.tree_flatten_exactly_one_level(Outer(1, [2]))
    assert keyed_children == [(GetAttrKey("body"), 1), (GetAttrKey("extra"), [2])]
    param = nnx.Param(jnp.arange(3.0), axis_names=("x",))
    keyed_children, treedef = tree_util.tree_flatten_exactly_one_level(param)
    assert [key for key, _ in keyed_children] == [GetAttrKey("value")]
    assert keyed_children[0][1] is param.get_value()
    rebuilt = treedef.unflatten([jnp.zeros(3)])
    assert isinstance(rebuilt, nnx.Param)
    assert rebuilt.get_metadata()["axis_names"] == ("x",)


def test_pretty_keystr_matches_penzai():
    ours_tree = {"m": [Outer(body=Outer(body=1, extra=(2,)), extra=None)]}
    their_tree = {"m": [PenzaiOuter(body=PenzaiOuter(body=1, extra=(2,)), extra=None)]}
    for (path, _), (their_path, _) in zip(
        jax.tree_util.tree_flatten_with_path(ours_tree)[0],
        jax.tree_util.tree_flatten_with_path(their_tree)[0],
    ):
        ours = tree_util.pretty_keystr(path, ours_tree)
        theirs = penzai.core.tree_util.pretty_keystr(their_path, their_tree)
        assert ours == theirs.replace("PenzaiOuter", "Outer")
    assert (
        tree_util.pretty_keystr(
            (DictKey("m"), SequenceKey(0), GetAttrKey("body"), GetAttrKey("extra"), SequenceKey(0)),
            ours_tree,
        )
        == "['m'][0]/Outer.body/Outer.extra[0]"
    )


def test_pretty_keystr_names_variable_types():
    tree = {"layer": Outer(body=nnx.Param(jnp.ones(2)), extra=None)}
    ((path, _),) = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert tree_util.pretty_keystr(path, tree) == "['layer']/Outer.body/Param.value"
    assert tree_util.pretty_keystr(path, tree) == penzai.core.tree_util.pretty_keystr(path, tree)


def test_pretty_keystr_root_and_flattened_index_keys():
    assert tree_util.pretty_keystr((), {"a": 1}) == ""
    partial = jax.tree_util.Partial(lambda a: a, 1)
    ((path, _),) = jax.tree_util.tree_flatten_with_path(partial)[0]
    assert tree_util.pretty_keystr(path, partial) == penzai.core.tree_util.pretty_keystr(
        path, partial
    )
    assert tree_util.pretty_keystr(path, partial).startswith("Partial[<flat index 0>]")


def test_custom_getattr_key_subclasses():
    key = StackedKey("content", axis="layers")
    assert str(key) == ".content"
    assert key != tree_util.CustomGetAttrKey("content")
    tree = [KeyedBox(content={"w": 1})]
    ((path, _),) = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert path == (SequenceKey(0), key, DictKey("w"))
    assert tree_util.pretty_keystr(path, tree) == "[0]/KeyedBox.content['w']"


def test_pretty_keystr_names_the_bad_step():
    tree = {"a": [1, 2]}
    with pytest.raises(ValueError, match=r"\['a'\]\[5\] does not exist.*after \['a'\]"):
        tree_util.pretty_keystr((DictKey("a"), SequenceKey(5)), tree)
    with pytest.raises(ValueError, match=r"after \['a'\]\[0\] there is a int"):
        tree_util.pretty_keystr((DictKey("a"), SequenceKey(0), GetAttrKey("x")), tree)
    with pytest.raises(ValueError, match="after the root"):
        tree_util.pretty_keystr((DictKey("b"),), tree)


#### Traversals that stop at variables ####


def test_is_variable_node_covers_nnx_and_pz_variables():
    import jax.numpy as jnp
    from flax import nnx

    from pz_flax.core import variables

    nnx_param = nnx.Param(jnp.ones(2))
    pz_param = variables.Parameter(label="w", value=jnp.ones(2))
    assert tree_util.is_variable_node(nnx_param)
    assert tree_util.is_variable_node(pz_param)
    assert tree_util.is_variable_node(pz_param.freeze())
    assert tree_util.is_variable_node(variables.ParameterSlot("w"))
    assert not tree_util.is_variable_node(jnp.ones(2))
    assert not tree_util.is_variable_node({"a": nnx_param})


def test_traversals_keep_variables_whole():
    import jax.numpy as jnp
    from flax import nnx

    param = nnx.Param(jnp.ones(2))
    tree = {"a": param, "b": [jnp.zeros(1)]}
    assert tree_util.leaves_stopping_at_variables(tree)[0] is param
    leaves, treedef = tree_util.flatten_stopping_at_variables(tree)
    assert leaves[0] is param and treedef.unflatten(leaves)["a"] is param
    keyed, _ = tree_util.flatten_with_path_stopping_at_variables(tree)
    assert jax.tree_util.keystr(keyed[0][0]) == "['a']" and keyed[0][1] is param
    kinds = tree_util.map_stopping_at_variables(lambda leaf: type(leaf).__name__, tree)
    assert kinds == {"a": "Param", "b": ["ArrayImpl"]}
    paths = tree_util.map_with_path_stopping_at_variables(
        lambda path, leaf: jax.tree_util.keystr(path), tree
    )
    assert paths == {"a": "['a']", "b": ["['b'][0]"]}
