"""Tests of the model summary table, for NNX modules, pz_flax layers and mixtures."""

import io

import jax
import jax.numpy as jnp
import pytest
import rich.console
import rich.table
from flax import nnx

from pz_flax import _tables
from pz_flax.checkpoint import inspection
from pz_flax.core import variables
from pz_flax.interop import convert
from pz_flax.interop import model_summary
from pz_flax.nn import linear_and_affine
from tests.interop import real_models

_TOTALS = (
    "Total: 24 parameter values in 4 parameters (96 Bytes);"
    " 8 state values in 2 state variables (32 Bytes)."
)


def _model():
    return nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
        nnx.relu,
        nnx.BatchNorm(4, rngs=nnx.Rngs(0)),
    )


def _cells(line):
    return line.split()


def test_rows_of_an_nnx_module():
    rows = model_summary.summary_rows(_model())
    by_path = {row.path: row for row in rows}
    kernel = by_path["layers.0.kernel"]
    assert (kernel.layer, kernel.kind, kernel.shape, kernel.dtype, kernel.count) == (
        "Linear",
        "Param",
        (3, 4),
        "float32",
        12,
    )
    assert (kernel.axes, kernel.sharding, kernel.nbytes) == ("-, -", "", 48)
    assert kernel.is_parameter
    mean = by_path["layers.2.mean"]
    assert (mean.kind, mean.is_parameter) == ("BatchStat", False)
    assert len(rows) == 6


def test_rows_of_the_converted_model_have_labels_and_axis_names():
    rows = model_summary.summary_rows(convert.from_nnx(_model()))
    by_label = {row.label: row for row in rows}
    assert set(by_label) == {
        "layers/0/kernel",
        "layers/0/bias",
        "layers/2/scale",
        "layers/2/bias",
        "layers/2/mean",
        "layers/2/var",
    }
    kernel = by_label["layers/0/kernel"]
    assert (kernel.layer, kernel.kind, kernel.axes) == (
        "Linear",
        "Parameter",
        "features, features_out",
    )
    assert by_label["layers/2/mean"].layer == "NNXWrapper(BatchNorm)"
    assert by_label["layers/2/mean"].kind == "StateVariable"


def test_summary_returns_the_table_and_prints_nothing(capsys):
    found = model_summary.summary(_model())
    assert capsys.readouterr() == ("", "")
    assert isinstance(found, model_summary.ModelSummary)
    assert found.model_name == "Sequential"
    assert len(found.parameters) == 4 and len(found.state) == 2
    print(found)
    assert capsys.readouterr().out == str(found) + "\n"


def test_text_table_has_a_header_one_line_per_variable_and_humanized_totals():
    lines = str(model_summary.summary(_model())).splitlines()
    assert lines[0] == "Variables of Sequential"
    assert _cells(lines[1]) == list(model_summary._COLUMNS)
    assert set(lines[2].strip()) == {"─"}
    assert _cells(lines[3]) == [
        *("layers.0.bias", "Linear", "Param", "-", "(4,)", "float32", "4", "16", "Bytes")
    ]
    assert len(lines) == 3 + 6 + 1
    assert lines[-1] == _TOTALS


def test_sizes_are_humanized_like_the_checkpoint_listing():
    found = model_summary.summary(nnx.Linear(256, 256, rngs=nnx.Rngs(0)))
    kernel = next(row for row in found.rows if row.path == "kernel")
    assert kernel.nbytes == 256 * 256 * 4
    text = str(found)
    assert "256.0 KiB" in text
    assert "(257.0 KiB)" in found.totals()
    # One byte formatter for every table pz_flax prints.
    assert inspection.format_bytes is _tables.format_bytes


def test_notebooks_get_html_and_rich_consoles_a_rich_table():
    found = model_summary.summary(_model())
    html = found._repr_html_()
    assert html.startswith("<pre>") and html.endswith("</pre>")
    for text in ("Variables of Sequential", "layers.2.var", "BatchStat", "96 Bytes"):
        assert text in html
    table = found.__rich__()
    assert isinstance(table, rich.table.Table)
    assert [column.header for column in table.columns] == list(model_summary._COLUMNS)
    assert table.row_count == 6
    console = rich.console.Console(file=io.StringIO(), width=160, color_system=None)
    console.print(found)
    assert "layers.0.kernel" in console.file.getvalue()
    # The caption wraps at the table's width.
    assert " ".join(console.file.getvalue().split()).endswith(_TOTALS)


def test_ipython_terminal_shows_the_text_table():
    printed = []

    class Printer:
        def text(self, text):
            printed.append(text)

    found = model_summary.summary(_model())
    found._repr_pretty_(Printer(), cycle=False)
    assert printed == [str(found)]


def test_sharding_annotations_show_for_nnx_and_converted_variables():
    module = real_models.make_minigpt()
    found = model_summary.summary(module)
    by_path = {row.path: row for row in found.rows}
    assert by_path["blocks.0.up.kernel"].sharding == "-, model"
    assert by_path["blocks.0.down.kernel"].sharding == "model, -"
    assert by_path["blocks.0.down.bias"].sharding == "-"
    assert by_path["blocks.0.attn.query.kernel"].sharding == "-, -, model"
    assert "sharding" in [column.header for column in found.table().columns]
    header = _cells(str(found).splitlines()[1])
    assert header[header.index("axes") + 1] == "sharding"

    converted = model_summary.summary(convert.from_nnx(module))
    by_label = {row.label: row for row in converted.rows}
    up_kernel = by_label["blocks/0/up/kernel"]
    assert (up_kernel.axes, up_kernel.sharding) == ("features, features_out", "-, model")
    # A model without annotations gets no sharding column.
    assert "sharding" not in [
        column.header for column in model_summary.summary(_model()).table().columns
    ]


def test_wrapped_modules_say_which_setting_forced_the_wrapper():
    casting = nnx.Linear(2, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    found = model_summary.summary(convert.from_nnx(nnx.Sequential(casting, nnx.relu)))
    [wrapped] = found.wrapped
    assert (wrapped.path, wrapped.module_type) == ("layer.sublayers[0]", "Linear")
    assert "dtype=bfloat16" in wrapped.reason
    assert f"Wrapped layer.sublayers[0] (Linear): {wrapped.reason}" in str(found)
    assert model_summary.summary(convert.from_nnx(_model())).wrapped == ()


def test_frozen_values_slots_and_shared_variables():
    parameter = variables.Parameter(value=jnp.ones((2,)), label="w")
    layer = linear_and_affine.Linear(weights=parameter, in_axis_names=(), out_axis_names=())
    rows = model_summary.summary_rows([layer, layer, variables.freeze_variables(layer)])
    assert [row.kind for row in rows] == ["Parameter", "ParameterValue"]
    assert rows[1].is_parameter
    slot_rows = model_summary.summary_rows(
        linear_and_affine.Linear(
            weights=variables.ParameterSlot("w"), in_axis_names=(), out_axis_names=()
        )
    )
    assert [(row.kind, row.label, row.count) for row in slot_rows] == [("ParameterSlot", "w", 0)]


def test_summary_of_an_nnx_module_holding_a_pz_layer():
    class Model(nnx.Module):
        def __init__(self):
            self.inner = linear_and_affine.Affine.from_config(
                "inner", jax.random.key(0), {"features": 2}, {"features": 3}
            )

    rows = model_summary.summary_rows(Model())
    assert {row.label for row in rows} == {"inner/Linear.weights", "inner/AddBias.bias"}


def test_nnx_bookkeeping_attributes_are_not_rows():
    rows = model_summary.summary_rows(_model())
    assert not [row for row in rows if "_pytree__" in row.path]


@pytest.mark.parametrize("model", [[], {}, 3.0])
def test_models_without_variables_have_empty_tables(model):
    found = model_summary.summary(model)
    assert found.rows == ()
    assert "Total: 0 parameter values in 0 parameters (0 Bytes)" in str(found)
