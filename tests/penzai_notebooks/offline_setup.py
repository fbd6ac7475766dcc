"""What the notebooks download, made locally: a tiny Gemma release and its tokenizer.

The Gemma notebooks fetch a release from Kaggle (an Orbax checkpoint plus a SentencePiece
``tokenizer.model``), then restore it with Orbax and load it with
``gemma_from_pretrained_checkpoint``. `write_fake_release` writes the same files, with
random weights in the release's layout and tiny sizes, so every later cell runs as
written. The notebooks hard-code the released layer and head counts, so those are kept.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import orbax.checkpoint
import sentencepiece

from tests.models.transformer.variants import fake_gemma

VOCAB_SIZE = 512

_TINY_WIDTHS = {"embedding_dim": 16, "projection_dim": 4, "mlp_hidden_dim": 32}

# Release folder -> (penzai preset name, fake checkpoint with the release's head layout).
RELEASES = {
    "2b": (
        "gemma_2b",
        fake_gemma.FakeGemma(layers=18, heads=8, kv_heads=1, vocab_size=VOCAB_SIZE, **_TINY_WIDTHS),
    ),
    "7b": (
        "gemma_7b",
        fake_gemma.FakeGemma(
            layers=28, heads=16, kv_heads=16, vocab_size=VOCAB_SIZE, **_TINY_WIDTHS
        ),
    ),
}


def corpus(notebook_dir: str) -> list[str]:
    """Tokenizer training text: the notebooks' own prose, plus digit strings."""
    lines = [" ".join(str(d) for d in range(10)), "0123456789" * 3]
    for name in sorted(os.listdir(notebook_dir)):
        if name.endswith(".ipynb"):
            with open(os.path.join(notebook_dir, name)) as f:
                notebook = json.load(f)
            for cell in notebook["cells"]:
                lines += [line for line in "".join(cell["source"]).splitlines() if line.strip()]
    return lines


def _train_tokenizer(path: str, corpus: list[str]) -> None:
    # Gemma's special ids (pad 0, eos 1, bos 2, unk 3) and single-digit pieces, which the
    # induction-head notebooks rely on.
    partial = f"{path}.partial"
    with open(partial, "wb") as model_file:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_writer=model_file,
            vocab_size=VOCAB_SIZE,
            hard_vocab_limit=False,
            character_coverage=0.99,
            model_type="bpe",
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            user_defined_symbols=[str(d) for d in range(10)],
            minloglevel=2,
        )
    os.replace(partial, path)  # only a complete model is ever found at ``path``


def register_tiny_preset(release_dir: str) -> None:
    """Tells the loaded library's Gemma module the tiny release's sizes.

    Penzai only loads the released sizes, which it looks up by layer count; the fake
    release has the released layer count and tiny widths. Both libraries get the same
    table entry, so both build the same model. (pz_flax would also infer the sizes from
    the checkpoint's shapes.)
    """
    preset_name, fake = RELEASES[release_dir]
    for module_name in (
        "penzai.models.transformer.variants.gemma",
        "pz_flax.models.transformer.variants.gemma",
    ):
        module = sys.modules.get(module_name)
        if module is not None:
            module._GEMMA_PRESETS[preset_name] = {
                **module._GEMMA_PRESETS[preset_name],
                **fake.preset_sizes(),
            }


def write_fake_release(weights_dir: str, release_dir: str, corpus: list[str]) -> None:
    """Writes ``weights_dir/release_dir`` (Orbax) and ``weights_dir/tokenizer.model``."""
    _, fake = RELEASES[release_dir]
    os.makedirs(weights_dir, exist_ok=True)
    ckpt_path = os.path.join(weights_dir, release_dir)
    if not os.path.exists(ckpt_path):
        params = fake.params(np.float32, seed=0)
        orbax.checkpoint.PyTreeCheckpointer().save(ckpt_path, params)
    tokenizer = os.path.join(weights_dir, "tokenizer.model")
    if not os.path.exists(tokenizer):
        _train_tokenizer(tokenizer, corpus)
