"""Core data structures: structs, named axes, selectors, variables, shape checks.

Each module is an attribute of this package on first use (``pz_flax.core.selectors`` after
``import pz_flax``), imported only then, so importing one core module loads only what it needs.
"""

from typing import TYPE_CHECKING

from pz_flax._lazy import lazy_attributes

__all__ = [
    "auto_order_types",
    "context",
    "named_axes",
    "partitioning",
    "random_stream",
    "registry",
    "selectors",
    "shapecheck",
    "struct",
    "syntactic_sugar",
    "tree_util",
    "treescope_setup",
    "variables",
]

if TYPE_CHECKING:
    from pz_flax.core import auto_order_types
    from pz_flax.core import context
    from pz_flax.core import named_axes
    from pz_flax.core import partitioning
    from pz_flax.core import random_stream
    from pz_flax.core import registry
    from pz_flax.core import selectors
    from pz_flax.core import shapecheck
    from pz_flax.core import struct
    from pz_flax.core import syntactic_sugar
    from pz_flax.core import tree_util
    from pz_flax.core import treescope_setup
    from pz_flax.core import variables

__getattr__, __dir__ = lazy_attributes(__name__, globals(), __all__)
