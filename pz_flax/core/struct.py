"""Frozen dataclasses that are JAX pytrees: the building block of every pz_flax model.

A pz_flax model is a tree of immutable objects. Every layer, every combinator and every
named array is a ``Struct``: a frozen dataclass whose non-static fields are JAX pytree
children. Models can therefore be passed straight through ``jax.jit``, ``jax.grad`` and
``jax.tree_util``, rewritten with selectors, and rendered by treescope, and nothing about a
model lives anywhere but in its fields.

Two pieces cooperate:

* ``pytree_dataclass`` turns a class into a frozen dataclass, registers it with JAX (keyed
  flattening) and with Flax NNX (as a data type, so a struct can be assigned to an attribute
  of an ``nnx.Module`` and NNX finds the parameters inside it), and runs a few safety checks
  against the classic dataclass-inheritance pitfalls.
* ``Struct`` supplies the flatten/unflatten methods JAX needs plus a handful of conveniences
  (``select``, ``attributes_dict``, ``from_attributes``, treescope rendering).

Flattening is on the dispatch path of every jitted call that takes a model: ``jax.jit``
flattens each argument and unflattens each result on every call, node by node. Most structs
are therefore registered with ``jax.tree_util.register_dataclass``, which flattens in C++
(reading the fields with ``getattr``) and compares treedefs without calling Python; it rebuilds
a struct by calling the class with every field as a keyword argument. That is only the same as
penzai's unflattening (which never runs ``__init__``) when ``__init__`` is the one dataclasses
generated for exactly these fields, with no ``__post_init__`` and default path keys. Since it
then runs once per struct of every output tree on every call, such a class gets an ``__init__``
with the generated one's parameters that stores into the instance dictionary directly, a third
cheaper than the generated one's ``object.__setattr__`` per field. Every other struct keeps
Python flatten/unflatten methods, whose field layout is computed once per class and whose
flatten metadata is kept with each instance.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import TypeVar

import jax
from flax import nnx

if typing.TYPE_CHECKING:
    from pz_flax.core import selectors

T = TypeVar("T")

# Per-class bookkeeping lives in the class's own ``__dict__`` (like ``dataclasses`` does), so
# that a subclass of a pytree dataclass is not mistaken for one: JAX registration is per exact
# type and is not inherited.
_PYTREE_DATACLASS_INFO = "__pz_flax_pytree_dataclass_info__"
# Instance ``__dict__`` key under which a struct keeps its flatten metadata (not a field).
_STATIC_METADATA_CACHE = "__pz_flax_static_metadata__"
# Class ``__dict__`` key under which ``Struct.__init_subclass__`` keeps the ``__init__`` a class
# body defined (or None), while the class's own ``__init__`` refuses to build instances until
# ``pytree_dataclass`` is applied.
_DECLARED_INIT = "__pz_flax_declared_init__"


class PyTreeDataclassSafetyError(Exception):
    """A ``pytree_dataclass`` class definition would behave surprisingly.

    Raised at class-creation time, never while a model runs.
    """


@dataclasses.dataclass(frozen=True)
class _ClassLayout:
    """What ``pytree_dataclass`` records about a class, computed once per class."""

    generated_init: Callable[..., None] | None
    child_field_names: tuple[str, ...]
    static_field_names: tuple[str, ...]
    all_field_names: frozenset[str]
    uses_default_keys: bool
    flattens_natively: bool


def is_pytree_dataclass_type(cls: type[Any]) -> bool:
    """Tells whether ``cls`` itself (not merely a base class) went through ``pytree_dataclass``.

    JAX looks pytree registrations up by exact type, so inheriting from a pytree dataclass does
    not make a class one.

    Args:
        cls: The class to check.

    Returns:
        True if ``@pytree_dataclass`` was applied to exactly this class.
    """
    return isinstance(cls, type) and _PYTREE_DATACLASS_INFO in cls.__dict__


def is_pytree_node_field(field: dataclasses.Field[Any]) -> bool:
    """Tells whether a dataclass field holds a pytree child (True) or static data (False).

    Fields are children unless declared with ``metadata={"pytree_node": False}``.

    Args:
        field: A field of a pytree dataclass.

    Returns:
        True if the field's value is traversed by JAX.
    """
    return field.metadata.get("pytree_node", True)


@dataclasses.dataclass(frozen=True)
class StructStaticMetadata:
    """The auxiliary data a ``Struct`` flattens to: how to put its children back.

    Attributes:
        child_field_names: Names of the fields whose values are pytree children, in the order
            the children are flattened.
        static_fields: Values of the fields that JAX treats as static, by name.
    """

    child_field_names: Sequence[str]
    static_fields: dict[str, Any]

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, StructStaticMetadata):
            return NotImplemented
        return (
            tuple(self.child_field_names) == tuple(other.child_field_names)
            and self.static_fields == other.static_fields
        )

    def __hash__(self) -> int:
        # Static fields may hold unhashable values (dicts of config, say); the field names
        # are enough for a hash that agrees with ``__eq__``.
        try:
            return hash((tuple(self.child_field_names), tuple(self.static_fields.items())))
        except TypeError:
            return hash((tuple(self.child_field_names), tuple(self.static_fields)))


def uses_native_flattening(cls: type[Any]) -> bool:
    """Tells whether JAX flattens instances of ``cls`` in C++ (``register_dataclass``).

    Both registrations give the same leaves, paths and rebuilt structs; the native one is
    faster on ``jax.jit`` dispatch. See the module docstring for which classes get it.

    Args:
        cls: A class decorated with ``pytree_dataclass``.

    Returns:
        True if ``cls`` is registered with ``jax.tree_util.register_dataclass``.

    Raises:
        TypeError: If ``cls`` was not decorated with ``pytree_dataclass``.
    """
    if not is_pytree_dataclass_type(cls):
        raise TypeError(f"{cls!r} is not a class decorated with @pytree_dataclass.")
    return cls.__dict__[_PYTREE_DATACLASS_INFO].flattens_natively


def _can_flatten_natively(cls: type[Any], generated_init: Callable[..., None] | None) -> bool:
    """Whether calling ``cls(**fields)`` rebuilds an instance exactly as penzai's unflatten does.

    JAX's C++ dataclass nodes rebuild by calling the class; that is a plain field assignment
    only for a dataclass-generated ``__init__`` taking every field, with no ``__post_init__``
    (which could validate or transform placeholder leaves), and paths only match when the
    class keeps the default ``GetAttrKey`` keys.
    """
    return (
        generated_init is not None
        and getattr(cls, "__post_init__", None) is None
        and getattr(cls, "key_for_field", None) is Struct.key_for_field
        and all(field.init for field in dataclasses.fields(cls))
    )


def _dict_writing_init(cls: type[Any], generated_init: Callable[..., None]) -> Callable[..., None]:
    """An ``__init__`` that takes the same arguments as ``generated_init`` and does the same.

    JAX rebuilds a natively flattened struct by calling its class, for every struct of every
    output tree of every ``jax.jit`` call (216 structs per Adam step of a frozen 8-layer
    model). The ``__init__`` that dataclasses generate for a frozen class stores each field
    through ``object.__setattr__`` (a builtin lookup and a generic attribute write per field);
    storing into the instance ``__dict__`` does the same for about a third less per struct.
    Only used where ``generated_init`` does nothing but store its arguments (see
    ``_can_flatten_natively``): same parameters, order, kinds and default objects (a
    ``default_factory`` field keeps dataclasses' own placeholder default and calls the factory).

    Returns ``generated_init`` itself when its parameters are not exactly the fields (an
    ``InitVar``) or a field name would shadow a name the new function needs.
    """
    instance, *field_parameters = inspect.signature(generated_init).parameters.values()
    fields = {field.name: field for field in dataclasses.fields(cls)}
    parameter_names = {parameter.name for parameter in field_parameters}
    if (
        parameter_names != fields.keys()
        or {"_defaults", "_factories", "_instance_dict", instance.name} & fields.keys()
    ):
        return generated_init
    defaults = {}
    factories = {}
    parameter_texts = [instance.name]
    body = [f"    _instance_dict = {instance.name}.__dict__"]
    keyword_only_started = False
    for parameter in field_parameters:
        name = parameter.name
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and not keyword_only_started:
            parameter_texts.append("*")
            keyword_only_started = True
        if parameter.default is inspect.Parameter.empty:
            parameter_texts.append(name)
        else:
            defaults[name] = parameter.default
            parameter_texts.append(f"{name}=_defaults[{name!r}]")
        if fields[name].default_factory is not dataclasses.MISSING:
            factories[name] = fields[name].default_factory
            body.append(
                f"    _instance_dict[{name!r}] = _factories[{name!r}]() if {name} is"
                f" _defaults[{name!r}] else {name}"
            )
        else:
            body.append(f"    _instance_dict[{name!r}] = {name}")
    source = f"def __init__({', '.join(parameter_texts)}):\n" + "\n".join(body) + "\n"
    namespace: dict[str, Any] = {"_defaults": defaults, "_factories": factories}
    # The source holds only the class's own field names (identifiers) and fixed text.
    exec(source, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    return init


def _refuse_undecorated_init(self, *args, **kwargs):
    """The ``__init__`` of a ``Struct`` subclass until ``pytree_dataclass`` is applied to it."""
    del args, kwargs
    cls = type(self)
    raise TypeError(
        f"Cannot instantiate {cls.__module__}.{cls.__qualname__}: it subclasses Struct but is"
        " not decorated with @pytree_dataclass, so it is abstract. Decorate it to make it"
        " concrete."
    )


def _restore_declared_init(cls: type[Any]) -> Callable[..., None] | None:
    """Puts back the ``__init__`` the class body defined; returns it (None if there was none)."""
    declared = cls.__dict__.get(_DECLARED_INIT)
    if _DECLARED_INIT in cls.__dict__:
        delattr(cls, _DECLARED_INIT)
    if cls.__dict__.get("__init__") is _refuse_undecorated_init:
        if declared is None:
            delattr(cls, "__init__")
        else:
            cls.__init__ = declared
    return cls.__dict__.get("__init__")


def _inherited_init(cls: type[Any]) -> Callable[..., None]:
    """The ``__init__`` ``cls`` inherits, looking through the placeholders of undecorated bases."""
    for base in cls.__mro__[1:]:
        if base is Struct:
            break
        if _DECLARED_INIT in base.__dict__:
            if base.__dict__[_DECLARED_INIT] is not None:
                return base.__dict__[_DECLARED_INIT]
        elif "__init__" in base.__dict__:
            return base.__dict__["__init__"]
    return object.__init__


def _check_no_stray_inherited_fields(cls: type[Any], has_implicitly_inherited_fields: bool):
    """Makes a class spell out its fields, so dataclass inheritance cannot reorder them."""
    declared = list(inspect.get_annotations(cls))
    field_names = [field.name for field in dataclasses.fields(cls)]
    if has_implicitly_inherited_fields:
        if not set(field_names) - set(declared):
            raise PyTreeDataclassSafetyError(
                f"{cls.__name__} sets has_implicitly_inherited_fields=True but inherits no fields;"
                " drop the flag."
            )
        return
    declared_fields = [name for name in declared if name in set(field_names)]
    if declared_fields != field_names:
        raise PyTreeDataclassSafetyError(
            f"{cls.__name__}: its annotations declare the fields {declared_fields}, but as a"
            f" dataclass it has the fields {field_names} (dataclasses inherit the fields of"
            " parent dataclasses and keep their order). Declare every field, in that order, in"
            " the class body, or pass has_implicitly_inherited_fields=True to inherit them on"
            " purpose."
        )


def _wrap_custom_init(cls: type[Any], custom_init: Callable[..., None]):
    """Lets a hand-written ``__init__`` assign ``self.x = ...`` on a frozen class.

    The user's ``__init__`` runs on a throwaway mutable subclass instance; afterwards only the
    dataclass fields are copied onto the real, frozen object. Anything else the ``__init__``
    stored is discarded, which keeps instances equal to ``from_attributes`` of their fields.
    """
    if "_MutableInitProxy" in cls.__dict__:
        raise ValueError(
            f"{cls.__name__} already defines _MutableInitProxy; cannot build a mutable init proxy."
        )

    proxy_cls = type(
        f"{cls.__name__}._MutableInitProxy",
        (cls,),
        {
            "__setattr__": object.__setattr__,
            "__delattr__": object.__delattr__,
            "__hash__": None,
            "__init__": custom_init,
            "__qualname__": f"{cls.__qualname__}._MutableInitProxy",
            "__module__": cls.__module__,
            "_MutableInitProxy": None,
        },
    )
    # ``Struct.__init_subclass__`` parked the proxy's ``__init__``; the proxy needs it live.
    _restore_declared_init(proxy_cls)
    # The proxy is instantiable (the metaclass checks for this marker) but is never registered
    # with JAX: it only ever exists inside ``__init__``.
    setattr(
        proxy_cls,
        _PYTREE_DATACLASS_INFO,
        dataclasses.replace(cls.__dict__[_PYTREE_DATACLASS_INFO], generated_init=None),
    )
    field_names = [field.name for field in dataclasses.fields(cls)]

    @functools.wraps(custom_init)
    def init_through_proxy(self, *args, **kwargs):
        proxy = proxy_cls(*args, **kwargs)
        for name in field_names:
            try:
                value = getattr(proxy, name)
            except AttributeError as exc:
                raise AttributeError(
                    f"{cls.__name__}.__init__ did not set the field {name!r}; a pytree dataclass"
                    " __init__ must set every field."
                ) from exc
            object.__setattr__(self, name, value)

    cls._MutableInitProxy = proxy_cls
    cls.__init__ = init_through_proxy


# Tells type checkers that decorated classes are frozen dataclasses (generated __init__).
@typing.dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def pytree_dataclass(
    cls: type[Any] | None = None,
    /,
    *,
    has_implicitly_inherited_fields: bool = False,
    use_mutable_proxy_in_init: bool = True,
    overwrite_parent_init: bool = False,
    init: bool = True,
    repr: bool | Literal["auto"] = "auto",
    eq: bool = True,
    order: bool = False,
    match_args: bool = False,
    kw_only: bool = False,
) -> type[Any] | Callable[[type[Any]], type[Any]]:
    """Makes ``cls`` a frozen dataclass registered as a JAX pytree and an NNX data type.

    Beyond ``dataclasses.dataclass(frozen=True)``, this decorator:

    * registers the class with ``jax.tree_util.register_pytree_with_keys_class`` (so it must
      provide ``tree_flatten_with_keys``/``tree_unflatten``; ``Struct`` subclasses get them);
    * registers it with ``flax.nnx.register_data_type``, so a struct assigned to an
      ``nnx.Module`` attribute is treated as data and NNX finds the variables inside it;
    * refuses class definitions whose fields would be silently inherited or reordered by
      dataclass inheritance, unless ``has_implicitly_inherited_fields=True``;
    * refuses to silently replace a parent's hand-written ``__init__`` with a generated one,
      unless ``overwrite_parent_init=True`` (or ``init=False`` to inherit it);
    * lets a hand-written ``__init__`` assign its fields with ``self.x = ...`` despite the
      class being frozen (``use_mutable_proxy_in_init``).

    Args:
        cls: The class to transform (when used without parentheses).
        has_implicitly_inherited_fields: Allow fields inherited from a parent dataclass that are
            not re-declared in this class body.
        use_mutable_proxy_in_init: Let a hand-written ``__init__`` assign fields directly.
        overwrite_parent_init: Allow generating ``__init__`` over a parent's custom one.
        init: Generate ``__init__`` (as in ``dataclasses.dataclass``).
        repr: Generate ``__repr__``; ``"auto"`` generates one except for ``Struct`` subclasses,
            which render through treescope.
        eq: As in ``dataclasses.dataclass``.
        order: As in ``dataclasses.dataclass``.
        match_args: As in ``dataclasses.dataclass``.
        kw_only: As in ``dataclasses.dataclass``.

    Returns:
        The transformed class, or a decorator if ``cls`` was not given.
    """
    if cls is None:
        return functools.partial(
            pytree_dataclass,
            has_implicitly_inherited_fields=has_implicitly_inherited_fields,
            use_mutable_proxy_in_init=use_mutable_proxy_in_init,
            overwrite_parent_init=overwrite_parent_init,
            init=init,
            repr=repr,
            eq=eq,
            order=order,
            match_args=match_args,
            kw_only=kw_only,
        )

    if _PYTREE_DATACLASS_INFO in cls.__dict__:
        raise ValueError(f"pytree_dataclass was applied twice to {cls.__name__}.")

    custom_init = _restore_declared_init(cls)
    inherited_init = _inherited_init(cls)
    if not init and custom_init is None:
        # Undecorated ancestors hold refusing placeholders; inherit what their bodies defined.
        cls.__init__ = inherited_init
    if init and custom_init is None and not overwrite_parent_init:
        inherited_layout = getattr(cls, _PYTREE_DATACLASS_INFO, None)
        harmless_init = (
            inherited_layout.generated_init
            if inherited_layout is not None and inherited_layout.generated_init is not None
            else object.__init__
        )
        if inherited_init is not harmless_init:
            raise PyTreeDataclassSafetyError(
                f"@pytree_dataclass would replace the hand-written __init__ {inherited_init} that"
                f" {cls.__name__} inherits with a generated one. Pass overwrite_parent_init=True"
                " to generate one anyway, init=False to keep the inherited one, or define"
                f" __init__ in {cls.__name__}."
            )

    if repr == "auto":
        repr = not issubclass(cls, Struct)

    cls = dataclasses.dataclass(
        init=init,
        repr=repr,
        eq=eq,
        order=order,
        match_args=match_args,
        kw_only=kw_only,
        frozen=True,
    )(cls)
    _check_no_stray_inherited_fields(cls, has_implicitly_inherited_fields)

    if not (hasattr(cls, "tree_flatten_with_keys") and hasattr(cls, "tree_unflatten")):
        raise AttributeError(
            f"{cls.__name__} needs `tree_flatten_with_keys` and `tree_unflatten` methods to be"
            " registered with JAX; subclass pz_flax.Struct to get them."
        )

    fields = dataclasses.fields(cls)
    generated_init = cls.__init__ if init and custom_init is None else None
    flattens_natively = _can_flatten_natively(cls, generated_init)
    if flattens_natively:
        generated_init = _dict_writing_init(cls, generated_init)
        cls.__init__ = generated_init
    layout = _ClassLayout(
        generated_init=generated_init,
        child_field_names=tuple(f.name for f in fields if is_pytree_node_field(f)),
        static_field_names=tuple(f.name for f in fields if not is_pytree_node_field(f)),
        all_field_names=frozenset(f.name for f in fields),
        uses_default_keys=getattr(cls, "key_for_field", None) is Struct.key_for_field,
        flattens_natively=flattens_natively,
    )
    setattr(cls, _PYTREE_DATACLASS_INFO, layout)
    if layout.flattens_natively:
        jax.tree_util.register_dataclass(
            cls,
            data_fields=list(layout.child_field_names),
            meta_fields=list(layout.static_field_names),
        )
    else:
        jax.tree_util.register_pytree_with_keys_class(cls)
    nnx.register_data_type(cls)

    if use_mutable_proxy_in_init and custom_init is not None:
        _wrap_custom_init(cls, custom_init)
    return cls


class AbstractStructMetaclass(abc.ABCMeta):
    """Metaclass of ``Struct`` (an ``ABCMeta``, so structs can declare abstract methods).

    Only classes decorated with ``pytree_dataclass`` instantiate: a ``Struct`` subclass without
    the decorator is abstract, which catches the easy mistake of forgetting the decorator on a
    subclass (its objects would be ones JAX cannot flatten). The check is not a ``__call__``
    here, because JAX rebuilds natively flattened structs by calling their class on every
    jitted call: ``Struct.__init_subclass__`` gives each new subclass an ``__init__`` that
    refuses, and ``pytree_dataclass`` replaces it with the real one.
    """


class Struct(metaclass=AbstractStructMetaclass):
    """Base class of pz_flax's immutable pytree objects (layers, named arrays, ...).

    A concrete ``Struct`` subclass is decorated with ``@pytree_dataclass``; its annotated
    fields are pytree children unless declared ``dataclasses.field(metadata={"pytree_node":
    False})``. Instances are frozen: "modifying" a struct means building a new one, usually via
    ``dataclasses.replace`` or a selector (``struct.select().at(...).set(...)``).

    Structs flatten with keys (``jax.tree_util.GetAttrKey(field)`` by default, see
    ``key_for_field``), which is what gives selectors, treescope and checkpoints their paths.
    """

    __init__ = _refuse_undecorated_init

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Park the class body's own __init__ (restored by pytree_dataclass), so that the class
        # refuses instantiation until it is decorated, whatever __init__ it would inherit.
        setattr(cls, _DECLARED_INIT, cls.__dict__.get("__init__"))
        cls.__init__ = _refuse_undecorated_init

    @typing.final
    @classmethod
    def from_attributes(cls: type[T], **field_values) -> T:
        """Builds an instance directly from its field values, bypassing ``__init__``.

        Useful for classes whose ``__init__`` takes something other than their fields (and
        for deserialization). The caller is responsible for the class's invariants.

        Args:
            **field_values: A value for every field, and nothing else.

        Returns:
            The new instance.

        Raises:
            ValueError: If the given names are not exactly the class's fields.
        """
        layout: _ClassLayout | None = cls.__dict__.get(_PYTREE_DATACLASS_INFO)
        expected = (
            layout.all_field_names
            if layout is not None
            else frozenset(f.name for f in dataclasses.fields(cls))
        )
        if expected != field_values.keys():
            missing = sorted(expected - field_values.keys())
            unexpected = sorted(field_values.keys() - expected)
            raise ValueError(
                f"{cls.__name__}.from_attributes needs exactly the fields {sorted(expected)};"
                f" missing {missing}, unexpected {unexpected}."
            )
        instance = object.__new__(cls)
        instance.__dict__.update(field_values)
        return instance

    @typing.final
    def attributes_dict(self) -> dict[str, Any]:
        """Returns every field by name, so that ``type(s).from_attributes(**d)`` rebuilds it."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @typing.final
    def select(self) -> selectors.Selection:
        """Starts a selection at this struct: ``model.select().at_instances_of(...)...``."""
        from pz_flax.core import selectors  # selectors builds on struct, so import late

        return selectors.select(self)

    def key_for_field(self, field_name: str) -> Hashable:
        """The key of a field in JAX key paths; override to customise paths (rarely needed).

        Args:
            field_name: A pytree-child field of this struct.

        Returns:
            A hashable JAX path key; ``GetAttrKey(field_name)`` by default.
        """
        return jax.tree_util.GetAttrKey(field_name)

    def _static_metadata(self) -> StructStaticMetadata:
        """This instance's flatten metadata, built once and kept with the (frozen) instance.

        Keeping it means a struct rebuilt by ``tree_unflatten`` hands JAX back the very object
        its treedef holds, so comparing treedefs on every jitted call (the dispatch cache key)
        succeeds by identity instead of comparing every static field.
        """
        values = self.__dict__
        metadata = values.get(_STATIC_METADATA_CACHE)
        if metadata is None:
            layout: _ClassLayout = type(self).__dict__[_PYTREE_DATACLASS_INFO]
            metadata = StructStaticMetadata(
                # getattr, not the instance dict: an ``init=False`` field with a plain default
                # lives on the class until assigned.
                layout.child_field_names,
                {n: getattr(self, n) for n in layout.static_field_names},
            )
            values[_STATIC_METADATA_CACHE] = metadata
        return metadata

    @typing.final
    def tree_flatten_with_keys(self) -> tuple[list[tuple[Any, Any]], StructStaticMetadata]:
        """Flattens to ``(key, child)`` pairs plus static metadata (JAX's keyed protocol)."""
        layout: _ClassLayout = type(self).__dict__[_PYTREE_DATACLASS_INFO]
        if layout.uses_default_keys:
            keyed = [
                (jax.tree_util.GetAttrKey(n), getattr(self, n)) for n in layout.child_field_names
            ]
        else:
            keyed = [(self.key_for_field(n), getattr(self, n)) for n in layout.child_field_names]
        return keyed, self._static_metadata()

    @typing.final
    def tree_flatten(self) -> tuple[list[Any], StructStaticMetadata]:
        """Flattens to children plus static metadata (JAX's unkeyed fast path)."""
        metadata = self.__dict__.get(_STATIC_METADATA_CACHE) or self._static_metadata()
        return [getattr(self, n) for n in metadata.child_field_names], metadata

    @typing.final
    @classmethod
    def tree_unflatten(cls, aux_data: StructStaticMetadata, children: Sequence[Any]) -> Struct:
        """Rebuilds an instance from ``tree_flatten``'s output without calling ``__init__``."""
        instance = object.__new__(cls)
        fields = instance.__dict__
        fields.update(aux_data.static_fields)
        fields.update(zip(aux_data.child_field_names, children))
        fields[_STATIC_METADATA_CACHE] = aux_data
        return instance

    def treescope_color(self) -> str | tuple[str, str]:
        """The colour treescope draws this struct with.

        Callable structs (layers) get a colour derived from their type's qualified name (for
        pz_flax's own types, their penzai counterpart's, so colours match penzai's), so every
        layer type is recognisable at a glance; other structs are transparent. Override to
        choose a colour without writing a treescope handler.

        Returns:
            A CSS colour, or a ``(border, fill)`` pair of CSS colours.
        """
        if callable(self):
            from pz_flax.core._treescope_handlers import struct_handler

            return struct_handler.type_color(type(self))
        return "transparent"

    def __repr__(self) -> str:
        import treescope

        with treescope.using_expansion_strategy(max_height=1):
            return treescope.render_to_text(self, ignore_exceptions=True)

    def _repr_pretty_(self, printer, cycle):
        """IPython pretty-printing: the full treescope text rendering, line by line."""
        del cycle
        import treescope

        for index, line in enumerate(
            treescope.render_to_text(self, ignore_exceptions=True).split("\n")
        ):
            if index:
                printer.break_()
            printer.text(line)

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any):
        from pz_flax.core._treescope_handlers import struct_handler

        return struct_handler.render_struct(self, path, subtree_renderer)
