"""Parameter-free layers: activations, softmax, casts and soft capping.

Wrapping such operations as layers, instead of calling them inline, keeps them visible in
the model tree, so that they show up in treescope and can be selected and swapped (say,
GELU for ReLU) without touching code.

This module also owns pz_flax's one table of elementwise functions
(``elementwise_function_registry``), which ``Elementwise``, the NNX bridge and the checkpoint
allow-list all read.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pz_flax.core import named_axes
from pz_flax.core import registry as registry_lib
from pz_flax.core import struct
from pz_flax.nn import layer as layer_base

#### The elementwise-function table ####

# One table, read by ``Elementwise`` (which skips ``nmap``'s vmap for these functions), by the
# NNX bridge (which turns a bare NNX activation into ``Elementwise(fn)`` and back) and by the
# checkpoint allow-list (which lets a checkpoint name these pure array functions). Keys are
# the functions; values are the names shown for them.
def _describe_function(fn: Any) -> str:
    # The declared name (``jax.nn.relu``) rather than the defining module's private path.
    declared = elementwise_function_registry.get(fn)
    return declared or getattr(fn, "__qualname__", None) or repr(fn)


elementwise_function_registry: registry_lib.Registry[Callable[..., Any], str] = (
    registry_lib.Registry("elementwise functions", describe_key=_describe_function)
)

# JAX functions that act on each element independently, whatever the input shape. For them,
# vectorizing over named axes (what ``nmap`` does, one ``vmap`` per axis) and applying the
# function once to the whole data array give the same result.
_BUILTIN_ELEMENTWISE_NAMES = {
    jax.nn: (
        "celu elu gelu hard_sigmoid hard_silu hard_swish hard_tanh identity leaky_relu"
        " log_sigmoid mish relu relu6 selu sigmoid silu soft_sign softplus sparse_plus"
        " sparse_sigmoid squareplus swish"
    ),
    jnp: (
        "abs cos cosh exp exp2 expm1 log log1p log2 negative reciprocal sign sin sinh sqrt"
        " square tan tanh"
    ),
    jax.lax: "abs cos erf exp logistic neg rsqrt sin sqrt tanh",
}


def register_elementwise_function(
    fn: Callable[..., Any], name: str | None = None, *, replace: bool = False
) -> Callable[..., Any]:
    """Declares ``fn`` elementwise: it acts on each element of its input independently.

    Declare only such functions (activations, pointwise math). Declaring a function lets
    ``Elementwise(fn)`` apply it to the whole data array of a named array instead of
    vectorizing it over every named axis (the two agree only for elementwise functions), lets
    ``pz_flax.interop.from_nnx`` turn it into ``Elementwise(fn)`` (and ``to_nnx`` back into
    the bare function), and lets a checkpoint name it when it lives in one of JAX's public
    namespaces (``jax.nn``, ``jax.numpy``, ...). Use ``elementwise_function_registry.scoped``
    for a declaration that should last only for a ``with`` block.

    Args:
        fn: The function, a hashable callable such as ``jax.nn.relu``.
        name: The name shown for it; defaults to ``fn.__name__``.
        replace: Allow declaring an already declared function again (with a new name).

    Returns:
        ``fn``, so this can be used as a decorator.

    Raises:
        TypeError: If ``fn`` is not callable or not hashable.
        ValueError: If ``fn`` is declared already and ``replace`` is False.
    """
    if not callable(fn):
        raise TypeError(f"register_elementwise_function expects a callable, got {fn!r}.")
    elementwise_function_registry.register(
        fn, name or getattr(fn, "__name__", repr(fn)), replace=replace
    )
    return fn


def unregister_elementwise_function(fn: Callable[..., Any]) -> str:
    """Withdraws a declaration made by ``register_elementwise_function``; returns its name.

    ``Elementwise(fn)`` then vectorizes ``fn`` with ``nmap`` again, and the NNX bridge wraps
    it as a positional function.

    Raises:
        KeyError: If ``fn`` is not declared elementwise.
    """
    return elementwise_function_registry.unregister(fn)


def is_elementwise_function(fn: Any) -> bool:
    """Whether ``fn`` itself is declared elementwise (see ``register_elementwise_function``)."""
    return fn in elementwise_function_registry


def known_elementwise_functions() -> frozenset:
    """Every function currently declared elementwise, pz_flax's own and those registered."""
    return frozenset(elementwise_function_registry)


for _module, _names in _BUILTIN_ELEMENTWISE_NAMES.items():
    for _name in _names.split():
        _function = getattr(_module, _name, None)
        # ``jax.lax.abs`` and ``jnp.abs`` may be one function; declare it once.
        if _function is not None and not is_elementwise_function(_function):
            register_elementwise_function(_function, f"{_module.__name__}.{_name}")


def _is_known_elementwise(fn: Any) -> bool:
    """True for a declared elementwise function, possibly with scalar keyword arguments bound."""
    if isinstance(fn, functools.partial):
        if fn.args or not all(
            isinstance(value, bool | int | float | str) for value in fn.keywords.values()
        ):
            return False
        fn = fn.func
    return is_elementwise_function(fn)


def _apply_to_data(fn: Callable[[Any], Any], value: named_axes.NamedArrayBase) -> Any:
    """Applies an elementwise ``fn`` to the data array, keeping the axis layout as it is."""
    if type(value) is named_axes.NamedArray:
        return named_axes.NamedArray(named_axes=value.named_axes, data_array=fn(value.data_array))
    if type(value) is named_axes.NamedArrayView:
        return dataclasses.replace(value, data_array=fn(value.data_array))
    return named_axes.nmap(fn)(value)


@struct.pytree_dataclass
class Elementwise(layer_base.Layer):
    """Applies a function to every element of a named array (e.g. an activation).

    The function is vectorized over all named axes with ``nmap``, so it sees only the
    positional axes (none, for a fully named array). A plain JAX array is passed to the
    function directly. The function is static configuration, not a parameter.

    Functions declared elementwise (``jax.nn.relu``, ``jax.nn.gelu``, ``jnp.tanh``, ...:
    see ``register_elementwise_function``; optionally with scalar keyword arguments bound by
    ``functools.partial``) skip the ``vmap`` of ``nmap``: the function is applied to the data
    array directly, which gives the same values at a fraction of the tracing cost.

    Attributes:
        fn: The function to apply, such as ``jax.nn.relu``.
    """

    fn: Callable[[Any], Any] = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, value: Any, **_unused_side_inputs: Any) -> Any:
        """Returns ``fn`` applied elementwise to ``value``."""
        if isinstance(value, named_axes.NamedArrayBase):
            if _is_known_elementwise(self.fn):
                return _apply_to_data(self.fn, value)
            return named_axes.nmap(self.fn)(value)
        return self.fn(value)

    def treescope_color(self) -> str:
        from treescope import formatting_util

        return formatting_util.color_from_string(repr(self.fn))


def _axis_tuple(axes: str | tuple[str, ...]) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes)


@struct.pytree_dataclass
class Softmax(layer_base.Layer):
    """Applies a softmax jointly over one or more named axes.

    With several axes, the normalization is over their joint extent (the outputs sum to
    one over all of them together), and every other axis is vectorized over.

    Attributes:
        axes: The axis name, or tuple of names, to normalize over.
    """

    axes: str | tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})

    def __call__(
        self, inputs: named_axes.NamedArrayBase, **_unused_side_inputs: Any
    ) -> named_axes.NamedArrayBase:
        """Returns the softmax of ``inputs`` over ``axes``.

        Raises:
            ValueError: If ``inputs`` lacks one of the axes; the message names the axis.
        """
        axes = _axis_tuple(self.axes)
        named_shape = inputs.named_shape
        missing = [name for name in axes if name not in named_shape]
        if missing:
            raise ValueError(
                f"Softmax over axes {axes} got an input without axis {missing[0]!r}; input"
                f" named_shape is {dict(named_shape)}."
            )
        if type(inputs) is named_axes.NamedArray and not inputs.positional_shape:
            # The data axes are exactly the named axes, in order: normalize over them in
            # place instead of untagging and vectorizing over the others.
            storage_order = list(inputs.named_axes)
            data_axes = tuple(storage_order.index(name) for name in axes)
            return named_axes.NamedArray(
                named_axes=inputs.named_axes,
                data_array=jax.nn.softmax(inputs.data_array, axis=data_axes),
            )
        return named_axes.nmap(jax.nn.softmax)(
            inputs.untag(*axes), axis=tuple(range(len(axes)))
        ).tag(*axes)


@struct.pytree_dataclass
class CastToDType(layer_base.Layer):
    """Casts every array in its input to a fixed dtype.

    Attributes:
        dtype: The target dtype.
    """

    dtype: jax.typing.DTypeLike = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, value: Any, **_unused_side_inputs: Any) -> Any:
        """Returns ``value`` with each array leaf (named or not) cast to ``dtype``."""
        # A named array is a pytree whose only leaf is its data array, so mapping over
        # leaves casts named and positional arrays alike and keeps the axis names.
        return jax.tree_util.tree_map(lambda leaf: leaf.astype(self.dtype), value)


@struct.pytree_dataclass
class TanhSoftCap(layer_base.Layer):
    """Squashes values smoothly into ``(-soft_cap, soft_cap)``: ``tanh(x / c) * c``.

    Used, e.g., on attention logits and final logits of Gemma 2 models to keep them
    bounded while staying near-linear for small values.

    Attributes:
        soft_cap: The bound ``c``; a pytree child, so it may be an array.
    """

    soft_cap: float | jax.Array

    def __call__(self, value: Any, **_unused_side_inputs: Any) -> Any:
        """Returns ``tanh(value / soft_cap) * soft_cap``."""
        scaled = value / self.soft_cap
        if isinstance(scaled, named_axes.NamedArrayBase):
            return _apply_to_data(jnp.tanh, scaled) * self.soft_cap
        return named_axes.nmap(jnp.tanh)(scaled) * self.soft_cap
