"""A mixin that makes dataclass keys of different types sortable against each other.

JAX sorts dictionary keys when it flattens a dict (so that the same dict always
flattens to the same leaf order). A dict whose keys mix types therefore only
survives `jax.tree_util` and `jax.jit` if every pair of its keys is comparable.
Variable labels are the main case: state-variable labels and slot labels are
distinct dataclass types so that two kinds of label can never collide, but they
share dictionaries with plain string labels.

`AutoOrderedAcrossTypes` solves this with a total order that:

* sorts two instances of the same dataclass like ``order=True`` would (field
  by field, as a tuple of the fields taking part in comparison);
* sorts instances of two different subclasses by their type alone, so every
  instance of one type sits on the same side of every instance of the other;
* places every instance after every `str` and every `tuple`, so the mixin can
  live next to ordinary string (or tuple) keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class AutoOrderedAcrossTypes:
    """Mixin giving dataclasses a total order that also spans other subclasses.

    Subclasses must be dataclasses declared with ``eq=True`` and ``order=False``
    (both the dataclass defaults). ``eq=False`` would let ``==`` disagree with
    the ordering, and ``order=True`` would replace the comparisons defined here
    with ones that refuse to compare different types.

    Example::

        @dataclasses.dataclass(frozen=True)
        class StepLabel(AutoOrderedAcrossTypes):
            step: int

        sorted(["b", StepLabel(2), "a", StepLabel(1)])
        # ['a', 'b', StepLabel(step=1), StepLabel(step=2)]

    The order between two different subclasses is arbitrary but fixed for the
    life of the process: it depends on the types' qualified names, then their
    modules, then (only for two distinct types with the same name and module)
    their identity.
    """

    def _ordering_key(self) -> tuple[Any, ...]:
        """Returns the tuple this object is compared by.

        The type's identity comes first so that objects of different types never
        reach the point of comparing field values that may be incomparable.
        """
        if not dataclasses.is_dataclass(self):
            raise TypeError(
                f"{type(self).__qualname__} subclasses AutoOrderedAcrossTypes but is not a"
                " dataclass; decorate it with @dataclasses.dataclass."
            )
        cls = type(self)
        type_key = (cls.__qualname__, cls.__module__, id(cls))
        field_values = tuple(
            getattr(self, field.name) for field in dataclasses.fields(self) if field.compare
        )
        return (*type_key, *field_values)

    def __lt__(self, other: object) -> bool:
        if isinstance(other, str | tuple):
            return False
        if isinstance(other, AutoOrderedAcrossTypes):
            return self._ordering_key() < other._ordering_key()
        return NotImplemented

    def __le__(self, other: object) -> bool:
        if isinstance(other, str | tuple):
            return False
        if isinstance(other, AutoOrderedAcrossTypes):
            return self._ordering_key() <= other._ordering_key()
        return NotImplemented

    def __gt__(self, other: object) -> bool:
        if isinstance(other, str | tuple):
            return True
        if isinstance(other, AutoOrderedAcrossTypes):
            return self._ordering_key() > other._ordering_key()
        return NotImplemented

    def __ge__(self, other: object) -> bool:
        if isinstance(other, str | tuple):
            return True
        if isinstance(other, AutoOrderedAcrossTypes):
            return self._ordering_key() >= other._ordering_key()
        return NotImplemented
