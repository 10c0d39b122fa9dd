"""Keras callback: a sharpness monitor or a tuning law on a Keras model, its diagnostics in `logs`.

```python
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=...)
history = model.fit(x, y, callbacks=[EdgeOfStabilityCallback()])
history.history["eos/preconditioned_lr_sharpness"], history.history["eos/unstable"]
```

Design (Keras 3 on the JAX and torch backends):

* **Installing the tuner.** `fit` builds its callback list (calling `set_model`, then `set_params` with the
  number of epochs and of steps per epoch) after it has built the model and its optimizer and before it builds the
  train function. When the model is compiled with a plain Keras optimizer, the callback then puts an
  [`eos_core.adapters.keras.CurvatureTuner`][] around it as `model.optimizer` (and in the model's compile config,
  so `model.save` / `keras.models.load_model` restore the tuner with its state):
    - `law=None` (the default): **monitoring only**. The optimizer steps exactly as without the callback (its own
      learning rate or schedule: the weights are the same bit for bit) and the sharpness monitor
      (`monitor_budget`, 0.05 of training time by default) reports lambda_max and `lr * lambda_max`
      (preconditioned for Adam / AdamW / RMSprop) and warns when the run is about to leave the edge of stability.
    - a law (`CDAT(...)`, ...): the tuner takes the optimizer over and applies the law's learning rate, with the
      monitor beside it. A law that needs the run's horizon (`CDAT(decay="cosine")` without `horizon=`) gets
      `epochs * steps` of `fit` (the whole run, `initial_epoch` included); a ValueError asks for `horizon=` when
      the number of steps per epoch is not known (a dataset without a length and no `steps_per_epoch`).

    A model compiled with a `CurvatureTuner` of its own (`model.compile(optimizer=CurvatureTuner(...))`, or one
    restored by `load_model`) keeps it: the callback logs it as it is configured. A law or option given to the
    callback must then agree with that tuner's (ValueError otherwise), and the callback's default `monitor_budget`
    does not turn on the monitor of a tuner compiled without one (give `monitor_budget=` to that tuner).
* **Attaching.** The callback wraps the model's `train_step` ([`eos_core.adapters.keras.attach`][]): the tuner
  can then re-evaluate the loss on the batch. The callback is therefore all a Keras user adds, also after
  `keras.models.load_model`.
* **What is logged.** After every training batch the tuner's diagnostics of that step are read
  ([`eos_core.adapters.keras.current_diagnostics`][], from the live training state on JAX): exactly
  `eos_core.diagnostics.keys_for(law)`, with the meanings of [`eos_core.diagnostics.REGISTRY`][], the same on both
  backends and in the PyTorch and JAX adapters. Each numeric one is added to that batch's `logs` as
  `"eos/<name>"`: `lr` (the learning rate applied), `law_lr`, `sharpness` (lambda_max: the monitor's latest
  estimate, or a `sharpness_every` measurement), `lr_sharpness` (lr * lambda_max, 2 at the edge of gradient
  descent), `preconditioned_sharpness` and `preconditioned_lr_sharpness` (Adam / AdamW / RMSprop), the monitor's
  `sharpness_age`, `sharpness_residual`, `edge`, `unstable`, `monitor_every`, `monitor_exact`, `update_quotient`,
  a law's own measurements (CDAT: `numerator`, `denominator`), `loss`, `grad_norm`, `update_norm`, `probed`, `fallback`,
  `skipped`, `skipped_steps` and `fallback_steps`; `step` (Keras counts its own) and `route` (a name) are not
  logged. At the end of each epoch the same names go into the epoch's `logs`, so `History`
  (`history.history["eos/lr"]`, one value per epoch), `CSVLogger` and `TensorBoard` record them (Keras's
  TensorBoard callback writes through `tf.summary`, so it needs TensorFlow installed, whatever the backend), and
  the progress bar shows them.
* **The early warning.** When lr * sharpness (preconditioned for adaptive optimizers) has been above the
  optimizer's edge by more than `monitor_margin` for `monitor_patience` consecutive measurements (or on one that
  is a Ritz value of the step's own Hessian, such as the first step's), `eos/unstable`
  is 1 in the logs and the progress bar, and a RuntimeWarning is raised (once per episode): on torch by the step,
  on JAX by the read of the diagnostics after that batch.
* **Values not measured on a step** (`sharpness` between power iterations, `numerator` between probes
  with `probe_every > 1`) carry the latest measurement forward, and are NaN until the first one, so
  every epoch has every column (CSVLogger fixes its columns at the first epoch) and the progress bar is not
  filled with NaN. `probed` (1 on a step that measured the law's statistics) says which values are new.
* **Per-step history.** [`EdgeOfStabilityCallback.history`][eos_core.integrations.keras.EdgeOfStabilityCallback]
  holds every training step's values (`history["lr"][t]` is the learning rate of step t, NaN where not measured,
  nothing carried forward): the trajectories of the CDAT paper's figures at step resolution.
* **Order.** Keras calls the callbacks in list order with one `logs` dict, then its own History and
  progress bar: list this callback *before* a `CSVLogger` or `TensorBoard` you pass yourself.
* **Warnings.** On JAX with the tuner's default `warn=True` the jitted step has no host callback; each
  read here (through [`current_diagnostics`][eos_core.adapters.keras.current_diagnostics]) raises a
  RuntimeWarning for the steps skipped (non-finite loss or gradient) and the law fallbacks since the previous read,
  and the monitor's warning, so a bad step is reported at the batch it happened in (with `log_every > 1`: at the
  next read, none missed). On torch the step warns by itself.
* **Cost.** The monitor takes about `monitor_budget` of the training time (on torch measured; on JAX a cost
  model, see [`CurvatureTuner`][eos_core.adapters.keras.CurvatureTuner]'s `monitor_budget`); `monitor_budget=None`
  turns it off. Reading the diagnostics synchronises with the device once per batch (the JAX step otherwise runs
  ahead asynchronously); `log_every` reads them every that many batches instead (the per-step history then has
  those steps only).
"""

from __future__ import annotations

from eos_core.adapters.keras._backend import import_keras

keras = import_keras("eos_core.integrations.keras")

import math  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

from eos_core import _validation as check  # noqa: E402
from eos_core.adapters.keras import CurvatureTuner, attach, current_diagnostics, find_tuner  # noqa: E402
from eos_core.adapters.keras.tuner import resolve_settings  # noqa: E402
from eos_core.laws.base import Law  # noqa: E402
from eos_core.monitor import CALLBACK_BUDGET  # noqa: E402
from eos_core.settings import DEPRECATED  # noqa: E402

__all__ = ["EdgeOfStabilityCallback"]

_OWNER = "EdgeOfStabilityCallback"
#: The callbacks' default share of training time for the sharpness monitor.
MONITOR_BUDGET = CALLBACK_BUDGET
#: Diagnostics that are not logged: the step index (Keras counts its own) and the route (a name).
_NOT_LOGGED = frozenset({"step", "route"})
#: Flags of the current step: never carried forward.
_PER_STEP = frozenset({"probed", "fallback", "skipped"})


class EdgeOfStabilityCallback(keras.callbacks.Callback):
    """Monitor the sharpness of a Keras model's training, or tune its learning rate with an eos_core law.

    The diagnostics go into Keras `logs` (hence `History`, `CSVLogger`, `TensorBoard` and the progress bar).

    On a model compiled with a plain Keras optimizer the callback installs an
    [`eos_core.adapters.keras.CurvatureTuner`][] around it when `fit` starts (`law=None`: the optimizer's own
    steps, measured; a law: the law's learning rate); on a model compiled with a `CurvatureTuner` it logs that
    tuner. It wraps the model's `train_step` so that the tuner sees the batch, and logs the diagnostics every batch
    and every epoch (see the module docstring).

    Args:
        law: the tuning law (e.g. `CDAT(scale=2.0, ema=0.9)`), or None (default) to leave the optimizer alone and
            only measure. A law with a decay over the run's horizon (`CDAT(decay="cosine")` without `horizon`) gets
            `epochs * steps` of `fit`.
        monitor_budget: the sharpness monitor's share of training time, in (0, 1]; None turns it off. It
            reports `sharpness`, `lr_sharpness`, `preconditioned_sharpness`, `preconditioned_lr_sharpness` on every
            step and `unstable` (1 while lr * sharpness is beyond the optimizer's edge of stability; see
            [`eos_core.monitor`][]).
        log_prefix: prefix of the logged names (`"eos/"`: `eos/lr`, `eos/lr_sharpness`, `eos/unstable`, ...).
        keys: diagnostics to log (names without the prefix), e.g. `("lr", "lr_sharpness", "unstable")` to keep the
            progress bar short; default: every numeric diagnostic.
        log_every: read the diagnostics every that many training batches (1: every batch).
        **tuner_options: the other options of the tuner the callback installs, by the names of
            [`eos_core.settings.TunerSettings`][] that the Keras tuner supports
            ([`SUPPORTED_OPTIONS`][eos_core.adapters.keras.tuner.SUPPORTED_OPTIONS]): `monitor_edge`,
            `monitor_margin`, `monitor_patience` (the early warning), `probe_every`, `route`, `sharpness_every`,
            `sharpness_iters`, `sharpness_tol`, `seed`, `warn`, `reference_lr` (with a law).

    Raises:
        ValueError: an invalid law or option (at construction, naming it); when `fit` starts, an optimizer the
            tuner cannot wrap, a law or option that disagrees with the `CurvatureTuner` the model is compiled with,
            or a decay whose horizon cannot be known (pass `horizon=` to the law).

    Attributes:
        law: the law given (None: measuring only).
        settings: the validated [`eos_core.settings.TunerSettings`][] of the tuner the callback installs.
        tuner: the `CurvatureTuner` the callback installed or logs (None before `fit`).
        history: `{name: [value of each read step]}` plus `"step"` (the diagnostics' `step`: the index of the
            step read, skipped steps not counted), over every `fit` this callback took part in.
        latest: the values last put into `logs` (latest measurement of each name).

    Examples:
        Monitoring only, on a model compiled with a plain Keras optimizer:

        >>> history = model.fit(x, y, epochs=5, callbacks=[EdgeOfStabilityCallback()])  # doctest: +SKIP
        >>> history.history["eos/lr_sharpness"]  # one value per epoch  # doctest: +SKIP

        With a law, whose learning rate replaces the optimizer's:

        >>> callback = EdgeOfStabilityCallback(CDAT(scale=2.0), sharpness_every=10)  # doctest: +SKIP
        >>> model.fit(x, y, epochs=5, callbacks=[callback])  # doctest: +SKIP
        >>> callback.history["lr"][:3]  # per step  # doctest: +SKIP
    """

    def __init__(self, law: Law | None = None, *, monitor_budget: float | None = MONITOR_BUDGET,
                 log_prefix: str = "eos/", keys: Sequence[str] | None = None, log_every: int = 1,
                 **tuner_options: Any) -> None:
        super().__init__()
        if not isinstance(log_prefix, str):
            raise ValueError(f"{_OWNER}: log_prefix must be a string, got {log_prefix!r}")
        if keys is not None and (isinstance(keys, str) or not all(isinstance(k, str) for k in keys)):
            raise ValueError(f"{_OWNER}: keys must be a sequence of diagnostic names, got {keys!r}")
        if law is not None:
            if not isinstance(law, Law):
                raise ValueError(f"{_OWNER}: law must be an eos_core law (e.g. CDAT(scale=2.0)) or None to only "
                                 f"measure, got {law!r}")
            try:
                CurvatureTuner._check_law(law)
            except ValueError as error:
                raise ValueError(f"{_OWNER}: {error}") from error
        options = {"monitor_budget": monitor_budget, **tuner_options}
        self.settings = resolve_settings(None, options, keras.backend.backend(), measuring=law is None, owner=_OWNER)
        self.law = law
        self.log_prefix = log_prefix
        self.keys = None if keys is None else tuple(keys)
        self.log_every = check.positive_int(_OWNER, "log_every", log_every)
        self.tuner: CurvatureTuner | None = None
        self.history: dict[str, list[float]] = {}
        self.latest: dict[str, float] = {}
        self._batches = 0
        #: the settings the user gave (compared with a compiled tuner's)
        self._given = {DEPRECATED.get(name, name) for name in tuner_options}
        if monitor_budget != MONITOR_BUDGET:
            self._given.add("monitor_budget")
        self._installed: CurvatureTuner | None = None

    # -- Keras hooks ------------------------------------------------------------------------------
    def set_model(self, model: Any) -> None:
        """Keras hook: remember the model, and wrap its `train_step` when it is already compiled with a tuner.

        Args:
            model: the model `fit` trains.
        """
        super().set_model(model)
        if find_tuner(model) is not None:
            attach(model)

    def set_params(self, params: Mapping[str, Any]) -> None:
        """Keras hook: the run's parameters; the tuner is installed (or the compiled one checked) here.

        `fit` sets them right after the model, before it builds its train function.

        Args:
            params: Keras's run parameters (`epochs`, `steps` per epoch, ...).

        Raises:
            ValueError: an optimizer the tuner cannot wrap (a `LossScaleOptimizer`, an unsupported one), a law or
                option that disagrees with the `CurvatureTuner` the model is compiled with, or a law whose horizon
                cannot be known.
        """
        super().set_params(params)
        model = getattr(self, "_model", None)
        if model is None or getattr(model, "optimizer", None) is None:
            return
        tuner = find_tuner(model)
        if tuner is None:
            tuner = self._install(model, params or {})
        else:
            self._check_compiled(tuner)
        self.tuner = tuner
        attach(model)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Keras hook: find the model's tuner and wrap its `train_step`.

        Args:
            logs: Keras's logs (unused).

        Raises:
            ValueError: the model has no `CurvatureTuner` (not compiled, or compiled after `fit` built its
                callbacks).
        """
        tuner = find_tuner(self.model)
        if tuner is None:
            raise ValueError(
                f"{_OWNER}: the model has no eos_core CurvatureTuner: compile it (model.compile(optimizer=..., "
                "loss=...)) and pass this callback to fit, which installs one around the optimizer")
        self.tuner = tuner
        attach(self.model)
        self._batches = 0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Keras hook: read the step's diagnostics (every `log_every` batches) and put them into `logs`.

        Each read appends to `history`; `logs` gets the latest measurement of each name, prefixed.

        Args:
            batch: the batch index within the epoch.
            logs: the batch's logs, updated in place.
        """
        self._batches += 1
        if (self._batches - 1) % self.log_every:
            if logs is not None:
                logs.update(self._prefixed())
            return
        # on JAX the live state is read without syncing every variable back into the model (self.model would)
        model = self._model if keras.backend.backend() == "jax" else self.model
        diagnostics = current_diagnostics(model)
        values = self._numbers(diagnostics)
        for name, value in values.items():
            self.history.setdefault(name, []).append(value)
        self.history.setdefault("step", []).append(float(diagnostics.get("step", math.nan)))
        for name, value in values.items():
            if name in _PER_STEP or not math.isnan(value) or name not in self.latest:
                self.latest[name] = value
        if logs is not None:
            logs.update(self._prefixed())

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Keras hook: put the latest values into the epoch's `logs` (what `History` and `CSVLogger` record).

        Args:
            epoch: the epoch index.
            logs: the epoch's logs, updated in place.
        """
        if logs is not None:
            logs.update(self._prefixed())

    # -- installing the tuner ---------------------------------------------------------------------
    def _install(self, model: Any, params: Mapping[str, Any]) -> CurvatureTuner:
        """Put a `CurvatureTuner` around the model's optimizer (built when the optimizer is).

        The tuner also replaces the optimizer in the model's compile config, which `model.save` stores and
        `keras.models.load_model` compiles with.

        Returns:
            The tuner installed.

        Raises:
            ValueError: the optimizer is a `LossScaleOptimizer`, or the tuner refuses it or the settings.
        """
        optimizer = model.optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                f"{_OWNER}: the model's optimizer is a LossScaleOptimizer (mixed_float16); the callback cannot put a "
                "tuner inside it: compile with CurvatureTuner(<your optimizer>, law, ...) yourself, which "
                "model.compile wraps in a LossScaleOptimizer")
        law = self._law_for(params)
        try:
            tuner = CurvatureTuner(optimizer, law, settings=self.settings)
        except ValueError as error:
            raise ValueError(f"{_OWNER}: {error}") from error
        if optimizer.built:
            with keras.name_scope(tuner.name, caller=tuner):
                tuner.build(model.trainable_variables)
        model.optimizer = tuner
        compiled = getattr(model, "_compile_config", None)  # what model.save stores and load_model compiles with
        if compiled is not None and isinstance(getattr(compiled, "config", None), dict):
            compiled.config["optimizer"] = tuner
        model.train_function = None
        self._installed = tuner
        return tuner

    def _law_for(self, params: Mapping[str, Any]) -> Law | None:
        """The law with the run's horizon when it needs one: `epochs * steps` of `fit`.

        Returns:
            `law.with_horizon(epochs * steps)`, or the callback's law unchanged (None when only measuring).

        Raises:
            ValueError: the number of steps per epoch is not known.
        """
        law = self.law
        if law is None or not getattr(law, "needs_horizon", False):
            return law
        epochs, steps = params.get("epochs"), params.get("steps")
        if not (isinstance(epochs, int) and isinstance(steps, int) and epochs > 0 and steps > 0):
            raise ValueError(
                f"{_OWNER}: {type(law).__name__}(decay={getattr(law, 'decay', None)!r}) needs the run's number of "
                f"optimizer steps, but fit does not know it (epochs={epochs!r}, steps per epoch={steps!r}: a dataset "
                "without a length); pass horizon=<optimizer steps of the run> to the law, or steps_per_epoch= to fit")
        return law.with_horizon(epochs * steps)

    def _check_compiled(self, tuner: CurvatureTuner) -> None:
        """A law or option given to the callback must agree with the `CurvatureTuner` the model is compiled with.

        Raises:
            ValueError: naming the disagreement.
        """
        if tuner is self._installed:
            return
        problems = []
        if self.law is not None and not _same_law(self.law, tuner.law):
            problems.append(f"law {self.law!r} (the tuner has {tuner.law!r})")
        for name in sorted(self._given):
            mine, theirs = getattr(self.settings, name), getattr(tuner.settings, name)
            if mine != theirs:
                problems.append(f"{name}={mine!r} (the tuner has {theirs!r})")
        if problems:
            raise ValueError(
                f"{_OWNER}: the model is compiled with a CurvatureTuner of its own (compiled by you, restored by "
                "load_model, or installed by the callback of an earlier fit), which the callback logs as it is, but "
                f"the callback was given {', '.join(problems)}; configure the tuner, or compile the model with the "
                "plain optimizer and let the callback install the tuner")

    # -- helpers ----------------------------------------------------------------------------------
    def _numbers(self, diagnostics: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, value in diagnostics.items():
            if name in _NOT_LOGGED or isinstance(value, str) or (self.keys is not None and name not in self.keys):
                continue
            try:
                out[name] = float(value)
            except (TypeError, ValueError):
                continue
        return out

    def _prefixed(self) -> dict[str, float]:
        return {self.log_prefix + name: value for name, value in self.latest.items()}


def _same_law(mine: Law, theirs: Law | None) -> bool:
    """`theirs` is `mine`, or `mine` with a horizon filled in (a tuner this callback's law was installed as)."""
    if theirs is None:
        return False
    if mine == theirs:
        return True
    horizon = getattr(theirs, "horizon", None)
    return bool(getattr(mine, "needs_horizon", False)) and horizon is not None and mine.with_horizon(horizon) == theirs
