"""Tests for pz_flax.core.auto_order_types."""

import dataclasses

import jax
import pytest
from penzai.core import auto_order_types as penzai_auto_order_types

from pz_flax.core import auto_order_types


@dataclasses.dataclass(frozen=True)
class Step(auto_order_types.AutoOrderedAcrossTypes):
    index: int
    phase: str = "train"


@dataclasses.dataclass(frozen=True)
class Tag(auto_order_types.AutoOrderedAcrossTypes):
    name: str
    note: str = dataclasses.field(default="", compare=False)


def test_same_type_orders_like_a_tuple_of_its_fields():
    assert Step(1) < Step(2)
    assert Step(1, "eval") < Step(1, "train")
    assert Step(3) > Step(2, "zzz")
    assert Step(2) <= Step(2)
    assert Step(2) >= Step(2)
    assert not Step(2) < Step(2)
    assert sorted([Step(3), Step(1), Step(2, "a")]) == [Step(1), Step(2, "a"), Step(3)]


def test_fields_excluded_from_comparison_do_not_affect_order():
    assert Tag("a", note="zzz") <= Tag("a", note="aaa")
    assert Tag("a", note="zzz") >= Tag("a", note="aaa")
    assert not Tag("a", note="zzz") < Tag("a", note="aaa")


def test_different_types_never_interleave():
    steps = [Step(i) for i in range(3)]
    tags = [Tag(name) for name in "abc"]
    ordered = sorted(steps + tags)
    kinds = [type(item) for item in ordered]
    # All of one type come first, then all of the other, each sorted internally.
    assert kinds in ([Step] * 3 + [Tag] * 3, [Tag] * 3 + [Step] * 3)
    assert [item for item in ordered if isinstance(item, Step)] == steps
    assert [item for item in ordered if isinstance(item, Tag)] == tags
    step_first = Step(0) < Tag("a")
    assert all((step < tag) == step_first for step in steps for tag in tags)
    assert all((step > tag) == (not step_first) for step in steps for tag in tags)


@pytest.mark.parametrize("plain", ["zzz", "", ("a", 1), ()])
def test_instances_sort_after_strings_and_tuples(plain):
    assert Step(0) > plain
    assert Step(0) >= plain
    assert not Step(0) < plain
    assert not Step(0) <= plain
    # Python reflects the comparison when the string/tuple is on the left.
    assert plain < Step(0)
    assert plain <= Step(0)


def test_comparison_with_unrelated_types_is_refused():
    with pytest.raises(TypeError):
        _ = Step(0) < 3
    with pytest.raises(TypeError):
        _ = Step(0) >= 1.5


def test_mixed_keys_survive_jax_tree_operations():
    keys = [Step(1), "loss", Tag("x"), Step(0), "acc", Tag("a")]
    tree = {key: index for index, key in enumerate(keys)}
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    assert sorted(leaves) == list(range(len(keys)))
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt == tree
    doubled = jax.jit(lambda t: jax.tree_util.tree_map(lambda v: v * 2, t))(tree)
    assert {key: int(value) for key, value in doubled.items()} == {
        key: 2 * value for key, value in tree.items()
    }


def test_non_dataclass_subclass_reports_the_mistake():
    class NotADataclass(auto_order_types.AutoOrderedAcrossTypes):
        pass

    with pytest.raises(TypeError, match=r"NotADataclass.*not a dataclass"):
        _ = NotADataclass() < NotADataclass()


def test_matches_penzai_on_every_comparison():
    @dataclasses.dataclass(frozen=True)
    class Ours(auto_order_types.AutoOrderedAcrossTypes):
        value: int

    @dataclasses.dataclass(frozen=True)
    class Theirs(penzai_auto_order_types.AutoOrderedAcrossTypes):
        value: int

    plain = ["a", "zz", ("t",), ()]
    for wrap, base in ((Ours, auto_order_types), (Theirs, penzai_auto_order_types)):
        assert issubclass(wrap, base.AutoOrderedAcrossTypes)

    def outcomes(wrap):
        items = [wrap(1), wrap(2), *plain]
        results = []
        for left in items:
            for right in items:
                if not (isinstance(left, wrap) or isinstance(right, wrap)):
                    continue
                results.append((left < right, left <= right, left > right, left >= right))
        return results

    assert outcomes(Ours) == outcomes(Theirs)
