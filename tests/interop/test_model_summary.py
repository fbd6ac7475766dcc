"""Tests of the model summary table, for NNX modules, pz_flax layers and mixtures."""

import jax
import jax.numpy as jnp
from flax import nnx

from pz_flax.core import variables
from pz_flax.interop import convert
from pz_flax.interop import model_summary
from pz_flax.nn import linear_and_affine


def _model():
    return nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
        nnx.relu,
        nnx.BatchNorm(4, rngs=nnx.Rngs(0)),
    )


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
    assert kernel.axes == "-, -"
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


def test_summary_text_and_totals():
    printed = []
    text = model_summary.summary(_model(), print_fn=printed.append)
    assert printed == [text]
    lines = text.splitlines()
    assert [cell.strip() for cell in lines[0].split(" | ")][:3] == ["path", "layer", "kind"]
    assert "Total: 24 parameter values in 4 parameters (96 B); 8 state values in 2 state" in text
    assert model_summary.summary(_model(), print_fn=None) == text


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
