"""Linear and affine layers over named axes, and initializers for their weights.

A weight here is a ``NamedArray`` whose axis names say what each axis does: axes shared
with the input are contracted away, axes absent from the input are new output axes, and
axes listed as neither are "parallel" (a block-diagonal operator, e.g. one matrix per
attention head). Because contraction goes by name, the layout of the input never matters
and any extra input axes (batch, sequence, ...) are carried through untouched.

The initializers follow the ``LinearOperatorWeightInitializer`` protocol, which spells out
the role of every axis so that fan-in/fan-out scaling works for any weight shape. They
produce the same values as penzai's for the same key and configuration.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import Protocol

import jax
import jax.numpy as jnp

from pz_flax.core import named_axes
from pz_flax.core import shapecheck
from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.nn import grouping
from pz_flax.nn import layer as layer_base
from pz_flax.nn import parameters

NamedArray = named_axes.NamedArray
Parameter = variables.Parameter
ParameterValue = variables.ParameterValue


#### Initializers ####


class LinearOperatorWeightInitializer(Protocol):
    """Signature of an initializer for a named linear-operator weight.

    Every axis of the weight is passed in exactly one role, so that an initializer can
    compute fan-in and fan-out for arbitrary operators (multi-axis contractions, per-head
    projections, convolution kernels) without guessing.
    """

    def __call__(
        self,
        key: jax.Array,
        *,
        input_axes: dict[str, int],
        output_axes: dict[str, int],
        parallel_axes: dict[str, int],
        convolution_spatial_axes: dict[str, int],
        dtype: jax.typing.DTypeLike,
    ) -> NamedArray:
        """Returns a new weight holding all of the given axes.

        Args:
            key: PRNG key for this weight.
            input_axes: Axes contracted with the input (they count toward fan-in).
            output_axes: Axes created in the output (they count toward fan-out).
            parallel_axes: Axes over which independent operators are applied (e.g. heads);
                they count toward neither fan.
            convolution_spatial_axes: Kernel spatial axes of a convolution (they multiply
                both fans, as a receptive field).
            dtype: The weight's dtype.

        Returns:
            The initialized weight, with every axis named. No name may appear in two roles.
        """


def check_unique_axis_names_for_initializer(
    input_axes: dict[str, int],
    output_axes: dict[str, int],
    parallel_axes: dict[str, int],
    convolution_spatial_axes: dict[str, int],
) -> None:
    """Raises ``ValueError`` if an axis name is given in more than one role."""
    counts = collections.Counter(
        itertools.chain(input_axes, output_axes, parallel_axes, convolution_spatial_axes)
    )
    duplicated = sorted(name for name, count in counts.items() if count > 1)
    if duplicated:
        raise ValueError(
            f"Duplicate axis names during initialization: {duplicated} appear in more than one"
            f" of input_axes={input_axes}, output_axes={output_axes},"
            f" parallel_axes={parallel_axes},"
            f" convolution_spatial_axes={convolution_spatial_axes}."
        )


def variance_scaling_initializer(
    key: jax.Array,
    *,
    scale: float,
    mode: Literal["fan_in", "fan_out", "fan_avg"],
    distribution: Literal["uniform", "normal", "truncated_normal"],
    input_axes: dict[str, int],
    output_axes: dict[str, int],
    parallel_axes: dict[str, int],
    convolution_spatial_axes: dict[str, int],
    dtype: jax.typing.DTypeLike,
) -> NamedArray:
    """Variance-scaling initialization (Glorot/He/LeCun family) for a named weight.

    Delegates to ``jax.nn.initializers.variance_scaling`` with input axes as its
    ``in_axis``, output axes as ``out_axis``, parallel axes as ``batch_axis`` and the
    spatial axes as receptive field.

    Args:
        key: PRNG key.
        scale: Variance scale.
        mode: Which fan to normalize by.
        distribution: The distribution to draw from.
        input_axes: See ``LinearOperatorWeightInitializer``.
        output_axes: See ``LinearOperatorWeightInitializer``.
        parallel_axes: See ``LinearOperatorWeightInitializer``.
        convolution_spatial_axes: See ``LinearOperatorWeightInitializer``.
        dtype: The weight's dtype.

    Returns:
        The weight, with axes ordered parallel, spatial, input, output.
    """
    check_unique_axis_names_for_initializer(
        input_axes, output_axes, parallel_axes, convolution_spatial_axes
    )
    names: list[str] = []
    shape: list[int] = []
    roles: dict[str, list[int]] = {"parallel": [], "input": [], "output": []}
    for role, axes in (
        ("parallel", parallel_axes),
        ("spatial", convolution_spatial_axes),
        ("input", input_axes),
        ("output", output_axes),
    ):
        for name, size in axes.items():
            if role in roles:
                roles[role].append(len(shape))
            names.append(name)
            shape.append(size)
    # JAX's variance_scaling insists on at least two dimensions even when some roles are
    # empty. Two trailing size-1 axes belong to no role, so they count as receptive field
    # of size 1 (no effect on the fans); they are dropped again after sampling.
    sampled = jax.nn.initializers.variance_scaling(
        scale=scale,
        mode=mode,
        distribution=distribution,
        in_axis=roles["input"],
        out_axis=roles["output"],
        batch_axis=roles["parallel"],
    )(key, (*shape, 1, 1), dtype)
    return named_axes.wrap(sampled[..., 0, 0]).tag(*names)


xavier_uniform_initializer = functools.partial(
    variance_scaling_initializer, scale=1.0, mode="fan_avg", distribution="uniform"
)
xavier_uniform_initializer.__doc__ = (
    "Glorot/Xavier uniform initializer: ``variance_scaling_initializer`` with scale 1,"
    " fan_avg, uniform."
)

xavier_normal_initializer = functools.partial(
    variance_scaling_initializer, scale=1.0, mode="fan_avg", distribution="normal"
)
xavier_normal_initializer.__doc__ = (
    "Glorot/Xavier normal initializer: ``variance_scaling_initializer`` with scale 1,"
    " fan_avg, normal."
)


def constant_initializer(value: float) -> LinearOperatorWeightInitializer:
    """Makes an initializer that fills every weight entry with ``value``.

    Args:
        value: The fill value.

    Returns:
        A ``LinearOperatorWeightInitializer`` (the key is ignored).
    """

    def initialize_constant(
        key: jax.Array,
        *,
        input_axes: dict[str, int],
        output_axes: dict[str, int],
        parallel_axes: dict[str, int],
        convolution_spatial_axes: dict[str, int],
        dtype: jax.typing.DTypeLike,
    ) -> NamedArray:
        del key
        check_unique_axis_names_for_initializer(
            input_axes, output_axes, parallel_axes, convolution_spatial_axes
        )
        all_axes = {**input_axes, **output_axes, **parallel_axes, **convolution_spatial_axes}
        return named_axes.full(all_axes, value, dtype=dtype)

    initialize_constant.__doc__ = f"Constant initializer filling weights with {value!r}."
    return initialize_constant


zero_initializer = constant_initializer(0.0)


#### Contraction ####


def _axis_tuple(names: str | Sequence[str]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def _fully_named_data(
    array: named_axes.NamedArrayBase, description: str
) -> tuple[tuple, jax.Array]:
    """Returns ``(names, data)`` with ``data``'s axes in the order of ``names``.

    A ``NamedArray`` without positional axes already stores its named axes in order, so its
    data array is used as is; other layouts are transposed by ``unwrap``.
    """
    if not isinstance(array, named_axes.NamedArrayBase):
        raise TypeError(f"{description} must be a NamedArray, got {type(array).__name__}.")
    if array.positional_shape:
        raise ValueError(
            f"{description} has positional axes of shape {array.positional_shape}"
            f" (named shape {dict(array.named_shape)}); tag them with names first."
        )
    if type(array) is named_axes.NamedArray:
        return tuple(array.named_axes), array.data_array
    names = tuple(array.named_shape)
    return names, array.unwrap(*names)


def contract(
    names: str | Sequence[named_axes.AxisName],
    left: NamedArray,
    right: NamedArray,
) -> NamedArray:
    """Contracts two named arrays over the given axes (a tensordot by name).

    The named axes in ``names`` are summed over; every other axis name present in both
    arrays is a batch axis (computed pointwise, as under ``nmap``); the remaining axes of
    each side are kept. The result is built with one ``lax.dot_general``, without
    transposing fully named ``NamedArray`` operands.

    Args:
        names: The axis name, or names, to contract.
        left: A named array with no positional axes.
        right: A named array with no positional axes.

    Returns:
        A ``NamedArray`` with every axis of ``left`` and ``right`` except ``names``.

    Raises:
        ValueError: If a contracted axis is missing from either side, or an axis has
            different sizes on the two sides; the message names the axis and the sizes.
    """
    contracted = _axis_tuple(names)
    left_names, left_data = _fully_named_data(left, "contract: the left operand")
    right_names, right_data = _fully_named_data(right, "contract: the right operand")
    left_index = {name: i for i, name in enumerate(left_names)}
    right_index = {name: i for i, name in enumerate(right_names)}
    for name in contracted:
        if name not in left_index or name not in right_index:
            raise ValueError(
                f"contract: axis {name!r} must be present in both arrays, but the left named"
                f" shape is {dict(zip(left_names, left_data.shape))} and the right one is"
                f" {dict(zip(right_names, right_data.shape))}."
            )
    contracted_set = set(contracted)
    batch = [name for name in left_names if name in right_index and name not in contracted_set]
    for name in (*contracted, *batch):
        left_size = left_data.shape[left_index[name]]
        right_size = right_data.shape[right_index[name]]
        if left_size != right_size:
            raise ValueError(
                f"contract: axis {name!r} has size {left_size} on the left but {right_size} on"
                " the right."
            )
    shared = contracted_set.union(batch)
    left_free = [name for name in left_names if name not in shared]
    right_free = [name for name in right_names if name not in shared]

    if left_data.dtype != right_data.dtype:
        # Promote like jnp.tensordot does (weak types included); lax.dot_general wants
        # matching dtypes.
        dtype = jnp.result_type(left_data, right_data)
        left_data = left_data.astype(dtype)
        right_data = right_data.astype(dtype)
    result = jax.lax.dot_general(
        left_data,
        right_data,
        (
            ([left_index[n] for n in contracted], [right_index[n] for n in contracted]),
            ([left_index[n] for n in batch], [right_index[n] for n in batch]),
        ),
    )
    out_names = (*batch, *left_free, *right_free)
    return NamedArray(
        named_axes=collections.OrderedDict(zip(out_names, result.shape)), data_array=result
    )


#### Layers ####


@struct.pytree_dataclass
class RenameAxes(layer_base.Layer):
    """Renames axes of its named-array input, leaving the data untouched.

    Attributes:
        old: The axis name, or tuple of names, to rename.
        new: The new name(s), matched to ``old`` by position.
    """

    old: str | tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})
    new: str | tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, value: NamedArray, **_unused_side_inputs: Any) -> NamedArray:
        """Returns ``value`` with each ``old`` axis called by its ``new`` name.

        Raises:
            ValueError: If ``old`` and ``new`` differ in length, or an ``old`` axis is
                missing from the input.
        """
        old = _axis_tuple(self.old)
        new = _axis_tuple(self.new)
        if len(old) != len(new):
            raise ValueError(
                f"RenameAxes needs as many new names as old ones; got old={old}, new={new}."
            )
        named_shape = value.named_shape
        missing = [name for name in old if name not in named_shape]
        if missing:
            raise ValueError(
                f"RenameAxes({old} -> {new}) got an input without axis {missing[0]!r}; input"
                f" named_shape is {dict(named_shape)}."
            )
        return value.untag(*old).tag(*new)

    def input_structure(self) -> shapecheck.StructureAnnotation:
        return shapecheck.ArraySpec(
            named_shape={
                **shapecheck.var("others"),
                **shapecheck.vars_for_axes("renamed", _axis_tuple(self.old)),
            }
        )

    def output_structure(self) -> shapecheck.StructureAnnotation:
        old = _axis_tuple(self.old)
        renamed = shapecheck.vars_for_axes("renamed", old)
        return shapecheck.ArraySpec(
            named_shape={
                **shapecheck.var("others"),
                **{
                    new_name: renamed[old_name]
                    for old_name, new_name in zip(old, _axis_tuple(self.new))
                },
            }
        )


@struct.pytree_dataclass
class LinearInPlace(grouping.Sequential):
    """A ``Linear`` followed by a ``RenameAxes``: a linear map that keeps axis names.

    ``Linear.from_config`` returns this when an output axis has the same name as an input
    axis (e.g. ``embedding -> embedding``): the weight produces a temporary ``<name>_out``
    axis, which is renamed back. Being a distinct ``Sequential`` subclass makes such
    operators easy to recognise and select.

    Attributes:
        sublayers: The ``Linear`` and ``RenameAxes`` layers.
    """

    sublayers: list[layer_base.Layer]

    def treescope_color(self) -> tuple[str, str]:
        return "#eba875", "color-mix(in oklab, #eba875 25%, white)"


def _batched_floating_spec(axes: Mapping[str, int]) -> shapecheck.ArraySpec:
    """A floating array with exactly ``axes`` plus any batch axes, bound to the variable ``B``.

    Using the same variable ``B`` in a layer's input and output structures makes a structure
    check require that the layer passes the batch axes through unchanged.
    """
    return shapecheck.ArraySpec(named_shape={**shapecheck.var("B"), **axes}, dtype=jnp.floating)


def _named_shape_summary(value: Any) -> str:
    if isinstance(value, named_axes.NamedArrayBase):
        return (
            f"named shape {dict(value.named_shape)}, positional shape {value.positional_shape},"
            f" dtype {value.dtype}"
        )
    shape = getattr(value, "shape", None)
    return f"a {type(value).__name__} (shape {shape}) instead of a NamedArray"


@struct.pytree_dataclass
class Linear(layer_base.Layer):
    """A general linear (not affine) operator on named arrays.

    The input is contracted with the weight over ``in_axis_names``; ``out_axis_names`` are
    weight axes that must not be in the input and appear in the output; any other weight
    axis is parallel (must be in the input, kept in the output, with a separate operator
    per index). Every other input axis is a batch axis and passes through.

    The input is checked before contracting: it must be a floating-point ``NamedArray``
    without positional axes that has every input and parallel axis at the weight's size
    and none of the output axes. Otherwise a ``pz.chk.StructureMismatchError`` names the
    layer (from the weight label), the axes and the sizes.

    Usually followed by ``AddBias``; build both with ``Affine.from_config``.

    Attributes:
        weights: The weight parameter; its ``value`` is a fully named ``NamedArray``.
        in_axis_names: Weight axes contracted with the input (removed).
        out_axis_names: Weight axes added to the output.
    """

    weights: parameters.ParameterLike[NamedArray]
    in_axis_names: tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})
    out_axis_names: tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, in_array: NamedArray, **_unused_side_inputs: Any) -> NamedArray:
        """Applies the operator.

        Args:
            in_array: The input; see the class docstring for what it must contain.
            **_unused_side_inputs: Ignored.

        Returns:
            The input with ``in_axis_names`` contracted away and ``out_axis_names`` added.

        Raises:
            pz.chk.StructureMismatchError: If the input does not fit the weights.
        """
        weight = self.weights.value
        self._check_input(in_array, weight)
        return contract(self.in_axis_names, in_array, weight)

    def _layer_description(self) -> str:
        label = getattr(self.weights, "label", None)
        if isinstance(self.weights, Parameter | ParameterValue) and isinstance(label, str):
            return f"Linear layer {label.removesuffix('.weights')!r}"
        return "Linear layer"

    def _check_input(self, in_array: Any, weight: NamedArray) -> None:
        """Checks the input against the weight directly, which is much cheaper than a
        general structure match and gives a message specific to linear layers."""
        problems = []
        if not isinstance(in_array, named_axes.NamedArrayBase):
            problems.append("the input is not a NamedArray")
        else:
            if in_array.positional_shape:
                problems.append(
                    f"the input has positional axes {in_array.positional_shape}; name them"
                )
            if not jnp.issubdtype(in_array.dtype, jnp.floating):
                problems.append(f"the input dtype {in_array.dtype} is not a floating type")
            input_shape = in_array.named_shape
            out_names = self.out_axis_names
            for name, size in weight.named_shape.items():
                actual = input_shape.get(name)
                if name in out_names:
                    if actual is not None:
                        problems.append(
                            f"output axis {name!r} (size {size}) is already in the input"
                            f" (size {actual})"
                        )
                elif actual is None:
                    problems.append(f"input axis {name!r} (size {size}) is missing")
                elif actual != size:
                    problems.append(
                        f"input axis {name!r} has size {actual}, but the weights expect {size}"
                    )
        if problems:
            raise shapecheck.StructureMismatchError(
                f"{self._layer_description()} with weight axes {dict(weight.named_shape)}"
                f" (in: {self.in_axis_names}, out: {self.out_axis_names}) cannot be applied to"
                f" an input with {_named_shape_summary(in_array)}: " + "; ".join(problems) + "."
            )

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        input_axes: dict[str, int],
        output_axes: dict[str, int],
        parallel_axes: dict[str, int] | None = None,
        parallel_broadcast_axes: dict[str, int] | None = None,
        initializer: LinearOperatorWeightInitializer = xavier_uniform_initializer,
        dtype: jax.typing.DTypeLike = jnp.float32,
        rename_outputs_if_necessary: bool = True,
    ) -> Linear | LinearInPlace:
        """Builds a freshly initialized linear layer from axis names and sizes.

        For initialization, ``parallel_axes`` and ``parallel_broadcast_axes`` both count as
        parallel (neither fan). At call time, though, ``parallel_broadcast_axes`` behave as
        extra output axes: the input must not have them and is broadcast over them.

        Args:
            name: Layer name; the weight parameter is labelled ``f"{name}.weights"``.
            init_base_rng: The model's base PRNG key, or None to leave a ``ParameterSlot``.
            input_axes: Axes to contract over, with sizes.
            output_axes: New output axes, with sizes. A name shared with ``input_axes``
                requires ``rename_outputs_if_necessary``.
            parallel_axes: Axes present in input and output, with one operator per index;
                disjoint from the input and output axes.
            parallel_broadcast_axes: Like ``parallel_axes`` but absent from the input;
                disjoint from all the other axes.
            initializer: Weight initializer.
            dtype: Weight dtype.
            rename_outputs_if_necessary: If an output axis name is also an input axis name,
                produce ``<name>_out`` instead and rename it back afterwards, returning a
                ``LinearInPlace``. If False, such an overlap is an error.

        Returns:
            A ``Linear``, or a ``LinearInPlace`` wrapping one when outputs were renamed.

        Raises:
            ValueError: On overlapping axis names that cannot be resolved.
        """
        parallel_axes = {} if parallel_axes is None else parallel_axes
        parallel_broadcast_axes = {} if parallel_broadcast_axes is None else parallel_broadcast_axes
        overlapping = [axis for axis in output_axes if axis in input_axes]
        if overlapping:
            if not rename_outputs_if_necessary:
                raise ValueError(
                    f"input_axes and output_axes must not overlap (both contain {overlapping})"
                    " unless rename_outputs_if_necessary is set; got"
                    f" input_axes={input_axes}, output_axes={output_axes}."
                )
            temporary_names = {}
            for axis in overlapping:
                primed = f"{axis}_out"
                if primed in input_axes or primed in output_axes:
                    raise ValueError(
                        f"Tried to rename output axis {axis!r} to {primed!r} to avoid a"
                        f" conflict with the input axis, but {primed!r} is already used;"
                        f" rename the axes manually (input_axes={input_axes},"
                        f" output_axes={output_axes})."
                    )
                temporary_names[axis] = primed
            renamed_output_axes = {
                temporary_names.get(axis, axis): size for axis, size in output_axes.items()
            }
            return LinearInPlace(
                sublayers=[
                    cls.from_config(
                        name=name,
                        init_base_rng=init_base_rng,
                        input_axes=input_axes,
                        output_axes=renamed_output_axes,
                        parallel_axes=parallel_axes,
                        parallel_broadcast_axes=parallel_broadcast_axes,
                        initializer=initializer,
                        dtype=dtype,
                        rename_outputs_if_necessary=False,
                    ),
                    RenameAxes(
                        old=tuple(temporary_names.values()), new=tuple(temporary_names.keys())
                    ),
                ]
            )

        in_or_out = set(input_axes) | set(output_axes)
        if set(parallel_axes) & in_or_out or set(parallel_broadcast_axes) & (
            in_or_out | set(parallel_axes)
        ):
            raise ValueError(
                "parallel_axes and parallel_broadcast_axes must not overlap with each other or"
                f" with the input/output axes; got input_axes={input_axes},"
                f" output_axes={output_axes}, parallel_axes={parallel_axes},"
                f" parallel_broadcast_axes={parallel_broadcast_axes}."
            )
        return cls(
            weights=parameters.make_parameter(
                f"{name}.weights",
                init_base_rng,
                initializer,
                input_axes=input_axes,
                output_axes=output_axes,
                parallel_axes={**parallel_axes, **parallel_broadcast_axes},
                convolution_spatial_axes={},
                dtype=dtype,
            ),
            in_axis_names=tuple(input_axes),
            out_axis_names=(*output_axes, *parallel_broadcast_axes),
        )

    def _weight_axes_where(self, keep: Callable[[str], bool]) -> dict[str, int]:
        """Names and sizes of the weight axes whose name passes ``keep``, in weight order."""
        return {name: size for name, size in self.weights.value.named_shape.items() if keep(name)}

    @property
    def input_axes(self) -> dict[str, int]:
        """Names and sizes of the axes that only the input has (contracted away)."""
        return self._weight_axes_where(lambda name: name in self.in_axis_names)

    @property
    def output_axes(self) -> dict[str, int]:
        """Names and sizes of the axes that only the output has."""
        return self._weight_axes_where(lambda name: name in self.out_axis_names)

    @property
    def parallel_axes(self) -> dict[str, int]:
        """Names and sizes of the axes that both the input and the output have."""
        return self._weight_axes_where(
            lambda name: name not in self.in_axis_names and name not in self.out_axis_names
        )

    def input_structure(self) -> shapecheck.StructureAnnotation:
        """Any floating named array with the input and parallel axes (plus batch axes ``B``)."""
        return _batched_floating_spec({**self.input_axes, **self.parallel_axes})

    def output_structure(self) -> shapecheck.StructureAnnotation:
        """The same batch axes ``B`` as the input, plus the output and parallel axes."""
        return _batched_floating_spec({**self.output_axes, **self.parallel_axes})

    def treescope_color(self) -> str:
        return "#eba875"


@struct.pytree_dataclass
class AddBias(layer_base.Layer):
    """Adds a learned bias, broadcasting over every axis the bias does not have.

    Attributes:
        bias: The bias parameter; its ``value`` is a ``NamedArray``.
        new_axis_names: Bias axes that are not in the input and are added to the output.
    """

    bias: parameters.ParameterLike[NamedArray]
    new_axis_names: tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, value: NamedArray, **_unused_side_inputs: Any) -> NamedArray:
        """Returns ``value + bias`` (named-axis broadcasting).

        Raises:
            ValueError: If an axis of the input has a different size than the same axis of
                the bias, or the input lacks a bias axis that is not in ``new_axis_names``
                (adding it would silently broadcast a new axis in); the message names the
                layer, the axis and both shapes.
        """
        bias = self.bias.value
        if isinstance(value, named_axes.NamedArrayBase):
            input_shape = value.named_shape
            label = getattr(self.bias, "label", None)
            layer = (
                f"AddBias layer {label.removesuffix('.bias')!r}"
                if isinstance(label, str)
                else "AddBias layer"
            )
            missing = [
                name
                for name in bias.named_shape
                if name not in input_shape and name not in self.new_axis_names
            ]
            if missing:
                raise ValueError(
                    f"{layer}: the input has no axis named {missing}, which the bias is over"
                    f" (bias named shape {dict(bias.named_shape)}, input named shape"
                    f" {dict(input_shape)}); list axes the bias should add in new_axis_names."
                )
            for name, size in bias.named_shape.items():
                if input_shape.get(name, size) != size:
                    raise ValueError(
                        f"{layer}: input axis {name!r} has size {input_shape[name]}, but the"
                        f" bias has size {size} (bias named shape {dict(bias.named_shape)},"
                        f" input named shape {dict(input_shape)})."
                    )
        return value + bias

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        biased_axes: dict[str, int],
        new_output_axes: dict[str, int] | None = None,
        initializer: LinearOperatorWeightInitializer = zero_initializer,
        dtype: jax.typing.DTypeLike = jnp.float32,
    ) -> AddBias:
        """Builds a freshly initialized bias layer.

        Args:
            name: Layer name; the parameter is labelled ``f"{name}.bias"``.
            init_base_rng: The model's base PRNG key, or None to leave a ``ParameterSlot``.
            biased_axes: Input axes the bias varies over; other axes are broadcast.
            new_output_axes: Axes the bias adds to its input.
            initializer: Initializer; all bias axes are passed as output axes.
            dtype: Bias dtype.

        Returns:
            The ``AddBias`` layer.
        """
        new_output_axes = {} if new_output_axes is None else new_output_axes
        return cls(
            bias=parameters.make_parameter(
                f"{name}.bias",
                init_base_rng,
                initializer,
                input_axes={},
                output_axes={**biased_axes, **new_output_axes},
                parallel_axes={},
                convolution_spatial_axes={},
                dtype=dtype,
            ),
            new_axis_names=tuple(new_output_axes),
        )

    def input_structure(self) -> shapecheck.StructureAnnotation:
        """Batch axes ``B`` plus the biased axes of the bias."""
        return _batched_floating_spec(
            {
                name: size
                for name, size in self.bias.value.named_shape.items()
                if name not in self.new_axis_names
            }
        )

    def output_structure(self) -> shapecheck.StructureAnnotation:
        """Batch axes ``B`` plus every axis of the bias."""
        return _batched_floating_spec(self.bias.value.named_shape)

    def treescope_color(self) -> str:
        return "#65cfbc"


@struct.pytree_dataclass
class Affine(grouping.Sequential):
    """An affine map: a ``Linear`` (possibly with a rename) followed by an ``AddBias``.

    Attributes:
        sublayers: The ``Linear`` [, ``RenameAxes``] and ``AddBias`` layers.
    """

    sublayers: list[layer_base.Layer]

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        input_axes: dict[str, int],
        output_axes: dict[str, int],
        parallel_axes: dict[str, int] | None = None,
        parallel_broadcast_axes: dict[str, int] | None = None,
        linear_initializer: LinearOperatorWeightInitializer = xavier_uniform_initializer,
        bias_initializer: LinearOperatorWeightInitializer = zero_initializer,
        dtype: jax.typing.DTypeLike = jnp.float32,
        rename_outputs_if_necessary: bool = True,
    ) -> Affine:
        """Builds a freshly initialized affine layer.

        Arguments are as for ``Linear.from_config``; the bias covers the output, parallel
        and parallel-broadcast axes. Parameters are labelled ``f"{name}/Linear.weights"``
        and ``f"{name}/AddBias.bias"``.

        Args:
            name: Layer name.
            init_base_rng: The model's base PRNG key, or None to leave parameter slots.
            input_axes: Axes to contract over, with sizes.
            output_axes: New output axes, with sizes.
            parallel_axes: See ``Linear.from_config``.
            parallel_broadcast_axes: See ``Linear.from_config``.
            linear_initializer: Weight initializer.
            bias_initializer: Bias initializer.
            dtype: Parameter dtype.
            rename_outputs_if_necessary: See ``Linear.from_config``.

        Returns:
            The ``Affine`` layer.
        """
        parallel_axes = {} if parallel_axes is None else parallel_axes
        parallel_broadcast_axes = {} if parallel_broadcast_axes is None else parallel_broadcast_axes
        linear = Linear.from_config(
            name=f"{name}/Linear",
            init_base_rng=init_base_rng,
            input_axes=input_axes,
            output_axes=output_axes,
            parallel_axes=parallel_axes,
            parallel_broadcast_axes=parallel_broadcast_axes,
            initializer=linear_initializer,
            dtype=dtype,
            rename_outputs_if_necessary=rename_outputs_if_necessary,
        )
        bias = AddBias.from_config(
            name=f"{name}/AddBias",
            init_base_rng=init_base_rng,
            biased_axes={**parallel_axes, **parallel_broadcast_axes, **output_axes},
            initializer=bias_initializer,
            dtype=dtype,
        )
        linear_layers = linear.sublayers if isinstance(linear, LinearInPlace) else [linear]
        return cls(sublayers=[*linear_layers, bias])

    def treescope_color(self) -> tuple[str, str]:
        return "#eba875", "color-mix(in oklab, #eba875 25%, white)"


@struct.pytree_dataclass
class ConstantRescale(layer_base.Layer):
    """Multiplies every array in its input by a constant.

    Attributes:
        by: The factor; a pytree child, so it may be an array.
    """

    by: float | jax.Array

    def __call__(self, value: Any, **_unused_side_inputs: Any) -> Any:
        """Returns ``value`` with every array leaf multiplied by ``by``."""
        return jax.tree_util.tree_map(lambda leaf: leaf * self.by, value)


#### Einsum ####


def _spec_as_mapping(spec: tuple[str, ...] | dict[str, str]) -> dict[str, str]:
    """Normalizes an einsum axis spec to ``{axis name: summation index}``."""
    return {name: name for name in spec} if isinstance(spec, tuple) else dict(spec)


@struct.pytree_dataclass
class NamedEinsum(layer_base.Layer):
    """An einsum whose operands' axes are identified by name instead of position.

    Each operand's spec maps its axis names to summation indices; the output spec maps the
    output's axis names to indices. E.g. the einsum ``"thp,shp->hts"`` of attention logits
    is ::

        NamedEinsum(
            ({"tokens": "t", "heads": "h", "projection": "p"},
             {"kv_tokens": "s", "heads": "h", "projection": "p"}),
            {"heads": "h", "tokens": "t", "kv_tokens": "s"},
        )

    A tuple of names may replace a mapping when each axis is its own index. Repeating an
    index within one operand takes a diagonal, as in ``jnp.einsum``. Axes not mentioned in
    the specs are batch axes: every operand must have the same ones, and they are carried
    into the output.

    Attributes:
        input_axes: One spec per operand.
        output_axes: The output spec.
    """

    input_axes: tuple[tuple[str, ...] | dict[str, str], ...] = dataclasses.field(
        metadata={"pytree_node": False}
    )
    output_axes: tuple[str, ...] | dict[str, str] = dataclasses.field(
        metadata={"pytree_node": False}
    )

    def __call__(self, arrays: tuple[NamedArray, ...], **_unused_side_inputs: Any) -> NamedArray:
        """Runs the einsum on a tuple of named arrays, one per input spec.

        Raises:
            pz.chk.StructureMismatchError: If the operands do not match the specs (missing
                axes, inconsistent index sizes, different batch axes).
            ValueError: If the output spec uses an index no operand has.
        """
        shapecheck.check_structure(
            tuple(arrays),
            self.input_structure(),
            error_prefix="While checking the operands of a NamedEinsum:\n",
        )
        specs = [_spec_as_mapping(spec) for spec in self.input_axes]
        output_spec = _spec_as_mapping(self.output_axes)
        known_indices = {index for spec in specs for index in spec.values()}
        unknown = [index for index in output_spec.values() if index not in known_indices]
        if unknown:
            raise ValueError(
                f"NamedEinsum output spec {self.output_axes} uses summation indices {unknown}"
                f" that no input spec ({self.input_axes}) uses."
            )
        # Summation indices and batch axis names live in separate namespaces, so that an
        # index called "batch" cannot be confused with a batch axis called "batch".
        integer_ids: dict[tuple[str, str], int] = {}

        def integer_id(key: tuple[str, str]) -> int:
            return integer_ids.setdefault(key, len(integer_ids))

        batch_names = [name for name in arrays[0].named_shape if name not in specs[0]]
        einsum_operands = []
        for array, spec in zip(arrays, specs):
            names, data = _fully_named_data(array, "NamedEinsum: an operand")
            einsum_operands.append(data)
            einsum_operands.append(
                [
                    integer_id(("index", spec[name]) if name in spec else ("batch", name))
                    for name in names
                ]
            )
        output_ids = [integer_id(("batch", name)) for name in batch_names] + [
            integer_id(("index", index)) for index in output_spec.values()
        ]
        result = jnp.einsum(*einsum_operands, output_ids)
        return named_axes.wrap(result).tag(*batch_names, *output_spec)

    def input_structure(self) -> shapecheck.StructureAnnotation:
        """One spec per operand; shared batch axes ``B``, shared index sizes ``I[index]``."""
        return tuple(
            shapecheck.ArraySpec(
                named_shape={
                    **shapecheck.var("B"),
                    **{
                        name: shapecheck.var("I")[index]
                        for name, index in _spec_as_mapping(spec).items()
                    },
                },
                dtype=jnp.floating,
            )
            for spec in self.input_axes
        )

    def output_structure(self) -> shapecheck.StructureAnnotation:
        """The batch axes ``B`` plus the output axes, sized by their indices."""
        return shapecheck.ArraySpec(
            named_shape={
                **shapecheck.var("B"),
                **{
                    name: shapecheck.var("I")[index]
                    for name, index in _spec_as_mapping(self.output_axes).items()
                },
            },
            dtype=jnp.floating,
        )
