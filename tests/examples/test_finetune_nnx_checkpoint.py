"""Smoke test of examples/finetune_nnx_checkpoint.py: NNX checkpoint -> LoRA -> NNX checkpoint."""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE_LABELS = {"up/kernel", "up/bias", "norm/scale", "norm/bias", "down/kernel", "down/bias"}


def load_example():
    path = ROOT / "examples" / "finetune_nnx_checkpoint.py"
    spec = importlib.util.spec_from_file_location("finetune_nnx_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the module is being executed.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


def restore_plain_nnx(path, factory) -> nnx.Module:
    """What an NNX user does, with no pz_flax involved."""
    model = nnx.eval_shape(factory)
    with ocp.StandardCheckpointer() as checkpointer:
        nnx.update(model, checkpointer.restore(path, nnx.state(model)))
    return model


def state_arrays(module: nnx.Module) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(module))
    return {"/".join(map(str, path)): np.asarray(variable.get_value()) for path, variable in flat}


def test_lora_finetune_round_trip(example, tmp_path, capsys):
    result = example.main(["--quick", "--out-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    for stage in range(1, 7):
        assert f"[{stage}]" in printed
    before, after = result["parameters_before"], result["parameters_after"]

    # The pz_flax model read from the NNX checkpoint holds exactly the checkpoint's arrays.
    pretrained = state_arrays(restore_plain_nnx(result["pretrained_dir"], result["factory"]))
    assert pretrained.keys() == BASE_LABELS
    for label in BASE_LABELS:
        np.testing.assert_array_equal(before[label], pretrained[label], err_msg=label)

    # Fine-tuning moved the adapters and nothing else.
    adapters = result["adapter_labels"]
    assert adapters == {
        f"{layer}/kernel/lora_{factor}.weights" for layer in ("up", "down") for factor in "ab"
    }
    assert before.keys() == after.keys() == BASE_LABELS | adapters
    for label in BASE_LABELS:
        np.testing.assert_array_equal(before[label], after[label], err_msg=label)
    for layer in ("up", "down"):
        label = f"{layer}/kernel/lora_b.weights"
        assert not np.any(before[label]) and np.any(after[label])
    loss_before, loss_after = result["task_b_loss"]
    assert loss_after < 0.5 * loss_before

    # The merged kernels are W + A B, computed here independently of the example.
    merged = result["merged_parameters"]
    assert merged.keys() == BASE_LABELS
    for layer in ("up", "down"):
        lora_a, lora_b = (after[f"{layer}/kernel/lora_{f}.weights"] for f in "ab")
        np.testing.assert_allclose(
            merged[f"{layer}/kernel"],
            after[f"{layer}/kernel"] + lora_a @ lora_b,
            rtol=1e-6,
            atol=1e-6,
        )

    # Plain Orbax restores what was written, into the NNX class, and it predicts the same.
    restored = restore_plain_nnx(result["finetuned_dir"], result["factory"])
    assert type(restored).__name__ == "RegressionMLP"
    restored_state = state_arrays(restored)
    assert restored_state.keys() == BASE_LABELS
    for label in BASE_LABELS:
        np.testing.assert_array_equal(restored_state[label], merged[label], err_msg=label)
    predictions = restored(jnp.asarray(result["test_inputs"]))
    np.testing.assert_allclose(predictions, result["adapted_predictions"], atol=1e-5)


def test_adapters_start_as_the_identity_change_and_merge_back(example):
    layer = example.pz.nn.Linear.from_config(
        name="dense", init_base_rng=jax.random.key(0), input_axes={"a": 3}, output_axes={"b": 5}
    )
    adapter = example.LowRankAdapter.from_linear(layer, jax.random.key(1), rank=2)
    inputs = example.pz.nx.wrap(jnp.arange(6.0).reshape(2, 3)).tag("batch", "a")
    np.testing.assert_array_equal(
        adapter(inputs).unwrap("batch", "b"), layer(inputs).unwrap("batch", "b")
    )
    assert adapter.pretrained is layer
    lora_a, lora_b = adapter.update_factors
    assert lora_a.weights.label == "dense.weights/lora_a.weights"
    assert dict(lora_a.weights.value.named_shape) == {"a": 3, "lowrank": 2}
    assert dict(lora_b.weights.value.named_shape) == {"lowrank": 2, "b": 5}
    merged = adapter.merged()
    assert merged.weights.label == layer.weights.label
    np.testing.assert_array_equal(
        merged.weights.value.unwrap("a", "b"), layer.weights.value.unwrap("a", "b")
    )


def test_flags_are_checked(example):
    with pytest.raises(SystemExit):
        example.parse_args(["--rank", "0"])
    args = example.parse_args(["--quick"])
    assert (args.pretrain_steps, args.steps) == (40, 40)
