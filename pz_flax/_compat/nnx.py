"""Private details of Flax NNX that pz_flax depends on, each in one guarded place.

Rules for every entry in this module:

* a comment says why the private route is needed (what public API is missing) and since which
  release the assumption holds;
* the access is guarded: when a release breaks the assumption, the code falls back to a public
  route or raises an error that names the assumption and this module;
* a canary test in ``tests/_compat/`` checks the assumption against the installed release and
  fails with a message naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import operator
import types
import warnings
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import jax
import jax.extend
import numpy as np
from flax import nnx

#### NNX's bookkeeping attributes on module instances ####

# NNX keeps its own bookkeeping in the instance dictionary of every ``nnx.Pytree`` (flax 0.12:
# ``_pytree__state`` and ``_pytree__nodes``), next to the module's own attributes, and has no
# public "the module's own attributes" API. Rather than copying those names, ask NNX: whatever
# an empty module holds is bookkeeping, since an empty module has no attributes of its own.
# The assumption (no further bookkeeping appears once a module is built, split, merged or
# traced) holds since flax 0.12; ``tests/_compat/test_nnx_graph.py`` checks it.
BOOKKEEPING_ATTRIBUTES: frozenset[str] = frozenset(vars(nnx.Module()))


def is_bookkeeping_attribute(name: Any) -> bool:
    """Whether an instance attribute called ``name`` is NNX's bookkeeping, not the module's."""
    return name in BOOKKEEPING_ATTRIBUTES


def own_attributes(node: nnx.Pytree) -> list[tuple[str, Any]]:
    """``(name, value)`` for each attribute an NNX object holds itself, in definition order.

    NNX's bookkeeping attributes are left out. For ``nnx.List`` and ``nnx.Dict`` the entries
    are attributes too (named ``"0"``, ``"1"``, ... for a list); iterate those containers
    themselves to see their entries as a list or a dict.

    Args:
        node: An NNX module, or any other ``nnx.Pytree``.

    Returns:
        The attributes, as a new list.
    """
    return [
        (name, value) for name, value in vars(node).items() if name not in BOOKKEEPING_ATTRIBUTES
    ]


#### The class a graph definition describes ####

# A wrapped module's shell is an ``nnx.GraphDef``, and describing one briefly (``repr``,
# treescope) needs the class of its root module. NNX has no public accessor: the class is the
# ``type`` of the first entry of the graph definition's ``nodes`` (flax 0.12: a ``NodeDef``).
# When that layout changes, fall back to the public route of merging the graph definition
# with placeholder leaves and asking the module for its class (slower, but exact).
# ``tests/_compat/test_nnx_wrappers.py`` checks the layout.
def graphdef_module_type(graphdef: Any) -> type[Any]:
    """The class of the root module an ``nnx.GraphDef`` describes.

    Args:
        graphdef: A graph definition, as ``nnx.split`` or ``nnx.graphdef`` returns.

    Returns:
        The root module's class.
    """
    nodes = getattr(graphdef, "nodes", None)
    root_type = getattr(nodes[0], "type", None) if nodes else None
    if isinstance(root_type, type):
        return root_type
    from pz_flax._compat import nnx_modules  # the public-route fallback lives there

    return type(nnx_modules.module_of_graphdef(graphdef))


#### Variable classes that are also abstract base classes ####


def _most_derived_metaclass(first: type, second: type) -> type:
    # Python rejects a class whose metaclass is not a subclass of every base's metaclass, and
    # also rejects ``class M(type, ABCMeta)`` (``type`` before its own subclass): when one
    # metaclass already derives from the other, that one is the answer.
    if issubclass(first, second):
        return first
    if issubclass(second, first):
        return second
    return type(f"{first.__name__}With{second.__name__}", (first, second), {})


@functools.cache
def variable_metaclass_with(metaclass: type) -> type:
    """The metaclass for a class deriving from ``nnx.Variable`` and from a class of ``metaclass``.

    ``nnx.Variable`` has its own metaclass since flax 0.12.1 (it turns hijax variables into
    their traced form on construction); flax 0.12.0 uses plain ``type``. A variable class that
    also implements an ``abc.ABC`` interface needs a metaclass deriving from both, which this
    builds (once per ``metaclass``) whichever release is installed.

    Args:
        metaclass: The other base class's metaclass, e.g. ``abc.ABCMeta``.

    Returns:
        A metaclass that is a subclass of ``metaclass`` and of ``nnx.Variable``'s metaclass.
    """
    return _most_derived_metaclass(type(nnx.Variable), metaclass)


#### Constructing plain variables ####

# The constructor switches that would make a variable something other than a plain holder of a
# pytree of arrays (a hijax variable, an array ref), all turned off. NNX has no public "plain
# variable" option, and the switches were renamed twice: ``use_ref`` (flax 0.12.0),
# ``is_hijax``/``has_ref`` (0.12.1-0.12.2), ``hijax``/``ref`` (0.12.3 onwards). They are looked up
# in the installed constructor's signature; a release that has none of them gets its defaults
# (plain variables unless the user configured otherwise), and the canary in
# ``tests/_compat/test_nnx_variables.py`` names the missing switches.
_PLAIN_VARIABLE_SWITCHES = ("hijax", "ref", "is_hijax", "has_ref", "use_ref")


def _plain_variable_options() -> Mapping[str, bool]:
    parameters = inspect.signature(nnx.Variable.__init__).parameters
    return types.MappingProxyType(
        {name: False for name in _PLAIN_VARIABLE_SWITCHES if name in parameters}
    )


PLAIN_VARIABLE_OPTIONS: Mapping[str, bool] = _plain_variable_options()
"""Keyword arguments for ``nnx.Variable(...)`` that keep the variable a plain pytree holder."""


#### Which metadata entries are NNX's own ####


@dataclasses.dataclass(frozen=True)
class NnxMetadataKeys:
    """The names NNX itself uses in variable metadata, as the installed release spells them.

    Attributes:
        required: Entries NNX writes on every variable (``hijax``, ``ref``, ``eager_sharding``
            in flax 0.12.4+; 0.12.3 adds ``mutable``; 0.12.1-0.12.2 spell them ``is_hijax``,
            ``has_ref``, ``is_mutable``).
        sharding: Where this release keeps a variable's sharding annotation (its axis names):
            ``out_sharding`` in flax 0.12.4+, ``sharding_names`` before.
        sharding_aliases: Other spellings that NNX accepts and renames to ``sharding``.
        sharding_context: Entries NNX reads next to the annotation when it shards a value
            (the mesh and the logical-axis rules).
    """

    required: frozenset[str]
    sharding: str
    sharding_aliases: frozenset[str]
    sharding_context: frozenset[str]

    @property
    def sharding_related(self) -> frozenset[str]:
        """Every entry that describes how a variable is sharded, in any spelling."""
        return frozenset({self.sharding}) | self.sharding_aliases | self.sharding_context

    @property
    def all(self) -> frozenset[str]:
        """Every entry NNX owns: the required ones and the sharding-related ones."""
        return self.required | self.sharding_related


# The spellings NNX has used for a sharding annotation, and the entries it reads next to it.
# NNX publishes no list of them, so the candidates are named here and NNX is asked (below)
# which one it keeps and which ones it renames.
_SHARDING_SPELLINGS = ("out_sharding", "sharding_names", "sharding")
_SHARDING_CONTEXT = frozenset({"mesh", "sharding_rules"})


def _metadata_of_probe(**metadata: Any) -> dict[str, Any]:
    # A scalar NumPy value needs no JAX backend. Deprecated spellings are probed on purpose.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return dict(nnx.Variable(np.zeros(()), **metadata).get_metadata())


def _metadata_of_sharding_probe(spelling: str, marker: tuple[str, ...]) -> dict[str, Any]:
    # Eager sharding is off so that the probe annotation is only recorded, never applied.
    return _metadata_of_probe(eager_sharding=False, **{spelling: marker})


@functools.cache
def nnx_metadata_keys() -> NnxMetadataKeys:
    """Asks the installed NNX which variable metadata entries are its own.

    ``required`` is ``nnx.Variable.required_metadata`` (flax 0.12.1+) together with whatever
    NNX writes on a variable created without metadata; the sharding key is the one NNX stores a
    ``sharding=`` annotation under. Computed once per process.

    Returns:
        The names, as an `NnxMetadataKeys`.
    """
    required = frozenset(getattr(nnx.Variable, "required_metadata", ())) | frozenset(
        _metadata_of_probe()
    )
    marker = ("pz_flax_probe_axis",)
    stored_under = [
        key
        for key, entry in _metadata_of_sharding_probe("sharding", marker).items()
        if entry == marker
    ]
    if len(stored_under) != 1:
        raise RuntimeError(
            "pz_flax cannot tell under which metadata key this flax release keeps a"
            f" variable's sharding annotation (a `sharding=` annotation ended up under"
            f" {stored_under}). pz_flax._compat.nnx.nnx_metadata_keys needs updating."
        )
    (sharding,) = stored_under
    aliases = set()
    for spelling in _SHARDING_SPELLINGS:
        stored = _metadata_of_sharding_probe(spelling, marker)
        if spelling != sharding and spelling not in stored and stored.get(sharding) == marker:
            aliases.add(spelling)
    return NnxMetadataKeys(
        required=required,
        sharding=sharding,
        sharding_aliases=frozenset(aliases),
        sharding_context=_SHARDING_CONTEXT,
    )


#### The JAX trace that NNX checks variable writes against ####


def _find_opaque_trace_state() -> Any:
    # JAX's public accessor lives in ``jax.extend.core`` since jax 0.9 and in ``jax.core``
    # before (what flax uses in each case).
    for namespace in (jax.extend.core, jax.core):
        accessor = getattr(namespace, "get_opaque_trace_state", None)
        if accessor is not None:
            return accessor
    return None


_opaque_trace_state = _find_opaque_trace_state()


def current_trace() -> Hashable:
    """A token for the JAX trace active now; two tokens compare equal in the same trace.

    NNX records this token (JAX's opaque trace state under the ``"nnx"`` convention) when it
    creates a variable and refuses writes from any other trace. Code that writes variables
    without NNX's per-write check (see `write_raw_values_unchecked`) compares tokens itself,
    once.

    Raises:
        RuntimeError: If this JAX release has no ``get_opaque_trace_state``.
    """
    if _opaque_trace_state is None:
        raise RuntimeError(
            "pz_flax cannot tell which JAX trace is active: this JAX release has no"
            " get_opaque_trace_state in jax.extend.core or jax.core."
            " pz_flax._compat.nnx.current_trace needs updating."
        )
    return _opaque_trace_state(convention="nnx")


#### Reading and writing raw values in bulk, without NNX's per-write trace check ####

# NNX checks the JAX trace on every raw-value write (``set_raw_value`` checks, and then its
# assignment passes through ``Variable.__setattr__``, which checks again): about 1.4 us per
# write, a visible share of a small training step that writes every parameter; reading through
# ``get_raw_value()`` costs a Python call per variable too. NNX has no public bulk or unchecked
# access, so these functions use the slot that ``get_raw_value()`` returns (``_raw_value``,
# flax 0.12.1+; flax 0.12.0 calls it ``raw_value``) directly. Guard: on first use a probe
# variable checks that a value stored in the slot is what ``get_raw_value()`` gives back; if
# not, the public ``get_raw_value``/``set_raw_value`` are used (slower, still correct).
_RAW_VALUE_SLOT = "_raw_value"
_store_attribute = object.__setattr__
_read_raw_value_slot = operator.attrgetter(_RAW_VALUE_SLOT)


@functools.cache
def raw_value_slot_is_usable() -> bool:
    """Whether `read_raw_values` and `write_raw_values_unchecked` use their fast route."""
    probe = nnx.Variable(np.zeros(()))
    marker = np.ones(())
    if not hasattr(probe, "get_raw_value"):
        return False
    try:
        _store_attribute(probe, _RAW_VALUE_SLOT, marker)
    except AttributeError:
        return False
    return probe.get_raw_value() is marker and _read_raw_value_slot(probe) is marker


def read_raw_values(variables: Iterable[nnx.Variable]) -> list[Any]:
    """The raw values of the variables, in order: what ``get_raw_value()`` gives for each.

    Args:
        variables: The variables to read.

    Returns:
        A new list of their raw values.
    """
    if raw_value_slot_is_usable():
        return list(map(_read_raw_value_slot, variables))
    return [variable.get_raw_value() for variable in variables]


def write_raw_values_unchecked(variables: Iterable[nnx.Variable], values: Iterable[Any]) -> None:
    """Stores each value as the raw value of the matching variable, without NNX's trace check.

    Only for callers that have made sure, once, that the variables belong to the current
    trace (compare `current_trace` tokens): otherwise a tracer could be stored in a variable
    that outlives its trace.

    Args:
        variables: The variables to write.
        values: Their new raw values, in the same order.
    """
    if raw_value_slot_is_usable():
        for variable, value in zip(variables, values, strict=True):
            _store_attribute(variable, _RAW_VALUE_SLOT, value)
    else:
        for variable, value in zip(variables, values, strict=True):
            variable.set_raw_value(value)


#### Key/value heads of nnx.MultiHeadAttention ####

# Grouped-query attention (``num_kv_heads``, fewer key/value heads than query heads) arrived in
# flax 0.12.6; before it every ``nnx.MultiHeadAttention`` projects keys and values to
# ``num_heads`` heads and has no ``num_kv_heads`` attribute. Whether the installed release has
# the option is read from the constructor's signature (not from a missing attribute, which
# would also hide a later rename); ``tests/_compat/test_nnx_modules.py`` checks that a release
# with the parameter keeps it as the attribute.
_ATTENTION_HAS_KV_HEADS = "num_kv_heads" in inspect.signature(nnx.MultiHeadAttention).parameters


def attention_kv_heads(module: nnx.MultiHeadAttention) -> int:
    """How many key/value heads an ``nnx.MultiHeadAttention`` projects to.

    Args:
        module: The attention module.

    Returns:
        ``module.num_kv_heads`` on flax 0.12.6+, ``module.num_heads`` on releases without
        grouped-query attention.

    Raises:
        RuntimeError: If the release takes ``num_kv_heads`` but the module does not keep it.
    """
    if not _ATTENTION_HAS_KV_HEADS:
        return module.num_heads
    try:
        return module.num_kv_heads
    except AttributeError as exc:
        raise RuntimeError(
            "This flax release's nnx.MultiHeadAttention takes num_kv_heads but keeps no"
            " num_kv_heads attribute. pz_flax._compat.nnx.attention_kv_heads needs updating."
        ) from exc


#### Calling a module with a fresh collection for what it sows ####

# ``nnx.capture`` (flax 0.12.6+) runs a module, or a function whose first argument holds the
# modules, with ``Module.sow`` writing into a per-call collection instead of onto the modules.
# Earlier releases have no such API: ``sow`` always stores on the module, adding to whatever an
# earlier call stored there. The fallback gets the same result through public calls: the sown
# values already on the modules are popped first and put back afterwards, so that the call
# starts from an empty collection and leaves the modules as it found them.
# ``tests/_compat/test_nnx_modules.py`` runs both routes.
def _capture_by_popping(
    fn: Callable[..., Any], *variable_types: type[nnx.Variable]
) -> Callable[..., Any]:
    # Without types, what ``sow`` and ``perturb`` write is dropped: ``nnx.Intermediate`` and its
    # subclass ``nnx.Perturbation``.
    sown_types = variable_types or (nnx.Intermediate,)

    def pop_sown(modules: Any) -> tuple[nnx.State, ...]:
        popped = nnx.pop(modules, *sown_types)
        return popped if len(sown_types) > 1 else (popped,)

    def call(*args: Any, **kwargs: Any) -> Any:
        modules = fn if isinstance(fn, nnx.Module) else args[0]
        earlier = pop_sown(modules)
        try:
            output = fn(*args, **kwargs)
            collected = pop_sown(modules)
        finally:
            nnx.update(modules, *earlier)
        return (output, *collected) if variable_types else output

    return call


def capture(fn: Callable[..., Any], *variable_types: type[nnx.Variable]) -> Callable[..., Any]:
    """``fn`` as a function whose modules' sown values are collected per call, off the modules.

    Args:
        fn: An NNX module, or a function whose first argument is a module (or a list or other
            NNX graph node of modules) whose sown values to collect.
        *variable_types: The variable types to collect (``nnx.Intermediate``, say); none to
            drop what the modules sow.

    Returns:
        A function taking ``fn``'s arguments and returning its output, or
        ``(output, *collected)``, one ``nnx.State`` per type, when types are given.
    """
    if hasattr(nnx, "capture"):
        return nnx.capture(fn, *variable_types)
    return _capture_by_popping(fn, *variable_types)
