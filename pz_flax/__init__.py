"""pz_flax: penzai's named-axis, selectable, visualizable models inside Flax NNX codebases.

The entry points most users need:

* ``from pz_flax import pz``: penzai's alias namespace (``pz.nx``, ``pz.nn``, ``pz.select``, ...).
* ``pz_flax.from_nnx(module)`` / ``pz_flax.to_nnx(layer)``: convert between Flax NNX modules and
  pz_flax layers.
* ``pz_flax.summary(model)``: a table of a model's layers and parameters, for either world.
* ``pz_flax.checkpoint``: Orbax checkpoints that keep axis names and rebuild models without code.
"""

from pz_flax.interop import from_nnx
from pz_flax.interop import summary
from pz_flax.interop import to_nnx

__version__ = "0.1.0"

__all__ = ["from_nnx", "summary", "to_nnx"]
