"""Tests for pz_flax.checkpoint.inspection: the checkpoint summary table."""

from __future__ import annotations

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from pz_flax.checkpoint import errors
from pz_flax.checkpoint import inspection
from pz_flax.checkpoint import storage
from tests.checkpoint import sample_models


def test_pz_checkpoint_summary(tmp_path):
    storage.save(tmp_path / "ckpt", sample_models.build_mlp())
    summary = inspection.inspect_checkpoint(tmp_path / "ckpt")
    assert summary.kind == "pz_flax"
    assert summary.root_class == "pz_flax.nn.grouping:Sequential"
    assert len(summary.entries) == 5
    assert summary.total_bytes == 4 * (32 + 8 + 8 + 8 + 32)
    lines = summary.format_table().splitlines()
    assert (
        lines[0].startswith("pz_flax checkpoint ")
        and "(model: pz_flax.nn.grouping:Sequential)" in lines[0]
    )
    assert lines[1].split() == ["path", "axis", "names", "shape", "dtype", "size"]
    assert lines[3].split() == [
        "sublayers/0/sublayers/0/weights",
        "(features,",
        "hidden)",
        "(4,",
        "8)",
        "float32",
        "128",
        "Bytes",
    ]
    assert lines[-1] == "5 arrays, 88 elements, 352 Bytes"
    assert all(line == line.rstrip() for line in lines)


def test_summary_renders_as_a_rich_table(tmp_path):
    import io

    import rich.console
    import rich.table

    storage.save(tmp_path / "ckpt", {"w": jnp.ones(2)})
    summary = inspection.inspect_checkpoint(tmp_path / "ckpt")
    assert isinstance(summary.__rich__(), rich.table.Table)
    console = rich.console.Console(file=io.StringIO(), width=80, color_system=None)
    console.print(summary)
    assert "8 Bytes" in console.file.getvalue()


def test_paths_are_sorted_naturally(tmp_path):
    layers = {str(i): jnp.full(1, float(i)) for i in (10, 2, 1)}
    storage.save(tmp_path / "pz", {"layers": layers})
    rows = [
        line.split()[0]
        for line in inspection.inspect_checkpoint(tmp_path / "pz").format_table().splitlines()[3:-1]
    ]
    assert rows == ["layers/1", "layers/2", "layers/10"]
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "orbax", {"layers": layers})
    entries = inspection.inspect_checkpoint(tmp_path / "orbax").entries
    assert [entry.path for entry in entries] == ["layers/1", "layers/2", "layers/10"]
    assert inspection.natural_key("a/2/b") < inspection.natural_key("a/10/b")


def test_plain_orbax_checkpoint_summary(tmp_path):
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "nnx", nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0))))
    summary = inspection.inspect_checkpoint(tmp_path / "nnx")
    assert summary.kind == "orbax" and summary.root_class is None
    assert [(e.path, e.shape, e.axis_names) for e in summary.entries] == [
        ("bias/value", (4,), None),
        ("kernel/value", (3, 4), None),
    ]
    assert ["bias/value", "-", "(4,)", "float32", "16", "Bytes"] in [
        line.split() for line in summary.format_table().splitlines()
    ]


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(errors.CheckpointNotFoundError, match="does not exist"):
        inspection.inspect_checkpoint(tmp_path / "nothing")
    (tmp_path / "dir").mkdir()
    with pytest.raises(errors.CheckpointNotFoundError, match="neither"):
        inspection.inspect_checkpoint(tmp_path / "dir")


@pytest.mark.parametrize(
    "size, text",
    [
        (0, "0 Bytes"),
        (1023, "1023 Bytes"),
        (1536, "1.5 KiB"),
        (5 * 2**20, "5.0 MiB"),
        (3 * 2**40, "3.0 TiB"),
    ],
)
def test_format_bytes(size, text):
    assert inspection.format_bytes(size) == text


def test_storage_round_trip_is_listed_in_order(tmp_path):
    storage.save(tmp_path / "c", {"b": jnp.ones(2), "a": jnp.zeros((1, 2), jnp.bfloat16)})
    entries = inspection.inspect_checkpoint(tmp_path / "c").entries
    assert [(e.path, e.dtype, e.nbytes) for e in entries] == [
        ("b", "float32", 8),
        ("a", "bfloat16", 4),
    ]
