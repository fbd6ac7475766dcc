"""Smoke test of examples/finetune_nnx_checkpoint.py: NNX checkpoint -> LoRA -> NNX checkpoint."""

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from tests.examples import helpers

BASE_LABELS = {"up/kernel", "up/bias", "norm/scale", "norm/bias", "down/kernel", "down/bias"}


def adapter_label(layer: str, factor: str) -> str:
    """Where loraify_linears_in_selection puts a dense layer's adapter factor (penzai's scheme)."""
    location = f"NNXWrapper.children['{layer}']/FromNNX.layer/Affine.sublayers[0]"
    return f"LoRA:{location}/LoRA_{factor}.weights"


@pytest.fixture(scope="module")
def example():
    return helpers.load_example("finetune_nnx_checkpoint.py", "finetune_nnx_checkpoint")


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
    assert adapters == {adapter_label(layer, factor) for layer in ("up", "down") for factor in "AB"}
    assert before.keys() == after.keys() == BASE_LABELS | adapters
    for label in BASE_LABELS:
        np.testing.assert_array_equal(before[label], after[label], err_msg=label)
    for layer in ("up", "down"):
        label = adapter_label(layer, "B")
        assert not np.any(before[label]) and np.any(after[label])
    loss_before, loss_after = result["task_b_loss"]
    assert loss_after < 0.5 * loss_before

    # The merged kernels are W + A B, computed here independently of the example.
    merged = result["merged_parameters"]
    assert merged.keys() == BASE_LABELS
    for layer in ("up", "down"):
        lora_a, lora_b = (after[adapter_label(layer, factor)] for factor in "AB")
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


def test_flags_are_checked(example):
    with pytest.raises(SystemExit):
        example.parse_args(["--rank", "0"])
    args = example.parse_args(["--quick"])
    assert (args.pretrain_steps, args.steps) == (40, 40)
