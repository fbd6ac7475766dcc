"""One registry type for every process-wide table pz_flax keeps.

pz_flax has a few tables that users extend: NNX-to-pz layer mappings, elementwise functions,
axis namers for wrapped NNX modules, and the names a checkpoint may resolve. Each is a
``Registry``: it can be extended (``register``), undone (``unregister``), and extended only for
the duration of a ``with`` block (``scoped``), so that a notebook experiment or a test does not
leave its entries behind for everything that runs later. ``isolated`` restores a whole table,
whatever happened inside the block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Iterator
from typing import Generic
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MISSING = object()


def _describe_key(key: object) -> str:
    if isinstance(key, type):
        return f"{key.__module__}.{key.__qualname__}"
    qualname = getattr(key, "__qualname__", None)
    module = getattr(key, "__module__", None)
    if callable(key) and isinstance(qualname, str) and isinstance(module, str):
        return f"{module}.{qualname}"
    return repr(key)


class Registry(Generic[K, V]):
    """A named table from hashable keys to values, with undo.

    Attributes:
        name: What the table holds, for messages (``"layer mappings"``).
        version: Incremented on every change, so that caches derived from the table know
            when to rebuild.
    """

    def __init__(self, name: str, *, describe_key: Callable[[K], str] = _describe_key):
        self.name = name
        self.version = 0
        self._entries: dict[K, V] = {}
        self._describe_key = describe_key

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {len(self._entries)} entries)"

    def register(self, key: K, value: V, *, replace: bool = False) -> V:
        """Adds ``key -> value``; returns ``value``.

        Raises:
            TypeError: If ``key`` is not hashable.
            ValueError: If ``key`` is registered already and ``replace`` is False.
        """
        try:
            hash(key)
        except TypeError as exc:
            raise TypeError(
                f"Keys of the {self.name} registry must be hashable, got {key!r}."
            ) from exc
        if key in self._entries and not replace:
            raise ValueError(
                f"{self._describe_key(key)} is already in the {self.name} registry (as"
                f" {self._entries[key]!r}); pass replace=True to replace it."
            )
        self._entries[key] = value
        self.version += 1
        return value

    def unregister(self, key: K) -> V:
        """Removes ``key``; returns the value it had.

        Raises:
            KeyError: If ``key`` is not registered.
        """
        try:
            value = self._entries.pop(key)
        except KeyError:
            raise KeyError(
                f"{self._describe_key(key)} is not in the {self.name} registry."
            ) from None
        self.version += 1
        return value

    @contextlib.contextmanager
    def scoped(self, key: K, value: V, *, replace: bool = False) -> Iterator[V]:
        """Registers ``key -> value`` for the ``with`` block, then restores what was there."""
        previous = self._entries.get(key, _MISSING)
        self.register(key, value, replace=replace)
        try:
            yield value
        finally:
            if previous is _MISSING:
                self._entries.pop(key, None)
            else:
                self._entries[key] = previous  # type: ignore[assignment]
            self.version += 1

    @contextlib.contextmanager
    def isolated(self) -> Iterator[Registry[K, V]]:
        """Restores the whole table after the ``with`` block, whatever it registered."""
        saved = dict(self._entries)
        try:
            yield self
        finally:
            self._entries = saved
            self.version += 1

    def get(self, key: K, default: V | None = None) -> V | None:
        try:
            return self._entries.get(key, default)
        except TypeError:  # An unhashable key cannot have been registered.
            return default

    def __getitem__(self, key: K) -> V:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(
                f"{self._describe_key(key)} is not in the {self.name} registry."
            ) from None

    def __contains__(self, key: object) -> bool:
        try:
            return key in self._entries
        except TypeError:
            return False

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[K, V]]:
        """A snapshot of the entries, in registration order."""
        return list(self._entries.items())

    def snapshot(self) -> dict[K, V]:
        """A copy of the table."""
        return dict(self._entries)
