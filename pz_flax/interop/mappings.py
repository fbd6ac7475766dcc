"""The mappings pz_flax ships: every Flax NNX layer with a penzai-style counterpart.

| NNX                          | pz_flax form                                                     |
| ---------------------------- | ---------------------------------------------------------------- |
| ``nnx.Linear``               | ``Affine([Linear, RenameAxes, AddBias])`` (as ``from_config``)   |
| ``nnx.LinearGeneral``        | ``Affine`` over ``features``/``features_i`` axes                 |
| ``nnx.Einsum``               | ``Affine`` whose weight axes follow the einsum letters           |
| ``nnx.Embed``                | ``EmbeddingLookup(EmbeddingTable)``                              |
| ``nnx.LayerNorm``            | ``LayerNorm([Standardize, Linear (scale), AddBias])``            |
| ``nnx.RMSNorm``              | ``RMSLayerNorm([RMSStandardize, Linear (scale)])``               |
| ``nnx.Dropout`` (no own RNG) | ``StochasticDropout`` / ``DisabledDropout``                      |
| ``nnx.MultiHeadAttention``   | ``Attention`` with ``heads``/``projection``/``seq``/``kv_seq``   |
| ``nnx.Sequential``           | ``Sequential`` of the converted layers                           |
| ``nnx.List`` / ``nnx.Dict``  | ``list`` / ``dict`` of the converted entries                     |
| ``nnx.LoRA``                 | ``Sequential([Linear, Linear])`` (plus a branch for its base)    |
| ``nnx.LoRALinear``           | ``BranchAndAddTogether([Affine, LoRA path])``                    |
| activations (``nnx.relu``)   | ``Elementwise(fn)``; ``jax.nn.softmax`` -> ``Softmax(features)`` |

Each mapping only applies to configurations it reproduces exactly (``from_nnx`` checks this by
rebuilding the module from the pz_flax form and comparing graph definitions); anything else
is wrapped and keeps NNX's own code. Reverse conversions check that the pz_flax layer still
has the shape the mapping produces, so an edit that the NNX class could not represent is
never silently dropped: such a layer becomes a ``PzModule`` instead.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pz_flax._compat import nnx as compat_nnx
from pz_flax.core import named_axes
from pz_flax.core import tree_util
from pz_flax.interop import naming as naming_lib
from pz_flax.interop import registry
from pz_flax.nn import attention
from pz_flax.nn import basic_ops
from pz_flax.nn import combinators
from pz_flax.nn import dropout
from pz_flax.nn import embeddings
from pz_flax.nn import grouping
from pz_flax.nn import layer as layer_base
from pz_flax.nn import linear_and_affine
from pz_flax.nn import standardization

NotApplicable = registry.MappingNotApplicable


def structures_match(expected: Any, actual: Any) -> bool:
    """Whether ``actual`` has the same layer structure as ``expected``, variables aside.

    Static fields must be equal; variables are not compared (their shapes are checked when
    the module is built); other leaves are compared when both are concrete numbers.

    Args:
        expected: The canonical pz_flax form.
        actual: The layer being converted.

    Returns:
        True if they match.
    """
    expected_leaves, expected_def = tree_util.flatten_stopping_at_variables(expected)
    actual_leaves, actual_def = tree_util.flatten_stopping_at_variables(actual)
    if expected_def != actual_def:
        return False
    for want, got in zip(expected_leaves, actual_leaves):
        if tree_util.is_variable_node(want):
            continue
        if isinstance(got, jax.core.Tracer) or isinstance(want, jax.core.Tracer):
            continue
        want_array, got_array = np.asarray(want), np.asarray(got)
        if want_array.shape != got_array.shape or not np.allclose(
            want_array, got_array, rtol=1e-6, atol=0
        ):
            return False
    return True


def _concrete_float(value: Any, fallback: Any) -> Any:
    """A Python float for a number that may be a pytree leaf (hence a tracer under jit)."""
    if isinstance(value, jax.core.Tracer):
        if fallback is None:
            raise NotApplicable("a traced value would have to become a static NNX setting.")
        return fallback
    return float(value)


def _dtype_config(module: Any) -> dict[str, Any]:
    """The module's explicit compute ``dtype``, recorded so that ``to_nnx`` sets it again."""
    dtype = getattr(module, "dtype", None)
    return {} if dtype is None else {"dtype": dtype}


def _dtype_option(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``dtype=`` constructor argument recorded by ``_dtype_config``, if any."""
    return {"dtype": config["dtype"]} if "dtype" in config else {}


def _require_expressible_dtype(module: Any) -> None:
    """Rejects a compute ``dtype`` that casts the weights, which the pz form does not do.

    An explicit ``dtype`` equal to ``param_dtype`` (``dtype=jnp.float32`` on float32 weights)
    changes nothing the pz form computes, so it is mapped and recorded; a different one makes
    NNX cast the input and the weights before the product (e.g. bfloat16 compute on float32
    weights), and the module is wrapped to keep that arithmetic.
    """
    dtype = getattr(module, "dtype", None)
    param_dtype = getattr(module, "param_dtype", None)
    if dtype is None or param_dtype is None or jnp.dtype(dtype) == jnp.dtype(param_dtype):
        return
    raise NotApplicable(
        f"dtype={jnp.dtype(dtype).name} with param_dtype={jnp.dtype(param_dtype).name} casts"
        " the input and weights before computing (a compute-dtype cast of the weights), which"
        " its pz_flax form does not express."
    )


class ReversibleMapping(registry.LayerMapping):
    """A ``LayerMapping`` whose ``to_nnx`` is checked against its own ``to_pz``.

    The base class for mappings of layers with weights. Implement ``to_pz`` and ``build``;
    ``to_nnx`` is provided, and accepts a pz_flax layer only if it has exactly the structure
    ``to_pz`` produces. It builds the module with ``build``, converts that module back with
    ``to_pz``, and compares the two pz_flax forms field by field (static settings equal,
    numeric leaves equal, variables aside). So an edit the NNX class cannot represent (an extra
    sublayer, a changed setting, renamed axes) makes ``to_nnx`` decline the layer, which
    then becomes a ``PzModule``, rather than being dropped silently.

    ``build`` declines a layer of another shape by returning None or raising
    ``MappingNotApplicable``; ``ToNNXContext.array`` and ``ToNNXContext.construct`` raise
    ``LayerShapeMismatch`` (a ``MappingNotApplicable``) for axis names, shapes and dtypes
    that do not fit. Any other exception is a bug and propagates as a ``MappingError``.

    ``config_for`` records the module's explicit compute ``dtype`` (if it has one), which
    ``build`` passes back to the constructor via ``config``; extend it for other settings
    the pz_flax form cannot hold.
    """

    def config_for(self, module):
        return _dtype_config(module)

    def to_nnx(self, layer, context, config):
        naming = config.get("naming", context.naming)
        try:
            module = self.build(layer, context, naming, config)
        except NotApplicable:
            return None
        if module is None:
            return None
        children = self.child_layers(layer)

        def actual_child(child, path):
            # Children were checked by their own mappings; compare the rest of the structure.
            del child
            if path[-1] not in children:
                raise NotApplicable(f"unexpected child at {path}")
            return children[path[-1]]

        canonical_context = registry.FromNNXContext(
            naming=naming, path=(), convert_child=actual_child
        )
        try:
            canonical = self.to_pz(module, canonical_context)
        except NotApplicable:
            return None
        if not structures_match(canonical, layer):
            return None
        return module

    @abc.abstractmethod
    def build(
        self,
        layer: Any,
        context: registry.ToNNXContext,
        naming: naming_lib.NNXNaming,
        config: Mapping[str, Any],
    ) -> Any:
        """Builds the NNX module from ``layer``.

        Args:
            layer: The pz_flax layer (from ``to_pz``, possibly edited, or built natively).
            context: Array extraction (``context.array``), module construction
                (``context.construct``) and conversion of children (``context.convert``).
            naming: The naming convention ``to_pz`` used (or the default, for native layers).
            config: What ``config_for`` recorded (empty for natively built layers).

        Returns:
            The module, or None if ``layer`` has another shape.

        Raises:
            MappingNotApplicable: If ``layer`` has another shape (the same as returning None).
        """

    def child_layers(self, layer) -> dict[Any, Any]:
        """The converted children inside ``layer``, by the key ``to_pz`` converts them under."""
        del layer
        return {}


def _named_axes_of(parameter: Any) -> tuple[str, ...] | None:
    """The axis names of a parameter's value, or None if it is not a parameter or positional."""
    if not tree_util.is_variable_node(parameter):
        return None
    value = parameter.value
    if not isinstance(value, named_axes.NamedArrayBase) or value.positional_shape:
        return None
    return tuple(value.named_shape)


def _sublayer(layer: Any, index: int) -> Any:
    """``layer.sublayers[index]`` of a ``Sequential``, or None if ``layer`` has no such one."""
    if type(layer) is not grouping.Sequential or len(layer.sublayers) <= index:
        return None
    return layer.sublayers[index]


#### Linear layers ####


def _affine(core: Any, bias: Any) -> Any:
    """``core`` followed by ``bias``, laid out as ``Affine.from_config`` lays it out."""
    if bias is None:
        return core
    if type(core) is linear_and_affine.LinearInPlace:
        return linear_and_affine.Affine([*core.sublayers, bias])
    return linear_and_affine.Affine([core, bias])


def _linear_core(
    context: registry.FromNNXContext,
    kernel: nnx.Variable,
    in_names: tuple[str, ...],
    out_names: tuple[str, ...],
    kernel_key: str = "kernel",
) -> Any:
    """A ``Linear`` from ``in_names`` to ``out_names``, renaming outputs that clash with inputs."""
    clashing = [name for name in out_names if name in in_names]
    weight_out = tuple(f"{name}_out" if name in clashing else name for name in out_names)
    linear = linear_and_affine.Linear(
        weights=context.parameter(kernel, kernel_key, (*in_names, *weight_out)),
        in_axis_names=in_names,
        out_axis_names=weight_out,
    )
    if not clashing:
        return linear
    return linear_and_affine.LinearInPlace(
        [
            linear,
            linear_and_affine.RenameAxes(
                old=tuple(f"{name}_out" for name in clashing), new=tuple(clashing)
            ),
        ]
    )


def _parse_affine(layer: Any) -> tuple[Any, Any] | None:
    """Splits an affine layer into ``(linear core, AddBias or None)``.

    Accepts ``Affine([Linear, AddBias])``, ``Affine([Linear, RenameAxes, AddBias])`` (the
    layout of ``Affine.from_config`` with renamed outputs), ``Affine([LinearInPlace,
    AddBias])`` and a bare core.
    """
    if type(layer) is not linear_and_affine.Affine:
        return layer, None
    if not layer.sublayers:
        return None
    *core_layers, bias = layer.sublayers
    if not isinstance(bias, linear_and_affine.AddBias):
        return None
    if len(core_layers) == 1:
        return core_layers[0], bias
    if len(core_layers) == 2:
        return linear_and_affine.LinearInPlace(list(core_layers)), bias
    return None


def _parse_core(core: Any) -> tuple[Any, dict[str, str]] | None:
    """Splits a linear core into its ``Linear`` and the output renaming it applies."""
    if type(core) is linear_and_affine.Linear:
        return core, {}
    if type(core) is linear_and_affine.LinearInPlace and len(core.sublayers) == 2:
        linear, rename = core.sublayers
        if type(linear) is linear_and_affine.Linear and isinstance(
            rename, linear_and_affine.RenameAxes
        ):
            old = (rename.old,) if isinstance(rename.old, str) else tuple(rename.old)
            new = (rename.new,) if isinstance(rename.new, str) else tuple(rename.new)
            return linear, dict(zip(old, new))
    return None


def _extract_linear(layer: Any, context: registry.ToNNXContext):
    """Reads an affine layer.

    Returns:
        ``(kernel, bias, in names, out names, kernel parameter, AddBias layer)`` with the
        arrays in NNX layout (bias and its layer None without a bias), or None if ``layer`` is
        not an affine layer.
    """
    parsed = _parse_affine(layer)
    if parsed is None:
        return None
    core, bias_layer = parsed
    parsed_core = _parse_core(core)
    if parsed_core is None:
        return None
    linear, renames = parsed_core
    in_names = tuple(linear.in_axis_names)
    weight_out = tuple(linear.out_axis_names)
    kernel = context.array(linear.weights, (*in_names, *weight_out))
    out_names = tuple(renames.get(name, name) for name in weight_out)
    bias = None
    if bias_layer is not None:
        bias = context.array(bias_layer.bias, out_names)
    return kernel, bias, in_names, out_names, linear.weights, bias_layer


def _param_dtype(array: jax.Array) -> Any:
    return registry.jnp_dtype_type(array.dtype)


def _bias_layer(
    context: registry.FromNNXContext,
    bias: nnx.Variable | None,
    path: str,
    names: tuple[str, ...],
) -> linear_and_affine.AddBias | None:
    """An ``AddBias`` sharing the NNX ``bias`` variable at ``path``, or None without a bias."""
    if bias is None:
        return None
    return linear_and_affine.AddBias(bias=context.parameter(bias, path, names), new_axis_names=())


def _affine_variables_by_path(
    kernel_source: Any, kernel: jax.Array, bias_layer: Any, bias: jax.Array | None
) -> dict[str, tuple[Any, jax.Array]]:
    """The ``variables_by_path`` entries of an NNX affine layer, from ``_extract_linear``."""
    by_path = {"kernel": (kernel_source, kernel)}
    if bias is not None:
        by_path["bias"] = (bias_layer.bias, bias)
    return by_path


class LinearMapping(ReversibleMapping):
    """``nnx.Linear`` <-> ``Affine`` (or ``LinearInPlace`` without bias) over ``features``."""

    nnx_type = nnx.Linear
    pz_types = (linear_and_affine.Affine, linear_and_affine.LinearInPlace)

    def to_pz(self, module, context):
        _require_expressible_dtype(module)
        features = context.naming.features
        core = _linear_core(context, module.kernel, (features,), (features,))
        return _affine(core, _bias_layer(context, module.bias, "bias", (features,)))

    def build(self, layer, context, naming, config):
        extracted = _extract_linear(layer, context)
        if extracted is None:
            return None
        kernel, bias, in_names, out_names, kernel_source, bias_layer = extracted
        if len(in_names) != 1 or len(out_names) != 1:
            return None
        by_path = _affine_variables_by_path(kernel_source, kernel, bias_layer, bias)
        return context.construct(
            nnx.Linear,
            kernel.shape[0],
            kernel.shape[1],
            use_bias=bias is not None,
            param_dtype=_param_dtype(kernel),
            variables_by_path=by_path,
            **_dtype_option(config),
        )


class LinearGeneralMapping(ReversibleMapping):
    """``nnx.LinearGeneral`` over trailing axes <-> ``Affine`` over ``features_i`` axes."""

    nnx_type = nnx.LinearGeneral
    pz_types = (linear_and_affine.Affine, linear_and_affine.LinearInPlace, linear_and_affine.Linear)

    def to_pz(self, module, context):
        _require_expressible_dtype(module)
        if module.batch_axis:
            raise NotApplicable("batch_axis is not supported (no named form).")
        count_in = len(module.in_features)
        if tuple(module.axis) != tuple(range(-count_in, 0)):
            raise NotApplicable(
                f"only trailing contraction axes (-{count_in}, ..., -1) have a named form, got"
                f" axis={module.axis}."
            )
        in_names = context.naming.feature_axes(count_in)
        out_names = context.naming.feature_axes(len(module.out_features))
        core = _linear_core(context, module.kernel, in_names, out_names)
        return _affine(core, _bias_layer(context, module.bias, "bias", out_names))

    def build(self, layer, context, naming, config):
        extracted = _extract_linear(layer, context)
        if extracted is None:
            return None
        kernel, bias, in_names, _, kernel_source, bias_layer = extracted
        by_path = _affine_variables_by_path(kernel_source, kernel, bias_layer, bias)
        count_in = len(in_names)
        return context.construct(
            nnx.LinearGeneral,
            tuple(kernel.shape[:count_in]),
            tuple(kernel.shape[count_in:]),
            axis=tuple(range(-count_in, 0)),
            use_bias=bias is not None,
            param_dtype=_param_dtype(kernel),
            variables_by_path=by_path,
            **_dtype_option(config),
        )


def _parse_einsum(einsum_str: str):
    """Splits ``"ab,bc->ac"`` into operand and output subscripts (with ``.`` for ``...``)."""
    operands, output = einsum_str.split("->")
    lhs, rhs = operands.split(",")
    return lhs.replace("...", "."), rhs, output.replace("...", ".")


class EinsumMapping(ReversibleMapping):
    """``nnx.Einsum`` whose contracted and new axes are trailing <-> an ``Affine``.

    Supported equations have the form ``[batch][contracted],[kernel]->[batch][new]``: the
    contracted letters end the input, the kernel's other letters (new axes) end the output,
    and every batch letter (or ``...``) is carried through in order. The contracted axes are
    named like ``LinearGeneral``'s inputs, the new axes like its outputs.
    """

    nnx_type = nnx.Einsum

    def _roles(self, einsum_str: str):
        lhs, rhs, out = _parse_einsum(einsum_str)
        if "." in rhs or len(set(rhs)) != len(rhs) or len(set(out)) != len(out):
            raise NotApplicable(f"unsupported einsum {einsum_str!r}.")
        contracted = [letter for letter in lhs if letter in rhs]
        batch = [letter for letter in lhs if letter not in rhs]
        new = [letter for letter in out if letter in rhs]
        if (
            any(letter in out for letter in contracted)
            or lhs != "".join(batch) + "".join(contracted)
            or out != "".join(batch) + "".join(new)
            or sorted(contracted + new) != sorted(rhs)
            or not contracted
        ):
            raise NotApplicable(
                f"einsum {einsum_str!r} is not of the form [batch][contracted],[kernel]->"
                "[batch][new]."
            )
        return contracted, new, rhs

    def _names(self, einsum_str: str, naming: naming_lib.NNXNaming):
        contracted, new, rhs = self._roles(einsum_str)
        in_names = dict(zip(contracted, naming.feature_axes(len(contracted))))
        out_names = dict(zip(new, naming.feature_axes(len(new))))
        return contracted, new, rhs, in_names, out_names

    def to_pz(self, module, context):
        _require_expressible_dtype(module)
        contracted, new, rhs, in_names, out_names = self._names(module.einsum_str, context.naming)
        in_tuple = tuple(in_names[letter] for letter in contracted)
        out_tuple = tuple(out_names[letter] for letter in new)
        if [letter for letter in rhs if letter in in_names] != contracted or [
            letter for letter in rhs if letter in out_names
        ] != new:
            raise NotApplicable("the kernel's letters must list contracted, then new axes.")
        if rhs != "".join(contracted) + "".join(new):
            raise NotApplicable("the kernel's letters must list contracted, then new axes.")
        core = _linear_core(context, module.kernel, in_tuple, out_tuple)
        if module.bias is not None:
            sizes = tuple(module.kernel.shape[rhs.index(letter)] for letter in new)
            if tuple(module.bias.shape) != sizes:
                raise NotApplicable(
                    f"bias shape {module.bias.shape} is not the new axes' shape {sizes}."
                )
        return _affine(core, _bias_layer(context, module.bias, "bias", out_tuple))

    def config_for(self, module):
        return {**super().config_for(module), "einsum_str": module.einsum_str}

    def input_names(self, config, naming, ndim):
        # The batch letters lead (named like any activation's leading axes), the contracted
        # ones end the input, named as to_pz named them.
        contracted, _, _, in_names, _ = self._names(config["einsum_str"], naming)
        batch_count = ndim - len(contracted)
        if batch_count < 0:
            return None
        leading = naming.default_axis_names(batch_count + 1)[:-1]
        return (*leading, *(in_names[letter] for letter in contracted))

    def build(self, layer, context, naming, config):
        einsum_str = config.get("einsum_str")
        if einsum_str is None:
            return None
        extracted = _extract_linear(layer, context)
        if extracted is None:
            return None
        kernel, bias, _, _, kernel_source, bias_layer = extracted
        _, new, rhs = self._roles(einsum_str)
        if kernel.ndim != len(rhs) or (bias is not None and bias.ndim != len(new)):
            return None
        by_path = _affine_variables_by_path(kernel_source, kernel, bias_layer, bias)
        return context.construct(
            nnx.Einsum,
            einsum_str,
            tuple(kernel.shape),
            None if bias is None else tuple(bias.shape),
            param_dtype=_param_dtype(kernel),
            variables_by_path=by_path,
            **_dtype_option(config),
        )


#### Embeddings, normalization, dropout ####


class EmbedMapping(ReversibleMapping):
    """``nnx.Embed`` <-> ``EmbeddingLookup`` over a ``vocabulary`` x ``features`` table."""

    nnx_type = nnx.Embed
    pz_types = (embeddings.EmbeddingLookup,)

    def to_pz(self, module, context):
        _require_expressible_dtype(module)
        naming = context.naming
        table = embeddings.EmbeddingTable(
            embeddings=context.parameter(
                module.embedding, "embedding", (naming.vocabulary, naming.features)
            ),
            vocabulary_axis=naming.vocabulary,
        )
        return embeddings.EmbeddingLookup(table)

    def build(self, layer, context, naming, config):
        if type(layer) is not embeddings.EmbeddingLookup:
            return None
        table = layer.table
        if type(table) is not embeddings.EmbeddingTable:
            return None
        names = _named_axes_of(table.embeddings)
        if names is None or len(names) != 2 or table.vocabulary_axis not in names:
            return None
        feature_name = next(name for name in names if name != table.vocabulary_axis)
        array = context.array(table.embeddings, (table.vocabulary_axis, feature_name))
        return context.construct(
            nnx.Embed,
            array.shape[0],
            array.shape[1],
            param_dtype=_param_dtype(array),
            variables_by_path={"embedding": (table.embeddings, array)},
            **_dtype_option(config),
        )


def _scale_layer(context, variable, features):
    return linear_and_affine.Linear(
        weights=context.parameter(variable, "scale", (features,)),
        in_axis_names=(),
        out_axis_names=(),
    )


def _parse_norm(layer, norm_cls, standardize_cls):
    """Splits a (RMS)LayerNorm into its standardization, scale and shift layers."""
    if type(layer) is not norm_cls or not layer.sublayers:
        return None
    standardize, *rest = layer.sublayers
    if type(standardize) is not standardize_cls:
        return None
    scale = shift = None
    for sublayer in rest:
        if type(sublayer) is linear_and_affine.Linear and scale is None and shift is None:
            scale = sublayer
        elif type(sublayer) is linear_and_affine.AddBias and shift is None:
            shift = sublayer
        else:
            return None
    across = (standardize.across,) if isinstance(standardize.across, str) else standardize.across
    if len(across) != 1:
        return None
    return standardize, scale, shift, across[0]


class _NormMapping(ReversibleMapping):
    """An NNX norm over the last axis <-> a standardization, a scale and maybe a shift.

    ``nnx.LayerNorm`` and ``nnx.RMSNorm`` differ only in their statistic (a pz_flax
    ``standardize_cls`` layer) and in whether they can hold a bias, so one mapping serves both.

    Attributes:
        standardize_cls: The pz_flax layer computing the statistic.
        supports_bias: Whether the NNX norm has a ``bias`` (a shift after the scale).
    """

    standardize_cls: type[layer_base.Layer]
    supports_bias: bool

    def to_pz(self, module, context):
        _require_expressible_dtype(module)
        if module.reduction_axes != -1 or module.feature_axes != -1:
            raise NotApplicable("only reduction_axes=-1, feature_axes=-1 have a named form.")
        features = context.naming.features
        sublayers = [self.standardize_cls(across=(features,), epsilon=module.epsilon)]
        if module.scale is not None:
            sublayers.append(_scale_layer(context, module.scale, features))
        if self.supports_bias and module.bias is not None:
            sublayers.append(_bias_layer(context, module.bias, "bias", (features,)))
        (pz_type,) = self.pz_types
        return pz_type(sublayers)

    def config_for(self, module):
        return {
            **super().config_for(module),
            "num_features": module.num_features,
            "epsilon": module.epsilon,
        }

    def build(self, layer, context, naming, config):
        (pz_type,) = self.pz_types
        parsed = _parse_norm(layer, pz_type, self.standardize_cls)
        if parsed is None:
            return None
        standardize, scale, shift, features = parsed
        if shift is not None and not self.supports_bias:
            return None
        by_path = {}
        if scale is not None:
            by_path["scale"] = (scale.weights, context.array(scale.weights, (features,)))
        if shift is not None:
            by_path["bias"] = (shift.bias, context.array(shift.bias, (features,)))
        # The first parameter present (scale, else shift) gives the size and dtype.
        first_array = next(iter(by_path.values()))[1] if by_path else None
        if first_array is None and "num_features" not in config:
            raise NotApplicable("without a scale or a shift, the number of features is unknown.")
        num_features = config["num_features"] if first_array is None else first_array.shape[0]
        dtype = np.float32 if first_array is None else first_array.dtype
        bias_option = {"use_bias": shift is not None} if self.supports_bias else {}
        return context.construct(
            self.nnx_type,
            num_features,
            epsilon=_concrete_float(standardize.epsilon, config.get("epsilon")),
            **bias_option,
            use_scale=scale is not None,
            param_dtype=registry.jnp_dtype_type(dtype),
            variables_by_path=by_path,
            **_dtype_option(config),
        )


class LayerNormMapping(_NormMapping):
    """``nnx.LayerNorm`` over the last axis <-> ``LayerNorm`` over ``features``."""

    nnx_type = nnx.LayerNorm
    pz_types = (standardization.LayerNorm,)
    standardize_cls = standardization.Standardize
    supports_bias = True


class RMSNormMapping(_NormMapping):
    """``nnx.RMSNorm`` over the last axis <-> ``RMSLayerNorm`` over ``features``."""

    nnx_type = nnx.RMSNorm
    pz_types = (standardization.RMSLayerNorm,)
    standardize_cls = standardization.RMSStandardize
    supports_bias = False


class DropoutMapping(ReversibleMapping):
    """``nnx.Dropout`` without its own RNG stream <-> ``StochasticDropout``/``DisabledDropout``.

    A deterministic NNX dropout (or one with rate 0) becomes ``DisabledDropout``; an active
    one becomes ``StochasticDropout``, which draws its mask from the ``random_stream`` side
    input, penzai's convention. A dropout holding its own RNG stream is wrapped instead, so
    that its stream (part of its NNX state) is kept.
    """

    nnx_type = nnx.Dropout
    pz_types = (dropout.StochasticDropout, dropout.DisabledDropout)

    def to_pz(self, module, context):
        if module.rngs is not None:
            raise NotApplicable("it holds its own RNG stream, which is NNX state; wrapped.")
        if tuple(module.broadcast_dims):
            raise NotApplicable("broadcast_dims has no named form.")
        if module.deterministic is None:
            raise NotApplicable("deterministic=None (decided per call) has no pz form.")
        if module.deterministic or module.rate == 0:
            return dropout.DisabledDropout(drop_rate=module.rate, share_across_axes=())
        return dropout.StochasticDropout(drop_rate=module.rate)

    def config_for(self, module):
        return {
            **super().config_for(module),
            "deterministic": module.deterministic,
            "rate": module.rate,
        }

    def build(self, layer, context, naming, config):
        if type(layer) is dropout.StochasticDropout:
            deterministic = config.get("deterministic", False)
        elif type(layer) is dropout.DisabledDropout:
            deterministic = config.get("deterministic", True)
        else:
            return None
        if layer.share_across_axes or layer.random_stream_input_name != "random_stream":
            return None
        return context.construct(
            nnx.Dropout,
            _concrete_float(layer.drop_rate, config.get("rate")),
            deterministic=deterministic,
            rngs=None,
            variables_by_path={},
        )


#### Attention ####


class MultiHeadAttentionMapping(ReversibleMapping):
    """``nnx.MultiHeadAttention`` (self-attention) <-> penzai-style ``Attention``.

    Queries, keys and values get ``heads`` and ``projection`` axes; keys and values have their
    sequence axis renamed from ``seq`` to ``kv_seq``; the attention weights carry
    ``(seq, heads, kv_seq)``. Only the configurations without decoding caches, dropout,
    QK-normalization or grouped KV heads are mapped; masks are not applied (insert a
    ``pz.nn.ApplyExplicitAttentionMask`` or ``ApplyCausalAttentionMask`` before the softmax
    to add one). Other configurations are wrapped.
    """

    nnx_type = nnx.MultiHeadAttention

    def to_pz(self, module, context):
        _require_expressible_dtype(module)
        if module.decode:
            raise NotApplicable("decode mode (KV cache) is not mapped.")
        if module.dropout_rate != 0 or module.rngs is not None:
            raise NotApplicable("attention dropout is not mapped.")
        if module.normalize_qk:
            raise NotApplicable("normalize_qk is not mapped.")
        kv_heads = compat_nnx.attention_kv_heads(module)
        if kv_heads != module.num_heads or module.in_kv_features != module.in_features:
            raise NotApplicable("grouped KV heads / separate KV features are not mapped.")
        naming = context.naming
        features, seq, kv_seq = naming.features, naming.seq, naming.kv_seq
        heads, projection = naming.heads, naming.projection

        def projection_in(name):
            child = getattr(module, name)
            linear = linear_and_affine.Linear(
                weights=context.parameter(
                    child.kernel, f"{name}/kernel", (features, heads, projection)
                ),
                in_axis_names=(features,),
                out_axis_names=(heads, projection),
            )
            return _affine(
                linear, _bias_layer(context, child.bias, f"{name}/bias", (heads, projection))
            )

        out_linear = linear_and_affine.Linear(
            weights=context.parameter(
                module.out.kernel, "out/kernel", (heads, projection, features)
            ),
            in_axis_names=(heads, projection),
            out_axis_names=(features,),
        )
        out_bias = _bias_layer(context, module.out.bias, "out/bias", (features,))
        to_kv_seq = linear_and_affine.RenameAxes(old=(seq,), new=(kv_seq,))
        return attention.Attention(
            input_to_query=grouping.Sequential(
                [
                    projection_in("query"),
                    linear_and_affine.ConstantRescale(by=1.0 / math.sqrt(module.head_dim)),
                ]
            ),
            input_to_key=grouping.Sequential([projection_in("key"), to_kv_seq]),
            input_to_value=grouping.Sequential([projection_in("value"), to_kv_seq]),
            query_key_to_attn=grouping.Sequential(
                [
                    linear_and_affine.NamedEinsum(
                        ((seq, heads, projection), (kv_seq, heads, projection)),
                        (seq, heads, kv_seq),
                    ),
                    basic_ops.Softmax(kv_seq),
                ]
            ),
            attn_value_to_output=grouping.Sequential(
                [
                    linear_and_affine.NamedEinsum(
                        ((seq, heads, kv_seq), (kv_seq, heads, projection)),
                        (seq, heads, projection),
                    ),
                    _affine(out_linear, out_bias),
                ]
            ),
        )

    def config_for(self, module):
        return {
            **super().config_for(module),
            "deterministic": module.deterministic,
            "decode": module.decode,
            "broadcast_dropout": module.broadcast_dropout,
        }

    def build(self, layer, context, naming, config):
        if type(layer) is not attention.Attention:
            return None
        features, heads, projection = naming.features, naming.heads, naming.projection
        by_path = {}
        for name, sublayer in (
            ("query", _sublayer(layer.input_to_query, 0)),
            ("key", _sublayer(layer.input_to_key, 0)),
            ("value", _sublayer(layer.input_to_value, 0)),
        ):
            parsed = _parse_affine(sublayer)
            if parsed is None or type(parsed[0]) is not linear_and_affine.Linear:
                return None
            core, bias_layer = parsed
            by_path[f"{name}/kernel"] = (
                core.weights,
                context.array(core.weights, (features, heads, projection)),
            )
            if bias_layer is not None:
                by_path[f"{name}/bias"] = (
                    bias_layer.bias,
                    context.array(bias_layer.bias, (heads, projection)),
                )
        parsed = _parse_affine(_sublayer(layer.attn_value_to_output, 1))
        if parsed is None or type(parsed[0]) is not linear_and_affine.Linear:
            return None
        out_core, out_bias = parsed
        by_path["out/kernel"] = (
            out_core.weights,
            context.array(out_core.weights, (heads, projection, features)),
        )
        if out_bias is not None:
            by_path["out/bias"] = (out_bias.bias, context.array(out_bias.bias, (features,)))
        biases = {path for path in by_path if path.endswith("/bias")}
        if biases and len(biases) != 4:
            return None  # NNX's attention has a bias on all four projections or on none.
        query_kernel = by_path["query/kernel"][1]
        in_size, num_heads, head_dim = query_kernel.shape
        out_size = by_path["out/kernel"][1].shape[-1]
        return context.construct(
            nnx.MultiHeadAttention,
            num_heads,
            in_size,
            num_heads * head_dim,
            out_size,
            use_bias="query/bias" in by_path,
            param_dtype=_param_dtype(query_kernel),
            deterministic=config.get("deterministic"),
            decode=config.get("decode"),
            broadcast_dropout=config.get("broadcast_dropout", True),
            variables_by_path=by_path,
            **_dtype_option(config),
        )


#### Containers ####


class SequentialMapping(registry.LayerMapping):
    """``nnx.Sequential`` <-> ``Sequential`` of the converted layers and functions."""

    nnx_type = nnx.Sequential
    pz_types = (grouping.Sequential,)
    verify_round_trip = False

    def to_pz(self, module, context):
        return grouping.Sequential(
            [context.convert(layer, "layers", index) for index, layer in enumerate(module.layers)]
        )

    def to_nnx(self, layer, context, config):
        if type(layer) is not grouping.Sequential:
            return None
        return nnx.Sequential(*(context.convert(sublayer) for sublayer in layer.sublayers))


class ListMapping(registry.LayerMapping):
    """``nnx.List`` of modules/functions <-> a Python list of converted entries."""

    nnx_type = nnx.List
    verify_round_trip = False
    callable_result = False

    def to_pz(self, module, context):
        entries = list(module)
        if not all(isinstance(entry, nnx.Module) or callable(entry) for entry in entries):
            raise NotApplicable("only lists of modules and functions become lists of layers.")
        return [context.convert(entry, index) for index, entry in enumerate(entries)]

    def to_nnx(self, layer, context, config):
        if not isinstance(layer, list | tuple):
            return None
        return nnx.List([context.convert(entry) for entry in layer])


class DictMapping(registry.LayerMapping):
    """``nnx.Dict`` of modules/functions <-> a Python dict of converted entries."""

    nnx_type = nnx.Dict
    verify_round_trip = False
    callable_result = False

    def to_pz(self, module, context):
        entries = dict(module.items())
        if not all(isinstance(entry, nnx.Module) or callable(entry) for entry in entries.values()):
            raise NotApplicable("only dicts of modules and functions become dicts of layers.")
        return {key: context.convert(entry, key) for key, entry in entries.items()}

    def to_nnx(self, layer, context, config):
        if not isinstance(layer, Mapping):
            return None
        return nnx.Dict({key: context.convert(entry) for key, entry in layer.items()})


#### LoRA ####


def _lora_path(context, module, prefix: str):
    naming = context.naming
    features, rank = naming.features, naming.lora_rank
    return grouping.Sequential(
        [
            linear_and_affine.Linear(
                weights=context.parameter(module.lora_a, f"{prefix}lora_a", (features, rank)),
                in_axis_names=(features,),
                out_axis_names=(rank,),
            ),
            linear_and_affine.Linear(
                weights=context.parameter(module.lora_b, f"{prefix}lora_b", (rank, features)),
                in_axis_names=(rank,),
                out_axis_names=(features,),
            ),
        ]
    )


def _read_lora_path(layer, context, naming, prefix: str):
    if type(layer) is not grouping.Sequential or len(layer.sublayers) != 2:
        return None
    first, second = layer.sublayers
    if type(first) is not linear_and_affine.Linear or type(second) is not linear_and_affine.Linear:
        return None
    features, rank = naming.features, naming.lora_rank
    return {
        f"{prefix}lora_a": (first.weights, context.array(first.weights, (features, rank))),
        f"{prefix}lora_b": (second.weights, context.array(second.weights, (rank, features))),
    }


class LoRAMapping(ReversibleMapping):
    """``nnx.LoRA`` <-> ``Sequential([Linear, Linear])`` through a ``lora_rank`` axis.

    With a base module, the result is ``BranchAndAddTogether([lora path, base])``.
    """

    nnx_type = nnx.LoRA

    def child_layers(self, layer):
        if type(layer) is combinators.BranchAndAddTogether and len(layer.branches) == 2:
            return {"base_module": layer.branches[1]}
        return {}

    def to_pz(self, module, context):
        _require_expressible_dtype(module)
        lora = _lora_path(context, module, "")
        if module.base_module is None:
            return lora
        return combinators.BranchAndAddTogether(
            [lora, context.convert(module.base_module, "base_module")]
        )

    def build(self, layer, context, naming, config):
        base = None
        if type(layer) is combinators.BranchAndAddTogether:
            if len(layer.branches) != 2:
                return None
            layer, base = layer.branches
        by_path = _read_lora_path(layer, context, naming, "")
        if by_path is None:
            return None
        lora_a = by_path["lora_a"][1]
        lora_b = by_path["lora_b"][1]
        module = context.construct(
            nnx.LoRA,
            lora_a.shape[0],
            lora_a.shape[1],
            lora_b.shape[1],
            param_dtype=_param_dtype(lora_a),
            variables_by_path=by_path,
            **_dtype_option(config),
        )
        if base is not None:
            module.base_module = nnx.data(context.convert(base))
        return module


class LoRALinearMapping(ReversibleMapping):
    """``nnx.LoRALinear`` <-> ``BranchAndAddTogether([Affine, LoRA path])``."""

    nnx_type = nnx.LoRALinear

    def to_pz(self, module, context):
        linear = LinearMapping().to_pz(module, context)
        return combinators.BranchAndAddTogether([linear, _lora_path(context, module.lora, "lora/")])

    def build(self, layer, context, naming, config):
        if type(layer) is not combinators.BranchAndAddTogether or len(layer.branches) != 2:
            return None
        extracted = _extract_linear(layer.branches[0], context)
        lora = _read_lora_path(layer.branches[1], context, naming, "lora/")
        if extracted is None or lora is None:
            return None
        kernel, bias, _, _, kernel_source, bias_layer = extracted
        by_path = {**_affine_variables_by_path(kernel_source, kernel, bias_layer, bias), **lora}
        lora_a = lora["lora/lora_a"][1]
        return context.construct(
            nnx.LoRALinear,
            kernel.shape[0],
            kernel.shape[1],
            lora_rank=lora_a.shape[1],
            use_bias=bias is not None,
            param_dtype=_param_dtype(kernel),
            lora_param_dtype=_param_dtype(lora_a),
            variables_by_path=by_path,
            **_dtype_option(config),
        )


# LinearGeneral comes before Linear so that Linear, registered later, is tried first when
# to_nnx(native=True) meets an Affine both could rebuild.
BUILTIN_MAPPINGS = (
    LinearGeneralMapping(),
    EinsumMapping(),
    LinearMapping(),
    EmbedMapping(),
    LayerNormMapping(),
    RMSNormMapping(),
    DropoutMapping(),
    MultiHeadAttentionMapping(),
    SequentialMapping(),
    ListMapping(),
    DictMapping(),
    LoRAMapping(),
    LoRALinearMapping(),
)


def register_builtin_mappings() -> None:
    """Registers the shipped mappings (done when ``pz_flax.interop`` is imported)."""
    for mapping in BUILTIN_MAPPINGS:
        if registry.get_mapping(mapping.nnx_type) is None:
            registry.register_mapping(mapping)
