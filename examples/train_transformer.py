"""A small decoder-only transformer, trained on a character corpus and sampled with a KV cache.

Run it from the repository root (``python examples/train_transformer.py --help``). In a minute
or two on two CPU cores it:

1. generates a character corpus from a tiny English grammar (seeded, so no download and the
   same text every run);
2. builds a pre-norm transformer with ``pz_flax.models.transformer`` (RMS norm, rotary
   position embeddings, causal attention, a ``LayerStack`` of blocks) and creates its weights
   directly on a device mesh with ``pz_flax.toolshed.sharding_util.sharded_init``;
3. trains it with Optax through ``StatefulTrainer``, splitting every batch over all devices
   present by axis name (``{"batch": "data"}``: data parallelism), with a progress line;
4. rewires the trained weights for key/value-cached decoding and samples text.

Set ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` to watch the data-parallel path on
one CPU. With ``--out-dir`` it also saves a pz_flax checkpoint of the trained model (axis names
and structure included) and the sampled text. It runs unchanged as a multi-process JAX job
(README, "Multi-host"): each process loads its own rows of every batch, all of them take part
in the checkpoint save, and only process 0 prints and writes ``samples.json``.
"""

# The imports after the argument parser are deliberate: ``--help`` answers without JAX.
# ruff: noqa: E402

from __future__ import annotations

import argparse
import pathlib

import _job


def parse_args(argv=None) -> argparse.Namespace:
    """The example's settings; ``--quick`` shrinks the model, the corpus and the run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 400)")
    parser.add_argument("--seed", type=int, default=0, help="seed for corpus, init and batches")
    parser.add_argument(
        "--out-dir",
        type=pathlib.Path,
        default=None,
        help="if given, save the trained model's checkpoint and the samples here",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="sequences per step (rounded up to a multiple of the device count)",
    )
    parser.add_argument("--seq-len", type=int, default=64, help="characters per training sequence")
    parser.add_argument("--sample-chars", type=int, default=120, help="characters to sample")
    parser.add_argument("--num-samples", type=int, default=2, help="sequences to sample")
    parser.add_argument("--prompt", default="the ", help="text every sample continues")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.5,
        help="sampling temperature (lower is more conservative)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny model, a short corpus and 30 steps (for smoke tests)",
    )
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 30 if args.quick else 400
    _job.require_positive(
        parser, args, ("steps", "batch_size", "seq_len", "sample_chars", "num_samples")
    )
    if not args.prompt:
        parser.error("--prompt must contain at least one character")
    return args


if __name__ == "__main__":
    parse_args()

import dataclasses
import json

import jax
import numpy as np
import optax

from pz_flax import checkpoint
from pz_flax import pz
from pz_flax.models.transformer import sampling_mode
from pz_flax.models.transformer import simple_decoder
from pz_flax.models.transformer import simple_decoding_loop
from pz_flax.toolshed import basic_training
from pz_flax.toolshed import sharding_util

# Token 0 is padding (the cached decoder never attends to it); characters start at 1.
PAD_ID = 0

_SUBJECTS = (
    "the cat", "a dog", "the old fox", "my friend", "a small bird", "the farmer",
    "her brother", "the tired horse", "a clever girl", "the captain",
)  # fmt: skip
_VERBS = ("sees", "chases", "likes", "finds", "paints", "carries", "hides", "follows")
_OBJECTS = (
    "the red ball", "a wooden box", "the moon", "an apple", "the long road",
    "a green hat", "the river", "some bread", "the lantern", "a paper boat",
)  # fmt: skip
_PLACES = ("", "", " at night", " in the garden", " by the sea", " after dinner")
_ENDINGS = (". ", ". ", "! ")


@dataclasses.dataclass(frozen=True)
class CharVocabulary:
    """Maps characters to token ids and back; id 0 is reserved for padding."""

    characters: str

    @property
    def size(self) -> int:
        return len(self.characters) + 1

    def encode(self, text: str) -> np.ndarray:
        lookup = {character: index + 1 for index, character in enumerate(self.characters)}
        unknown = sorted(set(text) - lookup.keys())
        if unknown:
            raise ValueError(f"Characters {unknown} are not in the vocabulary {self.characters!r}.")
        return np.array([lookup[character] for character in text], dtype=np.int32)

    def decode(self, ids) -> str:
        return "".join(self.characters[i - 1] for i in np.asarray(ids).tolist() if i != PAD_ID)


def generate_corpus(num_sentences: int, seed: int) -> str:
    """Sentences from a small fixed grammar: learnable structure (words, spacing, punctuation)."""
    rng = np.random.default_rng(seed)

    def pick(options):
        return options[rng.integers(len(options))]

    return "".join(
        f"{pick(_SUBJECTS)} {pick(_VERBS)} {pick(_OBJECTS)}{pick(_PLACES)}{pick(_ENDINGS)}"
        for _ in range(num_sentences)
    )


def model_config(vocab_size: int, quick: bool) -> simple_decoder.SimpleDecoderConfig:
    if quick:
        sizes = dict(embedding_dim=32, num_heads=2, projection_dim=16, mlp_hidden_dim=64)
        return simple_decoder.SimpleDecoderConfig(vocab_size=vocab_size, num_blocks=1, **sizes)
    sizes = dict(embedding_dim=96, num_heads=4, projection_dim=24, mlp_hidden_dim=256)
    return simple_decoder.SimpleDecoderConfig(vocab_size=vocab_size, num_blocks=2, **sizes)


def next_token_loss(*, model, state, rng, tokens, targets):
    """Mean cross-entropy of each next character; the vocabulary axis is found by name."""
    del rng
    logits = model(tokens)
    log_probs = pz.nx.nmap(jax.nn.log_softmax)(logits.untag("vocabulary")).tag("vocabulary")
    picked = pz.nx.nmap(lambda row, target: row[target])(log_probs.untag("vocabulary"), targets)
    loss = -picked.untag("batch", "seq").unwrap().mean()
    return loss, state, {"loss": loss}


class BatchSampler:
    """Random windows of the corpus, placed on the mesh with ``batch`` split over ``data``.

    Every process draws the same global batch of window starts and loads only its own rows.
    """

    def __init__(self, token_ids: np.ndarray, batch_size: int, seq_len: int, seed: int, mesh):
        if len(token_ids) <= seq_len + 1:
            raise ValueError(
                f"The corpus has {len(token_ids)} tokens; windows of --seq-len {seq_len} need"
                f" more than {seq_len + 1}."
            )
        self.token_ids, self.batch_size, self.seq_len = token_ids, batch_size, seq_len
        self.rng = np.random.default_rng(seed)
        self.mesh = mesh

    def next(self) -> dict[str, pz.nx.NamedArray]:
        starts = self.rng.integers(0, len(self.token_ids) - self.seq_len - 1, self.batch_size)
        own_starts = _job.own_rows(starts, self.mesh)
        windows = np.stack([self.token_ids[s : s + self.seq_len + 1] for s in own_starts])
        batch = {
            "tokens": pz.nx.wrap(windows[:, :-1]).tag("batch", "seq"),
            "targets": pz.nx.wrap(windows[:, 1:]).tag("batch", "seq"),
        }
        return _job.global_batch(batch, self.mesh)


def train(model, sampler: BatchSampler, steps: int, seed: int) -> list[float]:
    """Trains ``model`` in place; returns the loss of every step."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=3e-3, warmup_steps=max(1, steps // 10), decay_steps=steps
    )
    trainer = basic_training.StatefulTrainer.build(
        root_rng=jax.random.key(seed),
        model=model,
        optimizer_def=optax.adamw(schedule, weight_decay=1e-4),
        loss_fn=next_token_loss,
    )
    report_every = max(1, steps // 50)
    losses = []
    with _job.progress(steps, "training") as update_progress:
        for step in range(1, steps + 1):
            losses.append(trainer.step(**sampler.next())["loss"])
            if step % report_every == 0 or step == steps:
                # Reading a loss back also keeps the queue of dispatched steps short.
                recent = float(np.mean(jax.device_get(losses[-report_every:])))
                update_progress(step, f"loss {recent:.4f}")
    return [float(loss) for loss in jax.device_get(losses)]


def sample_text(model, vocabulary: CharVocabulary, args: argparse.Namespace) -> list[str]:
    """Continues ``args.prompt`` ``args.num_samples`` times with the KV-cached decoder.

    ``model`` must be local to this process (see ``_job.host_local``).
    """
    prompt_ids = vocabulary.encode(args.prompt)
    sampler_model = sampling_mode.KVCachingTransformerLM.from_uncached(
        model,
        cache_len=len(prompt_ids) + args.sample_chars,
        batch_axes={"batch": args.num_samples},
        pad_id=PAD_ID,
    )
    prompt = pz.nx.wrap(np.tile(prompt_ids, (args.num_samples, 1))).tag("batch", "seq")
    sampled = simple_decoding_loop.temperature_sample_pyloop(
        sampler_model,
        prompt,
        rng=jax.random.key(args.seed + 1),
        temperature=args.temperature,
        max_sampling_steps=args.sample_chars,
    )
    rows = np.asarray(sampled.unwrap("batch", "seq"))
    return [args.prompt + vocabulary.decode(row) for row in rows]


def main(argv=None) -> dict:
    """Runs the example; returns the losses, the samples and the paths written (for tests)."""
    args = parse_args(argv)
    _job.join()
    corpus = generate_corpus(num_sentences=400 if args.quick else 3000, seed=args.seed)
    vocabulary = CharVocabulary("".join(sorted(set(corpus))))
    token_ids = vocabulary.encode(corpus)
    _job.log(f"corpus: {len(corpus)} characters, vocabulary of {vocabulary.size} tokens")
    _job.log(f"  e.g. {corpus[:78]!r}")

    mesh = _job.data_parallel_mesh()
    batch_size = _job.global_batch_size(args.batch_size, mesh)
    _job.log(
        f"mesh: {mesh.devices.size} {jax.devices()[0].platform} device(s) in"
        f" {jax.process_count()} process(es) on axis 'data'; batch axis 'batch'"
        f" ({batch_size} sequences) split over it"
    )

    config = model_config(vocabulary.size, args.quick)
    model = sharding_util.sharded_init(
        simple_decoder.build_simple_decoder,
        config,
        init_base_rng=jax.random.key(args.seed),
        mesh=mesh,
        axis_name_to_mesh_name=_job.DATA_PARALLEL,
    )
    num_weights = sum(p.value.data_array.size for p in pz.unbind_params(model)[1])
    _job.log(
        f"model: {config.num_blocks} block(s), {config.num_heads} heads, embedding"
        f" {config.embedding_dim}, {num_weights} weights"
    )

    sampler = BatchSampler(token_ids, batch_size, args.seq_len, args.seed + 2, mesh)
    losses = train(model, sampler, args.steps, args.seed)
    window = max(1, min(10, len(losses) // 4))
    first, last = np.mean(losses[:window]), np.mean(losses[-window:])
    _job.log(f"loss: {first:.4f} (first {window} steps) -> {last:.4f} (last {window} steps)")

    samples = sample_text(_job.host_local(model), vocabulary, args)
    _job.log(f"KV-cached samples (temperature {args.temperature}):")
    for text in samples:
        _job.log(f"  {text!r}")

    written = {}
    if args.out_dir is not None:
        out_dir = args.out_dir.resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        # Every process saves (the save is collective); one writes the samples.
        written["checkpoint"] = checkpoint.save(out_dir / "checkpoint", model, force=True)
        written["samples"] = out_dir / "samples.json"
        if _job.is_primary():
            written["samples"].write_text(
                json.dumps({"characters": vocabulary.characters, "samples": samples}, indent=1)
            )
        _job.log("outputs:")
        for kind, path in written.items():
            _job.log(f"  {kind}: {path}")
    return {"losses": losses, "samples": samples, "model": model, "written": written}


if __name__ == "__main__":
    main()
