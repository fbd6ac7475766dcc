"""The layers that carry NNX modules into pz_flax models, and pz_flax layers into NNX code.

Three pz_flax layers come out of ``from_nnx``:

* ``FromNNX`` tags a layer made by a registered mapping with the NNX class it came from
  (``FromNNX(nnx_type=nnx.Linear, layer=Affine(...))``). The inner layer is ordinary pz_flax
  (select into it, patch it); the tag is what lets ``to_nnx`` rebuild that exact class.
* ``NNXWrapper`` stands for a module that has no mapping (``nnx.Conv``, ``nnx.BatchNorm``, a
  user's class with its own ``__call__``). It runs the module's own code, so behaviour is
  exactly NNX's, while the module's variables are pz_flax ``Parameter``/``StateVariable``
  objects labelled by their NNX paths and its child modules are converted where possible.
* ``WrappedCallable`` stands for a plain function that is not known to be elementwise.

Going the other way, ``PzModule`` is an ``nnx.Module`` holding a pz_flax layer: NNX code calls
it with positional arrays, which it names by the naming convention; NNX sees the layer's
parameters (they are ``nnx.Param`` objects), so ``nnx.Optimizer`` trains them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Hashable
from typing import Any

import jax
from flax import nnx

from pz_flax.core import named_axes
from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.interop import naming as naming_lib
from pz_flax.nn import layer as layer_base


def _type_name(cls: type[Any]) -> str:
    return cls.__qualname__


@struct.pytree_dataclass
class FromNNX(layer_base.Layer):
    """A pz_flax layer converted by a registered mapping, tagged with its NNX class.

    Runs ``layer``. The tag (and ``nnx_config``, settings the pz form cannot express) lets
    ``to_nnx`` rebuild an object of the original class with the same state, including after
    ``layer`` has been edited, as long as the edit keeps the shape the mapping understands.

    Attributes:
        layer: The pz_flax layer computing what the NNX module computed.
        nnx_type: The NNX class the layer came from (static).
        nnx_config: Extra static settings recorded by the mapping (static).
    """

    layer: layer_base.Layer
    nnx_type: type[Any] = dataclasses.field(metadata={"pytree_node": False})
    nnx_config: dict[str, Hashable] = dataclasses.field(
        default_factory=dict, metadata={"pytree_node": False}
    )

    def __call__(self, argument: Any, /, **side_inputs: Any) -> Any:
        """Runs the converted layer (under a JAX name scope named after the NNX class)."""
        with jax.named_scope(_type_name(self.nnx_type)):
            return self.layer(argument, **side_inputs)

    def treescope_color(self) -> str:
        return "#c9b3e8"


@dataclasses.dataclass(frozen=True)
class ModuleShell:
    """What a wrapped NNX module is without its converted children: its graph definition.

    A static value that compares and hashes like the graph definition (so jit caches hit).
    It is a dataclass so that checkpoint manifests can describe it, but renders as one short
    line in treescope and ``repr``, since the full definition is rarely what a reader of a
    model wants to see.

    Attributes:
        graphdef: The ``nnx.GraphDef`` of the module with its converted children removed.
    """

    graphdef: Any

    def __repr__(self) -> str:
        return f"ModuleShell(<nnx.GraphDef of {self.graphdef.nodes[0].type.__name__}>)"

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any):
        from treescope import rendering_parts

        del path, subtree_renderer
        return rendering_parts.text(repr(self))


@struct.pytree_dataclass
class NNXWrapper(layer_base.Layer):
    """Runs an NNX module's own ``__call__`` inside a pz_flax model.

    Each call rebuilds the module from ``shell`` (its graph definition without the converted
    children), the raw arrays of ``variables`` and the NNX forms of ``children``, then calls it
    on the positional form of the input: the named axes in ``input_axes`` are moved to the
    end, the other named axes lead (see ``pz_flax.interop.naming.to_positional``). The output
    gets the input's leading names back and ``output_axes`` (or an inferred name) for its
    trailing axes. Variables the module changes while running (batch statistics, RNG
    counters) are written back to the ``StateVariable``/``Parameter`` objects here, as any
    pz_flax stateful layer would; under ``jax.jit`` use ``pz.variable_jit`` or
    ``stateless_call`` as usual for stateful models. Plain JAX arrays are passed through
    positionally, so NNX code inside pz_flax models can also be fed arrays directly.

    Attributes:
        variables: The module's own variables (not its converted children's), by
            ``/``-joined NNX path; ``nnx.Param`` become ``Parameter``, others
            ``StateVariable``.
        children: Converted child modules by attribute name (pz_flax layers, lists, dicts).
        pz_attributes: Attributes that already held pz_flax objects, given back unchanged.
        module_type: The NNX class (static).
        shell: The module without ``children`` and ``pz_attributes``, as a ``ModuleShell``
            (static).
        variable_paths: The NNX path (with integer list indices) of each variable (static).
        input_axes: Names moved to the end of the positional input, in order (static).
        output_axes: Names of the output's trailing axes, or None to infer them (static).
        forwarded_side_inputs: Side inputs passed to the module as keyword arguments of the
            same name (static).
        feature_axis: Name for a single new trailing output axis when ``output_axes`` is
            None and the output has more trailing axes than the input (static).
    """

    variables: dict[str, variables.LabeledVariable]
    children: dict[str, Any]
    pz_attributes: dict[str, Any]
    module_type: type[Any] = dataclasses.field(metadata={"pytree_node": False})
    shell: ModuleShell = dataclasses.field(metadata={"pytree_node": False})
    variable_paths: dict[str, tuple[Hashable, ...]] = dataclasses.field(
        metadata={"pytree_node": False}
    )
    input_axes: tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})
    output_axes: tuple[str, ...] | None = dataclasses.field(
        default=None, metadata={"pytree_node": False}
    )
    forwarded_side_inputs: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"pytree_node": False}
    )
    feature_axis: str = dataclasses.field(default="features", metadata={"pytree_node": False})

    def __call__(self, argument: Any, /, **side_inputs: Any) -> Any:
        """Runs the NNX module on the positional form of ``argument``.

        Args:
            argument: A named array (named as described above) or a plain array.
            **side_inputs: Those named in ``forwarded_side_inputs`` become keyword arguments
                of the module's call; the rest are ignored.

        Returns:
            The module's output, named like the input.
        """
        from pz_flax.interop import convert  # convert builds wrappers; import at call time

        bindings: list[tuple[Any, Any, tuple[Hashable, ...]]] = []
        module = convert.rebuild_wrapped_module(self, bindings)
        positional, leading = naming_lib.to_positional(argument, self.input_axes)
        keyword_arguments = {
            name: side_inputs[name] for name in self.forwarded_side_inputs if name in side_inputs
        }
        with jax.named_scope(_type_name(self.module_type)):
            output = module(positional, **keyword_arguments)
        write_back_changed_variables(bindings)
        return _name_output(
            self, argument, leading, output, f"NNX module {_type_name(self.module_type)}"
        )

    def treescope_color(self) -> str:
        return "#e8c7b3"


@struct.pytree_dataclass
class WrappedCallable(layer_base.Layer):
    """A function from NNX code (not known to be elementwise), called on positional arrays.

    The input is made positional like ``NNXWrapper`` does, ``fn`` is called on it, and the
    result is named back.

    Attributes:
        fn: The function (static).
        input_axes: Names moved to the end of the positional input (static).
        output_axes: Names of the output's trailing axes, or None to infer them (static).
        feature_axis: Name for new trailing output axes when ``output_axes`` is None (static).
    """

    fn: Callable[..., Any] = dataclasses.field(metadata={"pytree_node": False})
    input_axes: tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})
    output_axes: tuple[str, ...] | None = dataclasses.field(
        default=None, metadata={"pytree_node": False}
    )
    feature_axis: str = dataclasses.field(default="features", metadata={"pytree_node": False})

    def __call__(self, argument: Any, /, **_unused_side_inputs: Any) -> Any:
        """Calls ``fn`` on the positional form of ``argument`` and names the result."""
        positional, leading = naming_lib.to_positional(argument, self.input_axes)
        output = self.fn(positional)
        return _name_output(
            self,
            argument,
            leading,
            output,
            f"function {getattr(self.fn, '__name__', repr(self.fn))}",
        )


def _name_output(
    wrapper: NNXWrapper | WrappedCallable,
    argument: Any,
    leading: tuple[str, ...] | None,
    output: Any,
    who: str,
) -> Any:
    """Names the output of a wrapped call; see ``NNXWrapper`` for the rule.

    Args:
        wrapper: The wrapper layer, giving ``input_axes``, ``output_axes`` and
            ``feature_axis``.
        argument: The wrapper's input.
        leading: The batch axis names that ``naming.to_positional`` moved to the front, or
            None when ``argument`` was not a named array (the output is then returned as is).
        output: What the wrapped module or function returned.
        who: Describes the wrapped callable in error messages.

    Returns:
        ``output`` with every array leaf named.
    """
    if leading is None:
        return output
    positional_rank = len(argument.positional_shape)
    trailing_in = tuple(name for name in wrapper.input_axes if name in argument.named_shape)
    output_axes = wrapper.output_axes
    features_default = wrapper.feature_axis

    def name_leaf(leaf):
        if not isinstance(leaf, jax.Array):
            return leaf
        extra = leaf.ndim - positional_rank - len(leading)
        if output_axes is not None:
            trailing = output_axes
        elif extra == len(trailing_in):
            trailing = trailing_in
        elif extra == 1:
            trailing = (features_default,)
        elif extra > 1:
            trailing = tuple(f"{features_default}_{index}" for index in range(extra))
        else:
            raise ValueError(
                f"{who} returned an array of shape {leaf.shape}, with fewer axes than the"
                f" {positional_rank} positional and {len(leading)} batch axes {leading} of its"
                " input, so its axes cannot be named. Convert it with input_axes=... naming"
                " every axis it consumes (e.g. overrides={path: {'input_axes': (...)}})."
            )
        return naming_lib.from_positional(leaf, leading, trailing, positional_rank, who)

    return jax.tree_util.tree_map(name_leaf, output)


def raw_value_of(variable: Any) -> Any:
    """The positional (NNX-layout) value of a live variable or of a frozen snapshot.

    Penzai code often binds frozen ``ParameterValue``s into a model (``jax.grad`` over frozen
    parameters); a wrapped NNX module must run on those as well as on live variables.
    """
    if isinstance(variable, variables.AbstractVariableValue):
        value = variable.value
        if named_axes.is_namedarray(value):
            return value.with_positional_prefix().data_array
        return value
    return variable.get_value()


def write_back_changed_variables(bindings) -> None:
    """Copies values that a rebuilt NNX module changed back into pz_flax variables.

    Args:
        bindings: ``(pz variable, module, path)`` triples recorded while rebuilding.

    Raises:
        ValueError: If the module changed a variable that is bound as a frozen snapshot, which
            cannot hold the new value.
    """
    for pz_variable, module, path in bindings:
        nnx_variable = variable_at(module, path)
        new_raw = nnx_variable.get_value()
        if new_raw is raw_value_of(pz_variable):
            continue
        if isinstance(pz_variable, variables.AbstractVariableValue):
            raise ValueError(
                f"The wrapped NNX module changed the variable labelled {pz_variable.label!r},"
                " which is bound as a frozen snapshot; bind a mutable variable"
                " (bind_variables(..., unfreeze_as_copy=True)) to keep the change."
            )
        pz_variable.set_value(new_raw)


def variable_at(module: Any, path: tuple[Hashable, ...]) -> Any:
    """The object at an NNX path (attribute names and list indices) below ``module``."""
    node = module
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


#### Axis names for the variables of wrapped modules ####

_WRAPPED_AXIS_NAMERS: dict[type[Any], Callable[..., tuple[str, ...] | None]] = {}


def register_wrapped_axis_names(
    nnx_type: type[Any],
    namer: Callable[[Any, str, nnx.Variable, naming_lib.NNXNaming], tuple[str, ...] | None],
) -> None:
    """Gives the variables of a wrapped NNX class axis names.

    Wrapped modules keep their own code, so their variables may stay positional; a namer makes
    them named arrays on the pz_flax side (the raw array is unchanged).

    Args:
        nnx_type: The NNX class (matched exactly).
        namer: ``namer(module, attribute_name, variable, naming)`` returning one name per axis
            of the variable's value, or None to leave it positional.

    Raises:
        TypeError: If ``nnx_type`` is not a class or ``namer`` is not callable.
    """
    if not isinstance(nnx_type, type) or not callable(namer):
        raise TypeError(
            "register_wrapped_axis_names expects an NNX class and a callable, got"
            f" {nnx_type!r} and {namer!r}."
        )
    _WRAPPED_AXIS_NAMERS[nnx_type] = namer


def wrapped_axis_names(
    module: Any, key: str, variable: nnx.Variable, naming: naming_lib.NNXNaming
) -> tuple[str, ...] | None:
    """Axis names for a wrapped module's variable, from the registered namer (if any)."""
    namer = _WRAPPED_AXIS_NAMERS.get(type(module))
    if namer is None:
        return None
    names = namer(module, key, variable, naming)
    if names is not None and len(names) != variable.get_value().ndim:
        return None
    return names


def _conv_axis_names(module, key, variable, naming):
    spatial = naming.spatial_axes(len(module.kernel_size))
    if key == "kernel":
        return (*spatial, naming.features, f"{naming.features}_out")
    if key == "bias":
        return (naming.features,)
    return None


def _feature_vector_axis_names(module, key, variable, naming):
    del module, key
    if variable.get_value().ndim == 1:
        return (naming.features,)
    return None


for _conv_type in (nnx.Conv, nnx.ConvTranspose):
    register_wrapped_axis_names(_conv_type, _conv_axis_names)
for _norm_type in (nnx.BatchNorm, nnx.GroupNorm, nnx.InstanceNorm):
    register_wrapped_axis_names(_norm_type, _feature_vector_axis_names)


#### pz_flax layers inside NNX code ####


class PzModule(nnx.Module):
    """An ``nnx.Module`` that runs a pz_flax layer, for use inside NNX code.

    Called with positional arrays, it names them (by ``input_names``, or by the naming
    convention's defaults for the input's rank: ``(batch, features)``, ``(batch, seq,
    features)``, ``(batch, height, width, features)``), runs the layer, and unwraps the
    output with the input's names first. Named arrays and other values are passed to the
    layer unchanged, and keyword arguments become side inputs.

    The layer's ``Parameter`` objects are ``nnx.Param`` variables, so ``nnx.state``,
    ``nnx.Optimizer`` and Orbax see and update them; they are the layer's own variables (not
    copies), so training through this module updates the pz_flax layer too.

    Attributes:
        layer: The pz_flax layer.
        input_names: Names for the positional input's axes, or None for the defaults.
        naming: The naming convention supplying default names.
    """

    def __init__(
        self,
        layer: Any,
        *,
        input_names: tuple[str, ...] | None = None,
        naming: naming_lib.NNXNaming = naming_lib.DEFAULT_NAMING,
    ):
        """Wraps ``layer``.

        Args:
            layer: A pz_flax layer (any callable pz_flax struct).
            input_names: Names for the positional input's axes, or None for the defaults.
            naming: The naming convention supplying default names.
        """
        self.layer = layer
        self.input_names = None if input_names is None else tuple(input_names)
        self.naming = naming

    def __call__(self, x: Any, **side_inputs: Any) -> Any:
        """Runs the layer on ``x`` (named by the convention if positional).

        Args:
            x: A positional array, or a value the layer accepts directly.
            **side_inputs: Passed to the layer as side inputs.

        Returns:
            The layer's output, positional if ``x`` was.
        """
        if isinstance(x, named_axes.NamedArrayBase) or not isinstance(x, jax.Array):
            return self.layer(x, **side_inputs)
        names = self.input_names or self.naming.default_axis_names(x.ndim)
        named = naming_lib.name_positional_input(x, names, self.naming)
        return naming_lib.unname_output(self.layer(named, **side_inputs), names)


def is_pz_object(value: Any) -> bool:
    """Whether ``value`` is a pz_flax struct (layer, named array, ...) or variable."""
    return isinstance(value, struct.Struct | variables.AbstractVariable)
