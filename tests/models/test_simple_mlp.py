"""Tests for pz_flax.models.simple_mlp, with penzai 0.2.5 as the differential oracle."""

import jax
import numpy as np
import pytest
from penzai import pz as penzai_pz
from penzai.models import simple_mlp as penzai_simple_mlp

from pz_flax import pz
from pz_flax.core import named_axes
from pz_flax.models import simple_mlp


def _copy_params_to_penzai(ours, theirs):
    _, our_params = pz.unbind_params(ours)
    _, their_params = penzai_pz.unbind_params(theirs)
    theirs_by_label = {param.label: param for param in their_params}
    assert set(theirs_by_label) == {param.label for param in our_params}
    for param in our_params:
        names = tuple(param.value.named_shape)
        theirs_by_label[param.label].value = penzai_pz.nx.wrap(
            np.asarray(param.value.unwrap(*names)), *names
        )


def _inputs():
    data = np.asarray(jax.random.normal(jax.random.key(1), (4, 3)))
    return named_axes.wrap(data, "batch", "features"), penzai_pz.nx.wrap(data, "batch", "features")


def test_mlp_structure_and_matches_penzai():
    ours = simple_mlp.MLP.from_config(jax.random.key(0), [3, 8, 5, 2], activation_fn=jax.nn.tanh)
    theirs = penzai_simple_mlp.MLP.from_config(
        jax.random.key(0), [3, 8, 5, 2], activation_fn=jax.nn.tanh
    )
    assert [type(layer).__name__ for layer in ours.sublayers] == [
        "Affine",
        "Elementwise",
        "Affine",
        "Elementwise",
        "Affine",
    ]
    assert isinstance(ours, pz.nn.Sequential)
    _copy_params_to_penzai(ours, theirs)
    ours_in, theirs_in = _inputs()
    out = ours(ours_in)
    assert dict(out.named_shape) == {"batch": 4, "features": 2}
    np.testing.assert_allclose(
        np.asarray(out.unwrap("batch", "features")),
        np.asarray(theirs(theirs_in).unwrap("batch", "features")),
        rtol=1e-5,
        atol=1e-6,
    )


def test_mlp_custom_axis_and_name():
    model = simple_mlp.MLP.from_config(None, [3, 2], name="net", feature_axis="x")
    slots = pz.select(model).at_instances_of(pz.ParameterSlot).get_sequence()
    assert {slot.label for slot in slots} == {
        "net/Affine_0/Linear.weights",
        "net/Affine_0/AddBias.bias",
    }
    assert model.sublayers[0].sublayers[0].in_axis_names == ("x",)


def test_dropout_mlp_matches_penzai_with_same_stream():
    ours = simple_mlp.DropoutMLP.from_config(jax.random.key(0), [3, 8, 2], drop_rate=0.5)
    theirs = penzai_simple_mlp.DropoutMLP.from_config(jax.random.key(0), [3, 8, 2], drop_rate=0.5)
    assert [type(layer).__name__ for layer in ours.sublayers] == [
        "Affine",
        "StochasticDropout",
        "Elementwise",
        "Affine",
    ]
    _copy_params_to_penzai(ours, theirs)
    ours_in, theirs_in = _inputs()
    out = ours(ours_in, random_stream=pz.RandomStream.from_base_key(jax.random.key(2)))
    expected = theirs(
        theirs_in, random_stream=penzai_pz.RandomStream.from_base_key(jax.random.key(2))
    )
    np.testing.assert_allclose(
        np.asarray(out.unwrap("batch", "features")),
        np.asarray(expected.unwrap("batch", "features")),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("model_type", [simple_mlp.MLP, simple_mlp.DropoutMLP])
def test_too_few_feature_sizes(model_type):
    kwargs = {"drop_rate": 0.1} if model_type is simple_mlp.DropoutMLP else {}
    with pytest.raises(ValueError, match=rf"{model_type.__name__}.from_config.*\[3\]"):
        model_type.from_config(jax.random.key(0), [3], **kwargs)


def test_mlp_wrong_input_size_names_the_layer():
    model = simple_mlp.MLP.from_config(jax.random.key(0), [3, 2])
    with pytest.raises(pz.chk.StructureMismatchError, match=r"mlp/Affine_0.*'features' has size 4"):
        model(named_axes.ones({"batch": 2, "features": 4}))
