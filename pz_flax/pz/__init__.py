"""The names users reach for, under penzai's names: ``from pz_flax import pz``.

Code written against penzai 0.2.5's ``pz`` namespace runs against this one with the import
changed. Inside the library, modules import each other by their full paths instead.

Every name is imported on first use (PEP 562), so ``from pz_flax import pz`` itself loads
nothing more than ``import pz_flax``: ``pz.nx`` loads the named-axis module, ``pz.nn.Linear``
the linear layers, and so on. The imports under ``TYPE_CHECKING`` say the same for type
checkers and editors.
"""

from typing import TYPE_CHECKING

from pz_flax._lazy import lazy_attributes

if TYPE_CHECKING:
    from treescope.dataclass_util import dataclass_from_attributes
    from treescope.dataclass_util import init_takes_fields
    from treescope.formatting_util import color_from_string
    from treescope.formatting_util import oklch_color

    from pz_flax.core import named_axes as nx
    from pz_flax.core import shapecheck as chk
    from pz_flax.core.auto_order_types import AutoOrderedAcrossTypes
    from pz_flax.core.context import ContextualValue
    from pz_flax.core.partitioning import NotInThisPartition
    from pz_flax.core.partitioning import combine
    from pz_flax.core.random_stream import RandomStream
    from pz_flax.core.selectors import Selection
    from pz_flax.core.selectors import select
    from pz_flax.core.struct import PyTreeDataclassSafetyError
    from pz_flax.core.struct import Struct
    from pz_flax.core.struct import StructStaticMetadata
    from pz_flax.core.struct import is_pytree_dataclass_type
    from pz_flax.core.struct import is_pytree_node_field
    from pz_flax.core.struct import pytree_dataclass
    from pz_flax.core.syntactic_sugar import slice
    from pz_flax.core.tree_util import pretty_keystr
    from pz_flax.core.treescope_setup import disable_interactive_context
    from pz_flax.core.treescope_setup import enable_interactive_context
    from pz_flax.core.treescope_setup import show
    from pz_flax.core.variables import AbstractVariable
    from pz_flax.core.variables import AbstractVariableSlot
    from pz_flax.core.variables import AbstractVariableValue
    from pz_flax.core.variables import AutoStateVarLabel
    from pz_flax.core.variables import Parameter
    from pz_flax.core.variables import ParameterSlot
    from pz_flax.core.variables import ParameterValue
    from pz_flax.core.variables import ScopedStateVarLabel
    from pz_flax.core.variables import StateVariable
    from pz_flax.core.variables import StateVariableSlot
    from pz_flax.core.variables import StateVariableValue
    from pz_flax.core.variables import UnboundVariableError
    from pz_flax.core.variables import VariableConflictError
    from pz_flax.core.variables import VariableLabel
    from pz_flax.core.variables import bind_variables
    from pz_flax.core.variables import freeze_params
    from pz_flax.core.variables import freeze_state_vars
    from pz_flax.core.variables import freeze_variables
    from pz_flax.core.variables import scoped_auto_state_var_labels
    from pz_flax.core.variables import unbind_params
    from pz_flax.core.variables import unbind_state_vars
    from pz_flax.core.variables import unbind_variables
    from pz_flax.core.variables import variable_jit
    from pz_flax.pz import nn
    from pz_flax.pz import ts

_SUBMODULES = ["nn", "ts"]
_MODULE_ALIASES = {
    "nx": "pz_flax.core.named_axes",
    "chk": "pz_flax.core.shapecheck",
}
# Where each name is defined; it is imported from there on first use.
_NAMES_BY_MODULE = {
    "treescope.dataclass_util": (
        "dataclass_from_attributes",
        "init_takes_fields",
    ),
    "treescope.formatting_util": (
        "color_from_string",
        "oklch_color",
    ),
    "pz_flax.core.auto_order_types": ("AutoOrderedAcrossTypes",),
    "pz_flax.core.context": ("ContextualValue",),
    "pz_flax.core.partitioning": (
        "NotInThisPartition",
        "combine",
    ),
    "pz_flax.core.random_stream": ("RandomStream",),
    "pz_flax.core.selectors": (
        "Selection",
        "select",
    ),
    "pz_flax.core.struct": (
        "PyTreeDataclassSafetyError",
        "Struct",
        "StructStaticMetadata",
        "is_pytree_dataclass_type",
        "is_pytree_node_field",
        "pytree_dataclass",
    ),
    "pz_flax.core.syntactic_sugar": ("slice",),
    "pz_flax.core.tree_util": ("pretty_keystr",),
    "pz_flax.core.treescope_setup": (
        "disable_interactive_context",
        "enable_interactive_context",
        "show",
    ),
    "pz_flax.core.variables": (
        "AbstractVariable",
        "AbstractVariableSlot",
        "AbstractVariableValue",
        "AutoStateVarLabel",
        "Parameter",
        "ParameterSlot",
        "ParameterValue",
        "ScopedStateVarLabel",
        "StateVariable",
        "StateVariableSlot",
        "StateVariableValue",
        "UnboundVariableError",
        "VariableConflictError",
        "VariableLabel",
        "bind_variables",
        "freeze_params",
        "freeze_state_vars",
        "freeze_variables",
        "scoped_auto_state_var_labels",
        "unbind_params",
        "unbind_state_vars",
        "unbind_variables",
        "variable_jit",
    ),
}

__all__ = [
    *_SUBMODULES,
    *_MODULE_ALIASES,
    *(n for names in _NAMES_BY_MODULE.values() for n in names),
]

__getattr__, __dir__ = lazy_attributes(
    __name__,
    globals(),
    _SUBMODULES,
    reexports={name: module for module, names in _NAMES_BY_MODULE.items() for name in names},
    module_aliases=_MODULE_ALIASES,
)
