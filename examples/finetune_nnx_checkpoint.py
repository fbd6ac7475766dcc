"""LoRA fine-tuning of a Flax NNX checkpoint with pz_flax, written back as an NNX checkpoint.

The situation: a team trains its models in Flax NNX and keeps them as Orbax checkpoints of
``nnx.state(model)``. It wants to fine-tune one cheaply with low-rank adapters (LoRA) without
rewriting the model, and hand the result back to NNX code that knows nothing of pz_flax.

Run it from the repository root (``python examples/finetune_nnx_checkpoint.py --help``); it
takes seconds. Stage by stage it:

1. trains a small NNX regression model (``nnx.Linear``/``nnx.LayerNorm`` in a user-defined
   class) on task A with ``nnx.Optimizer`` and saves ``nnx.state(model)`` with
   ``orbax.checkpoint.StandardCheckpointer``: an ordinary NNX checkpoint;
2. reads that checkpoint into pz_flax (``pz_flax.checkpoint.read_nnx_checkpoint``), which
   gives the same computation as named-axis layers; the user's class becomes a wrapper that
   runs its own ``__call__`` around the converted ``nnx.Linear`` layers;
3. marks every pretrained parameter ``trainable=False`` and, with
   ``pz_flax.toolshed.lora.loraify_linears_in_selection`` on a selection of the dense layers,
   replaces each of their ``Linear``s with a ``LowRankAdapter`` (the frozen ``Linear`` plus a
   trainable rank-r update whose second factor starts at zero, so the adapted model starts out
   computing exactly what the pretrained one did);
4. fine-tunes on task B (a low-rank change of task A) with ``StatefulTrainer`` and Optax and
   checks that only the adapter parameters moved;
5. merges each adapter into its base kernel (``W + A @ B``, with
   ``lora.merge_lora_adapters_in_selection``), because the NNX class has no LoRA slots, and
   writes the result with ``pz_flax.checkpoint.write_nnx_checkpoint``;
6. restores that checkpoint with plain Orbax into
   ``nnx.state(nnx.eval_shape(factory))`` and checks that the NNX model predicts what the
   fine-tuned pz_flax model predicts.

It runs unchanged as a multi-process JAX job (README, "Multi-host"): fine-tuning is data
parallel over every device of every process, each process loading its own rows; every
process takes part in each checkpoint save, and only process 0 prints.
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
        "--out-dir",
        type=pathlib.Path,
        default=pathlib.Path("finetune_out"),
        help="where the two NNX checkpoints go",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the tasks and the init")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="NNX steps on task A")
    parser.add_argument("--steps", type=int, default=300, help="LoRA fine-tuning steps on task B")
    parser.add_argument("--rank", type=int, default=2, help="rank of each adapter")
    parser.add_argument("--features", type=int, default=16, help="inputs of the regression")
    parser.add_argument("--hidden", type=int, default=64, help="width of the hidden layer")
    parser.add_argument("--outputs", type=int, default=4, help="outputs of the regression")
    parser.add_argument("--quick", action="store_true", help="40 + 40 steps (for smoke tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.steps = 40, 40
    _job.require_positive(
        parser, args, ("pretrain_steps", "steps", "rank", "features", "hidden", "outputs")
    )
    return args


if __name__ == "__main__":
    parse_args()

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from pz_flax import checkpoint
from pz_flax import pz
from pz_flax.interop import wrappers
from pz_flax.toolshed import basic_training
from pz_flax.toolshed import lora

TRAIN_EXAMPLES = 512


class RegressionMLP(nnx.Module):
    """The NNX team's model: dense, layer norm, ReLU, dense. Nothing pz_flax-specific."""

    def __init__(self, num_features: int, hidden: int, num_outputs: int, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(num_features, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, num_outputs, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(nnx.relu(self.norm(self.up(x))))


def freeze_all_parameters(model):
    """Marks every parameter ``trainable=False`` (the trainer then never updates it)."""
    return (
        pz.select(model)
        .at_instances_of(pz.Parameter)
        .apply(
            lambda param: pz.Parameter(
                value=param.value,
                label=param.label,
                metadata={**param.metadata, "trainable": False},
            )
        )
    )


def add_lora_adapters(model, rank: int, seed: int):
    """Puts a ``LowRankAdapter`` around the kernel of every converted ``nnx.Linear``.

    Only dense layers are selected: the layer norm's scale is also a ``Linear`` (with no input
    or output axes) and stays as it is. The adapter parameters are labelled after where they
    sit in the model (``LoRA:<path>/LoRA_A.weights``), as in penzai.
    """
    dense_layers = (
        pz.select(model)
        .at_instances_of(wrappers.FromNNX)
        .where(lambda converted: converted.nnx_type is nnx.Linear)
    )
    return lora.loraify_linears_in_selection(
        dense_layers, rank=rank, init_base_rng=jax.random.key(seed)
    )


def parameter_arrays(model) -> dict[str, np.ndarray]:
    """Every parameter's value by label, copied to host memory (a snapshot)."""
    _, params = pz.unbind_params(model)
    return {str(param.label): np.array(param.value.data_array) for param in params}


def make_tasks(num_features: int, num_outputs: int, seed: int):
    """Two regression teachers: task B is task A's linear map plus a rank-2 change."""
    rng = np.random.default_rng(seed)
    teacher_a = rng.normal(size=(num_features, num_outputs)) / np.sqrt(num_features)
    change = rng.normal(size=(num_features, 2)) @ rng.normal(size=(2, num_outputs))
    teacher_b = teacher_a + 0.5 * change / np.sqrt(num_features)

    def sample(teacher, num_examples, sample_seed):
        inputs = np.random.default_rng(sample_seed).normal(size=(num_examples, num_features))
        return inputs.astype(np.float32), np.tanh(inputs @ teacher).astype(np.float32)

    return functools.partial(sample, teacher_a), functools.partial(sample, teacher_b)


def pretrain_nnx_model(factory, task_a, steps: int) -> nnx.Module:
    """Stage 1: ordinary Flax NNX training, as the NNX team would have done it."""
    model = factory()
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, inputs, targets):
        def loss_fn(model):
            return jnp.mean((model(inputs) - targets) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    inputs, targets = task_a(num_examples=TRAIN_EXAMPLES, sample_seed=1)
    for _ in range(steps):
        loss = train_step(model, optimizer, inputs, targets)
    _job.log(f"[1] pretrained the NNX model on task A: loss {float(loss):.4f}")
    return model


def mean_squared_error(*, model, state, rng, inputs, targets):
    del rng
    error = model(inputs) - targets
    loss = (error**2).untag("batch", "features").unwrap().mean()
    return loss, state, {"loss": loss}


def named(array: np.ndarray) -> pz.nx.NamedArray:
    return pz.nx.wrap(jnp.asarray(array)).tag("batch", "features")


def main(argv=None) -> dict:
    """Runs every stage; returns what the smoke test checks."""
    args = parse_args(argv)
    _job.join()
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    mesh = _job.data_parallel_mesh()

    def factory() -> RegressionMLP:
        return RegressionMLP(args.features, args.hidden, args.outputs, rngs=nnx.Rngs(args.seed))

    task_a, task_b = make_tasks(args.features, args.outputs, args.seed)

    # Stage 1: an NNX checkpoint, written the plain NNX way. Every process pretrained the same
    # model; saving it from a multi-process job takes global arrays, hence the replicated copy.
    nnx_model = pretrain_nnx_model(factory, task_a, args.pretrain_steps)
    pretrained_dir = out_dir / "pretrained_nnx"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(pretrained_dir, _job.replicated(nnx.state(nnx_model), mesh), force=True)
    _job.log(f"    saved nnx.state(model) with StandardCheckpointer: {pretrained_dir}")

    # Stage 2: into pz_flax.
    pretrained = checkpoint.read_nnx_checkpoint(pretrained_dir, factory)
    test_inputs, test_targets = task_b(num_examples=256, sample_seed=3)
    same = np.allclose(
        pretrained(named(test_inputs)).unwrap("batch", "features"),
        nnx_model(jnp.asarray(test_inputs)),
        atol=1e-6,
    )
    _job.log(
        f"[2] read it as a pz_flax {type(pretrained).__name__} around"
        f" {pz.select(pretrained).at_instances_of(wrappers.FromNNX).count()} converted layers;"
        f" same outputs as the NNX model: {same}"
    )

    # Stage 3: freeze, then adapt.
    model = add_lora_adapters(freeze_all_parameters(pretrained), args.rank, args.seed + 1)
    before = parameter_arrays(model)
    adapter_labels = {label for label in before if label.startswith("LoRA:")}
    num_adapters = pz.select(model).at_instances_of(lora.LowRankAdapter).count()
    _job.log(
        f"[3] froze {len(before) - len(adapter_labels)} pretrained parameters and added"
        f" {num_adapters} rank-{args.rank} adapters"
        f" ({sum(before[label].size for label in adapter_labels)} trainable weights)"
    )

    # Stage 4: fine-tune on task B, data parallel; only adapter parameters may move.
    train_inputs, train_targets = task_b(num_examples=TRAIN_EXAMPLES, sample_seed=2)

    def task_b_test_loss(layer) -> float:
        predictions = _job.host_local(layer)(named(test_inputs)).unwrap("batch", "features")
        return float(jnp.mean((predictions - test_targets) ** 2))

    model = _job.replicated(model, mesh)
    loss_before = task_b_test_loss(model)
    trainer = basic_training.StatefulTrainer.build(
        root_rng=jax.random.key(args.seed),
        model=model,
        optimizer_def=optax.adam(1e-2),
        loss_fn=mean_squared_error,
    )
    rows = _job.own_rows(np.arange(TRAIN_EXAMPLES), mesh)
    local_batch = {"inputs": named(train_inputs[rows]), "targets": named(train_targets[rows])}
    batch = _job.global_batch(local_batch, mesh)
    for _ in range(args.steps):
        trainer.step(**batch)
    loss_after = task_b_test_loss(model)
    after = parameter_arrays(model)
    moved = {label for label in before if not np.array_equal(before[label], after[label])}
    base_unchanged = not (moved - adapter_labels)
    _job.log(
        f"[4] fine-tuned {args.steps} steps: task B test loss {loss_before:.4f} ->"
        f" {loss_after:.4f}; parameters that changed: {len(moved)}, all of them adapter"
        f" parameters: {base_unchanged}"
    )
    if not base_unchanged:
        raise SystemExit(f"frozen parameters changed during fine-tuning: {sorted(moved)}")

    # Stage 5: merge (RegressionMLP has no LoRA slots) and write an NNX checkpoint, from every
    # process (the save is collective).
    merged = lora.merge_lora_adapters_in_selection(pz.select(model))
    finetuned_dir = checkpoint.write_nnx_checkpoint(out_dir / "finetuned_nnx", merged, force=True)
    merged, model = _job.host_local(merged), _job.host_local(model)
    merged_predictions = merged(named(test_inputs)).unwrap("batch", "features")
    adapted_predictions = model(named(test_inputs)).unwrap("batch", "features")
    merge_error = float(jnp.max(jnp.abs(merged_predictions - adapted_predictions)))
    _job.log(
        f"[5] {type(nnx_model).__name__} has no LoRA slots, so merged each adapter into its"
        f" base kernel (W + A B; max output change {merge_error:.1e}) and wrote an NNX"
        f" checkpoint: {finetuned_dir}"
    )

    # Stage 6: plain Flax NNX + Orbax, no pz_flax involved; each process restores onto a device
    # of its own.
    abstract_model = nnx.eval_shape(factory)
    on_this_process = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=on_this_process),
        nnx.state(abstract_model),
    )
    with ocp.StandardCheckpointer() as checkpointer:
        restored_state = checkpointer.restore(finetuned_dir, target)
    nnx.update(abstract_model, restored_state)
    restored_predictions = abstract_model(jnp.asarray(test_inputs))
    restored_error = float(jnp.max(jnp.abs(restored_predictions - adapted_predictions)))
    _job.log(
        f"[6] restored it into nnx.state(nnx.eval_shape(factory)) with plain Orbax: a"
        f" {type(abstract_model).__name__} whose predictions differ from the fine-tuned pz_flax"
        f" model's by at most {restored_error:.1e}"
    )
    if not same or restored_error > 1e-5:
        raise SystemExit("a converted or restored model disagrees with the one it came from")
    return {
        "pretrained_dir": pretrained_dir,
        "finetuned_dir": finetuned_dir,
        "factory": factory,
        "adapter_labels": adapter_labels,
        "parameters_before": before,
        "parameters_after": after,
        "task_b_loss": (loss_before, loss_after),
        "merged_parameters": parameter_arrays(merged),
        "adapted_predictions": np.asarray(adapted_predictions),
        "test_inputs": test_inputs,
    }


if __name__ == "__main__":
    main()
