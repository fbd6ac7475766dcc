"""Named-axis versions of whole modules of positional functions: ``wrap_module(jnp)``.

``pz.nx.nmap(f)`` turns one positional function into one that maps over every named axis of
its NamedArray arguments. Writing ``nmap`` around each call gets noisy, so `wrap_module`
returns a stand-in for a module (``jax``, ``jax.numpy``, ``jax.lax``...) whose callables
come back already ``nmap``-ed and whose submodules come back wrapped the same way::

    njnp = auto_nmap.wrap_module(jax.numpy)
    njnp.linalg.norm(x.untag("features"))        # maps over x's remaining named axes
    njnp.arange(10).tag("seq")                    # constructors return NamedArrays

Only callables and submodules can be reached through the stand-in: constants such as
``jnp.pi`` or dtype objects are not functions of arrays, so asking for them is an
AttributeError that says so.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

from pz_flax.core import named_axes


@dataclasses.dataclass
class AutoNmapModuleWrapper:
    """Stands in for a module, handing out ``nmap``-ed callables and wrapped submodules.

    Attributes:
        _module: The wrapped module.
    """

    _module: types.ModuleType

    def __getattr__(self, name: str) -> Any:
        """Looks ``name`` up on the wrapped module and returns its named-axis version.

        Args:
            name: An attribute of the wrapped module.

        Returns:
            A wrapper of the same kind for a submodule, or ``nmap(attribute)`` for a callable.

        Raises:
            AttributeError: If the module has no such attribute, or it is neither a
                submodule nor a callable.
        """
        # Dataclass machinery and copy/pickle probe dunder names before ``_module`` is set;
        # answering them from the wrapped module would recurse or lie about this object.
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        attribute = getattr(self._module, name)
        if isinstance(attribute, types.ModuleType):
            return AutoNmapModuleWrapper(attribute)
        if callable(attribute):
            return named_axes.nmap(attribute)
        raise AttributeError(
            f"{self._module.__name__}.{name} is a {type(attribute).__name__}, not a callable or"
            " a submodule, so it has no named-axis version; use the original module for it."
        )


def wrap_module(module: types.ModuleType) -> AutoNmapModuleWrapper:
    """Returns a stand-in for ``module`` whose callables map over named axes.

    Args:
        module: A module of positional array functions, such as ``jax.numpy``.

    Returns:
        An `AutoNmapModuleWrapper`: attribute access gives ``nmap`` of the module's callables
        and wrapped versions of its submodules.
    """
    return AutoNmapModuleWrapper(module)
