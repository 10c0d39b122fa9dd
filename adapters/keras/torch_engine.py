r"""The torch backend: the Keras optimizer behind a ``torch.optim.Optimizer``, tuned by the PyTorch adapter.

On the torch backend Keras variables hold ``torch.nn.Parameter`` values and the step runs eagerly, so the
PyTorch adapter's :class:`~eos_core.adapters.torch.CurvatureTuner` (its :class:`~eos_core.adapters.torch.Oracle`
for ``u^T H u`` by double backward or finite differences, warm-started power iteration and Lanczos on
parameter lists, non-finite skipping, law fallbacks) drives the step unchanged:

1. :class:`KerasDirection` is a ``torch.optim.Optimizer`` over those parameters whose step is ``w <- w + lr * u``,
   ``u`` the Keras optimizer's update for learning rate 1 (see :mod:`.optimizers`), computed by running the
   Keras optimizer on the parameters set to 0. It is linear in ``lr`` with a state that does not depend on
   ``lr``, which is all the PyTorch tuner asks of an optimizer (``linear_in_lr=True``). Its ``lr`` is the
   learning rate the law starts from.
2. The PyTorch tuner gets the loss on the batch through ``set_objective``: the wrapped ``train_step``
   (:mod:`.train_step`) publishes a :class:`~eos_core.adapters.keras.train_step.TorchBatch` whose ``loss()``
   re-runs the model on the batch with the non-trainable variables entering the step.
3. Its state (law state, step count, resolved route, warm-start eigenvector, previous update) is copied into
   Keras variables after every step and read back after ``load_own_variables`` / ``set_weights`` (what
   ``keras.models.load_model``, ``model.load_weights`` and the checkpoint callbacks call), so a checkpoint
   restores it and the resumed run continues bit-identically.

Warnings: the PyTorch tuner raises its RuntimeWarnings (skipped step, non-finite curvature) from the step
itself, on the host, so ``warn=True`` and ``warn="jit"`` behave alike here and :meth:`TorchEngine.report`
has nothing to add; ``warn=False`` filters those warnings out around the step.

Routes: ``auto`` (double backward, falling back to one-sided finite differences), ``double-backward``,
``fd-central``, ``fd-onesided``. ``jvp-jvp`` / ``jvp-grad`` need ``torch.func.functional_call`` to swap the
parameters, which Keras layers do not read through their module attributes, so they are refused.
Preconditioned sharpness (``sharpness_every``) is reported for Adam / AdamW / RMSprop without momentum; laws
that *need* the preconditioned Hessian (``preconditioned=True``) run on the JAX backend only.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from eos_core import routes
from eos_core import stats as S
from eos_core.adapters.keras.optimizers import decay_rates
from eos_core.adapters.keras.train_step import TorchBatch, current_batch
from eos_core.adapters.torch import STATE_KEY
from eos_core.adapters.torch import CurvatureTuner as TorchCurvatureTuner
from eos_core.adapters.torch.oracles import SDPA_MATH
from eos_core.laws.base import Law

#: Routes of the PyTorch oracle as stored in the ``counters`` variable (index 0: not resolved yet).
ROUTE_CODES: tuple[str | None, ...] = (
    None,
    *[route + suffix for route in routes.EXACT for suffix in ("", SDPA_MATH)],
    *routes.FINITE_DIFFERENCES,
)
SUPPORTED_ROUTES: tuple[str, ...] = (routes.AUTO, routes.DOUBLE_BACKWARD, *routes.FINITE_DIFFERENCES)

#: Diagnostics the PyTorch tuner reports besides the law's own (NaN when not measured on a step).
EXTRA_KEYS: tuple[str, ...] = (
    "law_lr", "skipped", "loss", "grad_norm", "update_norm", "numerator", "denominator", "sharpness",
    "lr_sharpness", "preconditioned_sharpness", "preconditioned_lr_sharpness", "alignment", "power_iterations",
)
_COUNTERS = ("step", "route_code", "has_eigenvector", "has_previous_update", "skipped_steps")
_NEEDS_OBJECTIVE = frozenset({S.CURVATURE, S.TRIAL_LOSS, S.LOSS}) | S.SPECTRAL
#: The PyTorch tuner's warnings about a skipped step or a law fallback (what ``warn=False`` silences).
_BAD_STEP_WARNING = r"eos_core: step \d+"


def _host(variable: Any) -> np.ndarray:
    """A Keras variable's value as a float64 numpy array (without Keras's ``numpy()`` copy warnings)."""
    return variable.value.detach().cpu().numpy().astype(np.float64)


class KerasDirection(torch.optim.Optimizer):
    """A torch optimizer whose step is ``w <- w + lr * u``, ``u`` the Keras ``optimizer``'s update for lr = 1.

    ``optimizer`` must be built on ``variables`` with learning rate 1. Parameters without a gradient are
    left alone (as Keras does), and a step where no parameter has one changes nothing (the PyTorch
    tuner's way of skipping a non-finite step).
    """

    def __init__(self, optimizer: Any, variables: Sequence[Any], lr: float) -> None:
        self.keras_optimizer = optimizer
        self.keras_variables = list(variables)
        self.decay = decay_rates(optimizer, self.keras_variables)
        super().__init__([v.value for v in self.keras_variables], {"lr": float(lr)})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        params, lr = group["params"], float(group["lr"])
        active = [i for i, p in enumerate(params) if p.grad is not None]
        if not active:
            return loss
        weights = [params[i].detach().clone() for i in active]
        for i in active:
            params[i].zero_()
        self.keras_optimizer._backend_apply_gradients([params[i].grad for i in active],
                                                      [self.keras_variables[i] for i in active])
        self.keras_optimizer._iterations.assign_add(1)
        for i, w in zip(active, weights, strict=True):
            p = params[i]
            u = p.detach().clone()  # 0 + u
            if self.decay[i]:
                u.add_(w, alpha=-self.decay[i])
            p.copy_(w).add_(u, alpha=lr)
        return loss


class _KerasTorchTuner(TorchCurvatureTuner):
    """The PyTorch tuner, with the preconditioner of the Keras optimizer for preconditioned sharpness."""

    keras_preconditioner: Callable[[], list[torch.Tensor] | None] = staticmethod(lambda: None)

    def _preconditioner(self, pending: Any) -> list[torch.Tensor] | None:
        return self.keras_preconditioner()


def keras_preconditioner(optimizer: Any, variables: Sequence[Any]) -> Callable[[], list[torch.Tensor] | None]:
    """``() -> P`` (tensors like the weights) of Adam / AdamW / RMSprop without momentum, read after the step."""
    import keras

    positions = [optimizer._get_variable_index(v) for v in variables]
    if isinstance(optimizer, keras.optimizers.Adam):
        def adam() -> list[torch.Tensor]:
            second = optimizer._velocity_hats if optimizer.amsgrad else optimizer._velocities
            t = float(optimizer._iterations.value)
            scale = (1.0 - float(optimizer.beta_1) ** t) / math.sqrt(1.0 - float(optimizer.beta_2) ** t)
            return [(second[i].value.sqrt() + float(optimizer.epsilon)) * scale for i in positions]

        return adam
    if isinstance(optimizer, keras.optimizers.RMSprop) and float(optimizer.momentum) == 0.0:
        def rms() -> list[torch.Tensor]:
            eps = float(optimizer.epsilon)
            if optimizer.centered:
                return [(optimizer._velocities[i].value - optimizer._average_gradients[i].value ** 2 + eps).sqrt()
                        for i in positions]
            return [(optimizer._velocities[i].value + eps).sqrt() for i in positions]

        return rms
    return lambda: None


class TorchEngine:
    """Runs the tuner's step on the torch backend (see the module docstring)."""

    def __init__(self, tuner: Any, law: Law) -> None:
        self.tuner = tuner
        self.law = law
        self.dirty = False
        self.needs_objective = bool(law.needs & _NEEDS_OBJECTIVE) or tuner.sharpness_every is not None
        self.template = {k: float(v) for k, v in law.hold(law.init(tuner.initial_lr)).diagnostics.items()}
        self.keys: tuple[str, ...] = tuple(dict.fromkeys((*self.template, *EXTRA_KEYS, "route_code")))

    # -- build -----------------------------------------------------------------------------------
    def build(self, trainable: Sequence[Any]) -> None:
        tuner, optimizer = self.tuner, self.tuner.inner_optimizer
        self.trainable = list(trainable)
        self.params = [v.value for v in self.trainable]
        self.shim = KerasDirection(optimizer, self.trainable, tuner.initial_lr)
        self.torch_tuner = _KerasTorchTuner(
            self.shim, self.law, probe_every=tuner.probe_every, route=tuner.route,
            sharpness_every=tuner.sharpness_every, power_iters=tuner.sharpness_iters,
            power_tol=tuner.sharpness_tol, linear_in_lr=True)
        self.torch_tuner.keras_preconditioner = keras_preconditioner(optimizer, self.trainable)
        self.fields = type(self.torch_tuner.law_state)._fields
        add = tuner.add_variable
        self.law_variable = add(shape=(len(self.fields),), dtype="float64", name="eos_core_law_state")
        self.counters = add(shape=(len(_COUNTERS),), dtype="float64", name="eos_core_counters")
        self.diagnostics_variable = add(shape=(len(self.keys),), dtype="float64", name="eos_core_diagnostics")
        tracks = tuner.sharpness_every is not None or bool(self.law.needs & {S.SHARPNESS, S.TOP_EIGENVALUES})
        self.eigenvector = [tuner.add_variable_from_reference(v, name="eos_core_eigenvector") for v in self.trainable
                            ] if tracks else None
        self.previous_update = [tuner.add_variable_from_reference(v, name="eos_core_previous_update")
                                for v in self.trainable] if S.GRAD_PREV_UPDATE_COSINE in self.law.needs else None
        initial = {k: math.nan for k in self.keys}
        initial.update(self.template, skipped=0.0, route_code=0.0)
        self._write(initial, skipped_steps=0)

    # -- step --------------------------------------------------------------------------------------
    def apply(self, grads: Sequence[Any]) -> float:
        """One tuned step from the step's gradients; returns the learning rate applied."""
        batch = current_batch()
        batch = batch if isinstance(batch, TorchBatch) else None
        if batch is None and self.needs_objective:
            raise RuntimeError(self.tuner.no_batch_message())
        if self.dirty:
            self._read()
            self.dirty = False
        for p, g in zip(self.params, grads, strict=True):
            p.grad = None if g is None else g.detach()
        produced = batch.snapshot() if batch is not None else None
        try:
            closure = None
            if batch is not None:
                self.torch_tuner.set_objective(batch.loss)
                if batch.step_loss is not None:
                    step_loss = batch.step_loss.detach()

                    def closure() -> torch.Tensor:  # the step's loss, already back-propagated by Keras
                        return step_loss
            quiet = warnings.catch_warnings() if self.tuner.warn is False else contextlib.nullcontext()
            with torch.enable_grad(), quiet:
                if self.tuner.warn is False:
                    warnings.filterwarnings("ignore", message=_BAD_STEP_WARNING, category=RuntimeWarning)
                self.torch_tuner.step(closure)
        finally:
            if batch is not None:
                batch.restore(produced)
        diagnostics = dict(self.torch_tuner.diagnostics)
        skipped = float(diagnostics.get("skipped", 0.0)) > 0
        skipped_steps = int(_host(self.counters)[_COUNTERS.index("skipped_steps")]) + int(skipped)
        if skipped:  # as the JAX adapter does: the previous step's values, with skipped = 1
            diagnostics = dict(zip(self.keys, _host(self.diagnostics_variable).tolist(), strict=True))
            diagnostics["skipped"] = 1.0
            diagnostics.pop("route_code")
        self._write(diagnostics, skipped_steps=skipped_steps)
        return float(diagnostics.get("lr", math.nan))

    # -- the state in Keras variables ----------------------------------------------------------------
    def _write(self, diagnostics: dict[str, Any], *, skipped_steps: int) -> None:
        saved = self.shim.state_dict()[STATE_KEY]
        self.law_variable.assign(np.asarray([saved["law_state"][f] for f in self.fields], dtype=np.float64))
        route = saved.get("route")
        route_code = ROUTE_CODES.index(route) if route in ROUTE_CODES else 0
        counters = {"step": saved["step"], "route_code": route_code,
                    "has_eigenvector": saved.get("eigenvector") is not None,
                    "has_previous_update": saved.get("previous_update") is not None, "skipped_steps": skipped_steps}
        self.counters.assign(np.asarray([float(counters[k]) for k in _COUNTERS], dtype=np.float64))
        for variables, key in ((self.eigenvector, "eigenvector"), (self.previous_update, "previous_update")):
            if variables is not None and saved.get(key) is not None:
                for variable, value in zip(variables, saved[key], strict=True):
                    variable.assign(value)
        values = dict(diagnostics)
        values["route_code"] = float(route_code)
        row = []
        for key in self.keys:
            value = values.get(key, math.nan)
            row.append(float(value) if isinstance(value, int | float | np.floating | np.integer) else math.nan)
        self.diagnostics_variable.assign(np.asarray(row, dtype=np.float64))

    def _read(self) -> None:
        law_state = _host(self.law_variable)
        counters = dict(zip(_COUNTERS, _host(self.counters).tolist(), strict=True))

        def tensors(variables: list[Any] | None, flag: str) -> list[torch.Tensor] | None:
            if variables is None or not counters[flag]:
                return None
            return [v.value.detach().clone() for v in variables]

        self.torch_tuner.load_tuner_state({
            "version": 1,
            "law": type(self.law).__name__,
            "law_state": {f: float(law_state[i]) for i, f in enumerate(self.fields)},
            "step": int(counters["step"]),
            "route": ROUTE_CODES[int(counters["route_code"])],
            "reference_lr": float(self.tuner.initial_lr),
            "eigenvector": tensors(self.eigenvector, "has_eigenvector"),
            "preconditioned_eigenvector": None,
            "previous_update": tensors(self.previous_update, "has_previous_update"),
        })

    def mark_loaded(self) -> None:
        """The variables were overwritten (a checkpoint was loaded): read them before the next step."""
        self.dirty = True

    def report(self, found: dict[str, Any], *, stacklevel: int = 1) -> None:
        """Nothing to report on a read: the PyTorch tuner warned during the step (see the module docstring)."""

    # -- reading ----------------------------------------------------------------------------------
    def decode(self, read: Callable[[Any], Any]) -> dict[str, Any]:
        values = np.asarray(read(self.diagnostics_variable), dtype=np.float64).tolist()
        host = dict(zip(self.keys, values, strict=True))
        counters = dict(zip(_COUNTERS, np.asarray(read(self.counters), dtype=np.float64).tolist(), strict=True))
        out: dict[str, Any] = {k: v for k, v in host.items() if k != "route_code"}
        out["route"] = ROUTE_CODES[int(host["route_code"])] or self.tuner.route
        out["step"] = int(counters["step"])
        out["skipped_steps"] = int(counters["skipped_steps"])
        return out
