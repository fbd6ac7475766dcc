"""How positional NNX arrays get axis names in pz_flax, and back.

Flax NNX layers address axes by position ("the last axis is the feature axis"); pz_flax layers
address them by name. Converting a model between the two worlds therefore needs a convention
that says which name each NNX axis gets. ``NNXNaming`` is that convention:

* the NNX feature axis (the last one) is ``features``; a layer with several feature axes
  (``nnx.LinearGeneral(4, (2, 3))``) names them ``features_0``, ``features_1``, ...;
* attention's query sequence axis is ``seq``, the key/value sequence axis inside an attention
  layer is ``kv_seq``, and heads and per-head projections are ``heads`` and ``projection``;
* an embedding table's token axis is ``vocabulary`` and a LoRA adapter's inner axis is
  ``lora_rank``;
* convolution spatial axes are ``height`` and ``width`` (``seq`` for 1-D, ``depth`` added for
  3-D convolutions);
* every other axis is a free batch axis: pz_flax layers never look at it, so it may have any
  name (``batch`` is used where a name must be invented for a positional array).

So ``from_nnx(m)(pz.nx.wrap(x).tag("batch", "features")).unwrap("batch", "features")`` equals
``m(x)``. Every default can be overridden per call (``from_nnx(m, features="embedding")``), per
NNX class or per module path (``from_nnx(m, overrides={nnx.Embed: {"vocabulary": "token"}})``)
and per registered mapping.

Converted parameters are labelled by their NNX state path joined with ``/`` (``"layers/0/kernel"``),
optionally under ``label_prefix``, so a pz_flax label names the same variable as
``nnx.state(model)`` does.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax

from pz_flax.core import named_axes


@dataclasses.dataclass(frozen=True)
class NNXNaming:
    """The axis-naming convention used to convert between NNX and pz_flax layers.

    Attributes:
        features: Name of the NNX feature (last) axis of activations and weights.
        seq: Name of an attention layer's query sequence axis.
        kv_seq: Name of the key/value sequence axis inside an attention layer.
        heads: Name of the attention-head axis.
        projection: Name of the per-head projection axis.
        vocabulary: Name of the token axis of an embedding table.
        lora_rank: Name of the inner (rank) axis of a LoRA adapter.
        spatial: Names of the spatial axes of 2-D convolutions, outermost first.
        batch: Name given to a leading positional axis when one must be invented.
        stack: Name of the stack axis of layers created with ``nnx.vmap`` (see ``from_nnx``).
        label_prefix: Prefix of every converted variable's label (joined with ``/``).
        input_axes: For modules that are wrapped rather than mapped: the named axes moved, in
            this order, to the end of the positional array the module receives (default:
            ``(features,)``); the input's other named axes are its leading batch axes.
        output_axes: For wrapped modules: names of the trailing axes of the module's output
            (default: the input's trailing names if the ranks agree, else ``features`` axes
            for the extra trailing axes).
    """

    features: str = "features"
    seq: str = "seq"
    kv_seq: str = "kv_seq"
    heads: str = "heads"
    projection: str = "projection"
    vocabulary: str = "vocabulary"
    lora_rank: str = "lora_rank"
    spatial: tuple[str, ...] = ("height", "width")
    batch: str = "batch"
    stack: str = "layers"
    label_prefix: str = ""
    input_axes: tuple[str, ...] | None = None
    output_axes: tuple[str, ...] | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("spatial", "input_axes", "output_axes"):
                if value is None and field.name != "spatial":
                    continue
                if not (isinstance(value, tuple) and all(isinstance(n, str) for n in value)) or (
                    field.name == "spatial" and not value
                ):
                    raise TypeError(
                        f"NNXNaming.{field.name} must be a tuple of axis names, got {value!r}."
                    )
            elif not isinstance(value, str):
                raise TypeError(
                    f"NNXNaming.{field.name} must be a string axis name, got {value!r} of type"
                    f" {type(value).__name__}."
                )

    def replace(self, **changes: Any) -> NNXNaming:
        """Returns a copy with some names changed, rejecting unknown names clearly.

        Args:
            **changes: New values for fields of this class.

        Returns:
            The updated naming.

        Raises:
            TypeError: If a keyword is not a naming field.
        """
        unknown = sorted(set(changes) - {field.name for field in dataclasses.fields(self)})
        if unknown:
            raise TypeError(
                f"Unknown naming option(s) {unknown}; the naming options are"
                f" {[field.name for field in dataclasses.fields(self)]}."
            )
        for name in ("spatial", "input_axes", "output_axes"):
            if isinstance(changes.get(name), list):
                changes[name] = tuple(changes[name])
        return dataclasses.replace(self, **changes)

    def feature_axes(self, count: int) -> tuple[str, ...]:
        """Names of ``count`` trailing feature axes: ``features``, or ``features_0``, ...

        Args:
            count: How many feature axes an NNX layer has at this point.

        Returns:
            The names, outermost first.
        """
        if count == 1:
            return (self.features,)
        return tuple(f"{self.features}_{index}" for index in range(count))

    def spatial_axes(self, rank: int) -> tuple[str, ...]:
        """Names of ``rank`` convolution spatial axes, outermost first.

        Args:
            rank: Number of spatial axes of a convolution.

        Returns:
            ``spatial`` for its own rank, ``(seq,)`` for 1-D and ``("depth", *spatial)`` for 3-D
            convolutions when ``spatial`` has two names.

        Raises:
            ValueError: If no names are known for that rank.
        """
        if rank == len(self.spatial):
            return self.spatial
        if rank == 1:
            return (self.seq,)
        if rank == 3 and len(self.spatial) == 2:
            return ("depth", *self.spatial)
        raise ValueError(
            f"No spatial axis names for a {rank}-D convolution: the naming's spatial axes are"
            f" {self.spatial}. Pass spatial=(...) with {rank} names."
        )

    def default_axis_names(self, ndim: int) -> tuple[str, ...]:
        """Names for a positional array of rank ``ndim`` under this convention.

        Rank 1 is ``(features,)``, rank 2 ``(batch, features)``, rank 3
        ``(batch, seq, features)``, rank ``2 + len(spatial)`` ``(batch, *spatial, features)``;
        other ranks get numbered batch axes before ``features``.

        Args:
            ndim: The array's rank.

        Returns:
            One distinct name per axis.
        """
        if ndim == 0:
            return ()
        if ndim == 1:
            return (self.features,)
        if ndim == 2:
            return (self.batch, self.features)
        if ndim == 3:
            return (self.batch, self.seq, self.features)
        if ndim == 2 + len(self.spatial):
            return (self.batch, *self.spatial, self.features)
        extra = tuple(f"{self.batch}_{index}" for index in range(1, ndim - 1))
        return (self.batch, *extra, self.features)

    def label(self, path: Sequence[Hashable]) -> str:
        """The label of the variable at an NNX state path.

        Args:
            path: The NNX path (attribute names and list indices).

        Returns:
            The path's parts joined with ``/``, under ``label_prefix`` if set.
        """
        parts = [str(part) for part in path]
        if self.label_prefix:
            parts.insert(0, self.label_prefix)
        return "/".join(parts)


DEFAULT_NAMING = NNXNaming()


def resolve_naming(
    base: NNXNaming,
    overrides: Mapping[Any, Mapping[str, Any]] | None,
    module_type: type[Any] | None,
    path: Sequence[Hashable],
    mapping_naming: Mapping[str, Any] | None = None,
) -> NNXNaming:
    """The naming that applies to one module, after all overrides.

    Precedence, weakest first: ``base`` (defaults plus per-call keywords), the mapping's own
    overrides, overrides for the module's class, overrides for the module's path.

    Args:
        base: The per-call naming.
        overrides: ``{nnx class or "path/of/module": {field: name}}``.
        module_type: The module's class.
        path: The module's path from the converted root.
        mapping_naming: Overrides declared by the mapping that converts the module.

    Returns:
        The naming to use for this module.
    """
    naming = base
    if mapping_naming:
        naming = naming.replace(**mapping_naming)
    if overrides:
        if module_type is not None and module_type in overrides:
            naming = naming.replace(**overrides[module_type])
        path_key = "/".join(str(part) for part in path)
        if path_key in overrides:
            naming = naming.replace(**overrides[path_key])
    return naming


def check_overrides(overrides: Any) -> dict[Any, dict[str, Any]]:
    """Validates the ``overrides`` argument of ``from_nnx``.

    Args:
        overrides: None, or a mapping from NNX classes or path strings to naming dicts.

    Returns:
        A plain dict of plain dicts.

    Raises:
        TypeError: If the argument or one of its entries has the wrong type.
    """
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(
            "overrides must map NNX classes or module paths to naming dicts, got"
            f" {type(overrides).__name__}."
        )
    checked = {}
    for key, value in overrides.items():
        if not isinstance(key, type | str):
            raise TypeError(
                f"overrides keys must be NNX classes or 'path/to/module' strings, got {key!r}."
            )
        if not isinstance(value, Mapping):
            raise TypeError(
                f"overrides[{key!r}] must be a dict of naming options, got {type(value).__name__}."
            )
        DEFAULT_NAMING.replace(**value)  # validates the field names early
        checked[key] = dict(value)
    return checked


def to_positional(
    value: Any, trailing_axes: Sequence[str]
) -> tuple[Any, Callable[[Any], Any] | None]:
    """Turns a named activation into the positional array an NNX module expects.

    The axes named in ``trailing_axes`` that the value has are moved to the end in that order;
    every other named axis is a batch axis and keeps its relative order in front of them
    (after any positional axes). Values that are not named arrays pass through unchanged.

    Args:
        value: A ``NamedArray``/``NamedArrayView`` or anything else.
        trailing_axes: Names that belong at the end, in NNX order.

    Returns:
        ``(positional, leading_names)``: the positional data and the names of the axes in
        front of the trailing ones, or ``(value, None)`` if ``value`` is not a named array.
    """
    if not isinstance(value, named_axes.NamedArrayBase):
        return value, None
    names = list(value.named_shape)
    trailing = [name for name in trailing_axes if name in value.named_shape]
    leading = [name for name in names if name not in trailing]
    ordered = value.with_positional_prefix().order_as(*leading, *trailing)
    return ordered.data_array, tuple(leading)


def from_positional(
    output: Any,
    leading_names: tuple[str, ...] | None,
    trailing_names: Sequence[str],
    positional_rank: int,
    who: str,
) -> Any:
    """Names the output of an NNX module that was called through ``to_positional``.

    The leading axes get the input's batch names back, the trailing ones ``trailing_names``;
    axes in front of those (the input's positional axes) stay positional.

    Args:
        output: The NNX module's result; a pytree of arrays.
        leading_names: The batch names returned by ``to_positional``, or None if the input was
            not named (then the output is returned as is).
        trailing_names: Names of the output's trailing axes.
        positional_rank: Number of positional axes the input had.
        who: Description of the module, for error messages.

    Returns:
        The output with every array leaf wrapped as a ``NamedArray``.

    Raises:
        ValueError: If an output array's rank does not fit the names.
    """
    if leading_names is None:
        return output

    def name_leaf(leaf):
        if not isinstance(leaf, jax.Array):
            return leaf
        names = (*leading_names, *trailing_names)
        expected_rank = positional_rank + len(names)
        if leaf.ndim != expected_rank:
            raise ValueError(
                f"{who} returned an array of shape {leaf.shape}, which cannot be named"
                f" {names} after {positional_rank} positional axes (expected rank"
                f" {expected_rank}). Pass the names of its trailing output axes with"
                " output_axes=... when converting it."
            )
        sizes = leaf.shape[positional_rank:]
        return named_axes.NamedArray(
            named_axes=collections.OrderedDict(zip(names, sizes)), data_array=leaf
        )

    return jax.tree_util.tree_map(name_leaf, output)


def name_positional_input(value: Any, names: Sequence[str] | None, naming: NNXNaming) -> Any:
    """Names a positional array for a pz_flax layer called from NNX code.

    Args:
        value: A JAX array (named arrays and other values pass through).
        names: Explicit names, one per axis, or None for ``naming.default_axis_names``.
        naming: The convention that supplies default names.

    Returns:
        A fully named ``NamedArray``, or ``value`` unchanged if it is not an array.

    Raises:
        ValueError: If ``names`` does not have one name per axis.
    """
    if isinstance(value, named_axes.NamedArrayBase) or not isinstance(value, jax.Array):
        return value
    if names is None:
        names = naming.default_axis_names(value.ndim)
    if len(names) != value.ndim:
        raise ValueError(
            f"Cannot name an input of shape {value.shape} with the {len(names)} axis names"
            f" {tuple(names)}; give one name per axis."
        )
    return named_axes.wrap(value).tag(*names)


def unname_output(value: Any, input_names: Sequence[str]) -> Any:
    """Turns a pz_flax layer's named output back into positional arrays for NNX code.

    Axes whose names the input had come first, in the input's order; other names follow in
    the output's own order; positional axes (if any) stay in front.

    Args:
        value: The pz_flax layer's output; a pytree possibly containing named arrays.
        input_names: The names the input was given.

    Returns:
        The same pytree with every named array unwrapped.
    """

    def unname(leaf):
        if not isinstance(leaf, named_axes.NamedArrayBase):
            return leaf
        names = list(leaf.named_shape)
        order = [name for name in input_names if name in leaf.named_shape]
        order += [name for name in names if name not in order]
        return leaf.with_positional_prefix().order_as(*order).data_array

    return jax.tree_util.tree_map(
        unname, value, is_leaf=lambda node: isinstance(node, named_axes.NamedArrayBase)
    )
