"""What the notebooks download, made locally: a tiny Gemma release and its tokenizer.

The Gemma notebooks fetch a release from Kaggle (an Orbax checkpoint plus a SentencePiece
``tokenizer.model``), then restore it with Orbax and load it with
``gemma_from_pretrained_checkpoint``. `write_fake_release` writes the same files, with
random weights in the release's layout and tiny sizes, so every later cell runs.

The fake releases keep the released head counts (the notebooks index heads up to the last
one) but have only `TINY_BLOCKS` blocks instead of 18 or 28: rendering, compiling and
training time all grow with the block count, and four blocks keep the three Gemma notebooks
within CI's budget. The notebooks write the released block count and a few block indices
literally, so `shrink_block_references` rewrites those (identically for both libraries).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from tests.models.transformer.variants import fake_gemma

VOCAB_SIZE = 512

# The fewest blocks the notebooks can use: the LoRA notebook opens the key/value cache of
# ``body.sublayers[5]`` (block 3), and the induction-head notebooks study two blocks.
TINY_BLOCKS = 4

_TINY_SIZES = {
    "layers": TINY_BLOCKS,
    "vocab_size": VOCAB_SIZE,
    "embedding_dim": 16,
    "projection_dim": 4,
    "mlp_hidden_dim": 32,
}

# Release folder -> (penzai preset name, fake checkpoint with the release's head layout).
RELEASES = {
    "2b": ("gemma_2b", fake_gemma.FakeGemma(heads=8, kv_heads=1, **_TINY_SIZES)),
    "7b": ("gemma_7b", fake_gemma.FakeGemma(heads=16, kv_heads=16, **_TINY_SIZES)),
}

# What the notebooks write about the released block counts, and what it becomes with
# `TINY_BLOCKS` blocks. The induction-head notebooks single out two blocks of the released
# models (11 and 14 of Gemma 2B's 18, 20 and 21 of Gemma 7B's 28); the tiny models use their
# last two blocks, 2 and 3, in the same roles.
BLOCK_REFERENCES = (
    ('{"blocks": 18, "query_heads": 8}', f'{{"blocks": {TINY_BLOCKS}, "query_heads": 8}}'),
    ('{"blocks": 28, "heads": 16}', f'{{"blocks": {TINY_BLOCKS}, "heads": 16}}'),
    (".assert_count_is(18)", f".assert_count_is({TINY_BLOCKS})"),
    (".assert_count_is(28)", f".assert_count_is({TINY_BLOCKS})"),
    ("np.array([11,14,14])", "np.array([2,3,3])"),
    ("np.array([20,21,21,21])", "np.array([2,3,3,3])"),
    ("(11, block_11_induction_heads)", "(2, block_11_induction_heads)"),
    ("(14, block_14_induction_heads)", "(3, block_14_induction_heads)"),
    ("(20, block_20_induction_heads)", "(2, block_20_induction_heads)"),
    ("(21, block_21_induction_heads)", "(3, block_21_induction_heads)"),
)


def shrink_block_references(source: str) -> str:
    """A notebook cell with the released block counts and indices rewritten for the fakes."""
    for released, tiny in BLOCK_REFERENCES:
        source = source.replace(released, tiny)
    return source


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
    # Imported here (like Orbax below): `run_notebook` imports this module for every
    # notebook, and most of them never write a release.
    import sentencepiece

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

    Penzai only loads the released sizes, which it looks up by layer count; this entry
    gives the release's preset the fake's block count and widths. Both libraries get the
    same table entry, so both build the same model. (pz_flax would also infer the sizes from
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
    import orbax.checkpoint

    _, fake = RELEASES[release_dir]
    os.makedirs(weights_dir, exist_ok=True)
    ckpt_path = os.path.join(weights_dir, release_dir)
    if not os.path.exists(ckpt_path):
        params = fake.params(np.float32, seed=0)
        orbax.checkpoint.PyTreeCheckpointer().save(ckpt_path, params)
    tokenizer = os.path.join(weights_dir, "tokenizer.model")
    if not os.path.exists(tokenizer):
        _train_tokenizer(tokenizer, corpus)
