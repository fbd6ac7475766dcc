"""The bridge between Flax NNX and pz_flax: ``from_nnx``, ``to_nnx``, mappings, ``summary``.

Importing this package registers the mappings pz_flax ships (see
``pz_flax.interop.mappings``). Users extend the bridge with ``register_mapping`` (a
``LayerMapping`` subclass per NNX class; ``ReversibleMapping`` for layers with weights), or
temporarily with ``mapping_registry.scoped``; with ``register_elementwise_function``
(activations, from ``pz_flax.nn.basic_ops``, whose table ``elementwise_function_registry`` this
bridge reads); and with ``register_wrapped_axis_names`` (axis names for the variables of
wrapped modules).
"""

from pz_flax.interop import mappings as _mappings
from pz_flax.interop.convert import from_nnx
from pz_flax.interop.convert import to_nnx
from pz_flax.interop.mappings import ReversibleMapping
from pz_flax.interop.model_summary import summary
from pz_flax.interop.naming import NNXNaming
from pz_flax.interop.registry import FromNNXContext
from pz_flax.interop.registry import LayerMapping
from pz_flax.interop.registry import LayerShapeMismatch
from pz_flax.interop.registry import MappingError
from pz_flax.interop.registry import MappingNotApplicable
from pz_flax.interop.registry import ToNNXContext
from pz_flax.interop.registry import get_mapping
from pz_flax.interop.registry import mapping_registry
from pz_flax.interop.registry import register_mapping
from pz_flax.interop.registry import registered_mappings
from pz_flax.interop.registry import unregister_mapping
from pz_flax.interop.wrappers import FromNNX
from pz_flax.interop.wrappers import NNXWrapper
from pz_flax.interop.wrappers import PzModule
from pz_flax.interop.wrappers import WrappedCallable
from pz_flax.interop.wrappers import capture_sown
from pz_flax.interop.wrappers import register_wrapped_axis_names
from pz_flax.interop.wrappers import unregister_wrapped_axis_names
from pz_flax.interop.wrappers import wrapped_axis_namer_registry
from pz_flax.nn.basic_ops import elementwise_function_registry
from pz_flax.nn.basic_ops import register_elementwise_function
from pz_flax.nn.basic_ops import unregister_elementwise_function

_mappings.register_builtin_mappings()

__all__ = [
    "FromNNX",
    "FromNNXContext",
    "LayerMapping",
    "LayerShapeMismatch",
    "MappingError",
    "MappingNotApplicable",
    "NNXNaming",
    "NNXWrapper",
    "PzModule",
    "ReversibleMapping",
    "ToNNXContext",
    "WrappedCallable",
    "capture_sown",
    "elementwise_function_registry",
    "from_nnx",
    "get_mapping",
    "mapping_registry",
    "register_elementwise_function",
    "register_mapping",
    "register_wrapped_axis_names",
    "registered_mappings",
    "summary",
    "to_nnx",
    "unregister_elementwise_function",
    "unregister_mapping",
    "unregister_wrapped_axis_names",
    "wrapped_axis_namer_registry",
]
