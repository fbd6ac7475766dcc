"""Tests for pz_flax.cli: the pz-flax-convert command line."""

from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from pz_flax import cli
from pz_flax.checkpoint import storage
from tests.checkpoint import sample_models

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FACTORY = "tests.checkpoint.sample_models:make_nnx_model"


@pytest.fixture(scope="module")
def nnx_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "nnx"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, nnx.state(sample_models.make_nnx_model()))
    return path


def _run(capsys, *argv):
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _nnx_to_pz(capsys, source, destination, *options, model=FACTORY):
    """Runs ``nnx-to-pz`` from ``source`` to ``destination``, with extra command-line options."""
    argv = ["nnx-to-pz", "--model", model, "--in", str(source), "--out", str(destination)]
    return _run(capsys, *argv, *options)


def _pz_to_nnx(capsys, source, destination):
    return _run(capsys, "pz-to-nnx", "--in", str(source), "--out", str(destination))


def _assert_short_error(err: str, *fragments: str):
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 3, err
    assert lines[0].startswith("pz-flax-convert: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_nnx_to_pz_to_nnx_round_trip(nnx_checkpoint, tmp_path, capsys):
    status, _, err = _nnx_to_pz(capsys, nnx_checkpoint, tmp_path / "pz", "--no-progress")
    assert (status, err) == (0, "")
    status, _, err = _pz_to_nnx(capsys, tmp_path / "pz", tmp_path / "nnx2")
    assert (status, err) == (0, "")
    abstract = nnx.state(nnx.eval_shape(sample_models.make_nnx_model))
    original = ocp.StandardCheckpointer().restore(nnx_checkpoint, abstract)
    converted = ocp.StandardCheckpointer().restore(tmp_path / "nnx2", abstract)
    for a, b in zip(jax.tree_util.tree_leaves(original), jax.tree_util.tree_leaves(converted)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_factory_from_a_python_file_and_progress_bar(nnx_checkpoint, tmp_path, capsys):
    factory_file = tmp_path / "factories.py"
    factory_file.write_text("from tests.checkpoint.sample_models import make_nnx_model as build\n")
    status, _, err = _nnx_to_pz(
        capsys, nnx_checkpoint, tmp_path / "pz", "--progress", model=f"{factory_file}:build"
    )
    assert status == 0
    assert "\r[" in err and "4/4 done" in err and err.endswith("\n")
    assert storage.restore(tmp_path / "pz").nnx_type is nnx.Sequential


def test_inspect_prints_the_table(nnx_checkpoint, tmp_path, capsys):
    storage.save(tmp_path / "pz", sample_models.build_mlp())
    status, out, err = _run(capsys, "inspect", str(tmp_path / "pz"))
    assert (status, err) == (0, "")
    assert "sublayers/0/sublayers/0/weights  (features, hidden)  (4, 8)" in out
    assert out.strip().endswith("5 arrays, 88 elements, 352 B")
    status, out, _ = _run(capsys, "inspect", str(nnx_checkpoint))
    assert status == 0 and "layers/0/kernel/value" in out and out.startswith("orbax checkpoint")


def test_help_has_examples(capsys):
    status, out, _ = _run(capsys, "--help")
    assert status == 0
    assert "examples:" in out and "pz-flax-convert nnx-to-pz --model" in out
    status, out, _ = _run(capsys, "pz-to-nnx", "--help")
    assert status == 0 and "--allow-module NAME" in out and "examples:" in out


def test_destination_exists_needs_force(nnx_checkpoint, tmp_path, capsys):
    destination = tmp_path / "pz"
    storage.save(destination, {"w": jnp.ones(2)})
    status, _, err = _nnx_to_pz(capsys, nnx_checkpoint, destination)
    assert status == 1
    _assert_short_error(err, "already exists", "--force")
    np.testing.assert_array_equal(storage.restore(destination)["w"], jnp.ones(2))
    status, _, err = _nnx_to_pz(capsys, nnx_checkpoint, destination, "--force")
    assert (status, err) == (0, "")
    assert storage.restore(destination).nnx_type is nnx.Sequential


@pytest.mark.parametrize(
    "make_args, fragments, expected_status",
    [
        (
            lambda src, tmp: ["nnx-to-pz", "--model", FACTORY, "--in", str(tmp / "missing")],
            ["does not exist"],
            1,
        ),
        (
            lambda src, tmp: [
                "nnx-to-pz",
                "--model",
                "tests.checkpoint.sample_models:make_wider_nnx_model",
                "--in",
                str(src),
            ],
            [
                "does not fit",
                "bias/value: shape (5,) in the checkpoint, (6,) in the model",
                "4 more",
            ],
            1,
        ),
        (
            lambda src, tmp: ["nnx-to-pz", "--model", "no_such_module_xyz:f", "--in", str(src)],
            ["cannot import no_such_module_xyz"],
            2,
        ),
        (
            lambda src, tmp: [
                "nnx-to-pz",
                "--model",
                "tests.checkpoint.sample_models:nope",
                "--in",
                str(src),
            ],
            ["has no attribute 'nope'"],
            2,
        ),
        (
            lambda src, tmp: ["nnx-to-pz", "--model", "no-colon", "--in", str(src)],
            ["MODULE:FACTORY"],
            2,
        ),
        (lambda src, tmp: ["pz-to-nnx", "--in", str(src)], ["plain Orbax checkpoint"], 1),
    ],
)
def test_errors_are_short_and_leave_no_output(
    nnx_checkpoint, tmp_path, capsys, make_args, fragments, expected_status
):
    destination = tmp_path / "out"
    status, _, err = _run(capsys, *make_args(nnx_checkpoint, tmp_path), "--out", str(destination))
    assert status == expected_status
    _assert_short_error(err, *fragments)
    assert not destination.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_corrupt_and_untrusted_sources(tmp_path, capsys):
    storage.save(tmp_path / "pz", sample_models.build_mlp())
    manifest_file = tmp_path / "pz" / "manifest" / "metadata"
    text = manifest_file.read_text()
    manifest_file.write_text(text.replace("pz_flax.nn.grouping:Sequential", "evil_mod:Sequential"))
    status, _, err = _pz_to_nnx(capsys, tmp_path / "pz", tmp_path / "out")
    assert status == 1
    _assert_short_error(err, "evil_mod.Sequential", "--allow-module evil_mod")
    manifest_file.write_text(text[:100])
    status, _, err = _pz_to_nnx(capsys, tmp_path / "pz", tmp_path / "out")
    assert status == 1
    _assert_short_error(err, "damaged")
    status, _, err = _run(capsys, "inspect", str(tmp_path / "pz"))
    assert status == 1
    _assert_short_error(err, "damaged")
    assert not (tmp_path / "out").exists()


def test_usage_errors_exit_2(capsys):
    status, _, err = _run(capsys, "nnx-to-pz", "--in", "x")
    assert status == 2 and "required" in err
    status, _, err = _run(capsys)
    assert status == 2


def test_progress_bar_draws_stages():
    stream = io.StringIO()
    progress = cli.Progress(2, enabled=True, stream=stream, width=4)
    progress.stage("first")
    progress.advance()
    progress.stage("second")
    progress.advance()
    assert stream.getvalue().split("\r")[1:] == [
        "[....] 0/2 first                       ",
        "[##..] 1/2 second                      ",
        "[####] 2/2 done                        \n",
    ]
    silent = io.StringIO()
    quiet = cli.Progress(1, enabled=False, stream=silent)
    quiet.stage("x")
    quiet.advance()
    assert silent.getvalue() == ""


def test_progress_step_counts_only_stages_that_finish():
    stream = io.StringIO()
    progress = cli.Progress(2, enabled=True, stream=stream, width=4)
    with progress.step("first"):
        pass
    with pytest.raises(RuntimeError, match="boom"), progress.step("second"):
        raise RuntimeError("boom")
    assert progress.done == 1
    assert stream.getvalue().split("\r")[1:] == [
        "[....] 0/2 first                       ",
        "[##..] 1/2 second                      ",
    ]


def test_runs_as_a_script_without_traceback(tmp_path):
    script = REPO_ROOT / "conversion_tools" / "convert_checkpoint.py"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("PYTHONPATH", None)
    helped = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert helped.returncode == 0 and "pz-flax-convert" in helped.stdout
    failed = subprocess.run(
        [sys.executable, str(script), "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert failed.returncode == 1
    _assert_short_error(failed.stderr, "does not exist")


# Orbax's reader thread reports the damaged files once more as an unraisable exception.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_array_files(tmp_path, capsys):
    storage.save(tmp_path / "pz", sample_models.build_mlp())
    for file in (tmp_path / "pz" / "arrays").rglob("*"):
        if file.is_file() and file.parent.name == "d":
            file.write_bytes(file.read_bytes()[:5])
    status, _, err = _pz_to_nnx(capsys, tmp_path / "pz", tmp_path / "out")
    assert status == 1
    _assert_short_error(err, "Cannot read the arrays", "missing or damaged")
    assert not (tmp_path / "out").exists()


def test_version_prints_the_package_version(capsys):
    import pz_flax

    status, out, _ = _run(capsys, "--version")
    assert status == 0
    assert out == f"pz-flax-convert {pz_flax.__version__}\n"
