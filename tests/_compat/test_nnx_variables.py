"""Canaries for what ``pz_flax._compat.nnx`` assumes about NNX variables.

Each test checks one assumption against the installed flax release and, when it breaks, fails
with a message naming the assumption and the function in ``pz_flax/_compat/nnx.py`` to update.
"""

from __future__ import annotations

import abc
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import errors as flax_errors
from flax import nnx

from pz_flax._compat import nnx as nnx_compat


def test_variable_metaclass_derives_from_nnx_and_the_other_metaclass():
    combined = nnx_compat.variable_metaclass_with(abc.ABCMeta)
    assert issubclass(combined, type(nnx.Variable)) and issubclass(combined, abc.ABCMeta), (
        "variable_metaclass_with(ABCMeta) must derive from nnx.Variable's metaclass and ABCMeta"
    )
    assert nnx_compat.variable_metaclass_with(abc.ABCMeta) is combined, "built once per metaclass"

    class Interface(abc.ABC):
        __slots__ = ()

        @abc.abstractmethod
        def kind(self) -> str: ...

    class Concrete(nnx.Variable, Interface, metaclass=combined):
        def kind(self) -> str:
            return "concrete"

    class Incomplete(nnx.Variable, Interface, metaclass=combined):
        pass

    assert Concrete(jnp.zeros(2)).kind() == "concrete"
    with pytest.raises(TypeError, match="abstract"):
        Incomplete(jnp.zeros(2))


def test_metaclass_of_a_release_whose_variables_use_plain_type():
    # flax 0.12.0: ``type(nnx.Variable) is type``; ``class M(type, ABCMeta)`` has no valid MRO.
    assert nnx_compat._most_derived_metaclass(type, abc.ABCMeta) is abc.ABCMeta
    assert nnx_compat._most_derived_metaclass(abc.ABCMeta, type) is abc.ABCMeta

    class OtherMeta(type):
        pass

    combined = nnx_compat._most_derived_metaclass(OtherMeta, abc.ABCMeta)
    assert combined.__mro__[1:3] == (OtherMeta, abc.ABCMeta)


def test_plain_variable_switches_exist_in_this_release():
    assert nnx_compat.PLAIN_VARIABLE_OPTIONS, (
        "nnx.Variable's constructor has none of the switches"
        f" {nnx_compat._PLAIN_VARIABLE_SWITCHES}: NNX renamed its hijax/ref options again;"
        " update pz_flax._compat.nnx._PLAIN_VARIABLE_SWITCHES."
    )
    assert set(nnx_compat.PLAIN_VARIABLE_OPTIONS.values()) == {False}


def test_plain_variable_options_give_a_plain_variable_even_under_other_defaults():
    variable = nnx.Variable(jnp.arange(3.0), **nnx_compat.PLAIN_VARIABLE_OPTIONS)
    raw = variable.get_raw_value()
    assert isinstance(raw, jax.Array), (
        f"a variable built with PLAIN_VARIABLE_OPTIONS holds a {type(raw).__name__}, not the"
        " array it was given: pz_flax._compat.nnx.PLAIN_VARIABLE_OPTIONS no longer turns off"
        " NNX's array refs"
    )
    with nnx.var_defaults(hijax=True, ref=True):
        variable = nnx.Variable(jnp.arange(3.0), **nnx_compat.PLAIN_VARIABLE_OPTIONS)
    assert isinstance(variable, nnx.Variable) and type(variable) is nnx.Variable
    assert isinstance(variable.get_raw_value(), jax.Array)


def test_nnx_metadata_keys_match_what_a_variable_carries():
    keys = nnx_compat.nnx_metadata_keys()
    fresh = set(nnx.Variable(jnp.zeros(())).get_metadata())
    assert fresh <= keys.required, (
        f"a fresh nnx.Variable carries {fresh - keys.required} that nnx_metadata_keys().required"
        " does not list"
    )
    declared = getattr(nnx.Variable, "required_metadata", frozenset())
    assert declared <= keys.required
    assert keys.sharding not in keys.sharding_aliases
    assert keys.sharding_related == {keys.sharding} | keys.sharding_aliases | keys.sharding_context
    assert keys.all == keys.required | keys.sharding_related


def test_nnx_stores_every_sharding_alias_under_the_sharding_key():
    keys = nnx_compat.nnx_metadata_keys()
    assert keys.sharding_aliases, "this release accepts no alias for its sharding key"
    for alias in keys.sharding_aliases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            variable = nnx.Variable(jnp.zeros((2,)), eager_sharding=False, **{alias: ("a",)})
        metadata = variable.get_metadata()
        assert metadata.get(keys.sharding) == ("a",) and alias not in metadata, (
            f"NNX no longer renames the metadata entry {alias!r} to {keys.sharding!r}:"
            " pz_flax._compat.nnx.nnx_metadata_keys needs updating"
        )


def test_nnx_reads_the_sharding_key_and_its_context():
    # ``nnx.get_partition_spec`` is NNX's public reader of sharding annotations; it must see
    # the annotation under the key nnx_metadata_keys names.
    keys = nnx_compat.nnx_metadata_keys()
    assert keys.sharding_context == {"mesh", "sharding_rules"}
    state = nnx.State(
        {"w": nnx.Param(jnp.zeros((2, 3)), eager_sharding=False, **{keys.sharding: ("a", None)})}
    )
    spec = nnx.get_partition_spec(state)["w"].get_value()
    assert spec == jax.sharding.PartitionSpec("a", None), (
        f"nnx.get_partition_spec does not read the {keys.sharding!r} entry:"
        " pz_flax._compat.nnx.nnx_metadata_keys names the wrong sharding key"
    )


def test_current_trace_differs_inside_a_jit_and_matches_nnx():
    outside = nnx_compat.current_trace()
    assert nnx_compat.current_trace() == outside
    seen_inside = []

    @jax.jit
    def inside(x):
        seen_inside.append(nnx_compat.current_trace())
        return x

    inside(1.0)
    assert seen_inside[0] != outside
    # NNX refuses writes exactly when the token differs from the variable's creation token.
    variable = nnx.Variable(jnp.zeros(()))

    @jax.jit
    def write(x):
        variable.set_raw_value(x)
        return x

    with pytest.raises(flax_errors.TraceContextError):
        write(1.0)


def test_raw_value_slot_fast_route_is_active():
    assert nnx_compat.raw_value_slot_is_usable(), (
        "a value stored in nnx.Variable's raw-value slot"
        f" ({nnx_compat._RAW_VALUE_SLOT!r}) is not what get_raw_value() returns: NNX renamed"
        " the slot; pz_flax._compat.nnx.write_raw_values_unchecked falls back to set_raw_value"
        " (correct, but the trainer loses its fast path)"
    )


def test_write_raw_values_unchecked_stores_values_even_inside_a_trace():
    first, second = nnx.Variable(jnp.zeros(())), nnx.Param(jnp.zeros((2,)))
    new_values = [np.float32(1.0), jnp.ones((2,))]
    nnx_compat.write_raw_values_unchecked([first, second], iter(new_values))
    assert first.get_raw_value() is new_values[0] and second.get_raw_value() is new_values[1]
    with pytest.raises(ValueError):
        nnx_compat.write_raw_values_unchecked([first, second], [1.0])


def test_write_raw_values_unchecked_falls_back_to_the_checked_setter(monkeypatch):
    monkeypatch.setattr(nnx_compat, "raw_value_slot_is_usable", lambda: False)
    variable = nnx.Variable(jnp.zeros(()))
    nnx_compat.write_raw_values_unchecked([variable], [jnp.ones(())])
    assert float(variable.get_raw_value()) == 1.0

    @jax.jit
    def write(x):
        nnx_compat.write_raw_values_unchecked([variable], [x])
        return x

    with pytest.raises(flax_errors.TraceContextError):
        write(2.0)
    assert float(variable.get_raw_value()) == 1.0


@pytest.mark.parametrize("fast_route", [True, False], ids=["slot", "get_raw_value"])
def test_read_raw_values_gives_what_get_raw_value_gives(monkeypatch, fast_route):
    monkeypatch.setattr(nnx_compat, "raw_value_slot_is_usable", lambda: fast_route)
    variables = [nnx.Variable(jnp.zeros(())), nnx.Param(jnp.ones((2,)))]
    values = nnx_compat.read_raw_values(iter(variables))
    assert [id(value) for value in values] == [id(v.get_raw_value()) for v in variables]
    assert nnx_compat.read_raw_values([]) == []
