"""Smoke test of examples/nnx_interop.py with small settings."""

from tests.examples import helpers


def load_example():
    return helpers.load_example("nnx_interop.py", "nnx_interop_example")


def test_example_converts_patches_converts_back_and_trains(tmp_path, capsys):
    example = load_example()
    results = example.main(
        [
            "--features", "8", "--heads", "2", "--hidden", "16", "--seq", "4", "--batch", "4",
            "--steps", "4", "--out-dir", str(tmp_path),
        ]
    )  # fmt: skip
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


def test_example_flags_have_defaults():
    args = load_example().parse_args([])
    assert args.steps > 0 and args.out_dir.name == "nnx_interop_out"
