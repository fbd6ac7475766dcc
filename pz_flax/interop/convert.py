"""``from_nnx`` and ``to_nnx``: converting models between Flax NNX and pz_flax.

``from_nnx`` walks an NNX module tree. A module whose class has a registered mapping becomes
the mapping's pz_flax layer, tagged ``FromNNX``; any other module becomes an ``NNXWrapper``
that runs the module's own code, with its variables as labelled pz_flax variables and its
child modules converted recursively; ``nnx.List``/``nnx.Dict`` become lists/dicts; functions
become ``Elementwise`` layers (activations) or ``WrappedCallable`` layers. No array is copied:
pz_flax variables hold the NNX variables' own arrays.

Sharing survives both directions. A module or variable reachable under several attributes
(weight tying) is converted once per call, and every occurrence gets that one pz_flax layer or
``Parameter`` (pz_flax variables are shared by identity, as in penzai); ``to_nnx`` likewise
builds one NNX module or variable per pz_flax layer or variable object. So
``to_nnx(from_nnx(m))`` lists a tied weight once in ``nnx.state``, exactly as ``m`` does.

``to_nnx`` goes back: ``FromNNX`` layers through their mapping, wrappers by rebuilding the
module, and natively built pz_flax layers either into a ``PzModule`` adapter or, with
``native=True``, into NNX's own layer classes.
"""

from __future__ import annotations

from collections.abc import Hashable
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from pz_flax.core import named_axes
from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.interop import naming as naming_lib
from pz_flax.interop import registry
from pz_flax.interop import wrappers
from pz_flax.nn import basic_ops
from pz_flax.nn import layer as layer_base


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__module__}.{type(value).__qualname__} ({text})"


def from_nnx(
    module: Any,
    /,
    *,
    overrides: Mapping[Any, Mapping[str, Any]] | None = None,
    strict: bool = False,
    **naming: Any,
) -> Any:
    """Converts a Flax NNX module (or function) into a pz_flax layer.

    Weights are not copied: the result's ``Parameter``/``StateVariable`` objects hold the
    module's own arrays, labelled with their NNX state paths and given axis names by the
    naming convention (see ``pz_flax.interop.naming``). A module or variable that ``module``
    reaches under several paths (tied weights) is converted once, at the path ``nnx.state``
    lists it under (which is also where path overrides apply), and the result shares that one
    layer or ``Parameter`` wherever the NNX model shares it. A shared variable whose users
    would name its axes differently keeps the names of its first user, and the later users
    are wrapped (see ``NNXWrapper``), since one variable has one set of axis names. Under the
    default naming,
    ``from_nnx(m)(pz.nx.wrap(x).tag("batch", "features")).unwrap("batch", "features")``
    equals ``m(x)``.

    Args:
        module: An ``nnx.Module`` (``nnx.List``/``nnx.Dict`` become a list/dict of converted
            entries) or a plain function such as ``nnx.relu``.
        overrides: Naming overrides for some modules: ``{nnx class or "path/to/module":
            {option: value}}``; path overrides win over class overrides.
        strict: Raise instead of wrapping a module whose class has a mapping that cannot
            express its configuration exactly.
        **naming: Naming options for the whole conversion (fields of ``NNXNaming``, e.g.
            ``features="embedding"``).

    Returns:
        The pz_flax layer (or container).

    Raises:
        TypeError: If ``module`` is not an NNX module or a callable, or a naming option is
            unknown.
        ValueError: With ``strict=True``, if a mapped module cannot be converted exactly.
    """
    base_naming = naming_lib.DEFAULT_NAMING.replace(**naming)
    checked_overrides = naming_lib.check_overrides(overrides)
    if isinstance(module, struct.Struct):
        raise TypeError(
            f"from_nnx expects a Flax NNX module or a function, but got the pz_flax object"
            f" {type(module).__qualname__}, which needs no conversion."
        )
    if not isinstance(module, nnx.Module) and not _is_plain_callable(module):
        raise TypeError(
            "from_nnx expects a Flax NNX module (nnx.Module) or a function, got"
            f" {_describe(module)}."
        )

    memo = (
        registry.IdentityMemo.for_nnx_root(module)
        if isinstance(module, nnx.Module)
        else registry.IdentityMemo()
    )

    def convert(obj: Any, path: tuple[Hashable, ...]) -> Any:
        # Modules are converted once; a shared one at the path nnx.state lists it under.
        # Functions hold no state, so each occurrence is converted with its own naming.
        is_module = isinstance(obj, nnx.Module)
        if is_module and obj in memo:
            return memo.get(obj)
        if is_module:
            path = memo.first_paths.get(id(obj), path)
        converted = _convert_from_nnx(
            obj, path, base_naming, checked_overrides, strict, convert, memo
        )
        if is_module:
            memo.put(obj, converted)
        return converted

    return convert(module, ())


def _is_plain_callable(value: Any) -> bool:
    return (
        callable(value)
        and not isinstance(value, type)
        and not isinstance(value, nnx.Variable | struct.Struct)
    )


def _convert_from_nnx(obj, path, base_naming, overrides, strict, convert, memo):
    """Converts one object found in an NNX tree; ``convert`` recurses into children."""
    if isinstance(obj, nnx.Module):
        mapping = registry.get_mapping(type(obj))
        naming = naming_lib.resolve_naming(
            base_naming, overrides, type(obj), path, mapping.naming if mapping else None
        )
        context = registry.FromNNXContext(
            naming=naming, path=path, convert_child=convert, memo=memo
        )
        if mapping is not None:
            mark = memo.mark()
            try:
                return _apply_mapping(mapping, obj, context)
            except registry.MappingNotApplicable as exc:
                # The module is wrapped instead: what the attempt converted must not be reused.
                memo.rollback(mark)
                if strict:
                    where = "/".join(map(str, path)) or "<root>"
                    raise ValueError(
                        f"Cannot convert {type(obj).__qualname__} at {where} with"
                        f" {type(mapping).__name__}: {exc}"
                    ) from exc
        return wrap_module(obj, context)
    naming = naming_lib.resolve_naming(base_naming, overrides, None, path)
    if _is_plain_callable(obj):
        return _convert_function(obj, naming)
    where = "/".join(map(str, path)) or "<root>"
    raise TypeError(f"from_nnx cannot convert {_describe(obj)} found at {where}.")


def _apply_mapping(mapping: registry.LayerMapping, module: Any, context) -> Any:
    converted = mapping.to_pz(module, context)
    config = dict(mapping.config_for(module))
    if context.naming != naming_lib.DEFAULT_NAMING:
        # The reverse conversion must read axis names the way they were written.
        config["naming"] = context.naming
    if mapping.verify_round_trip:
        reverse_context = _reverse_context(context.naming)
        rebuilt = mapping.to_nnx(converted, reverse_context, config)
        if rebuilt is None:
            raise registry.MappingNotApplicable(
                f"{type(mapping).__name__}.to_nnx did not accept its own to_pz result."
            )
        if nnx.graphdef(rebuilt) != nnx.graphdef(module):
            raise registry.MappingNotApplicable(
                "the module has settings its pz_flax form does not capture (rebuilding it from"
                " the pz_flax form gives a different graph definition)."
            )
    if not mapping.callable_result:
        return converted
    return wrappers.FromNNX(layer=converted, nnx_type=type(module), nnx_config=config)


def _convert_function(fn: Any, naming: naming_lib.NNXNaming) -> Any:
    if registry.is_elementwise_function(fn):
        return basic_ops.Elementwise(fn)
    if fn is jax.nn.softmax:
        return basic_ops.Softmax(naming.features)
    return wrappers.WrappedCallable(
        fn=fn,
        input_axes=naming.input_axes or (naming.features,),
        output_axes=naming.output_axes,
        feature_axis=naming.features,
    )


def wrap_module(module: nnx.Module, context: registry.FromNNXContext) -> wrappers.NNXWrapper:
    """Wraps an NNX module so that it runs its own code inside a pz_flax model.

    Child modules (attributes holding ``nnx.Module`` objects, including ``nnx.List`` and
    ``nnx.Dict``) are converted with ``from_nnx`` and put back when the module is rebuilt;
    attributes that already hold pz_flax objects are kept as they are; everything else stays
    in the module's graph definition, and its variables become pz_flax variables.

    Args:
        module: The module.
        context: Naming and path of the module.

    Returns:
        The wrapper layer.
    """
    children = {}
    pz_attributes = {}
    for name, value in vars(module).items():
        if name.startswith("_pytree__"):
            continue
        if isinstance(value, nnx.Module):
            children[name] = context.convert(value, name)
        elif wrappers.is_pz_object(value):
            pz_attributes[name] = value
    graphdef, state = nnx.split(module)
    shell = nnx.merge(graphdef, state, copy=True)
    for name in (*children, *pz_attributes):
        delattr(shell, name)
    shell_graphdef, shell_state = nnx.split(shell)
    wrapped_variables = {}
    variable_paths = {}
    for path, nnx_variable in nnx.to_flat_state(shell_state):
        key = "/".join(str(part) for part in path)
        original = wrappers.variable_at(module, path)
        variable_paths[key] = tuple(path)
        shared = context.memo.get(original)
        if shared is not None:
            # A tied variable converted elsewhere: the wrapper runs on its raw array, whatever
            # names it was given there.
            wrapped_variables[key] = shared
            continue
        names = (
            wrappers.wrapped_axis_names(module, path[0], original, context.naming)
            if len(path) == 1
            else None
        )
        value = original.get_value()
        if names is not None:
            value = named_axes.wrap(value).tag(*names)
        label = context.variable_label(original, *path)
        metadata = registry.user_metadata(nnx_variable)
        if isinstance(nnx_variable, nnx.Param):
            wrapped_variables[key] = variables.Parameter(
                value=value, label=label, metadata=metadata
            )
        else:
            wrapped_variables[key] = variables.StateVariable(value, label=label, metadata=metadata)
        context.memo.put(original, wrapped_variables[key])
    naming = context.naming
    return wrappers.NNXWrapper(
        variables=wrapped_variables,
        children=children,
        pz_attributes=pz_attributes,
        module_type=type(module),
        shell=wrappers.ModuleShell(shell_graphdef),
        variable_paths=variable_paths,
        input_axes=naming.input_axes or (naming.features,),
        output_axes=naming.output_axes,
        feature_axis=naming.features,
    )


def rebuild_wrapped_module(
    wrapper: wrappers.NNXWrapper,
    bindings: list | None = None,
    native: bool = False,
    naming: naming_lib.NNXNaming = naming_lib.DEFAULT_NAMING,
) -> nnx.Module:
    """Rebuilds the NNX module an ``NNXWrapper`` stands for, around its current arrays.

    Args:
        wrapper: The wrapper.
        bindings: If given, receives ``(pz variable, module, path)`` for each variable put
            into the rebuilt module tree, for writing state changes back.
        native: Convert children to native NNX layers only (see ``to_nnx``).
        naming: Naming convention for natively built children.

    Returns:
        A module of the wrapped class, whose variables hold the wrapper's arrays.
    """
    context = _reverse_context(naming, native)
    context.bindings = bindings
    return _rebuild(wrapper, context)


def _rebuild(wrapper: wrappers.NNXWrapper, context: registry.ToNNXContext) -> nnx.Module:
    entries = [
        (wrapper.variable_paths[key], variable, wrappers.raw_value_of(variable))
        for key, variable in wrapper.variables.items()
    ]
    graphdef = wrapper.shell.graphdef
    module = nnx.merge(graphdef, nnx.from_flat_state([(path, raw) for path, _, raw in entries]))
    tied = [
        context.shared_variable(variable, raw, type(wrappers.variable_at(module, path)))
        for path, variable, raw in entries
    ]
    if any(shared is not None for shared in tied):
        # Some variables were already built in this conversion (tied weights). merge keeps the
        # NNX variable objects it is given, so passing those makes the module share them.
        flat = [
            (path, raw if shared is None else shared)
            for (path, _, raw), shared in zip(entries, tied)
        ]
        module = nnx.merge(graphdef, nnx.from_flat_state(flat))
    for path, variable, raw in entries:
        context.remember_variable(variable, raw, wrappers.variable_at(module, path))
    if context.bindings is not None:
        for key, variable in wrapper.variables.items():
            context.bindings.append((variable, module, wrapper.variable_paths[key]))
    for name, child in wrapper.children.items():
        setattr(module, name, context.convert(child))
    for name, value in wrapper.pz_attributes.items():
        setattr(module, name, value)
    return module


def _reverse_context(naming: naming_lib.NNXNaming, native: bool = False) -> registry.ToNNXContext:
    """A ``to_nnx`` context whose children are converted by the ``to_nnx`` engine."""
    context = registry.ToNNXContext(naming=naming, native=native, convert_child=None)
    context.convert_child = lambda layer: _to_nnx(layer, context)
    return context


def to_nnx(
    layer: Any,
    /,
    *,
    native: bool = False,
    input_names: tuple[str, ...] | None = None,
    **naming: Any,
) -> Any:
    """Converts a pz_flax layer into a Flax NNX module.

    * A layer made by ``from_nnx`` comes back as an object of the original NNX class whose
      ``nnx.state`` has the same paths and the same arrays (edits made on the pz_flax side
      are carried over).
    * A natively built pz_flax layer becomes a ``PzModule``: an ``nnx.Module`` called like the
      layer (with positional arrays named by the naming convention), exposing the layer's
      parameters to ``nnx.state(..., nnx.Param)`` and ``nnx.Optimizer``.
    * With ``native=True``, every sublayer must have a native NNX counterpart (``Affine`` ->
      ``nnx.Linear``, ``LayerNorm`` -> ``nnx.LayerNorm``, ``Sequential`` -> ``nnx.Sequential``,
      ``Elementwise(relu)`` -> ``relu``, ...), and the result is built from NNX's own classes.

    Args:
        layer: A pz_flax layer, or a list/dict of them (giving ``nnx.List``/``nnx.Dict``).
        native: Produce NNX's own layer classes only, raising if some sublayer has none.
        input_names: For a ``PzModule`` result: names of the positional input's axes.
        **naming: Naming options (fields of ``NNXNaming``) assumed for natively built layers.

    Returns:
        The NNX module (or ``nnx.List``/``nnx.Dict``).

    Raises:
        TypeError: If ``layer`` is not a pz_flax layer or container of layers.
        ValueError: With ``native=True``, if a sublayer has no NNX counterpart.
    """
    naming_obj = naming_lib.DEFAULT_NAMING.replace(**naming)
    if isinstance(layer, nnx.Module):
        raise TypeError(
            f"to_nnx expects a pz_flax layer, but got the NNX module {type(layer).__qualname__},"
            " which needs no conversion."
        )
    if not (isinstance(layer, list | tuple | dict) or _is_pz_layer(layer)):
        raise TypeError(f"to_nnx expects a pz_flax layer, got {_describe(layer)}.")

    context = _reverse_context(naming_obj, native)
    if not native and not isinstance(
        layer,
        wrappers.FromNNX | wrappers.NNXWrapper | wrappers.WrappedCallable | list | tuple | dict,
    ):
        return wrappers.PzModule(layer, input_names=input_names, naming=naming_obj)
    result = _to_nnx(layer, context)
    if not isinstance(result, nnx.Module):
        # A bare function (e.g. an activation) is still returned as a module.
        result = nnx.Sequential(result)
    return result


def _is_pz_layer(value: Any) -> bool:
    return isinstance(value, layer_base.Layer) or (
        isinstance(value, struct.Struct) and callable(value)
    )


def _to_nnx(layer: Any, context: registry.ToNNXContext) -> Any:
    """Converts one pz_flax object to its NNX form, once per object (shared stays shared)."""
    if layer in context.memo:
        return context.memo.get(layer)
    converted = _convert_to_nnx(layer, context)
    context.memo.put(layer, converted)
    return converted


def _try_mapping(
    mapping: registry.LayerMapping,
    layer: Any,
    context: registry.ToNNXContext,
    config: Mapping[str, Any],
) -> Any:
    """``mapping.to_nnx``, forgetting what it built if it declines the layer."""
    mark = context.memo.mark()
    module = mapping.to_nnx(layer, context, config)
    if module is None:
        context.memo.rollback(mark)
    return module


def _convert_to_nnx(layer: Any, context: registry.ToNNXContext) -> Any:
    """Converts one pz_flax object to its NNX form (module, function or container)."""
    if isinstance(layer, wrappers.FromNNX):
        mapping = registry.get_mapping(layer.nnx_type)
        if mapping is not None:
            module = _try_mapping(mapping, layer.layer, context, layer.nnx_config)
            if module is not None:
                return module
        if context.native:
            return _to_native(layer.layer, context)
        return wrappers.PzModule(layer, naming=context.naming)
    if isinstance(layer, wrappers.NNXWrapper):
        return _rebuild(layer, context)
    if isinstance(layer, wrappers.WrappedCallable):
        return layer.fn
    if isinstance(layer, list | tuple):
        return nnx.List([_to_nnx(item, context) for item in layer])
    if isinstance(layer, dict):
        return nnx.Dict({key: _to_nnx(item, context) for key, item in layer.items()})
    function = _as_function(layer, context.naming)
    if function is not None:
        return function
    if context.native:
        return _to_native(layer, context)
    if _is_pz_layer(layer):
        return wrappers.PzModule(layer, naming=context.naming)
    raise TypeError(f"to_nnx cannot convert {_describe(layer)}.")


def _as_function(layer: Any, naming: naming_lib.NNXNaming) -> Any:
    """The positional function a pz_flax function layer is equivalent to, if any."""
    if isinstance(layer, basic_ops.Elementwise) and registry.is_elementwise_function(layer.fn):
        return layer.fn
    if isinstance(layer, basic_ops.Softmax):
        axes = (layer.axes,) if isinstance(layer.axes, str) else tuple(layer.axes)
        if axes == (naming.features,):
            return jax.nn.softmax
    return None


def _to_native(layer: Any, context: registry.ToNNXContext) -> Any:
    for mapping in registry.mappings_for_pz_type(type(layer)):
        module = _try_mapping(mapping, layer, context, {})
        if module is not None:
            return module
    raise ValueError(
        f"to_nnx(native=True): the pz_flax layer {type(layer).__qualname__} has no native NNX"
        " counterpart (no registered mapping accepts it in this form). Use native=False to"
        f" wrap it in a PzModule instead. The layer: {_describe(layer)}"
    )
