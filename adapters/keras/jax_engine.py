r"""The JAX backend: the Keras optimizer as an optax transformation, tuned by [`eos_core.adapters.jax.tune`][].

Everything the JAX adapter does (probes, routes and their `auto` resolution at trace time, spectra,
skipping non-finite steps inside `jit`, counting skipped steps and law fallbacks in the state) is reused
unchanged:

1. `keras_direction` turns the wrapped Keras optimizer into an `optax.GradientTransformation` whose update is $u$,
   the Keras update for learning rate 1 (see `eos_core.adapters.keras.optimizers`): the Keras optimizer runs
   inside a `keras.StatelessScope` that maps its variables to the optax state (a list of the optimizer variables'
   values) and the model's trainable variables to zeros.
2. `tune(keras_direction(...), law, ...)` is the transformation the tuner applies in `stateless_apply`, with
   `value_fn` the loss on the batch that the wrapped `train_step` publishes (`eos_core.adapters.keras.train_step`).
   New weights are $w + \eta u$ (then the variables' constraints).
3. The `TuneState` pytree is stored in Keras variables: its `base_state` *is* the wrapped optimizer's
   own variables, every other leaf (law state, step, skip and fallback counters, warm-start eigenvectors,
   previous update, the diagnostics vector) is one variable of the tuner, in `TuneState` field order.
   `model.save` / `load_model` and Keras's checkpoint callbacks therefore save and restore all of it.
4. The diagnostics are decoded by the JAX adapter's own
   [`decode_diagnostics`][eos_core.adapters.jax.decode_diagnostics], so they are exactly
   `eos_core.diagnostics.keys_for(law)` with the JAX adapter's meanings (`step`: the index of the step
   described among the steps taken).

The state is initialised eagerly when the optimizer is built (the spectral start vectors are drawn by numpy,
[`eos_core.spectral.random_start`][]; under `jit` that draw would be a host callback).

Warnings (the tuner's `warn`, passed to `tune`): with `warn=True` the jitted step holds no host callback (one would
cost about 10% on every step); `JaxEngine.report` raises the RuntimeWarnings on the host when
[`current_diagnostics`][eos_core.adapters.keras.current_diagnostics] reads the diagnostics (the Keras callback
calls it after every logged batch), for the skipped steps and fallbacks counted since the previous report, so each
bad step is reported once and reading every few batches misses none. The counts of a loaded checkpoint are the
baseline of the next report (`JaxEngine.mark_loaded`). `warn="jit"` warns from inside the step instead
(`jax.debug.callback`), `False` never.

**Monitoring only** (`law=None`): the base is `keras_measured`, the Keras optimizer's own `stateless_apply` (its
learning rate or schedule, its constraints) as an optax transformation whose state also carries the new weights
and, as an injected `learning_rate`, the rate it applied; `tune(base, None)` measures beside it and the weights are
those of a plain Keras run.

**The sharpness monitor** (`monitor_budget`) is the JAX adapter's (`eos_core.adapters.jax.monitor`): its state is
part of the `TuneState`, hence Keras variables like the rest. The edge of its warning is the Keras optimizer's
(`eos_core.adapters.keras.optimizers.edge`), passed to `tune` as `monitor_edge`. With `warn=True` its
RuntimeWarning is raised by `JaxEngine.report` when a read finds `unstable` turned on since the previous read.

Preconditioned sharpness (`sharpness_every`, `ExactSharpness(preconditioned=True)`,
`AdaEoS(preconditioned=True)`) is available for Adam, AdamW (`amsgrad` too) and RMSprop without momentum: with
lr = 1 Keras's Adam takes $u = -P^{-1} m$ with $P = (\sqrt{v} + \epsilon) (1 - \beta_1^t) / \sqrt{1 - \beta_2^t}$
and RMSprop $u = -P^{-1} g$ with $P = \sqrt{v + \epsilon}$ (centred: $\sqrt{v - \bar g^2 + \epsilon}$).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax

from eos_core.adapters.jax import decode_diagnostics, tune, warn_bad_steps, warn_unstable
from eos_core.adapters.jax.transform import TuneState
from eos_core.adapters.keras.optimizers import apply_update, decay_rates
from eos_core.laws.base import Law

#: dtype of the learning rate a monitoring-only base reports (Keras keeps learning rates in float32)
_LR_DTYPE = jnp.float32


def keras_direction(optimizer: Any, trainable: Sequence[Any]) -> optax.GradientTransformation:
    r"""`optimizer` as an optax transformation whose update is $u$, its update for learning rate 1.

    The update runs the Keras optimizer's own update (`apply_update`) inside a `keras.StatelessScope` on zero
    weights and adds the decoupled weight decay $-\text{wd} \cdot w$ (see `eos_core.adapters.keras.optimizers`).
    The transformation's `init` and `update` raise ValueError when `params` is not a list shaped like
    `trainable`.

    Args:
        optimizer: the Keras optimizer, built on `trainable`, with learning rate 1.
        trainable: the model's trainable variables.

    Returns:
        An `optax.GradientTransformation` whose state is the list of `optimizer.variables`' values and whose
        `update(grads, state, params)` returns $u$ as a list like `params`.
    """
    trainable = list(trainable)
    shapes = [tuple(v.shape) for v in trainable]
    decay = decay_rates(optimizer, trainable)

    def check(params: Any) -> list[Any]:
        params = list(params) if isinstance(params, list | tuple) else None
        if params is None or [tuple(jnp.shape(p)) for p in params] != shapes:
            raise ValueError("keras_direction: params must be the list of the model's trainable values")
        return params

    def init_fn(params: Any) -> list[Any]:
        check(params)
        return [jnp.asarray(v.value) for v in optimizer.variables]

    def update_fn(grads: Any, state: Any, params: Any = None) -> tuple[list[Any], list[Any]]:
        params = check(params)
        zeros = [jnp.zeros_like(p) for p in params]
        mapping = list(zip(trainable, zeros, strict=True)) + list(zip(optimizer.variables, state, strict=True))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            apply_update(optimizer, list(grads), trainable)
        u = [scope.get_current_value(v) for v in trainable]
        u = [d - jnp.asarray(rate, d.dtype) * p if rate else d for d, p, rate in zip(u, params, decay, strict=True)]
        return u, [scope.get_current_value(v) for v in optimizer.variables]

    return optax.GradientTransformation(init_fn, update_fn)


def keras_measured(optimizer: Any, trainable: Sequence[Any]) -> optax.GradientTransformation:
    """`optimizer` (built on `trainable`) stepping with its own learning rate, as an optax transformation.

    The update is Keras's own step, `optimizer.stateless_apply` (its learning rate or `LearningRateSchedule` at its
    `iterations`, gradient clipping, weight decay, constraints), reported as `new - w`. The state is an
    `optax.InjectHyperparamsState` whose `hyperparams["learning_rate"]` is the rate the last update applied (how
    `tune(base, None)` reads a base's learning rate) and whose `inner_state` is `(optimizer values, new weights)`: the
    weights Keras computed, which the engine applies as they are (`w + (new - w)` would round).

    Args:
        optimizer: the Keras optimizer, built on `trainable`.
        trainable: the model's trainable variables.

    Returns:
        An `optax.GradientTransformation` whose `update(grads, state, params)` returns `new - w` as a list like
        `params` (its `init` and `update` raise ValueError when `params` is not a list shaped like `trainable`).
    """
    trainable = list(trainable)
    shapes = [tuple(v.shape) for v in trainable]

    def check(params: Any) -> list[Any]:
        params = list(params) if isinstance(params, list | tuple) else None
        if params is None or [tuple(jnp.shape(p)) for p in params] != shapes:
            raise ValueError("keras_measured: params must be the list of the model's trainable values")
        return params

    def rate(values: list[Any]) -> Any:
        with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, values, strict=True))):
            return jnp.asarray(optimizer.learning_rate, _LR_DTYPE)

    def init_fn(params: Any) -> optax.InjectHyperparamsState:
        params = check(params)
        values = [jnp.asarray(v.value) for v in optimizer.variables]
        return measured_state(values, params, rate(values))

    def update_fn(grads: Any, state: Any, params: Any = None) -> tuple[list[Any], Any]:
        params = check(params)
        values = list(state.inner_state[0])
        lr = rate(values)
        weights, new_values = optimizer.stateless_apply(values, list(grads), params)
        updates = [new - old for new, old in zip(weights, params, strict=True)]
        return updates, measured_state(list(new_values), list(weights), lr)

    return optax.GradientTransformation(init_fn, update_fn)


def measured_state(values: list[Any], weights: list[Any], lr: Any) -> optax.InjectHyperparamsState:
    """The state of `keras_measured`.

    Args:
        values: the Keras optimizer's variables' values.
        weights: the weights its last step produced.
        lr: the learning rate that step applied.

    Returns:
        An `optax.InjectHyperparamsState` with `hyperparams={"learning_rate": lr}` (float32) and
        `inner_state=(values, weights)`.
    """
    return optax.InjectHyperparamsState(count=jnp.zeros((), jnp.int32),
                                        hyperparams={"learning_rate": jnp.asarray(lr, _LR_DTYPE)},
                                        inner_state=(list(values), list(weights)))


def keras_preconditioner(optimizer: Any, trainable: Sequence[Any]) -> Callable[[list[Any]], list[Any]] | None:
    r"""The diagonal preconditioner $P$ of the Keras optimizer, read from its state.

    Adam / AdamW: $P = (\sqrt{v} + \epsilon) (1 - \beta_1^t) / \sqrt{1 - \beta_2^t}$ (`amsgrad`: $v$ is the
    running maximum); RMSprop without momentum: $P = \sqrt{v + \epsilon}$, centred
    $\sqrt{v - \bar g^2 + \epsilon}$.

    Args:
        optimizer: the Keras optimizer, built on `trainable`.
        trainable: the model's trainable variables.

    Returns:
        A callable `base_state -> P` (`base_state` the list of the optimizer variables' values, `P` a list like
        the weights), or None for the other optimizers.
    """
    index = {id(v): i for i, v in enumerate(optimizer.variables)}
    position = [optimizer._get_variable_index(v) for v in trainable]
    count = index[id(optimizer._iterations)]
    if isinstance(optimizer, keras.optimizers.Adam):  # AdamW too
        second = optimizer._velocity_hats if optimizer.amsgrad else optimizer._velocities
        slots = [index[id(second[i])] for i in position]
        beta_1, beta_2, epsilon = float(optimizer.beta_1), float(optimizer.beta_2), float(optimizer.epsilon)

        def adam(state: list[Any]) -> list[Any]:
            out = []
            for slot in slots:
                v = state[slot]
                t = state[count].astype(v.dtype)
                out.append((jnp.sqrt(v) + epsilon) * (1.0 - beta_1**t) / jnp.sqrt(1.0 - beta_2**t))
            return out

        return adam
    if isinstance(optimizer, keras.optimizers.RMSprop) and float(optimizer.momentum) == 0.0:
        slots = [index[id(optimizer._velocities[i])] for i in position]
        means = [index[id(optimizer._average_gradients[i])] for i in position] if optimizer.centered else None
        epsilon = float(optimizer.epsilon)

        def rms(state: list[Any]) -> list[Any]:
            if means is None:
                return [jnp.sqrt(state[s] + epsilon) for s in slots]
            return [jnp.sqrt(state[s] - state[m] ** 2 + epsilon) for s, m in zip(slots, means, strict=True)]

        return rms
    return None


class JaxEngine:
    """Runs the tuner's step on the JAX backend (see the module docstring).

    Args:
        tuner: the Keras `CurvatureTuner` that owns the engine (its settings, variables and wrapped optimizer).
        law: the law (None: measuring only).
    """

    def __init__(self, tuner: Any, law: Law | None) -> None:
        self.tuner = tuner
        self.law = law
        self.measuring = law is None
        self.transform: Any = None
        self.treedef: Any = None
        self.state_variables: list[Any] = []
        self.keys: tuple[str, ...] = ()
        self.offsets: dict[str, int] = {}
        #: (skipped_steps, fallback_steps) at the last report; None: unknown (the next read sets it silently)
        self.reported: tuple[int, int] | None = (0, 0)
        #: the monitor's `unstable` at the last report (a read that finds it turned on since then warns)
        self.reported_unstable = False

    # -- build -----------------------------------------------------------------------------------
    def build(self, trainable: Sequence[Any]) -> None:
        """Build the `tune` transformation around the Keras optimizer, and one Keras variable per leaf of its state.

        Args:
            trainable: the model's trainable variables.
        """
        tuner, optimizer = self.tuner, self.tuner.inner_optimizer
        self.trainable = list(trainable)
        precond = keras_preconditioner(optimizer, self.trainable)
        self.has_preconditioner = precond is not None
        settings = tuner.settings
        if settings.monitor_budget is not None and settings.monitor_edge is None and np.isfinite(tuner.edge[0]):
            settings = settings.replace("CurvatureTuner", monitor_edge=tuner.edge[0])  # the Keras optimizer's edge
        if self.measuring:
            base = keras_measured(optimizer, self.trainable)
            if precond is not None:
                own = precond

                def precond(state: Any) -> list[Any]:
                    return own(list(state.inner_state[0]))

            self.transform = tune(base, None, preconditioner=precond, settings=settings)
        else:
            base = keras_direction(optimizer, self.trainable)
            # the law starts from the tuner's reference lr (the base's own rate is 1); 0 means "none" to tune
            reference = tuner.reference_lr if tuner.reference_lr > 0 else None
            self.transform = tune(base, self.law, preconditioner=precond, settings=settings, reference_lr=reference)
        # eager: the random start vectors are drawn on the host (under jit they would need a host callback)
        state = self.transform.init([jnp.asarray(v.value) for v in self.trainable])
        offset = 0
        for field in TuneState._fields:
            if field == "base_state":
                continue
            self.offsets[field] = offset
            offset += len(jax.tree.leaves(getattr(state, field)))
        leaves, self.treedef = jax.tree.flatten(state._replace(base_state=None))
        for i, leaf in enumerate(leaves):
            variable = tuner.add_variable(shape=tuple(leaf.shape), dtype=str(leaf.dtype), name=f"eos_core_state_{i}")
            # through the host: one buffer per variable (fit donates the state's buffers), and not committed to a
            # device, like Keras's own variables (a committed one among them makes fit compile its step twice)
            variable.assign(jnp.asarray(np.array(leaf)))
            self.state_variables.append(variable)
        self.keys = state.diagnostics.keys

    # -- step --------------------------------------------------------------------------------------
    def update(self, state_values: list[Any], optimizer_values: list[Any], grads: list[Any], params: list[Any],
               value_fn: Callable[[list[Any]], Any] | None) -> tuple[list[Any], list[Any], list[Any], Any]:
        """One tuned step, as a pure function of the values (it runs inside Keras's jitted train step).

        With the batch's `value_fn` the step's loss is passed as `value` (the `loss` diagnostic and the
        non-finite check, as the PyTorch tuner has them from the step's closure): the same function of the same
        inputs as the forward pass Keras differentiated in this jitted step, which XLA computes once.

        Args:
            state_values: the values of the engine's state variables (`state_variables` order).
            optimizer_values: the values of the wrapped optimizer's variables.
            grads: the gradients, one per trainable variable.
            params: the trainable variables' values.
            value_fn: the loss on the batch as a function of the trainable values (None when the step has no
                batch and the law needs none).

        Returns:
            `(weights, state_values, optimizer_values, lr)`: the new weights (before the variables'
            constraints), the new values of the state and optimizer variables, and the learning rate applied (a
            0-d array).
        """
        base_state: Any = list(optimizer_values)
        if self.measuring:  # the learning rate entering the state is not read: update_fn writes this step's
            base_state = measured_state(list(optimizer_values), list(params), jnp.zeros((), _LR_DTYPE))
        state = self.treedef.unflatten(list(state_values))._replace(base_state=base_state)
        value = None if value_fn is None else value_fn(list(params))
        updates, new_state = self.transform.update(list(grads), state, list(params), value_fn=value_fn, value=value)
        leaves = jax.tree.leaves(new_state._replace(base_state=None))
        leaves = [jnp.asarray(new).astype(old.dtype) for new, old in zip(leaves, state_values, strict=True)]
        if self.measuring:  # Keras's own weights (the entering ones on a skipped step)
            new_values, weights = new_state.base_state.inner_state
            return list(weights), leaves, list(new_values), new_state.diagnostics["lr"]
        weights = [(p + u.astype(p.dtype)).astype(p.dtype) for p, u in zip(params, updates, strict=True)]
        return weights, leaves, list(new_state.base_state), new_state.diagnostics["lr"]

    # -- reading ----------------------------------------------------------------------------------
    @property
    def diagnostics_variable(self) -> Any:
        """The Keras variable holding the diagnostics vector of the `TuneState`."""
        return self.state_variables[self.offsets["diagnostics"]]

    def decode(self, read: Callable[[Any], Any]) -> dict[str, Any]:
        """The last step's diagnostics, decoded from the state variables.

        Args:
            read: maps a Keras variable to its current value (inside `fit` on JAX: from the live training
                state).

        Returns:
            Exactly `eos_core.diagnostics.keys_for(law)` (see
            [`decode_diagnostics`][eos_core.adapters.jax.decode_diagnostics]).
        """

        def counter(field: str) -> int:
            return int(np.asarray(read(self.state_variables[self.offsets[field]])))

        return decode_diagnostics(self.keys, read(self.diagnostics_variable), count=counter("count"),
                                  skipped_steps=counter("skipped"), fallback_steps=counter("fallbacks"))

    def report(self, found: dict[str, Any], *, stacklevel: int = 1) -> None:
        """Raise the host-side warnings of `warn=True` from diagnostics just read.

        RuntimeWarnings for the steps skipped and the law fallbacks since the last report, and the sharpness
        monitor's early warning when `unstable` turned on since then. Nothing with another `warn`, for empty
        diagnostics, or (for the counts) on the first read after a checkpoint loaded inside `fit`.

        Args:
            found: the diagnostics just read.
            stacklevel: as in `warnings.warn`, 1 being the caller.

        Warns:
            RuntimeWarning: see above ([`warn_bad_steps`][eos_core.adapters.jax.warn_bad_steps],
                [`warn_unstable`][eos_core.adapters.jax.warn_unstable]).
        """
        if self.tuner.warn is not True or not found:
            return
        unstable = float(found.get("unstable", math.nan)) == 1.0
        was_unstable, self.reported_unstable = self.reported_unstable, unstable
        seen = (int(found["skipped_steps"]), int(found["fallback_steps"]))
        before, self.reported = self.reported, seen
        if unstable and not was_unstable:
            settings = self.tuner.settings
            warn_unstable(found, (settings.monitor_margin, settings.monitor_patience), stacklevel=stacklevel + 1)
        if before is None:
            return
        warn_bad_steps(found, new_skips=max(seen[0] - before[0], 0), new_fallbacks=max(seen[1] - before[1], 0),
                       stacklevel=stacklevel + 1)

    def mark_loaded(self) -> None:
        """Take a loaded checkpoint's counts (and `unstable`) as the baseline of the next report.

        The variables are the state, so nothing else is to do; inside `fit` (values held outside the variables)
        the next read sets the baseline silently.
        """
        if not self.state_variables:
            return
        counters = [self.state_variables[self.offsets[k]] for k in ("skipped", "fallbacks")]
        if any(v._value is None for v in counters):  # values held outside the variables (inside fit)
            self.reported = None
        else:
            self.reported = (int(np.asarray(counters[0].value)), int(np.asarray(counters[1].value)))
            found = self.decode(lambda variable: variable.value)
            self.reported_unstable = float(found.get("unstable", math.nan)) == 1.0  # warned before the save
