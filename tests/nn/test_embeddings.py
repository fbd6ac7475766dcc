"""Tests for pz_flax.nn.embeddings, with penzai 0.2.5 as the differential oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz as penzai_pz

from pz_flax.core import named_axes
from pz_flax.core import variables
from pz_flax.nn import embeddings

EMBEDDING_AXES = {"foo": 5, "bar": 3}


def _tables(vocab=17):
    ours = embeddings.EmbeddingTable.from_config(
        "emb", jax.random.key(2), vocab_size=vocab, embedding_axes=EMBEDDING_AXES
    )
    theirs = penzai_pz.nn.EmbeddingTable.from_config(
        "emb", jax.random.key(2), vocab_size=vocab, embedding_axes=EMBEDDING_AXES
    )
    names = ("vocabulary", *EMBEDDING_AXES)
    data = jax.random.normal(jax.random.key(9), (vocab, *EMBEDDING_AXES.values()))
    ours.embeddings.value = named_axes.wrap(data, *names)
    theirs.embeddings.value = penzai_pz.nx.wrap(data, *names)
    return ours, theirs


def _assert_same(ours, theirs, atol=1e-5):
    assert dict(ours.named_shape) == dict(theirs.named_shape)
    names = tuple(theirs.named_shape)
    np.testing.assert_allclose(
        np.asarray(ours.unwrap(*names)), np.asarray(theirs.unwrap(*names)), atol=atol, rtol=1e-5
    )


def test_table_from_config():
    table = embeddings.EmbeddingTable.from_config(
        "emb", jax.random.key(0), vocab_size=11, embedding_axes={"embedding": 8}, dtype=jnp.bfloat16
    )
    assert isinstance(table.embeddings, variables.Parameter)
    assert table.embeddings.label == "emb.embeddings"
    assert dict(table.embeddings.value.named_shape) == {"vocabulary": 11, "embedding": 8}
    assert table.embeddings.value.dtype == jnp.bfloat16
    assert table.vocabulary_axis == "vocabulary"
    # Fan-out normal scaling: unit variance per entry for a single embedding axis of size 8
    # means a squared norm around 1 per row.
    norms = np.sum(
        np.asarray(table.embeddings.value.unwrap("vocabulary", "embedding"), float) ** 2, -1
    )
    assert 0.2 < norms.mean() < 3.0
    slot_table = embeddings.EmbeddingTable.from_config("emb", None, 11, {"embedding": 8})
    assert isinstance(slot_table.embeddings, variables.ParameterSlot)


def test_table_rejects_vocabulary_axis_among_embedding_axes():
    with pytest.raises(ValueError, match=r"'vocabulary'.*embedding_axes"):
        embeddings.EmbeddingTable.from_config("emb", jax.random.key(0), 11, {"vocabulary": 8})


def test_lookup_matches_penzai():
    ours_table, theirs_table = _tables()
    tokens = np.array([[0, 3, 16], [5, 5, 1]], dtype=np.int32)
    ours = embeddings.EmbeddingLookup(ours_table)(named_axes.wrap(tokens, "batch", "seq"))
    theirs = penzai_pz.nn.EmbeddingLookup(theirs_table)(penzai_pz.nx.wrap(tokens, "batch", "seq"))
    _assert_same(ours, theirs, atol=0)


def test_decode_matches_penzai_and_ties_weights():
    ours_table, theirs_table = _tables()
    data = jax.random.normal(jax.random.key(4), (2, *EMBEDDING_AXES.values()))
    ours = embeddings.EmbeddingDecode(ours_table)(named_axes.wrap(data, "seq", *EMBEDDING_AXES))
    theirs = penzai_pz.nn.EmbeddingDecode(theirs_table)(
        penzai_pz.nx.wrap(data, "seq", *EMBEDDING_AXES)
    )
    _assert_same(ours, theirs)
    assert dict(ours.named_shape) == {"seq": 2, "vocabulary": 17}
    # Lookup and decode built on one table share one parameter.
    lookup = embeddings.EmbeddingLookup(ours_table)
    decode = embeddings.EmbeddingDecode(ours_table)
    assert lookup.table.embeddings is decode.table.embeddings


def test_lookup_rejects_token_axis_shared_with_table():
    ours_table, _ = _tables()
    with pytest.raises(ValueError, match=r"EmbeddingLookup.*'foo' \(size 2\)"):
        embeddings.EmbeddingLookup(ours_table)(named_axes.zeros({"foo": 2}, dtype=jnp.int32))
    with pytest.raises(ValueError, match="EmbeddingLookup expects token ids with only named"):
        embeddings.EmbeddingLookup(ours_table)(jnp.zeros((2,), jnp.int32) * named_axes.ones({}))


@pytest.mark.parametrize(
    ("named_shape", "message"),
    [
        ({"seq": 2, "foo": 5}, r"EmbeddingDecode.*'bar' of size 3.*is missing"),
        ({"seq": 2, "foo": 5, "bar": 4}, r"EmbeddingDecode.*'bar' of size 3.*has size 4"),
    ],
)
def test_decode_axis_errors(named_shape, message):
    ours_table, _ = _tables()
    with pytest.raises(ValueError, match=message):
        embeddings.EmbeddingDecode(ours_table)(named_axes.ones(named_shape))


def _rope_inputs():
    data = jax.random.normal(jax.random.key(5), (2, 4, 3, 8))
    positions = np.array([[0, 1, 2, 3], [7, 2, -1, 100]], dtype=np.int32)
    names = ("batch", "seq", "heads", "projection")
    return (
        named_axes.wrap(data, *names),
        penzai_pz.nx.wrap(data, *names),
        named_axes.wrap(positions, "batch", "seq"),
        penzai_pz.nx.wrap(positions, "batch", "seq"),
    )


def test_rope_matches_penzai():
    ours_in, theirs_in, ours_pos, theirs_pos = _rope_inputs()
    ours = embeddings.ApplyRoPE("projection", 10_000, "token_positions")(
        ours_in, token_positions=ours_pos
    )
    theirs = penzai_pz.nn.ApplyRoPE("projection", 10_000, "token_positions")(
        theirs_in, token_positions=theirs_pos
    )
    _assert_same(ours, theirs)


def test_rope_to_subset_matches_penzai_and_keeps_suffix():
    ours_in, theirs_in, ours_pos, theirs_pos = _rope_inputs()
    ours = embeddings.ApplyRoPEToSubset("projection", 100.0, 4, "pos")(ours_in, pos=ours_pos)
    theirs = penzai_pz.nn.ApplyRoPEToSubset("projection", 100.0, 4, "pos")(
        theirs_in, pos=theirs_pos
    )
    _assert_same(ours, theirs)
    order = ("batch", "seq", "heads", "projection")
    np.testing.assert_array_equal(
        np.asarray(ours.unwrap(*order))[..., 4:], np.asarray(ours_in.unwrap(*order))[..., 4:]
    )


def test_rope_preserves_dtype_and_relative_positions():
    query = named_axes.wrap(jax.random.normal(jax.random.key(0), (6,)), "projection")
    key = named_axes.wrap(jax.random.normal(jax.random.key(1), (6,)), "projection")
    rope = embeddings.ApplyRoPE("projection", 10_000, "pos")

    def score(query_position, key_position):
        rotated_query = rope(query, pos=named_axes.wrap(jnp.array(query_position)))
        rotated_key = rope(key, pos=named_axes.wrap(jnp.array(key_position)))
        return float((rotated_query * rotated_key).untag("projection").sum().unwrap())

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-4)
    half = rope(query.astype(jnp.bfloat16), pos=named_axes.wrap(jnp.array(3)))
    assert half.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("positions", "message"),
    [
        (named_axes.zeros({"projection": 8}, jnp.int32), "must not have the embedding axis"),
        (named_axes.wrap(jnp.zeros((4,), jnp.int32)), "must have only named axes"),
        (named_axes.zeros({"seq": 5}, jnp.int32), r"'seq' has size 5 in the positions and 4"),
        (named_axes.zeros({"other": 4}, jnp.int32), r"'other' has size 4 .* and None"),
    ],
)
def test_rope_position_errors(positions, message):
    ours_in, _, _, _ = _rope_inputs()
    with pytest.raises(ValueError, match=message):
        embeddings.ApplyRoPE("projection", 10_000, "pos")(ours_in, pos=positions)


def test_rope_axis_errors():
    ours_in, _, ours_pos, _ = _rope_inputs()
    with pytest.raises(ValueError, match=r"ApplyRoPE rotates along axis 'embedding'"):
        embeddings.ApplyRoPE("embedding", 10_000, "pos")(ours_in, pos=ours_pos)
    with pytest.raises(ValueError, match=r"ApplyRoPEToSubset.*even size at most 8.*size 9"):
        embeddings.ApplyRoPEToSubset("projection", 10_000, 9, "pos")(ours_in, pos=ours_pos)
    odd = named_axes.ones({"seq": 4, "projection": 5})
    with pytest.raises(ValueError, match=r"ApplyRoPE.*'projection'.*size 5"):
        embeddings.ApplyRoPE("projection", 10_000, "pos")(odd, pos=named_axes.arange("seq", 4))
