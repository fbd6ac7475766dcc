"""Tests for ``pz_flax.core.registry``: register, unregister, scoped and isolated tables."""

import jax
import pytest

from pz_flax.core import registry


def make_registry():
    return registry.Registry("test things")


def test_register_returns_value_and_is_looked_up():
    table = make_registry()
    assert table.register("a", 1) == 1
    assert "a" in table and table["a"] == 1 and table.get("a") == 1
    assert table.items() == [("a", 1)] and len(table) == 1 and list(table) == ["a"]


def test_register_twice_names_the_key_and_registry():
    table = make_registry()
    table.register(jax.nn.relu, "relu")
    with pytest.raises(ValueError, match=r"jax.*relu is already in the test things registry"):
        table.register(jax.nn.relu, "other")
    table.register(jax.nn.relu, "other", replace=True)
    assert table[jax.nn.relu] == "other"


def test_unhashable_key_is_a_type_error():
    table = make_registry()
    with pytest.raises(TypeError, match="must be hashable"):
        table.register([1], 1)
    assert [1] not in table and table.get([1], "default") == "default"


def test_unregister_and_missing_key_errors():
    table = make_registry()
    table.register(int, "int")
    assert table.unregister(int) == "int"
    with pytest.raises(KeyError, match=r"builtins.int is not in the test things registry"):
        table.unregister(int)
    with pytest.raises(KeyError, match="not in the test things registry"):
        table[int]


def test_scoped_restores_absence_and_previous_value():
    table = make_registry()
    with table.scoped("a", 1):
        assert table["a"] == 1
    assert "a" not in table
    table.register("a", 1)
    with table.scoped("a", 2, replace=True):
        assert table["a"] == 2
    assert table["a"] == 1
    with pytest.raises(ValueError, match="already in"), table.scoped("a", 3):
        pass
    assert table["a"] == 1


def test_scoped_restores_after_an_exception():
    table = make_registry()
    with pytest.raises(RuntimeError), table.scoped("a", 1):
        raise RuntimeError("boom")
    assert "a" not in table


def test_isolated_restores_the_whole_table_and_version_changes():
    table = make_registry()
    table.register("kept", 0)
    before = table.version
    with table.isolated():
        table.register("new", 1)
        table.unregister("kept")
    assert table.snapshot() == {"kept": 0}
    assert table.version > before
