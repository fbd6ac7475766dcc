"""Sharding by axis name: one dict maps array axis names to device-mesh axes.

Because every activation and parameter in a pz_flax model names its axes, choosing a
parallelism strategy is a matter of saying which *names* go to which *mesh axes*:
``{"batch": "data"}`` is data parallelism, ``{"batch": "data", "neurons": "model"}`` adds
model parallelism, and the same model code runs under all of them. Everything here is a thin
layer over JAX's own SPMD machinery (``jax.sharding.Mesh``/``NamedSharding``,
``jax.device_put``, ``jax.jit(out_shardings=...)``, ``with_sharding_constraint``), so it works
the same on one host, on many hosts after ``jax.distributed.initialize()``, and on CPU devices
faked with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``.

In a multi-process job every process runs this same code on the global mesh. A model is placed
once (`sharded_init`, or `name_to_name_device_put` of a value every process has in full), but
input batches come from each process's own loader: `process_local_slice` tells a process which
rows of a named axis its devices hold, and `name_to_name_make_array_from_process_local_data`
assembles the global NamedArrays from those rows without moving data between processes.

pz_flax parameters are NNX variables whose raw value is the positional array and whose axis
names are metadata; the functions below read those names directly, so a whole model (not just
its NamedArrays) can be sharded in one call.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax

from pz_flax.core import named_axes
from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.nn import layer as layer_base

AxisNameToMeshName = Mapping[str, str | tuple[str, ...]]

# Names for the trees the functions below take and return. They stay ``Any`` (as in penzai):
# a model mixes NamedArrays, variables and plain leaves, which no static pytree type describes,
# but the names say in each signature which kind of leaf is meant.
PyTreeOfArrays = Any
PyTreeOfNamedArrays = Any
PyTreeOfShardings = Any


def _partition_spec(
    data_axis_names: tuple[str | None, ...],
    mesh: jax.sharding.Mesh,
    axis_name_to_mesh_name: AxisNameToMeshName,
) -> jax.sharding.PartitionSpec:
    """The spec placing each named data axis on its mesh axes (unnamed axes stay whole)."""
    for axis_name, mesh_names in axis_name_to_mesh_name.items():
        for mesh_name in (mesh_names,) if isinstance(mesh_names, str) else mesh_names:
            if mesh_name not in mesh.axis_names:
                raise ValueError(
                    f"Axis {axis_name!r} is mapped to mesh axis {mesh_name!r}, but the mesh only"
                    f" has the axes {tuple(mesh.axis_names)}."
                )
    return jax.sharding.PartitionSpec(
        *(
            axis_name_to_mesh_name.get(name) if name is not None else None
            for name in data_axis_names
        )
    )


def _data_axis_names(value: named_axes.NamedArrayBase) -> tuple[str | None, ...]:
    """For each axis of ``value.data_array``, its name (None for positional axes)."""
    names: list[str | None] = [None] * value.data_array.ndim
    if isinstance(value, named_axes.NamedArrayView):
        for name, data_axis in value.data_axis_for_name.items():
            names[data_axis] = name
    else:
        offset = value.data_array.ndim - len(value.named_axes)
        for index, name in enumerate(value.named_axes):
            names[offset + index] = name
    return tuple(names)


def _placed(shape_source: Any, sharding: jax.sharding.Sharding, as_shape_dtype_struct: bool):
    if as_shape_dtype_struct:
        return jax.ShapeDtypeStruct(shape_source.shape, shape_source.dtype, sharding=sharding)
    return sharding


def name_to_name_sharding(
    tree: PyTreeOfNamedArrays,
    mesh: jax.sharding.Mesh,
    axis_name_to_mesh_name: AxisNameToMeshName | None = None,
    ignore_unnamed_arrays: bool = False,
    as_shape_dtype_struct: bool = False,
) -> PyTreeOfShardings:
    """Builds the ``NamedSharding`` tree that places each array by its axis names.

    Args:
        tree: A pytree containing NamedArrays, NamedArrayViews and/or pz_flax variables (a whole
            model works). Only shapes and axis names are read, so abstract values are fine.
        mesh: The device mesh to place arrays on.
        axis_name_to_mesh_name: Which mesh axis (or tuple of mesh axes) each array axis name is
            split over; names not listed are replicated. Defaults to the identity mapping onto
            the mesh's own axis names.
        ignore_unnamed_arrays: Give plain (unnamed) array leaves a ``None`` sharding instead of
            raising.
        as_shape_dtype_struct: Return ``jax.ShapeDtypeStruct``s carrying the shardings (what
            ``orbax`` restore targets and ``jax.jit`` tracing want) instead of shardings.

    Returns:
        A tree of the same structure as ``tree`` with every array replaced by its sharding (or
        by a ``ShapeDtypeStruct`` with that sharding), usable as ``jax.device_put``'s second
        argument or as ``jax.jit``'s ``in_shardings``/``out_shardings``.

    Raises:
        ValueError: If a plain array is found and ``ignore_unnamed_arrays`` is False (the error
            names its path), or a name maps to an axis the mesh does not have.
    """
    if axis_name_to_mesh_name is None:
        axis_name_to_mesh_name = {name: name for name in mesh.axis_names}

    def sharding_for_named(value: named_axes.NamedArrayBase):
        spec = _partition_spec(_data_axis_names(value), mesh, axis_name_to_mesh_name)
        placed = _placed(
            value.data_array, jax.sharding.NamedSharding(mesh, spec), as_shape_dtype_struct
        )
        return dataclasses.replace(value, data_array=placed)

    def sharding_for_variable(variable: variables.AbstractVariable):
        value = variable.value
        if named_axes.is_namedarray(value):
            spec = _partition_spec(_data_axis_names(value), mesh, axis_name_to_mesh_name)
            return variable.replace(
                _placed(
                    variable.get_raw_value(),
                    jax.sharding.NamedSharding(mesh, spec),
                    as_shape_dtype_struct,
                )
            )
        return variable.replace(
            jax.tree_util.tree_map_with_path(sharding_for_plain, variable.get_raw_value())
        )

    def sharding_for_plain(path, leaf):
        if not ignore_unnamed_arrays:
            raise ValueError(
                f"The array at {jax.tree_util.keystr(path) or '<root>'} (shape"
                f" {getattr(leaf, 'shape', '?')}) has no axis names, so no name-based sharding can"
                " be inferred for it. Pass ignore_unnamed_arrays=True to replicate such arrays."
            )
        if as_shape_dtype_struct:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=None)
        return None

    def is_named_node(node: Any) -> bool:
        return named_axes.is_namedarray(node) or isinstance(node, variables.AbstractVariable)

    def dispatch(path, node):
        if named_axes.is_namedarray(node):
            return sharding_for_named(node)
        if isinstance(node, variables.AbstractVariable):
            return sharding_for_variable(node)
        return sharding_for_plain(path, node)

    return jax.tree_util.tree_map_with_path(dispatch, tree, is_leaf=is_named_node)


def name_to_name_device_put(
    tree: PyTreeOfNamedArrays,
    mesh: jax.sharding.Mesh,
    axis_name_to_mesh_name: AxisNameToMeshName | None = None,
) -> PyTreeOfNamedArrays:
    """Moves every NamedArray (and pz_flax variable) in ``tree`` onto ``mesh`` by axis name.

    Like any JAX transformation of a pytree, this returns a new tree: its variables are new
    objects (same labels and metadata) holding the sharded arrays; the originals are untouched.

    In a multi-process job every process must pass the same whole value, and JAX checks that
    on every call by gathering the value from every process (a blocking collective per array,
    moving the process count times its size). That is fine for placing a model once; for input
    batches use `name_to_name_make_array_from_process_local_data`, which takes each process's
    own rows and moves nothing between processes.

    Args:
        tree: A pytree of NamedArrays and/or variables; typically a whole model.
        mesh: The device mesh.
        axis_name_to_mesh_name: As in `name_to_name_sharding`.

    Returns:
        The same structure with its data placed on the mesh.
    """
    shardings = name_to_name_sharding(tree, mesh, axis_name_to_mesh_name)
    return jax.device_put(tree, shardings)


def _axis_slices(
    sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]
) -> list[list[tuple[int, int]]]:
    """For each dimension, the sorted distinct index ranges this process's devices hold."""
    ranges: list[set[tuple[int, int]]] = [set() for _ in global_shape]
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        for dim, (dim_slice, size) in enumerate(zip(index, global_shape)):
            start, stop, _ = dim_slice.indices(size)
            ranges[dim].add((start, stop))
    return [sorted(dim_ranges) for dim_ranges in ranges]


def _contiguous_range(ranges: list[tuple[int, int]], describe: str) -> slice:
    for (_, stop), (next_start, _) in itertools.pairwise(ranges):
        if stop != next_start:
            raise ValueError(
                f"{describe}: this process (index {jax.process_index()}) holds the"
                f" non-contiguous ranges {ranges}, so its rows cannot be given as one block. Order the"
                " mesh's devices so that each process's devices are adjacent along that mesh"
                " axis (as jax.make_mesh does)."
            )
    return slice(ranges[0][0], ranges[-1][1])


def _axis_label(name: str | None, data_axis: int) -> str:
    return f"Axis {name!r}" if name is not None else f"Positional axis {data_axis}"


def _mesh_axes_size(mesh: jax.sharding.Mesh, mesh_names: str | tuple[str, ...] | None) -> int:
    if mesh_names is None:
        return 1
    names = (mesh_names,) if isinstance(mesh_names, str) else mesh_names
    return math.prod(mesh.shape[name] for name in names)


def process_local_slice(
    axis_name: str,
    global_size: int,
    mesh: jax.sharding.Mesh,
    axis_name_to_mesh_name: AxisNameToMeshName | None = None,
) -> slice:
    """Which rows of a named axis this process must supply when every process feeds its own data.

    In a multi-process job each process loads only the part of a batch that its own devices
    hold. For an axis named ``axis_name`` of ``global_size`` rows, split over mesh axes by the
    strategy dict, this returns the block ``[start, stop)`` of rows held by this process's
    devices: the rows to load here and to pass to
    `name_to_name_make_array_from_process_local_data`. Where the axis's mesh axes lie inside
    each process (or the axis is not split at all), every process holds all rows.

    Args:
        axis_name: The array axis name, e.g. ``"batch"``.
        global_size: The axis's size over all processes.
        mesh: The (global) device mesh.
        axis_name_to_mesh_name: As in `name_to_name_sharding`.

    Returns:
        A ``slice`` with explicit ``start`` and ``stop``.

    Raises:
        ValueError: If ``global_size`` does not split evenly over the axis's mesh axes, a name
            maps to an axis the mesh does not have, or this process's rows are not one block.
    """
    if axis_name_to_mesh_name is None:
        axis_name_to_mesh_name = {name: name for name in mesh.axis_names}
    spec = _partition_spec((axis_name,), mesh, axis_name_to_mesh_name)
    num_shards = _mesh_axes_size(mesh, spec[0])
    if global_size % num_shards:
        raise ValueError(
            f"Axis {axis_name!r} has {global_size} rows, which do not split evenly over its"
            f" {num_shards} shards (mesh axes {spec[0]!r})."
        )
    (ranges,) = _axis_slices(jax.sharding.NamedSharding(mesh, spec), (global_size,))
    return _contiguous_range(ranges, _axis_label(axis_name, 0))


def name_to_name_make_array_from_process_local_data(
    local_tree: PyTreeOfNamedArrays,
    mesh: jax.sharding.Mesh,
    axis_name_to_mesh_name: AxisNameToMeshName | None = None,
    global_axis_sizes: Mapping[str, int] | None = None,
) -> PyTreeOfNamedArrays:
    """Builds global NamedArrays on ``mesh`` from the rows this process holds.

    The multi-process counterpart of `name_to_name_device_put` for input data: each process
    passes only its own part of every NamedArray (the rows `process_local_slice` names), and
    gets back NamedArrays over the whole mesh, with the same axis names, placed by the same
    strategy dict. Underneath it is ``jax.make_array_from_process_local_data``, so no data
    crosses processes. In a single process the local data is the whole array.

    ``name_to_name_device_put`` also works across processes, but only when every process passes
    the *same full* value, and JAX then checks that by gathering the whole value from every
    process on every call (a blocking collective per array that moves process count times its
    size); it is meant for one-off values such as a model, not for a training loop's batches.

    Args:
        local_tree: A pytree of NamedArrays (and NamedArrayViews) holding this process's data.
            The data may be NumPy or JAX arrays.
        mesh: The global device mesh.
        axis_name_to_mesh_name: As in `name_to_name_sharding`.
        global_axis_sizes: Global sizes of named axes, for axes where this process passes more
            than its own rows: give an axis's full size when every process passes the whole axis
            (each device then takes its rows from it). Axes not listed are taken to hold exactly
            this process's rows, and their global size is inferred from the mesh.

    Returns:
        The same structure with each NamedArray's data a global ``jax.Array``.

    Raises:
        ValueError: If a leaf is not a NamedArray (the error names its path), a named axis maps
            to an axis the mesh does not have, or this process's rows do not match what its
            devices hold (the error names the axis, the rows expected and the rows given).
    """
    if axis_name_to_mesh_name is None:
        axis_name_to_mesh_name = {name: name for name in mesh.axis_names}
    global_axis_sizes = dict(global_axis_sizes or {})

    def assemble(path, value):
        where = jax.tree_util.keystr(path) or "<root>"
        if not named_axes.is_namedarray(value):
            raise ValueError(
                f"The value at {where} has type {type(value).__name__}, not NamedArray; only"
                " NamedArrays say which of their axes are split over processes."
            )
        names = _data_axis_names(value)
        spec = _partition_spec(names, mesh, axis_name_to_mesh_name)
        sharding = jax.sharding.NamedSharding(mesh, spec)
        local_shape = value.data_array.shape
        # With one row per shard, the number of distinct blocks a process holds along a
        # dimension is its share of that dimension's shards.
        shard_counts = tuple(_mesh_axes_size(mesh, mesh_names) for mesh_names in spec)
        held_shards = [len(ranges) for ranges in _axis_slices(sharding, shard_counts)]
        global_shape = []
        for dim, (name, local_size, total, held) in enumerate(
            zip(names, local_shape, shard_counts, held_shards)
        ):
            if name in global_axis_sizes:
                global_shape.append(global_axis_sizes[name])
            elif local_size % held:
                raise ValueError(
                    f"{_axis_label(name, dim)} of the value at {where} has"
                    f" {local_size} local rows, which do not split evenly over this process's"
                    f" {held} shards of it."
                )
            else:
                global_shape.append(local_size // held * total)
        held_ranges = _axis_slices(sharding, tuple(global_shape))
        for dim, (name, local_size, global_size, ranges) in enumerate(
            zip(names, local_shape, global_shape, held_ranges)
        ):
            if global_size == local_size:
                continue  # the whole axis is here; each device takes its own rows from it
            rows = _contiguous_range(ranges, _axis_label(name, dim))
            if rows.stop - rows.start != local_size:
                raise ValueError(
                    f"{_axis_label(name, dim)} of the value at {where}:"
                    f" this process (index {jax.process_index()}) holds rows"
                    f" [{rows.start}, {rows.stop}) of {global_size}, i.e."
                    f" {rows.stop - rows.start} rows, but was given {local_size}."
                )
        global_array = jax.make_array_from_process_local_data(
            sharding, value.data_array, tuple(global_shape)
        )
        return _with_data_array(value, global_array)

    return jax.tree_util.tree_map_with_path(assemble, local_tree, is_leaf=named_axes.is_namedarray)


def _with_data_array(value: named_axes.NamedArrayBase, data_array: jax.Array):
    """``value`` around a data array of another shape (the axis sizes follow it)."""
    if isinstance(value, named_axes.NamedArrayView):
        return dataclasses.replace(value, data_shape=data_array.shape, data_array=data_array)
    offset = data_array.ndim - len(value.named_axes)
    sizes = collections.OrderedDict(
        (name, data_array.shape[offset + index]) for index, name in enumerate(value.named_axes)
    )
    return dataclasses.replace(value, named_axes=sizes, data_array=data_array)


def sharded_init(
    initializer: Callable[..., Any],
    *init_args,
    mesh: jax.sharding.Mesh,
    axis_name_to_mesh_name: AxisNameToMeshName | None = None,
    **init_kwargs,
) -> Any:
    """Runs a model initializer so that every array is *created* already sharded.

    The initializer is traced abstractly first to learn every output's axis names, then run
    under ``jax.jit`` with matching ``out_shardings``; no device ever holds a full copy of a
    sharded weight, which is what makes models larger than one device's memory initializable.

    Args:
        initializer: A function returning a model (a pytree of arrays, NamedArrays and fresh
            variables).
        *init_args: Positional arguments for ``initializer``.
        mesh: The device mesh.
        axis_name_to_mesh_name: As in `name_to_name_sharding`.
        **init_kwargs: Keyword arguments for ``initializer``.

    Returns:
        The initialized model, its variables new objects holding sharded arrays.
    """

    def build_frozen():
        return variables.unbind_variables(initializer(*init_args, **init_kwargs), freeze=True)

    abstract = jax.eval_shape(build_frozen)
    out_shardings = name_to_name_sharding(
        abstract, mesh, axis_name_to_mesh_name, ignore_unnamed_arrays=True
    )
    skeleton, frozen_values = jax.jit(build_frozen, out_shardings=out_shardings)()
    return variables.bind_variables(skeleton, frozen_values, unfreeze_as_copy=True)


def initialize_distributed_from_environment() -> bool:
    """Joins a multi-process JAX job if this process was launched as part of one.

    A process is part of a job when ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0,
    which JAX itself reads) is set; ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` then give the
    job's size and this process's index, and where they are unset JAX detects them from the
    cluster (SLURM, Open MPI, Kubernetes, Cloud TPU). Without ``JAX_COORDINATOR_ADDRESS`` the
    process stays a single-process job, so the same script runs both ways unchanged. It must be
    called before anything else touches JAX's devices; a second call does nothing.

    Returns:
        True if this process is (now) part of a job of more than one process.

    Raises:
        ValueError: If ``JAX_NUM_PROCESSES`` or ``JAX_PROCESS_ID`` is not an integer.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return False
    counts = {}
    for variable, argument in (
        ("JAX_NUM_PROCESSES", "num_processes"),
        ("JAX_PROCESS_ID", "process_id"),
    ):
        text = os.environ.get(variable)
        if text is None:
            continue
        try:
            counts[argument] = int(text)
        except ValueError:
            raise ValueError(f"{variable} must be an integer, got {text!r}.") from None
    jax.distributed.initialize(**counts)
    return jax.process_count() > 1


@struct.pytree_dataclass
class ConstrainSharding(layer_base.Layer):
    """A layer that pins the sharding of whatever passes through it.

    Inside ``jax.jit`` this becomes a ``with_sharding_constraint``: a hint to XLA's partitioner
    at a point where the automatic choice is not the one wanted.

    Attributes:
        sharding: A tree of shardings matching the structure of the layer's input.
    """

    sharding: Any = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, tree: Any, **_unused_side_inputs) -> Any:
        return jax.lax.with_sharding_constraint(tree, self.sharding)


@struct.pytree_dataclass
class ConstrainShardingByName(layer_base.Layer):
    """A layer that pins the sharding of NamedArrays passing through it, by axis name.

    Attributes:
        mesh: The device mesh.
        axis_name_to_mesh_name: As in `name_to_name_sharding` (identity when None).
    """

    mesh: jax.sharding.Mesh = dataclasses.field(metadata={"pytree_node": False})
    axis_name_to_mesh_name: AxisNameToMeshName | None = dataclasses.field(
        default=None, metadata={"pytree_node": False}
    )

    def __call__(self, tree: Any, **_unused_side_inputs) -> Any:
        return jax.lax.with_sharding_constraint(
            tree, name_to_name_sharding(tree, self.mesh, self.axis_name_to_mesh_name)
        )
