"""pz_flax: penzai's named-axis, selectable, visualizable models inside Flax NNX codebases.

The entry points most users need:

* ``from pz_flax import pz``: penzai's alias namespace (``pz.nx``, ``pz.nn``, ``pz.select``, ...).
* ``pz_flax.from_nnx(module)`` / ``pz_flax.to_nnx(layer)``: convert between Flax NNX modules and
  pz_flax layers.
* ``pz_flax.summary(model)``: a table of a model's layers and parameters, for either world.
* ``pz_flax.checkpoint``: Orbax checkpoints that keep axis names and rebuild models without code.

Every subpackage (``core``, ``nn``, ``toolshed``, ``models``, ``interop``, ``checkpoint``,
``pz``) is an attribute of ``pz_flax`` once imported, and is imported on first use: a bare
``import pz_flax`` loads none of them, so it neither pays for NNX interop and Orbax nor
registers the interop mappings.
"""

from typing import TYPE_CHECKING

from pz_flax._lazy import lazy_attributes

# The single source of the version: pyproject.toml reads it (``dynamic = ["version"]``).
__version__ = "0.1.0"

_SUBPACKAGES = ["checkpoint", "core", "interop", "models", "nn", "pz", "toolshed"]
_INTEROP_FUNCTIONS = ["from_nnx", "summary", "to_nnx"]

__all__ = ["__version__", *_INTEROP_FUNCTIONS, *_SUBPACKAGES]

if TYPE_CHECKING:
    from pz_flax import checkpoint
    from pz_flax import core
    from pz_flax import interop
    from pz_flax import models
    from pz_flax import nn
    from pz_flax import pz
    from pz_flax import toolshed
    from pz_flax.interop import from_nnx
    from pz_flax.interop import summary
    from pz_flax.interop import to_nnx

__getattr__, __dir__ = lazy_attributes(
    __name__,
    globals(),
    _SUBPACKAGES,
    reexports=dict.fromkeys(_INTEROP_FUNCTIONS, "pz_flax.interop"),
)
