"""The main job: a named-axis digit classifier, trained, checkpointed, restored and converted.

Run it with README's first command (or ``python examples/quickstart.py --help``). In about a
minute on two CPU cores it:

1. builds a two-layer classifier from pz_flax layers, every activation a NamedArray with axes
   ``batch``, ``pixels``, ``neurons`` and ``classes``;
2. trains it with Optax (``StatefulTrainer``) on scikit-learn's bundled 8x8 digits (no
   download), with a progress bar;
3. reports test accuracy;
4. saves an Orbax checkpoint with the model's structure and axis names, and restores it in a
   fresh Python process that never sees this file;
5. converts the model to a Flax NNX module and checks that it predicts identically;
6. writes a treescope HTML view of the model and a PNG loss curve.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import treescope
from flax import nnx

import pz_flax
from pz_flax import checkpoint
from pz_flax import pz
from pz_flax.toolshed import basic_training

NUM_PIXELS = 64
NUM_CLASSES = 10


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    parser.add_argument(
        "--out-dir",
        type=pathlib.Path,
        default=pathlib.Path("quickstart_out"),
        help="where the checkpoint, HTML view and loss curve go",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for init, split and shuffling")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128, help="width of the hidden layer")
    return parser.parse_args(argv)


def load_digits(seed: int):
    """The 1797 8x8 digit images bundled with scikit-learn, split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    return (images[train], labels[train]), (images[test], labels[test])


def build_classifier(seed: int, hidden: int) -> pz.nn.Layer:
    """pixels -> neurons -> classes, with names on every axis."""
    rng = jax.random.key(seed)
    return pz.nn.Sequential(
        [
            pz.nn.Affine.from_config(
                name="hidden",
                init_base_rng=rng,
                input_axes={"pixels": NUM_PIXELS},
                output_axes={"neurons": hidden},
            ),
            pz.nn.Elementwise(jax.nn.relu),
            pz.nn.Affine.from_config(
                name="logits",
                init_base_rng=rng,
                input_axes={"neurons": hidden},
                output_axes={"classes": NUM_CLASSES},
            ),
        ]
    )


def as_named_batch(images: np.ndarray) -> pz.nx.NamedArray:
    return pz.nx.wrap(jnp.asarray(images)).tag("batch", "pixels")


def cross_entropy_loss(*, model, state, rng, images, labels):
    """Mean softmax cross-entropy; the class axis is picked out by name, not position."""
    del rng
    logits = model(images)
    log_probs = pz.nx.nmap(jax.nn.log_softmax)(logits.untag("classes")).tag("classes")
    picked = pz.nx.nmap(lambda lp, label: lp[label])(log_probs.untag("classes"), labels)
    loss = -picked.untag("batch").unwrap().mean()
    return loss, state, {"loss": loss}


def predict(model, images: np.ndarray) -> np.ndarray:
    logits = model(as_named_batch(images))
    return np.asarray(logits.untag("classes").argmax().unwrap("batch"))


class ProgressBar:
    """A one-line text progress bar on stderr (no extra dependency)."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width, self.start = total, width, time.perf_counter()

    def update(self, done: int, message: str) -> None:
        filled = int(self.width * done / self.total)
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "." * (self.width - filled)
        sys.stderr.write(f"\r[{bar}] {done}/{self.total} {message} ({elapsed:.1f}s)")
        if done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def train(model, train_set, args) -> list[float]:
    images, labels = train_set
    trainer = basic_training.StatefulTrainer.build(
        root_rng=jax.random.key(args.seed),
        model=model,
        optimizer_def=optax.adam(3e-3),
        loss_fn=cross_entropy_loss,
    )
    shuffle = np.random.default_rng(args.seed + 1)
    steps_per_epoch = len(labels) // args.batch_size
    progress = ProgressBar(args.epochs)
    losses = []
    for epoch in range(args.epochs):
        order = shuffle.permutation(len(labels))
        epoch_losses = []
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            aux = trainer.step(
                images=as_named_batch(images[batch]),
                labels=pz.nx.wrap(jnp.asarray(labels[batch])).tag("batch"),
            )
            epoch_losses.append(aux["loss"])
        losses.append(float(np.mean(jax.device_get(epoch_losses))))
        progress.update(epoch + 1, f"loss {losses[-1]:.4f}")
    return losses


# Runs in a separate interpreter: it only knows pz_flax and the checkpoint's path.
RESTORE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from pz_flax import checkpoint, pz
    model = checkpoint.restore(sys.argv[1])
    images = np.load(sys.argv[2])
    logits = model(pz.nx.wrap(images).tag("batch", "pixels"))
    predictions = logits.untag("classes").argmax().unwrap("batch")
    print(json.dumps({"type": type(model).__name__, "predictions": np.asarray(predictions).tolist()}))
    """
)


def restore_in_fresh_process(checkpoint_dir: pathlib.Path, images_file: pathlib.Path) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", RESTORE_SCRIPT, str(checkpoint_dir), str(images_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"restoring in a fresh process failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def write_loss_curve(losses: list[float], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3)
    axes.set_xlabel("epoch")
    axes.set_ylabel("training loss (cross-entropy)")
    axes.set_yscale("log")
    axes.set_title("pz_flax quickstart: digits classifier")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> float:
    args = parse_args(argv)
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    train_set, (test_images, test_labels) = load_digits(args.seed)

    model = build_classifier(args.seed, args.hidden)
    print(
        f"model: {len(jax.tree_util.tree_leaves(model))} parameter arrays,"
        f" {sum(x.size for x in jax.tree_util.tree_leaves(model))} weights"
    )
    losses = train(model, train_set, args)

    test_predictions = predict(model, test_images)
    accuracy = float(np.mean(test_predictions == test_labels))
    print(f"test accuracy: {accuracy:.2f}")

    checkpoint_dir = out_dir / "checkpoint"
    checkpoint.save(checkpoint_dir, model, force=True)
    images_file = out_dir / "test_images.npy"
    np.save(images_file, test_images)
    restored = restore_in_fresh_process(checkpoint_dir, images_file)
    restored_match = np.array_equal(restored["predictions"], test_predictions)
    print(
        f"restored a {restored['type']} in a fresh process without the model code;"
        f" predictions identical: {restored_match}"
    )

    nnx_model = pz_flax.to_nnx(model)
    nnx_logits = nnx_model(as_named_batch(test_images))
    nnx_predictions = np.asarray(nnx_logits.untag("classes").argmax().unwrap("batch"))
    nnx_params = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(nnx_model, nnx.Param)))
    print(
        f"converted to Flax NNX ({type(nnx_model).__name__}, {nnx_params} parameters in"
        f" nnx.state); predictions identical: {np.array_equal(nnx_predictions, test_predictions)}"
    )

    html_file = out_dir / "model.html"
    html_file.write_text(treescope.render_to_html(model, compressed=False))
    curve_file = out_dir / "loss_curve.png"
    write_loss_curve(losses, curve_file)

    print("outputs:")
    print(f"  checkpoint:     {checkpoint_dir}")
    print(f"  treescope view: {html_file}")
    print(f"  loss curve:     {curve_file}")
    if not (restored_match and np.array_equal(nnx_predictions, test_predictions)):
        raise SystemExit("restored or converted model disagrees with the trained one")
    return accuracy


if __name__ == "__main__":
    main()
