"""``CurvatureTuner``: any law of the core driving any torch optimizer whose step is linear in lr.

How a step works (the tuner attaches to the optimizer through ``register_step_pre_hook`` /
``register_step_post_hook``, so ``optimizer.step()``, ``tuner.step()``, ``GradScaler.step`` and the
trainers' own calls all go through it):

1. *Before the step.* With a closure, the tuner calls it once itself (recording the random state,
   so probes replay the same dropout masks) and hands the optimizer the resulting loss. A
   non-finite loss or gradient skips the step: every ``.grad`` is set to None, which torch
   optimizers skip, so neither the parameters nor the optimizer state change, and a warning is
   issued. On a step that needs the update direction (a probe step, or one whose update a law
   needs next), the parameters ``w`` are copied and every group's lr is set to
   ``eta_probe * ratio_g`` (``eta_probe`` is the law's last lr, ``ratio_g`` the group's lr over
   the first group's, so per-group lr ratios are kept).
2. *The optimizer's own step* advances its state exactly as usual and moves the parameters to
   ``w + eta_probe * u``; ``D = eta_probe * u`` is read off and the parameters go back to ``w``.
   For an optimizer linear in lr this is the update direction for lr = 1, without any extra
   optimizer state.
3. *After the step.* The statistics the law declares (:mod:`eos_core.stats`) are measured at
   ``w`` (g.u from the step's own gradient, u^T H u by the :class:`Oracle`, lambda_max by
   warm-started power iteration, top-k eigenvalues by Lanczos, trial losses, ...), averaged across
   data-parallel ranks, and the law decides ``eta``. The parameters become ``w + eta * u`` and the
   groups' lr settings are restored to what they were, so lr schedulers keep working.

Between probes (``probe_every = k``) the optimizer steps directly with the law's last lr: no copy,
no probe. ``lr_mode="multiply"`` multiplies the law's lr by the schedule factor
``lr_0(t) / lr_0(attach)`` of the first group (the shape of a user's scheduler on top of the
tuner's scale); ``"override"`` (default) ignores the optimizer's lr except for group ratios.

The tuner's state (law state, step count, resolved route, warm-start eigenvectors, previous
update) travels in the optimizer's own ``state_dict()`` under the key ``"eos_core"``, so every
framework that checkpoints the optimizer checkpoints the tuner, and resuming is bit-identical.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from eos_core import _validation as check
from eos_core import routes
from eos_core import stats as S
from eos_core.adapters.torch import optimizers as opt_info
from eos_core.adapters.torch import vector_ops as vec
from eos_core.adapters.torch.distributed import Reducer
from eos_core.adapters.torch.objective import Objective, capture_rng, shifted
from eos_core.adapters.torch.oracles import Oracle
from eos_core.laws.base import Law, LawOutput
from eos_core.routes import parameter_scale_along
from eos_core.spectral import lanczos, power_iteration, preconditioned_operator

Vector = list[torch.Tensor]
STATE_KEY = "eos_core"
_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, CurvatureTuner] = weakref.WeakKeyDictionary()
_SPECTRAL = S.SPECTRAL


@dataclass
class _Step:
    """What the pre-step hook hands to the post-step hook."""

    skipped: bool = False
    instrumented: bool = False
    probe: bool = False
    track: bool = False
    objective: Objective | None = None
    loss: float | None = None
    group_lrs: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    schedule: float = 1.0
    eta_probe: float = 1.0
    saved: Vector | None = None
    output: LawOutput | None = None
    norms: tuple[float, float] = (0.0, 0.0)  #: sum |w| |D| / ||D||, ||D|| on instrumented steps
    grad_sq: float = 0.0


class CurvatureTuner:
    """Drive ``optimizer`` with a tuning law (CDAT by default in the docs: ``CDAT(scale=2.0)``).

    Args:
        optimizer: a ``torch.optim.Optimizer`` whose step is linear in lr (SGD with or without
            momentum/Nesterov, Adam, AdamW, RMSprop, Adagrad, Adadelta, Adamax, NAdam, RAdam).
        law: a law from :mod:`eos_core.laws`, or None to leave the optimizer's lr alone and only
            measure (``sharpness_every``).
        probe_every: measure the law's statistics every ``probe_every`` steps and reuse the lr in
            between (Sophia-style amortisation).
        route: curvature route (:mod:`eos_core.routes`); ``"auto"`` picks double backward and falls
            back to the math SDPA kernel, then to one-sided finite differences; on models with at least
            ``fd_above`` parameters it keeps one-sided finite differences once they agree with double
            backward to 1% (checked at the 1st, 10th, 100th, ... probe; ``fd_above=None`` never switches).
        sharpness_every: every that many steps, track lambda_max (warm-started power iteration),
            ``lr * lambda_max`` and, for Adam/RMSprop/Adagrad, the preconditioned sharpness.
        lr_mode: ``"override"`` or ``"multiply"`` (see the module docstring).
        model: the model; needed by the ``jvp-*`` routes, lets probes restore buffers (BatchNorm
            running statistics) and run a DDP model under ``no_sync()``.
        grad_scaler: the ``torch.amp.GradScaler`` in use, so probes scale their own backward passes.
        fd_eps: machine epsilon for finite-difference steps (default: that of the lowest precision the
            loss is computed in: the parameters' dtype, or bf16/fp16 under autocast, detected).
        skip_nonfinite: skip steps whose loss or gradient is NaN/Inf (default True).
        clipped_gradients: set True when the gradient the optimizer steps with is not the objective's
            own (clipped between ``backward`` and ``step``): finite-difference routes then evaluate g(w)
            again instead of reusing the step's gradient (one more gradient per probe). The numerator
            g.u still uses the step's (clipped) gradient. Also an attribute, read at every step.
        linear_in_lr: set True to drive an optimizer not in the list above whose step is linear in lr.
        power_iters, power_tol: power iteration settings for ``sharpness_every``.
        lanczos_steps: Lanczos steps for laws that need top-k eigenvalues, unless the law sets its own.
        process_group: the data-parallel group (default: the world, when torch.distributed is initialised).
        reference_lr: ``lr_0(attach)`` of ``lr_mode="multiply"``, the first group's lr that means a schedule
            factor of 1, and the law's initial lr. Default: the group's ``"initial_lr"`` (the base lr every
            torch scheduler records, so a warm-up scheduler created before the tuner, whose factor at step
            0 is not 1, is applied correctly), else its lr when the tuner attaches.

    Laws that decide momentum and weight decay (DCAO) track the first param group that has a non-zero
    value and write ``value * ratio_g`` into group g, where ``ratio_g`` is the group's setting relative
    to that group's when the tuner attaches (so a no-decay group for biases and norms stays at 0).
    Momentum is SGD/RMSprop ``momentum`` or Adam-style ``betas[0]``.

    After each step :attr:`diagnostics` holds ``lr``, ``route``, ``loss``, ``grad_norm``,
    ``update_norm`` (of u, the update for lr = 1), the law's measurements (``numerator``,
    ``denominator``, ...) and, when tracked, ``sharpness``, ``lr_sharpness``,
    ``preconditioned_sharpness``, ``preconditioned_lr_sharpness`` and ``alignment`` (|cos(u, v_max)|).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        law: Law | None = None,
        *,
        probe_every: int = 1,
        route: str = routes.AUTO,
        sharpness_every: int | None = None,
        lr_mode: str = "override",
        model: torch.nn.Module | None = None,
        grad_scaler: Any | None = None,
        fd_eps: float | None = None,
        skip_nonfinite: bool = True,
        clipped_gradients: bool = False,
        linear_in_lr: bool | None = None,
        power_iters: int = 20,
        power_tol: float = 1e-3,
        lanczos_steps: int = 20,
        fd_above: int | None = 10_000_000,
        process_group: Any | None = None,
        reference_lr: float | None = None,
    ) -> None:
        owner = "CurvatureTuner"
        opt_info.check_supported(optimizer, linear_in_lr=linear_in_lr)
        if law is not None and not isinstance(law, Law):
            raise ValueError(f"{owner}: law must be an eos_core law (e.g. CDAT(scale=2.0)), got {law!r}")
        self.probe_every = check.positive_int(owner, "probe_every", probe_every)
        self.sharpness_every = None if sharpness_every is None else check.positive_int(
            owner, "sharpness_every", sharpness_every)
        if lr_mode not in ("override", "multiply"):
            raise ValueError(f"{owner}: lr_mode must be 'override' or 'multiply', got {lr_mode!r}")
        self.power_iters = check.positive_int(owner, "power_iters", power_iters)
        self.power_tol = check.non_negative(owner, "power_tol", power_tol)
        self.lanczos_steps = check.positive_int(owner, "lanczos_steps", lanczos_steps)
        if fd_eps is not None:
            check.positive(owner, "fd_eps", fd_eps)
        if optimizer in _ATTACHED:
            raise ValueError(
                f"{owner}: this optimizer already has a CurvatureTuner attached; call .detach() on it first "
                "(two tuners on one optimizer would both rewrite its step)"
            )
        self.optimizer = optimizer
        self.law = law
        self.lr_mode = lr_mode
        self.model = model
        self.grad_scaler = grad_scaler
        self.skip_nonfinite = bool(skip_nonfinite)
        self.clipped_gradients = bool(clipped_gradients)
        self.reducer = Reducer(process_group)
        if fd_above is not None:
            check.positive_int(owner, "fd_above", fd_above)
        self.oracle = Oracle(route, module=model, fd_eps=fd_eps, reducer=self.reducer, fd_above=fd_above)
        self._ops = vec.TorchOps()
        if law is not None:
            if law.decides:
                opt_info.check_knobs(optimizer, law.decides)
            preconditioned = {S.PRECONDITIONED_SHARPNESS, S.PRECONDITIONED_TOP_EIGENVALUES}
            if law.needs & preconditioned and not isinstance(optimizer, opt_info.PRECONDITIONED):
                raise ValueError(
                    f"{owner}: {type(law).__name__}(preconditioned=True) needs an adaptive optimizer with a "
                    f"diagonal preconditioner (Adam, AdamW, RMSprop, Adagrad), got {type(optimizer).__name__}"
                )
        first_group = optimizer.param_groups[0]
        if reference_lr is None:
            # A scheduler created before the tuner keeps the base lr in "initial_lr" (its factor may not
            # start at 1: a warm-up from 0 sets the group's lr to 0).
            base = first_group.get("initial_lr", first_group["lr"])
            reference_lr = float(base) if float(base) > 0 else float(first_group["lr"])
        else:
            reference_lr = check.positive(owner, "reference_lr", reference_lr)
        self._reference_lr = float(reference_lr)
        #: per-group momentum / weight-decay proportions kept when a law (DCAO) decides them
        self._hyperparam_ratios: dict[str, list[float]] = {}
        if law is not None:
            if law.decides:
                self._hyperparam_ratios = opt_info.hyperparam_ratios(optimizer)
            # The law starts from the base lr (a warm-up scheduler may have set the group's lr to 0).
            self.law_state = law.init(self._reference_lr if self._reference_lr > 0 else float(first_group["lr"]),
                                      hyperparams=opt_info.read_hyperparams(optimizer))
        else:
            self.law_state = None
        self._step_count = 0
        self._objective_fn: Callable[[], Any] | None = None
        self._pending: _Step | None = None
        self._eigenvector: Vector | None = None
        self._preconditioned_eigenvector: Vector | None = None
        self._previous_update: Vector | None = None
        self.diagnostics: dict[str, Any] = {}
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
            optimizer.register_state_dict_post_hook(self._state_dict_post),
            optimizer.register_load_state_dict_pre_hook(self._load_state_dict_pre),
        ]
        _ATTACHED[optimizer] = self

    # ---------------------------------------------------------------------------------------------
    # public API
    # ---------------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """``optimizer.step(closure)``: the closure (torch convention) re-evaluates the loss on the batch."""
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def set_objective(self, loss_fn: Callable[[], torch.Tensor]) -> None:
        """The loss on the current batch (returns the loss, no backward), for the next step's probes.

        Needed when the step is taken without a closure (``optimizer.step()``, ``GradScaler.step``,
        trainer integrations). When the step also has a closure, the closure still computes the
        step's gradient (and its random state is replayed), but probes evaluate ``loss_fn``. Used
        once, then forgotten: set it before every step.
        """
        self._objective_fn = loss_fn

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def lr(self) -> float:
        """The learning rate the last step applied (the first group's)."""
        return float(self.diagnostics.get("lr", self.optimizer.param_groups[0]["lr"]))

    @property
    def route(self) -> str:
        """The curvature route in use (``auto`` until the first probe resolves it)."""
        return self.oracle.resolved or self.oracle.route

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict, which carries the tuner's state under ``"eos_core"``."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def load_tuner_state(self, saved: dict[str, Any]) -> None:
        """Restore only the tuner's part of a checkpoint (``optimizer_state_dict["eos_core"]``).

        For trainers that load the optimizer's state before the tuner can attach (the Hugging Face
        ``Trainer`` loads ``optimizer.pt`` before any callback sees the optimizer).
        """
        self._load_tuner_state(saved)

    def detach(self) -> None:
        """Remove the tuner from the optimizer (its hooks); the optimizer steps as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if _ATTACHED.get(self.optimizer) is self:
            del _ATTACHED[self.optimizer]

    def __repr__(self) -> str:
        return (f"CurvatureTuner({type(self.optimizer).__name__}, {self.law!r}, probe_every={self.probe_every}, "
                f"route={self.route!r}, sharpness_every={self.sharpness_every})")

    # ---------------------------------------------------------------------------------------------
    # the step
    # ---------------------------------------------------------------------------------------------
    def _params_by_group(self) -> list[list[torch.Tensor]]:
        return [[p for p in group["params"] if p.requires_grad] for group in self.optimizer.param_groups]

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self._params_by_group() for p in group]

    def _needs_previous_update(self) -> bool:
        return self.law is not None and S.GRAD_PREV_UPDATE_COSINE in self.law.needs

    def _loss_scale(self) -> float:
        scaler = self.grad_scaler
        if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            return float(scaler.get_scale())
        return 1.0

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = list(args), dict(kwargs)
        params = self._params()
        step = self._step_count
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        pending = _Step()
        loss_tensor = None
        # Probes evaluate the objective given by set_objective() when there is one (a trainer's closure
        # may run hooks and logging that must not run again), else the step's own closure.
        probe_fn, rng = self._objective_fn, None
        self._objective_fn = None
        if closure is not None:
            rng = capture_rng(params)
            with torch.enable_grad():
                loss_tensor = closure()
            probe_fn = probe_fn if probe_fn is not None else closure

            def cached() -> Any:
                return loss_tensor

            if "closure" in kwargs:
                kwargs["closure"] = cached
            else:
                args[1] = cached
        if probe_fn is not None:
            pending.objective = Objective(probe_fn, params, rng_state=rng, module=self.model,
                                          loss_scale=self._loss_scale())
        if self.skip_nonfinite:
            tensor = loss_tensor if isinstance(loss_tensor, torch.Tensor) and loss_tensor.numel() == 1 else None
            pending.loss, finite = vec.loss_and_finite(tensor, [p.grad for p in params])
        else:
            finite = True
            pending.loss = float(loss_tensor.detach()) if isinstance(loss_tensor, torch.Tensor) else None
        if isinstance(loss_tensor, int | float):
            pending.loss = float(loss_tensor)
            finite = finite and math.isfinite(pending.loss)
        if self.skip_nonfinite:
            if not finite:
                for p in params:
                    p.grad = None  # torch optimizers skip parameters without a gradient
                pending.skipped = True
                self._pending = pending
                warnings.warn(f"eos_core: step {step} skipped: non-finite loss or gradient "
                              "(parameters and optimizer state left unchanged)", RuntimeWarning, stacklevel=3)
                return tuple(args), kwargs

        groups = optimizer.param_groups
        pending.group_lrs = [float(g["lr"]) for g in groups]
        first = pending.group_lrs[0]
        if first > 0:
            pending.ratios = [lr / first for lr in pending.group_lrs]
        else:  # a schedule at 0 (a warm-up's first step): the groups' base proportions, so the probe still moves
            bases = [float(g.get("initial_lr", lr)) for g, lr in zip(groups, pending.group_lrs, strict=True)]
            pending.ratios = [b / bases[0] if bases[0] > 0 else 1.0 for b in bases]
        if self.lr_mode == "multiply" and self._reference_lr > 0:
            pending.schedule = first / self._reference_lr
        law = self.law
        pending.probe = law is not None and bool(law.needs) and step % self.probe_every == 0
        pending.track = self.sharpness_every is not None and step % self.sharpness_every == 0
        records = self._needs_previous_update() and (step + 1) % self.probe_every == 0
        pending.instrumented = pending.probe or pending.track or records

        if pending.instrumented:
            if law is None:
                pending.eta_probe = first if first > 0 else 1.0
            else:
                last = float(self.law_state.lr)
                pending.eta_probe = last if math.isfinite(last) and last > 0 else 1.0
            pending.saved = vec.clone(params)
            step_lr = pending.eta_probe
        elif law is None:
            step_lr = first
        else:
            pending.output = law.update(self.law_state, {}) if not law.needs else law.hold(self.law_state)
            step_lr = float(pending.output.lr) * pending.schedule
        for group, ratio in zip(groups, pending.ratios, strict=True):
            group["lr"] = step_lr * ratio
        self._pending = pending
        return tuple(args), kwargs

    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        pending, self._pending = self._pending, None
        if pending is None:  # the pre-step hook did not run (hooks attached mid-step)
            return
        step = self._step_count
        try:
            if pending.skipped:
                self._report_skipped(pending, step)
            elif not pending.instrumented:
                self._commit(pending.output, step, pending, extra={})
            elif self.skip_nonfinite and not vec.all_finite(self._params()):
                self._undo_non_finite_update(pending, step)
            else:
                self._instrumented_step(pending, step)
        finally:
            for group, lr in zip(optimizer.param_groups, pending.group_lrs, strict=False):
                group["lr"] = lr
            self._step_count += 1

    def _commit(self, output: LawOutput | None, step: int, pending: _Step, extra: dict[str, Any]) -> None:
        diagnostics: dict[str, Any] = {"step": step, "skipped": 0.0, "route": self.route}
        if output is not None:
            self.law_state = output.state
            diagnostics.update({k: float(v) for k, v in output.diagnostics.items()})
            diagnostics["law_lr"] = float(output.lr)
            diagnostics["lr"] = float(output.lr) * pending.schedule
            if output.hyperparams:
                opt_info.write_hyperparams(self.optimizer, {k: float(v) for k, v in output.hyperparams.items()},
                                           self._hyperparam_ratios)
                diagnostics.update({k: float(v) for k, v in output.hyperparams.items()})
        else:
            diagnostics["lr"] = pending.group_lrs[0]
            diagnostics["probed"] = 0.0
        if pending.loss is not None:
            diagnostics.setdefault("loss", pending.loss)
        diagnostics.update(extra)
        self.diagnostics = diagnostics

    def _undo_non_finite_update(self, pending: _Step, step: int) -> None:
        """The optimizer produced a NaN/Inf update from a finite gradient (e.g. Adam with ``eps=0`` where the
        second moment is 0): put the parameters back to ``w`` (the copy every instrumented step keeps) and
        report the step as skipped. The optimizer's moments have advanced as for any step it took."""
        with torch.no_grad():
            for p, w in zip(self._params(), pending.saved, strict=True):
                p.copy_(w)
        warnings.warn(f"eos_core: step {step} skipped: the optimizer's update is not finite (the gradient is); "
                      "parameters left unchanged", RuntimeWarning, stacklevel=4)
        self._report_skipped(pending, step)

    def _report_skipped(self, pending: _Step, step: int) -> None:
        self.diagnostics = {"step": step, "lr": 0.0, "skipped": 1.0, "probed": 0.0,
                            "loss": pending.loss if pending.loss is not None else math.nan, "route": self.route}

    def _instrumented_step(self, pending: _Step, step: int) -> None:
        params = self._params()
        delta = pending.saved  # w, then D = eta_probe * u
        eta_probe = pending.eta_probe
        with torch.no_grad():
            torch._foreach_sub_(delta, params)  # w - (w + D) = -D
            torch._foreach_neg_(delta)
            torch._foreach_sub_(params, delta)  # back to w (exact when w and w + D are within a factor 2)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        objective = pending.objective
        grad_dot_delta, grad_sq, delta_sq, weighted = vec.dots(
            [(grads, delta), (grads, grads), (delta, delta), (params, delta)], absolute=(False, False, False, True))
        delta_norm = math.sqrt(max(delta_sq, 0.0))
        pending.norms = (parameter_scale_along(weighted, delta_norm), delta_norm)  # as vec.scale_along
        pending.grad_sq = grad_sq
        extra: dict[str, Any] = {
            "grad_norm": math.sqrt(max(grad_sq, 0.0)),
            "update_norm": pending.norms[1] / eta_probe,
        }
        output: LawOutput | None = None
        try:
            with objective.preserving_buffers() if objective is not None else contextlib.nullcontext():
                statistics = self._measure(pending, params, grads, delta, grad_dot_delta) if pending.probe else {}
                tracked = self._track(pending, params, grads, delta) if pending.track else {}
            if self.law is not None:
                output = self.law.update(self.law_state, statistics) if pending.probe else self.law.hold(self.law_state)
                if pending.probe and float(output.diagnostics["fallback"]) > 0:
                    bad = [k for k, v in statistics.items() if not callable(v) and not np.all(np.isfinite(v))]
                    if bad:
                        warnings.warn(f"eos_core: step {step}: non-finite {', '.join(bad)}; keeping the last good "
                                      "learning rate", RuntimeWarning, stacklevel=4)
                eta = float(output.lr) * pending.schedule
            else:
                eta = eta_probe
            if tracked:
                extra.update(tracked)
                extra["lr_sharpness"] = eta * tracked["sharpness"]
                if "preconditioned_sharpness" in tracked:
                    extra["preconditioned_lr_sharpness"] = eta * tracked["preconditioned_sharpness"]
            if "loss" in statistics:
                extra["loss"] = float(statistics["loss"])
        except Exception:
            # Finish the step with the last good lr so the parameters never stay half-updated.
            with torch.no_grad():
                torch._foreach_add_(params, delta, alpha=self._held_lr(pending) / eta_probe)
            raise
        with torch.no_grad():
            torch._foreach_add_(params, delta, alpha=eta / eta_probe)
        if self._needs_previous_update():
            self._previous_update = [d.div_(eta_probe) for d in delta]  # u, for cos(g_{t+1}, u_t)
        self._commit(output, step, pending, extra)

    def _held_lr(self, pending: _Step) -> float:
        if self.law is None:
            return pending.eta_probe
        return float(self.law.hold(self.law_state).lr) * pending.schedule

    # ---------------------------------------------------------------------------------------------
    # measurements
    # ---------------------------------------------------------------------------------------------
    def _require_objective(self, pending: _Step, what: str) -> Objective:
        if pending.objective is None:
            name = type(self.law).__name__ if self.law is not None else "sharpness tracking"
            raise RuntimeError(
                f"{name} needs {what} on the current batch: call tuner.step(closure) with a closure that "
                "computes the loss (torch convention), or tuner.set_objective(loss_fn) before optimizer.step()"
            )
        return pending.objective

    def _measure(self, pending: _Step, params: Vector, grads: Vector, delta: Vector,
                 grad_dot_delta: float) -> dict[str, Any]:
        law = self.law
        assert law is not None
        needs = law.needs
        eta_probe = pending.eta_probe
        out: dict[str, Any] = {}
        if S.GRAD_DOT_UPDATE in needs:
            out[S.GRAD_DOT_UPDATE] = grad_dot_delta / eta_probe
        if S.GRAD_NORM_SQ in needs:
            out[S.GRAD_NORM_SQ] = pending.grad_sq
        if S.CURVATURE in needs:
            objective = self._require_objective(pending, "u^T H u")
            # one-sided finite differences subtract g(w).u: the step's own only when it is the objective's
            exact = None if self.clipped_gradients else grad_dot_delta
            curvature = self.oracle.curvature(objective, params, delta, grad_dot_u=exact,
                                              norms=pending.norms)
            out[S.CURVATURE] = curvature / eta_probe**2
        if S.LOSS in needs:
            if pending.loss is not None:
                loss = pending.loss
            else:
                loss = self._require_objective(pending, "the loss").value()
            out[S.LOSS] = self.reducer.mean_scalars([loss])[0]
        if S.GRAD_PREV_UPDATE_COSINE in needs:
            previous = self._previous_update
            if previous is None:
                out[S.GRAD_PREV_UPDATE_COSINE] = 0.0
            else:
                along, previous_sq = vec.dots([(grads, previous), (previous, previous)])
                denominator = math.sqrt(pending.grad_sq * previous_sq)
                out[S.GRAD_PREV_UPDATE_COSINE] = along / denominator if denominator > 0 else 0.0
        if S.TRIAL_LOSS in needs:
            objective = self._require_objective(pending, "trial losses")

            def trial_loss(eta: Any) -> float:
                with shifted(params, delta, float(eta) / eta_probe):
                    return self.reducer.mean_scalars([objective.value()])[0]

            out[S.TRIAL_LOSS] = trial_loss
        spectral = needs & _SPECTRAL
        if spectral:
            objective = self._require_objective(pending, "Hessian-vector products")
            if S.SHARPNESS in spectral:
                out[S.SHARPNESS] = self._sharpness(objective, params, grads, None, law.power_iters, law.power_tol)
            if S.PRECONDITIONED_SHARPNESS in spectral:
                precond = self._preconditioner(pending)
                out[S.PRECONDITIONED_SHARPNESS] = self._sharpness(objective, params, grads, precond,
                                                                  law.power_iters, law.power_tol)
            for key, precond in ((S.TOP_EIGENVALUES, None), (S.PRECONDITIONED_TOP_EIGENVALUES, True)):
                if key in spectral:
                    matrix = self._preconditioner(pending) if precond else None
                    out[key] = self._top_eigenvalues(objective, params, grads, matrix)
        return out

    def _preconditioner(self, pending: _Step) -> Vector | None:
        return opt_info.preconditioner(self.optimizer, self._params_by_group(), pending.ratios)

    def _operator(self, objective: Objective, params: Vector, grads: Vector,
                  precond: Vector | None) -> tuple[Any, Callable[[Vector], Vector]]:
        hessian = self.oracle.hessian_operator(objective, params,
                                               base_grad=None if self.clipped_gradients else grads)
        if precond is None:
            return hessian, hessian
        return hessian, preconditioned_operator(hessian, precond, ops=self._ops)

    def _sharpness(self, objective: Objective, params: Vector, grads: Vector, precond: Vector | None,
                   max_iters: int, tol: float) -> float:
        hessian, matvec = self._operator(objective, params, grads, precond)
        attribute = "_eigenvector" if precond is None else "_preconditioned_eigenvector"
        start = getattr(self, attribute)
        if start is None:
            start = self._ops.random_like(params, seed=1 + (precond is not None))
        with hessian:
            result = power_iteration(matvec, start, tol=tol, max_iters=max_iters, ops=self._ops)
        setattr(self, attribute, [v.detach() for v in result.eigenvector])
        self._power_iterations = int(result.iterations)
        return float(result.eigenvalue)

    def _top_eigenvalues(self, objective: Objective, params: Vector, grads: Vector,
                         precond: Vector | None) -> np.ndarray:
        law = self.law
        hessian, matvec = self._operator(objective, params, grads, precond)
        steps = getattr(law, "lanczos_steps", None) or self.lanczos_steps
        k = getattr(law, "num_eigenvalues", 1)
        start = self._eigenvector if self._eigenvector is not None else self._ops.random_like(params, seed=3)
        n = self._ops.size(params)
        with hessian:
            result = lanczos(matvec, start, min(k, n), num_steps=max(min(steps, n), min(k, n)), ops=self._ops)
        return np.asarray(result.eigenvalues, dtype=np.float64)

    def _track(self, pending: _Step, params: Vector, grads: Vector, delta: Vector) -> dict[str, float]:
        objective = self._require_objective(pending, "Hessian-vector products")
        out: dict[str, float] = {}
        out["sharpness"] = self._sharpness(objective, params, grads, None, self.power_iters, self.power_tol)
        out["power_iterations"] = float(self._power_iterations)
        norm = vec.norm(delta)
        if norm > 0 and self._eigenvector is not None:
            out["alignment"] = abs(vec.dot(delta, self._eigenvector)) / (norm * vec.norm(self._eigenvector))
        precond = self._preconditioner(pending)
        if precond is not None:
            out["preconditioned_sharpness"] = self._sharpness(objective, params, grads, precond, self.power_iters,
                                                              self.power_tol)
        return out

    # ---------------------------------------------------------------------------------------------
    # checkpoints
    # ---------------------------------------------------------------------------------------------
    def _tuner_state(self) -> dict[str, Any]:
        law_state = None
        if self.law_state is not None:
            law_state = {name: np.asarray(value).tolist() for name, value in self.law_state._asdict().items()}

        def tensors(x: Vector | None) -> list[torch.Tensor] | None:
            return None if x is None else [t.detach().clone() for t in x]

        return {
            "version": 1,
            "law": type(self.law).__name__ if self.law is not None else None,
            "law_state": law_state,
            "step": self._step_count,
            "route": self.oracle.resolved,
            "exact_probes": self.oracle.exact_probes,
            "reference_lr": self._reference_lr,
            "hyperparam_ratios": {k: list(v) for k, v in self._hyperparam_ratios.items()},
            "eigenvector": tensors(self._eigenvector),
            "preconditioned_eigenvector": tensors(self._preconditioned_eigenvector),
            "previous_update": tensors(self._previous_update),
        }

    def _state_dict_post(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict[STATE_KEY] = self._tuner_state()
        return state_dict

    def _load_state_dict_pre(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = dict(state_dict)
        saved = state_dict.pop(STATE_KEY, None)
        if saved is not None:
            self._load_tuner_state(saved)
        return state_dict

    def _load_tuner_state(self, saved: dict[str, Any]) -> None:
        name = type(self.law).__name__ if self.law is not None else None
        if saved.get("law") != name:
            raise ValueError(f"the checkpoint's tuner state was saved with law {saved.get('law')}, "
                             f"but this tuner runs {name}")
        if saved["law_state"] is not None:
            fields = type(self.law_state)._fields
            self.law_state = type(self.law_state)(
                *[np.asarray(saved["law_state"][f], dtype=np.float64) for f in fields])
        self._step_count = int(saved["step"])
        if saved.get("route") is not None:
            self.oracle.resolved = saved["route"]
        self.oracle.exact_probes = int(saved.get("exact_probes", 0))
        self._reference_lr = float(saved["reference_lr"])
        if "hyperparam_ratios" in saved:
            self._hyperparam_ratios = {k: [float(r) for r in v] for k, v in saved["hyperparam_ratios"].items()}
        params = self._params()

        def tensors(x: list[torch.Tensor] | None) -> Vector | None:
            if x is None:
                return None
            return [t.to(device=p.device, dtype=p.dtype) for t, p in zip(x, params, strict=True)]

        self._eigenvector = tensors(saved.get("eigenvector"))
        self._preconditioned_eigenvector = tensors(saved.get("preconditioned_eigenvector"))
        self._previous_update = tensors(saved.get("previous_update"))
