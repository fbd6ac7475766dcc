"""Flax Linen modules as pz_flax layers, through Flax's own Linen-to-NNX bridge.

`unflaxify_apply` takes what a Linen ``module.apply`` takes (the module, its variables, an
example call) and returns an `InterceptedFlaxModuleMethod` layer that makes that call. The
module is put into ``flax.nnx.bridge.ToNNX`` holding the given variables, and that NNX module
goes through ``pz_flax.from_nnx`` like any other NNX model: its parameters become labelled
``pz.Parameter`` objects (``Dense_0/kernel``), its other collections ``pz.StateVariable``
objects, and the result converts back with ``pz_flax.to_nnx`` (``layer.body``) and can be
selected into and patched. (``pz_flax.checkpoint.save`` refuses it: the Linen module and the
dicts ``ToNNX`` keeps its variables in are not things a checkpoint manifest can describe;
save the arrays instead.) The layer is
called as penzai's is, with the call's arguments packed in an `ArgsAndKwargs`::

    layer = unflaxify.unflaxify_apply(linen_mlp, variables, x)
    y = layer(unflaxify.ArgsAndKwargs.capture(x))          # == linen_mlp.apply(variables, x)

Collections named in ``mutable`` (``batch_stats``, say) are written back to their state
variables after each call; RNG streams the module draws from come from the
``random_streams`` side input (``pz.RandomStream`` objects by stream name).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
from flax import linen
from flax import nnx
from flax.nnx import bridge
from treescope import formatting_util

from pz_flax.core import random_stream
from pz_flax.core import struct
from pz_flax.interop import convert
from pz_flax.interop import wrappers
from pz_flax.nn import layer as layer_base

_PARAMS_COLLECTION = "params"
# The RNG stream Linen initialisers draw from; applying a module does not use it.
_INIT_RNG_STREAM = "params"


@struct.pytree_dataclass
class ArgsAndKwargs(struct.Struct):
    """The positional and keyword arguments of one call, as a pytree.

    Attributes:
        args: Positional arguments.
        kwargs: Keyword arguments.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @classmethod
    def capture(cls, *args: Any, **kwargs: Any) -> ArgsAndKwargs:
        """Packs the arguments of this call: ``ArgsAndKwargs.capture(x, train=False)``."""
        return cls(args=args, kwargs=kwargs)


@struct.pytree_dataclass
class InterceptedFlaxModuleMethod(layer_base.Layer):
    """A Linen module method, running on pz_flax variables.

    Attributes:
        module: The unbound Linen module (static).
        method_name: The name of the module method the layer calls (static).
        body: The module inside ``bridge.ToNNX``, converted by ``pz_flax.from_nnx``: it holds
            the variables.
        mutable_collections: Variable collections the method may change (static); their
            new values are written back after each call.
        rng_names: RNG streams the method draws from (static); each must be in the
            ``random_streams`` side input.
    """

    module: linen.Module = dataclasses.field(metadata={"pytree_node": False})
    method_name: str = dataclasses.field(metadata={"pytree_node": False})
    body: layer_base.Layer
    mutable_collections: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"pytree_node": False}
    )
    rng_names: frozenset[str] = dataclasses.field(
        default=frozenset(), metadata={"pytree_node": False}
    )

    def __call__(
        self,
        args_and_kwargs: ArgsAndKwargs,
        random_streams: dict[str, random_stream.RandomStream] | None = None,
        **side_inputs: Any,
    ) -> Any:
        """Calls the Linen method with the given arguments on the layer's variables.

        Args:
            args_and_kwargs: The method's positional and keyword arguments.
            random_streams: One random stream per name in ``rng_names``. The keys differ
                from what Flax would draw, so random outputs differ from Linen's.
            **side_inputs: Other side inputs (unused by the Linen code itself).

        Returns:
            What the Linen method returns.

        Raises:
            TypeError: If a stream of ``rng_names`` is missing from ``random_streams``.
        """
        del side_inputs
        random_streams = random_streams or {}
        missing = sorted(self.rng_names - set(random_streams))
        if missing:
            raise TypeError(
                f"InterceptedFlaxModuleMethod for {type(self.module).__name__} draws from the"
                f" RNG streams {missing}, but the random_streams side input has no RandomStream"
                f" named {missing[0]!r}."
            )
        keys = {name: random_streams[name].next_key() for name in sorted(self.rng_names)}
        bindings: list[Any] = []
        bridged = convert.rebuild_wrapped_module(self.body, bindings)
        output = bridged(
            *args_and_kwargs.args,
            rngs=nnx.Rngs(**keys) if keys else None,
            method=self.method_name,
            mutable=list(self.mutable_collections) or False,
            **args_and_kwargs.kwargs,
        )
        wrappers.write_back_changed_variables(bindings)
        return output

    def treescope_color(self) -> str:
        # Coloured by the Linen class, so that different Linen models look different.
        return formatting_util.color_from_string(type(self.module).__name__)


def _mutable_collections(mutable: Any, collections: Sequence[str]) -> tuple[str, ...]:
    """The collections a Linen ``mutable=`` argument (bool, str or list of str) names."""
    if mutable is True:
        return tuple(name for name in collections if name != _PARAMS_COLLECTION)
    if mutable is False:
        return ()
    if isinstance(mutable, str):
        return (mutable,)
    if isinstance(mutable, Sequence) and all(isinstance(name, str) for name in mutable):
        return tuple(mutable)
    raise TypeError(
        f"mutable must be a bool, a collection name or a list of collection names, got {mutable!r}."
    )


def _rng_names(rngs: Any) -> frozenset[str]:
    """The streams a Linen ``rngs=`` argument provides, apart from initialisation's."""
    if rngs is None or isinstance(rngs, jax.Array):
        # A single key is Linen's shorthand for the initialisation stream.
        return frozenset()
    return frozenset(name for name in rngs if name != _INIT_RNG_STREAM)


def _method_name(module: linen.Module, method: Callable[..., Any] | str | None) -> str:
    """The name of the method ``module.apply(..., method=method)`` would call."""
    if method is None:
        name = "__call__"
    elif isinstance(method, str):
        name = method
    else:
        name = method.__name__
    if not callable(getattr(type(module), name, None)):
        raise ValueError(f"{type(module).__name__} has no method {name!r}.")
    return name


def unflaxify_apply(
    module: linen.Module,
    variables: Any,
    *dummy_args: Any,
    rngs: Any = None,
    method: Callable[..., Any] | str | None = None,
    mutable: Any = False,
    **dummy_kwargs: Any,
) -> InterceptedFlaxModuleMethod:
    """Builds a pz_flax layer that makes the call ``module.apply(variables, *args, ...)``.

    Args:
        module: The Linen module.
        variables: Its variables by collection, as for ``module.apply``.
        *dummy_args: Example positional arguments. The call is traced once with them (no
            computation runs) to check that the variables fit the module.
        rngs: The RNG keys the call needs, by stream name (as for ``module.apply``); the
            layer takes ``random_streams`` of the same names instead.
        method: The method to call (a function of the module's class, or its name);
            ``__call__`` by default.
        mutable: The collections the call may change, as for ``module.apply``.
        **dummy_kwargs: Example keyword arguments.

    Returns:
        The layer; call it with ``ArgsAndKwargs.capture(*args, **kwargs)``.

    Raises:
        TypeError: If ``mutable`` is not a bool, a name or a list of names.
        ValueError: If ``variables`` is not a mapping of collections, or ``method`` names no
            method of the module.
    """
    if not isinstance(variables, Mapping):
        raise ValueError(
            "variables must map collection names to variable trees, as for"
            f" module.apply, but got a {type(variables).__name__}."
        )
    variables = dict(variables)
    method_name = _method_name(module, method)
    mutable_collections = _mutable_collections(mutable, tuple(variables))

    # Fail here, not at the first call, if the variables or the call do not fit the module.
    jax.eval_shape(
        lambda: module.apply(
            variables,
            *dummy_args,
            rngs=rngs,
            method=method_name,
            mutable=list(mutable_collections) or False,
            **dummy_kwargs,
        )
    )

    bridged = bridge.ToNNX(module)
    # What ToNNX does with the result of Linen's init, done with the caller's variables.
    for attribute, value in bridge.variables.linen_vars_to_nnx_attrs(variables).items():
        setattr(bridged, attribute, nnx.data(value))
    return InterceptedFlaxModuleMethod(
        module=module,
        method_name=method_name,
        body=convert.from_nnx(bridged),
        mutable_collections=mutable_collections,
        rng_names=_rng_names(rngs),
    )
