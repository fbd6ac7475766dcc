"""Smoke test of examples/nnx_interop.py with small settings."""

import pytest

from tests.examples import helpers


def load_example():
    return helpers.load_example("nnx_interop.py", "nnx_interop_example")


def test_example_converts_patches_converts_back_and_trains(tmp_path, capsys):
    example = load_example()
    results = example.main(["--quick", "--out-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert results["difference"] < 1e-5
    assert results["weights_shared"]
    assert results["patched_type"] == "TransformerBlock"
    assert results["same_state_paths"] and results["patched_matches"]
    assert results["head_zero_silenced"]
    assert results["losses_after"][-1] < results["losses_after"][0]
    html = results["html_file"].read_text()
    for expected in ("FromNNX", "Attention", "heads", "attention/out/kernel"):
        assert expected in html
    assert "MLP activation: relu" in printed
    assert "Total:" in printed


def test_example_flags_have_defaults_and_a_quick_mode():
    example = load_example()
    args = example.parse_args([])
    assert (args.features, args.heads, args.steps) == (32, 4, 50)
    assert args.out_dir.name == "nnx_interop_out"
    quick = example.parse_args(["--quick", "--steps", "2"])
    assert (quick.features, quick.heads, quick.batch, quick.steps) == (8, 2, 4, 2)


def test_example_refuses_impossible_sizes():
    example = load_example()
    for bad_flags in (["--steps", "0"], ["--features", "10", "--heads", "4"]):
        with pytest.raises(SystemExit):
            example.parse_args(bad_flags)
