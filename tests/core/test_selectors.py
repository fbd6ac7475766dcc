"""Tests for pz_flax.core.selectors, differential against penzai.core.selectors.

Plain pytrees (dicts, lists, tuples, None, non-pytree leaf objects, arrays) mean the same thing
to both libraries, so every query and edit is run through both and the results compared. The
sentinel types (holes, quotes, NotInThisPartition) are different classes in the two libraries
and are normalised before comparing. NNX variables have no penzai counterpart and are tested
directly.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import penzai.core.partitioning
import penzai.core.selectors
import pytest
from flax import nnx

from pz_flax.core import partitioning
from pz_flax.core import selectors
from pz_flax.core import struct

DictKey = jax.tree_util.DictKey
SequenceKey = jax.tree_util.SequenceKey
GetAttrKey = jax.tree_util.GetAttrKey


@dataclasses.dataclass
class Tagged:
    """A non-pytree object, hence a leaf for both libraries."""

    tag: int


@dataclasses.dataclass
class Marked:
    """Wraps replaced values so tests can see where a replacement went."""

    value: Any


@struct.pytree_dataclass
class Pair(struct.Struct):
    left: Any
    right: Any
    name: str = dataclasses.field(default="pair", metadata={"pytree_node": False})


def example_tree():
    return {
        "a": 1,
        "b": Tagged(10),
        "c": [{"value": Tagged(12)}, {"value": Tagged(13)}, {"value": 3}],
        "d": (None, (), 4, [5, (6,)]),
    }


def normalise(tree: Any) -> Any:
    """Replaces both libraries' sentinel objects by comparable tuples, recursively."""
    sentinel_types = (
        selectors.SelectionHole,
        selectors.SelectionQuote,
        partitioning.NotInThisPartition,
        penzai.core.selectors.SelectionHole,
        penzai.core.selectors.SelectionQuote,
        penzai.core.partitioning.NotInThisPartition,
    )

    def convert(node):
        if isinstance(node, (selectors.SelectionHole, penzai.core.selectors.SelectionHole)):
            return ("HOLE", node.path)
        if isinstance(node, (selectors.SelectionQuote, penzai.core.selectors.SelectionQuote)):
            return ("QUOTE", convert(node.quoted))
        if isinstance(node, sentinel_types):
            return ("NOT_IN_THIS_PARTITION",)
        if isinstance(node, (selectors.Selection, penzai.core.selectors.Selection)):
            return (
                "SELECTION",
                tuple((k, normalise(v)) for k, v in node.selected_by_path.items()),
                normalise(node.remainder),
            )
        return node

    special_types = (*sentinel_types, selectors.Selection, penzai.core.selectors.Selection)
    return jax.tree_util.tree_map(convert, tree, is_leaf=lambda n: isinstance(n, special_types))


def assert_same_as_penzai(query, tree=None):
    """Runs ``query(select)`` with both libraries' ``select`` and compares the results."""
    tree = example_tree() if tree is None else tree
    ours = query(selectors.select, tree)
    theirs = query(penzai.core.selectors.select, tree)
    assert normalise(ours) == normalise(theirs)
    return ours


# Each query returns the selection itself (compared as keypaths, values and remainder).
SELECTION_QUERIES = {
    "select": lambda sel, t: sel(t),
    "instances_int": lambda sel, t: sel(t).at_instances_of(int),
    "instances_tagged": lambda sel, t: sel(t).at_instances_of(Tagged),
    "instances_tuple_of_types": lambda sel, t: sel(t).at_instances_of((int, Tagged)),
    "instances_dict_outermost": lambda sel, t: sel(t).at_instances_of(dict),
    "instances_list_innermost": lambda sel, t: sel(t).at_instances_of(list, innermost=True),
    "instances_tuple_innermost": lambda sel, t: sel(t).at_instances_of(tuple, innermost=True),
    "subtrees_where": lambda sel, t: sel(t).at_subtrees_where(
        lambda n: isinstance(n, dict) and "value" in n
    ),
    "subtrees_where_keypath": lambda sel, t: sel(t).at_subtrees_where(
        lambda k, n: len(k) == 2, with_keypath=True
    ),
    "subtrees_where_relative_keypath": lambda sel, t: (
        sel(t)
        .at(lambda r: r["c"])
        .at_subtrees_where(lambda k, n: k == (SequenceKey(1),), with_keypath=True)
    ),
    "subtrees_where_absolute_keypath": lambda sel, t: (
        sel(t)
        .at(lambda r: r["c"])
        .at_subtrees_where(
            lambda k, n: k == (DictKey("c"), SequenceKey(1)),
            with_keypath=True,
            absolute_keypath=True,
        )
    ),
    "at_single": lambda sel, t: sel(t).at(lambda r: r["c"][1]["value"]),
    "at_none_singleton": lambda sel, t: sel(t).at(lambda r: r["d"][0]),
    "at_empty_tuple_singleton": lambda sel, t: sel(t).at(lambda r: r["d"][1]),
    "at_root": lambda sel, t: sel(t).at(lambda r: r),
    "at_multiple": lambda sel, t: sel(t).at(lambda r: (r["a"], r["c"][0], r["d"]), multiple=True),
    "at_chained": lambda sel, t: (
        sel(t).at(lambda r: (r["c"][0], r["c"][1]), multiple=True).at(lambda s: s["value"])
    ),
    "keypaths": lambda sel, t: sel(t).at_keypaths(
        [(DictKey("a"),), (DictKey("c"), SequenceKey(2)), (DictKey("zzz"),)]
    ),
    "keypaths_nested_prefix": lambda sel, t: sel(t).at_keypaths(
        [(DictKey("c"),), (DictKey("c"), SequenceKey(2))]
    ),
    "children": lambda sel, t: sel(t).at_children(),
    "grandchildren": lambda sel, t: sel(t).at_children().at_children(),
    "pytree_leaves": lambda sel, t: sel(t).at_pytree_leaves(),
    "childless": lambda sel, t: sel(t).at_childless(),
    "equal_to_int": lambda sel, t: sel(t).at_equal_to(3),
    "equal_to_dict": lambda sel, t: sel(t).at_equal_to({"value": 3}),
    "where": lambda sel, t: sel(t).at_instances_of(Tagged).where(lambda v: v.tag > 11),
    "where_keypath": lambda sel, t: (
        sel(t).at_pytree_leaves().where(lambda k, v: DictKey("d") in k, with_keypath=True)
    ),
    "pick_nth": lambda sel, t: sel(t).at_pytree_leaves().pick_nth_selected(2),
    "pick_several": lambda sel, t: sel(t).at_pytree_leaves().pick_nth_selected([0, 3, 99]),
    "invert": lambda sel, t: sel(t).at(lambda r: r["c"][1]["value"]).invert(),
    "invert_everything": lambda sel, t: sel(t).invert(),
    "invert_nothing": lambda sel, t: sel(t).at_instances_of(float).invert(),
    "refine": lambda sel, t: (
        sel(t)
        .at_instances_of(dict)
        .at_instances_of(list)
        .refine(lambda lst: sel(lst).at(lambda items: items[-1]))
    ),
    "flatten_selected_selections": lambda sel, t: (
        sel(t)
        .at(lambda r: (r["c"], r["d"]), multiple=True)
        .apply(lambda s: sel(s).at_instances_of(int), keep_selected=True)
        .flatten_selected_selections()
    ),
    "insert_after_and_select": lambda sel, t: (
        sel(t).at(lambda r: r["c"][0]).insert_after("new", and_select=True)
    ),
    "insert_before_and_select": lambda sel, t: (
        sel(t)
        .at_instances_of(int)
        .where(lambda k, v: DictKey("d") in k, with_keypath=True)
        .insert_before("new", and_select=True)
    ),
}


@pytest.mark.parametrize("name", sorted(SELECTION_QUERIES))
def test_selection_queries_match_penzai(name):
    selection = assert_same_as_penzai(SELECTION_QUERIES[name])
    assert isinstance(selection, selectors.Selection)


# Each edit returns a rebuilt tree or plain data.
EDITS = {
    "apply": lambda sel, t: sel(t).at_instances_of(Tagged).apply(Marked),
    "apply_with_keypath": lambda sel, t: (
        sel(t)
        .at_instances_of(int)
        .apply(lambda k, v: (jax.tree_util.keystr(k), v), with_keypath=True)
    ),
    "apply_keep_selected": lambda sel, t: (
        sel(t).at_instances_of(int).apply(lambda v: v * 10, keep_selected=True)
    ),
    "apply_with_selected_index": lambda sel, t: (
        sel(t).at_pytree_leaves().apply_with_selected_index(lambda i, v: (i, v))
    ),
    "apply_with_selected_index_keep": lambda sel, t: (
        sel(t).at_instances_of(int).apply_with_selected_index(lambda i, v: i, keep_selected=True)
    ),
    "set": lambda sel, t: sel(t).at_instances_of(dict).set("X"),
    "set_sequence": lambda sel, t: sel(t).at_instances_of(int).set_sequence("abcdef"),
    "set_by_path_mapping": lambda sel, t: (
        sel(t)
        .at_instances_of(Tagged)
        .set_by_path(
            {
                (DictKey("b"),): "B",
                (DictKey("c"), SequenceKey(0), DictKey("value")): "C0",
                (DictKey("c"), SequenceKey(1), DictKey("value")): "C1",
            }
        )
    ),
    "set_by_path_fn": lambda sel, t: sel(t).at_instances_of(int).set_by_path(len),
    "select_and_set_by_path": lambda sel, t: (
        sel(t)
        .at(lambda r: (r["c"][0], r["c"][1]), multiple=True)
        .select_and_set_by_path({(DictKey("value"),): "replaced"})
    ),
    "get": lambda sel, t: sel(t).at(lambda r: r["c"][2]).get(),
    "get_sequence": lambda sel, t: sel(t).at_pytree_leaves().get_sequence(),
    "get_by_path": lambda sel, t: sel(t).at_instances_of(Tagged).get_by_path(),
    "get_keypaths": lambda sel, t: sel(t).at_childless().get_keypaths(),
    "count_len_empty": lambda sel, t: (
        sel(t).at_instances_of(int).count(),
        len(sel(t).at_instances_of(int)),
        sel(t).at_instances_of(int).is_empty(),
        sel(t).at_instances_of(float).is_empty(),
    ),
    "deselect": lambda sel, t: sel(t).at_pytree_leaves().deselect(),
    "remove_from_parent": lambda sel, t: (
        sel(t).at(lambda r: (r["c"][1], r["d"][2]), multiple=True).remove_from_parent()
    ),
    "insert_before": lambda sel, t: sel(t).at(lambda r: r["c"][1]).insert_before("new"),
    "insert_after": lambda sel, t: sel(t).at(lambda r: r["d"][3][1]).insert_after("new"),
    "apply_and_inline": lambda sel, t: (
        sel(t)
        .at_instances_of(int)
        .where(lambda k, v: DictKey("d") in k, with_keypath=True)
        .apply_and_inline(lambda v: [v] * v)
    ),
    "apply_and_inline_with_keypath": lambda sel, t: (
        sel(t).at(lambda r: r["c"][0]).apply_and_inline(lambda k, v: (len(k), v), with_keypath=True)
    ),
    "partition": lambda sel, t: sel(t).at(lambda r: (r["a"], r["c"][1]), multiple=True).partition(),
    "partition_at_leaves": lambda sel, t: (
        sel(t).at(lambda r: (r["a"], r["c"][1]), multiple=True).partition(at_leaves=True)
    ),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_edits_match_penzai(name):
    assert_same_as_penzai(EDITS[name])


def test_struct_keypaths_match_penzai():
    @penzai.core.struct.pytree_dataclass
    class PenzaiPair(penzai.core.struct.Struct):
        left: Any
        right: Any

    ours = selectors.select([Pair(1, {"x": 2}), Pair((3,), None)]).at_pytree_leaves()
    theirs = penzai.core.selectors.select(
        [PenzaiPair(1, {"x": 2}), PenzaiPair((3,), None)]
    ).at_pytree_leaves()
    assert ours.get_keypaths() == theirs.get_keypaths()
    assert ours.get_sequence() == theirs.get_sequence() == (1, 2, 3)
    assert ours.get_keypaths()[1] == (SequenceKey(0), GetAttrKey("right"), DictKey("x"))


def test_arrays_match_penzai():
    tree = {"w": jnp.arange(3.0), "b": np.ones(2), "n": 4}
    for query in (
        lambda sel, t: sel(t).at_instances_of(jax.Array).get_keypaths(),
        lambda sel, t: sel(t).at_pytree_leaves().get_keypaths(),
        lambda sel, t: sel(t).at_equal_to(4).get_keypaths(),
    ):
        assert_same_as_penzai(query, tree)
    doubled = selectors.select(tree).at_instances_of(jax.Array).apply(lambda x: x * 2)
    np.testing.assert_array_equal(doubled["w"], jnp.arange(3.0) * 2)
    assert doubled["b"] is tree["b"]


def test_select_builds_singleton_selection():
    tree = example_tree()
    selection = selectors.select(tree)
    assert selection == selectors.Selection(
        selected_by_path=collections.OrderedDict({(): tree}),
        remainder=selectors.SelectionHole(path=()),
    )
    assert selection.get() is tree


def test_struct_select_method_starts_a_selection():
    pair = Pair(1, 2)
    assert pair.select().at_instances_of(int).set_sequence([5, 6]) == Pair(5, 6)


def test_at_selects_remainder_with_holes():
    selection = selectors.select(example_tree()).at(lambda r: r["c"])
    assert selection.remainder["c"] == selectors.SelectionHole(path=(DictKey("c"),))
    assert selection.remainder["a"] == 1
    assert selection.get() == example_tree()["c"]


def test_at_warns_when_collection_returned_without_multiple():
    with pytest.warns(UserWarning, match="multiple=True") as caught:
        result = selectors.select(example_tree()).at(lambda r: (r["c"][0], r["c"][1])).apply(Marked)
    assert caught[0].filename == __file__
    assert result["c"][0] == Marked({"value": Tagged(12)})
    assert result["c"][2] == {"value": 3}


def test_at_rejects_computed_values():
    with pytest.raises(ValueError, match="not a node of its argument"):
        selectors.select({"a": [1, 2]}).at(lambda r: [r["a"][0]], multiple=False)
    with pytest.raises(ValueError, match="not nodes of its argument"):
        selectors.select({"a": [1, 2]}).at(lambda r: (r["a"], {"x": 1}), multiple=True)


def test_at_rejects_nested_needles():
    # A node inside another selected node can never be selected together with it.
    with pytest.raises(ValueError, match="not nodes of its argument"):
        selectors.select({"a": [1, 2]}).at(lambda r: (r["a"], r["a"][0]), multiple=True)


def test_innermost_selects_matching_leaves():
    # Deliberate divergence: penzai 0.2.5 never selects leaves when innermost=True.
    tree = {"a": 1, "b": [2, (3,)]}
    selection = selectors.select(tree).at_instances_of(int, innermost=True)
    assert selection.get_sequence() == (1, 2, 3)
    assert penzai.core.selectors.select(tree).at_instances_of(int, innermost=True).count() == 0
    nested = selectors.select({"x": [[1], [[2]]]}).at_instances_of(list, innermost=True)
    assert nested.get_keypaths() == (
        (DictKey("x"), SequenceKey(0)),
        (DictKey("x"), SequenceKey(1), SequenceKey(0)),
    )


def test_at_subtrees_where_innermost_with_keypath():
    tree = {"a": {"b": {"c": 1}}, "d": 2}
    selection = selectors.select(tree).at_subtrees_where(
        lambda k, _: len(k) <= 2, with_keypath=True, innermost=True
    )
    assert selection.get_keypaths() == ((DictKey("a"), DictKey("b")), (DictKey("d"),))


@pytest.mark.parametrize("absolute_keypath", [False, True])
def test_at_subtrees_where_calls_keypath_filter_once_per_node_like_penzai(absolute_keypath):
    tree = {"a": 1, "b": [{"v": Tagged(1)}, {"v": Tagged(2)}, {"v": 3}]}

    def keypaths_seen(select):
        seen = []

        def record(keypath, node):
            seen.append(keypath)
            return isinstance(node, Tagged)

        selected = (
            select(tree)
            .at(lambda root: root["b"])
            .at_subtrees_where(record, with_keypath=True, absolute_keypath=absolute_keypath)
            .get_sequence()
        )
        return seen, selected

    seen, selected = keypaths_seen(selectors.select)
    assert selected == (Tagged(1), Tagged(2))
    assert len(seen) == len(set(seen))
    # penzai visits the same nodes in the same order (it re-visits some; pz_flax does not).
    assert seen == list(dict.fromkeys(keypaths_seen(penzai.core.selectors.select)[0]))


def test_at_subtrees_where_calls_filter_once_per_node():
    calls = collections.Counter()

    def record(node):
        calls[type(node).__name__] += 1
        return isinstance(node, str)

    tree = {"a": "x", "b": ["y", ("z",)], "c": 1.0}
    assert selectors.select(tree).at_subtrees_where(record).get_sequence() == ("x", "y", "z")
    assert calls == {"dict": 1, "list": 1, "tuple": 1, "str": 3, "float": 1}


def test_at_subtrees_where_requires_bool():
    with pytest.raises(TypeError, match="must return a Python bool"):
        selectors.select({"a": jnp.ones(2)}).at_subtrees_where(
            lambda n: isinstance(n, jax.Array) and jnp.all(n > 0)
        )


def test_at_equal_to_rejects_elementwise_templates():
    for template in (jnp.ones(2), np.ones(2), nnx.Param(jnp.ones(2))):
        with pytest.raises(ValueError, match="compares elementwise"):
            selectors.select({"a": 1}).at_equal_to(template)


def test_get_reports_how_many_were_selected():
    with pytest.raises(ValueError, match="exactly one selected subtree, but 0 are selected"):
        selectors.select(example_tree()).at_instances_of(float).get()
    with pytest.raises(ValueError, match=r"but 2 are selected, at \['a'\], \['b'\]\."):
        selectors.select({"a": 1, "b": 2}).at_instances_of(int).get()


def test_assert_count_is():
    selection = selectors.select(example_tree()).at_instances_of(Tagged)
    assert selection.assert_count_is(3) is selection
    with pytest.raises(AssertionError, match=r"Expected 2 selected subtree.*3 are selected"):
        selection.assert_count_is(2)


def test_set_by_path_names_missing_path():
    selection = selectors.select({"a": 1, "b": 2}).at_instances_of(int)
    with pytest.raises(KeyError, match=r"\['b'\]"):
        selection.set_by_path({(DictKey("a"),): 5})
    # Extra entries are ignored, as in penzai.
    assert selection.set_by_path({(DictKey("a"),): 5, (DictKey("b"),): 6, (DictKey("z"),): 7}) == {
        "a": 5,
        "b": 6,
    }


def test_set_by_path_with_selected_by_path_is_identity():
    selection = selectors.select(example_tree()).at_instances_of(Tagged)
    assert selection.set_by_path(selection.selected_by_path) == example_tree()


def test_set_sequence_needs_enough_replacements():
    selection = selectors.select({"a": 1, "b": 2, "c": 3}).at_instances_of(int)
    with pytest.raises(ValueError, match=r"3 subtrees are selected but only 2.*\['c'\]"):
        selection.set_sequence([10, 20])
    assert selection.set_sequence(iter(range(100, 10**9))) == {"a": 100, "b": 101, "c": 102}


def test_select_and_set_by_path_names_missing_path():
    selection = selectors.select({"p": {"x": 1}, "q": {"y": 2}}).at_children()
    with pytest.raises(ValueError, match=r"\['x'\].*selected at \['q'\]"):
        selection.select_and_set_by_path({(DictKey("x"),): 0})
    outer = selectors.select({"x": {"y": 1}})
    # A path below another requested path is not an error: the shorter one wins.
    assert outer.select_and_set_by_path({(DictKey("x"),): 0, (DictKey("x"), DictKey("y")): 5}) == {
        "x": 0
    }


def test_apply_and_inline_errors_name_the_location():
    with pytest.raises(ValueError, match="root of the tree is selected"):
        selectors.select([1, 2]).remove_from_parent()
    with pytest.raises(ValueError, match=r"node at \['a'\] is inside a dict"):
        selectors.select({"a": 1}).at_instances_of(int).insert_after(0)
    with pytest.raises(ValueError, match="Sequential"):
        selectors.select({"f": Pair}).at_instances_of(type).remove_from_parent()


def test_apply_and_inline_rejects_namedtuple_parents():
    point = collections.namedtuple("Point", ["x", "y"])
    with pytest.raises(ValueError, match="inside a Point"):
        selectors.select(point(1, 2)).at_instances_of(int).remove_from_parent()


def test_flatten_selected_selections_requires_selections():
    selection = selectors.select({"a": 1}).at_instances_of(int)
    with pytest.raises(ValueError, match=r"the one at \['a'\] is a int"):
        selection.flatten_selected_selections()


def test_partial_children_cannot_be_selected():
    partial = jax.tree_util.Partial(lambda x, y: x + y, 1)
    with pytest.raises(ValueError, match=r"jax\.tree_util\.Partial"):
        selectors.select({"f": partial}).at_instances_of(jax.tree_util.Partial).at_children()
    with pytest.raises(ValueError, match=r"jax\.tree_util\.Partial"):
        selectors.select({"f": partial}).at(lambda t: t["f"].args)
    # The Partial itself can be selected and replaced.
    assert selectors.select({"f": partial}).at_instances_of(jax.tree_util.Partial).set(0) == {
        "f": 0
    }


def test_inconsistent_selection_fails_clearly():
    broken = selectors.Selection(
        selected_by_path=collections.OrderedDict(),
        remainder=[selectors.SelectionHole(path=(SequenceKey(0),))],
    )
    with pytest.raises(ValueError, match=r"hole for key path \[0\]"):
        broken.deselect()


def test_selection_is_a_pytree_with_the_original_leaves():
    tree = example_tree()
    selection = selectors.select(tree).at_instances_of(dict)
    assert sorted(map(repr, jax.tree_util.tree_leaves(selection))) == sorted(
        map(repr, jax.tree_util.tree_leaves(tree))
    )
    bumped = jax.tree_util.tree_map(
        lambda leaf: leaf + 1 if isinstance(leaf, int) else leaf, selection
    )
    assert isinstance(bumped, selectors.Selection)
    assert bumped.deselect()["a"] == 2


def test_selection_of_selection_round_trips():
    meta = selectors.select(
        selectors.select(selectors.select(example_tree()).at_instances_of(Tagged)).at(
            lambda s: s.remainder["c"]
        )
    ).at_instances_of(int)
    assert meta.deselect().deselect().deselect() == example_tree()
    remainder = meta.remainder.remainder.remainder
    assert remainder["b"] == selectors.SelectionQuote(
        quoted=selectors.SelectionQuote(quoted=selectors.SelectionHole(path=(DictKey("b"),)))
    )
    assert remainder["a"] == selectors.SelectionHole(
        path=(GetAttrKey("remainder"), GetAttrKey("remainder"), DictKey("a"))
    )


def test_jit_through_selection():
    tree = {"w": jnp.ones(3), "n": jnp.zeros(())}
    selection = selectors.select(tree).at(lambda t: t["w"])
    doubled = jax.jit(lambda s: s.apply(lambda x: 2 * x, keep_selected=True))(selection)
    np.testing.assert_array_equal(doubled.get(), 2 * jnp.ones(3))


# ---- NNX variables -------------------------------------------------------------------------


def variable_tree():
    return {
        "layer": Pair(nnx.Param(jnp.ones(2), axis_names=("x",)), nnx.Param(jnp.zeros(3))),
        "state": nnx.BatchStat(jnp.full((1,), 7.0)),
        "depth": 2,
    }


def test_variables_are_selected_whole_and_by_identity():
    tree = variable_tree()
    selection = selectors.select(tree).at_instances_of(nnx.Param)
    assert selection.get_keypaths() == (
        (DictKey("layer"), GetAttrKey("left")),
        (DictKey("layer"), GetAttrKey("right")),
    )
    assert selection.get_sequence()[0] is tree["layer"].left
    assert selection.get_sequence()[1] is tree["layer"].right
    assert selectors.select(tree).at_instances_of(nnx.Variable).count() == 3


def test_untouched_variables_keep_their_identity():
    tree = variable_tree()
    rebuilt = selectors.select(tree).at_instances_of(int).apply(lambda d: d + 1)
    assert rebuilt["depth"] == 3
    assert rebuilt["layer"].left is tree["layer"].left
    assert rebuilt["state"] is tree["state"]
    inverted = selectors.select(tree).at(lambda t: t["depth"]).invert()
    assert inverted.get_sequence()[1] is tree["state"]


def test_mutating_a_selected_variable_mutates_the_model():
    tree = variable_tree()
    (state,) = selectors.select(tree).at_instances_of(nnx.BatchStat).get_sequence()
    state[...] = jnp.full((1,), 9.0)
    np.testing.assert_array_equal(tree["state"][...], [9.0])


def test_at_pytree_leaves_reaches_inside_variables():
    tree = variable_tree()
    selection = selectors.select(tree).at_pytree_leaves()
    assert (DictKey("layer"), GetAttrKey("left"), GetAttrKey("value")) in selection.get_keypaths()
    assert isinstance(selection.remainder["layer"].left, nnx.Param)
    arrays = selectors.select(tree).at_instances_of(jax.Array)
    assert arrays.count() == 3
    scaled = arrays.apply(lambda a: a * 3)
    assert isinstance(scaled["layer"].left, nnx.Param)
    assert scaled["layer"].left.get_metadata()["axis_names"] == ("x",)
    np.testing.assert_array_equal(scaled["state"][...], [21.0])
    np.testing.assert_array_equal(tree["state"][...], [7.0])


def test_at_accessor_into_variables():
    tree = variable_tree()
    assert selectors.select(tree).at(lambda t: t["layer"].left).get() is tree["layer"].left
    inner = selectors.select(tree).at(lambda t: t["state"].get_value())
    assert inner.get_keypaths() == ((DictKey("state"), GetAttrKey("value")),)
    assert inner.get() is tree["state"].get_value()


def test_replace_variables():
    tree = variable_tree()
    replaced = (
        selectors.select(tree)
        .at_instances_of(nnx.Param)
        .apply(lambda p: nnx.Param(p.get_value() + 1, **p.get_metadata()))
    )
    np.testing.assert_array_equal(replaced["layer"].left[...], [2.0, 2.0])
    assert replaced["layer"].left.get_metadata()["axis_names"] == ("x",)
    assert replaced["state"] is tree["state"]
    assert selectors.select(tree).at_instances_of(nnx.BatchStat).set(None)["state"] is None


def test_partition_and_combine_with_variables():
    tree = variable_tree()
    selection = selectors.select(tree).at_instances_of(nnx.Param)
    for at_leaves in (False, True):
        params, rest = selection.partition(at_leaves=at_leaves)
        assert jax.tree_util.tree_leaves(params)[0] is tree["layer"].left.get_value()
        assert len(jax.tree_util.tree_leaves(params)) == 2
        combined = partitioning.combine(params, rest)
        assert jax.tree_util.tree_structure(combined) == jax.tree_util.tree_structure(tree)
        np.testing.assert_array_equal(combined["state"][...], [7.0])


def test_grad_with_respect_to_selected_params():
    tree = variable_tree()
    params, rest = selectors.select(tree).at_instances_of(nnx.Param).partition()

    def loss(params, rest):
        merged = partitioning.combine(params, rest)
        return jnp.sum(merged["layer"].left[...] * 2.0) + jnp.sum(merged["state"][...])

    grads = jax.grad(loss)(params, rest)
    np.testing.assert_array_equal(grads["layer"].left[...], [2.0, 2.0])
    assert isinstance(grads["state"], partitioning.NotInThisPartition)


def test_at_equal_to_looks_inside_variables_without_comparing_them():
    tree = {"p": nnx.Param(jnp.ones(())), "n": 1}
    assert selectors.select(tree).at_equal_to(1).get_keypaths() == ((DictKey("n"),),)


def test_pz_flax_parameters():
    from pz_flax.core import named_axes
    from pz_flax.core import variables

    param = variables.Parameter(value=named_axes.wrap(jnp.ones((2, 3))).tag("a", "b"), label="w")
    tree = {"layer": Pair(param, 3)}
    assert selectors.select(tree).at_instances_of(variables.Parameter).get() is param
    arrays = selectors.select(tree).at_instances_of(jax.Array)
    assert arrays.get_keypaths() == ((DictKey("layer"), GetAttrKey("left"), GetAttrKey("value")),)
    doubled = arrays.apply(lambda a: a * 2)["layer"].left
    assert isinstance(doubled, variables.Parameter)
    assert doubled.label == "w"
    assert dict(doubled.value.named_shape) == {"a": 2, "b": 3}
    np.testing.assert_array_equal(doubled.value.unwrap("a", "b"), 2 * np.ones((2, 3)))
    rebuilt = selectors.select(tree).at_instances_of(int).set(4)
    assert rebuilt["layer"].left is param


def test_frozen_values_and_slots_are_kept_whole_unless_something_inside_changes():
    # Frozen snapshots and slots are variables too (core.tree_util.is_variable_node): a rebuild
    # that changes nothing inside one hands back that very object, as for live variables.
    from pz_flax.core import named_axes
    from pz_flax.core import variables

    frozen = variables.ParameterValue(value=named_axes.wrap(jnp.ones(2)).tag("a"), label="w")
    slot = variables.ParameterSlot(label="v")
    tree = {"frozen": frozen, "slot": slot, "n": 1}
    rebuilt = selectors.select(tree).at_instances_of(int).set(4)
    assert rebuilt["frozen"] is frozen and rebuilt["slot"] is slot and rebuilt["n"] == 4
    doubled = selectors.select(tree).at_instances_of(jax.Array).apply(lambda a: a * 2)
    assert doubled["frozen"] is not frozen and doubled["frozen"].label == "w"
    np.testing.assert_array_equal(doubled["frozen"].value.unwrap("a"), [2.0, 2.0])
    assert selectors.select(tree).at_instances_of(variables.ParameterSlot).get() is slot
