"""Tests of the naming convention and the positional <-> named helpers."""

import jax.numpy as jnp
import numpy as np
import pytest

from pz_flax.core import named_axes
from pz_flax.interop import naming


def test_defaults_and_replace():
    default = naming.NNXNaming()
    assert default.features == "features"
    assert default.feature_axes(1) == ("features",)
    assert default.feature_axes(3) == ("features_0", "features_1", "features_2")
    renamed = default.replace(features="embedding", spatial=["h", "w"])
    assert renamed.features == "embedding"
    assert renamed.spatial == ("h", "w")
    with pytest.raises(TypeError, match=r"Unknown naming option\(s\) \['colour'\]"):
        default.replace(colour="red")
    with pytest.raises(TypeError, match="spatial must be a tuple of axis names"):
        naming.NNXNaming(spatial=())
    with pytest.raises(TypeError, match="input_axes must be a tuple"):
        naming.NNXNaming(input_axes="features")


def test_default_axis_names_by_rank():
    convention = naming.NNXNaming()
    assert convention.default_axis_names(0) == ()
    assert convention.default_axis_names(1) == ("features",)
    assert convention.default_axis_names(2) == ("batch", "features")
    assert convention.default_axis_names(3) == ("batch", "seq", "features")
    assert convention.default_axis_names(4) == ("batch", "height", "width", "features")
    assert convention.default_axis_names(5) == (
        "batch",
        "batch_1",
        "batch_2",
        "batch_3",
        "features",
    )


def test_spatial_axes_by_rank():
    convention = naming.NNXNaming()
    assert convention.spatial_axes(2) == ("height", "width")
    assert convention.spatial_axes(1) == ("seq",)
    assert convention.spatial_axes(3) == ("depth", "height", "width")
    with pytest.raises(ValueError, match="No spatial axis names for a 4-D convolution"):
        convention.spatial_axes(4)


def test_labels():
    assert naming.NNXNaming().label(("layers", 0, "kernel")) == "layers/0/kernel"
    assert naming.NNXNaming(label_prefix="m").label(("bias",)) == "m/bias"


def test_resolve_naming_precedence():
    base = naming.NNXNaming()
    resolved = naming.resolve_naming(
        base,
        {int: {"features": "by_class"}, "a/0": {"features": "by_path"}},
        int,
        ("a", 0),
        {"features": "by_mapping", "seq": "time"},
    )
    assert resolved.features == "by_path"
    assert resolved.seq == "time"
    assert naming.resolve_naming(base, {int: {"features": "c"}}, int, ("x",)).features == "c"


def test_check_overrides():
    assert naming.check_overrides(None) == {}
    with pytest.raises(TypeError, match="overrides must map"):
        naming.check_overrides([1])
    with pytest.raises(TypeError, match="must be a dict of naming options"):
        naming.check_overrides({"a": 3})
    with pytest.raises(TypeError, match="Unknown naming option"):
        naming.check_overrides({"a": {"nope": 1}})


def test_to_positional_moves_trailing_axes_last():
    data = jnp.arange(24.0).reshape(2, 3, 4)
    value = named_axes.wrap(data).tag("features", "batch", "seq")
    positional, leading = naming.to_positional(value, ("features",))
    assert leading == ("batch", "seq")
    np.testing.assert_array_equal(positional, jnp.transpose(data, (1, 2, 0)))
    plain, none = naming.to_positional(data, ("features",))
    assert plain is data and none is None


def test_from_positional_names_output_and_checks_rank():
    out = jnp.ones((2, 5))
    result = naming.from_positional(out, ("batch",), ("features",), 0, "m")
    assert dict(result.named_shape) == {"batch": 2, "features": 5}
    assert naming.from_positional(out, None, ("features",), 0, "m") is out
    with pytest.raises(ValueError, match=r"cannot be named \('batch', 'seq', 'features'\)"):
        naming.from_positional(out, ("batch", "seq"), ("features",), 0, "m")


def test_name_positional_input_and_unname_output():
    convention = naming.NNXNaming()
    data = jnp.ones((2, 3))
    value = naming.name_positional_input(data, None, convention)
    assert dict(value.named_shape) == {"batch": 2, "features": 3}
    assert naming.name_positional_input(value, None, convention) is value
    with pytest.raises(ValueError, match="Cannot name an input of shape"):
        naming.name_positional_input(data, ("a",), convention)
    output = named_axes.wrap(jnp.zeros((3, 4, 2))).tag("features", "vocab", "batch")
    unnamed = naming.unname_output({"y": output}, ("batch", "features"))
    assert unnamed["y"].shape == (2, 3, 4)
