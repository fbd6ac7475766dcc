"""The ``Layer`` base class shared by every neural-network component.

A layer is a one-argument callable with an open set of keyword "side inputs":

* the positional argument is the value flowing through the network (an array, a named
  array, or a pytree of them), produced by the previous layer;
* the keyword side inputs carry context that many layers may want but most ignore, such as
  attention masks, token positions or random streams.

Fixing this calling convention is what makes combinators possible: a ``Sequential`` can
chain any layers without knowing what they are, and forward every side input to every
child. A layer that does not use a side input must simply accept and ignore it.

Because layers are frozen ``Struct`` dataclasses, a model is a plain pytree that can be
selected into, rewritten and rendered. State that must change while a model runs lives in
variables (``Parameter``, ``StateVariable``), which are shared by reference; see
``Layer.stateless_call`` for running a model functionally over frozen variable values.
"""

from __future__ import annotations

import abc
import typing
from collections.abc import Iterable
from typing import Any

from pz_flax.core import shapecheck
from pz_flax.core import struct
from pz_flax.core import variables as variables_lib


class Layer(struct.Struct, abc.ABC):
    """Abstract base class of neural-network layers and other one-argument callables.

    Subclasses are ``@pytree_dataclass`` structs that implement ``__call__``. Everything a
    layer needs at call time is either one of its fields or one of its arguments, so a layer
    can be copied, compared, jitted and edited like any other pytree.
    """

    @abc.abstractmethod
    def __call__(self, argument: Any, /, **side_inputs: Any) -> Any:
        """Applies the layer.

        Callers pass both the argument and the side inputs positionally/by keyword as shown,
        and must not rely on the parameter names a subclass chooses for ``argument``.

        Args:
            argument: The main input, usually the output of the previous layer: an array,
                a named array, or a pytree of them.
            **side_inputs: Context shared by every layer of a model (masks, positions,
                random streams, ...). Implementations must accept arbitrary keywords and
                ignore the ones they do not use, so that combinators can forward all of
                them blindly.

        Returns:
            The layer's output.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement __call__.")

    def bind_variables(
        self,
        variables: Iterable[variables_lib.AbstractVariable | variables_lib.AbstractVariableValue],
        allow_unused: bool = False,
    ) -> Layer:
        """Returns a copy of this layer with variables put into its matching slots.

        Shorthand for ``pz.bind_variables(layer, variables, allow_unused)``; see there.

        Args:
            variables: Variables, or frozen variable values, to insert by label.
            allow_unused: If False, a variable with no matching slot is an error.

        Returns:
            The layer with its slots filled.
        """
        return variables_lib.bind_variables(self, variables, allow_unused)

    @typing.final
    def stateless_call(
        self,
        variable_values: Iterable[variables_lib.AbstractVariableValue],
        argument: Any,
        /,
        **side_inputs: Any,
    ) -> tuple[Any, tuple[variables_lib.AbstractVariableValue, ...]]:
        """Runs the layer as a pure function of frozen variable values.

        This is the bridge between stateful layers and functional JAX code (``jax.jit``,
        ``jax.grad``): variables are passed in as frozen values and their final values come
        back out, while the layer object and its existing variables are left untouched.
        Concretely:

        1. every variable still bound inside the layer is frozen, so running the layer
           cannot mutate it;
        2. each given value is unfrozen into a fresh, private mutable variable;
        3. those variables fill the matching slots of the layer, the argument and the side
           inputs (so, e.g., a random stream passed as a side input can be bound too);
        4. the layer runs, and the private variables are frozen again and returned.

        Typically used together with ``pz.unbind_variables``.

        Args:
            variable_values: Starting values of the variables that may change while the
                layer runs, matched to slots by label.
            argument: The layer's main input; may contain variable slots.
            **side_inputs: Side inputs; may contain variable slots.

        Returns:
            ``(output, updated_values)``, the updated values in the order of
            ``variable_values``.
        """
        frozen_self = variables_lib.freeze_variables(self)
        temporaries = [value.unfreeze_as_copy() for value in variable_values]
        bound_self, bound_argument, bound_side_inputs = variables_lib.bind_variables(
            (frozen_self, argument, side_inputs), temporaries
        )
        output = bound_self(bound_argument, **bound_side_inputs)
        return output, tuple(variable.freeze() for variable in temporaries)

    def input_structure(self) -> shapecheck.StructureAnnotation:
        """Describes the inputs this layer accepts, as a ``pz.chk`` structure.

        Layers that know their input shape (``Linear``, ``CheckedSequential``, ...) override
        this; the default accepts anything. The result can be checked against a value with
        ``pz.chk.check_structure``.

        Returns:
            A pytree of ``pz.chk.ArraySpec`` / wildcard nodes.
        """
        return shapecheck.ANY

    def output_structure(self) -> shapecheck.StructureAnnotation:
        """Describes the outputs this layer produces, as a ``pz.chk`` structure.

        Dimension variables shared with ``input_structure`` express how output sizes
        relate to input sizes. The default promises nothing.

        Returns:
            A pytree of ``pz.chk.ArraySpec`` / wildcard nodes.
        """
        return shapecheck.ANY

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any):
        # Imported lazily: the handler depends on treescope and on the grouping module,
        # neither of which is needed merely to define or run layers.
        from pz_flax.nn._treescope_handlers import layer_handler

        return layer_handler.handle_layer(self, path, subtree_renderer)
