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
import functools
import inspect
import types
from collections.abc import Callable
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pz_flax._compat import nnx as compat_nnx
from pz_flax.core import named_axes
from pz_flax.core import registry as registry_lib
from pz_flax.core import selectors
from pz_flax.core import struct
from pz_flax.core import variables

# Annotations inside NNXWrapper cannot say ``variables.StateVariable``: its ``variables`` field
# shadows the module there.
from pz_flax.core.variables import StateVariable
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
        module_type = compat_nnx.graphdef_module_type(self.graphdef)
        return f"ModuleShell(<nnx.GraphDef of {module_type.__name__}>)"

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


def _bookkeeping(**field_options: Any) -> Any:
    """A static wrapper field that treescope shows collapsed: bookkeeping, not the model."""
    return dataclasses.field(
        metadata={"pytree_node": False, "treescope_always_collapse": True}, **field_options
    )


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
        sown: Where to record what the module's code sows, or None (the default) to drop it.
            A ``StateVariable`` (see ``capturing_sown``, ``capture_sown``) whose value after
            each call is ``{NNX path / name: value}`` of the ``nnx.Intermediate`` values sown
            during that call only, paths relative to this module, values as NNX stores them
            (a tuple of positional arrays). Sown values never accumulate across calls.

    The static fields are bookkeeping: treescope shows them collapsed, so that a reader sees
    the variables and the converted children first.
    """

    variables: dict[str, variables.LabeledVariable]
    children: dict[str, Any]
    pz_attributes: dict[str, Any]
    module_type: type[Any] = _bookkeeping()
    shell: ModuleShell = _bookkeeping()
    variable_paths: dict[str, tuple[Hashable, ...]] = _bookkeeping()
    input_axes: tuple[str, ...] = _bookkeeping()
    output_axes: tuple[str, ...] | None = _bookkeeping(default=None)
    call_signature: CallSignature = _bookkeeping(default=CallSignature())
    required_input_axes: tuple[str, ...] = _bookkeeping(default=())
    feature_axis: str = _bookkeeping(default="features")
    vocabulary_axis: tuple[int, str] | None = _bookkeeping(default=None)
    wrapped_because: str = _bookkeeping(default="")
    sown: StateVariable | None = None

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
            ValueError: If the input lacks one of ``required_input_axes``, the output's axes
                cannot be named, or ``sown`` is bound as a frozen snapshot.
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
        if self.sown is not None and not isinstance(self.sown, variables.StateVariable):
            raise ValueError(
                f"{who} records its sown values in the state variable labelled"
                f" {self.sown.label!r}, which is bound as a frozen snapshot; bind a mutable"
                " variable (bind_variables(..., unfreeze_as_copy=True)) to record them."
            )
        built = self._module()
        # A sowing switch passed to this call may reach any stock layer in the module.
        sowing_modules = (
            None if SOW_SWITCH_NAMES.intersection(keyword_arguments) else built.sowing_modules
        )
        positional, leading = naming_lib.to_positional(argument, self.input_axes)
        with jax.named_scope(_type_name(self.module_type)):
            output = _run_capturing_sown(
                built.module,
                positional,
                keyword_arguments,
                self.sown,
                self._nested_recorders(),
                sowing_modules,
            )
        _write_back(built.pairs)
        return _name_output(
            self,
            argument,
            leading,
            output,
            who,
            probe=lambda probe_input: _probe_call(self, probe_input, keyword_arguments),
            probe_cache=self.__dict__.setdefault(_KEPT_AXES_KEY, {}),
        )

    def capturing_sown(self, label: str) -> NNXWrapper:
        """A copy that records what its NNX code sows, in a new ``StateVariable``.

        See ``sown`` and ``capture_sown`` (which does this for every wrapper of a model).

        Args:
            label: The label of the new variable (unique in the model, like every label).

        Returns:
            The copy; its ``sown.value`` is None until it is called.
        """
        return dataclasses.replace(self, sown=variables.StateVariable(None, label=label))

    def _nested_recorders(self) -> list[tuple[str, StateVariable]]:
        """``(NNX path, sown variable)`` of each wrapper below this one that records sows.

        Wrappers among ``children`` run as NNX code inside this module, so their sown values
        are collected here and handed to them by path. Computed once per wrapper object.
        """
        found = self.__dict__.get(_NESTED_RECORDERS_KEY)
        if found is None:
            found = []
            pending = [(name, child) for name, child in self.children.items()]
            while pending:
                path, child = pending.pop()
                if isinstance(child, list | tuple):
                    pending.extend((f"{path}/{i}", entry) for i, entry in enumerate(child))
                elif isinstance(child, dict):
                    pending.extend((f"{path}/{key}", entry) for key, entry in child.items())
                elif isinstance(child, NNXWrapper):
                    if isinstance(child.sown, variables.StateVariable):
                        found.append((path, child.sown))
                    pending.extend(
                        (f"{path}/{name}", entry) for name, entry in child.children.items()
                    )
            self.__dict__[_NESTED_RECORDERS_KEY] = found
        return found

    def _module(self) -> _BuiltModule:
        """The NNX module for this call, built or reused (see ``_BuiltModule``)."""
        from pz_flax.interop import convert  # convert builds wrappers; import at call time

        built = self.__dict__.get(_BUILT_MODULE_KEY)
        if built is not None and built.is_current(self):
            return built
        bindings: list[tuple[Any, Any, tuple[Hashable, ...]]] = []
        module = convert.rebuild_wrapped_module(self, bindings)
        pairs = [(pz_variable, variable_at(owner, path)) for pz_variable, owner, path in bindings]
        built = _BuiltModule(self, module, pairs)
        if _is_concrete(pairs):
            # Only eager calls reuse a module: a traced one holds tracers of one trace.
            self.__dict__[_BUILT_MODULE_KEY] = built
        return built

    def treescope_color(self) -> str:
        return "#e8c7b3"


# An eager call keeps the module it built, and the kept input axes it found, in the wrapper's
# instance dictionary (beside its fields, like a struct's flatten metadata): the cache then
# lives exactly as long as the wrapper, pins no arrays of wrappers that are gone, and a new
# wrapper (``.replace``, a selector edit, unflattening under a transform) starts without one.
_BUILT_MODULE_KEY = "__pz_flax_built_module__"
_KEPT_AXES_KEY = "__pz_flax_kept_input_axes__"
_NESTED_RECORDERS_KEY = "__pz_flax_nested_sown_recorders__"


class _BuiltModule:
    """The NNX module a wrapper built, reusable while nothing it was built from has changed.

    A wrapper is frozen, but its ``variables`` and ``children`` dictionaries could still be
    given other entries, and its variables other arrays (training, ``set_value``); the module
    is reused only if the same entries hold the same arrays.

    Attributes:
        module: The NNX module.
        pairs: ``(pz variable, NNX variable)`` of each variable bound into it, for write-back.
        entries: The wrapper's variables, children and pz attributes it was built from.
        sowing_modules: The outermost submodules whose code may sow (see ``may_sow``): a
            call that records nothing captures sows in these subtrees only, and none at all
            when the list is empty.
    """

    def __init__(self, wrapper: NNXWrapper, module: nnx.Module, pairs: list):
        self.module = module
        self.pairs = pairs
        self.entries = _entries_of(wrapper)
        self.sowing_modules = outermost_sowing_modules(module)

    def is_current(self, wrapper: NNXWrapper) -> bool:
        entries = _entries_of(wrapper)
        return (
            len(entries) == len(self.entries)
            and all(now is then for now, then in zip(entries, self.entries))
            and _pairs_current(self.pairs)
        )


def _entries_of(wrapper: NNXWrapper) -> tuple[Any, ...]:
    return (
        *wrapper.variables.values(),
        *wrapper.children.values(),
        *wrapper.pz_attributes.values(),
    )


def _is_concrete(pairs: list) -> bool:
    return not any(
        isinstance(leaf, jax.core.Tracer)
        for pz_variable, _ in pairs
        for leaf in jax.tree_util.tree_leaves(raw_value_of(pz_variable))
    )


def _pairs_current(pairs: list) -> bool:
    """Whether every NNX variable of a built module still holds its pz_flax variable's array."""
    for pz_variable, nnx_variable in pairs:
        if not isinstance(pz_variable, variables.LabeledVariable):
            return False
        if nnx_variable.get_raw_value() is not pz_variable.get_raw_value():
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
        return _run_capturing_sown(module, probe_input, arguments, None, [])

    return jax.eval_shape(call, positional)


def _run_capturing_sown(
    module: nnx.Module,
    positional: Any,
    keyword_arguments: dict[str, Any],
    sown: variables.StateVariable | None,
    nested: list[tuple[str, variables.StateVariable]],
    sowing_modules: list[nnx.Module] | None = None,
) -> Any:
    """Calls ``module``, keeping what its code sows out of the module itself.

    The call runs under ``nnx.capture``, so ``Module.sow`` writes into a per-call collection
    rather than onto the (possibly reused) module, where values would pile up call after call.
    The ``nnx.Intermediate`` values collected are stored by ``/``-joined NNX path: all of them
    in ``sown`` (paths below ``module``), and those below each ``nested`` wrapper's path in its
    variable (paths below that wrapper's module). Without recorders they are dropped, and
    then, if ``sowing_modules`` is given, only those subtrees are prepared for sowing (the
    graph walks of ``nnx.capture`` cost as much as a small model's computation): none when
    the list is empty.
    """
    if sown is None and not nested:
        if sowing_modules is None:
            return compat_nnx.capture(module)(positional, **keyword_arguments)
        if not sowing_modules:
            return module(positional, **keyword_arguments)
        # ``nnx.capture`` prepares the modules below its function's first argument.
        return compat_nnx.capture(lambda _prepared, inputs: module(inputs, **keyword_arguments))(
            sowing_modules, positional
        )
    output, collected = compat_nnx.capture(module, nnx.Intermediate)(
        positional, **keyword_arguments
    )
    values = {
        "/".join(str(part) for part in path): value.get_value()
        for path, value in nnx.to_flat_state(collected)
    }
    if sown is not None:
        sown.value = values
    for prefix, recorder in nested:
        start = len(prefix) + 1
        recorder.value = {
            key[start:]: value for key, value in values.items() if key.startswith(prefix + "/")
        }
    return output


def capture_sown(model: Any, label_prefix: str = "sown") -> Any:
    """A copy of ``model`` whose wrapped NNX modules record the values their code sows.

    NNX code keeps intermediates with ``self.sow(nnx.Intermediate, name, value)`` (attention
    weights, say). A wrapper runs that code on a fresh collection each call, so by default
    sown values are dropped, and they never pile up across calls. In the copy, every
    ``NNXWrapper`` that pz_flax code calls (the outermost ones: wrappers among another
    wrapper's ``children`` run as that wrapper's NNX code) gets a ``sown`` state variable. After
    each call it holds ``{NNX path of the sowing module / name: value}`` for that call only,
    the value being what NNX stores (a tuple of the sown arrays, positional, with one entry per
    ``sow`` of that name during the call), and paths relative to the wrapper's module::

        recording = pz_flax.interop.capture_sown(layer)
        recording(tokens, positions=positions, attention_mask=mask)
        weights = recording.sown.value["blocks/0/attn/attention_weights"][0]

    The variables are ordinary ``StateVariable`` objects: ``pz.unbind_state_vars`` lists them
    and ``pz.variable_jit`` carries their values out of a jitted call, as with penzai's
    ``SaveIntermediate``. To record in one nested wrapper only, call
    ``wrapper.capturing_sown(label)`` on it (through a selection); it records
    when called by pz_flax code or run as NNX code among wrappers' ``children``.

    Args:
        model: A pz_flax model (or any tree) containing ``NNXWrapper`` layers.
        label_prefix: Start of each new variable's label; the wrapper's key path in
            ``model`` follows it.

    Returns:
        The copy. ``model`` is unchanged.
    """
    return (
        selectors.select(model)
        .at_instances_of(NNXWrapper)
        .apply(
            lambda keypath, wrapper: wrapper.capturing_sown(
                label_prefix + jax.tree_util.keystr(keypath)
            ),
            with_keypath=True,
        )
    )


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
    probe_cache: dict[Any, Any] | None = None,
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
        probe_cache: Where to keep what probing found, by input dtype and named shape, so
            that it runs once per input shape rather than on every call (None: no cache).

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
                input_key = (argument.dtype, tuple(argument.named_shape.items()))
                if probe_cache is not None and input_key in probe_cache:
                    kept_axes = probe_cache[input_key]
                else:
                    kept_axes = _kept_input_axes(argument, leading, output, probe)
                    if probe_cache is not None:
                        probe_cache[input_key] = kept_axes
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
    _write_back(
        [(pz_variable, variable_at(module, path)) for pz_variable, module, path in bindings]
    )


def _write_back(pairs: list[tuple[Any, nnx.Variable]]) -> None:
    """``write_back_changed_variables`` on ``(pz variable, NNX variable)`` pairs."""
    for pz_variable, nnx_variable in pairs:
        # Raw values are compared by identity: ``get_value`` costs tens of microseconds per
        # variable (it checks for array references), ``get_raw_value`` almost nothing, and a
        # variable the module did not assign still holds the very array it was built with.
        new_raw = nnx_variable.get_raw_value()
        frozen = isinstance(pz_variable, variables.AbstractVariableValue)
        if new_raw is (raw_value_of(pz_variable) if frozen else pz_variable.get_raw_value()):
            continue
        new_raw = nnx_variable.get_value()
        if new_raw is raw_value_of(pz_variable):
            continue
        if frozen:
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


#### Which NNX modules can sow ####

# ``Module`` methods through which NNX code keeps values for ``nnx.capture`` to collect.
_SOWING_METHODS = frozenset({"sow", "perturb"})
# Packages whose functions know nothing of NNX modules, so never sow into one: not read.
_NEVER_SOWING_PACKAGES = frozenset({"jax", "jaxlib", "numpy", "builtins", "functools", "math"})
# Functions of this package take a module to sow into (``dot_product_attention(module=)``), so
# they are read from any class that calls them.
_STOCK_LAYER_HELPERS = "flax.nnx.nn"


# Stock layers whose code sows only when a call argument asks it to, by that argument's name:
# such a layer may sow only in a model whose code mentions the name (or whose call passes it).
_SOW_SWITCHES: dict[type[Any], str] = {nnx.MultiHeadAttention: "sow_weights"}
SOW_SWITCH_NAMES = frozenset(_SOW_SWITCHES.values())


def may_sow(module: nnx.Module, switches_on: frozenset[str] = SOW_SWITCH_NAMES) -> bool:
    """Whether the code of ``module`` may sow or perturb values (read from the code, cached).

    A conservative reading of the bytecode: the module may sow if a method of its class (or
    of a base class below ``nnx.Module``), a function nested in one, a function one of them
    refers to by a global name (in the class's own package, or a stock NNX layer helper), or a
    function held by the module mentions ``sow`` or ``perturb``. A stock layer that sows only
    when asked by a call argument (``MultiHeadAttention``'s ``sow_weights``) may sow if that
    argument's name is in ``switches_on``. Code that reaches ``Module.sow`` in no such way
    (through ``getattr`` with a computed name, or passing ``sow_weights`` positionally) is not
    seen: such a module called while nothing records would store its sown values on itself,
    as NNX does outside ``nnx.capture``.

    Args:
        module: The NNX module (its submodules are not looked at).
        switches_on: Names of the sowing switches that the calling code may set.
    """
    switch = _SOW_SWITCHES.get(type(module))
    if switch is not None:
        return switch in switches_on
    if _class_may_sow(type(module)):
        return True
    return any(
        _callable_may_sow(value)
        for value in vars(module).values()
        if isinstance(value, types.FunctionType | functools.partial)
    )


def outermost_sowing_modules(module: nnx.Module) -> list[nnx.Module]:
    """The submodules of ``module`` (itself included) that may sow, outermost ones only.

    A sowing switch counts as set if the code of any class in the tree mentions its name.
    """
    modules = dict(nnx.iter_modules(module))
    classes = {type(sub) for sub in modules.values()} - _SOW_SWITCHES.keys()
    switches_on = frozenset(
        name for name in SOW_SWITCH_NAMES if any(_class_mentions(cls, name) for cls in classes)
    )
    sowing = {path for path, sub in modules.items() if may_sow(sub, switches_on)}
    return [
        modules[path]
        for path in sowing
        if not any(path[:length] in sowing for length in range(len(path)))
    ]


def _class_functions(cls: type[Any]) -> list[types.FunctionType]:
    """The functions defined by ``cls`` and its bases below ``nnx.Module``."""
    found = []
    for klass in cls.__mro__:
        if klass in nnx.Module.__mro__:
            continue
        for member in vars(klass).values():
            if isinstance(member, staticmethod | classmethod):
                member = member.__func__
            candidates = (
                [member.fget, member.fset, member.fdel]
                if isinstance(member, property)
                else [member]
            )
            found.extend(f for f in map(_as_function, candidates) if f is not None)
    return found


@functools.cache
def _class_may_sow(cls: type[Any]) -> bool:
    package = cls.__module__.split(".")[0]
    return any(_code_may_sow(function, package) for function in _class_functions(cls))


@functools.cache
def _class_mentions(cls: type[Any], name: str) -> bool:
    """Whether the code of ``cls`` uses ``name`` as a name or a keyword (or string) constant."""

    def mentions(code: types.CodeType) -> bool:
        if name in code.co_names or name in code.co_varnames:
            return True
        for const in code.co_consts:
            if isinstance(const, types.CodeType) and mentions(const):
                return True
            if const == name or (isinstance(const, tuple) and name in const):
                return True
        return False

    return any(mentions(function.__code__) for function in _class_functions(cls))


def _callable_may_sow(value: Any) -> bool:
    function = _as_function(value)
    if function is None:
        return False
    package = (function.__module__ or "").split(".")[0]
    return package not in _NEVER_SOWING_PACKAGES and _code_may_sow(function, package)


def _as_function(value: Any) -> types.FunctionType | None:
    """The Python function behind ``value`` (partials and ``functools.wraps`` undone)."""
    for _ in range(16):  # wrapping chains are short; a cycle is not followed forever
        if isinstance(value, functools.partial):
            value = value.func
        elif not isinstance(value, types.FunctionType) and hasattr(value, "__wrapped__"):
            value = value.__wrapped__
        else:
            break
    return value if isinstance(value, types.FunctionType) else None


def _code_may_sow(function: types.FunctionType, package: str) -> bool:
    key = (function, package)
    if key not in _FUNCTION_MAY_SOW:
        _FUNCTION_MAY_SOW[key] = _function_may_sow(function, package, set())
    return _FUNCTION_MAY_SOW[key]


# Per function and package read from: whether the function may sow. Only whole readings are
# kept (one cut short by recursion would not be a complete answer); the functions are those
# of classes and modules, which live as long as the program, and the table grows only with the
# code read.
_FUNCTION_MAY_SOW: dict[tuple[types.FunctionType, str], bool] = {}


def _function_may_sow(function: types.FunctionType, package: str, seen: set[Any]) -> bool:
    """Whether ``function``, or what it reaches (see ``may_sow``), mentions a sowing method."""
    if function in seen:  # already being read further up
        return False
    seen.add(function)
    # A decorated method's own code is the decorator's; the method is in its closure.
    reached = [getattr(function, "__wrapped__", None)]
    reached += [cell.cell_contents for cell in function.__closure__ or () if _filled(cell)]
    pending = [function.__code__]
    while pending:
        code = pending.pop()
        if _SOWING_METHODS.intersection(code.co_names):
            return True
        pending.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
        reached += _functions_named(code.co_names, function.__globals__)
    for value in reached:
        other = _as_function(value)
        if other is None:
            continue
        module_name = other.__module__ or ""
        followed = module_name.split(".")[0] == package or module_name.startswith(
            _STOCK_LAYER_HELPERS
        )
        if followed and _function_may_sow(other, package, seen):
            return True
    return False


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an empty cell raises on reading)
    except ValueError:
        return False
    return True


def _functions_named(names: tuple[str, ...], namespace: dict[str, Any]) -> list[Any]:
    """What global names in ``names`` may refer to, directly or as module members."""
    found = []
    for name in names:
        value = namespace.get(name)
        if isinstance(value, types.ModuleType):
            # The module's own table: a module's ``__getattr__`` may warn or import.
            found.extend(vars(value).get(member) for member in names)
        else:
            found.append(value)
    return found


#### Axis names for the variables of wrapped modules ####

WrappedAxisNamer = Callable[[Any, str, nnx.Variable, naming_lib.NNXNaming], tuple[str, ...] | None]

# Namers by the NNX class whose variables they name (use ``.scoped`` for a temporary one).
wrapped_axis_namer_registry: registry_lib.Registry[type[Any], WrappedAxisNamer] = (
    registry_lib.Registry("wrapped-module axis namers")
)


def register_wrapped_axis_names(
    nnx_type: type[Any], namer: WrappedAxisNamer, *, replace: bool = False
) -> None:
    """Gives the variables of a wrapped NNX class axis names.

    Wrapped modules keep their own code, so their variables may stay positional; a namer makes
    them named arrays on the pz_flax side (the raw array is unchanged).

    Args:
        nnx_type: The NNX class (matched exactly).
        namer: ``namer(module, attribute_name, variable, naming)`` returning one name per axis
            of the variable's value, or None to leave it positional.
        replace: Allow replacing the namer already registered for ``nnx_type``.

    Raises:
        TypeError: If ``nnx_type`` is not a class or ``namer`` is not callable.
        ValueError: If ``nnx_type`` has a namer already and ``replace`` is False.
    """
    if not isinstance(nnx_type, type) or not callable(namer):
        raise TypeError(
            "register_wrapped_axis_names expects an NNX class and a callable, got"
            f" {nnx_type!r} and {namer!r}."
        )
    wrapped_axis_namer_registry.register(nnx_type, namer, replace=replace)


def unregister_wrapped_axis_names(nnx_type: type[Any]) -> WrappedAxisNamer:
    """Removes the namer of a wrapped NNX class; returns it.

    Raises:
        KeyError: If ``nnx_type`` has no namer.
    """
    return wrapped_axis_namer_registry.unregister(nnx_type)


def wrapped_axis_names(
    module: Any, key: str, variable: nnx.Variable, naming: naming_lib.NNXNaming
) -> tuple[str, ...] | None:
    """Axis names for a wrapped module's variable, from the registered namer (if any)."""
    namer = wrapped_axis_namer_registry.get(type(module))
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
            x: A positional array (JAX or NumPy, as NNX layers take both), or a value the
                layer accepts directly.
            **side_inputs: Passed to the layer as side inputs.

        Returns:
            The layer's output, positional if ``x`` was.
        """
        if isinstance(x, np.ndarray):
            x = jnp.asarray(x)
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
