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
import inspect
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


@dataclasses.dataclass(frozen=True)
class CallSignature:
    """The keyword arguments an NNX module's ``__call__`` takes besides its input.

    Read from the module's class when it is wrapped, so that side inputs can be forwarded by
    name and a missing required argument is reported before the module runs.

    Attributes:
        keywords: Parameters after the input that can be passed by keyword, in order.
        required: Those of ``keywords`` without a default value.
        accepts_any: Whether ``__call__`` also takes ``**kwargs`` (then every side input is
            forwarded).
    """

    keywords: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    accepts_any: bool = False

    @classmethod
    def of(cls, module_type: type[Any]) -> CallSignature:
        """The call signature of an NNX module class (empty if it cannot be read)."""
        try:
            parameters = list(inspect.signature(module_type.__call__).parameters.values())[1:]
        except (TypeError, ValueError):
            return cls(accepts_any=True)
        keywords, required, accepts_any = [], [], False
        # The first parameter after ``self`` receives the converted input.
        for index, parameter in enumerate(parameters):
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                accepts_any = True
            elif index == 0 or parameter.kind in (
                inspect.Parameter.POSITIONAL_ONLY,
                inspect.Parameter.VAR_POSITIONAL,
            ):
                continue
            else:
                keywords.append(parameter.name)
                if parameter.default is inspect.Parameter.empty:
                    required.append(parameter.name)
        return cls(tuple(keywords), tuple(required), accepts_any)

    def select(self, side_inputs: dict[str, Any], who: str) -> dict[str, Any]:
        """The side inputs to pass to the call as keyword arguments.

        Args:
            side_inputs: Every side input the wrapper received.
            who: The module, for the error message.

        Returns:
            The side inputs whose names the call accepts (all of them if it takes ``**kwargs``).

        Raises:
            TypeError: If a required argument is not among the side inputs.
        """
        missing = [name for name in self.required if name not in side_inputs]
        if missing:
            raise TypeError(
                f"{who} needs the call argument(s) {missing}, which pz_flax passes from side"
                f" inputs of the same name: call the layer as layer(x, {missing[0]}=...)"
                f" (it accepts {list(self.keywords)})."
            )
        if self.accepts_any:
            return dict(side_inputs)
        return {name: side_inputs[name] for name in self.keywords if name in side_inputs}


@struct.pytree_dataclass
class NNXWrapper(layer_base.Layer):
    """Runs an NNX module's own ``__call__`` inside a pz_flax model.

    A call runs the module (rebuilt from ``shell``, the raw arrays of ``variables`` and the NNX
    forms of ``children``; an eager call reuses the module built by the previous call while
    every variable still holds the same array, so notebooks do not pay for a rebuild) on the
    positional form of the input: the named axes in ``input_axes`` are moved to the end, the
    other named axes lead (see ``pz_flax.interop.naming.to_positional``). Side inputs whose
    names are parameters of the module's ``__call__`` are passed as keyword arguments (every
    side input, if it takes ``**kwargs``); a required parameter missing from the side inputs
    is a ``TypeError`` naming it. The output gets the input's leading names back and
    ``output_axes`` (or inferred names, see ``output_axes``) for its trailing axes. Variables
    the module changes while running (batch statistics, RNG counters) are written back to the
    ``StateVariable``/``Parameter`` objects here, as any pz_flax stateful layer would; under
    ``jax.jit`` use ``pz.variable_jit`` or ``stateless_call`` as usual for stateful models.
    Plain JAX arrays are passed through positionally, so NNX code inside pz_flax models can
    also be fed arrays directly.

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
        output_axes: Names of the output's trailing axes, or None to infer them: the input's
            trailing names when the ranks agree, ``vocabulary`` for one new axis of the size
            of the vocabulary of an ``nnx.Embed`` inside the module (language-model logits),
            else ``feature_axis`` names for new trailing axes; an output with fewer axes than
            the input is named by finding which input axes it keeps (evaluating shapes with
            one input axis resized at a time) (static).
        call_signature: The keyword arguments the module's ``__call__`` takes (static).
        required_input_axes: Named axes the input must have (a convolution's spatial axes),
            since without them the module would silently treat other axes as those (static).
        feature_axis: Name for a single new trailing output axis when ``output_axes`` is
            None and the output has more trailing axes than the input (static).
        vocabulary_axis: ``(size, name)`` of the vocabulary of the module's embedding, if it
            holds exactly one ``nnx.Embed`` (static).
        wrapped_because: Why a module of a class with a registered mapping was wrapped rather
            than mapped (empty otherwise) (static).
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
    call_signature: CallSignature = dataclasses.field(
        default=CallSignature(), metadata={"pytree_node": False}
    )
    required_input_axes: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"pytree_node": False}
    )
    feature_axis: str = dataclasses.field(default="features", metadata={"pytree_node": False})
    vocabulary_axis: tuple[int, str] | None = dataclasses.field(
        default=None, metadata={"pytree_node": False}
    )
    wrapped_because: str = dataclasses.field(default="", metadata={"pytree_node": False})

    def __call__(self, argument: Any, /, **side_inputs: Any) -> Any:
        """Runs the NNX module on the positional form of ``argument``.

        Args:
            argument: A named array (named as described above) or a plain array.
            **side_inputs: Those named like parameters of the module's ``__call__`` become its
                keyword arguments; the rest are ignored.

        Returns:
            The module's output, named like the input.

        Raises:
            TypeError: If a required call argument is missing from ``side_inputs``.
            ValueError: If the input lacks one of ``required_input_axes``, or the output's
                axes cannot be named.
        """
        who = f"NNX module {_type_name(self.module_type)}"
        keyword_arguments = self.call_signature.select(side_inputs, who)
        if isinstance(argument, named_axes.NamedArrayBase):
            missing = [
                name for name in self.required_input_axes if name not in argument.named_shape
            ]
            if missing:
                raise ValueError(
                    f"{who} (variables {sorted(self.variables)}) needs the input axes"
                    f" {self.required_input_axes}, but the input has no axis named {missing}"
                    f" (its axes: {dict(argument.named_shape)}); without them it would"
                    " treat other axes as those."
                )
        module, bindings = self._module()
        positional, leading = naming_lib.to_positional(argument, self.input_axes)
        with jax.named_scope(_type_name(self.module_type)):
            output = module(positional, **keyword_arguments)
        write_back_changed_variables(bindings)
        return _name_output(
            self,
            argument,
            leading,
            output,
            who,
            probe=lambda probe_input: _probe_call(self, probe_input, keyword_arguments),
            probe_key=(id(self), argument.dtype, tuple(argument.named_shape.items()))
            if isinstance(argument, named_axes.NamedArrayBase)
            else None,
        )

    def _module(self) -> tuple[nnx.Module, list[tuple[Any, Any, tuple[Hashable, ...]]]]:
        """The NNX module for this call, with the bindings of its variables."""
        from pz_flax.interop import convert  # convert builds wrappers; import at call time

        cached = _BUILT_MODULES.get(id(self))
        if cached is not None and cached[0] is self and _bindings_current(cached[2]):
            return cached[1], cached[2]
        bindings: list[tuple[Any, Any, tuple[Hashable, ...]]] = []
        module = convert.rebuild_wrapped_module(self, bindings)
        if _is_concrete(bindings):
            # Only eager calls reuse a module: a traced one holds tracers of one trace.
            _remember_module(self, module, bindings)
        return module, bindings

    def treescope_color(self) -> str:
        return "#e8c7b3"


# The module each wrapper built in its last eager call, by the wrapper's id. Wrappers are
# frozen, so a wrapper object always rebuilds the same module; only its variables' arrays can
# change, and those are checked before reuse. Entries hold the wrapper itself (so its id stays
# unique) and are evicted oldest first.
_BUILT_MODULES: dict[int, tuple[Any, nnx.Module, list]] = {}
_BUILT_MODULES_LIMIT = 64


def _remember_module(wrapper: NNXWrapper, module: nnx.Module, bindings: list) -> None:
    _BUILT_MODULES.pop(id(wrapper), None)
    _BUILT_MODULES[id(wrapper)] = (wrapper, module, bindings)
    while len(_BUILT_MODULES) > _BUILT_MODULES_LIMIT:
        del _BUILT_MODULES[next(iter(_BUILT_MODULES))]


def _is_concrete(bindings: list) -> bool:
    return not any(
        isinstance(leaf, jax.core.Tracer)
        for pz_variable, _, _ in bindings
        for leaf in jax.tree_util.tree_leaves(raw_value_of(pz_variable))
    )


def _bindings_current(bindings: list) -> bool:
    """Whether every NNX variable of a built module still holds its pz_flax variable's array."""
    for pz_variable, module, path in bindings:
        if not isinstance(pz_variable, variables.LabeledVariable):
            return False
        if variable_at(module, path).get_raw_value() is not pz_variable.get_raw_value():
            return False
    return True


def _probe_call(wrapper: NNXWrapper, positional: Any, keyword_arguments: dict[str, Any]) -> Any:
    """The output shapes of the wrapped module on another input, computed abstractly.

    The module is rebuilt inside the abstract evaluation from copies of the wrapper's state
    variables (pz_flax layers inside it may record state, e.g. ``SaveIntermediate``), and NNX
    objects among the keyword arguments (an ``nnx.Rngs``) are cloned, so nothing outside is
    changed.
    """
    from pz_flax.interop import convert

    def call(probe_input):
        pure, state = variables.unbind_state_vars(wrapper, freeze=True)
        isolated = variables.bind_variables(pure, state, unfreeze_as_copy=True)
        module = convert.rebuild_wrapped_module(isolated)
        arguments = {
            name: nnx.clone(value) if isinstance(value, nnx.Pytree) else value
            for name, value in keyword_arguments.items()
        }
        return module(probe_input, **arguments)

    return jax.eval_shape(call, positional)


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
    probe: Callable[[Any], Any] | None = None,
    probe_key: Any = None,
) -> Any:
    """Names the output of a wrapped call; see ``NNXWrapper.output_axes`` for the rule.

    Args:
        wrapper: The wrapper layer, giving ``input_axes``, ``output_axes`` and
            ``feature_axis``.
        argument: The wrapper's input.
        leading: The batch axis names that ``naming.to_positional`` moved to the front, or
            None when ``argument`` was not a named array (the output is then returned as is).
        output: What the wrapped module or function returned.
        who: Describes the wrapped callable in error messages.
        probe: Computes the output's shapes for another positional input, for naming an
            output with fewer axes than the input; None if that is not possible.
        probe_key: Identifies the wrapper and input shape, so the probing runs once per
            input shape rather than on every call.

    Returns:
        ``output`` with every array leaf named.
    """
    if leading is None:
        return output
    positional_rank = len(argument.positional_shape)
    trailing_in = tuple(name for name in wrapper.input_axes if name in argument.named_shape)
    output_axes = wrapper.output_axes
    features_default = wrapper.feature_axis
    vocabulary = getattr(wrapper, "vocabulary_axis", None)
    kept_axes = None

    def new_axis_names(leaf, extra):
        if extra == len(trailing_in):
            return trailing_in
        if extra == 1 and vocabulary is not None and leaf.shape[-1] == vocabulary[0]:
            return (vocabulary[1],)
        if extra == 1:
            return (features_default,)
        return tuple(f"{features_default}_{index}" for index in range(extra))

    def name_leaf(path, leaf):
        nonlocal kept_axes
        if not isinstance(leaf, jax.Array):
            return leaf
        extra = leaf.ndim - positional_rank - len(leading)
        if output_axes is not None:
            trailing = output_axes
        elif extra >= 0:
            trailing = new_axis_names(leaf, extra)
        else:
            if kept_axes is None:
                cached = _KEPT_AXES.get(probe_key) if probe_key is not None else None
                if cached is not None and cached[0] is wrapper:
                    kept_axes = cached[1]
            if kept_axes is None:
                kept_axes = _kept_input_axes(argument, leading, output, probe)
                if probe_key is not None:
                    _KEPT_AXES[probe_key] = (wrapper, kept_axes)
                    while len(_KEPT_AXES) > _BUILT_MODULES_LIMIT:
                        del _KEPT_AXES[next(iter(_KEPT_AXES))]
            names = kept_axes.get(path) if kept_axes else None
            if names is None:
                raise ValueError(
                    f"{who} returned an array of shape {leaf.shape}, with fewer axes than the"
                    f" {positional_rank} positional and {len(leading)} batch axes {leading} of"
                    " its input, and which input axes it keeps could not be told apart, so"
                    " its axes cannot be named. Convert it with input_axes=... naming every"
                    " axis it consumes, or output_axes=... (e.g. overrides={path:"
                    " {'input_axes': (...)}})."
                )
            kept = tuple(name for name in names if name is not None)
            return naming_lib.from_positional(
                leaf, kept, new_axis_names(leaf, leaf.ndim - len(kept)), 0, who
            )
        return naming_lib.from_positional(leaf, leading, trailing, positional_rank, who)

    return jax.tree_util.tree_map_with_path(name_leaf, output)


# Results of _kept_input_axes by (wrapper id, input dtype, input named shape); each entry
# holds its wrapper, so the id stays unique while the entry lives.
_KEPT_AXES: dict[Any, Any] = {}


def _kept_input_axes(argument, leading, output, probe):
    """Which of the input's leading axes each output array keeps, found by resizing them.

    Each leading input axis in turn gets a size that no axis has; the output axes whose size
    follows it are that input axis. An axis whose resizing makes the module fail (a flattening
    reshape, a fixed-size position table) is consumed by the module. The result is used only
    if every output array starts with the axes it keeps, in the input's order.

    Returns:
        ``{leaf path: (names of its leading kept axes)}``, or None if the axes cannot be told
        apart (the input has positional axes, or no probe is possible).
    """
    if probe is None or argument.positional_shape:
        return None
    positional, _ = naming_lib.to_positional(argument, ())
    base_leaves = jax.tree_util.tree_leaves_with_path(output)
    sizes = {size for _, leaf in base_leaves for size in getattr(leaf, "shape", ())}
    sizes |= set(positional.shape)
    fresh_size = max(sizes, default=1) + 1
    tracked: dict[Any, list[str | None]] = {
        path: [None] * leaf.ndim for path, leaf in base_leaves if isinstance(leaf, jax.Array)
    }
    for index, name in enumerate(leading):
        shape = list(positional.shape)
        shape[index] = fresh_size
        try:
            probed = probe(jax.ShapeDtypeStruct(tuple(shape), positional.dtype))
        except Exception:  # any failure: the module needs this axis size
            continue
        probed_shapes = dict(jax.tree_util.tree_leaves_with_path(probed))
        for path, names in tracked.items():
            probed_leaf = probed_shapes.get(path)
            if probed_leaf is None:
                return None
            base_shape = dict(base_leaves)[path].shape
            for axis, (before, after) in enumerate(zip(base_shape, probed_leaf.shape)):
                if before != after and after == fresh_size:
                    names[axis] = name
    result = {}
    for path, names in tracked.items():
        kept = [name for name in names if name is not None]
        if names[: len(kept)] != kept or kept != [n for n in leading if n in kept]:
            return None
        result[path] = tuple(names[: len(kept)])
    return result


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
    """The object at an NNX path (attribute names, list indices, dict keys) below ``module``."""
    node = module
    for part in path:
        # Plain dicts of variables are NNX data too (``bridge.ToNNX`` keeps Linen's that way).
        indexable = isinstance(part, int) or isinstance(node, dict)
        node = node[part] if indexable else getattr(node, part)
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


def wrapped_input_axes(module: Any, naming: naming_lib.NNXNaming) -> tuple[str, ...]:
    """Named axes a wrapped module must receive, in front of ``features``, in NNX order.

    A convolution reads its spatial axes by position: named ones must be present (and are
    moved into place), or it would convolve over whatever axes happen to be there.
    """
    if isinstance(module, nnx.Conv | nnx.ConvTranspose):
        return naming.spatial_axes(len(module.kernel_size))
    return ()


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
        input_names_for_rank: Callable[[int], tuple[str, ...] | None] | None = None,
    ):
        """Wraps ``layer``.

        Args:
            layer: A pz_flax layer (any callable pz_flax struct).
            input_names: Names for the positional input's axes, or None for the defaults.
            naming: The naming convention supplying default names.
            input_names_for_rank: Without ``input_names``: gives the names for an input of a
                given rank (None for the defaults); ``to_nnx`` passes the naming of the NNX
                class an edited layer came from.
        """
        self.layer = layer
        self.input_names = None if input_names is None else tuple(input_names)
        self.naming = naming
        self.input_names_for_rank = input_names_for_rank

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
        names = self.input_names
        if names is None and self.input_names_for_rank is not None:
            names = self.input_names_for_rank(x.ndim)
        if names is None:
            names = self.naming.default_axis_names(x.ndim)
        named = naming_lib.name_positional_input(x, names, self.naming)
        return naming_lib.unname_output(self.layer(named, **side_inputs), names)


def is_pz_object(value: Any) -> bool:
    """Whether ``value`` is a pz_flax struct (layer, named array, ...) or variable."""
    return isinstance(value, struct.Struct | variables.AbstractVariable)
