"""The names users reach for, under penzai's names: ``from pz_flax import pz``.

Code written against penzai 0.2.5's ``pz`` namespace runs against this one with the import
changed. Inside the library, modules import each other by their full paths instead.
"""

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
