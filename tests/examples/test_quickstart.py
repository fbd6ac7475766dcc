"""Smoke test of the main job, examples/quickstart.py, in a short run."""

from tests.examples import helpers


def load_quickstart():
    return helpers.load_example("quickstart.py", "quickstart")


def test_quickstart_trains_checkpoints_restores_and_converts(tmp_path, capsys):
    quickstart = load_quickstart()
    accuracy = quickstart.main(["--epochs", "8", "--out-dir", str(tmp_path), "--hidden", "64"])
    printed = capsys.readouterr().out
    assert accuracy >= 0.9
    assert f"test accuracy: {accuracy:.2f}" in printed
    assert "predictions identical: True" in printed
    assert "predictions identical: False" not in printed
    assert (tmp_path / "checkpoint").is_dir()
    html = (tmp_path / "model.html").read_text()
    for expected in ("Sequential", "Affine", "neurons", "classes", "hidden/Linear.weights"):
        assert expected in html
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("checkpoint", "model.html", "loss_curve.png"):
        assert str(tmp_path / name) in printed


def test_quickstart_flags_have_defaults_needing_nothing():
    args = load_quickstart().parse_args([])
    assert args.epochs > 0 and args.seed == 0 and args.out_dir.name == "quickstart_out"
