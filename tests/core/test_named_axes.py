"""Tests for pz_flax.core.named_axes (``pz.nx``).

Most behavioural tests are differential: the same computation runs through penzai 0.2.5's
``penzai.core.named_axes`` (the oracle) and through ``pz_flax``, and the results must agree
in class, storage layout (hence pytree structure), named/positional shape and values.
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import penzai.core.named_axes as penzai_nx
import penzai.core.syntactic_sugar as penzai_sugar
import pytest

from pz_flax.core import named_axes as nx
from pz_flax.core import struct
from pz_flax.core import syntactic_sugar

MODULES = {"pz_flax": (nx, syntactic_sugar.slice), "penzai": (penzai_nx, penzai_sugar.slice)}


def layout_signature(array):
    """Class, static layout and data of a named array from either library."""
    if type(array).__name__ == "NamedArray":
        layout = ("NamedArray", tuple(array.named_axes.items()))
    else:
        assert type(array).__name__ == "NamedArrayView"
        layout = (
            "NamedArrayView",
            tuple(array.data_shape),
            tuple(array.data_axis_for_logical_axis),
            tuple(array.data_axis_for_name.items()),
        )
    data = array.data_array
    if jax.dtypes.issubdtype(data.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(data)
    return layout, np.asarray(data).dtype, np.asarray(data)


def assert_same_as_penzai(build):
    """Runs ``build(nx_module, slice)`` with both libraries and compares everything."""
    ours = build(*MODULES["pz_flax"])
    theirs = build(*MODULES["penzai"])
    if isinstance(theirs, list | tuple):
        assert len(ours) == len(theirs)
        pairs = list(zip(ours, theirs))
    else:
        pairs = [(ours, theirs)]
    for mine, reference in pairs:
        assert isinstance(mine, nx.NamedArrayBase)
        mine.check_valid()
        my_layout, my_dtype, my_data = layout_signature(mine)
        ref_layout, ref_dtype, ref_data = layout_signature(reference)
        assert my_layout == ref_layout
        assert my_dtype == ref_dtype
        np.testing.assert_allclose(my_data, ref_data, rtol=1e-6, atol=1e-6)
        assert dict(mine.named_shape) == dict(reference.named_shape)
        assert mine.positional_shape == reference.positional_shape
    return ours


DATA = jnp.arange(2 * 3 * 5).reshape((2, 3, 5))
FLOAT_DATA = jnp.linspace(-1.0, 2.0, 2 * 3 * 5).reshape((2, 3, 5))


# ---------------------------------------------------------------------------------------------
# Construction, tag/untag and layout
# ---------------------------------------------------------------------------------------------


def test_wrap_keeps_array_positional_and_shares_data():
    named = nx.wrap(DATA)
    assert named.positional_shape == (2, 3, 5)
    assert named.named_shape == {}
    assert named.dtype == np.int32
    assert named.unwrap() is DATA
    # ``==`` is elementwise (as in penzai), not a structural comparison.
    equal = named == nx.wrap(DATA)
    assert isinstance(equal, nx.NamedArrayBase)
    assert bool(equal.unwrap().all())


def test_wrap_converts_numpy_and_python_data_to_jax_arrays():
    for data in (np.arange(6, dtype=np.int32).reshape(2, 3), [[1.0, 2.0], [3.0, 4.0]], 2.5):
        wrapped = nx.wrap(data)
        assert isinstance(wrapped.unwrap(), jax.Array)
        np.testing.assert_array_equal(wrapped.unwrap(), np.asarray(data))
    # Inside a trace the tracer itself is kept.
    kept = []
    jax.jit(lambda x: kept.append(nx.wrap(x).unwrap() is x))(jnp.ones(3))
    assert kept == [True]


def test_wrap_with_names_equals_tag():
    named = nx.wrap(DATA, "foo", "bar", "baz")
    assert named.named_axes == collections.OrderedDict(foo=2, bar=3, baz=5)
    assert named.positional_shape == ()
    assert named.data_array is DATA


def test_constructor_fields_match_penzai():
    named = nx.NamedArray(named_axes=collections.OrderedDict(a=3), data_array=jnp.zeros((2, 3)))
    named.check_valid()
    assert named.positional_shape == (2,)
    view = nx.NamedArrayView(
        data_shape=(2, 3),
        data_axis_for_logical_axis=(1,),
        data_axis_for_name={"a": 0},
        data_array=jnp.zeros((2, 3)),
    )
    view.check_valid()
    assert view.positional_shape == (3,)
    assert view.named_shape == {"a": 2}


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda m, s: m.wrap(DATA).tag("foo", "bar", "baz"), id="tag"),
        pytest.param(lambda m, s: m.wrap(DATA).tag("foo", "bar", "baz").untag("bar"), id="untag"),
        pytest.param(lambda m, s: m.wrap(DATA).tag("a", "b", "c").untag(), id="untag_nothing"),
        pytest.param(
            lambda m, s: m.wrap(DATA).tag("a", "b", "c").untag("b", "a").tag("b2", "a2"),
            id="untag_then_tag",
        ),
        pytest.param(
            lambda m, s: m.wrap(DATA).tag("a", "b", "c").untag("b", "a").with_positional_prefix(),
            id="with_positional_prefix",
        ),
        pytest.param(
            lambda m, s: m.wrap(DATA).tag("a", "b", "c").untag("c").untag_prefix("a"),
            id="untag_prefix",
        ),
        pytest.param(
            lambda m, s: m.wrap(DATA).tag("a", "b", "c").untag("c", "a").tag_prefix("z"),
            id="tag_prefix_partial",
        ),
        pytest.param(
            lambda m, s: m.wrap(DATA).tag("a", "b", "c").untag("c", "a").tag_prefix("z", "y"),
            id="tag_prefix_all",
        ),
        pytest.param(lambda m, s: m.wrap(DATA).tag_prefix("a").untag_prefix(), id="prefix_noop"),
        pytest.param(
            lambda m, s: m.wrap(DATA).tag("a", "b", "c").untag("b").untag_prefix(),
            id="view_untag_prefix_nothing",
        ),
        pytest.param(lambda m, s: m.wrap(DATA).tag("a", "b", "c").untag_prefix(), id="all_named"),
        pytest.param(
            lambda m, s: m.wrap(DATA).tag("a", "b", "c").untag("b").order_as("c", "a"),
            id="order_as",
        ),
        pytest.param(
            lambda m, s: m.wrap(DATA).tag("c", "a", "b").canonicalize(), id="canonicalize"
        ),
        pytest.param(
            lambda m, s: m.wrap(DATA).tag("a", "b", "c").untag("c").as_namedarrayview(),
            id="view_as_view",
        ),
        pytest.param(lambda m, s: m.wrap(DATA).tag_prefix("a").as_namedarrayview(), id="as_view"),
    ],
)
def test_name_manipulation_matches_penzai(build):
    assert_same_as_penzai(build)


def test_untag_then_tag_roundtrip_keeps_data_untouched():
    named = nx.wrap(DATA).tag("foo", "bar", "baz").untag("bar", "foo").tag("bar2", "foo2")
    assert named.named_axes == collections.OrderedDict(foo2=2, bar2=3, baz=5)
    assert named.data_array is DATA
    assert named.tag() is named


def test_unwrap_orders_axes_by_name():
    named = nx.wrap(DATA).tag("a", "b", "c")
    np.testing.assert_array_equal(named.unwrap("b", "a", "c"), DATA.transpose(1, 0, 2))
    assert named.untag("a", "b", "c").unwrap() is DATA
    view = named.untag("c", "a", "b")
    np.testing.assert_array_equal(view.unwrap(), DATA.transpose(2, 0, 1))


def test_unwrap_errors():
    named = nx.wrap(DATA).tag("a", "b", "c")
    with pytest.raises(ValueError, match=re.escape("Named shape: {'a': 2, 'b': 3, 'c': 5}")):
        named.unwrap()
    with pytest.raises(ValueError, match=r"Unassigned names: \{'c': 5\}"):
        named.unwrap("a", "b")
    with pytest.raises(ValueError, match=r"already has a positional shape: \(3,\)"):
        named.untag("b").unwrap("a")
    with pytest.raises(ValueError, match="nonempty named shape"):
        named.untag("b").unwrap()


def test_untag_errors_name_the_problem():
    named = nx.wrap(DATA).tag("a", "b", "c")
    with pytest.raises(ValueError, match=re.escape("already has positional axes")):
        named.untag("b").untag("a")
    with pytest.raises(ValueError, match=re.escape("Repeats in `axis_order` are not allowed")):
        named.untag("b", "c", "b")
    with pytest.raises(
        ValueError,
        match=re.escape("Requested axis names {'bad'} are not present in the array.")
        + ".*'a': 2, 'b': 3, 'c': 5",
    ):
        named.untag("b", "c", "bad")
    with pytest.raises(ValueError, match="'zzz'"):
        named.untag("b").untag_prefix("zzz")


def test_tag_errors_name_the_problem():
    named = nx.wrap(DATA)
    with pytest.raises(
        ValueError,
        match=re.escape("There must be exactly as many names given to `tag`")
        + r".*4 names.*\(2, 3, 5\)",
    ):
        named.tag("a", "b", "c", "d")
    with pytest.raises(ValueError, match=r"Repeated axis names are not allowed.*\['foo'\]"):
        named.tag("foo", "bar", "foo")
    with pytest.raises(ValueError, match=r"Repeated axis names are not allowed.*\['foo'\]"):
        named.tag("foo", "bar", "baz").untag("bar").tag("foo")
    with pytest.raises(ValueError, match=r"Integers are not allowed as axis names.*\[3\]"):
        named.tag("foo", "bar", 3)
    with pytest.raises(ValueError, match=r"3 names.*only 2 positional axes"):
        nx.wrap(jnp.zeros((2, 3))).tag_prefix("a", "b", "c")
    with pytest.raises(ValueError, match="Repeated axis names"):
        nx.wrap(jnp.zeros((2, 3))).tag_prefix("a").tag_prefix("a")
    with pytest.raises(ValueError, match="Integers are not allowed"):
        nx.wrap(jnp.zeros((2, 3))).tag_prefix(0)


def test_order_as_errors():
    named = nx.wrap(DATA).tag("a", "b", "c")
    with pytest.raises(ValueError, match=r"\['c'\] are missing"):
        named.order_as("a", "b")
    with pytest.raises(ValueError, match="not present"):
        named.order_as("a", "b", "x")
    with pytest.raises(ValueError, match="Repeats"):
        named.order_as("a", "b", "b")


def test_invalid_named_array_is_rejected_by_check_valid():
    with pytest.raises(ValueError, match="must contain a jax or numpy array"):
        nx.NamedArray(named_axes=collections.OrderedDict(), data_array=5).check_valid()
    with pytest.raises(ValueError, match="ordered dictionary"):
        nx.NamedArray(named_axes=None, data_array=jnp.arange(5)).check_valid()
    with pytest.raises(ValueError, match="ordered dictionary"):
        nx.NamedArray(
            named_axes=collections.OrderedDict(foo="five"), data_array=jnp.arange(5)
        ).check_valid()
    with pytest.raises(ValueError, match=r"\(1, 2\).*not a suffix of \(4, 2\)"):
        nx.NamedArray(
            named_axes=collections.OrderedDict(a=1, b=2), data_array=jnp.zeros([4, 2])
        ).check_valid()
    with pytest.raises(ValueError, match="Integers are not allowed"):
        nx.NamedArray(
            named_axes=collections.OrderedDict({0: 4}), data_array=jnp.zeros([4])
        ).check_valid()
    # Operations refuse inconsistent arrays with the same error instead of misbehaving.
    broken = nx.NamedArray(named_axes=collections.OrderedDict(a=3), data_array=jnp.zeros([4]))
    with pytest.raises(ValueError, match="not a suffix"):
        broken.untag("a")
    with pytest.raises(ValueError, match="not a suffix"):
        _ = broken + 1


def test_invalid_view_is_rejected_by_check_valid():
    with pytest.raises(ValueError, match="must contain a jax or numpy array"):
        nx.NamedArrayView(
            data_array=5, data_shape=(), data_axis_for_logical_axis=(), data_axis_for_name={}
        ).check_valid()
    with pytest.raises(ValueError, match=r"Expected data_array to have shape \(3, 4\)"):
        nx.NamedArrayView(
            data_array=jnp.zeros([2, 3]),
            data_shape=(3, 4),
            data_axis_for_logical_axis=(1, 0),
            data_axis_for_name={},
        ).check_valid()
    bad_indices = nx.NamedArrayView(
        data_array=jnp.zeros([2, 3, 4]),
        data_shape=(2, 3, 4),
        data_axis_for_logical_axis=(0, 1, 0),
        data_axis_for_name={"foo": 2, "bar": 1},
    )
    with pytest.raises(ValueError, match="must appear exactly once"):
        bad_indices.check_valid()
    with pytest.raises(ValueError, match="must appear exactly once"):
        bad_indices.with_positional_prefix()
    with pytest.raises(ValueError, match="Integers are not allowed"):
        nx.NamedArrayView(
            data_array=jnp.zeros([2]),
            data_shape=(2,),
            data_axis_for_logical_axis=(),
            data_axis_for_name={1: 0},
        ).check_valid()


def test_tmp_pos_axis_markers_are_unique_names():
    first, second = nx.TmpPosAxisMarker(), nx.TmpPosAxisMarker()
    assert first != second
    named = nx.wrap(jnp.zeros((2, 3))).tag(first, second)
    assert list(named.named_shape) == [first, second]


def test_named_arrays_are_pytrees_with_static_names():
    named = nx.wrap(DATA).tag("a", "b", "c").untag("b")
    leaves, treedef = jax.tree_util.tree_flatten(named)
    assert leaves == [DATA]
    rebuilt = jax.tree_util.tree_unflatten(treedef, [DATA + 1])
    assert isinstance(rebuilt, nx.NamedArrayView)
    assert rebuilt.named_shape == named.named_shape
    # The storage order of names is part of the structure, as in penzai.
    other_order = nx.wrap(DATA.transpose(1, 0, 2)).tag("b", "a", "c")
    assert jax.tree_util.tree_structure(nx.wrap(DATA).tag("a", "b", "c")) != (
        jax.tree_util.tree_structure(other_order)
    )
    assert struct.is_pytree_dataclass_type(nx.NamedArray)
    assert struct.is_pytree_dataclass_type(nx.NamedArrayView)


def test_is_namedarray():
    assert nx.is_namedarray(nx.wrap(1.0))
    assert nx.is_namedarray(nx.wrap(DATA).tag_prefix("a"))
    assert not nx.is_namedarray(DATA)


# ---------------------------------------------------------------------------------------------
# nmap
# ---------------------------------------------------------------------------------------------


def test_nmap_passes_positional_slices_and_other_arguments_through():
    seen = {}

    def inspect_and_combine(first, label, structure, second, plain):
        seen["shapes"] = (first.shape, structure["scalar"].shape, second.shape, plain.shape)
        seen["label"] = label
        seen["number"] = structure["number"]
        return first[:3] + second[0, :] + plain[:3]

    def build(m, s):
        return m.nmap(inspect_and_combine)(
            m.wrap(DATA).tag("foo", "bar", "baz").untag("baz"),
            "a string",
            structure={"scalar": m.wrap(jnp.arange(2)).tag("foo"), "number": 3},
            second=m.wrap(100 * jnp.ones((3, 2, 3, 4)))
            .tag("bar", "baz", "d1", "d2")
            .untag("d2", "d1"),
            plain=jnp.ones((7,)),
        )

    result = assert_same_as_penzai(build)
    assert seen == {"shapes": ((5,), (), (4, 3), (7,)), "label": "a string", "number": 3}
    assert result.named_shape == {"foo": 2, "bar": 3, "baz": 2}
    assert result.positional_shape == (3,)


def test_nmap_without_named_arguments_wraps_outputs():
    result = assert_same_as_penzai(lambda m, s: m.nmap(jnp.add)(jnp.ones(3), 2.0))
    assert result.named_shape == {}
    assert result.positional_shape == (3,)
    np.testing.assert_array_equal(result.unwrap(), 3 * np.ones(3))


def test_nmap_returns_pytrees_of_named_arrays():
    def split_halves(x):
        return {"low": x[:2], "high": (x[2:], x.sum())}

    result = nx.nmap(split_halves)(nx.wrap(FLOAT_DATA).tag("a", "b", "c").untag("c"))
    assert result["low"].positional_shape == (2,)
    assert result["high"][0].positional_shape == (3,)
    assert isinstance(result["high"][1], nx.NamedArray)
    assert result["high"][1].named_shape == {"a": 2, "b": 3}


def test_nmap_inconsistent_sizes_error_names_axes_and_sizes():
    left = nx.wrap(jnp.zeros((2, 3))).tag("batch", "features")
    right = nx.wrap(jnp.zeros((4, 3))).tag("batch", "features")
    with pytest.raises(ValueError) as info:
        nx.nmap(jnp.add)(left, y=right)
    message = str(info.value)
    assert "['batch']" in message
    assert "2 in args[0]" in message
    assert "4 in kwargs['y']" in message
    # The fast operator path reports the same way.
    with pytest.raises(ValueError, match=r"'batch': 2 in args\[0\], 4 in args\[1\]"):
        _ = left + right


def test_nmap_exposes_named_axes_to_collectives():
    values = nx.wrap(jnp.arange(6.0).reshape(2, 3)).tag("a", "b")
    normalized = nx.nmap(lambda x: x / jax.lax.psum(x, "b"))(values)
    np.testing.assert_allclose(
        normalized.unwrap("a", "b"),
        np.arange(6.0).reshape(2, 3) / np.arange(6.0).reshape(2, 3).sum(1, keepdims=True),
    )


def test_nmap_preserves_docs_and_name():
    lifted = nx.nmap(jnp.sum)
    assert lifted.__name__ == "sum"
    assert "Named-axis version of `sum`" in lifted.__doc__


def _softmax_attention_like(queries, keys):
    scores = nx.nmap(jnp.dot)(queries.untag("embed"), keys.untag("embed"))
    return nx.nmap(jax.nn.softmax)(scores.untag("kv")).tag("kv")


QUERIES = nx.wrap(jnp.linspace(0, 1, 2 * 3 * 4).reshape(2, 3, 4)).tag("batch", "seq", "embed")
KEYS = nx.wrap(jnp.linspace(1, 0, 2 * 5 * 4).reshape(2, 5, 4)).tag("batch", "kv", "embed")


def _reference_attention():
    scores = np.einsum(
        "bse,bke->bsk", QUERIES.unwrap("batch", "seq", "embed"), KEYS.unwrap("batch", "kv", "embed")
    )
    return jax.nn.softmax(scores, axis=-1)


def test_nmap_under_jit():
    @jax.jit
    def attention(queries, keys):
        return _softmax_attention_like(queries, keys)

    result = attention(QUERIES, KEYS)
    np.testing.assert_allclose(
        result.unwrap("batch", "seq", "kv"), _reference_attention(), rtol=1e-6
    )


def test_nmap_under_grad():
    def loss(queries):
        return (
            _softmax_attention_like(queries, KEYS).untag("kv")[0].sum().unwrap("batch", "seq").sum()
        )

    def reference_loss(queries):
        scores = jnp.einsum("bse,bke->bsk", queries, KEYS.unwrap("batch", "kv", "embed"))
        return jax.nn.softmax(scores, axis=-1)[..., 0].sum()

    grads = jax.grad(loss)(QUERIES)
    assert isinstance(grads, nx.NamedArray)
    np.testing.assert_allclose(
        grads.unwrap("batch", "seq", "embed"),
        jax.grad(reference_loss)(QUERIES.unwrap("batch", "seq", "embed")),
        rtol=1e-5,
        atol=1e-7,
    )


def test_nmap_under_vmap():
    def attention_on_positional(raw_queries):
        queries = nx.wrap(raw_queries).tag("batch", "seq", "embed")
        return _softmax_attention_like(queries, KEYS).unwrap("batch", "seq", "kv")

    stacked = jnp.stack([QUERIES.unwrap("batch", "seq", "embed")] * 2)
    result = jax.vmap(attention_on_positional)(stacked)
    np.testing.assert_allclose(result[1], _reference_attention(), rtol=1e-6)


def test_nmap_inside_lax_scan():
    def step(total, raw_queries):
        queries = nx.wrap(raw_queries).tag("batch", "seq", "embed")
        weights = _softmax_attention_like(queries, KEYS)
        return total + weights.unwrap("batch", "seq", "kv"), None

    stacked = jnp.stack([QUERIES.unwrap("batch", "seq", "embed")] * 3)
    total, _ = jax.lax.scan(step, jnp.zeros((2, 3, 5)), stacked)
    np.testing.assert_allclose(total, 3 * _reference_attention(), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Operators and array methods
# ---------------------------------------------------------------------------------------------


def _a(m):
    return m.wrap(DATA).tag("foo", "bar", "baz")


def _b(m):
    return m.wrap(jnp.arange(5 * 2).reshape((5, 2)) + 1).tag("baz", "foo")


def _view(m):
    return m.wrap(FLOAT_DATA).tag("foo", "bar", "baz").untag("bar")


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda m, s: _a(m) + _b(m), id="add_broadcast_by_name"),
        pytest.param(lambda m, s: _a(m) - _b(m), id="sub"),
        pytest.param(lambda m, s: _a(m) * _b(m).untag("baz"), id="mul_with_view"),
        pytest.param(lambda m, s: _a(m) > _b(m), id="gt"),
        pytest.param(lambda m, s: _a(m) == _b(m), id="eq"),
        pytest.param(lambda m, s: _a(m) != 3, id="ne_scalar"),
        pytest.param(lambda m, s: _a(m) // _b(m), id="floordiv"),
        pytest.param(lambda m, s: _a(m) % _b(m), id="mod"),
        pytest.param(lambda m, s: divmod(_a(m), _b(m)), id="divmod"),
        pytest.param(lambda m, s: _a(m) ** 2, id="pow"),
        pytest.param(lambda m, s: 2 ** _b(m), id="rpow"),
        pytest.param(lambda m, s: _a(m) << 1, id="lshift"),
        pytest.param(lambda m, s: _a(m) >> 1, id="rshift"),
        pytest.param(lambda m, s: (_a(m) & 6) | (_b(m) ^ 3), id="bitwise"),
        pytest.param(lambda m, s: 1.5 / _view(m), id="rtruediv_view"),
        pytest.param(lambda m, s: 7 - _view(m), id="rsub_python"),
        pytest.param(lambda m, s: np.float32(2) * _view(m), id="rmul_numpy_scalar"),
        pytest.param(lambda m, s: np.array(100) - _a(m), id="rsub_numpy"),
        pytest.param(lambda m, s: jnp.array(100) - _a(m), id="rsub_jax"),
        pytest.param(lambda m, s: _view(m) + jnp.ones((4, 1)), id="positional_broadcast"),
        pytest.param(lambda m, s: _view(m).untag_prefix("baz") + _view(m), id="mixed_views"),
        pytest.param(lambda m, s: -_view(m), id="neg"),
        pytest.param(lambda m, s: +_a(m), id="pos"),
        pytest.param(lambda m, s: abs(_view(m)), id="abs"),
        pytest.param(lambda m, s: ~_a(m), id="invert"),
        pytest.param(
            lambda m, s: m.wrap(jnp.ones((3, 2))).tag_prefix("bar") * _a(m), id="prefix_times_named"
        ),
    ],
)
def test_operators_match_penzai(build):
    assert_same_as_penzai(build)


def test_operator_positional_mismatch_error_names_shapes():
    with pytest.raises(ValueError, match=r"positional shapes.*\(3,\).*\(4,\)"):
        _ = nx.wrap(jnp.zeros((2, 3))).tag_prefix("a") + nx.wrap(jnp.zeros((2, 4))).tag_prefix("a")


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda m, s: _a(m).sum(), id="sum_no_positional"),
        pytest.param(lambda m, s: _a(m).untag("bar").sum(), id="sum_view"),
        pytest.param(lambda m, s: _a(m).untag("bar", "foo").sum(axis=1), id="sum_axis"),
        pytest.param(lambda m, s: _a(m).untag("baz", "foo").sum(-1, keepdims=True), id="keepdims"),
        pytest.param(lambda m, s: _a(m).untag("baz").mean(), id="mean_int"),
        pytest.param(lambda m, s: (_a(m) > 4).untag("bar").sum(), id="sum_bool"),
        pytest.param(lambda m, s: (_a(m) > 4).untag("bar").any(), id="any"),
        pytest.param(lambda m, s: (_a(m) > 4).untag("bar").all(), id="all"),
        pytest.param(lambda m, s: _view(m).max(), id="max"),
        pytest.param(lambda m, s: _view(m).min(0), id="min"),
        pytest.param(lambda m, s: _view(m).prod(), id="prod"),
        pytest.param(lambda m, s: _view(m).std(ddof=1), id="std"),
        pytest.param(lambda m, s: _view(m).var(), id="var"),
        pytest.param(lambda m, s: _view(m).sum(dtype=jnp.int32), id="sum_dtype"),
        pytest.param(lambda m, s: _view(m).untag_prefix("baz").argmax(axis=0), id="argmax"),
        pytest.param(lambda m, s: _view(m).argmin(), id="argmin_axis_none"),
        pytest.param(lambda m, s: _view(m).cumsum(axis=0), id="cumsum"),
        pytest.param(lambda m, s: _view(m).cumprod(), id="cumprod_axis_none"),
        pytest.param(
            lambda m, s: _a(m).untag("bar").sum(where=jnp.array([1, 0, 1]) > 0), id="where"
        ),
        pytest.param(lambda m, s: _a(m).astype(jnp.float32), id="astype"),
        pytest.param(lambda m, s: _view(m).astype(jnp.bfloat16), id="astype_view"),
        pytest.param(lambda m, s: _view(m).clip(-0.5, 0.5), id="clip"),
        pytest.param(lambda m, s: _view(m).round(1), id="round"),
        pytest.param(lambda m, s: _view(m).clip(min=_b(m) / 10.0), id="clip_named_kwarg"),
        pytest.param(lambda m, s: _view(m).clip(max=jnp.full((2, 1), 0.1)), id="clip_array_kwarg"),
        pytest.param(
            lambda m, s: m.NamedArray(
                named_axes=collections.OrderedDict(a=3), data_array=np.arange(6).reshape(2, 3)
            ).sum(),
            id="numpy_data_sum",
        ),
        pytest.param(
            lambda m, s: (
                m.NamedArray(named_axes=collections.OrderedDict(a=3), data_array=np.ones((2, 3)))
                * np.ones((2, 1))
            ),
            id="numpy_data_mul",
        ),
        pytest.param(lambda m, s: _view(m).conj(), id="conj"),
        pytest.param(lambda m, s: _view(m).untag_prefix("baz").reshape((15,)), id="reshape"),
        pytest.param(lambda m, s: _view(m).untag_prefix("baz").transpose(), id="transpose"),
        pytest.param(lambda m, s: _view(m).untag_prefix("baz").swapaxes(0, 1), id="swapaxes"),
        pytest.param(lambda m, s: _view(m).sort(), id="sort"),
        pytest.param(lambda m, s: _view(m).argsort(), id="argsort"),
        pytest.param(lambda m, s: _view(m).untag_prefix("baz").flatten(), id="flatten"),
        pytest.param(lambda m, s: _view(m)[None].squeeze(0), id="squeeze"),
        pytest.param(lambda m, s: _view(m).repeat(2), id="repeat"),
        pytest.param(lambda m, s: _view(m).take(jnp.array([2, 0])), id="take"),
        pytest.param(lambda m, s: _view(m).untag_prefix("baz").diagonal(), id="diagonal"),
        pytest.param(lambda m, s: _view(m).untag_prefix("baz").trace(), id="trace"),
        pytest.param(lambda m, s: _view(m).dot(jnp.ones(3)), id="dot"),
        pytest.param(lambda m, s: _view(m).ptp(), id="ptp"),
        pytest.param(lambda m, s: _view(m).searchsorted(0.0), id="searchsorted"),
        pytest.param(lambda m, s: _view(m).untag_prefix("baz").ravel(), id="ravel"),
        pytest.param(lambda m, s: _view(m).view(jnp.int32), id="view"),
        pytest.param(lambda m, s: _view(m).compress(jnp.array([True, False, True])), id="compress"),
        pytest.param(lambda m, s: _view(m).argpartition(1), id="argpartition"),
        pytest.param(
            lambda m, s: (_a(m).untag("bar") % 3).choose(jnp.arange(9).reshape(3, 3), mode="clip"),
            id="choose",
        ),
    ],
)
def test_array_methods_match_penzai(build):
    assert_same_as_penzai(build)


def test_property_like_methods_work_as_methods():
    # penzai exposes T/mT/real/imag as methods but calling them fails (they are properties of
    # jax.Array); here calling them returns the property's value, vectorized.
    complex_view = nx.wrap(jnp.array([[1 + 2j, 3 - 1j]])).tag_prefix("a")
    np.testing.assert_array_equal(complex_view.real().untag_prefix("a").unwrap(), [[1.0, 3.0]])
    np.testing.assert_array_equal(complex_view.imag().untag_prefix("a").unwrap(), [[2.0, -1.0]])
    matrix = nx.wrap(jnp.arange(12).reshape(2, 2, 3)).tag_prefix("a")
    assert matrix.T().positional_shape == (3, 2)
    assert matrix.mT().positional_shape == (3, 2)
    np.testing.assert_array_equal(
        matrix.T().untag_prefix("a").unwrap(),
        np.transpose(np.arange(12).reshape(2, 2, 3), (0, 2, 1)),
    )


def test_reduction_with_bad_axis_raises_jax_error():
    with pytest.raises(ValueError, match="axis"):
        _view(nx).sum(axis=3)


def test_item_and_scalar_conversions():
    scalar = nx.wrap(jnp.array(3))
    assert int(scalar) == 3
    assert float(scalar) == 3.0
    assert complex(scalar) == 3 + 0j
    assert bool(scalar)
    assert [10, 20, 30, 40][scalar] == 40
    assert scalar.item() == 3
    named = nx.wrap(DATA).tag("foo", "bar", "baz")
    with pytest.raises(ValueError, match=r"Cannot convert a non-scalar NamedArray.*'foo': 2"):
        int(named)
    with pytest.raises(ValueError, match="Cannot convert a non-scalar NamedArray"):
        bool(named)
    with pytest.raises(ValueError, match=r"positional shape \(3,\)"):
        float(nx.wrap(jnp.zeros(3)))


def test_iteration_over_leading_positional_axis():
    view = nx.wrap(DATA).tag("foo", "bar", "baz").untag("bar")
    slices = list(view)
    assert len(slices) == 3
    for i, piece in enumerate(slices):
        np.testing.assert_array_equal(piece.unwrap("foo", "baz"), DATA[:, i, :])
    with pytest.raises(ValueError, match=r"no positional axes.*'foo': 2"):
        list(nx.wrap(DATA).tag("foo", "bar", "baz"))


# ---------------------------------------------------------------------------------------------
# Indexing and updates
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda m, s: _a(m).untag("baz", "bar")[2, ::-1], id="positional"),
        pytest.param(lambda m, s: _a(m)[{"baz": 2, "bar": s[::-1]}], id="dict"),
        pytest.param(
            lambda m, s: _a(m).untag("foo")[{"baz": 2, "bar": s[::-1], "qux": None}].tag("foo"),
            id="dict_new_axis",
        ),
        pytest.param(lambda m, s: _a(m).untag("baz")[..., None], id="ellipsis_newaxis"),
        pytest.param(
            lambda m, s: _a(m).untag("baz")[m.wrap(jnp.array([4, 0, 1])).tag("idx")],
            id="named_index_array",
        ),
        pytest.param(lambda m, s: _a(m)[{"baz": jnp.array([[4, 0], [1, 1]])}], id="dict_adv"),
        pytest.param(lambda m, s: m.unstack(_a(m), "bar"), id="unstack"),
    ],
)
def test_indexing_matches_penzai(build):
    assert_same_as_penzai(build)


def test_indexing_batched_lookup():
    table = nx.wrap(jnp.arange(100 * 3).reshape((100, 3))).tag("vocab", "features")
    indices = nx.wrap(jnp.array([2, 61, 3, 10, 40])).tag("batch")
    expected = np.arange(300).reshape(100, 3)[[2, 61, 3, 10, 40]]
    for result in (table.untag("vocab")[indices], table[{"vocab": indices}]):
        assert result.named_shape == {"features": 3, "batch": 5}
        np.testing.assert_array_equal(result.unwrap("batch", "features"), expected)


def test_dict_index_errors():
    named = nx.wrap(DATA).tag("foo", "bar", "baz")
    with pytest.raises(TypeError, match=r"Unsupported index.*'bar'"):
        named[{"bar": 1.5}]
    with pytest.raises(ValueError, match=r"\['foo'\] already exist"):
        named[{"foo": None}]
    with pytest.raises(ValueError, match="not present"):
        named[{"nope": 0}]


_GRID = {m: m.arange("foo", 5) + m.arange("bar", 4) for m in (nx, penzai_nx)}


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda m, s: _GRID[m].untag("foo").at[3].set(100).tag("foo"), id="pos_set"),
        pytest.param(lambda m, s: _GRID[m].at[{"foo": 3}].set(100), id="dict_set"),
        pytest.param(lambda m, s: _GRID[m].at[{"foo": 3}].add(100), id="dict_add"),
        pytest.param(
            lambda m, s: _GRID[m].at[{"bar": 2}].add(100 * m.arange("foo", 5)),
            id="dict_add_along_named",
        ),
        pytest.param(
            lambda m, s: (
                _GRID[m]
                .untag("bar")
                .at[m.arange("qux", 2) + 1]
                .add(100 + 100 * m.arange("qux", 2))
                .tag("bar")
            ),
            id="pos_add_new_named",
        ),
        pytest.param(
            lambda m, s: (
                _GRID[m].at[{"bar": m.arange("qux", 2) + 1}].add(100 + 100 * m.arange("qux", 2))
            ),
            id="dict_add_new_named",
        ),
        pytest.param(
            lambda m, s: (
                _GRID[m]
                .untag("foo")
                .at[jnp.array([1, 1, 2, 100])]
                .get(mode="fill", fill_value=-1)
                .tag("baz")
            ),
            id="get_fill",
        ),
        pytest.param(lambda m, s: _GRID[m].at[{"foo": s[1:3]}].multiply(2), id="multiply"),
        pytest.param(lambda m, s: _GRID[m].at[{"foo": s[1:3]}].mul(3), id="mul"),
        pytest.param(
            lambda m, s: _GRID[m].astype(jnp.float32).at[{"foo": 0}].divide(2), id="divide"
        ),
        pytest.param(lambda m, s: _GRID[m].at[{"foo": 4}].power(2), id="power"),
        pytest.param(lambda m, s: _GRID[m].at[{"foo": 4}].min(5), id="min"),
        pytest.param(lambda m, s: _GRID[m].at[{"foo": 0}].max(2), id="max"),
        pytest.param(
            lambda m, s: _GRID[m].at[{"foo": jnp.array([2, 4])}].set(jnp.array([100, 101])),
            id="dict_set_positional_values",
        ),
    ],
)
def test_indexed_updates_match_penzai(build):
    assert_same_as_penzai(build)


def _times_ten(x):
    return x * 10


def test_indexed_update_apply_and_div():
    # penzai 0.2.5 fails on both (``apply`` sends the function through jit as an array, and
    # ``jax.Array.at`` has no ``div``); here they work.
    grid = _GRID[nx]
    expected = np.add.outer(np.arange(5), np.arange(4))
    expected[1] *= 10
    np.testing.assert_array_equal(
        grid.at[{"foo": 1}].apply(_times_ten).unwrap("foo", "bar"), expected
    )
    np.testing.assert_array_equal(
        grid.untag("foo").at[1].apply(_times_ten).tag("foo").unwrap("foo", "bar"), expected
    )
    halved = grid.astype(jnp.float32).at[{"foo": 0}].div(2)
    np.testing.assert_allclose(halved.unwrap("foo", "bar")[0], np.arange(4) / 2)
    with pytest.raises(TypeError, match="needs a function"):
        grid.at[{"foo": 1}].apply(3)


def _complicated_array(m):
    shape = {
        "iscalar": 2,
        "iunnamed": 3,
        "inamed": 3,
        "sliced": 3,
        "common": 2,
        "lhs": 2,
        "p1": 2,
        "p2": 2,
    }
    return (
        m.wrap(jnp.arange(int(np.prod(list(shape.values())))))
        .reshape(tuple(shape.values()))
        .tag(*shape)
        .untag("p1", "p2")
    )


def _complicated_indexer(m, s):
    return {
        "iscalar": 0,
        "sliced": s[1:],
        "iunnamed": jnp.array([2, 0, 1]),
        "new": None,
        "inamed": m.wrap(jnp.array([[0, 0, 1], [2, 1, 2]])).tag_prefix("common"),
    }


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda m, s: _complicated_array(m)[_complicated_indexer(m, s)], id="get"),
        pytest.param(
            lambda m, s: (
                _complicated_array(m)
                .at[_complicated_indexer(m, s)]
                .add(
                    m.wrap(jnp.arange(2 * 2 * 3 * 2 * 2).reshape((2, 2, 3, 2, 2))).tag_prefix(
                        "sliced", "common"
                    )[{"new": None}]
                )
            ),
            id="add_full",
        ),
        pytest.param(
            lambda m, s: (
                _complicated_array(m)
                .at[_complicated_indexer(m, s)]
                .add(m.wrap(jnp.arange(4).reshape((2, 2))).tag_prefix("common"))
            ),
            id="add_broadcast_positional",
        ),
        pytest.param(
            lambda m, s: (
                _complicated_array(m)
                .at[_complicated_indexer(m, s)]
                .add(m.wrap(jnp.arange(8).reshape((2, 2, 2))).tag_prefix("sliced", "common"))
            ),
            id="add_broadcast_sliced",
        ),
    ],
)
def test_complicated_dict_indexing_matches_penzai(build):
    assert_same_as_penzai(build)


def test_dict_update_with_incompatible_values_shape():
    grid = _GRID[nx]
    with pytest.raises(ValueError, match=r"positional shape \(3,\).*result shape is \(2,\)"):
        grid.at[{"foo": jnp.array([2, 4])}].set(jnp.zeros(3))


# ---------------------------------------------------------------------------------------------
# Broadcasting and ordering
# ---------------------------------------------------------------------------------------------


def _structure(cls, layout, shape, dtype):
    if cls == "NamedArray":
        return lambda m: m.NamedArray(
            named_axes=collections.OrderedDict(layout),
            data_array=jnp.arange(int(np.prod(shape)), dtype=dtype).reshape(shape),
        )
    logical, names = layout
    return lambda m: m.NamedArrayView(
        data_shape=shape,
        data_axis_for_logical_axis=logical,
        data_axis_for_name=names,
        data_array=jnp.arange(int(np.prod(shape)), dtype=dtype).reshape(shape),
    )


_ARRAY_NA = _structure("NamedArray", [("foo", 3), ("bar", 2)], (5, 6, 3, 2), jnp.int32)
_OTHER_NA = _structure("NamedArray", [("bar", 2), ("foo", 3)], (5, 6, 2, 3), jnp.float32)
_VIEW = _structure("NamedArrayView", ((2, 0), {"foo": 3, "bar": 1}), (6, 2, 5, 3), jnp.int32)
_OTHER_VIEW = _structure(
    "NamedArrayView", ((2, 3), {"foo": 0, "bar": 1}), (3, 2, 5, 6), jnp.float32
)


@pytest.mark.parametrize(
    ("left", "right"),
    [(_ARRAY_NA, _OTHER_NA), (_VIEW, _OTHER_NA), (_ARRAY_NA, _VIEW), (_OTHER_VIEW, _VIEW)],
)
def test_order_like_matches_penzai(left, right):
    result = assert_same_as_penzai(lambda m, s: left(m).order_like(right(m)))
    assert jax.tree_util.tree_structure(result) == jax.tree_util.tree_structure(right(nx))
    np.testing.assert_array_equal(
        result.canonicalize().data_array, left(nx).canonicalize().data_array
    )


def test_order_like_errors():
    with pytest.raises(ValueError, match="same number of positional axes"):
        _ARRAY_NA(nx).order_like(nx.wrap(jnp.zeros((3, 2))).tag("foo", "bar").untag("foo"))
    with pytest.raises(ValueError, match="same axis names"):
        _VIEW(nx).order_like(
            nx.wrap(jnp.zeros((5, 6, 3, 2))).tag("foo", "x", "y", "z").untag("foo", "x")
        )
    with pytest.raises(TypeError, match="ndarray"):
        _VIEW(nx).order_like(np.zeros(3))
    with pytest.raises(ValueError, match="missing"):
        _ARRAY_NA(nx).order_like(nx.wrap(jnp.zeros(3)).tag("foo"))


def test_tree_order_like_matches_structure():
    values = {
        "a": 1.0,
        "b": nx.wrap(jnp.arange(6).reshape((2, 3))).tag("foo", "bar"),
        "c": nx.wrap(jnp.arange(20).reshape((5, 4))).tag_prefix("baz"),
    }
    target = {
        "a": 2.0,
        "b": nx.wrap(jnp.zeros((3, 2))).tag("bar", "foo"),
        "c": nx.wrap(jnp.zeros((5, 4)))
        .tag_prefix("baz")
        .untag_prefix("baz")
        .tag("baz", "q")
        .untag("q"),
    }
    ordered = nx.order_like(values, target)
    assert jax.tree_util.tree_structure(ordered) == jax.tree_util.tree_structure(target)
    assert ordered["a"] == 1.0
    for key in ("b", "c"):
        np.testing.assert_array_equal(
            ordered[key].canonicalize().data_array, values[key].canonicalize().data_array
        )


@pytest.mark.parametrize(
    ("value", "positional_shape", "named_shape"),
    [
        (_ARRAY_NA, (5, 6), {"foo": 3, "bar": 2}),
        (_VIEW, (5, 6), {"foo": 3, "bar": 2}),
        (
            _structure("NamedArray", [("foo", 3), ("bar", 2)], (5, 1, 6, 3, 2), jnp.int32),
            (2, 5, 4, 6),
            {"bar": 2, "foo": 3, "baz": 7},
        ),
        (
            _structure(
                "NamedArrayView", ((0, 1, 2), {"foo": 3, "bar": 4}), (5, 1, 6, 3, 2), jnp.int32
            ),
            (2, 5, 4, 6),
            {"bar": 2, "foo": 3, "baz": 7},
        ),
        (_ARRAY_NA, (5, 6), {"new": 2}),
    ],
)
def test_broadcast_to_matches_penzai(value, positional_shape, named_shape):
    result = assert_same_as_penzai(
        lambda m, s: value(m).broadcast_to(positional_shape, named_shape)
    )
    assert result.positional_shape == positional_shape
    assert set(result.named_shape) == set(named_shape) | set(value(nx).named_shape)


def test_broadcast_to_under_eval_shape():
    structure = nx.NamedArrayView(
        data_shape=(5, 1, 6, 3, 2),
        data_axis_for_logical_axis=(0, 1, 2),
        data_axis_for_name={"foo": 3, "bar": 4},
        data_array=jax.ShapeDtypeStruct((5, 1, 6, 3, 2), jnp.int32),
    )
    result = jax.eval_shape(lambda v: v.broadcast_to((2, 5, 4, 6), {"baz": 7}), structure)
    assert result.positional_shape == (2, 5, 4, 6)
    assert result.named_shape == {"foo": 3, "bar": 2, "baz": 7}


def test_broadcast_to_returns_self_when_nothing_changes():
    array = _VIEW(nx)
    assert array.broadcast_to((5, 6), {"foo": 3, "bar": 2}) is array


def test_broadcast_like():
    small = nx.wrap(jnp.arange(3.0)).tag("a")
    big = nx.zeros({"a": 3, "b": 2}).untag("b")
    result = assert_same_as_penzai(
        lambda m, s: (
            m.wrap(jnp.arange(3.0)).tag("a").broadcast_like(m.zeros({"a": 3, "b": 2}).untag("b"))
        )
    )
    assert result.positional_shape == (2,)
    assert small.broadcast_like(jnp.zeros((4, 2))).positional_shape == (4, 2)
    assert big.broadcast_like(big) is big


def test_broadcast_to_errors():
    array = nx.wrap(jnp.zeros((1, 3))).tag_prefix("a")
    with pytest.raises(ValueError, match=r"'a' has size 1, requested 4"):
        array.broadcast_to((3,), {"a": 4})
    with pytest.raises(ValueError, match=r"Cannot broadcast positional shape \(3,\) to \(2,\)"):
        array.broadcast_to((2,), {})
    with pytest.raises(ValueError, match=r"\(3,\) to \(\)"):
        array.broadcast_to((), {})


# ---------------------------------------------------------------------------------------------
# Constructors, combinators, scan
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda m, s: m.zeros({"foo": 2, "bar": 3}, jnp.int32), id="zeros"),
        pytest.param(lambda m, s: m.ones({"foo": 2, "bar": 3}), id="ones"),
        pytest.param(lambda m, s: m.full({"foo": 2, "bar": 3}, 3, jnp.int32), id="full"),
        pytest.param(lambda m, s: m.full({"foo": 2}, 0.5), id="full_inferred"),
        pytest.param(lambda m, s: m.arange("foo", 5), id="arange"),
        pytest.param(lambda m, s: m.arange("foo", 2, 9, 3, jnp.float32), id="arange_full"),
        pytest.param(
            lambda m, s: m.random_split(jax.random.key(42), {"foo": 2, "bar": 3}), id="split"
        ),
        pytest.param(
            lambda m, s: m.random_split(
                m.random_split(jax.random.key(42), [("foo", 2)]),
                collections.OrderedDict([("baz", 5), ("bar", 3)]),
            ),
            id="split_named_key",
        ),
        pytest.param(
            lambda m, s: m.random_split(jax.random.PRNGKey(0), {"a": 2}), id="split_raw_key"
        ),
        pytest.param(
            lambda m, s: m.concatenate([m.ones({"bar": 3}), m.zeros({"bar": 2})], "bar"),
            id="concatenate",
        ),
        pytest.param(
            lambda m, s: m.concatenate(
                [_view(m), _view(m).untag_prefix("baz").tag_prefix("baz")], "foo"
            ),
            id="concatenate_views",
        ),
        pytest.param(
            lambda m, s: m.stack([m.ones({"bar": 3}), m.zeros({"bar": 3})], "foo"), id="stack"
        ),
        pytest.param(lambda m, s: m.stack([_view(m), _view(m) * 2], "new"), id="stack_views"),
    ],
)
def test_constructors_and_combinators_match_penzai(build):
    assert_same_as_penzai(build)


def test_random_split_keys_are_usable_and_distinct():
    keys = nx.random_split(jax.random.key(0), {"foo": 2, "bar": 3})
    values = nx.nmap(jax.random.normal)(keys, shape=(7,))
    assert values.named_shape == {"foo": 2, "bar": 3}
    assert values.positional_shape == (7,)
    flat = values.untag_prefix("foo", "bar").unwrap().reshape(6, 7)
    assert len({tuple(np.asarray(row)) for row in flat}) == 6


def test_random_split_unsortable_names():
    with pytest.raises(ValueError, match="sortable"):
        nx.random_split(jax.random.key(0), {"a": 2, 1.5: 3, ("t",): 2})


def test_constructors_reject_integer_names():
    with pytest.raises(ValueError, match="Integers are not allowed"):
        nx.zeros({0: 2})


def test_combinator_errors():
    with pytest.raises(ValueError, match=r"same number of positional axes.*\[\(\), \(2,\)\]"):
        nx.stack([nx.ones({"a": 2}), nx.wrap(jnp.ones((3, 2))).tag_prefix("x")], "b")
    with pytest.raises(ValueError, match=r"arrays\[1\] has no such axis"):
        nx.concatenate([nx.ones({"a": 2}), nx.ones({"b": 2})], "a")
    with pytest.raises(ValueError, match="Repeated axis names"):
        nx.stack([nx.ones({"a": 2}), nx.ones({"a": 2})], "a")
    with pytest.raises(ValueError, match=r"no such axis.*'a': 2"):
        nx.unstack(nx.ones({"a": 2}), "b")
    with pytest.raises(ValueError, match="Inconsistent named axes"):
        nx.concatenate([nx.ones({"a": 2, "b": 2}), nx.ones({"a": 2, "b": 3})], "a")


def test_scan_over_named_axis():
    carry = {
        "plain": jnp.array([1, 2, 3]),
        "named": nx.wrap(jnp.ones([2, 3, 4])).tag_prefix("a", "b"),
    }
    xs = {
        "x": nx.wrap(jnp.arange(14.0).reshape(2, 7)).tag("a", "seq"),
        "y": nx.wrap(jnp.ones([2, 7, 3])).tag_prefix("a", "seq"),
    }
    seen = {}

    def step(carry, x):
        seen["carry"] = (carry["named"].named_shape, carry["named"].positional_shape)
        seen["x"] = (x["x"].named_shape, x["x"].positional_shape, x["y"].positional_shape)
        # Build the new carry with a different storage order; scan must fix it up.
        new_named = nx.wrap(jnp.ones([3, 2, 4])).tag_prefix("b", "a") + x["x"]
        return (
            {"plain": carry["plain"] + 1, "named": new_named},
            {"plain_out": jnp.zeros((5,)), "named_out": x["x"] * 2},
        )

    final, outputs = nx.scan(step, "seq", carry, xs)
    assert seen["carry"] == ({"a": 2, "b": 3}, (4,))
    assert seen["x"] == ({"a": 2}, (), (3,))
    np.testing.assert_array_equal(final["plain"], [8, 9, 10])
    assert final["named"].named_shape == {"a": 2, "b": 3}
    assert outputs["plain_out"].named_shape == {"seq": 7}
    assert outputs["plain_out"].positional_shape == (5,)
    np.testing.assert_array_equal(
        outputs["named_out"].unwrap("a", "seq"), 2 * np.arange(14.0).reshape(2, 7)
    )


def test_scan_requires_named_xs():
    with pytest.raises(ValueError, match="must be Penzai named arrays"):
        nx.scan(lambda c, x: (c, x), "seq", 0, {"x": jnp.zeros(3)})


def test_scan_with_length_only():
    final, outputs = nx.scan(lambda c, _: (c + 1, c), "steps", jnp.array(0), length=4)
    assert int(final) == 4
    np.testing.assert_array_equal(outputs.unwrap("steps"), [0, 1, 2, 3])
