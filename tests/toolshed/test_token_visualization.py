import html
import re

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz as penzai_pz
from penzai.toolshed import token_visualization as penzai_token_visualization
from treescope import lowering

from pz_flax import pz
from pz_flax.toolshed import token_visualization


class _Vocab:
    """A tiny SentencePiece-like vocabulary: ids 0 and 1 are control tokens."""

    pieces = ("<pad>", "<bos>", "hello", "▁world", "\n", "x")

    def GetPieceSize(self):
        return len(self.pieces)

    def IdToPiece(self, id):
        return self.pieces[id]

    def IsControl(self, id):
        return id < 2


_TOKENS = np.array([[1, 2, 3, 4], [1, 5, 0, 0]])
_SCORES = np.linspace(-1.0, 2.0, 8, dtype=np.float32).reshape(2, 4)


def _html(figure) -> str:
    # Treescope gives each output a random element id; nothing else may differ.
    page = lowering.render_to_html_as_root(figure.treescope_part, compressed=False)
    return re.sub(r"treescope_out_[0-9a-f]+", "treescope_out_ID", page)


def _named(lib, data, *names):
    return lib.nx.wrap(data).tag(*names)


@pytest.mark.parametrize(
    "make_tokens",
    [
        lambda lib: _TOKENS,
        lambda lib: _named(lib, _TOKENS, "batch", "seq"),
        lambda lib: _named(lib, _TOKENS, "seq", "batch"),
        lambda lib: _named(
            lib,
            _TOKENS[0, 1],
        ),
    ],
    ids=["positional", "batch-seq", "seq-batch", "scalar"],
)
def test_token_array_html_matches_penzai(make_tokens):
    ours = token_visualization.show_token_array(make_tokens(pz), _Vocab())
    theirs = penzai_token_visualization.show_token_array(make_tokens(penzai_pz), _Vocab())
    assert _html(ours) == _html(theirs)


def test_token_array_structure():
    figure = token_visualization.show_token_array(_TOKENS, _Vocab())
    assert "<treescope-container" in figure._repr_html_()  # displays itself in notebooks
    page = html.unescape(_html(figure))
    assert page.count('class="inline_digitbox"') == _TOKENS.size
    # One labelled row per index of the non-horizontal axis.
    assert "{'axis0': 0}:" in page and "{'axis0': 1}:" in page
    for piece in ("hello", "▁world", "<bos>", "<pad>", "x"):
        assert piece in page
    # A newline piece is shown escaped rather than breaking the row; control tokens are grey.
    assert "\\n" in page and "gray" in page


def test_pieces_that_are_not_text_are_highlighted():
    class BytesVocab(_Vocab):
        def IdToPiece(self, id):
            return b"\xff"

    page = _html(token_visualization.show_token_array(np.array([2]), BytesVocab()))
    assert "orange" in page
    theirs = penzai_token_visualization.show_token_array(np.array([2]), BytesVocab())
    assert page == _html(theirs)


def test_axis_name_order_picks_the_horizontal_axis():
    tokens = _named(pz, _TOKENS, "batch", "seq")
    by_batch = _html(
        token_visualization.show_token_array(tokens, _Vocab(), axis_name_order=("seq", "batch"))
    )
    assert "{'seq': 3}:" in html.unescape(by_batch)
    theirs = penzai_token_visualization.show_token_array(
        _named(penzai_pz, _TOKENS, "batch", "seq"), _Vocab(), axis_name_order=("seq", "batch")
    )
    assert by_batch == _html(theirs)


@pytest.mark.parametrize("vmax", [None, 0.5])
def test_token_scores_html_matches_penzai(vmax):
    ours = token_visualization.show_token_scores(
        _named(pz, _TOKENS, "batch", "seq"),
        _named(pz, _SCORES, "batch", "seq"),
        _Vocab(),
        vmax=vmax,
    )
    theirs = penzai_token_visualization.show_token_scores(
        _named(penzai_pz, _TOKENS, "batch", "seq"),
        _named(penzai_pz, _SCORES, "batch", "seq"),
        _Vocab(),
        vmax=vmax,
    )
    assert _html(ours) == _html(theirs)
    assert "hello" in html.unescape(_html(ours))


def test_scores_broadcast_against_tokens_by_name():
    per_batch = _named(pz, jnp.array([0.0, 1.0]), "batch")
    ours = token_visualization.show_token_scores(
        _named(pz, _TOKENS, "batch", "seq"), per_batch, _Vocab()
    )
    theirs = penzai_token_visualization.show_token_scores(
        _named(penzai_pz, _TOKENS, "batch", "seq"),
        _named(penzai_pz, jnp.array([0.0, 1.0]), "batch"),
        _Vocab(),
    )
    assert _html(ours) == _html(theirs)


def test_conflicting_axis_sizes_are_an_error():
    with pytest.raises(ValueError):
        token_visualization.show_token_scores(
            _named(pz, _TOKENS, "batch", "seq"), _named(pz, np.ones((3,)), "batch"), _Vocab()
        )
