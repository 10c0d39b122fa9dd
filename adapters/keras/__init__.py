r"""Keras 3 adapter: `CurvatureTuner`, a Keras optimizer driven by an eos_core law, on the JAX and torch backends.

Monitoring only: `model.fit(..., callbacks=[EdgeOfStabilityCallback()])` on a model compiled with any supported
Keras optimizer puts a `CurvatureTuner(optimizer, None, monitor_budget=0.05)` around it (the optimizer's own steps,
measured: $\lambda_{\max}$, $\eta \lambda_{\max}$ and the early warning in `logs`).

Quick use with a law (the callback wraps the model's `train_step` and puts the diagnostics into `logs`):

```python
from eos_core import CDAT
from eos_core.adapters.keras import CurvatureTuner
from eos_core.integrations.keras import EdgeOfStabilityCallback

model.compile(optimizer=CurvatureTuner(keras.optimizers.SGD(0.1), CDAT(scale=2.0)),
              loss="sparse_categorical_crossentropy")
history = model.fit(x, y, batch_size=len(x), epochs=100, callbacks=[EdgeOfStabilityCallback()])
history.history["eos/lr"], history.history["eos/lr_sharpness"]
```

**How the tuner gets the loss on the batch (the design choice).** A Keras optimizer only ever receives
gradients, but a curvature probe must re-evaluate the loss on the current batch at other weights. The
tuner does not ask the user for a loss function or a `train_step` subclass:
[`attach`][eos_core.adapters.keras.attach] wraps the model instance's own `train_step` so that, while it runs, the
batch (and, on JAX, the step's whole state) is published to the tuner. The probes then evaluate the model's
compiled loss through Keras's own stateless machinery: on JAX `model.compute_loss_and_updates` (the function Keras
differentiates for the gradient), traced into the same jitted step, so forward-over-forward $u^\top H u$ costs no
host round trip; on torch a re-run of `model(x, training=True)` and `model._compute_loss` with the non-trainable
variables entering the step (same dropout masks, same batch-norm statistics), evaluated by the PyTorch adapter's
oracles. This works for Sequential, functional and subclassed models alike, keeps Keras's `fit` loop (callbacks,
metrics, validation, distribution of data) untouched, and survives `model.save` (the wrapper is not part of the
model; it is installed again by the callback, or by calling [`attach`][eos_core.adapters.keras.attach] on the
loaded model). See `eos_core.adapters.keras.train_step` for the details.

The heavy lifting reuses the other adapters: on JAX, [`eos_core.adapters.jax.tune`][] around the Keras optimizer
seen as an optax transformation (`eos_core.adapters.keras.jax_engine`); on torch, the PyTorch adapter's
[`CurvatureTuner`][eos_core.adapters.torch.CurvatureTuner] around the Keras optimizer seen as a
`torch.optim.Optimizer` (`eos_core.adapters.keras.torch_engine`). TensorFlow (and any other Keras backend) is not
supported: importing this module raises ImportError.

Importing this module needs `keras` (`pip install 'eos-core[keras]'`) with `KERAS_BACKEND` set to
`jax` (plus `eos-core[jax]`) or `torch` (plus `eos-core[torch]`).
"""

from eos_core.adapters.keras._backend import SUPPORTED_BACKENDS, import_keras

_keras = import_keras("eos_core.adapters.keras")
if _keras.backend.backend() == "jax":
    from eos_core._optional import require

    require("optax", extra="jax", feature="eos_core.adapters.keras on the JAX backend")

from typing import Any  # noqa: E402

from eos_core.adapters.keras.optimizers import SUPPORTED as SUPPORTED_OPTIMIZERS  # noqa: E402
from eos_core.adapters.keras.train_step import attach, is_attached  # noqa: E402
from eos_core.adapters.keras.tuner import SUPPORTED_OPTIONS, CurvatureTuner  # noqa: E402


def find_tuner(model_or_optimizer: Any) -> CurvatureTuner | None:
    """The [`CurvatureTuner`][eos_core.adapters.keras.CurvatureTuner] of a compiled model or of an optimizer.

    Args:
        model_or_optimizer: a Keras model (its `optimizer` is searched) or an optimizer; a `LossScaleOptimizer`
            is looked through (`inner_optimizer`, up to 4 levels).

    Returns:
        The tuner, or None when there is none (a model not compiled with one, or not compiled at all).
    """
    optimizer = getattr(model_or_optimizer, "optimizer", model_or_optimizer)
    seen = 0
    while optimizer is not None and seen < 4:
        if isinstance(optimizer, CurvatureTuner):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
        seen += 1
    return None


def current_diagnostics(model: Any) -> dict[str, Any]:
    """The tuner's diagnostics after the last step, also while `fit` runs (from a callback).

    On JAX, `fit` keeps the variables' values outside the variables between synchronisations; this reads
    them from the live training state. The keys are exactly `eos_core.diagnostics.keys_for(law)` on both
    backends, with the meanings of [`eos_core.diagnostics.REGISTRY`][] (the same as the PyTorch and JAX
    adapters'): `step` (the index of the step described, skipped steps not counted), `lr` (the rate
    applied to it), `law_lr`, `probed`, `fallback`, `skipped`, `loss`, `grad_norm`,
    `update_norm` (of u), `route`, `skipped_steps`, `fallback_steps`, `sharpness`,
    `lr_sharpness`, `preconditioned_sharpness`, `preconditioned_lr_sharpness`, `alignment`,
    `power_iterations` and the law's own measurements (CDAT: `numerator`, `denominator`, their EMAs).
    NaN marks a value not measured on the last step.

    With the sharpness monitor (`monitor_budget`) the keys also hold its estimate in `sharpness` /
    `preconditioned_sharpness` (and `lr_sharpness`, `preconditioned_lr_sharpness`) on every step, with
    `sharpness_age`, `sharpness_residual`, `edge`, `unstable`, `monitor_every`, `monitor_exact` and `update_quotient`.

    On JAX with the tuner's `warn=True` (the default), this read raises a RuntimeWarning for the steps
    skipped and the law fallbacks since the previous read, and the monitor's early warning when `unstable`
    turned on since then (the jitted step itself holds no host callback; see
    [`CurvatureTuner`][eos_core.adapters.keras.CurvatureTuner]'s `warn`).

    Args:
        model: a model compiled with a `CurvatureTuner` (also inside a `LossScaleOptimizer`).

    Returns:
        `{name: value}`: floats, the str `route` and the ints `step`, `skipped_steps`, `fallback_steps`; empty
        before the tuner is built.

    Raises:
        ValueError: the model has no `CurvatureTuner`.

    Warns:
        RuntimeWarning: on JAX with `warn=True`, for the skipped steps, the law fallbacks and the early warning
            since the previous read.

    Examples:
        From a Keras callback, after each batch:

        >>> class Print(keras.callbacks.Callback):  # doctest: +SKIP
        ...     def on_train_batch_end(self, batch, logs=None):
        ...         found = current_diagnostics(self.model)
        ...         print(found["step"], found["lr"], found["lr_sharpness"])
    """
    tuner = find_tuner(model)
    if tuner is None:
        raise ValueError("current_diagnostics: the model is not compiled with an eos_core CurvatureTuner")
    if not tuner.built:
        return {}
    state = getattr(model, "_jax_state", None)
    live = state.get("optimizer_variables") if isinstance(state, dict) else None
    if live:
        position = {id(v): i for i, v in enumerate(model.optimizer.variables)}

        def read(variable: Any) -> Any:
            return live[position[id(variable)]]

        found = tuner._engine.decode(read)
    else:
        found = tuner.diagnostics
    tuner._engine.report(found, stacklevel=2)
    return found


__all__ = [
    "SUPPORTED_BACKENDS",
    "SUPPORTED_OPTIMIZERS",
    "SUPPORTED_OPTIONS",
    "CurvatureTuner",
    "attach",
    "current_diagnostics",
    "find_tuner",
    "is_attached",
]
