"""Keras callback: the tuner's diagnostics in ``logs``, for History, CSVLogger, TensorBoard and the progress bar.

>>> model.compile(optimizer=CurvatureTuner(keras.optimizers.SGD(0.1), CDAT(scale=2.0)), loss=...)  # doctest: +SKIP
>>> history = model.fit(x, y, callbacks=[EdgeOfStabilityCallback()])                               # doctest: +SKIP
>>> history.history["eos/lr"], history.history["eos/lr_sharpness"]                                 # doctest: +SKIP

Design (Keras 3 on the JAX and torch backends):

* **Attaching.** ``fit`` builds its callback list (calling ``set_model``) before it builds the train
  function, so :meth:`EdgeOfStabilityCallback.set_model` wraps the model's ``train_step``
  (:func:`eos_core.adapters.keras.attach`): the tuner can then re-evaluate the loss on the batch. The
  callback is therefore all a Keras user adds, also after ``keras.models.load_model``.
* **What is logged.** After every training batch the tuner's diagnostics of that step are read
  (:func:`eos_core.adapters.keras.current_diagnostics`, from the live training state on JAX): exactly
  ``eos_core.diagnostics.keys_for(law)``, with the meanings of :data:`eos_core.diagnostics.REGISTRY`, the
  same on both backends and in the PyTorch and JAX adapters. Each numeric one is added to that batch's
  ``logs`` as ``"eos/<name>"``: ``lr`` (the learning rate applied), ``law_lr``, ``numerator`` and
  ``denominator`` (CDAT's n = max(-g.u, 0) and d = |u^T H u| + eps), ``sharpness`` (lambda_max, with
  ``sharpness_every``), ``lr_sharpness`` (lr * lambda_max, 2 at the edge), ``alignment``,
  ``power_iterations``, ``loss``, ``grad_norm``, ``update_norm``, ``probed``, ``fallback``, ``skipped``, the
  law's other measurements, ``skipped_steps`` and ``fallback_steps``; ``step`` (Keras counts its own) and
  ``route`` (a name) are not logged. At the end of each epoch the same names go into the
  epoch's ``logs``, so ``History`` (``history.history["eos/lr"]``, one value per epoch), ``CSVLogger`` and
  ``TensorBoard`` record them (Keras's TensorBoard callback writes through ``tf.summary``, so it needs
  TensorFlow installed, whatever the backend), and the progress bar shows them.
* **Values not measured on a step** (``sharpness`` between power iterations, ``numerator`` between probes
  with ``probe_every > 1``) carry the latest measurement forward, and are NaN until the first one, so
  every epoch has every column (CSVLogger fixes its columns at the first epoch) and the progress bar is not
  filled with NaN. ``probed`` (1 on a step that measured the law's statistics) says which values are new.
* **Per-step history.** :attr:`EdgeOfStabilityCallback.history` holds every training step's values
  (``history["lr"][t]`` is the learning rate of step t, NaN where not measured, nothing carried forward):
  the trajectories of the CDAT paper's figures at step resolution.
* **Order.** Keras calls the callbacks in list order with one ``logs`` dict, then its own History and
  progress bar: list this callback *before* a ``CSVLogger`` or ``TensorBoard`` you pass yourself.
* **Warnings.** On JAX with the tuner's default ``warn=True`` the jitted step has no host callback; each
  read here (through :func:`~eos_core.adapters.keras.current_diagnostics`) raises a RuntimeWarning for the
  steps skipped (non-finite loss or gradient) and the law fallbacks since the previous read, so a bad
  step is reported at the batch it happened in (with ``log_every > 1``: at the next read, none missed).
  On torch the step warns by itself.
* **Cost.** Reading the diagnostics synchronises with the device once per batch (the JAX step otherwise
  runs ahead asynchronously); ``log_every`` reads them every that many batches instead (the per-step
  history then has those steps only).
"""

from __future__ import annotations

from eos_core.adapters.keras._backend import import_keras

keras = import_keras("eos_core.integrations.keras")

import math  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from eos_core import _validation as check  # noqa: E402
from eos_core.adapters.keras import attach, current_diagnostics, find_tuner  # noqa: E402

__all__ = ["EdgeOfStabilityCallback"]

_OWNER = "EdgeOfStabilityCallback"
#: Diagnostics that are not logged: the step index (Keras counts its own) and the route (a name).
_NOT_LOGGED = frozenset({"step", "route"})
#: Flags of the current step: never carried forward.
_PER_STEP = frozenset({"probed", "fallback", "skipped"})


class EdgeOfStabilityCallback(keras.callbacks.Callback):
    """Put an eos_core :class:`~eos_core.adapters.keras.CurvatureTuner`'s diagnostics into Keras ``logs``.

    The model must be compiled with a ``CurvatureTuner`` (``model.compile(optimizer=CurvatureTuner(...))``);
    the callback wraps its ``train_step`` so that the tuner sees the batch, and logs its diagnostics every
    batch and every epoch (see the module docstring).

    Args:
        log_prefix: prefix of the logged names (``"eos/"``: ``eos/lr``, ``eos/lr_sharpness``, ...).
        keys: diagnostics to log (names without the prefix), e.g. ``("lr", "lr_sharpness")`` to keep the
            progress bar short; default: every numeric diagnostic.
        log_every: read the diagnostics every that many training batches (1: every batch).

    Attributes:
        history: ``{name: [value of each read step]}`` plus ``"step"`` (the diagnostics' ``step``: the index of
            the step read, skipped steps not counted), over every ``fit`` this callback took part in.
        latest: the values last put into ``logs`` (latest measurement of each name).
    """

    def __init__(self, *, log_prefix: str = "eos/", keys: Sequence[str] | None = None, log_every: int = 1) -> None:
        super().__init__()
        if not isinstance(log_prefix, str):
            raise ValueError(f"{_OWNER}: log_prefix must be a string, got {log_prefix!r}")
        if keys is not None and (isinstance(keys, str) or not all(isinstance(k, str) for k in keys)):
            raise ValueError(f"{_OWNER}: keys must be a sequence of diagnostic names, got {keys!r}")
        self.log_prefix = log_prefix
        self.keys = None if keys is None else tuple(keys)
        self.log_every = check.positive_int(_OWNER, "log_every", log_every)
        self.history: dict[str, list[float]] = {}
        self.latest: dict[str, float] = {}
        self._batches = 0

    # -- Keras hooks ------------------------------------------------------------------------------
    def set_model(self, model: Any) -> None:
        super().set_model(model)
        if find_tuner(model) is not None:
            attach(model)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if find_tuner(self.model) is None:
            raise ValueError(
                f"{_OWNER}: the model is not compiled with an eos_core CurvatureTuner; use "
                "model.compile(optimizer=eos_core.adapters.keras.CurvatureTuner(keras.optimizers.SGD(0.1), "
                "CDAT(scale=2.0)), loss=...)")
        attach(self.model)
        self._batches = 0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._batches += 1
        if (self._batches - 1) % self.log_every:
            if logs is not None:
                logs.update(self._prefixed())
            return
        diagnostics = current_diagnostics(self.model)
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
        if logs is not None:
            logs.update(self._prefixed())

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
