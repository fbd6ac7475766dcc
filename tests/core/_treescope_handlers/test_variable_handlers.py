"""Tests for pz_flax.core._treescope_handlers.variable_handlers: compact variable rendering."""

import jax
import jax.numpy as jnp
import treescope

from pz_flax import pz
from tests.core._treescope_handlers.helpers import render_html
from tests.core._treescope_handlers.helpers import render_text


def _weights():
    data = jax.random.normal(jax.random.key(0), (64, 128))
    return pz.Parameter(value=pz.nx.wrap(data).tag("pixels", "neurons"), label="hidden.weights")


def test_collapsed_parameter_is_label_shape_names_and_statistics():
    text = render_text(_weights(), depth=0)
    assert text.startswith(
        "Parameter(label='hidden.weights', value=float32(| pixels:64, neurons:128) ≈"
    )
    assert "±" in text and "[≥" in text  # summary statistics
    # The long parts of the full form are gone.
    assert "wrapping" not in text and "metadata" not in text and "<NamedArray" not in text


def test_collapsed_line_is_much_shorter_than_the_full_constructor():
    parameter = _weights()
    layer = pz.nn.Linear(weights=parameter, in_axis_names=("pixels",), out_axis_names=("neurons",))
    line = render_text(layer, depth=0)
    full_parameter = treescope.render_to_text(
        {"label": parameter.label, "value": parameter.value, "metadata": parameter.metadata}
    )
    assert len(render_text(parameter, depth=0)) < len(" ".join(full_parameter.split()))
    assert "\n" not in line and len(line) < 200


def test_expanded_parameter_shows_every_field():
    text = render_text(_weights(), depth=1)
    assert text.splitlines()[0] == "Parameter("
    for fragment in (
        "label='hidden.weights',",
        "value=<NamedArray float32(| pixels:64, neurons:128)",
        "metadata={},",
    ):
        assert fragment in text
    # Opening the value shows the named array's own fields.
    assert "named_axes=" in render_text(_weights(), depth=2)


def test_non_empty_metadata_stays_on_the_collapsed_line():
    parameter = pz.Parameter(value=pz.nx.ones({"a": 2}), label="w", metadata={"trainable": False})
    assert render_text(parameter, depth=0).endswith(", metadata={'trainable': False})")


def test_roundtrip_mode_renders_in_full():
    text = render_text(_weights(), depth=0, roundtrip=True)
    assert "label='hidden.weights'" in text and "metadata={}" in text and "data_array=" in text


def test_state_variables_and_plain_arrays():
    counter = pz.StateVariable(value=jnp.zeros((3,), jnp.int32), label="counts")
    assert render_text(counter, depth=0).startswith(
        "StateVariable(label='counts', value=jax.Array int32(3,)"
    )
    # Short values keep the usual constructor form.
    assert render_text(pz.StateVariable(value=None, label="empty"), depth=0) == (
        "StateVariable(label='empty', value=None, metadata={})"
    )
    scalar = render_text(pz.StateVariable(value=jnp.int32(4), label="step"), depth=0)
    assert "value=<jax.Array(4, dtype=int32)>" in scalar


def test_statistics_are_deferred_in_html_and_colour_is_kept():
    html = render_html(_weights())
    assert "hidden.weights" in html and "pixels:64" in html
    assert pz.Parameter.treescope_color(_weights()) in html


def test_traced_parameters_render_without_statistics():
    seen = []

    def record(parameter):
        seen.append(repr(parameter))
        return parameter.value

    jax.jit(record)(_weights())
    assert seen[0] == "Parameter(label='hidden.weights', value=float32(| pixels:64, neurons:128))"
