"""Low-rank adaptation (LoRA) of the ``Linear`` layers of a pretrained model.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) fine-tunes a large model cheaply: each
pretrained weight ``W`` stays as it is (usually frozen) and learns a low-rank correction
``A B`` instead, so the adapted layer computes ``x W + x A B``. Only ``A`` and ``B`` are
trained, which is a small fraction of the parameters.

In a pz_flax model every dense projection, whatever its role (attention heads, MLP, norm
scale), is a ``pz.nn.Linear`` whose weight names its axes. That makes LoRA a tree rewrite:
select part of the model, replace each ``Linear`` in it by a ``LowRankAdapter`` that holds the
original layer plus the update path, and train. Because the update path contracts and creates
axes *by name*, one implementation covers every weight layout, including per-head (parallel)
axes, which get one low-rank update per index.

Typical use::

    frozen = pz.freeze_params(model)  # or metadata={"trainable": False} on each Parameter
    adapted = lora.loraify_linears_in_selection(
        pz.select(frozen).at_instances_of(SomeBlock), rank=8, init_base_rng=jax.random.key(0)
    )
    ...  # train, e.g. with StatefulTrainer: only the new LoRA parameters are trainable
    deployable = lora.merge_lora_adapters_in_selection(pz.select(trained))

The last step is a pz_flax addition: it folds every adapter back into its base weight
(``W + A B``), giving a model with the original structure and labels, which is what an export
to a Flax NNX class without LoRA slots (``pz_flax.to_nnx``, ``write_nnx_checkpoint``) needs.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax

from pz_flax.core import named_axes
from pz_flax.core import selectors
from pz_flax.core import struct
from pz_flax.core import tree_util
from pz_flax.core import variables
from pz_flax.nn import combinators
from pz_flax.nn import grouping
from pz_flax.nn import linear_and_affine

_PRETRAINED_GROUP = "Pretrained"
_UPDATE_GROUP = "Update"


@struct.pytree_dataclass(has_implicitly_inherited_fields=True)
class LowRankAdapter(grouping.Sequential):
    """A ``Linear`` layer together with a trainable low-rank update of its weight.

    The layout is the one penzai uses, so selectors and tools written for penzai's adapters
    find the same pieces::

        LowRankAdapter([
            BranchAndAddTogether([
                NamedGroup("Pretrained", [linear]),
                NamedGroup("Update", [lora_a, lora_b]),
            ])
        ])

    ``lora_a`` is a ``Linear`` from ``linear``'s input axes to a new low-rank axis, and
    ``lora_b`` one from the low-rank axis to ``linear``'s output axes; both keep ``linear``'s
    parallel axes (one independent update per index); a factor is a ``LinearInPlace`` instead
    if the low-rank axis has the name of one of its other axes. ``lora_b`` starts at zero, so a
    fresh adapter computes exactly what ``linear`` did, and training starts from the pretrained
    model rather than from a perturbed one.

    Being its own ``Sequential`` subclass (with no behaviour of its own) makes adapters easy to
    select, count, switch off or merge, and gives them their own colour in treescope.

    Attributes:
        sublayers: A single ``BranchAndAddTogether`` laid out as above.
    """

    @classmethod
    def from_linear(
        cls,
        linear: linear_and_affine.Linear,
        name: str,
        init_base_rng: jax.Array | None,
        rank: int,
        lowrank_axis: str = "lowrank",
    ) -> LowRankAdapter:
        """Wraps a ``Linear`` layer in a new adapter whose update starts at zero.

        Args:
            linear: The layer to adapt. It is kept as is (the same object), so freezing its
                weight beforehand keeps it frozen.
            name: Prefix of the new parameters' labels: they are ``f"{name}/LoRA_A.weights"``
                and ``f"{name}/LoRA_B.weights"``. Labels must be unique across the model, so
                derive ``name`` from the layer's location (``loraify_linears_in_selection``
                uses ``"LoRA:" + pz.pretty_keystr(keypath, model)``) or its weight label.
            init_base_rng: Base PRNG key for the new parameters (each one folds its own label
                into it, as ``Linear.from_config`` does), or None to leave ``ParameterSlot``
                placeholders to be bound later.
            rank: Size of the low-rank axis.
            lowrank_axis: Name of the low-rank axis between ``lora_a`` and ``lora_b``. It must
                not be a parallel axis of ``linear``; if it is an input or output axis, the
                factor that would see it twice becomes a ``LinearInPlace`` (as in penzai).

        Returns:
            An adapter computing ``linear(x) + lora_b(lora_a(x))``, initially equal to
            ``linear(x)``.

        Raises:
            TypeError: If ``linear`` is not a ``Linear`` layer.
            ValueError: If ``rank`` is not a positive integer, or ``lowrank_axis`` is a
                parallel axis of ``linear``.
        """
        if not isinstance(linear, linear_and_affine.Linear):
            raise TypeError(
                "LowRankAdapter.from_linear adapts a pz.nn.Linear layer, got a"
                f" {type(linear).__name__}; select the Linear layers inside it instead (for"
                " example with loraify_linears_in_selection)."
            )
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(f"The LoRA rank must be a positive integer, got {rank!r}.")
        rank = int(rank)
        input_axes = linear.input_axes
        output_axes = linear.output_axes
        parallel_axes = linear.parallel_axes
        # A low-rank axis named like an input or output axis is handled by the factors'
        # from_config, which renames through a LinearInPlace (this is what happens when an
        # adapter's own factors are adapted). A parallel axis of that name cannot work: the
        # update would need two axes with one name.
        if lowrank_axis in parallel_axes:
            raise ValueError(
                f"lowrank_axis {lowrank_axis!r} is a parallel axis of the layer being adapted"
                f" (input axes {input_axes}, output axes {output_axes}, parallel axes"
                f" {parallel_axes}); pass a different lowrank_axis name."
            )
        lora_a = linear_and_affine.Linear.from_config(
            name=f"{name}/LoRA_A",
            init_base_rng=init_base_rng,
            input_axes=input_axes,
            output_axes={lowrank_axis: rank},
            parallel_axes=parallel_axes,
        )
        lora_b = linear_and_affine.Linear.from_config(
            name=f"{name}/LoRA_B",
            init_base_rng=init_base_rng,
            input_axes={lowrank_axis: rank},
            output_axes=output_axes,
            parallel_axes=parallel_axes,
            initializer=linear_and_affine.zero_initializer,
        )
        return cls(
            [
                combinators.BranchAndAddTogether(
                    [
                        grouping.NamedGroup(_PRETRAINED_GROUP, [linear]),
                        grouping.NamedGroup(_UPDATE_GROUP, [lora_a, lora_b]),
                    ]
                )
            ]
        )

    def _groups(self) -> tuple[grouping.NamedGroup, grouping.NamedGroup]:
        """The "Pretrained" and "Update" groups, after checking the layout described above.

        Adapters are ordinary trees that users may edit, so the layout is checked on access
        rather than assumed, to fail with a message instead of an ``IndexError``.
        """
        branches = None
        if len(self.sublayers) == 1 and isinstance(
            self.sublayers[0], combinators.BranchAndAddTogether
        ):
            branches = self.sublayers[0].branches
        if (
            branches is None
            or len(branches) != 2
            or not all(isinstance(branch, grouping.NamedGroup) for branch in branches)
            or (branches[0].name, branches[1].name) != (_PRETRAINED_GROUP, _UPDATE_GROUP)
            or len(branches[0].sublayers) != 1
            or len(branches[1].sublayers) != 2
        ):
            raise ValueError(
                "This LowRankAdapter no longer has the layout built by from_linear"
                " (one BranchAndAddTogether of NamedGroup('Pretrained', [linear]) and"
                " NamedGroup('Update', [lora_a, lora_b])); its sublayers are"
                f" {[type(sublayer).__name__ for sublayer in self.sublayers]}."
            )
        return branches[0], branches[1]

    @property
    def pretrained(self) -> Any:
        """The adapted layer (the ``Linear`` given to ``from_linear``, unless replaced)."""
        pretrained_group, _ = self._groups()
        return pretrained_group.sublayers[0]

    @property
    def update_factors(self) -> tuple[Any, Any]:
        """The ``(lora_a, lora_b)`` layers of the update path."""
        _, update_group = self._groups()
        lora_a, lora_b = update_group.sublayers
        return lora_a, lora_b

    def merged(self) -> linear_and_affine.Linear:
        """Folds the update into the base weight, giving one ``Linear`` that computes the same.

        The new weight is ``W + A B``, contracted over the low-rank axis (and batched over the
        parallel axes), laid out like ``W`` and cast to ``W``'s dtype. It keeps the base
        weight's kind (``Parameter`` or frozen ``ParameterValue``), label and metadata, so the
        merged model has the pretrained model's structure and labels: an NNX module or
        checkpoint of the original class can take its weights.

        Returns:
            A copy of the pretrained ``Linear`` with the merged weight.

        Raises:
            ValueError: If the adapter's layout was edited so that it is no longer a ``Linear``
                plus a low-rank update of it.
            TypeError: If the base weight is neither a ``Parameter`` nor a ``ParameterValue``.
            pz.UnboundVariableError: If a weight is an unbound ``ParameterSlot``.
        """
        base = self.pretrained
        if not isinstance(base, linear_and_affine.Linear):
            raise ValueError(
                "Cannot merge a LowRankAdapter whose pretrained layer is a"
                f" {type(base).__name__}; merging needs a Linear there."
            )
        lora_a, lora_b = self.update_factors
        update = _update_weight(
            _as_renamed_linear(lora_a, "lora_a"), _as_renamed_linear(lora_b, "lora_b")
        )
        base_weight = base.weights.value
        if dict(update.named_shape) != dict(base_weight.named_shape):
            raise ValueError(
                f"The LoRA update has named shape {dict(update.named_shape)}, which differs from"
                f" the base weight's {dict(base_weight.named_shape)}; cannot merge them."
            )
        merged_value = (
            (base_weight + update).astype(base_weight.dtype).order_as(*base_weight.named_axes)
        )
        return dataclasses.replace(base, weights=_with_value(base.weights, merged_value))


def _as_renamed_linear(factor: Any, role: str) -> tuple[linear_and_affine.Linear, dict[str, str]]:
    """Splits an update factor into its ``Linear`` and the renaming of its outputs, if any."""
    if isinstance(factor, linear_and_affine.Linear):
        return factor, {}
    if (
        isinstance(factor, linear_and_affine.LinearInPlace)
        and len(factor.sublayers) == 2
        and isinstance(factor.sublayers[0], linear_and_affine.Linear)
        and isinstance(factor.sublayers[1], linear_and_affine.RenameAxes)
    ):
        linear, rename = factor.sublayers
        old = (rename.old,) if isinstance(rename.old, str) else tuple(rename.old)
        new = (rename.new,) if isinstance(rename.new, str) else tuple(rename.new)
        return linear, dict(zip(old, new))
    raise ValueError(
        f"Cannot merge a LowRankAdapter whose {role} layer is a {type(factor).__name__};"
        " merging needs a Linear (or a LinearInPlace) there."
    )


def _update_weight(
    lora_a: tuple[linear_and_affine.Linear, dict[str, str]],
    lora_b: tuple[linear_and_affine.Linear, dict[str, str]],
) -> named_axes.NamedArray:
    """The weight of ``lora_b`` after ``lora_a`` as one operator (``A B`` by axis name).

    The axes joining the factors are the outputs of A (after A's renaming) that B contracts.
    Both sides are retagged with fresh names before contracting, because A's output may carry
    the name of one of its own inputs (and B's input the name of one of its outputs) when
    the factors are ``LinearInPlace``s.
    """
    (linear_a, renames_a), (linear_b, renames_b) = lora_a, lora_b
    joining = {renames_a.get(raw, raw): raw for raw in linear_a.out_axis_names}
    if set(joining) != set(linear_b.in_axis_names):
        raise ValueError(
            "Cannot merge a LowRankAdapter whose factors do not meet on the low-rank axis:"
            f" lora_a outputs {tuple(joining)}, but lora_b contracts {linear_b.in_axis_names}."
        )
    weight_a = linear_a.weights.value
    weight_b = linear_b.weights.value
    taken = {*weight_a.named_shape, *weight_b.named_shape}
    fresh = {}
    for name in joining:
        candidate = f"{name}__joined"
        while candidate in taken:
            candidate += "_"
        fresh[name] = candidate
        taken.add(candidate)
    weight_a = weight_a.untag(*joining.values()).tag(*fresh.values())
    weight_b = weight_b.untag(*joining).tag(*(fresh[name] for name in joining))
    update = linear_and_affine.contract(tuple(fresh.values()), weight_a, weight_b)
    if renames_b:
        update = update.untag(*renames_b).tag(*renames_b.values())
    return update


def _with_value(weights: Any, value: named_axes.NamedArray) -> Any:
    """A new parameter object of the same kind, label and metadata as ``weights``."""
    if isinstance(weights, variables.Parameter):
        return variables.Parameter(label=weights.label, value=value, metadata=weights.metadata)
    if isinstance(weights, variables.ParameterValue):
        return variables.ParameterValue(label=weights.label, value=value, metadata=weights.metadata)
    raise TypeError(
        "LowRankAdapter.merged can rebuild a Parameter or a ParameterValue, but the pretrained"
        f" layer's weights are a {type(weights).__name__}."
    )


def loraify_linears_in_selection(
    selection: selectors.Selection[Any],
    rank: int,
    init_base_rng: jax.Array | None,
) -> Any:
    """Replaces every ``Linear`` inside the selected parts of a model with a ``LowRankAdapter``.

    Existing parameters are reused untouched (so freeze them first, with ``pz.freeze_params``
    or ``metadata={"trainable": False}``, to train only the adapters); the new parameters are
    labelled ``"LoRA:" + pz.pretty_keystr(path, model) + "/LoRA_A.weights"`` (and ``LoRA_B``),
    where ``path`` leads from the model root to the replaced ``Linear``, which makes the labels
    unique. The low-rank axis is called ``"lowrank"``; build adapters with
    ``LowRankAdapter.from_linear`` directly for another name or labelling scheme.

    Selected parts without any ``Linear`` are left as they are.

    Args:
        selection: A selection of the model; every ``Linear`` within a selected subtree
            (including one selected directly) is adapted.
        rank: Rank of each adapter.
        init_base_rng: Base PRNG key for the adapter parameters, or None for parameter slots.

    Returns:
        The whole model (``selection.deselect()``) with the adapters in place.

    Raises:
        ValueError: If ``rank`` is not a positive integer, or a selected ``Linear`` has a
            parallel axis named ``"lowrank"``.
    """
    model = selection.deselect()
    return selection.at_instances_of(linear_and_affine.Linear).apply(
        lambda keypath, linear: LowRankAdapter.from_linear(
            linear,
            name="LoRA:" + tree_util.pretty_keystr(keypath, model),
            init_base_rng=init_base_rng,
            rank=rank,
        ),
        with_keypath=True,
    )


def merge_lora_adapters_in_selection(selection: selectors.Selection[Any]) -> Any:
    """Replaces every ``LowRankAdapter`` inside the selected parts by its merged ``Linear``.

    The inverse of ``loraify_linears_in_selection`` up to the trained update: the result has
    the pretrained structure, labels and metadata, with each weight ``W`` replaced by
    ``W + A B``. Use it before exporting to a format without LoRA slots. Adapters inside
    other adapters (from adapting a model twice) are merged inside out.

    Args:
        selection: A selection of the model, e.g. ``pz.select(model)`` for every adapter.

    Returns:
        The whole model (``selection.deselect()``) with the selected adapters merged.

    Raises:
        ValueError, TypeError: As ``LowRankAdapter.merged``.
    """
    return selection.at_instances_of(LowRankAdapter).apply(_merge_inside_out)


def _merge_inside_out(adapter: LowRankAdapter) -> linear_and_affine.Linear:
    """Merges the adapters within ``adapter`` first, so that its own layers are ``Linear``s."""
    sublayers = (
        selectors.select(adapter.sublayers).at_instances_of(LowRankAdapter).apply(_merge_inside_out)
    )
    return dataclasses.replace(adapter, sublayers=sublayers).merged()
