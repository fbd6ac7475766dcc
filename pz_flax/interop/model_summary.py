"""``summary``: a table of a model's variables, for pz_flax layers and Flax NNX modules alike.

One row per variable: where it is (path), which layer owns it, what kind of variable it is,
its pz_flax label, its axis names, its sharding annotation, shape, dtype, element count and
size; then totals for parameters and for other state, and, for each NNX module that was
wrapped although its class has a mapping, the setting that forced the wrapper. The same
function reads both worlds (and mixtures: pz_flax layers inside NNX modules, wrapped NNX
modules inside pz_flax models), so a model can be compared before and after
``from_nnx``/``to_nnx``.

``summary`` returns a ``ModelSummary`` and prints nothing: a notebook shows it once, as an HTML
table, a rich console as a rich table, and ``print(summary(model))`` writes the text table.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING
from typing import Any

import jax
from flax import nnx

from pz_flax import _tables
from pz_flax._compat import nnx_modules
from pz_flax.core import struct
from pz_flax.core import tree_util
from pz_flax.core import variables
from pz_flax.interop import wrappers

if TYPE_CHECKING:
    import rich.table


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One variable of a model.

    Attributes:
        path: Where the variable is, from the model's root.
        layer: The class of the innermost layer or module holding it.
        kind: The variable's class (``Parameter``, ``Param``, ``BatchStat``, ...).
        label: The pz_flax label, or ``""`` for NNX variables.
        axes: The axis names (``"-"`` for positional axes).
        shape: The shape of the stored array.
        dtype: The dtype name.
        count: Number of elements.
        nbytes: Size in bytes.
        is_parameter: Whether it is a parameter (``nnx.Param`` or pz_flax ``Parameter``).
        sharding: The variable's NNX sharding annotation, one entry per axis (``"-"`` for an
            axis it leaves unsharded), or ``""`` if it has none.
    """

    path: str
    layer: str
    kind: str
    label: str
    axes: str
    shape: tuple[int, ...]
    dtype: str
    count: int
    nbytes: int
    is_parameter: bool
    sharding: str = ""


@dataclasses.dataclass(frozen=True)
class WrappedModule:
    """An NNX module of a class with a mapping that was wrapped instead, and why.

    Attributes:
        path: Where the wrapper is, from the model's root.
        module_type: The NNX class's name.
        reason: The setting the pz_flax form cannot express (the wrapper's ``wrapped_because``).
    """

    path: str
    module_type: str
    reason: str


_COLUMNS = ("path", "layer", "kind", "label", "axes", "shape", "dtype", "count", "size")
_NUMBER_COLUMNS = ("count", "size")


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """The variables of a model, as ``summary`` lists them; renders as a table.

    ``str(summary)`` (and so ``print``) gives the text table with its title and totals; in a
    notebook the object shows as an HTML table, in a rich console as a rich table.

    Attributes:
        model_name: The class of the model's root (``FromNNX(...)``/``NNXWrapper(...)`` for
            converted NNX modules).
        rows: One row per variable, in traversal order.
        wrapped: The modules that were wrapped although their class has a mapping.
    """

    model_name: str
    rows: tuple[SummaryRow, ...]
    wrapped: tuple[WrappedModule, ...] = ()

    @property
    def parameters(self) -> tuple[SummaryRow, ...]:
        """The rows of parameters."""
        return tuple(row for row in self.rows if row.is_parameter)

    @property
    def state(self) -> tuple[SummaryRow, ...]:
        """The rows of variables that are not parameters (batch statistics, counters, ...)."""
        return tuple(row for row in self.rows if not row.is_parameter)

    def title(self) -> str:
        """The line above the table."""
        return f"Variables of {self.model_name}"

    def totals(self) -> str:
        """The lines below the table: totals for parameters and state, then wrapped modules."""
        lines = [
            f"Total: {_count_and_size(self.parameters, 'parameter')};"
            f" {_count_and_size(self.state, 'state variable', values='state values')}."
        ]
        lines += [
            f"Wrapped {found.path} ({found.module_type}): {found.reason}" for found in self.wrapped
        ]
        return "\n".join(lines)

    def table(self, *, titled: bool = True) -> rich.table.Table:
        """A ``rich`` table of the rows; a ``sharding`` column when some variable has one.

        Args:
            titled: Put ``title()`` above and ``totals()`` below it.
        """
        sharded = any(row.sharding for row in self.rows)
        columns = (*_COLUMNS[:5], "sharding", *_COLUMNS[5:]) if sharded else _COLUMNS
        table = _tables.new_table(
            columns,
            right_aligned=_NUMBER_COLUMNS,
            title=self.title() if titled else None,
            caption=self.totals() if titled else None,
        )
        for row in self.rows:
            cells = [row.path, row.layer, row.kind, row.label, row.axes]
            if sharded:
                cells.append(row.sharding)
            cells += [
                str(row.shape),
                row.dtype,
                f"{row.count:,}",
                _tables.format_bytes(row.nbytes),
            ]
            table.add_row(*cells)
        return table

    def format_table(self, width: int = 160) -> str:
        """The title, the table (``width`` characters wide at most) and the totals, as text."""
        return "\n".join(
            [self.title(), _tables.plain_text(self.table(titled=False), width=width), self.totals()]
        )

    def __str__(self) -> str:
        return self.format_table()

    def __rich__(self) -> rich.table.Table:
        return self.table()

    def _repr_html_(self) -> str:
        return _tables.html(self.table())

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # IPython's terminal shows the text table, not the dataclass fields.
        del cycle
        printer.text(str(self))


def _count_and_size(rows: tuple[SummaryRow, ...], noun: str, values: str | None = None) -> str:
    values = values or f"{noun} values"
    return (
        f"{sum(row.count for row in rows):,} {values} in {len(rows)} {noun}s"
        f" ({_tables.format_bytes(sum(row.nbytes for row in rows))})"
    )


def _layer_name(node: Any) -> str:
    if isinstance(node, wrappers.FromNNX):
        return f"FromNNX({node.nnx_type.__name__})"
    if isinstance(node, wrappers.NNXWrapper):
        return f"NNXWrapper({node.module_type.__name__})"
    return type(node).__name__


@functools.cache
def _sharding_metadata_key() -> str | None:
    """The variable metadata key holding a sharding annotation, as NNX itself writes it.

    Asked of NNX rather than written down: the key its public ``nnx.with_partitioning`` puts an
    annotation under (``out_sharding`` in flax 0.12; older releases used ``sharding_names``).
    None if this release's annotation cannot be read that way (then no sharding is shown,
    which ``tests/interop/test_model_summary.py`` would catch).
    """
    probe = ("pz_flax_sharding_probe",)
    annotated = nnx.with_partitioning(lambda *_args, **_kwargs: None, probe)()
    metadata = getattr(annotated, "metadata", None)
    if not isinstance(metadata, dict):
        return None
    keys = [key for key, value in metadata.items() if tuple(value or ()) == probe]
    return keys[0] if len(keys) == 1 else None


def _axes_text(names: Any, rank: int) -> str:
    """One entry per axis: the name, or ``-`` for a positional (or unannotated) axis."""
    names = [] if names is None else ["-" if name is None else str(name) for name in names]
    return ", ".join(["-"] * (rank - len(names)) + names)


def _row(path: str, owner: str, variable: Any) -> SummaryRow:
    if isinstance(variable, variables.LabeledVariable | nnx.Variable):
        raw = variable.get_value()
        metadata = variable.get_metadata()
    elif isinstance(variable, variables.LabeledVariableValue):
        value = variable.value
        raw = value.with_positional_prefix().data_array if hasattr(value, "data_array") else value
        metadata = {**variable.metadata, "label": variable.label}
        if hasattr(value, "named_shape"):
            metadata["axis_names"] = tuple(value.named_shape)
    else:  # a slot: no value
        return SummaryRow(
            path, owner, type(variable).__name__, str(variable.label), "", (), "", 0, 0, False
        )
    leaves = jax.tree_util.tree_leaves(raw)
    array = leaves[0] if len(leaves) == 1 else None
    shape = tuple(array.shape) if array is not None else ()
    dtype = str(array.dtype) if array is not None and hasattr(array, "dtype") else ""
    count = sum(math.prod(getattr(leaf, "shape", ())) for leaf in leaves)
    nbytes = sum(
        math.prod(getattr(leaf, "shape", ())) * getattr(getattr(leaf, "dtype", None), "itemsize", 0)
        for leaf in leaves
    )
    sharding_key = _sharding_metadata_key()
    sharding = metadata.get(sharding_key) if sharding_key is not None else None
    return SummaryRow(
        path=path,
        layer=owner,
        kind=type(variable).__name__,
        label=str(metadata.get("label", "")),
        axes=_axes_text(metadata.get("axis_names"), len(shape)),
        shape=shape,
        dtype=dtype,
        count=count,
        nbytes=nbytes,
        is_parameter=isinstance(variable, nnx.Param | variables.ParameterValue),
        sharding=_axes_text(sharding, len(shape)) if sharding else "",
    )


def _walk(model: Any) -> tuple[list[SummaryRow], list[WrappedModule]]:
    """The rows of every variable (each once) and the wrapped-though-mapped modules."""
    rows: list[SummaryRow] = []
    wrapped: list[WrappedModule] = []
    seen: set[int] = set()

    def visit(node: Any, path: str, owner: str) -> None:
        if tree_util.is_variable_node(node):
            if id(node) not in seen:
                seen.add(id(node))
                rows.append(_row(path or "<root>", owner, node))
            return
        if isinstance(node, nnx.Pytree):
            if id(node) in seen:
                return
            seen.add(id(node))
            if isinstance(node, nnx.Module):
                owner = type(node).__name__
            attributes = nnx_modules.module_attributes(node)
            for name, value, _ in sorted(attributes, key=lambda attribute: attribute[0]):
                visit(value, _join(path, name), owner)
            return
        if isinstance(node, struct.Struct):
            if callable(node):
                owner = _layer_name(node)
            if isinstance(node, wrappers.NNXWrapper) and node.wrapped_because:
                wrapped.append(
                    WrappedModule(path or "<root>", node.module_type.__name__, node.wrapped_because)
                )
            for field in dataclasses.fields(node):
                if struct.is_pytree_node_field(field):
                    visit(getattr(node, field.name), _join(path, field.name), owner)
            return
        if isinstance(node, list | tuple):
            for index, item in enumerate(node):
                visit(item, f"{path}[{index}]", owner)
            return
        if isinstance(node, dict):
            for key, item in node.items():
                visit(item, f"{path}[{key!r}]", owner)

    visit(model, "", _layer_name(model))
    return rows, wrapped


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def summary_rows(model: Any) -> list[SummaryRow]:
    """Lists every variable of a pz_flax model, NNX module, or mixture of them.

    Args:
        model: A pz_flax layer (any struct), an NNX module, or a list/dict of them.

    Returns:
        One row per variable, in traversal order; a variable reachable twice is listed once.
    """
    return _walk(model)[0]


def summary(model: Any) -> ModelSummary:
    """A table of a model's variables, with totals; prints nothing.

    Works on pz_flax layers, Flax NNX modules, and models mixing both. Columns: path, owning
    layer, variable kind, pz_flax label, axis names, sharding annotation (when a variable has
    one), shape, dtype, element count and size. Below the totals, each NNX module that was
    wrapped although its class has a mapping is listed with the setting that forced it.

    Args:
        model: The model.

    Returns:
        The summary: ``print(summary(model))`` writes the text table; as the last expression
        of a notebook cell it shows as an HTML table.
    """
    rows, wrapped = _walk(model)
    return ModelSummary(_layer_name(model), tuple(rows), tuple(wrapped))
