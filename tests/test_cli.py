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
    # Not a terminal: rich prints the finished bar once, with bytes, and no carriage returns.
    assert "\r" not in err and "done" in err and "bytes" in err, repr(err)
    assert storage.restore(tmp_path / "pz").nnx_type is nnx.Sequential


def test_inspect_prints_the_table(nnx_checkpoint, tmp_path, capsys):
    storage.save(tmp_path / "pz", sample_models.build_mlp())
    status, out, err = _run(capsys, "inspect", str(tmp_path / "pz"))
    assert (status, err) == (0, "")
    assert ["sublayers/0/sublayers/0/weights", "(features,", "hidden)", "(4,", "8)"] in [
        line.split()[:5] for line in out.splitlines()
    ]
    assert out.strip().endswith("5 arrays, 88 elements, 352 Bytes")
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


def test_usage_errors_exit_2_in_one_line(capsys):
    for argv in (["nnx-to-pz", "--in", "x"], [], ["convert-everything"], ["inspect", "a", "b"]):
        status, _, err = _run(capsys, *argv)
        assert status == 2, argv
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("pz-flax-convert: error: ") and "--help" in err, err
    status, _, err = _run(capsys, "nnx-to-pz", "--in", "x")
    assert "required" in err


def test_progress_counts_bytes_of_finished_stages_only():
    stream = io.StringIO()
    progress = cli.Progress(enabled=True, stream=stream)
    with progress.running(2048):
        with progress.step("first", 1024):
            pass
        with pytest.raises(RuntimeError, match="boom"), progress.step("second", 1024):
            raise RuntimeError("boom")
        assert progress._bar.tasks[0].completed == 1024
    assert "1.0/2.0 KiB" in stream.getvalue() and "\r" not in stream.getvalue()
    silent = io.StringIO()
    quiet = cli.Progress(enabled=False, stream=silent)
    with quiet.running(10), quiet.step("x", 10):
        pass
    quiet.finish()
    assert silent.getvalue() == ""


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


def test_success_prints_one_line_saying_what_was_written_where(nnx_checkpoint, tmp_path, capsys):
    status, out, err = _nnx_to_pz(capsys, nnx_checkpoint, tmp_path / "pz")
    assert (status, err) == (0, "")
    assert out.count("\n") == 1
    assert out.startswith(f"pz-flax-convert: wrote the pz_flax checkpoint {tmp_path / 'pz'} (")
    assert f"from {nnx_checkpoint}" in out and "arrays" in out
    status, out, _ = _pz_to_nnx(capsys, tmp_path / "pz", tmp_path / "nnx")
    assert status == 0 and f"wrote the NNX checkpoint {tmp_path / 'nnx'}" in out


_USER_MODELS = """
import sys
from tests.checkpoint.sample_models import make_nnx_model

def make():
    return make_nnx_model()

def make_and_exit():
    sys.exit(0)
"""


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    """A folder holding the user's ``mymodels.py``, as the current directory."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "mymodels.py").write_text(_USER_MODELS)
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(REPO_ROOT))  # for the sample models the user file imports
    yield project
    sys.modules.pop("mymodels", None)


def test_module_factory_from_the_current_directory(nnx_checkpoint, user_project, capsys):
    assert str(user_project) not in sys.path
    status, _, err = _nnx_to_pz(capsys, nnx_checkpoint, user_project / "pz", model="mymodels:make")
    assert (status, err) == (0, ""), err
    assert str(user_project) not in sys.path  # importable only while the factory runs
    assert storage.restore(user_project / "pz").nnx_type is nnx.Sequential


def test_factory_calling_sys_exit_is_an_error(nnx_checkpoint, user_project, capsys):
    status, out, err = _nnx_to_pz(
        capsys, nnx_checkpoint, user_project / "pz", model="mymodels:make_and_exit"
    )
    assert status == 1 and out == ""
    _assert_short_error(err, "mymodels:make_and_exit called sys.exit(0)", "nothing was written")
    assert not (user_project / "pz").exists()


def test_a_model_file_parsing_sys_argv_sees_none_of_ours(nnx_checkpoint, tmp_path, capsys):
    models = tmp_path / "argv_models.py"
    models.write_text(
        "import argparse\n"
        "from tests.checkpoint.sample_models import make_nnx_model\n"
        "FLAGS = argparse.ArgumentParser(prog='train.py').parse_args()\n"
        "def make():\n"
        "    return make_nnx_model()\n"
    )
    status, _, err = _nnx_to_pz(capsys, nnx_checkpoint, tmp_path / "pz", model=f"{models}:make")
    assert (status, err) == (0, "")
    strict = tmp_path / "strict_models.py"
    strict.write_text(
        "import argparse\n"
        "argparse.ArgumentParser(prog='train.py').add_argument('--data', required=True)\n"
        "FLAGS = None\n"
        "parser = argparse.ArgumentParser(prog='train.py')\n"
        "parser.add_argument('--data', required=True)\n"
        "FLAGS = parser.parse_args()\n"
    )
    status, _, err = _nnx_to_pz(capsys, nnx_checkpoint, tmp_path / "pz2", model=f"{strict}:make")
    assert status == 2
    assert "called sys.exit(2)" in err.splitlines()[-1] and "usage: train.py" in err
    assert not (tmp_path / "pz2").exists()


def test_allow_module_from_the_current_directory(user_project, capsys):
    from pz_flax import checkpoint

    (user_project / "mylayers.py").write_text(
        "import dataclasses\n"
        "from pz_flax.core import struct\n"
        "from pz_flax.nn import layer\n"
        "@struct.pytree_dataclass\n"
        "class Scale(layer.Layer):\n"
        "    weight: object\n"
        "    def __call__(self, x, **side_inputs):\n"
        "        return x * self.weight\n"
    )
    sys.path.insert(0, str(user_project))
    try:
        import mylayers

        checkpoint.save(user_project / "pz", mylayers.Scale(weight=jnp.full(3, 2.0)))
    finally:
        sys.path.remove(str(user_project))
        sys.modules.pop("mylayers", None)
    status, _, err = _run(
        capsys, "pz-to-nnx", "--in", "pz", "--out", "nnx", "--allow-module", "mylayers"
    )
    # The class resolves from the current directory: no "No module named 'mylayers'".
    assert (status, err) == (0, "")
    assert str(user_project) not in sys.path
    sys.modules.pop("mylayers", None)


@pytest.mark.parametrize("destination", ["", ".", "..", "source", "source/.."])
def test_force_never_deletes_the_working_or_input_directory(
    nnx_checkpoint, tmp_path, monkeypatch, capsys, destination
):
    work = tmp_path / "work"
    work.mkdir()
    source = work / "source"
    import shutil

    shutil.copytree(nnx_checkpoint, source)
    monkeypatch.chdir(work)
    status, _, err = _nnx_to_pz(capsys, "source", destination, "--force")
    assert status == 1
    _assert_short_error(err, "pz-flax-convert: error: ")
    assert "empty" in err or "Refusing to replace" in err, err
    assert source.is_dir() and sorted(p.name for p in work.iterdir()) == ["source"]


def test_interrupt_leaves_no_staging_directory_and_says_so(
    nnx_checkpoint, tmp_path, capsys, monkeypatch
):
    import orbax.checkpoint as ocp

    def interrupted_save(self, directory, *args, **kwargs):
        pathlib.Path(f"{directory}.orbax-checkpoint-tmp", "arrays").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.Checkpointer, "save", interrupted_save)
    status, _, err = _nnx_to_pz(capsys, nnx_checkpoint, tmp_path / "pz")
    assert status == 130
    assert err.strip() == f"pz-flax-convert: interrupted; nothing was written to {tmp_path / 'pz'}."
    assert list(tmp_path.iterdir()) == []


def test_interrupt_names_leftovers_when_some_remain(tmp_path, capsys, monkeypatch):
    leftover = tmp_path / ".pz.pz_flax-00ff.orbax-checkpoint-tmp"
    leftover.mkdir()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_pz_to_nnx", interrupted)
    status, _, err = _run(capsys, "pz-to-nnx", "--in", "x", "--out", str(tmp_path / "pz"))
    assert status == 130 and str(leftover) in err and "remain" in err


def test_naming_overrides_from_flags_and_a_file(nnx_checkpoint, tmp_path, capsys):
    status, _, err = _nnx_to_pz(
        capsys, nnx_checkpoint, tmp_path / "flags", "--naming", "features=embedding"
    )
    assert (status, err) == (0, "")
    axis_names = {
        name
        for entry in storage.read_manifest(tmp_path / "flags")["arrays"]
        for name in (entry["axis_names"] or ())
    }
    assert "embedding" in axis_names and "features" not in axis_names
    naming_file = tmp_path / "naming.toml"
    naming_file.write_text('features = "channels"\n[overrides."layers/0"]\nfeatures = "hidden"\n')
    status, _, err = _nnx_to_pz(
        capsys, nnx_checkpoint, tmp_path / "file", "--naming-file", str(naming_file)
    )
    assert (status, err) == (0, "")
    from pz_flax.checkpoint import inspection

    table = inspection.inspect_checkpoint(tmp_path / "file").format_table()
    assert "hidden" in table and "channels" in table


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--naming", "colour=red"], "Unknown naming option"),
        (["--naming", "no-equals"], "OPTION=VALUE"),
        (["--naming-file", "/nonexistent/naming.json"], "cannot read"),
    ],
)
def test_bad_naming_options_are_usage_errors(nnx_checkpoint, tmp_path, capsys, options, fragment):
    status, _, err = _nnx_to_pz(capsys, nnx_checkpoint, tmp_path / "pz", *options)
    assert status == 2
    _assert_short_error(err, fragment)
    assert not (tmp_path / "pz").exists()
