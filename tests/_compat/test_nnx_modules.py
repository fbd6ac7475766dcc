"""Canaries for what ``pz_flax._compat.nnx`` assumes about NNX layers and ``Module.sow``.

Each test checks one assumption against the installed flax release and, when it breaks, fails
with a message naming the assumption and the function in ``pz_flax/_compat/nnx.py`` to update.
The ``capture`` tests run both routes: NNX's own ``nnx.capture`` where the release has it, and
the fallback of releases before 0.12.6, which must give the same results.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pz_flax._compat import nnx as compat_nnx
from pz_flax._compat import nnx_modules

# The fallback sows outside nnx.capture on purpose, which flax 0.12.6+ deprecates.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Using 'Module\.sow\(\)' outside of 'nnx\.capture\(\)':DeprecationWarning"
)

HAS_NNX_CAPTURE = hasattr(nnx, "capture")
HAS_KV_HEADS = "num_kv_heads" in inspect.signature(nnx.MultiHeadAttention).parameters

CAPTURE_ROUTES = [
    pytest.param(compat_nnx.capture, id="installed"),
    pytest.param(compat_nnx._capture_by_popping, id="fallback"),
]


class Sowing(nnx.Module):
    """Doubles its input, sowing the input under ``seen`` and perturbing the output."""

    def __init__(self):
        self.inner = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

    def __call__(self, x):
        self.sow(nnx.Intermediate, "seen", x)
        self.inner.sow(nnx.Intermediate, "seen_inner", x * 3)
        return x * 2


class Failing(nnx.Module):
    def __call__(self, x):
        self.sow(nnx.Intermediate, "seen", x)
        raise ValueError("the module failed")


def sown_values(module: nnx.Module) -> dict[str, np.ndarray]:
    """What ``sow`` left on the module, by ``/``-joined path."""
    state = nnx.state(module, nnx.Intermediate)
    return {
        "/".join(map(str, path)): np.asarray(variable.get_value()[0])
        for path, variable in nnx.to_flat_state(state)
    }


def sown_entries(collected: nnx.State) -> dict[str, list[float]]:
    return {
        "/".join(map(str, path)): [np.asarray(entry).tolist() for entry in variable.get_value()]
        for path, variable in nnx.to_flat_state(collected)
    }


def test_attention_kv_heads_of_a_plain_attention_is_its_head_count():
    attention = nnx.MultiHeadAttention(4, 8, decode=False, rngs=nnx.Rngs(0))
    assert compat_nnx.attention_kv_heads(attention) == 4


@pytest.mark.skipif(not HAS_KV_HEADS, reason="grouped-query attention arrived in flax 0.12.6")
def test_attention_kv_heads_reads_grouped_query_attention():
    attention = nnx.MultiHeadAttention(4, 8, num_kv_heads=2, decode=False, rngs=nnx.Rngs(0))
    assert compat_nnx.attention_kv_heads(attention) == 2, (
        "pz_flax._compat.nnx.attention_kv_heads assumes nnx.MultiHeadAttention keeps its"
        " num_kv_heads argument as the num_kv_heads attribute"
    )


@pytest.mark.skipif(HAS_KV_HEADS, reason="this flax release has grouped-query attention")
def test_attention_without_kv_heads_option_projects_keys_to_every_head():
    attention = nnx.MultiHeadAttention(4, 8, decode=False, rngs=nnx.Rngs(0))
    heads_of_key_kernel = attention.key.kernel.shape[1]
    assert heads_of_key_kernel == attention.num_heads, (
        "pz_flax._compat.nnx.attention_kv_heads assumes a flax release without num_kv_heads"
        " projects keys and values to num_heads heads"
    )


def test_attention_kv_heads_names_the_helper_when_the_attribute_is_missing(monkeypatch):
    attention = nnx.MultiHeadAttention(4, 8, decode=False, rngs=nnx.Rngs(0))
    monkeypatch.setattr(compat_nnx, "_ATTENTION_HAS_KV_HEADS", True)
    if hasattr(attention, "num_kv_heads"):
        monkeypatch.delattr(attention, "num_kv_heads")
    with pytest.raises(RuntimeError, match=r"_compat\.nnx\.attention_kv_heads needs updating"):
        compat_nnx.attention_kv_heads(attention)


def test_installed_route_is_nnx_capture_exactly_when_the_release_has_it():
    module = Sowing()
    route = compat_nnx.capture(module, nnx.Intermediate)
    # nnx.capture wraps its function (functools.wraps); the fallback returns its own closure.
    assert (route.__qualname__ == "_capture_by_popping.<locals>.call") is not HAS_NNX_CAPTURE, (
        "pz_flax._compat.nnx.capture must use nnx.capture when the release has it (0.12.6+)"
        " and the popping fallback otherwise"
    )


@pytest.mark.parametrize("capture", CAPTURE_ROUTES)
def test_capture_collects_each_call_apart_and_leaves_the_module_unchanged(capture):
    module = Sowing()
    forward = capture(module, nnx.Intermediate)
    for value in (1.0, 5.0):
        output, collected = forward(jnp.full((2,), value))
        np.testing.assert_array_equal(output, jnp.full((2,), 2 * value))
        assert sown_entries(collected) == {
            "seen": [[value, value]],
            "inner/seen_inner": [[3 * value, 3 * value]],
        }, "pz_flax._compat.nnx.capture: each call must collect only its own sown values"
        assert sown_values(module) == {}, "the sown values must stay off the module"


@pytest.mark.parametrize("capture", CAPTURE_ROUTES)
def test_capture_without_types_returns_the_output_and_drops_what_was_sown(capture):
    module = Sowing()
    output = capture(module)(jnp.ones((2,)))
    np.testing.assert_array_equal(output, jnp.full((2,), 2.0))
    assert sown_values(module) == {}


@pytest.mark.parametrize("capture", CAPTURE_ROUTES)
def test_capture_of_a_function_collects_below_its_first_argument(capture):
    module = Sowing()
    forward = capture(lambda prepared, x: module(x), nnx.Intermediate)
    _, collected = forward([module.inner], jnp.ones((2,)))
    assert sown_entries(collected) == {"0/seen_inner": [[3.0, 3.0]]}
    assert "inner/seen_inner" not in sown_values(module)


def test_fallback_keeps_values_sown_before_the_call():
    module = Sowing()
    module(jnp.full((2,), 7.0))  # sown onto the module, outside any capture
    before = sown_values(module)
    _, collected = compat_nnx._capture_by_popping(module, nnx.Intermediate)(jnp.ones((2,)))
    assert sown_entries(collected)["seen"] == [[1.0, 1.0]], (
        "the call starts from an empty collection"
    )
    after = sown_values(module)
    assert after.keys() == before.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


def test_fallback_restores_the_module_when_the_call_raises():
    module = Failing()
    module.sow(nnx.Intermediate, "seen", jnp.zeros((1,)))
    with pytest.raises(ValueError, match="the module failed"):
        compat_nnx._capture_by_popping(module, nnx.Intermediate)(jnp.ones((1,)))
    np.testing.assert_array_equal(sown_values(module)["seen"], jnp.zeros((1,)))


class TwoChildren(nnx.Module):
    def __init__(self):
        self.first = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
        self.second = nnx.Linear(2, 2, rngs=nnx.Rngs(1))
        self.width = 2


def test_shallow_copy_without_leaves_the_original_and_its_graph_definition_alone():
    module = TwoChildren()
    graphdef_before = nnx.graphdef(module)
    shell = nnx_modules.shallow_copy_without(module, ["second"])
    assert not hasattr(shell, "second") and shell.first is module.first and shell.width == 2
    assert module.second is not None
    assert nnx.graphdef(module) == graphdef_before, (
        "pz_flax._compat.nnx_modules.shallow_copy_without: removing an attribute from the copy"
        " changed the original module's graph definition (its record of data attributes)"
    )
    assert [name for name, *_ in nnx_modules.module_attributes(shell)] == ["first", "width"]


def test_shallow_copy_without_names_attributes_the_module_lacks():
    with pytest.raises(AttributeError, match=r"TwoChildren has no attributes \['third'\]"):
        nnx_modules.shallow_copy_without(TwoChildren(), ["third", "first"])


class DataAndSettings(nnx.Module):
    def __init__(self):
        self.linear = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
        self.scale = nnx.Param(jnp.ones((2,)))
        self.table = nnx.data(jnp.zeros((3,)))
        self.width = 2
        self.name = "block"


def test_module_attributes_says_what_nnx_records_as_data():
    module = DataAndSettings()
    described = {name: is_data for name, _, is_data in nnx_modules.module_attributes(module)}
    assert described == {
        "linear": True,
        "scale": True,
        "table": True,
        "width": False,
        "name": False,
    }, (
        "pz_flax._compat.nnx_modules.module_attributes: NNX's record of data attributes"
        " (_pytree__nodes) no longer tells data from settings as flax 0.12 does"
    )
    # The record and NNX's own type test agree wherever both answer.
    for name, value, is_data in nnx_modules.module_attributes(module):
        if not isinstance(value, jnp.ndarray):  # a plain array is data only when marked so
            assert is_data == nnx.is_data(value), name


def test_module_attributes_asks_nnx_about_an_attribute_its_record_lacks():
    module = DataAndSettings()
    # Written past NNX's __setattr__, as a shell built by empty_module_with could be.
    object.__setattr__(module, "extra_param", nnx.Param(jnp.ones((1,))))
    object.__setattr__(module, "extra_setting", 7)
    described = {name: is_data for name, _, is_data in nnx_modules.module_attributes(module)}
    assert described["extra_param"] is True and described["extra_setting"] is False
