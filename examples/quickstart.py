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
6. writes a treescope HTML view of the model (arrays drawn by treescope's array
   visualisation) and a PNG loss curve.

Batches are split by their ``batch`` axis over every device present (data parallelism), and
the script runs unchanged as a multi-process JAX job (README, "Multi-host"): each process
loads its own rows of every batch, all of them take part in the checkpoint save, and only
process 0 prints and writes the other files.
"""

# The imports after the argument parser are deliberate: ``--help`` answers without JAX.
# ruff: noqa: E402

from __future__ import annotations

import argparse
import pathlib

import _job


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--epochs", type=int, default=None, help="passes over the training set (default 30)"
    )
    parser.add_argument(
        "--out-dir",
        type=pathlib.Path,
        default=pathlib.Path("quickstart_out"),
        help="where the checkpoint, HTML view and loss curve go",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for init, split and shuffling")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per step (rounded up to a multiple of the device count)",
    )
    parser.add_argument(
        "--hidden", type=int, default=None, help="width of the hidden layer (default 128)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="8 epochs of a 64-wide model (for smoke tests)"
    )
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 8 if args.quick else 30
    if args.hidden is None:
        args.hidden = 64 if args.quick else 128
    _job.require_positive(parser, args, ("epochs", "batch_size", "hidden"))
    return args


if __name__ == "__main__":
    parse_args()

import json
import subprocess
import sys
import textwrap

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
from pz_flax.toolshed import sharding_util

NUM_PIXELS = 64
NUM_CLASSES = 10


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


def train(model, train_set, mesh, args) -> list[float]:
    """Trains ``model`` in place; returns the mean loss of every epoch."""
    images, labels = train_set
    trainer = basic_training.StatefulTrainer.build(
        root_rng=jax.random.key(args.seed),
        model=model,
        optimizer_def=optax.adam(3e-3),
        loss_fn=cross_entropy_loss,
    )
    shuffle = np.random.default_rng(args.seed + 1)
    batch_size = _job.global_batch_size(args.batch_size, mesh)
    steps_per_epoch = len(labels) // batch_size
    losses = []
    with _job.progress(args.epochs, "training") as update_progress:
        for epoch in range(args.epochs):
            order = shuffle.permutation(len(labels))
            epoch_losses = []
            for step in range(steps_per_epoch):
                rows = _job.own_rows(order[step * batch_size : (step + 1) * batch_size], mesh)
                batch = {
                    "images": pz.nx.wrap(images[rows]).tag("batch", "pixels"),
                    "labels": pz.nx.wrap(labels[rows]).tag("batch"),
                }
                epoch_losses.append(trainer.step(**_job.global_batch(batch, mesh))["loss"])
            losses.append(float(np.mean(jax.device_get(epoch_losses))))
            update_progress(epoch + 1, f"loss {losses[-1]:.4f}")
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


def write_model_view(model, path: pathlib.Path) -> None:
    """The model as treescope HTML, every array drawn by treescope's array visualisation."""
    with treescope.active_autovisualizer.set_scoped(treescope.ArrayAutovisualizer()):
        path.write_text(treescope.render_to_html(model, compressed=False))


def main(argv=None) -> float:
    args = parse_args(argv)
    _job.join()
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    train_set, (test_images, test_labels) = load_digits(args.seed)

    mesh = _job.data_parallel_mesh()
    model = sharding_util.sharded_init(
        build_classifier,
        args.seed,
        args.hidden,
        mesh=mesh,
        axis_name_to_mesh_name=_job.DATA_PARALLEL,
    )
    _job.log(
        f"model: {len(jax.tree_util.tree_leaves(model))} parameter arrays,"
        f" {sum(x.size for x in jax.tree_util.tree_leaves(model))} weights;"
        f" batches split over {mesh.devices.size} device(s) in {jax.process_count()} process(es)"
    )
    losses = train(model, train_set, mesh, args)

    # Every process saves: the save is collective. The rest works on a local copy.
    checkpoint_dir = out_dir / "checkpoint"
    checkpoint.save(checkpoint_dir, model, force=True)
    model = _job.host_local(model)
    test_predictions = predict(model, test_images)
    accuracy = float(np.mean(test_predictions == test_labels))
    _job.log(f"test accuracy: {accuracy:.2f}")
    if not _job.is_primary():
        return accuracy

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
    write_model_view(model, html_file)
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
