"""Tests for pz_flax.core.shapecheck.

Most scenarios run twice, once against pz_flax and once against penzai 0.2.5
(the differential oracle), and must agree on the bindings found, or on the
exact error message.
"""

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import penzai.core.named_axes as penzai_nx
import penzai.core.shapecheck as penzai_chk
import pytest
from flax import nnx

from pz_flax.core import named_axes as nx
from pz_flax.core import shapecheck as chk
from pz_flax.core import variables

F32 = jnp.float32


def sds(*shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


def run(build: Callable[[Any, Any], Any], chk_module, nx_module):
    """Runs ``build(chk_module, nx_module)``; returns ("ok", bindings) or ("error", message)."""
    try:
        result = build(chk_module, nx_module)
    except chk_module.StructureMismatchError as error:
        return ("error", str(error))
    return ("ok", list(dict(result).items()))


def assert_same_as_penzai(build: Callable[[Any, Any], Any]):
    """Checks that pz_flax and penzai give the same bindings (in order) or error message."""
    ours = run(build, chk, nx)
    theirs = run(build, penzai_chk, penzai_nx)
    assert ours == theirs
    return ours


# ---------------------------------------------------------------------------
# Differential scenarios.
# ---------------------------------------------------------------------------

DIFFERENTIAL_CASES = {
    "empty": lambda c, n: c.check_structure([], []),
    "equal_non_spec_leaves": lambda c, n: c.check_structure(
        ["q", (4, 5), np.arange(3), {"k": "v"}], ["q", (4, 5), np.arange(3), c.ANY]
    ),
    "unequal_non_spec_leaves": lambda c, n: c.check_structure(
        ["q", (4, 5), np.arange(3), ("x", "y")], ["r", (5, 4), np.arange(1, 4), 7]
    ),
    "plain_arrays": lambda c, n: c.check_structure(
        {"w": sds(2, 3), "b": sds(3)}, {"w": c.ArraySpec(shape=(2, 3)), "b": c.ArraySpec((3,))}
    ),
    "spec_against_subtree": lambda c, n: c.check_structure(
        {"w": sds(2, 3)}, c.ArraySpec(shape=(2, 3))
    ),
    "dtype_and_rank_errors": lambda c, n: c.check_structure(
        {"x": sds(4, 5), "i": sds(2, dtype=jnp.int32), "r": sds(1, 2)},
        {
            "x": c.ArraySpec(shape=(4, 6)),
            "i": c.ArraySpec(shape=(2,), dtype=np.floating),
            "r": c.ArraySpec(shape=(1, 2, 3), dtype=jnp.float32),
        },
    ),
    "concrete_dtype_mismatch": lambda c, n: c.check_structure(
        sds(3, dtype=jnp.bfloat16), c.ArraySpec(shape=(3,), dtype=jnp.float32)
    ),
    "abstract_dtypes_match": lambda c, n: c.check_structure(
        [sds(2, dtype=jnp.int8), sds(2, dtype=jnp.bfloat16), sds(2, dtype=jnp.bool_)],
        [
            c.ArraySpec((2,), np.integer),
            c.ArraySpec((2,), np.floating),
            c.ArraySpec((2,), np.bool_),
        ],
    ),
    "named_arrays": lambda c, n: c.check_structure(
        n.zeros({"batch": 2, "seq": 3, "embed": 4}).untag("embed"),
        c.ArraySpec(shape=(c.var("d"),), named_shape={"batch": 2, "seq": c.var("len")}),
    ),
    "named_shape_errors": lambda c, n: c.check_structure(
        {
            "pos": n.zeros({"a": 2, "b": 3}).untag("b"),
            "int": n.zeros({"a": 2}, dtype=jnp.int32),
            "names": n.zeros({"a": 2, "b": 3, "c": 4}),
        },
        {
            "pos": c.ArraySpec(named_shape={"a": 2}),
            "int": c.ArraySpec(named_shape={"a": 2}, dtype=np.floating),
            "names": c.ArraySpec(named_shape={"a": 2, "b": 3, "d": 5}),
        },
    ),
    "positional_variables": lambda c, n: c.check_structure(
        {
            "p": sds(7, 2, 9),
            "q": sds(2, 5, 5, 6, 1),
            "r": sds(3, 4),
            "s": sds(3, 4),
            "t": sds(8, 8),
            "u": sds(1, 2, 3),
        },
        {
            "p": c.ArraySpec(shape=(c.var("n"), 2, c.var("m"))),
            "q": c.ArraySpec(shape=(2, *c.var("mid"), c.var("last"))),
            "r": c.ArraySpec(shape=(*c.var("lead"), 3, 4)),
            "s": c.ArraySpec(shape=(3, 4, *c.var("trail"))),
            "t": c.ArraySpec(shape=(c.var("sq"), c.var("sq"))),
            "u": c.ArraySpec(shape=c.var("whole")),
        },
    ),
    "positional_conflicts": lambda c, n: c.check_structure(
        {
            "first": sds(2, 9, 3),
            "second": sds(4, 1),
            "unpack": sds(7, 5, 6, 8),
            "reuse": sds(1, 1, 8),
            "short": sds(5, 6, 8),
            "tiny": sds(1, 2),
        },
        {
            "first": c.ArraySpec(shape=(c.var("k"), 9, c.var("k"))),
            "second": c.ArraySpec(shape=(c.var("k"), 1)),
            "unpack": c.ArraySpec(shape=(7, *c.var("xs"), 8)),
            "reuse": c.ArraySpec(shape=(*c.var("xs"), 8)),
            "short": c.ArraySpec(shape=c.var("xs")),
            "tiny": c.ArraySpec(shape=(1, *c.var("t"), 2, 3)),
        },
    ),
    "iterative_unpacking": lambda c, n: c.check_structure(
        {"ab": sds(1, 2, 3, 4, 5), "cbc": sds(6, 3, 4, 5, 6), "c": sds(0, 6, 9)},
        {
            "ab": c.ArraySpec(shape=(*c.var("a"), *c.var("b"))),
            "cbc": c.ArraySpec(shape=(*c.var("c"), *c.var("b"), *c.var("c"))),
            "c": c.ArraySpec(shape=(0, *c.var("c"), 9)),
        },
    ),
    "ambiguous_unpacking": lambda c, n: c.check_structure(
        {"ab": sds(1, 2, 3), "ba": sds(4, 5)},
        {
            "ab": c.ArraySpec(shape=(*c.var("a"), *c.var("b"))),
            "ba": c.ArraySpec(shape=(*c.var("b"), *c.var("a"))),
        },
    ),
    "failure_with_unsolved_rest": lambda c, n: c.check_structure(
        {"ab": sds(1, 2, 3), "bad": sds(1, 2)},
        {
            "ab": c.ArraySpec(shape=(*c.var("a"), *c.var("b"))),
            "bad": c.ArraySpec(shape=(5,)),
        },
    ),
    "named_variables": lambda c, n: c.check_structure(
        {
            "x": c.ArraySpec(named_shape={"batch": 2, "seq": 5, "embed": 8}),
            "y": c.ArraySpec(named_shape={"batch": 2, "heads": 4, "kv": 3, "q": 6}),
            "z": c.ArraySpec(named_shape={"u": 1, "v": 1}),
            "w": c.ArraySpec(named_shape={"u": 1}),
        },
        {
            "x": c.ArraySpec(named_shape={"batch": c.var("b"), "seq": 5, "embed": c.var("e")}),
            "y": c.ArraySpec(named_shape={"batch": c.var("b"), "q": 6, **c.var("rest")}),
            "z": c.ArraySpec(named_shape={**c.var("all")}),
            "w": c.ArraySpec(named_shape={"u": 1, **c.var("none")}),
        },
    ),
    "named_conflicts": lambda c, n: c.check_structure(
        {
            "x": c.ArraySpec(named_shape={"a": 2, "b": 3}),
            "y": c.ArraySpec(named_shape={"a": 4}),
            "g": c.ArraySpec(named_shape={"p": 1, "q": 2, "r": 3}),
            "h": c.ArraySpec(named_shape={"q": 5, "r": 6, "s": 7}),
            "i": c.ArraySpec(named_shape={"q": 5, "r": 6, "s": 7}),
        },
        {
            "x": c.ArraySpec(named_shape={"a": c.var("n"), "b": c.var("n")}),
            "y": c.ArraySpec(named_shape={"a": c.var("n")}),
            "g": c.ArraySpec(named_shape={"p": 1, **c.var("grp")}),
            "h": c.ArraySpec(named_shape={**c.var("grp"), "s": 7}),
            "i": c.ArraySpec(named_shape=c.var("grp")),
        },
    ),
    "named_substitution_key_conflict": lambda c, n: c.check_structure(
        {
            "first": c.ArraySpec(named_shape={"a": 1, "b": 2, "c": 3}),
            "second": c.ArraySpec(named_shape={"a": 1, "b": 2, "c": 3}),
        },
        {
            "first": c.ArraySpec(named_shape={"a": 1, **c.var("rest")}),
            "second": c.ArraySpec(named_shape={"b": 2, **c.var("rest")}),
        },
    ),
    "named_iterative_unpacking": lambda c, n: c.check_structure(
        {
            "xy": c.ArraySpec(named_shape={"a": 1, "b": 2, "c": 3}),
            "zy": c.ArraySpec(named_shape={"c": 3, "d": 4}),
            "z": c.ArraySpec(named_shape={"d": 4}),
        },
        {
            "xy": c.ArraySpec(named_shape={**c.var("x"), **c.var("y")}),
            "zy": c.ArraySpec(named_shape={**c.var("z"), **c.var("y")}),
            "z": c.ArraySpec(named_shape=c.var("z")),
        },
    ),
    "named_ambiguous": lambda c, n: c.check_structure(
        c.ArraySpec(named_shape={"a": 1, "b": 2}),
        c.ArraySpec(named_shape={**c.var("x"), **c.var("y")}),
    ),
    "vars_for_axes": lambda c, n: c.check_structure(
        {
            "x": c.ArraySpec(named_shape={"b": 2, "q": 3, "kv": 4}),
            "y": c.ArraySpec(named_shape={"b": 2, "q": 3, "kv": 4}),
        },
        {
            "x": c.ArraySpec(named_shape={"b": 2, **c.vars_for_axes("h", {"q": 3, "kv": None})}),
            "y": c.ArraySpec(named_shape={"b": 2, **c.vars_for_axes("h2", ["q", "kv"])}),
        },
    ),
    "vars_for_axes_mismatch": lambda c, n: c.check_structure(
        {
            "x": c.ArraySpec(named_shape={"q": 3, "kv": 4}),
            "y": c.ArraySpec(named_shape={"q": 3, "kv": 4}),
            "z": c.ArraySpec(named_shape={"q": 3, "kv": 5}),
        },
        {
            "x": c.ArraySpec(named_shape=c.vars_for_axes("h", {"q": 2, "kv": None})),
            "y": c.ArraySpec(named_shape=c.vars_for_axes("g", ("q", "kv"))),
            "z": c.ArraySpec(named_shape=c.vars_for_axes("g", ("q", "kv"))),
        },
    ),
    "vars_for_axes_consistent_with_unpack": lambda c, n: c.check_structure(
        {
            "x": c.ArraySpec(named_shape={"q": 3, "kv": 4}),
            "y": c.ArraySpec(named_shape={"o": 1, "q": 3, "kv": 4}),
        },
        {
            "x": c.ArraySpec(named_shape=c.vars_for_axes("h", {"q": 3, "kv": None})),
            "y": c.ArraySpec(named_shape={"o": 1, **c.var("h")}),
        },
    ),
    "vars_for_axes_inconsistent_with_unpack": lambda c, n: c.check_structure(
        {
            "x": c.ArraySpec(named_shape={"q": 3, "kv": 4}),
            "y": c.ArraySpec(named_shape={"r": 3, "s": 4}),
        },
        {
            "x": c.ArraySpec(named_shape=c.vars_for_axes("h", {"q": None, "kv": None})),
            "y": c.ArraySpec(named_shape={**c.var("h")}),
        },
    ),
    "positional_index_consistent_with_unpack": lambda c, n: c.check_structure(
        {"x": sds(3, 4), "y": sds(3, 4, 5)},
        {
            "x": c.ArraySpec(shape=c.var("s")),
            "y": c.ArraySpec(shape=(c.var("s")[0], c.var("s")[1], 5)),
        },
    ),
    "wildcards": lambda c, n: c.check_structure(
        {"x": c.ArraySpec(named_shape={"a": 1, "b": 2}), "aux": [sds(1), "anything", 3]},
        {"x": c.ArraySpec(named_shape={**c.var("rest"), "b": 2}), "aux": c.Wildcard("aux")},
    ),
    "non_arraylike_value": lambda c, n: c.check_structure(
        {"x": "not an array"}, {"x": c.ArraySpec(shape=())}
    ),
    "python_scalars": lambda c, n: c.check_structure(
        [3, 2.5, True], [c.ArraySpec((), np.integer), c.ArraySpec((), np.floating), c.ANY]
    ),
    "known_vars_conflict": lambda c, n: c.check_structure(
        sds(5, 6), c.ArraySpec(shape=(c.var("n"), 6)), known_vars={"n": 4}
    ),
    "known_vars_are_kept": lambda c, n: c.check_structure(
        sds(4, 6), c.ArraySpec(shape=(c.var("n"), c.var("m"))), known_vars={"n": 4, "k": 1}
    ),
    "error_prefix": lambda c, n: c.check_structure(
        sds(2), c.ArraySpec(shape=(3,)), error_prefix="While checking the input of Foo: "
    ),
    "error_prefix_unsolvable": lambda c, n: c.check_structure(
        sds(2), c.ArraySpec(shape=(*c.var("a"), *c.var("b"))), error_prefix="[Foo] "
    ),
}


@pytest.mark.parametrize("name", sorted(DIFFERENTIAL_CASES))
def test_matches_penzai(name):
    assert_same_as_penzai(DIFFERENTIAL_CASES[name])


def test_differential_cases_cover_successes_and_failures():
    outcomes = {name: run(case, chk, nx)[0] for name, case in DIFFERENTIAL_CASES.items()}
    assert list(outcomes.values()).count("ok") >= 10
    assert list(outcomes.values()).count("error") >= 10


# ---------------------------------------------------------------------------
# Bindings and error messages, checked directly.
# ---------------------------------------------------------------------------


def test_bindings_of_every_kind():
    result = chk.check_structure(
        {"x": sds(2, 7, 8, 3), "y": nx.zeros({"seq": 5, "h": 2, "kv": 4})},
        {
            "x": chk.ArraySpec(shape=(chk.var("n"), *chk.var("mid"), 3)),
            "y": chk.ArraySpec(
                named_shape={"seq": chk.var("len"), **chk.vars_for_axes("heads", ("h", "kv"))}
            ),
        },
    )
    assert dict(result) == {
        "n": 2,
        "mid": (7, 8),
        "len": 5,
        "heads": {"h": 2, "kv": 4},
    }


def test_conflict_message_names_variable_binding_and_both_places():
    with pytest.raises(chk.StructureMismatchError) as info:
        chk.check_structure(
            {"1_query": nx.zeros({"seq": 5}), "2_key": nx.zeros({"seq": 6})},
            {
                "1_query": chk.ArraySpec(named_shape={"seq": chk.var("len")}),
                "2_key": chk.ArraySpec(named_shape={"seq": chk.var("len")}),
            },
        )
    # Dicts are visited in sorted key order, so `1_query` binds `len` first.
    message = str(info.value)
    assert "At root['2_key']: Named shape mismatch" in message
    assert "Axis 'seq': Size 6 does not match previous size 5 for var('len')" in message
    assert "from root['1_query']" in message


def test_nested_struct_paths_appear_in_errors():
    @dataclasses.dataclass(frozen=True)
    class Pair:
        left: Any
        right: Any

    jax.tree_util.register_dataclass(Pair, data_fields=["left", "right"], meta_fields=[])
    with pytest.raises(
        chk.StructureMismatchError,
        match=r"(?s)At root\.right\[1\]: .*Dim 0: Size 3 .* var\('n'\) from root\.left",
    ):
        chk.check_structure(
            Pair(sds(2), [sds(1), sds(3)]),
            Pair(chk.ArraySpec((chk.var("n"),)), [chk.ANY, chk.ArraySpec((chk.var("n"),))]),
        )


def test_tree_structure_mismatch_is_a_value_error_naming_the_path():
    # JAX words the message differently across releases (jax 0.8: "Dict key mismatch").
    with pytest.raises(ValueError, match=r"symmetric difference|Dict key mismatch"):
        chk.check_structure({"a": sds(1), "b": sds(2)}, {"a": chk.ArraySpec((1,))})


def test_traced_values_compare_unequal_without_crashing():
    def check(x):
        with pytest.raises(chk.StructureMismatchError, match="was not equal"):
            chk.check_structure(x, jnp.zeros(2))
        return x

    jax.jit(check)(jnp.zeros(2))


def test_arrays_of_different_shapes_compare_unequal():
    with pytest.raises(chk.StructureMismatchError, match="was not equal"):
        chk.check_structure(np.zeros(2), np.zeros(3))


def test_single_and_unpacked_use_of_one_name_is_reported():
    with pytest.raises(chk.StructureMismatchError, match=r"\*var\('n'\) stands for several"):
        chk.check_structure(
            [sds(2), sds(2, 3)],
            [chk.ArraySpec((chk.var("n"),)), chk.ArraySpec((*chk.var("n"), 3))],
        )
    with pytest.raises(chk.StructureMismatchError, match=r"\*\*var\('n'\) stands for a group"):
        chk.check_structure(
            [sds(2), chk.ArraySpec(named_shape={"a": 1})],
            [chk.ArraySpec((chk.var("n"),)), chk.ArraySpec(named_shape=chk.var("n"))],
        )


def test_unsupported_shape_entry_is_reported():
    with pytest.raises(chk.StructureMismatchError, match="Unsupported entry 'two'"):
        chk.check_structure(sds(2), chk.ArraySpec(shape=("two",)))


def test_numpy_integer_sizes_are_checked():
    with pytest.raises(chk.StructureMismatchError, match="Actual size 2 does not match expected"):
        chk.check_structure(sds(2), chk.ArraySpec(shape=(np.int64(3),)))
    assert dict(chk.check_structure(sds(3), chk.ArraySpec(shape=(np.int64(3),)))) == {}


def test_unsolvable_listing_with_mixed_variable_kinds():
    with pytest.raises(chk.StructureMismatchError) as info:
        chk.check_structure(
            sds(1, 2, 3), chk.ArraySpec(shape=(*chk.var("a"), chk.var("n"), *chk.var("b")))
        )
    assert "Unsolvable variables: var('a'), var('b'), var('n')" in str(info.value)


# ---------------------------------------------------------------------------
# Variables, results and spec helpers.
# ---------------------------------------------------------------------------


def test_var_and_dimvar_protocol():
    x = chk.var("x")
    assert x == chk.DimVar("x")
    assert list(x) == [chk.MultiDimVar("x")]
    assert (1, *x) == (1, chk.MultiDimVar("x"))
    assert {**x} == {chk.MultiDimVar("x"): chk.RemainingAxisPlaceholder()}
    assert len(x) == 1
    assert x["k"] == chk.DimVar(("x", "k"))
    assert x[0] == chk.DimVar(("x", 0))
    assert sorted([chk.var("b"), chk.var("a")]) == [chk.var("a"), chk.var("b")]
    assert hash(chk.var("a")) == hash(chk.var("a"))


def test_var_errors():
    with pytest.raises(TypeError, match="must be strings"):
        chk.var(3)
    element = chk.var("x")["k"]
    with pytest.raises(TypeError, match="Cannot unpack"):
        list(element)
    with pytest.raises(TypeError, match="Cannot index"):
        element["j"]
    with pytest.raises(KeyError, match="int or str"):
        chk.var("x")[1.5]


def test_vars_for_axes_builds_known_and_unknown_dims():
    assert chk.vars_for_axes("h", {"q": 3, "kv": None}) == {
        "q": chk.KnownDim(("h", "q"), 3),
        "kv": chk.DimVar(("h", "kv")),
    }
    assert chk.vars_for_axes("h", ["a", "b"]) == {
        "a": chk.DimVar(("h", "a")),
        "b": chk.DimVar(("h", "b")),
    }
    assert chk.vars_for_axes("h", ()) == {}
    assert chk.vars_for_axes("h", ["q"]) == penzai_chk_to_ours(penzai_chk.vars_for_axes("h", ["q"]))


def penzai_chk_to_ours(specs):
    """Translates penzai's DimVar/KnownDim objects into ours, for comparisons."""
    translated = {}
    for key, dim in specs.items():
        if isinstance(dim, penzai_chk.KnownDim):
            translated[key] = chk.KnownDim(dim.name, dim.size, dim.from_keypath)
        else:
            translated[key] = chk.DimVar(dim.name)
    return translated


def test_match_result_access():
    result = chk.check_structure(sds(2, 3), chk.ArraySpec((chk.var("n"), chk.var("m"))))
    assert result["n"] == 2
    assert result.m == 3
    assert result["n", "m"] == (2, 3)
    assert len(result) == 2
    assert list(result) == ["n", "m"]
    assert dict(result) == {"n": 2, "m": 3}
    with pytest.raises(KeyError):
        result["missing"]
    with pytest.raises(AttributeError, match="missing"):
        _ = result.missing
    # A result is valid known_vars for a later check.
    later = chk.check_structure(sds(2, 5), chk.ArraySpec((chk.var("n"), 5)), known_vars=result)
    assert dict(later) == {"n": 2, "m": 3}


def test_match_result_copies_and_compares():
    import copy

    result = chk.check_structure(sds(4), chk.ArraySpec((chk.var("n"),)))
    assert copy.deepcopy(result) == result
    assert copy.copy(result).n == 4


def test_array_spec_is_a_pytree_node_without_leaves():
    spec = chk.ArraySpec(shape=(2, chk.var("n")), named_shape={"a": 3}, dtype=jnp.int32)
    assert jax.tree_util.tree_leaves({"s": spec, "w": chk.ANY}) == []
    rebuilt = jax.tree_util.tree_map(lambda x: x, spec)
    assert rebuilt == spec
    assert spec.positional_shape == (2, chk.var("n"))


def test_floating_named():
    spec = chk.ArraySpec.floating_named({"a": 3})
    assert spec == chk.ArraySpec(named_shape={"a": 3}, dtype=np.floating)


def test_into_pytree():
    plain = chk.ArraySpec(shape=(1, 2), dtype=jnp.float32).into_pytree()
    assert plain == jax.ShapeDtypeStruct((1, 2), jnp.float32)
    named = chk.ArraySpec(shape=(1,), named_shape={"b": 4, "a": 3}, dtype=jnp.int32).into_pytree()
    assert isinstance(named, nx.NamedArray)
    assert named.named_axes == collections.OrderedDict([("b", 4), ("a", 3)])
    assert named.data_array == jax.ShapeDtypeStruct((1, 4, 3), jnp.int32)
    known = chk.ArraySpec(
        named_shape=chk.vars_for_axes("h", {"q": 2}), dtype=jnp.float32
    ).into_pytree()
    assert known.named_axes == collections.OrderedDict([("q", 2)])
    specs = [
        chk.ArraySpec(shape=(1, 2, 3), dtype=jnp.float32),
        chk.ArraySpec(named_shape={"foo": 4, "bar": 5}, dtype=jnp.int32),
        chk.ArraySpec(shape=(2,), named_shape={"foo": 4}, dtype=jnp.bool_),
    ]
    chk.check_structure([spec.into_pytree() for spec in specs], specs)


@pytest.mark.parametrize(
    ("spec", "shown"),
    [
        (chk.ArraySpec(shape=(chk.var("n"),)), "var('n')"),
        (chk.ArraySpec(shape=(2, *chk.var("n"))), "*var('n')"),
        (chk.ArraySpec(named_shape={"a": chk.var("n")}), "'a': var('n')"),
        (chk.ArraySpec(named_shape={"a": 1, **chk.var("rest")}), "**var('rest')"),
    ],
)
def test_into_pytree_rejects_variables(spec, shown):
    with pytest.raises(ValueError) as info:
        spec.into_pytree()
    assert str(info.value).endswith(f"variable dimensions; found {shown}.")


def test_as_array_structure():
    tree = {
        "x": jnp.zeros((2, 3), jnp.float32),
        "n": nx.zeros({"a": 2, "b": 3}, dtype=jnp.int32).untag("b"),
        "np": np.zeros(4, np.int16),
        "scalar": 1.5,
        "label": "hello",
        "spec": chk.ArraySpec(shape=(7,)),
    }
    structure = chk.as_array_structure(tree)
    assert structure == {
        "x": chk.ArraySpec(shape=(2, 3), dtype=jnp.float32),
        "n": chk.ArraySpec(shape=(3,), named_shape={"a": 2}, dtype=jnp.int32),
        "np": chk.ArraySpec(shape=(4,), dtype=np.int16),
        "scalar": chk.ArraySpec(shape=(), dtype=jnp.result_type(1.5)),
        "label": chk.ANY,
        "spec": chk.ArraySpec(shape=(7,)),
    }
    assert dict(chk.check_structure(tree, structure)) == {}


def test_as_array_structure_matches_penzai():
    def build(c, n):
        return c.as_array_structure(
            {"x": n.wrap(jnp.ones((2, 3))).tag("a", "b"), "s": 3, "o": "text"}
        )

    ours, theirs = build(chk, nx), build(penzai_chk, penzai_nx)
    assert set(ours) == set(theirs)
    for key in ours:
        if isinstance(theirs[key], penzai_chk.ArraySpec):
            assert ours[key].shape == theirs[key].shape
            assert dict(ours[key].named_shape) == dict(theirs[key].named_shape)
            assert ours[key].dtype == theirs[key].dtype
        else:
            assert ours[key] is chk.ANY


def test_parameters_are_checked_with_their_axis_names():
    param = variables.Parameter(value=nx.wrap(jnp.ones((2, 3))).tag("in", "out"), label="w")
    result = chk.check_structure(
        {"w": param}, {"w": chk.ArraySpec(named_shape={"in": 2, "out": chk.var("out")})}
    )
    assert dict(result) == {"out": 3}
    structure = chk.as_array_structure({"w": param, "plain": nnx.Param(jnp.zeros(4))})
    assert structure == {
        "w": chk.ArraySpec(named_shape={"in": 2, "out": 3}, dtype=jnp.float32),
        "plain": chk.ArraySpec(shape=(4,), dtype=jnp.float32),
    }


def test_frozen_values_and_slots_are_described_field_by_field_like_penzai():
    import penzai.core.variables as penzai_variables

    def build(c, n, v):
        value = v.ParameterValue(value=n.wrap(jnp.ones((2, 3))).tag("a", "b"), label="w")
        return (
            value,
            v.ParameterSlot(label="s"),
            c.as_array_structure({"v": value, "s": v.ParameterSlot(label="s")}),
        )

    ours_value, ours_slot, ours = build(chk, nx, variables)
    _, _, theirs = build(penzai_chk, penzai_nx, penzai_variables)
    assert type(ours["v"]) is variables.ParameterValue and ours["v"].label == "w"
    assert type(theirs["v"]) is penzai_variables.ParameterValue
    assert ours["v"].value == chk.ArraySpec(named_shape={"a": 2, "b": 3}, dtype=jnp.float32)
    assert dict(theirs["v"].value.named_shape) == dict(ours["v"].value.named_shape)
    assert ours["s"] == ours_slot and theirs["s"] == penzai_variables.ParameterSlot(label="s")
    assert dict(chk.check_structure({"v": ours_value, "s": ours_slot}, ours)) == {}
    with pytest.raises(chk.StructureMismatchError, match="non-arraylike"):
        chk.check_structure(ours_value, chk.ArraySpec(named_shape={"a": 2, "b": 3}))


def test_invalid_named_array_is_reported():
    broken = nx.NamedArray(named_axes=collections.OrderedDict({"a": 5}), data_array=jnp.zeros((3,)))
    with pytest.raises(ValueError):
        chk.check_structure(broken, chk.ArraySpec(named_shape={"a": 5}))


# ---------------------------------------------------------------------------
# Dimension-variable substitution.
# ---------------------------------------------------------------------------


def _structure_with_every_variable_kind(c):
    return {
        "a": c.ArraySpec(shape=(1, c.var("a"))),
        "b": c.ArraySpec(shape=(3, *c.var("b"))),
        "c": c.ArraySpec(named_shape={"foo": 4, "bar": c.var("c")}),
        "d": c.ArraySpec(named_shape={"foo": 4, **c.var("d")}),
        "e": c.ArraySpec(named_shape={"w": 1, **c.vars_for_axes("e", {"x": 2, "y": None})}),
        "f": [c.ArraySpec(shape=(3, *c.var("b"))), "not a spec"],
    }


def test_get_dimension_variables():
    found = chk.get_dimension_variables(_structure_with_every_variable_kind(chk))
    assert found == chk.DimensionVariableSubstitution(
        size_variables={"a": chk.var("a"), "c": chk.var("c"), ("e", "y"): chk.var("e")["y"]},
        sequence_variables={"b": (*chk.var("b"),)},
        mapping_variables={"d": {**chk.var("d")}},
    )
    assert not found.is_empty()
    assert chk.get_dimension_variables({"x": chk.ArraySpec(shape=(1,))}).is_empty()

    theirs = penzai_chk.get_dimension_variables(_structure_with_every_variable_kind(penzai_chk))
    assert list(found.size_variables) == list(theirs.size_variables)
    assert list(found.sequence_variables) == list(theirs.sequence_variables)
    assert list(found.mapping_variables) == list(theirs.mapping_variables)


def test_identity_substitution_only_strips_known_dims():
    structure = _structure_with_every_variable_kind(chk)
    same = chk.full_substitute_dimension_variables(
        structure, chk.get_dimension_variables(structure)
    )
    assert same["a"] == structure["a"]
    assert same["d"] == structure["d"]
    assert same["e"] == chk.ArraySpec(named_shape={"w": 1, "x": 2, "y": chk.var("e")["y"]})


def test_full_substitution():
    substitution = chk.DimensionVariableSubstitution(
        size_variables={"a": 10, "c": 13, ("e", "y"): 16},
        sequence_variables={"b": (11, 12)},
        mapping_variables={"d": {"bar": 14, "baz": 15}},
    )
    result = chk.full_substitute_dimension_variables(
        _structure_with_every_variable_kind(chk), substitution
    )
    assert result == {
        "a": chk.ArraySpec(shape=(1, 10)),
        "b": chk.ArraySpec(shape=(3, 11, 12)),
        "c": chk.ArraySpec(named_shape={"foo": 4, "bar": 13}),
        "d": chk.ArraySpec(named_shape={"foo": 4, "bar": 14, "baz": 15}),
        "e": chk.ArraySpec(named_shape={"w": 1, "x": 2, "y": 16}),
        "f": [chk.ArraySpec(shape=(3, 11, 12)), "not a spec"],
    }


def test_substitution_can_rename_variables():
    renamed = chk.full_substitute_dimension_variables(
        chk.ArraySpec(shape=(chk.var("n"),), named_shape={**chk.var("rest")}),
        chk.DimensionVariableSubstitution(
            size_variables={"n": chk.var("m")},
            sequence_variables={},
            mapping_variables={"rest": {"extra": 1, **chk.var("other")}},
        ),
    )
    assert renamed == chk.ArraySpec(
        shape=(chk.var("m"),), named_shape={"extra": 1, **chk.var("other")}
    )


def test_substitution_errors():
    with pytest.raises(KeyError, match=r"No substitution for var\('n'\).*root\['x'\]"):
        chk.full_substitute_dimension_variables(
            {"x": chk.ArraySpec(shape=(chk.var("n"),))},
            chk.DimensionVariableSubstitution({}, {}, {}),
        )
    with pytest.raises(ValueError, match=r"Key conflict .* var\('d'\) at root: name foo"):
        chk.full_substitute_dimension_variables(
            chk.ArraySpec(named_shape={"foo": 1, **chk.var("d")}),
            chk.DimensionVariableSubstitution({}, {}, {"d": {"foo": 2}}),
        )
