"""Layer colours in treescope match penzai's for every type the two libraries share."""

import importlib
import inspect
import re

import jax
import pytest
import treescope
from penzai import pz as penzai_pz

from pz_flax import pz
from pz_flax.core import struct
from pz_flax.core._treescope_handlers import struct_handler

_MODULE_PAIRS = [(penzai_pz.nn, pz.nn)] + [
    (
        importlib.import_module(f"penzai.models.{name}"),
        importlib.import_module(f"pz_flax.models.{name}"),
    )
    for name in (
        "simple_mlp",
        "transformer.model_parts",
        "transformer.sampling_mode",
        "transformer.variants.llamalike_common",
        "transformer.variants.gpt_neox",
    )
]
# Types whose colour depends on a field; they get built instances below.
_FIELD_COLOURED = {"Elementwise", "NamedGroup"}


def _shared_layer_types():
    pairs = []
    for penzai_module, our_module in _MODULE_PAIRS:
        for name, theirs in inspect.getmembers(penzai_module, inspect.isclass):
            ours = getattr(our_module, name, None)
            if (
                ours is not None
                and issubclass(theirs, penzai_pz.nn.Layer)
                and not inspect.isabstract(theirs)
                and name not in _FIELD_COLOURED
            ):
                pairs.append(pytest.param(ours, theirs, id=name))
    return pairs


def _bare(cls):
    # The colour of these types depends on the type alone, so no fields are needed.
    return object.__new__(cls)


@pytest.mark.parametrize(("ours", "theirs"), _shared_layer_types())
def test_layer_type_colour_matches_penzai(ours, theirs):
    assert ours.treescope_color(_bare(ours)) == theirs.treescope_color(_bare(theirs))


def test_the_issue_examples_are_covered():
    covered = {param.id for param in _shared_layer_types()}
    assert {"MLP", "RenameAxes", "TransformerLM", "Residual", "TransformerBlock"} <= covered


@pytest.mark.parametrize("fn", [jax.nn.relu, jax.nn.gelu, jax.numpy.tanh])
def test_elementwise_colour_follows_its_function_like_penzai(fn):
    assert pz.nn.Elementwise(fn).treescope_color() == penzai_pz.nn.Elementwise(fn).treescope_color()


def test_named_group_colour_follows_its_name_like_penzai():
    assert (
        pz.nn.NamedGroup("block", []).treescope_color()
        == penzai_pz.nn.NamedGroup("block", []).treescope_color()
    )


@pytest.mark.parametrize(
    "name",
    ["Parameter", "ParameterValue", "ParameterSlot", "StateVariableValue", "StateVariableSlot"],
)
def test_variable_colours_match_penzai(name):
    ours, theirs = getattr(pz, name), getattr(penzai_pz, name)
    assert ours.treescope_color(_bare(ours)) == theirs.treescope_color(_bare(theirs))


def test_user_layer_types_keep_their_own_name():
    @struct.pytree_dataclass
    class MyLayer(pz.nn.Layer):
        def __call__(self, value, **_unused):
            return value

    @penzai_pz.pytree_dataclass
    class MyPenzaiLayer(penzai_pz.nn.Layer):
        def __call__(self, value, **_unused):
            return value

    MyPenzaiLayer.__qualname__ = MyLayer.__qualname__
    assert MyLayer().treescope_color() == MyPenzaiLayer().treescope_color()
    assert struct_handler.type_color(MyLayer) != struct_handler.type_color(pz.nn.Residual)


def test_type_color_maps_only_the_pz_flax_package():
    class Lookalike:
        pass

    Lookalike.__module__ = "pz_flax_extras.layers"
    Lookalike.__qualname__ = "Residual"
    assert struct_handler.type_color(Lookalike) != struct_handler.type_color(pz.nn.Residual)
    assert struct_handler.type_color(pz.nn.Residual) == penzai_pz.nn.Residual.treescope_color(
        _bare(penzai_pz.nn.Residual)
    )


def _colours_in(html: str) -> list[str]:
    return sorted(re.findall(r"(?:oklch\([^)]*\)|#[0-9a-fA-F]{6})", html))


def test_rendered_model_uses_penzai_colours():
    def build(lib):
        return lib.nn.Sequential(
            [
                lib.nn.Residual(lib.nn.Elementwise(jax.nn.relu)),
                lib.nn.RenameAxes(old="a", new="b"),
                lib.nn.NamedGroup("head", [lib.nn.Identity()]),
            ]
        )

    ours = treescope.render_to_html(build(pz), compressed=False)
    theirs = treescope.render_to_html(build(penzai_pz), compressed=False)
    assert _colours_in(ours) == _colours_in(theirs)
