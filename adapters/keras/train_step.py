r"""How the tuner gets the loss on the current batch inside `fit`: a wrapped `train_step`.

A Keras optimizer only receives gradients (`optimizer.apply(grads)` on the torch backend,
`optimizer.stateless_apply(optimizer_variables, grads, trainable_variables)` on JAX), but a curvature probe has to
re-evaluate the loss at other points ($u^\top H u$ differentiates it twice along `u`; finite differences, power
iteration, line searches evaluate it at shifted weights). [`attach`][eos_core.adapters.keras.attach] therefore wraps the
model's `train_step` (on the instance, whatever class the model has: Sequential, functional or subclassed, with or
without its own `train_step`) so that, while the original step runs, the batch is published to the tuner:

* **JAX backend.** The wrapper sees the step's `(state, data)`: the trainable, non-trainable, optimizer
  and metrics variables entering the step and the batch. The probe objective is
  `w -> model.compute_loss_and_updates(w, non_trainable, metrics, x, y, sample_weight, training=True)`,
  the very function Keras differentiates for the step's gradient, evaluated with the non-trainable
  variables *entering* the step: the same dropout masks (the seed generators' state is a non-trainable
  variable) and the batch statistics of batch normalisation in training mode. It is traced into the
  same jitted step as the update (no host round trip), and its side effects (moving averages, seed
  advances, metric updates) are discarded.
* **torch backend.** The wrapper snapshots the non-trainable and metrics variables before the step;
  each probe evaluation restores them, runs `model(x, training=True)` and `model._compute_loss`
  (the step's own loss, with its graph), so dropout masks and batch statistics match the step's; after
  the probes the values the real step produced are put back. The step's own loss (for the diagnostics
  and the non-finite check) is recorded from the first `_compute_loss` call of the step.

So the objective is the model's compiled loss (`compile(loss=...)` plus `add_loss` terms), the objective of Keras's
default `train_step`; a custom `train_step` that optimises something else keeps its gradient, but its probes evaluate
the compiled loss. `attach` is idempotent and is done for you by
[`EdgeOfStabilityCallback`][eos_core.integrations.keras.EdgeOfStabilityCallback]; models trained without that callback
call it once after `compile` (and again on a model returned by `keras.models.load_model`).

Not supported: JAX with Flax NNX enabled (Keras then calls `type(model).train_step`, bypassing the
instance) and `jit_compile=True` on the torch backend (`torch.compile` of a step whose optimizer
runs Python-side probes); both raise ValueError in [`attach`][eos_core.adapters.keras.attach].
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import keras

_ATTACHED = "_eos_core_original_train_step"
_local = threading.local()


def _stack() -> list[Any]:
    if not hasattr(_local, "batches"):
        _local.batches = []
    return _local.batches


@contextlib.contextmanager
def publishing(batch: Any) -> Iterator[None]:
    """Make `batch` the current batch (see `current_batch`) while the block runs (a context manager).

    Batches nest per thread: the previous one is current again when the block ends.

    Args:
        batch: a `JaxBatch` or `TorchBatch`.

    Yields:
        None, once, while `batch` is the current batch.
    """
    stack = _stack()
    stack.append(batch)
    try:
        yield
    finally:
        stack.pop()


def current_batch() -> Any:
    """The batch of the `train_step` running now in this thread.

    Returns:
        A `JaxBatch` or `TorchBatch`, or None outside a wrapped `train_step`.
    """
    stack = _stack()
    return stack[-1] if stack else None


class JaxBatch:
    """The JAX step's inputs; `value_fn` is the loss on the batch as a function of the trainable values.

    Args:
        model: the Keras model.
        state: the step's `(trainable, non_trainable, optimizer, metrics)` variable values, as Keras's JAX
            `train_step` receives them.
        data: the batch (`x`, `(x, y)` or `(x, y, sample_weight)`).
    """

    def __init__(self, model: Any, state: Any, data: Any) -> None:
        self.model = model
        self.trainable, self.non_trainable, self.optimizer_values, self.metrics = state
        self.x, self.y, self.sample_weight = keras.utils.unpack_x_y_sample_weight(data)

    def value_fn(self, trainable_values: list[Any]) -> Any:
        """The compiled loss on the batch at `trainable_values` (traceable; side effects discarded).

        Args:
            trainable_values: the trainable variables' values, in `model.trainable_variables` order.

        Returns:
            The unscaled loss (a 0-d array): `model.compute_loss_and_updates` in training mode with the
            non-trainable variables entering the step (a `LossScaleOptimizer` scales only the other output).
        """
        _, aux = self.model.compute_loss_and_updates(
            list(trainable_values), self.non_trainable, self.metrics, self.x, self.y, self.sample_weight,
            training=True, optimizer_variables=self.optimizer_values)
        return aux[0]  # the unscaled loss (a LossScaleOptimizer scales the other one)


class TorchBatch:
    """The torch step's batch and the non-trainable / metrics values entering it; `loss` re-evaluates.

    Args:
        model: the Keras model.
        data: the batch (`x`, `(x, y)` or `(x, y, sample_weight)`).
    """

    def __init__(self, model: Any, data: Any) -> None:
        self.model = model
        self.x, self.y, self.sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self.state_variables = list(model.non_trainable_variables) + list(model.metrics_variables)
        self.entering = self.snapshot()
        self.step_loss: Any = None  #: the step's own loss tensor (the first `_compute_loss` of the step)

    def snapshot(self) -> list[Any]:
        """Copies (detached tensors) of the model's non-trainable and metrics variables' current values."""
        return [v.value.detach().clone() for v in self.state_variables]

    def restore(self, values: list[Any]) -> None:
        """Assign `values` (from `snapshot`) to the model's non-trainable and metrics variables."""
        for variable, value in zip(self.state_variables, values, strict=True):
            variable.assign(value)

    def loss(self) -> Any:
        """The compiled loss on the batch at the current weights, with its graph (no backward).

        The non-trainable and metrics variables are first set back to their values entering the step (same
        dropout masks, same batch statistics).

        Returns:
            The loss tensor of `model._compute_loss` in training mode.
        """
        model = self.model
        self.restore(self.entering)
        y_pred = model(self.x, training=True) if model._call_has_training_arg else model(self.x)
        return model._compute_loss(x=self.x, y=self.y, y_pred=y_pred, sample_weight=self.sample_weight,
                                   training=True)


def attach(model: Any) -> Any:
    """Wrap `model.train_step` (in place) so that the tuner can re-evaluate the loss on the batch.

    Idempotent. Resets `model.train_function` so the next `fit` builds its step with the wrapper. On torch it
    also wraps `model._compute_loss` to record the step's own loss. The wrapper is not saved with the model: call
    it again on a model returned by `keras.models.load_model` (the Keras callback does it by itself).

    Args:
        model: a Keras model, compiled or not.

    Returns:
        `model` itself.

    Raises:
        ValueError: JAX with Flax NNX enabled, or torch with `jit_compile=True`.

    Examples:
        >>> model.compile(optimizer=CurvatureTuner(keras.optimizers.SGD(0.1), CDAT(scale=2.0)),  # doctest: +SKIP
        ...               loss="mse")
        >>> attach(model).fit(x, y, epochs=10)  # doctest: +SKIP
    """
    if getattr(model, _ATTACHED, None) is not None:
        return model
    backend = keras.backend.backend()
    if backend == "jax" and getattr(keras.config, "is_nnx_enabled", lambda: False)():
        raise ValueError("eos_core.adapters.keras.attach: Flax NNX is enabled (keras.config.is_nnx_enabled()); Keras "
                         "then calls type(model).train_step and the tuner cannot see the batch. Disable NNX.")
    if backend == "torch" and bool(getattr(model, "jit_compile", False)):
        raise ValueError("eos_core.adapters.keras.attach: compile the model with jit_compile=False on the torch "
                         "backend (torch.compile cannot trace the tuner's Python-side curvature probes)")
    original = model.train_step
    if backend == "jax":
        def train_step(state: Any, data: Any) -> Any:
            with publishing(JaxBatch(model, state, data)):
                return original(state, data)
    else:
        def train_step(data: Any) -> Any:
            with publishing(TorchBatch(model, data)):
                return original(data)

        original_loss = model._compute_loss

        def compute_loss(*args: Any, **kwargs: Any) -> Any:
            loss = original_loss(*args, **kwargs)
            batch = current_batch()
            if isinstance(batch, TorchBatch) and batch.step_loss is None:
                batch.step_loss = loss  # the step's loss (probes call this again later)
            return loss

        object.__setattr__(model, "_compute_loss", compute_loss)

    train_step.__doc__ = f"{getattr(original, '__doc__', '') or ''}\n\n(Wrapped by eos_core.adapters.keras.attach.)"
    object.__setattr__(model, "train_step", train_step)
    object.__setattr__(model, _ATTACHED, original)
    model.train_function = None
    return model


def is_attached(model: Any) -> bool:
    """Whether [`attach`][eos_core.adapters.keras.attach] has wrapped `model.train_step`.

    Args:
        model: a Keras model.

    Returns:
        True when the model's `train_step` is the wrapper.
    """
    return getattr(model, _ATTACHED, None) is not None
