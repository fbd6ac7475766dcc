"""A minimal stateful trainer for pz_flax models, as fast per step as hand-written ``jax.jit``.

``StatefulTrainer`` keeps penzai's interface: ``build`` it from a model, an Optax optimizer and a
loss function, then call ``step(**batch)``; the model's ``Parameter`` and ``StateVariable``
objects are updated in place after every step, so the model you passed in is always the trained
one.

What it does differently from a naive implementation is where the work happens. Walking a
model in Python (unbinding variables, flattening structs, rebuilding objects) costs
microseconds per node, which on a small model is many times the cost of the step itself. So the
model is walked exactly once, in ``build``: the trainer remembers the variable objects and a
skeleton of the model with slots in their place. Each ``step`` then only reads the variables'
raw arrays into a dict, makes one jitted call, and writes the new arrays back; the model
objects are rebuilt only *inside* the traced function, where it costs nothing at run time.

The optimizer sees the trainable parameters as a dict from label to raw (positional) array,
which JAX flattens in C++. Labels identify parameters, so label-based masks
(``optax.masked``, ``optax.multi_transform``) work directly on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any
from typing import Protocol

import jax
import jax.numpy as jnp
import optax
from flax import errors as flax_errors

from pz_flax._compat import nnx as nnx_compat
from pz_flax.core import struct
from pz_flax.core import variables

ModelPyTree = Any
AuxOutPyTree = Any
LossStatePyTree = Any
OptimizerStatePyTree = Any
PRNGKeyArray = jax.Array


class LossFunction(Protocol):
    """The loss function a ``StatefulTrainer`` optimizes."""

    def __call__(
        self,
        *,
        model: ModelPyTree,
        state: LossStatePyTree,
        rng: PRNGKeyArray,
        **kwargs,
    ) -> tuple[jax.Array, LossStatePyTree, AuxOutPyTree]:
        """Computes the loss of ``model`` on one batch.

        Args:
            model: The model, its parameters bound to the values being differentiated.
            state: Whatever state the loss function keeps between steps (None if unused).
            rng: A per-step random key (the root key folded with the step number).
            **kwargs: The keyword arguments given to ``StatefulTrainer.step``: usually the batch.

        Returns:
            ``(loss, new_state, aux_outputs)``: a scalar loss, the next ``state`` (same
            structure), and any pytree to hand back to the caller of ``step``.
        """


@struct.pytree_dataclass
class InternalTrainerState(struct.Struct):
    """What the trainer carries from one step to the next besides the model's variables.

    Attributes:
        step: Number of steps taken so far.
        opt_state: The Optax state for the trainable parameters (a dict keyed by label).
        loss_fn_state: The loss function's own state.
    """

    step: int | jax.Array
    opt_state: OptimizerStatePyTree
    loss_fn_state: LossStatePyTree


def _split_variables(model_variables):
    """Sorts a model's variables into (trainable params, frozen params, state variables)."""
    trainable, frozen, state_vars = {}, {}, {}
    for variable in model_variables:
        if isinstance(variable, variables.Parameter):
            group = trainable if variable.metadata.get("trainable", True) else frozen
        elif isinstance(variable, variables.StateVariable):
            group = state_vars
        else:
            raise ValueError(
                f"StatefulTrainer can train Parameters and carry StateVariables; the model holds"
                f" a {type(variable).__name__} labelled {variable.label!r}."
            )
        key = str(variable.label)
        if key in trainable or key in frozen or key in state_vars:
            raise variables.VariableConflictError(
                f"Two variables of the model have labels that print as {key!r}; the trainer keys"
                " optimizer state by label, so labels must be distinct."
            )
        group[key] = variable
    return trainable, frozen, state_vars


def _make_step_function(
    skeleton: ModelPyTree,
    templates: dict[str, variables.AbstractVariable],
    group_keys: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]],
    loss_fn: LossFunction,
    optimizer_def: optax.GradientTransformation,
) -> Callable[..., Any]:
    """Builds the pure step function over raw arrays; the model is rebuilt inside it.

    The raw values of each variable group (trainable, frozen, state variables) come in, and
    go out, as tuples in ``group_keys`` order: the label-keyed dicts the optimizer state is
    built from only exist inside the trace, so a step builds no dict and JAX flattens no
    sorted-key dict on dispatch.
    """
    trainable_keys, frozen_keys, state_var_keys = group_keys

    def rebind(raw_values: dict[str, Any]) -> tuple[ModelPyTree, dict[str, Any]]:
        fresh = {key: templates[key].replace(raw) for key, raw in raw_values.items()}
        return variables.bind_variables(skeleton, tuple(fresh.values())), fresh

    def step_fn(root_rng, state, trainable_values, frozen_values, state_var_values, kwargs):
        trainable = dict(zip(trainable_keys, trainable_values, strict=True))
        frozen = dict(zip(frozen_keys, frozen_values, strict=True))
        state_vars = dict(zip(state_var_keys, state_var_values, strict=True))
        step_rng = jax.random.fold_in(root_rng, state.step)

        def loss_and_updates(trainable_values):
            model, fresh = rebind({**trainable_values, **frozen, **state_vars})
            loss, new_loss_fn_state, aux = loss_fn(
                model=model, state=state.loss_fn_state, rng=step_rng, **kwargs
            )
            new_state_vars = {key: fresh[key].get_raw_value() for key in state_vars}
            return loss, (new_state_vars, new_loss_fn_state, aux)

        grads, (new_state_vars, new_loss_fn_state, aux) = jax.grad(loss_and_updates, has_aux=True)(
            trainable
        )
        updates, new_opt_state = optimizer_def.update(grads, state.opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        new_state = InternalTrainerState(
            step=state.step + 1, opt_state=new_opt_state, loss_fn_state=new_loss_fn_state
        )
        return (
            aux,
            tuple(new_trainable[key] for key in trainable_keys),
            tuple(new_state_vars[key] for key in state_var_keys),
            new_state,
        )

    return step_fn


@struct.pytree_dataclass
class StatefulTrainer(struct.Struct):
    """Trains a model in place with an Optax optimizer.

    Build with `StatefulTrainer.build`, then call `step` once per batch. Parameters whose
    ``metadata["trainable"]`` is False are passed to the model but never updated; state
    variables (batch statistics, counters) are carried from step to step.

    Attributes:
        root_rng: The key each step's ``rng`` is derived from (folded with the step number).
        model: The model being trained; its variables are updated after every step.
        state: A state variable holding the `InternalTrainerState`.
        optimizer_def: The Optax optimizer.
        loss_fn: The loss function (see `LossFunction`).
        step_fn: The compiled step over raw arrays, built by `build`.
    """

    root_rng: PRNGKeyArray
    model: ModelPyTree
    state: variables.StateVariable
    optimizer_def: optax.GradientTransformation = dataclasses.field(metadata={"pytree_node": False})
    loss_fn: LossFunction = dataclasses.field(metadata={"pytree_node": False})
    step_fn: Any = dataclasses.field(metadata={"pytree_node": False})

    @classmethod
    def build(
        cls,
        root_rng: PRNGKeyArray,
        model: ModelPyTree,
        optimizer_def: optax.GradientTransformation,
        # A protocol with **kwargs matches no function with named batch arguments, hence Callable.
        loss_fn: LossFunction | Callable[..., tuple[jax.Array, LossStatePyTree, AuxOutPyTree]],
        initial_loss_fn_state: LossStatePyTree = None,
        jit: bool = True,
        donate_states: bool = False,
    ) -> StatefulTrainer:
        """Sets up training: walks the model once and compiles the step lazily.

        Args:
            root_rng: Key from which each step's key is derived.
            model: The model to train; must hold its parameters as ``Parameter`` variables.
            optimizer_def: The Optax optimizer.
            loss_fn: The loss function (see `LossFunction`).
            initial_loss_fn_state: The loss function's initial state.
            jit: Compile the step with ``jax.jit`` (turn off to debug with prints).
            donate_states: Let XLA reuse the buffers of the parameters, state variables and
                optimizer state for their updated values (saves memory; the old arrays are
                invalidated after each step).

        Returns:
            The trainer.
        """
        skeleton, model_variables = variables.unbind_variables(model)
        trainable, frozen, state_vars = _split_variables(model_variables)
        templates = {**trainable, **frozen, **state_vars}
        _check_writable_in_this_trace({**trainable, **state_vars})
        initial_opt_state = optimizer_def.init(
            {key: var.get_raw_value() for key, var in trainable.items()}
        )
        initial_state = _placed_like_parameters(
            InternalTrainerState(
                # An array from the start, so the second step does not recompile for a Python
                # int turning into an array.
                step=jnp.zeros((), jnp.int32),
                opt_state=initial_opt_state,
                loss_fn_state=initial_loss_fn_state,
            ),
            trainable,
        )
        step_fn = _make_step_function(
            skeleton,
            templates,
            (tuple(trainable), tuple(frozen), tuple(state_vars)),
            loss_fn,
            optimizer_def,
        )
        if jit:
            # Index 1-4: trainer state, trainable params, frozen params, state variables.
            step_fn = jax.jit(step_fn, donate_argnums=(1, 2, 4) if donate_states else ())
        return cls(
            root_rng=root_rng,
            model=model,
            state=variables.StateVariable(initial_state, label="StatefulTrainer.state"),
            optimizer_def=optimizer_def,
            loss_fn=loss_fn,
            step_fn=_BoundStep(
                step_fn, trainable, frozen, state_vars, _spans_several_cpu_devices(templates)
            ),
        )

    def step(self, **kwargs) -> AuxOutPyTree:
        """Runs one training step on ``kwargs`` (passed to the loss function).

        Returns:
            The loss function's auxiliary outputs.
        """
        return self.step_fn(self.root_rng, self.state, kwargs)


def _check_writable_in_this_trace(written: dict[str, variables.AbstractVariable]):
    """Refuses to build a trainer whose steps would write variables of another JAX trace.

    Steps skip NNX's per-write trace check and compare the trace once instead (see
    `_BoundStep`), which is only sound if, here, every variable the steps write may be written:
    NNX's own check decides that, through a write of the value each variable already holds.
    """
    for key, variable in written.items():
        try:
            variable.set_raw_value(variable.get_raw_value())
        except flax_errors.TraceContextError as exc:
            raise flax_errors.TraceContextError(
                f"StatefulTrainer.build was called inside a JAX transformation (jax.jit,"
                f" jax.grad, ...) with a model whose variable {key!r} was created outside it;"
                " the trainer's steps would leave tracers in that variable. Build the trainer"
                " outside the transformation."
            ) from exc


def _placed_like_parameters(
    state: InternalTrainerState, trainable: dict[str, variables.AbstractVariable]
) -> InternalTrainerState:
    """Replicates the trainer state's unplaced arrays over the parameters' mesh, if any.

    Scalars such as the step counter and Adam's count are created on the default device,
    but the first step returns them placed on the parameters' mesh; without this, the second
    step would see new input shardings and compile the whole step again.
    """
    mesh_sharding = next(
        (
            leaf.sharding
            for var in trainable.values()
            for leaf in jax.tree_util.tree_leaves(var.get_raw_value())
            if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding)
        ),
        None,
    )
    if mesh_sharding is None:
        return state
    replicated = jax.sharding.NamedSharding(mesh_sharding.mesh, jax.sharding.PartitionSpec())

    def place(leaf):
        if isinstance(leaf, jax.Array) and isinstance(
            leaf.sharding, jax.sharding.SingleDeviceSharding
        ):
            return jax.device_put(leaf, replicated)
        return leaf

    return jax.tree_util.tree_map(place, state)


def _spans_several_cpu_devices(model_variables: dict[str, variables.AbstractVariable]) -> bool:
    """Whether the model lives on more than one CPU device (e.g. faked with XLA_FLAGS)."""
    for variable in model_variables.values():
        for leaf in jax.tree_util.tree_leaves(variable.get_raw_value()):
            sharding = getattr(leaf, "sharding", None)
            if sharding is not None and len(sharding.device_set) > 1:
                return next(iter(sharding.device_set)).platform == "cpu"
    return False


class _BoundStep:
    """The per-step hot path: read raw arrays, one jitted call, write raw arrays back.

    Holds the variable objects found at build time, so no step ever walks the model. NNX checks
    the JAX trace on every variable write (twice per ``set_raw_value``, ~1.4 us), a visible
    share of a small step that writes every parameter; a step instead compares the trace once,
    with the trace the trainer was built in (where `_check_writable_in_this_trace` vouched for
    every written variable), and then writes without NNX's checks.
    """

    def __init__(self, compiled, trainable, frozen, state_vars, wait_for_each_step):
        self.compiled = compiled
        # In the order of the keys `_make_step_function` was given (the dicts' order).
        self.trainable_vars = tuple(trainable.values())
        self.frozen_vars = tuple(frozen.values())
        self.state_var_vars = tuple(state_vars.values())
        self.written_variables = (*self.trainable_vars, *self.state_var_vars)
        self.home_trace = nnx_compat.current_trace()
        # XLA's in-process CPU collectives can deadlock when many multi-device steps are queued
        # at once (each device runs on a shared thread pool); on CPU nothing is gained by
        # queueing, so such steps wait for the previous one.
        self.wait_for_each_step = wait_for_each_step

    def __call__(self, root_rng, trainer_state: variables.StateVariable, kwargs):
        if nnx_compat.current_trace() != self.home_trace:
            raise flax_errors.TraceContextError(
                "StatefulTrainer.step was called inside a JAX transformation (jax.jit,"
                " jax.grad, jax.vmap, ...) that the trainer was not built in. A step writes the"
                " new parameters into the model's variables, which would then hold tracers that"
                " outlive the transformation. Call step outside it: the step is compiled with"
                " jax.jit already."
            )
        read = nnx_compat.read_raw_values
        aux, new_trainable, new_state_vars, new_internal_state = self.compiled(
            root_rng,
            trainer_state.get_raw_value(),
            read(self.trainable_vars),
            read(self.frozen_vars),
            read(self.state_var_vars),
            kwargs,
        )
        nnx_compat.write_raw_values_unchecked(
            (*self.written_variables, trainer_state),
            (*new_trainable, *new_state_vars, new_internal_state),
        )
        if self.wait_for_each_step:
            jax.block_until_ready(new_internal_state)
        return aux
