"""Smoke test of examples/train_transformer.py: a short data-parallel run on 8 CPU devices."""

import json

import jax
import numpy as np
import pytest

from pz_flax import checkpoint
from pz_flax import pz
from tests.examples import helpers


@pytest.fixture(scope="module")
def example():
    return helpers.load_example("train_transformer.py", "train_transformer")


def parameters_by_label(model) -> dict[str, np.ndarray]:
    return {str(p.label): np.asarray(p.value.data_array) for p in pz.unbind_params(model)[1]}


def test_trains_sharded_samples_and_checkpoints(example, tmp_path, capsys):
    result = example.main(
        ["--quick", "--steps", "24", "--sample-chars", "10", "--out-dir", str(tmp_path)]
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert "\r" not in captured.err and "24/24 loss" in captured.err

    losses = result["losses"]
    assert len(losses) == 24 and np.all(np.isfinite(losses))
    # Uniform guessing over the ~26 tokens costs ln(26) = 3.26 nats; the corpus's letter
    # statistics alone are worth far more than 0.4 of that.
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.4

    # Every parameter lives on all devices of the data-parallel mesh (replicated).
    for param in pz.unbind_params(result["model"])[1]:
        assert len(param.value.data_array.sharding.device_set) == jax.device_count()
    assert f"mesh: {jax.device_count()} cpu device(s)" in printed

    assert len(result["samples"]) == 2
    for text in result["samples"]:
        assert text.startswith("the ") and len(text) == len("the ") + 10
    saved = json.loads((tmp_path / "samples.json").read_text())
    assert saved["samples"] == result["samples"]
    assert set("".join(saved["samples"])) <= set(saved["characters"])

    restored = checkpoint.restore(tmp_path / "checkpoint")
    expected = parameters_by_label(result["model"])
    got = parameters_by_label(restored)
    assert got.keys() == expected.keys()
    for label, value in expected.items():
        np.testing.assert_array_equal(got[label], value, err_msg=label)


def test_corpus_and_vocabulary_are_deterministic_and_reversible(example):
    corpus = example.generate_corpus(num_sentences=50, seed=3)
    assert corpus == example.generate_corpus(num_sentences=50, seed=3)
    assert corpus != example.generate_corpus(num_sentences=50, seed=4)
    vocabulary = example.CharVocabulary("".join(sorted(set(corpus))))
    ids = vocabulary.encode(corpus)
    assert ids.min() == 1 and ids.max() == vocabulary.size - 1
    assert vocabulary.decode(np.concatenate([ids, [example.PAD_ID]])) == corpus


def test_bad_input_is_rejected_with_a_clear_message(example):
    vocabulary = example.CharVocabulary("abc ")
    with pytest.raises(ValueError, match=r"\['z'\] are not in the vocabulary"):
        vocabulary.encode("abz")
    with pytest.raises(ValueError, match="windows of --seq-len 8 need more than 9"):
        example.BatchSampler(np.ones(9, np.int32), batch_size=2, seq_len=8, seed=0, mesh=None)
    for bad_flags in (["--steps", "0"], ["--sample-chars", "-1"], ["--prompt", ""]):
        with pytest.raises(SystemExit):
            example.parse_args(bad_flags)
    args = example.parse_args([])
    assert args.steps == 400 and args.out_dir is None and not args.quick
    assert example.parse_args(["--quick"]).steps == 30
