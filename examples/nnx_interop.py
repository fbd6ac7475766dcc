"""NNX interop: look inside a Flax NNX transformer block the penzai way, patch it, train on.

The workflow of a Flax NNX team that wants penzai's tools without leaving NNX:

1. build (and briefly train) an ordinary ``nnx.Module`` transformer block;
2. ``pz_flax.interop.from_nnx`` turns it into a pz_flax layer: the same arrays (nothing is
   copied), now with axis names (``features``, ``heads``, ``projection``, ...) and labels
   equal to the NNX state paths; its output is checked against the NNX block's;
3. the layer is rendered with treescope to an HTML file, and summarised as a table;
4. a selector patches it: the MLP's GELU becomes a ReLU, and attention head 0 is switched off
   by zeroing its slice of the output projection (a named-axis edit: ``heads`` is a name);
5. ``pz_flax.interop.to_nnx`` turns the patched layer back into a ``TransformerBlock`` (the
   user's own class, with the same ``nnx.state`` paths), which keeps training with
   ``nnx.Optimizer`` under ``nnx.jit``.

Run ``python examples/nnx_interop.py --help`` for the settings; the defaults take a few seconds.
"""

# The imports after the argument parser are deliberate: ``--help`` answers without JAX.
# ruff: noqa: E402

from __future__ import annotations

import argparse
import pathlib

import _job

# Sizes of the full run and of --quick (a smoke test): features, heads, hidden, seq, batch, steps.
DEFAULTS = dict(features=32, heads=4, hidden=64, seq=8, batch=16, steps=50)
QUICK = dict(features=8, heads=2, hidden=16, seq=4, batch=4, steps=4)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flags = {
        "features": "width of the block (the 'features' axis)",
        "heads": "attention heads (must divide --features)",
        "hidden": "width of the MLP's hidden layer",
        "seq": "sequence length",
        "batch": "sequences in the training batch",
        "steps": "NNX training steps before and after the patch",
    }
    for flag, text in flags.items():
        parser.add_argument(
            f"--{flag}", type=int, default=None, help=f"{text} (default {DEFAULTS[flag]})"
        )
    parser.add_argument("--seed", type=int, default=0, help="seed for the task and the init")
    parser.add_argument(
        "--out-dir",
        type=pathlib.Path,
        default=pathlib.Path("nnx_interop_out"),
        help="where the treescope HTML view goes",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny block and 4 steps (for smoke tests)"
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else DEFAULTS
    for flag in flags:
        if getattr(args, flag) is None:
            setattr(args, flag, sizes[flag])
    _job.require_positive(parser, args, flags)
    if args.features % args.heads:
        parser.error(f"--heads {args.heads} must divide --features {args.features}")
    return args


if __name__ == "__main__":
    parse_args()

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import treescope
from flax import nnx

from pz_flax import interop
from pz_flax import pz


class TransformerBlock(nnx.Module):
    """A pre-norm transformer block written in plain Flax NNX."""

    def __init__(self, features: int, heads: int, hidden: int, *, rngs: nnx.Rngs):
        self.attention_norm = nnx.LayerNorm(features, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(heads, features, decode=False, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(features, rngs=rngs)
        self.mlp = nnx.Sequential(
            nnx.Linear(features, hidden, rngs=rngs),
            nnx.gelu,
            nnx.Linear(hidden, features, rngs=rngs),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


def make_task(args: argparse.Namespace):
    """A toy regression task: match a fixed random 'teacher' block on random sequences."""
    teacher = TransformerBlock(args.features, args.heads, args.hidden, rngs=nnx.Rngs(args.seed + 1))
    inputs = jax.random.normal(
        jax.random.key(args.seed), (args.batch, args.seq, args.features), jnp.float32
    )
    return inputs, teacher(inputs)


@nnx.jit
def train_step(model, optimizer, inputs, targets):
    def loss_fn(model):
        return jnp.mean((model(inputs) - targets) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def train(model, inputs, targets, steps: int) -> list[float]:
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    return [float(train_step(model, optimizer, inputs, targets)) for _ in range(steps)]


def patch(layer):
    """The selector edits: GELU -> ReLU in the MLP, and attention head 0 switched off."""
    layer = (
        pz.select(layer)
        .at_instances_of(pz.nn.Elementwise)
        .where(lambda elementwise: elementwise.fn is jax.nn.gelu)
        .apply(lambda _: pz.nn.Elementwise(jax.nn.relu))
    )

    def silence_head_zero(linear):
        weights = linear.weights.value
        keep = pz.nx.wrap(jnp.arange(weights.named_shape["heads"]) != 0).tag("heads")
        return dataclasses.replace(
            linear,
            weights=pz.Parameter(
                value=pz.nx.nmap(jnp.where)(keep, weights, 0.0), label=linear.weights.label
            ),
        )

    return (
        pz.select(layer)
        .at_instances_of(pz.nn.Linear)
        .where(lambda linear: linear.weights.label == "attention/out/kernel")
        .apply(silence_head_zero)
    )


def state_paths(module) -> set[tuple]:
    return {path for path, _ in nnx.to_flat_state(nnx.state(module))}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs, targets = make_task(args)
    names = ("batch", "seq", "features")

    block = TransformerBlock(args.features, args.heads, args.hidden, rngs=nnx.Rngs(args.seed))
    before = train(block, inputs, targets, args.steps)
    print(f"NNX training: loss {before[0]:.4f} -> {before[-1]:.4f}")

    layer = interop.from_nnx(block)
    pz_output = layer(pz.nx.wrap(inputs).tag(*names)).unwrap(*names)
    difference = float(jnp.max(jnp.abs(pz_output - block(inputs))))
    shared = block.mlp.layers[0].kernel.get_value() is (
        layer.children["mlp"].layer.sublayers[0].layer.sublayers[0].weights.get_value()
    )
    print(f"from_nnx: max |pz - nnx| = {difference:.2e}; weights shared, not copied: {shared}")
    print(interop.summary(layer))

    html_file = out_dir / "transformer_block.html"
    html_file.write_text(treescope.render_to_html(layer, compressed=False))
    print(f"treescope view written to {html_file}")

    patched_layer = patch(layer)
    patched = interop.to_nnx(patched_layer)
    patched_output = patched_layer(pz.nx.wrap(inputs).tag(*names)).unwrap(*names)
    same_paths = state_paths(patched) == state_paths(block)
    patched_matches = bool(np.allclose(patched(inputs), patched_output, atol=1e-5))
    head_zero = np.asarray(patched.attention.out.kernel.get_value()[0])
    print(
        f"to_nnx: a {type(patched).__name__} again (same nnx.state paths: {same_paths}); its"
        f" output matches the patched pz layer: {patched_matches}; head 0 silenced:"
        f" {not head_zero.any()}; MLP activation: {patched.mlp.layers[1].__name__}"
    )
    after = train(patched, inputs, targets, args.steps)
    print(f"NNX training of the patched block: loss {after[0]:.4f} -> {after[-1]:.4f}")
    return {
        "difference": difference,
        "weights_shared": shared,
        "patched_type": type(patched).__name__,
        "same_state_paths": same_paths,
        "patched_matches": patched_matches,
        "head_zero_silenced": not head_zero.any(),
        "losses_before": before,
        "losses_after": after,
        "html_file": html_file,
    }


if __name__ == "__main__":
    main()
