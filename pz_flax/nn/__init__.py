"""Neural-network building blocks over named axes.

Every layer here is an immutable ``Struct`` called as ``layer(x, **side_inputs)``; its
parameters are ``pz_flax.core.variables.Parameter`` objects, which are also Flax NNX
``Param`` variables, so the same model can be inspected penzai-style and trained NNX-style.
Users normally reach these classes through the ``pz.nn`` alias namespace. Each module is an
attribute of this package on first use (``pz_flax.nn.linear_and_affine``), imported only then.
"""

from typing import TYPE_CHECKING

from pz_flax._lazy import lazy_attributes

__all__ = [
    "attention",
    "basic_ops",
    "combinators",
    "dropout",
    "embeddings",
    "grouping",
    "layer",
    "layer_stack",
    "linear_and_affine",
    "parameters",
    "standardization",
]

if TYPE_CHECKING:
    from pz_flax.nn import attention
    from pz_flax.nn import basic_ops
    from pz_flax.nn import combinators
    from pz_flax.nn import dropout
    from pz_flax.nn import embeddings
    from pz_flax.nn import grouping
    from pz_flax.nn import layer
    from pz_flax.nn import layer_stack
    from pz_flax.nn import linear_and_affine
    from pz_flax.nn import parameters
    from pz_flax.nn import standardization

__getattr__, __dir__ = lazy_attributes(__name__, globals(), __all__)
