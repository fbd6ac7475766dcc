"""Smoke test of the main job, examples/quickstart.py, in a short run."""

import pytest

from tests.examples import helpers


def load_quickstart():
    return helpers.load_example("quickstart.py", "quickstart")


def test_quickstart_trains_checkpoints_restores_and_converts(tmp_path, capsys):
    quickstart = load_quickstart()
    accuracy = quickstart.main(["--quick", "--out-dir", str(tmp_path)])
    captured = capsys.readouterr()
    printed = captured.out
    assert accuracy >= 0.9
    assert f"test accuracy: {accuracy:.2f}" in printed
    assert "predictions identical: True" in printed
    assert "predictions identical: False" not in printed
    assert (tmp_path / "checkpoint").is_dir()
    html = (tmp_path / "model.html").read_text()
    for expected in ("Sequential", "Affine", "neurons", "classes", "hidden/Linear.weights"):
        assert expected in html
    assert "arrayviz" in html  # arrays drawn by treescope's array visualisation
    # Output that is not a terminal gets the progress bar drawn once, without carriage returns.
    assert "\r" not in captured.err
    assert "training" in captured.err and "8/8" in captured.err
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("checkpoint", "model.html", "loss_curve.png"):
        assert str(tmp_path / name) in printed


def test_quickstart_flags_have_defaults_needing_nothing():
    quickstart = load_quickstart()
    args = quickstart.parse_args([])
    assert (args.epochs, args.hidden, args.seed) == (30, 128, 0)
    assert args.out_dir.name == "quickstart_out"
    quick = quickstart.parse_args(["--quick", "--hidden", "32"])
    assert (quick.epochs, quick.hidden) == (8, 32)


def test_quickstart_refuses_non_positive_sizes():
    quickstart = load_quickstart()
    for bad_flags in (["--epochs", "0"], ["--batch-size", "-1"], ["--hidden", "0"]):
        with pytest.raises(SystemExit):
            quickstart.parse_args(bad_flags)
