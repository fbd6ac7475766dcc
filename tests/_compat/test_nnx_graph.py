"""Canaries for what pz_flax assumes about NNX modules' instance attributes.

``pz_flax._compat.nnx`` takes NNX's bookkeeping attributes to be exactly those an empty
``nnx.Module()`` holds. These tests fail, naming that assumption, if a flax release adds
bookkeeping later in a module's life (construction, split/merge, tracing) or stops keeping it
apart from the module's own attributes.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

from pz_flax._compat import nnx as compat_nnx

ASSUMPTION = (
    "pz_flax._compat.nnx assumes NNX's bookkeeping attributes on a module instance are exactly"
    " those of an empty nnx.Module()"
)


class _Holder(nnx.Module):
    def __init__(self):
        self.linear = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        self.scale = nnx.Param(jnp.ones(3))
        self.setting = "relu"

    def __call__(self, x):
        return self.linear(x) * self.scale


OWN_NAMES = ["linear", "scale", "setting"]


def _extra_names(module: nnx.Module, own: list[str]) -> set[str]:
    return set(vars(module)) - set(own) - compat_nnx.BOOKKEEPING_ATTRIBUTES


def test_an_empty_module_defines_the_bookkeeping():
    assert set(vars(nnx.Module())) == compat_nnx.BOOKKEEPING_ATTRIBUTES, ASSUMPTION
    assert all(compat_nnx.is_bookkeeping_attribute(name) for name in vars(nnx.Module()))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_Holder, id="constructed"),
        pytest.param(lambda: nnx.merge(*nnx.split(_Holder())), id="split-merge"),
        pytest.param(lambda: nnx.clone(_Holder()), id="clone"),
        pytest.param(lambda: nnx.eval_shape(_Holder), id="eval_shape"),
    ],
)
def test_modules_hold_only_their_own_attributes_and_the_bookkeeping(make):
    module = make()
    assert not _extra_names(module, OWN_NAMES), (
        f"{ASSUMPTION}; also found {_extra_names(module, OWN_NAMES)}"
    )
    assert [name for name, _ in compat_nnx.own_attributes(module)] == OWN_NAMES


def test_bookkeeping_stays_the_same_after_the_module_is_traced():
    module = _Holder()

    @nnx.jit
    def step(model, x):
        model.scale[...] = model.scale[...] + 1
        return model(x)

    step(module, jnp.ones((1, 2)))
    nnx.state(module)
    nnx.graphdef(module)
    assert not _extra_names(module, OWN_NAMES), ASSUMPTION
    assert dict(compat_nnx.own_attributes(module))["setting"] == "relu"


def test_own_attributes_keep_definition_order_and_values():
    module = _Holder()
    attributes = compat_nnx.own_attributes(module)
    assert [value for _, value in attributes] == [module.linear, module.scale, "relu"]
    # A fresh list each time: editing it changes nothing in the module.
    attributes.clear()
    assert len(compat_nnx.own_attributes(module)) == 3


def test_own_attributes_of_containers_are_their_entries():
    inner = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    mapping = nnx.Dict({"a": inner, "b": 2})
    assert dict(compat_nnx.own_attributes(mapping)) == {"a": inner, "b": 2}


def test_user_attributes_are_not_bookkeeping():
    assert not compat_nnx.is_bookkeeping_attribute("kernel")
    assert not compat_nnx.is_bookkeeping_attribute(0)
