"""``summary``: a table of a model's variables, for pz_flax layers and Flax NNX modules alike.

One row per variable: where it is (path), which layer owns it, what kind of variable it is,
its pz_flax label, its axis names, shape, dtype and element count; then totals for
parameters and for other state. The same function reads both worlds (and mixtures: pz_flax
layers inside NNX modules, wrapped NNX modules inside pz_flax models), so a model can be
compared before and after ``from_nnx``/``to_nnx``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from pz_flax.core import struct
from pz_flax.core import variables
from pz_flax.interop import wrappers


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


def _layer_name(node: Any) -> str:
    if isinstance(node, wrappers.FromNNX):
        return f"FromNNX({node.nnx_type.__name__})"
    if isinstance(node, wrappers.NNXWrapper):
        return f"NNXWrapper({node.module_type.__name__})"
    return type(node).__name__


def _row(path: str, owner: str, variable: Any) -> SummaryRow:
    if isinstance(variable, variables.LabeledVariable | nnx.Variable):
        raw = variable.get_value()
        metadata = variable.get_metadata()
    elif isinstance(variable, variables.LabeledVariableValue):
        value = variable.value
        raw = value.with_positional_prefix().data_array if hasattr(value, "data_array") else value
        metadata = {"label": variable.label}
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
    names = metadata.get("axis_names") or metadata.get("sharding_names")
    if names is not None:
        positional = len(shape) - len(names)
        axes = ", ".join(["-"] * positional + [str(name) for name in names])
    else:
        axes = ", ".join(["-"] * len(shape))
    is_parameter = isinstance(variable, nnx.Param | variables.ParameterValue)
    return SummaryRow(
        path=path,
        layer=owner,
        kind=type(variable).__name__,
        label=str(metadata.get("label", "")),
        axes=axes,
        shape=shape,
        dtype=dtype,
        count=count,
        nbytes=nbytes,
        is_parameter=is_parameter,
    )


def _is_variable(node: Any) -> bool:
    return isinstance(
        node,
        nnx.Variable
        | variables.AbstractVariable
        | variables.AbstractVariableValue
        | variables.AbstractVariableSlot,
    )


def summary_rows(model: Any) -> list[SummaryRow]:
    """Lists every variable of a pz_flax model, NNX module, or mixture of them.

    Args:
        model: A pz_flax layer (any struct), an NNX module, or a list/dict of them.

    Returns:
        One row per variable, in traversal order; a variable reachable twice is listed once.
    """
    rows: list[SummaryRow] = []
    seen: set[int] = set()

    def visit(node: Any, path: str, owner: str) -> None:
        if _is_variable(node):
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
            for name, value in sorted(vars(node).items()):
                if not name.startswith("_pytree__"):
                    visit(value, _join(path, name), owner)
            return
        if isinstance(node, struct.Struct):
            if callable(node):
                owner = _layer_name(node)
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
    return rows


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _format_bytes(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"


def summary(model: Any, *, print_fn: Callable[[str], Any] | None = print) -> str:
    """Prints (and returns) a table of a model's variables, with totals.

    Works on pz_flax layers, Flax NNX modules, and models mixing both. Columns: path, owning
    layer, variable kind, pz_flax label, axis names, shape, dtype and element count.

    Args:
        model: The model.
        print_fn: Called with the table; None to only return it.

    Returns:
        The table as text.
    """
    rows = summary_rows(model)
    header = ("path", "layer", "kind", "label", "axes", "shape", "dtype", "count")
    table = [header] + [
        (
            row.path,
            row.layer,
            row.kind,
            row.label,
            row.axes,
            str(row.shape),
            row.dtype,
            f"{row.count:,}",
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]

    def format_line(line):
        return " | ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()

    lines = [format_line(header), "-+-".join("-" * width for width in widths)]
    lines += [format_line(line) for line in table[1:]]
    parameters = [row for row in rows if row.is_parameter]
    state = [row for row in rows if not row.is_parameter]
    lines.append("")
    lines.append(
        f"Total: {sum(r.count for r in parameters):,} parameter values in"
        f" {len(parameters)} parameters ({_format_bytes(sum(r.nbytes for r in parameters))});"
        f" {sum(r.count for r in state):,} state values in {len(state)} state variables"
        f" ({_format_bytes(sum(r.nbytes for r in state))})."
    )
    text = "\n".join(lines)
    if print_fn is not None:
        print_fn(text)
    return text
