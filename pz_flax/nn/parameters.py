"""Parameters of neural-network layers, and how they are named and initialized.

A layer reads its learned values through ``param.value`` and nothing else (the
``ParameterLike`` protocol). Usually the object is a ``Parameter`` variable, which in
pz_flax is also a Flax NNX ``Param``, but anything with a ``value`` works: a frozen
``ParameterValue``, or a user wrapper that, say, dequantizes on read.

Initialization is keyed by name rather than by call order: a model is built from one base
PRNG key shared by every layer, and each parameter draws its own key by hashing its unique
string label into that base key (``derive_param_key``). Adding, removing or reordering
layers therefore never changes the initial values of the other parameters, and the same
label always gets the same values as in penzai.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable
from typing import Any
from typing import Generic
from typing import Protocol
from typing import TypeVar

import jax

from pz_flax.core import tree_util
from pz_flax.core import variables

T = TypeVar("T")


class ParameterLike(Protocol, Generic[T]):
    """What a layer may assume about one of its parameters: it has a ``value``.

    Annotate parameter fields of layers with ``ParameterLike[...]`` rather than with a
    concrete class, so that users can substitute their own parameter objects. Being a
    ``Protocol``, it needs no explicit subclassing. (Do not subclass it from a class that
    stores ``value`` as a plain dataclass field: the abstract property would shadow it.)
    """

    @property
    @abc.abstractmethod
    def value(self) -> T:
        """The parameter's current value; may raise if it is not available (e.g. a slot)."""
        raise NotImplementedError


def derive_param_key(base_rng: jax.Array, name: str) -> jax.Array:
    """Derives the PRNG key of one parameter from the model's base key and its name.

    The name is hashed (SHA-1, first four bytes) and folded into the base key, so keys
    depend only on labels, never on construction order.

    Args:
        base_rng: The model-wide base PRNG key.
        name: The parameter's unique label.

    Returns:
        A PRNG key specific to this name.
    """
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return jax.random.fold_in(base_rng, int.from_bytes(digest[:4], byteorder="big"))


def make_parameter(
    name: str,
    init_base_rng: jax.Array | None,
    initializer: Callable[..., T],
    *init_args,
    metadata: dict[Any, Any] | None = None,
    **init_kwargs,
) -> variables.Parameter[T] | variables.ParameterSlot:
    """Creates a named parameter, or an empty slot for one.

    Passing ``init_base_rng=None`` builds the model's structure without computing any
    values: each parameter becomes a ``ParameterSlot`` with its label, to be filled later
    with ``bind_variables`` (for instance from a checkpoint).

    Args:
        name: The parameter's label; must be unique within the model.
        init_base_rng: The model-wide base PRNG key, or None to make a slot.
        initializer: Called as ``initializer(key, *init_args, **init_kwargs)`` with this
            parameter's own key to compute the value.
        *init_args: Extra positional arguments for ``initializer``.
        metadata: Metadata to attach to the ``Parameter`` (default: empty).
        **init_kwargs: Extra keyword arguments for ``initializer``.

    Returns:
        A ``Parameter`` labelled ``name``, or ``ParameterSlot(name)`` if no key was given.
    """
    if init_base_rng is None:
        return variables.ParameterSlot(name)
    value = initializer(derive_param_key(init_base_rng, name), *init_args, **init_kwargs)
    return variables.Parameter(
        value=value, label=name, metadata={} if metadata is None else metadata
    )


def assert_no_parameter_slots(model: Any) -> None:
    """Checks that every parameter of ``model`` has been filled in.

    Useful before training or saving a model that was built with ``init_base_rng=None``
    and then bound to values.

    Args:
        model: Any pytree, usually a layer.

    Raises:
        ValueError: If some ``ParameterSlot`` remains; the message lists each slot's path
            and label.
    """
    slots_with_paths = [
        (path, leaf)
        for path, leaf in tree_util.flatten_with_path_stopping_at_variables(model)[0]
        if isinstance(leaf, variables.ParameterSlot)
    ]
    if slots_with_paths:
        listing = ", ".join(
            f"{jax.tree_util.keystr(path) or '<root>'}: {slot.label!r}"
            for path, slot in slots_with_paths
        )
        raise ValueError(
            f"Unexpected ParameterSlots found in model (bind values to them first): {listing}"
        )
