"""PEP 562 lazy attributes for pz_flax's packages.

``import pz_flax`` must stay cheap (no NNX interop, no Orbax) and must not register anything
as a side effect, yet ``pz_flax.checkpoint.save`` should work right after it, as it would for
a package that imported everything eagerly. A package's module-level ``__getattr__`` (PEP 562)
gives both: the submodule is imported the first time someone reads the attribute, after which
it is an ordinary module attribute and ``__getattr__`` is no longer consulted.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any


def lazy_attributes(
    package: str,
    module_globals: dict[str, Any],
    submodules: Iterable[str],
    reexports: Mapping[str, str] | None = None,
    module_aliases: Mapping[str, str] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Builds a package's module-level ``__getattr__`` and ``__dir__``.

    Args:
      package: The package's full name (its ``__name__``).
      module_globals: The package's ``globals()``; loaded values are cached there, so each is
        imported once and later reads never reach ``__getattr__``.
      submodules: Names of submodules reachable as attributes (``package.<name>``).
      reexports: Attribute name to the full name of the module that defines it, for objects
        the package re-exports from another module.
      module_aliases: Attribute name to the full name of a module the attribute is (as
        ``pz.nx`` is ``pz_flax.core.named_axes``).

    Returns:
      ``(__getattr__, __dir__)`` to assign at the package's top level.
    """
    submodule_names = frozenset(submodules)
    reexported = dict(reexports or {})
    aliased = dict(module_aliases or {})

    def __getattr__(name: str) -> Any:
        if name in submodule_names:
            value = importlib.import_module(f"{package}.{name}")
        elif name in reexported:
            value = getattr(importlib.import_module(reexported[name]), name)
        elif name in aliased:
            value = importlib.import_module(aliased[name])
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_globals[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(module_globals) | submodule_names | set(reexported) | set(aliased))

    return __getattr__, __dir__
