"""The registry of NNX <-> pz_flax layer mappings: the extension point of the NNX bridge.

A mapping says how one NNX class becomes pz_flax layers and back. It converts a module to a
pz_flax layer whose parameters are the module's own arrays, given axis names by the naming
convention (``to_pz``), and turns such a layer back into a module of the NNX class
(``to_nnx``, which also accepts natively built pz_flax layers of the right shape when
``pz_types`` lists their classes). Both directions reuse the same JAX arrays: conversions never
copy weights unless a layout change forces a transpose.

``from_nnx`` looks up the mapping registered for a module's exact class. A module whose class
has no mapping, or whose configuration a mapping cannot express exactly, becomes a wrapper layer
that runs the module's own code instead; so registering a mapping changes how a module looks on
the pz_flax side, never what it computes.

Users register their own mappings with ``register_mapping`` (see ``LayerMapping`` and, for the
usual case of a layer with weights, ``ReversibleMapping``), or for the duration of a ``with``
block with ``mapping_registry.scoped``. Plain functions become ``Elementwise`` layers when they
are declared elementwise (``pz_flax.nn.basic_ops.register_elementwise_function``).
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pz_flax._compat import nnx as compat_nnx
from pz_flax.core import named_axes
from pz_flax.core import registry as registry_lib
from pz_flax.core import tree_util
from pz_flax.core import variables
from pz_flax.interop import naming as naming_lib


class MappingNotApplicable(Exception):
    """Raised by ``LayerMapping.to_pz`` when a module's configuration has no exact pz form.

    ``from_nnx`` catches it and wraps the module instead, so raising it is always safe; the
    message says why, and ``from_nnx(..., strict=True)`` surfaces it. It is the only way a
    mapping declines: any other exception escaping a mapping is a bug (in the mapping, or a
    change in Flax it did not expect), and ``from_nnx``/``to_nnx`` report it as a
    ``MappingError`` instead of quietly wrapping the module.

    A ``to_nnx`` may also raise it (or return None) to decline a layer of another shape.
    """


class MappingError(RuntimeError):
    """A mapping failed with an unexpected exception; the message names the mapping and where.

    The original exception is chained as ``__cause__``.
    """


class LayerShapeMismatch(MappingNotApplicable, ValueError):
    """A pz_flax layer does not have the shape (axis names, array shapes) a mapping rebuilds.

    Raised by ``ToNNXContext.array`` and ``ToNNXContext.construct``, so that a mapping's
    ``to_nnx`` declines an edited layer the NNX class cannot represent.
    """


class AxisCountMismatch(MappingNotApplicable, ValueError):
    """A variable has a different number of axes than the names its mapping gives it.

    The usual cause is a stack of layers (``nnx.vmap``-created modules, whose variables have an
    extra leading axis); ``from_nnx`` then converts the stack as a whole (see ``from_nnx``).
    """


class IdentityMemo:
    """The converted form of each object met during one conversion, by the object's identity.

    Weight tying in NNX is sharing: one module or variable object reachable under several
    attributes, listed once by ``nnx.state``. pz_flax variables are shared the same way (by
    identity), so one conversion converts each shared object once and hands out that single
    result wherever the object occurs again; this memo is where the results are kept. It holds
    a reference to every key object, so that ``id()`` values stay unique while it lives.

    A conversion attempt that is abandoned (a mapping that does not apply) must not leave
    results behind, since the object will be converted differently: ``mark``/``rollback``
    undo everything recorded since a mark.

    Attributes:
        first_paths: For objects reachable under several paths of the converted NNX root, the
            path ``nnx.state`` lists them under (the first in NNX's traversal order), by
            ``id()``; shared objects are converted (and their variables labelled) at this path.
    """

    def __init__(self, first_paths: Mapping[int, tuple[Hashable, ...]] | None = None):
        """Creates an empty memo.

        Args:
            first_paths: See the class attribute; empty if None.
        """
        self.first_paths = dict(first_paths or {})
        self._entries: dict[int, tuple[Any, Any]] = {}
        self._order: list[int] = []

    def get(self, obj: Any, default: Any = None) -> Any:
        """The converted form recorded for ``obj``, or ``default``."""
        entry = self._entries.get(id(obj))
        return default if entry is None else entry[1]

    def __contains__(self, obj: Any) -> bool:
        return id(obj) in self._entries

    def put(self, obj: Any, converted: Any) -> None:
        """Records the converted form of ``obj``."""
        if id(obj) not in self._entries:
            self._order.append(id(obj))
        self._entries[id(obj)] = (obj, converted)

    def mark(self) -> int:
        """A point to ``rollback`` to."""
        return len(self._order)

    def rollback(self, mark: int) -> None:
        """Forgets everything recorded since ``mark``."""
        for key in self._order[mark:]:
            del self._entries[key]
        del self._order[mark:]


class LayerMapping(abc.ABC):
    """How one NNX class converts to pz_flax layers and back.

    Subclass it, set ``nnx_type`` (and ``pz_types`` if ``to_nnx`` accepts natively built pz_flax
    layers), implement ``to_pz`` and ``to_nnx``, and call ``register_mapping(MyMapping())``.

    ``to_pz`` must build a layer that computes exactly what the module computes under the
    naming convention, using ``context.parameter(...)`` for its variables so that the module's
    arrays are reused and labelled by their NNX paths. ``to_nnx`` must rebuild
    the module from such a layer, usually with ``context.construct(...)`` and
    ``context.array(...)``. After conversion, ``from_nnx`` checks that ``to_nnx`` of the new
    layer reproduces the module's graph definition (class, static attributes, variable types
    and metadata); if not, the mapping did not capture the module exactly and the module is
    wrapped instead. Set ``verify_round_trip = False`` for containers whose children are
    checked one by one.

    Attributes:
        nnx_type: The NNX class converted (matched exactly, not by subclass, since a subclass
            may override ``__call__``).
        pz_types: pz_flax layer classes that ``to_nnx`` understands when they were built
            natively (used by ``to_nnx(layer, native=True)``); matched exactly.
        naming: Naming overrides applied to modules of this class.
        verify_round_trip: Whether ``from_nnx`` compares the graph definitions.
        callable_result: Whether ``to_pz`` returns a layer (True) or a container such as a
            list (False); layers are tagged with their NNX class so ``to_nnx`` can rebuild
            exactly that class.
    """

    nnx_type: type[Any]
    pz_types: tuple[type[Any], ...] = ()
    naming: Mapping[str, Any] = {}
    verify_round_trip: bool = True
    callable_result: bool = True

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}()"

    @abc.abstractmethod
    def to_pz(self, module: Any, context: FromNNXContext) -> Any:
        """Converts ``module`` (an instance of ``nnx_type``) to pz_flax.

        Args:
            module: The NNX module.
            context: Naming, labels and recursive conversion of children.

        Returns:
            The pz_flax layer (or container, if ``callable_result`` is False).

        Raises:
            MappingNotApplicable: If the module's configuration has no exact pz form.
        """

    @abc.abstractmethod
    def to_nnx(self, layer: Any, context: ToNNXContext, config: Mapping[str, Any]) -> Any:
        """Rebuilds an NNX module from a pz_flax layer.

        Args:
            layer: A layer produced by ``to_pz`` (possibly edited), or a natively built layer
                of one of ``pz_types``.
            context: Array extraction, module construction and recursive conversion.
            config: What ``config_for`` recorded when converting the module (empty for
                natively built layers).

        Returns:
            The NNX module, or None if ``layer`` does not have the shape this mapping
            understands (then the caller falls back to a generic adapter, or raises in
            native mode).
        """

    def input_names(
        self, config: Mapping[str, Any], naming: naming_lib.NNXNaming, ndim: int
    ) -> tuple[str, ...] | None:
        """Names for the positional input of a converted module of this class.

        Used when an edited layer can no longer be rebuilt as the NNX class and is put back
        into NNX code as a ``PzModule``: the positional arrays the NNX code passes it must be
        named as the original layer named them.

        Args:
            config: What ``config_for`` recorded.
            naming: The naming convention of the conversion.
            ndim: The rank of the positional input.

        Returns:
            One name per axis, or None for the naming convention's defaults.
        """
        del config, naming, ndim
        return None

    def config_for(self, module: Any) -> dict[str, Hashable]:
        """Static settings of ``module`` that its pz form cannot express but ``to_nnx`` needs.

        Recorded on the converted layer (hashable values only) and handed back to ``to_nnx``.

        Args:
            module: The NNX module being converted.

        Returns:
            A dict of hashable settings; empty by default.
        """
        del module
        return {}


@dataclasses.dataclass
class FromNNXContext:
    """What a mapping's ``to_pz`` needs: naming, labels, and conversion of children.

    Attributes:
        naming: The naming convention for this module (after overrides).
        path: The module's NNX path from the converted root.
        convert_child: The ``from_nnx`` engine, for children: ``(obj, path) -> converted``.
        memo: The pz_flax variables (and layers) already made in this conversion, by the NNX
            object they come from, so that a shared (tied) NNX variable becomes one shared
            pz_flax variable.
    """

    naming: naming_lib.NNXNaming
    path: tuple[Hashable, ...]
    convert_child: Callable[[Any, tuple[Hashable, ...]], Any]
    memo: IdentityMemo = dataclasses.field(default_factory=IdentityMemo)

    def convert(self, child: Any, *keys: Hashable) -> Any:
        """Converts a child module (or function) found at ``keys`` below this module."""
        return self.convert_child(child, (*self.path, *keys))

    def label(self, *keys: Hashable) -> str:
        """The label of the variable at ``keys`` below this module."""
        return self.naming.label((*self.path, *keys))

    def variable_label(self, variable: nnx.Variable, *keys: Hashable) -> str:
        """The label of a variable found at ``keys`` below this module.

        A variable shared with other modules is labelled with the one path ``nnx.state`` lists
        it under, wherever it is met first.
        """
        first_path = self.memo.first_paths.get(id(variable))
        if first_path is not None:
            return self.naming.label(first_path)
        return self.label(*keys)

    def parameter(
        self, variable: nnx.Variable, key: str, axis_names: Sequence[str] | None
    ) -> variables.Parameter:
        """A pz_flax ``Parameter`` holding the same array as an NNX variable.

        An NNX variable met again in the same conversion (a tied weight) gives the
        ``Parameter`` made the first time, so the pz_flax model shares it too.

        Args:
            variable: The NNX variable (usually an ``nnx.Param``) of this module.
            key: Its attribute name in the module, for the label.
            axis_names: One name per axis of its value, or None to leave it positional.

        Returns:
            A ``Parameter`` labelled with the variable's NNX path, carrying its user metadata.

        Raises:
            ValueError: If ``axis_names`` does not have one name per axis of the value.
            MappingNotApplicable: If the variable is shared with a place that converted it
                with other axis names (or not as a ``Parameter``): one pz_flax variable has
                one set of names, so this module is wrapped instead.
        """
        label = self.variable_label(variable, key)
        raw = _checked_value(variable, axis_names, label)
        existing = self.memo.get(variable)
        if existing is not None:
            stored_names = tuple(existing.get_metadata().get("axis_names") or ())
            wanted_names = tuple(axis_names or ())
            if not isinstance(existing, variables.Parameter) or stored_names != wanted_names:
                raise MappingNotApplicable(
                    f"its variable {self.label(key)!r} is shared with {existing.label!r}, which"
                    f" was converted as a {type(existing).__name__} with axis names"
                    f" {stored_names}, not a Parameter with axis names {wanted_names}."
                )
            return existing
        parameter = pz_variable_like(
            variable, variables.Parameter, raw, label, axis_names=axis_names
        )
        self.memo.put(variable, parameter)
        return parameter


@dataclasses.dataclass
class ToNNXContext:
    """What a mapping's ``to_nnx`` needs: arrays, module construction, and children.

    Attributes:
        naming: The naming convention to assume for natively built layers.
        native: Whether every sublayer must become a native NNX module (no generic adapter).
        convert_child: The ``to_nnx`` engine, for children: ``layer -> module``.
        bindings: If not None, receives ``(pz variable, module, path)`` triples for every
            pz_flax variable put into a rebuilt module, so a caller can copy state changes
            back after running it.
        memo: The NNX modules and variables already built in this conversion, by the pz_flax
            layer or variable they come from, so that a shared pz_flax object becomes one
            shared NNX object.
    """

    naming: naming_lib.NNXNaming
    native: bool
    convert_child: Callable[[Any], Any]
    bindings: list[tuple[Any, Any, tuple[Hashable, ...]]] | None = None
    memo: IdentityMemo = dataclasses.field(default_factory=IdentityMemo)

    def convert(self, layer: Any) -> Any:
        """Converts a child pz_flax layer to its NNX form."""
        return self.convert_child(layer)

    def array(self, parameter: Any, axis_names: Sequence[str] | None) -> jax.Array:
        """The raw array of a pz_flax parameter, with its axes in the given order.

        When the parameter already stores its axes in that order (always, for layers made by
        ``from_nnx`` and not reordered since), the stored array itself is returned, so no
        buffer is copied.

        Args:
            parameter: A pz_flax variable or variable value (``Parameter``, ``ParameterValue``).
            axis_names: The NNX order of the named axes, or None for a positional value.

        Returns:
            The positional array.

        Raises:
            LayerShapeMismatch: If the parameter's axes are not exactly ``axis_names`` (a
                ``MappingNotApplicable``, so a ``to_nnx`` that lets it propagate declines
                the layer, and a ``ValueError``).
        """
        if not tree_util.is_variable_node(parameter):
            raise LayerShapeMismatch(
                f"Expected a parameter, got {type(parameter).__name__} (a constant has no NNX"
                " variable to become)."
            )
        value = parameter.value
        if axis_names is None:
            if isinstance(value, named_axes.NamedArrayBase):
                raise LayerShapeMismatch(
                    f"Expected a positional value for {_describe(parameter)}, got named axes"
                    f" {dict(value.named_shape)}."
                )
            return value
        if not isinstance(value, named_axes.NamedArrayBase):
            raise LayerShapeMismatch(
                f"Expected {_describe(parameter)} to have named axes {tuple(axis_names)}, but it"
                " is a positional array."
            )
        if value.positional_shape or set(value.named_shape) != set(axis_names):
            raise LayerShapeMismatch(
                f"Expected {_describe(parameter)} to have exactly the named axes"
                f" {tuple(axis_names)}, got named shape {dict(value.named_shape)} and positional"
                f" shape {value.positional_shape}."
            )
        if isinstance(parameter, variables.LabeledVariable):
            raw = parameter.get_value()
            stored_names = parameter.get_metadata().get("axis_names")
            if tuple(stored_names or ()) == tuple(axis_names):
                return raw
        return value.unwrap(*axis_names)

    def shared_variable(
        self, source: Any, array: jax.Array, variable_type: type[Any]
    ) -> nnx.Variable | None:
        """The NNX variable already built in this conversion for a pz_flax variable, if any.

        Tied weights are one pz_flax variable used in several layers; giving every NNX module
        built from them the same NNX variable keeps them tied. Only a variable built from the
        very same stored array (not a transposed copy) and of the requested NNX type is
        reused: an NNX variable has a single layout.

        Args:
            source: The pz_flax variable (or None).
            array: The array the new NNX variable would hold.
            variable_type: The NNX variable class the module needs at this place.

        Returns:
            The NNX variable to reuse, or None to build a new one.
        """
        if not isinstance(source, variables.LabeledVariable):
            return None
        shared = self.memo.get(source)
        if shared is None or type(shared) is not variable_type:
            return None
        if array is not source.get_value() or shared.get_value() is not array:
            return None
        return shared

    def remember_variable(self, source: Any, array: jax.Array, built: nnx.Variable) -> None:
        """Records ``built`` as the NNX form of ``source`` if it holds its stored array."""
        if (
            isinstance(source, variables.LabeledVariable)
            and array is source.get_value()
            and source not in self.memo
        ):
            self.memo.put(source, built)

    def construct(
        self,
        nnx_class: type[Any],
        *args: Any,
        variables_by_path: Mapping[str, tuple[Any, jax.Array]],
        **kwargs: Any,
    ) -> Any:
        """Builds an NNX module of ``nnx_class`` around existing arrays, without initializing.

        The constructor runs once per configuration under ``nnx.eval_shape`` (so no random
        weights are computed) and its graph definition is cached; each call then merges that
        definition with the given arrays, which become the module's variables unchanged.

        Args:
            nnx_class: The module class.
            *args: Its constructor's positional arguments.
            variables_by_path: For every variable of the module, by ``/``-joined NNX path,
                ``(source, array)``: the pz_flax variable it comes from (for metadata and
                state write-back; None if none) and its raw array.
            **kwargs: Its constructor's keyword arguments; ``rngs`` defaults to a dummy.

        Returns:
            The module.

        Raises:
            LayerShapeMismatch: If the shapes or dtypes do not match what the constructor
                makes (a ``MappingNotApplicable``: the layer has another shape, so the
                mapping declines it; also a ``ValueError``).
            ValueError: If the variable paths do not match what the constructor makes: the
                mapping itself is wrong, which ``to_nnx`` reports as a ``MappingError``.
        """
        graphdef, abstract = _abstract_module(nnx_class, args, kwargs)
        expected = {"/".join(str(part) for part in path): (path, var) for path, var in abstract}
        missing = sorted(set(expected) - set(variables_by_path))
        unexpected = sorted(set(variables_by_path) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"Cannot build {nnx_class.__name__}: it has the variables {sorted(expected)},"
                f" but got {sorted(variables_by_path)} (missing {missing}, unexpected"
                f" {unexpected})."
            )
        flat = []
        for key, (path, abstract_var) in expected.items():
            source, array = variables_by_path[key]
            if tuple(array.shape) != tuple(abstract_var.shape) or array.dtype != abstract_var.dtype:
                raise LayerShapeMismatch(
                    f"Cannot build {nnx_class.__name__}: variable {key!r} needs shape"
                    f" {tuple(abstract_var.shape)} and dtype {abstract_var.dtype}, got shape"
                    f" {tuple(array.shape)} and dtype {array.dtype}."
                )
            shared = self.shared_variable(source, array, type(abstract_var))
            if shared is not None:
                flat.append((path, shared))
                continue
            if isinstance(source, variables.LabeledVariable):
                # The rebuilt variable is (not) eagerly sharded exactly as the converted one was.
                new_var = abstract_var.replace(
                    array, eager_sharding=source.get_metadata().get("eager_sharding", True)
                )
            else:
                new_var = abstract_var.replace(value=array)
            if source is not None and isinstance(source, variables.LabeledVariable):
                for name, entry in source.metadata.items():
                    new_var.set_metadata(name, entry)
                self.remember_variable(source, array, new_var)
            flat.append((path, new_var))
        # merge puts these very variable objects into the module, so shared ones stay shared.
        module = nnx.merge(graphdef, nnx.from_flat_state(flat))
        if self.bindings is not None:
            for key, (path, _) in expected.items():
                source = variables_by_path[key][0]
                if isinstance(source, variables.LabeledVariable):
                    self.bindings.append((source, module, path))
        return module


_ABSTRACT_MODULE_CACHE: dict[Any, tuple[Any, list[tuple[tuple[Hashable, ...], Any]]]] = {}
_ABSTRACT_MODULE_CACHE_LOCK = threading.Lock()


def _abstract_module(nnx_class, args, kwargs):
    """The graph definition and abstract variables a constructor call produces (cached)."""
    try:
        key = (nnx_class, args, tuple(sorted((k, v) for k, v in kwargs.items() if k != "rngs")))
        hash(key)
    except TypeError:
        key = None
    if key is not None:
        with _ABSTRACT_MODULE_CACHE_LOCK:
            cached = _ABSTRACT_MODULE_CACHE.get(key)
        if cached is not None:
            return cached

    def make():
        # The constructor draws (abstract) keys; a fresh dummy stream avoids touching the
        # caller's RNG state and lives in eval_shape's own trace.
        call_kwargs = dict(kwargs)
        if "rngs" not in call_kwargs:
            call_kwargs["rngs"] = nnx.Rngs(0)
        return nnx_class(*args, **call_kwargs)

    abstract_module = nnx.eval_shape(make)
    graphdef, state = nnx.split(abstract_module)
    result = (graphdef, list(nnx.to_flat_state(state)))
    if key is not None:
        with _ABSTRACT_MODULE_CACHE_LOCK:
            _ABSTRACT_MODULE_CACHE[key] = result
    return result


def pz_variable_like(
    source: nnx.Variable,
    pz_class: type[Any],
    value: Any,
    label: str,
    *,
    axis_names: Sequence[str] | None = None,
) -> variables.LabeledVariable:
    """A pz_flax variable holding an NNX variable's array, with its metadata and sharding mode.

    The array is already placed where it belongs, so creating the pz_flax variable must not
    place it again: its metadata (sharding annotations included) is attached without the
    constructor's sharding step, which NNX never turns into a resharding, and the variable
    keeps the source's ``eager_sharding`` setting so that modules rebuilt from it have the same
    graph definition. Conversion therefore needs no mesh context, just as running the NNX
    model needs none.

    Args:
        source: The NNX variable.
        pz_class: ``Parameter`` or ``StateVariable``.
        value: The value: the source's array, possibly as a ``NamedArray``.
        label: The label.
        axis_names: Names for the axes of ``value`` (then a plain array), or None to store
            ``value`` as it is.

    Returns:
        The new pz_flax variable.
    """
    metadata = _plain_variable_metadata(source, value, label, axis_names)
    if metadata is not None:
        # NNX's own route for a variable whose metadata is complete (``nnx.merge`` builds
        # variables this way): it skips the constructor's checks, which cost several times the
        # rest of the conversion of a variable and which this metadata passes by construction.
        return pz_class.from_metadata(value, metadata)
    if axis_names is not None:
        value = named_axes.wrap(value).tag(*axis_names)
    with nnx.use_eager_sharding(bool(source.get_metadata().get("eager_sharding", True))):
        created = pz_class(value=value, label=label)
    for key, entry in user_metadata(source).items():
        created.set_metadata(key, entry)
    return created


def _plain_variable_metadata(
    source: nnx.Variable, value: Any, label: str, axis_names: Sequence[str] | None
) -> dict[str, Any] | None:
    """The metadata ``pz_variable_like``'s constructor route would give, if it is plain.

    Plain: ``value`` is a concrete JAX array, ``axis_names`` (if any) are distinct strings,
    one per axis, and the source is a plain variable that has each of NNX's own entries.
    Anything else (None here) takes the constructor route, with its checks and its errors.
    """
    if isinstance(value, jax.core.Tracer) or not isinstance(value, jax.Array):
        return None
    source_metadata = source.get_metadata()
    own_keys = compat_nnx.nnx_metadata_keys().required
    if any(source_metadata.get(key) for key in compat_nnx.PLAIN_VARIABLE_OPTIONS) or not all(
        key in source_metadata for key in own_keys
    ):
        return None
    metadata: dict[str, Any] = {variables._LABEL_KEY: label}
    if axis_names is not None:
        names = tuple(axis_names)
        if len(names) != value.ndim or len(set(names)) != len(names):
            return None
        if not all(type(name) is str for name in names):
            return None
        metadata[variables._AXIS_NAMES_KEY] = names
    for key in own_keys:
        metadata[key] = source_metadata[key]
    for key in compat_nnx.PLAIN_VARIABLE_OPTIONS:
        metadata[key] = False
    metadata.update(user_metadata(source))
    return metadata


def user_metadata(variable: nnx.Variable) -> dict[str, Any]:
    """The metadata of an NNX variable that pz_flax should carry.

    NNX's own entries and pz_flax's reserved keys are dropped, and so are unhashable entries
    (pz_flax variables require hashable metadata); a mapped module that loses metadata this
    way no longer round-trips exactly and is wrapped instead, whose graph definition keeps it.

    Args:
        variable: The NNX variable.

    Returns:
        The entries to put into the pz_flax variable's metadata.
    """
    carried = {}
    # NNX's own entries (asked of NNX) and pz_flax's structural ones (label, axis names).
    reserved = variables._reserved_metadata_keys()
    for key, entry in variable.get_metadata().items():
        if key in reserved:
            continue
        try:
            hash(entry)
        except TypeError:
            continue
        carried[key] = entry
    return carried


def variable_value(variable: nnx.Variable) -> Any:
    """``variable.get_value()``, read directly where that is the stored value.

    For a plain variable (NNX's own getter, no ``on_get_value`` hook, not an array ref) the
    value is the stored raw value, and reading it directly skips the getter's tree walk, which
    costs more than the rest of converting a variable.

    Args:
        variable: An NNX variable.

    Returns:
        Its value.
    """
    metadata = variable.get_metadata()
    if (
        type(variable).get_value is nnx.Variable.get_value
        and "on_get_value" not in metadata
        and not any(metadata.get(key) for key in compat_nnx.PLAIN_VARIABLE_OPTIONS)
    ):
        return variable.get_raw_value()
    return variable.get_value()


def _checked_value(variable: nnx.Variable, axis_names: Sequence[str] | None, label: str) -> Any:
    """The variable's value, checked to have one axis per name in ``axis_names`` (if given)."""
    raw = variable_value(variable)
    if axis_names is not None and len(axis_names) != raw.ndim:
        raise AxisCountMismatch(
            f"Variable {label!r} has shape {raw.shape}, which cannot take the axis names"
            f" {tuple(axis_names)}."
        )
    return raw


def _describe(parameter: Any) -> str:
    label = getattr(parameter, "label", None)
    return f"parameter {label!r}" if label is not None else f"{type(parameter).__name__}"


def jnp_dtype_type(dtype: Any) -> Any:
    """The ``jax.numpy`` scalar type of a dtype (``jnp.float32``), as NNX stores defaults."""
    return getattr(jnp, jnp.dtype(dtype).name)


#### The mapping registry ####


class MappingRegistry(registry_lib.Registry[type, LayerMapping]):
    """The table of layer mappings, by the NNX class each converts.

    A ``Registry`` whose entries are checked as they are added: the key must be the mapping's
    own ``nnx_type``. So ``mapping_registry.scoped(MyModule, MyMapping())`` is a checked,
    temporary registration, undone when the ``with`` block ends.

    Order matters only to ``to_nnx(native=True)``: of several mappings that accept a natively
    built layer's class, the most recently registered one is tried first (a user's mapping
    before pz_flax's own). A replacement (``replace=True``) takes the place of the mapping it
    replaces.
    """

    def __init__(self, name: str):
        super().__init__(name)
        self._by_pz_type: dict[type, tuple[LayerMapping, ...]] = {}
        self._by_pz_type_version = -1

    def register(self, key: type, value: LayerMapping, *, replace: bool = False) -> LayerMapping:
        """Adds the mapping ``value`` for the NNX class ``key``; returns ``value``.

        Raises:
            TypeError: If ``value`` is not a ``LayerMapping``, its ``nnx_type`` is not a class,
                or ``key`` is not its ``nnx_type``.
            ValueError: If ``key`` has a mapping already and ``replace`` is False.
        """
        if not isinstance(value, LayerMapping):
            raise TypeError(
                f"The {self.name} registry takes LayerMapping instances, got"
                f" {type(value).__name__}."
            )
        nnx_type = getattr(value, "nnx_type", None)
        if not isinstance(nnx_type, type):
            raise TypeError(
                f"{type(value).__name__}.nnx_type must be an NNX module class, got {nnx_type!r}."
            )
        if key is not nnx_type:
            raise TypeError(
                f"{type(value).__name__} converts {nnx_type.__qualname__}, so it must be"
                f" registered under that class, not under {key!r}."
            )
        return super().register(key, value, replace=replace)

    def for_pz_type(self, pz_type: type) -> tuple[LayerMapping, ...]:
        """Mappings whose ``to_nnx`` accepts natively built layers of exactly ``pz_type``.

        Most recently registered first. Derived from the table and rebuilt when it changes.
        """
        if self._by_pz_type_version != self.version:
            index: dict[type, list[LayerMapping]] = {}
            for _, mapping in reversed(self.items()):
                for accepted in mapping.pz_types:
                    index.setdefault(accepted, []).append(mapping)
            self._by_pz_type = {key: tuple(found) for key, found in index.items()}
            self._by_pz_type_version = self.version
        return self._by_pz_type.get(pz_type, ())


mapping_registry = MappingRegistry("NNX layer mappings")


def register_mapping(mapping: LayerMapping, *, replace: bool = False) -> LayerMapping:
    """Registers a mapping for its ``nnx_type`` (and its ``pz_types`` for native ``to_nnx``).

    Args:
        mapping: An instance of a ``LayerMapping`` subclass.
        replace: Allow replacing the mapping already registered for the same NNX class.

    Returns:
        ``mapping``, so this can be used as ``MY_MAPPING = register_mapping(MyMapping())``.

    Raises:
        TypeError: If ``mapping`` is not a ``LayerMapping`` or its ``nnx_type`` is not a class.
        ValueError: If the NNX class already has a mapping and ``replace`` is False.
    """
    if not isinstance(mapping, LayerMapping):
        raise TypeError(
            f"register_mapping expects a LayerMapping instance, got {type(mapping).__name__}."
        )
    return mapping_registry.register(getattr(mapping, "nnx_type", None), mapping, replace=replace)


def unregister_mapping(nnx_type: type[Any]) -> LayerMapping:
    """Removes the mapping of an NNX class; its modules will be wrapped from then on.

    Args:
        nnx_type: The NNX class.

    Returns:
        The removed mapping.

    Raises:
        KeyError: If the class has no mapping.
    """
    return mapping_registry.unregister(nnx_type)


def get_mapping(nnx_type: type[Any]) -> LayerMapping | None:
    """The mapping registered for exactly this NNX class, or None."""
    return mapping_registry.get(nnx_type)


def mappings_for_pz_type(pz_type: type[Any]) -> tuple[LayerMapping, ...]:
    """Mappings whose ``to_nnx`` accepts natively built layers of exactly this class."""
    return mapping_registry.for_pz_type(pz_type)


def registered_mappings() -> dict[type[Any], LayerMapping]:
    """A snapshot of every registered mapping, by NNX class."""
    return mapping_registry.snapshot()
