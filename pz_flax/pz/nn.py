"""Aliases for pz_flax's layer library under penzai's names: ``pz.nn.Linear`` and friends.

Like ``pz`` itself, each name is imported from its defining module on first use.
"""

from typing import TYPE_CHECKING

from pz_flax._lazy import lazy_attributes

if TYPE_CHECKING:
    from pz_flax.nn.attention import ApplyCausalAttentionMask
    from pz_flax.nn.attention import ApplyCausalSlidingWindowAttentionMask
    from pz_flax.nn.attention import ApplyExplicitAttentionMask
    from pz_flax.nn.attention import Attention
    from pz_flax.nn.attention import KVCachingAttention
    from pz_flax.nn.basic_ops import CastToDType
    from pz_flax.nn.basic_ops import Elementwise
    from pz_flax.nn.basic_ops import Softmax
    from pz_flax.nn.basic_ops import TanhSoftCap
    from pz_flax.nn.combinators import BranchAndAddTogether
    from pz_flax.nn.combinators import BranchAndMultiplyTogether
    from pz_flax.nn.combinators import Residual
    from pz_flax.nn.dropout import DisabledDropout
    from pz_flax.nn.dropout import StochasticDropout
    from pz_flax.nn.dropout import maybe_dropout
    from pz_flax.nn.embeddings import ApplyRoPE
    from pz_flax.nn.embeddings import ApplyRoPEToSubset
    from pz_flax.nn.embeddings import EmbeddingDecode
    from pz_flax.nn.embeddings import EmbeddingLookup
    from pz_flax.nn.embeddings import EmbeddingTable
    from pz_flax.nn.grouping import CheckedSequential
    from pz_flax.nn.grouping import CheckStructure
    from pz_flax.nn.grouping import Identity
    from pz_flax.nn.grouping import NamedGroup
    from pz_flax.nn.grouping import Sequential
    from pz_flax.nn.grouping import inline_anonymous_sequentials
    from pz_flax.nn.grouping import inline_groups
    from pz_flax.nn.grouping import is_anonymous_sequential
    from pz_flax.nn.grouping import is_sequential_or_named
    from pz_flax.nn.layer import Layer
    from pz_flax.nn.layer_stack import LayerStack
    from pz_flax.nn.layer_stack import LayerStackGetAttrKey
    from pz_flax.nn.layer_stack import LayerStackVarBehavior
    from pz_flax.nn.layer_stack import layerstack_axes_from_keypath
    from pz_flax.nn.linear_and_affine import AddBias
    from pz_flax.nn.linear_and_affine import Affine
    from pz_flax.nn.linear_and_affine import ConstantRescale
    from pz_flax.nn.linear_and_affine import Linear
    from pz_flax.nn.linear_and_affine import LinearInPlace
    from pz_flax.nn.linear_and_affine import LinearOperatorWeightInitializer
    from pz_flax.nn.linear_and_affine import NamedEinsum
    from pz_flax.nn.linear_and_affine import RenameAxes
    from pz_flax.nn.linear_and_affine import constant_initializer
    from pz_flax.nn.linear_and_affine import contract
    from pz_flax.nn.linear_and_affine import variance_scaling_initializer
    from pz_flax.nn.linear_and_affine import xavier_normal_initializer
    from pz_flax.nn.linear_and_affine import xavier_uniform_initializer
    from pz_flax.nn.linear_and_affine import zero_initializer
    from pz_flax.nn.parameters import ParameterLike
    from pz_flax.nn.parameters import assert_no_parameter_slots
    from pz_flax.nn.parameters import derive_param_key
    from pz_flax.nn.parameters import make_parameter
    from pz_flax.nn.standardization import LayerNorm
    from pz_flax.nn.standardization import RMSLayerNorm
    from pz_flax.nn.standardization import RMSStandardize
    from pz_flax.nn.standardization import Standardize

# Where each name is defined; it is imported from there on first use.
_NAMES_BY_MODULE = {
    "pz_flax.nn.attention": (
        "ApplyCausalAttentionMask",
        "ApplyCausalSlidingWindowAttentionMask",
        "ApplyExplicitAttentionMask",
        "Attention",
        "KVCachingAttention",
    ),
    "pz_flax.nn.basic_ops": (
        "CastToDType",
        "Elementwise",
        "Softmax",
        "TanhSoftCap",
    ),
    "pz_flax.nn.combinators": (
        "BranchAndAddTogether",
        "BranchAndMultiplyTogether",
        "Residual",
    ),
    "pz_flax.nn.dropout": (
        "DisabledDropout",
        "StochasticDropout",
        "maybe_dropout",
    ),
    "pz_flax.nn.embeddings": (
        "ApplyRoPE",
        "ApplyRoPEToSubset",
        "EmbeddingDecode",
        "EmbeddingLookup",
        "EmbeddingTable",
    ),
    "pz_flax.nn.grouping": (
        "CheckedSequential",
        "CheckStructure",
        "Identity",
        "NamedGroup",
        "Sequential",
        "inline_anonymous_sequentials",
        "inline_groups",
        "is_anonymous_sequential",
        "is_sequential_or_named",
    ),
    "pz_flax.nn.layer": ("Layer",),
    "pz_flax.nn.layer_stack": (
        "LayerStack",
        "LayerStackGetAttrKey",
        "LayerStackVarBehavior",
        "layerstack_axes_from_keypath",
    ),
    "pz_flax.nn.linear_and_affine": (
        "AddBias",
        "Affine",
        "ConstantRescale",
        "Linear",
        "LinearInPlace",
        "LinearOperatorWeightInitializer",
        "NamedEinsum",
        "RenameAxes",
        "constant_initializer",
        "contract",
        "variance_scaling_initializer",
        "xavier_normal_initializer",
        "xavier_uniform_initializer",
        "zero_initializer",
    ),
    "pz_flax.nn.parameters": (
        "ParameterLike",
        "assert_no_parameter_slots",
        "derive_param_key",
        "make_parameter",
    ),
    "pz_flax.nn.standardization": (
        "LayerNorm",
        "RMSLayerNorm",
        "RMSStandardize",
        "Standardize",
    ),
}

__all__ = [name for names in _NAMES_BY_MODULE.values() for name in names]

__getattr__, __dir__ = lazy_attributes(
    __name__,
    globals(),
    (),
    reexports={name: module for module, names in _NAMES_BY_MODULE.items() for name in names},
)
