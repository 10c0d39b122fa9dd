"""``CurvatureTuner``: any law of the core driving any torch optimizer whose step is linear in lr.

How a step works (the tuner attaches to the optimizer through ``register_step_pre_hook`` /
``register_step_post_hook``, so ``optimizer.step()``, ``tuner.step()``, ``GradScaler.step`` and the
trainers' own calls all go through it). Each stage is one method of :class:`CurvatureTuner`:

1. *Check the inputs* (before the step). With a closure, the tuner calls it once itself (recording the
   random state, so probes replay the same dropout masks) and hands the optimizer the resulting loss.
   The loss, ``|g|`` and their finiteness are read in one synchronisation. A non-finite loss or
   gradient skips the step: every ``.grad`` is set to None, which torch optimizers skip, so neither
   the parameters nor the optimizer state change.
2. *Plan*. The step index (skipped steps are not counted) decides whether the law probes
   (``step % probe_every == 0``), whether lambda_max is tracked (``step % sharpness_every == 0``) and
   whether the update must be kept for the next probe. Such a step is *instrumented*: every group's lr
   is set to ``eta_probe * ratio_g`` (``eta_probe`` is the law's last lr, ``ratio_g`` the group's lr over
   the first group's, so per-group lr ratios are kept). Any other step is *direct*: the law decides
   before the step (``law.hold``, or ``law.update`` for a law that needs no statistics) and the groups
   get that lr. The parameters ``w`` are copied in both cases.
3. *The optimizer's own step* advances its state exactly as usual and moves the parameters to
   ``w + eta * u``.
4. *Probe, track, decide, apply* (after an instrumented step). ``D = eta_probe * u`` is read off and
   the parameters go back to ``w``. The statistics the law declares (:mod:`eos_core.stats`, listed by
   ``law.request()``) are measured at ``w`` (g.u from the step's own gradient, u^T H u by the
   :class:`~eos_core.adapters.torch.oracles.Oracle`, lambda_max by warm-started power iteration, top-k
   eigenvalues by Lanczos, trial losses, ...), averaged across data-parallel ranks; lambda_max is
   tracked; the law decides ``eta`` and the parameters become ``w + eta * u``. After a direct step
   ``|u| = |w_new - w| / eta`` is all that is measured.
5. *Report*. :attr:`CurvatureTuner.diagnostics` gets exactly :func:`eos_core.diagnostics.keys_for`
   ``(law)`` (NaN for what was not measured on the step) and the groups' lr settings are restored, so
   lr schedulers keep working.

``lr_mode="multiply"`` multiplies the law's lr by the schedule factor ``lr_0(t) / lr_0(attach)`` of the
first group (the shape of a user's scheduler on top of the tuner's scale); ``"override"`` (default)
ignores the optimizer's lr except for group ratios.

The tuner's state (law state, step counters, resolved route, warm-start eigenvectors, previous update,
last diagnostics) travels in the optimizer's own ``state_dict()`` under the key ``"eos_core"``, so every
framework that checkpoints the optimizer checkpoints the tuner, and resuming is bit-identical.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from eos_core import _validation as check
from eos_core import diagnostics as diag
from eos_core import stats as S
from eos_core.adapters.torch import optimizers as opt_info
from eos_core.adapters.torch import vector_ops as vec
from eos_core.adapters.torch.distributed import Reducer
from eos_core.adapters.torch.objective import Objective, capture_rng, shifted
from eos_core.adapters.torch.oracles import HessianOperator, Oracle
from eos_core.laws.base import Law, LawOutput
from eos_core.laws.dcao import DCAO
from eos_core.request import StatsRequest
from eos_core.routes import parameter_scale_along
from eos_core.settings import DEPRECATED, TunerSettings
from eos_core.spectral import lanczos, power_iteration, preconditioned_operator, random_start

Vector = list[torch.Tensor]
#: the key of the tuner's state in ``optimizer.state_dict()``
STATE_KEY = "eos_core"
#: the version of that state written now; :meth:`CurvatureTuner.load_tuner_state` reads versions 1 and 2
STATE_VERSION = 2
#: the fields a saved tuner state cannot do without (every version)
REQUIRED_STATE_FIELDS = ("version", "law", "law_state", "step", "reference_lr")
_OWNER = "CurvatureTuner"
_NAN = math.nan
_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, CurvatureTuner] = weakref.WeakKeyDictionary()
_PRECONDITIONED_NEEDS = frozenset({S.PRECONDITIONED_SHARPNESS, S.PRECONDITIONED_TOP_EIGENVALUES})
_NOT_COMPUTED = object()
#: source folders whose frames a bad-step warning skips (it points at the caller of the optimizer's step)
_INTERNAL_SOURCES = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
                     os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


class _Estimate(NamedTuple):
    """A lambda_max estimate and the Hessian-vector products it used."""

    eigenvalue: float
    iterations: int


@dataclass
class PendingStep:
    """One optimizer step, from the pre-step hook to the post-step hook.

    Subclasses that override :meth:`CurvatureTuner._preconditioner` receive it; ``ratios`` (each param
    group's lr over the first group's on this step) is the stable part of it for them.
    """

    step: int  #: index of this step among the steps not skipped
    objective: Objective | None = None
    skipped: bool = False
    probe: bool = False  #: the law measures its statistics on this step
    track: bool = False  #: lambda_max is tracked on this step (``sharpness_every``)
    record: bool = False  #: u is kept for the next step's probe (HyperGradient's cos(g_t, u_{t-1}))
    instrumented: bool = False  #: the optimizer steps with ``eta_probe`` and the lr is decided afterwards
    loss: float | None = None
    grad_sq: float = _NAN  #: |g|^2 of the step's gradient
    group_lrs: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    schedule: float = 1.0  #: the scheduler's factor (lr_mode="multiply")
    step_lr: float = 0.0  #: the first group's lr during the optimizer's step
    eta_probe: float = 1.0  #: ``step_lr`` of an instrumented step
    output: LawOutput | None = None  #: the law's decision, made before a direct step
    saved: Vector | None = None  #: w before the step (on an instrumented step, then D = eta_probe u)
    law_estimates: dict[bool, _Estimate] = field(default_factory=dict)  #: the law's lambda_max, per operator
    preconditioner: Any = _NOT_COMPUTED


@dataclass
class _AtW:
    """What an instrumented step knows at ``w`` once the update has been read off."""

    params: Vector
    grads: Vector
    delta: Vector  #: D = eta_probe * u
    eta_probe: float
    grad_dot_delta: float  #: g . D
    norms: tuple[float, float]  #: (sum |w| |D| / ||D||, ||D||): the finite-difference scale along D, ||D||


class CurvatureTuner:
    """Drive ``optimizer`` with a tuning law (CDAT by default in the docs: ``CDAT(scale=2.0)``).

    Args:
        optimizer: a ``torch.optim.Optimizer`` whose step is linear in lr (SGD with or without
            momentum/Nesterov, Adam, AdamW, RMSprop, Adagrad, Adadelta, Adamax, NAdam, RAdam).
        law: a law from :mod:`eos_core.laws`, or None to leave the optimizer's lr alone and only
            measure (``sharpness_every``).
        model: the model; needed by the ``jvp-*`` routes, lets probes restore buffers (BatchNorm
            running statistics) and run a DDP model under ``no_sync()``.
        grad_scaler: the ``torch.amp.GradScaler`` in use, so probes scale their own backward passes.
        process_group: the data-parallel group (default: the world, when torch.distributed is initialised).
        settings: a :class:`eos_core.settings.TunerSettings`; ``**options`` given as well override it.
        **options: the options of :class:`~eos_core.settings.TunerSettings`, all supported here:
            ``probe_every``, ``route`` (``"auto"`` picks double backward, falls back to the math SDPA
            kernel, then to one-sided finite differences; on models with at least ``fd_above``
            parameters it keeps one-sided finite differences once they agree with double backward to 1%,
            checked at the 1st, 10th, 100th, ... probe), ``sharpness_every``, ``sharpness_iters``,
            ``sharpness_tol``, ``lr_mode``, ``warn`` (True or ``"jit"``: RuntimeWarnings for skipped steps
            and law fallbacks; False: none, the counts stay in the diagnostics), ``skip_nonfinite``,
            ``seed`` (the spectral start vectors: :func:`eos_core.spectral.random_start` with ``seed`` for
            H, ``seed + 1`` for the preconditioned Hessian), ``fd_eps`` (default: the epsilon of the lowest
            precision the loss is computed in, autocast included), ``reference_lr`` (``lr_0(attach)`` of
            ``lr_mode="multiply"`` and the law's initial lr; default: the group's ``"initial_lr"``, which
            torch schedulers record, else its lr), ``fd_above``, ``clipped_gradients`` (the optimizer
            steps with a clipped gradient, not the objective's own: finite-difference routes evaluate
            g(w) again; also an attribute, read at every step), ``linear_in_lr`` (drive an optimizer not in
            the list above whose step is linear in lr). Deprecated: ``power_iters`` / ``power_tol``
            (``sharpness_iters`` / ``sharpness_tol``), ``initial_lr`` (``reference_lr``) and
            ``lanczos_steps`` (set ``DCAO(lanczos_steps=...)``; used only while the law leaves it unset).

    Raises:
        ValueError: for an optimizer the tuner cannot drive, a law that needs what the optimizer lacks,
            or an invalid option (the message names it).

    Laws that decide momentum and weight decay (DCAO) track the first param group that has a non-zero
    value and write ``value * ratio_g`` into group g, where ``ratio_g`` is the group's setting relative
    to that group's when the tuner attaches (so a no-decay group for biases and norms stays at 0).
    Momentum is SGD/RMSprop ``momentum`` or Adam-style ``betas[0]``.

    After each step :attr:`diagnostics` holds exactly ``eos_core.diagnostics.keys_for(law)`` (see
    :mod:`eos_core.diagnostics`): NaN for a value not measured on the step; on a skipped step the
    previous step's values with ``skipped = 1``. :attr:`calls` counts the optimizer steps processed,
    skipped ones included (a trainer compares it before and after its step to tell whether the optimizer
    stepped).

    :attr:`settings` holds the options; ``probe_every``, ``sharpness_every`` and ``clipped_gradients`` are
    also attributes, settable between steps (checked when set). ``route``, ``fd_eps`` and ``fd_above`` are
    fixed when the tuner is built; ``seed`` is read when a start vector is first drawn.

    Extension point: a subclass may override :meth:`_preconditioner` (the diagonal preconditioner P of
    the preconditioned sharpness, read after the optimizer's step); it is called at most once per step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        law: Law | None = None,
        *,
        model: torch.nn.Module | None = None,
        grad_scaler: Any | None = None,
        process_group: Any | None = None,
        settings: TunerSettings | None = None,
        **options: Any,
    ) -> None:
        self.settings, lanczos_steps = _settings_from(settings, options)
        opt_info.check_supported(optimizer, linear_in_lr=self.settings.linear_in_lr)
        if law is not None and not isinstance(law, Law):
            raise ValueError(f"{_OWNER}: law must be an eos_core law (e.g. CDAT(scale=2.0)), got {law!r}")
        if optimizer in _ATTACHED:
            raise ValueError(f"{_OWNER}: this optimizer already has a CurvatureTuner attached; call .detach() on it "
                             "first (two tuners on one optimizer would both rewrite its step)")
        self.optimizer, self.law, self.model, self.grad_scaler = optimizer, law, model, grad_scaler
        self._request = _request_for(law, lanczos_steps)
        _check_law_fits(optimizer, law, self._request)
        self.reducer = Reducer(process_group)
        self.oracle = Oracle(self.settings.route, module=model, fd_eps=self.settings.fd_eps, reducer=self.reducer,
                             fd_above=self.settings.fd_above)
        self._ops = vec.TorchOps()
        self._keys = diag.keys_for(law)
        self._reference_lr = self._initial_reference_lr()
        #: per-group momentum / weight-decay proportions kept when a law (DCAO) decides them
        self._hyperparam_ratios = opt_info.hyperparam_ratios(optimizer) if law is not None and law.decides else {}
        self.law_state = None if law is None else law.init(
            self._reference_lr if self._reference_lr > 0 else float(optimizer.param_groups[0]["lr"]),
            hyperparams=opt_info.read_hyperparams(optimizer))
        self._step_count = 0
        #: optimizer steps processed, skipped ones included
        self.calls = 0
        self._skipped_steps = 0
        self._fallback_steps = 0
        self._objective_fn: Callable[[], Any] | None = None
        self._pending: PendingStep | None = None
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
        """``optimizer.zero_grad(set_to_none)``."""
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
        """The optimizer's param groups."""
        return self.optimizer.param_groups

    @property
    def lr(self) -> float:
        """The learning rate the last step applied (the first group's)."""
        return float(self.diagnostics.get("lr", self.optimizer.param_groups[0]["lr"]))

    @property
    def route(self) -> str:
        """The curvature route in use (the configured one until the first probe resolves it)."""
        return self.oracle.resolved or self.oracle.route

    @property
    def probe_every(self) -> int:
        """Probe the law every that many steps (settable; read at every step)."""
        return self.settings.probe_every

    @probe_every.setter
    def probe_every(self, value: int) -> None:
        self.settings = self.settings.replace(_OWNER, probe_every=value)

    @property
    def sharpness_every(self) -> int | None:
        """Track lambda_max every that many steps, None for never (settable; read at every step)."""
        return self.settings.sharpness_every

    @sharpness_every.setter
    def sharpness_every(self, value: int | None) -> None:
        self.settings = self.settings.replace(_OWNER, sharpness_every=value)

    @property
    def clipped_gradients(self) -> bool:
        """The optimizer steps with a clipped gradient (settable; read at every step; trainer callbacks set it)."""
        return self.settings.clipped_gradients

    @clipped_gradients.setter
    def clipped_gradients(self, value: bool) -> None:
        self.settings = self.settings.replace(_OWNER, clipped_gradients=value)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict, which carries the tuner's state under ``"eos_core"``."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``optimizer.load_state_dict``: restores the tuner's state too when the dict carries one."""
        self.optimizer.load_state_dict(state_dict)

    def load_tuner_state(self, saved: Mapping[str, Any]) -> None:
        """Restore only the tuner's part of a checkpoint (``optimizer_state_dict["eos_core"]``).

        For trainers that load the optimizer's state before the tuner can attach (the Hugging Face
        ``Trainer`` loads ``optimizer.pt`` before any callback sees the optimizer). Reads the state of
        version 2 (this release) and version 1 (the first release: the step count then included skipped
        steps, and the law state was stored as floats; integer counters are cast back).

        Args:
            saved: the state: ``version``, ``law``, ``law_state``, ``step`` and ``reference_lr`` at least;
                ``calls``, ``skipped_steps``, ``fallback_steps``, ``route``, ``exact_probes``,
                ``hyperparam_ratios``, ``eigenvector``, ``preconditioned_eigenvector``,
                ``previous_update`` and ``diagnostics`` when present.

        Raises:
            ValueError: for a state of an unknown (newer) version, of another law, lacking a required
                field, or whose vectors do not match the parameters. Nothing is changed then.
        """
        restored = self._parse_tuner_state(saved)
        for name, value in restored.items():
            if name == "route":
                if value is not None:
                    self.oracle.resolved = value
            elif name == "exact_probes":
                self.oracle.exact_probes = value
            else:
                setattr(self, name, value)

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
    # extension point
    # ---------------------------------------------------------------------------------------------
    def _preconditioner(self, pending: PendingStep) -> Vector | None:
        """The diagonal preconditioner P (tensors shaped like the parameters) after this step, or None.

        The preconditioned Hessian is ``P^{-1/2} H P^{-1/2}`` (Cohen et al. 2022, adaptive edge of
        stability); ``pending.ratios`` are the param groups' lr ratios of the step (a group with ``ratio``
        times the first group's lr has ``P / ratio``). Stable extension point: the Keras torch backend
        overrides it with the Keras optimizer's preconditioner. Called at most once per step.
        """
        return opt_info.preconditioner(self.optimizer, self._params_by_group(), pending.ratios)

    # ---------------------------------------------------------------------------------------------
    # helpers
    # ---------------------------------------------------------------------------------------------
    def _params_by_group(self) -> list[list[torch.Tensor]]:
        return [[p for p in group["params"] if p.requires_grad] for group in self.optimizer.param_groups]

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self._params_by_group() for p in group]

    def _loss_scale(self) -> float:
        scaler = self.grad_scaler
        if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            return float(scaler.get_scale())
        return 1.0

    def _initial_reference_lr(self) -> float:
        """``reference_lr``, else the first group's base lr (a scheduler created before the tuner keeps it in
        ``"initial_lr"``: a warm-up from 0 sets the group's lr to 0), else its lr."""
        if self.settings.reference_lr is not None:
            return float(self.settings.reference_lr)
        first = self.optimizer.param_groups[0]
        base = first.get("initial_lr", first["lr"])
        return float(base) if float(base) > 0 else float(first["lr"])

    def _warn(self, message: str) -> None:
        """A bad-step RuntimeWarning, unless ``warn=False``, attributed to the caller's ``step`` line."""
        if self.settings.warn is not False:
            warnings.warn(message, RuntimeWarning, stacklevel=_outside_stacklevel())

    # ---------------------------------------------------------------------------------------------
    # before the optimizer's step: check the inputs, plan
    # ---------------------------------------------------------------------------------------------
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        positional, keywords, loss, objective = self._run_closure(list(args), dict(kwargs))
        pending = PendingStep(step=self._step_count, objective=objective)
        if self._check_inputs(pending, loss):
            self._plan(pending)
            self._set_step_lr(pending)
            pending.saved = vec.clone(self._params())
        else:
            self._skip_inputs(pending)
        self._pending = pending
        return tuple(positional), keywords

    def _run_closure(self, args: list, kwargs: dict) -> tuple[list, dict, Any, Objective | None]:
        """Call the step's closure once (recording the random state) and hand the optimizer its result.

        Probes evaluate the objective given by :meth:`set_objective` when there is one (a trainer's
        closure may run hooks and logging that must not run again), else the step's own closure.
        """
        params = self._params()
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        probe_fn, self._objective_fn = self._objective_fn, None
        loss, rng = None, None
        if closure is not None:
            rng = capture_rng(params)
            with torch.enable_grad():
                loss = closure()
            probe_fn = probe_fn if probe_fn is not None else closure

            def cached() -> Any:
                return loss

            if "closure" in kwargs:
                kwargs["closure"] = cached
            else:
                args[1] = cached
        objective = None if probe_fn is None else Objective(probe_fn, params, rng_state=rng, module=self.model,
                                                            loss_scale=self._loss_scale())
        return args, kwargs, loss, objective

    def _check_inputs(self, pending: PendingStep, loss: Any) -> bool:
        """Read the loss and |g|^2 (one synchronisation); False when the step must be skipped."""
        tensor = loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None
        value, pending.grad_sq, finite = vec.step_inputs(tensor, [p.grad for p in self._params()])
        if isinstance(loss, int | float) and not isinstance(loss, bool):
            value = float(loss)
            finite = finite and math.isfinite(value)
        pending.loss = value
        return finite or not self.settings.skip_nonfinite

    def _skip_inputs(self, pending: PendingStep) -> None:
        """A non-finite loss or gradient: torch optimizers skip parameters without a gradient."""
        for p in self._params():
            p.grad = None
        pending.skipped = True
        self._warn(f"eos_core: step {pending.step} skipped: non-finite loss or gradient (parameters and optimizer "
                   f"state left unchanged; {self._skipped_steps + 1} step(s) skipped so far)")

    def _plan(self, pending: PendingStep) -> None:
        """Which measurements this step makes; the step index excludes skipped steps."""
        step, request = pending.step, self._request
        pending.probe = self.law is not None and step % self.probe_every == 0
        pending.track = self.sharpness_every is not None and step % self.sharpness_every == 0
        pending.record = request.previous_update and (step + 1) % self.probe_every == 0
        pending.instrumented = (pending.probe and bool(request.needs)) or pending.track or pending.record

    def _set_step_lr(self, pending: PendingStep) -> None:
        """The lr the optimizer steps with: ``eta_probe`` on an instrumented step, else the law's decision."""
        groups = self.optimizer.param_groups
        pending.group_lrs = [float(g["lr"]) for g in groups]
        pending.ratios = _group_ratios(groups, pending.group_lrs)
        first = pending.group_lrs[0]
        if self.settings.lr_mode == "multiply" and self._reference_lr > 0:
            pending.schedule = first / self._reference_lr
        if pending.instrumented:
            last = first if self.law is None else float(self.law_state.lr)
            pending.eta_probe = pending.step_lr = last if math.isfinite(last) and last > 0 else 1.0
        elif self.law is None:
            pending.step_lr = first
            return  # measuring only: the groups keep their own lr
        else:
            law, state = self.law, self.law_state
            pending.output = law.update(state, {}) if pending.probe else law.hold(state)
            pending.step_lr = float(pending.output.lr) * pending.schedule
        for group, ratio in zip(groups, pending.ratios, strict=True):
            group["lr"] = pending.step_lr * ratio

    # ---------------------------------------------------------------------------------------------
    # after the optimizer's step
    # ---------------------------------------------------------------------------------------------
    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        pending, self._pending = self._pending, None
        if pending is None:  # the pre-step hook did not run (hooks attached mid-step)
            return
        try:
            if pending.skipped:
                self._report_skipped(pending)
            elif self.settings.skip_nonfinite and not vec.all_finite(self._params()):
                self._undo_non_finite_update(pending)
            elif pending.instrumented:
                self._instrumented_step(pending)
            else:
                self._direct_step(pending)
        finally:
            for group, lr in zip(optimizer.param_groups, pending.group_lrs, strict=False):
                group["lr"] = lr
            self.calls += 1
            if not pending.skipped:
                self._step_count += 1

    def _undo_non_finite_update(self, pending: PendingStep) -> None:
        """The optimizer produced a NaN/Inf update from a finite gradient (e.g. Adam with ``eps=0`` where the
        second moment is 0): put the parameters back to ``w`` and report the step as skipped. The optimizer's
        moments have advanced as for any step it took."""
        with torch.no_grad():
            torch._foreach_copy_(self._params(), pending.saved)
        pending.skipped = True
        self._warn(f"eos_core: step {pending.step} skipped: the optimizer's update is not finite (the gradient "
                   f"is); parameters left unchanged ({self._skipped_steps + 1} step(s) skipped so far)")
        self._report_skipped(pending)

    def _direct_step(self, pending: PendingStep) -> None:
        """The optimizer stepped with the law's lr: |u| from the move, then adopt and report the decision."""
        params, moved = self._params(), pending.saved
        with torch.no_grad():
            torch._foreach_sub_(moved, params)  # w - (w + lr u)
        lr = pending.step_lr
        update_norm = math.sqrt(max(vec.sum_of_squares(moved), 0.0)) / lr if lr > 0 else _NAN
        pending.saved = None
        self._adopt(pending, pending.output)
        self._report(pending, pending.output, lr, self._step_values(pending, update_norm))

    def _instrumented_step(self, pending: PendingStep) -> None:
        """Probe, track and decide at ``w``, then apply the decided lr (the last good one on an error)."""
        at = self._read_update(pending)
        objective = pending.objective
        try:
            with objective.preserving_buffers() if objective is not None else contextlib.nullcontext():
                statistics = self._probe(pending, at) if pending.probe else {}
                tracked = self._track(pending, at) if pending.track else {}
            output = self._decide(pending, statistics)
        except BaseException:
            # Finish the step with the last good lr so the parameters never stay half-updated.
            self._finish_with_held_lr(pending, at)
            raise
        measured = self._step_values(pending, at.norms[1] / at.eta_probe)
        if S.LOSS in statistics:
            measured["loss"] = float(statistics[S.LOSS])  # averaged over data-parallel ranks
        measured.update(tracked)
        lr = self._apply(pending, at, output)
        self._report(pending, output, lr, measured)

    def _read_update(self, pending: PendingStep) -> _AtW:
        """``D = eta_probe * u`` from the optimizer's move; the parameters go back to ``w``."""
        params = self._params()
        delta = pending.saved  # w, then D
        with torch.no_grad():
            torch._foreach_sub_(delta, params)  # w - (w + D) = -D
            torch._foreach_neg_(delta)
            torch._foreach_sub_(params, delta)  # back to w (exact when w and w + D are within a factor 2)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        grad_dot_delta, delta_sq, weighted = vec.dots([(grads, delta), (delta, delta), (params, delta)],
                                                      absolute=(False, False, True))
        norm = math.sqrt(max(delta_sq, 0.0))
        return _AtW(params, grads, delta, pending.eta_probe, grad_dot_delta,
                    (parameter_scale_along(weighted, norm), norm))  # as vec.scale_along

    def _decide(self, pending: PendingStep, statistics: Mapping[str, Any]) -> LawOutput | None:
        """The law's decision: ``update`` on a probe, ``hold`` otherwise (None when only measuring)."""
        if self.law is None:
            return None
        if not pending.probe:
            return self.law.hold(self.law_state)
        output = self.law.update(self.law_state, statistics)
        if float(output.diagnostics["fallback"]) > 0:
            bad = [k for k, v in statistics.items() if not callable(v) and not np.all(np.isfinite(v))]
            if bad:
                self._warn(f"eos_core: step {pending.step}: non-finite {', '.join(bad)}; keeping the last good "
                           f"learning rate ({self._fallback_steps + 1} fallback(s) so far)")
        return output

    def _apply(self, pending: PendingStep, at: _AtW, output: LawOutput | None) -> float:
        """``w + eta u``; u is kept for the next probe when the law needs it. Returns the applied eta (measuring
        only: the first group's own lr, 0 included)."""
        eta = pending.group_lrs[0] if output is None else float(output.lr) * pending.schedule
        with torch.no_grad():
            torch._foreach_add_(at.params, at.delta, alpha=eta / at.eta_probe)
        if self._request.previous_update:
            self._previous_update = [d.div_(at.eta_probe) for d in at.delta]  # u, for cos(g_{t+1}, u_t)
        pending.saved = None
        self._adopt(pending, output)
        return eta

    def _finish_with_held_lr(self, pending: PendingStep, at: _AtW) -> None:
        """After an error while probing: take the step with the law's last good lr and report it."""
        output = None if self.law is None else self.law.hold(self.law_state)
        measured = self._step_values(pending, at.norms[1] / at.eta_probe)
        lr = self._apply(pending, at, output)
        self._report(pending, output, lr, measured)

    def _adopt(self, pending: PendingStep, output: LawOutput | None) -> None:
        """The law's new state and the hyperparameters it decides (DCAO) take effect."""
        if output is None:
            return
        self.law_state = output.state
        if output.hyperparams:
            opt_info.write_hyperparams(self.optimizer, {k: float(v) for k, v in output.hyperparams.items()},
                                       self._hyperparam_ratios)
        if pending.probe and float(output.diagnostics["fallback"]) > 0:
            self._fallback_steps += 1

    # ---------------------------------------------------------------------------------------------
    # probe: the statistics the law needs
    # ---------------------------------------------------------------------------------------------
    def _probe(self, pending: PendingStep, at: _AtW) -> dict[str, Any]:
        """Every statistic of ``law.request().needs``, in a fixed order (lambda_max before Lanczos)."""
        return {name: measure(self, pending, at) for name, measure in self._STATISTICS.items()
                if name in self._request.needs}

    def _require_objective(self, pending: PendingStep, what: str) -> Objective:
        if pending.objective is None:
            name = type(self.law).__name__ if self.law is not None else "sharpness tracking"
            raise RuntimeError(
                f"{name} needs {what} on the current batch: call tuner.step(closure) with a closure that "
                "computes the loss (torch convention), or tuner.set_objective(loss_fn) before optimizer.step()"
            )
        return pending.objective

    def _grad_dot_update(self, pending: PendingStep, at: _AtW) -> float:
        """g . u."""
        return at.grad_dot_delta / at.eta_probe

    def _grad_norm_sq(self, pending: PendingStep, at: _AtW) -> float:
        """|g|^2 (read with the step's inputs)."""
        return pending.grad_sq

    def _curvature(self, pending: PendingStep, at: _AtW) -> float:
        """u^T H u by the oracle; one-sided finite differences reuse g(w).u unless the gradient is clipped."""
        objective = self._require_objective(pending, "u^T H u")
        exact = None if self.clipped_gradients else at.grad_dot_delta
        curvature = self.oracle.curvature(objective, at.params, at.delta, grad_dot_u=exact, norms=at.norms)
        return curvature / at.eta_probe**2

    def _loss(self, pending: PendingStep, at: _AtW) -> float:
        """f(w), averaged over data-parallel ranks."""
        loss = pending.loss
        if loss is None:
            loss = self._require_objective(pending, "the loss").value()
        return self.reducer.mean_scalars([loss])[0]

    def _cosine(self, pending: PendingStep, at: _AtW) -> float:
        """cos(g_t, u_{t-1}); 0 on the first step."""
        previous = self._previous_update
        if previous is None:
            return 0.0
        along, previous_sq = vec.dots([(at.grads, previous), (previous, previous)])
        denominator = math.sqrt(max(pending.grad_sq * previous_sq, 0.0))
        return along / denominator if denominator > 0 else 0.0

    def _trial_loss(self, pending: PendingStep, at: _AtW) -> Callable[[Any], float]:
        """``eta -> f(w + eta u)`` for line searches."""
        objective = self._require_objective(pending, "trial losses")

        def trial_loss(eta: Any) -> float:
            with shifted(at.params, at.delta, float(eta) / at.eta_probe):
                return self.reducer.mean_scalars([objective.value()])[0]

        return trial_loss

    def _law_sharpness(self, pending: PendingStep, at: _AtW) -> float:
        """lambda_max(H) with the law's power-iteration settings."""
        return self._law_power_iteration(pending, at, preconditioned=False)

    def _law_preconditioned_sharpness(self, pending: PendingStep, at: _AtW) -> float:
        """lambda_max(P^{-1/2} H P^{-1/2}) with the law's power-iteration settings."""
        return self._law_power_iteration(pending, at, preconditioned=True)

    def _law_power_iteration(self, pending: PendingStep, at: _AtW, *, preconditioned: bool) -> float:
        request = self._request
        estimate = self._power_iteration(pending, at, preconditioned, request.power_iters, request.power_tol)
        pending.law_estimates[preconditioned] = estimate  # tracking may reuse it
        return estimate.eigenvalue

    def _top_eigenvalues(self, pending: PendingStep, at: _AtW) -> np.ndarray:
        """The top-k eigenvalues of H (Lanczos)."""
        return self._lanczos(pending, at, preconditioned=False)

    def _preconditioned_top_eigenvalues(self, pending: PendingStep, at: _AtW) -> np.ndarray:
        """The top-k eigenvalues of P^{-1/2} H P^{-1/2} (Lanczos)."""
        return self._lanczos(pending, at, preconditioned=True)

    _STATISTICS: dict[str, Callable[[CurvatureTuner, PendingStep, _AtW], Any]] = {
        S.GRAD_DOT_UPDATE: _grad_dot_update,
        S.GRAD_NORM_SQ: _grad_norm_sq,
        S.CURVATURE: _curvature,
        S.LOSS: _loss,
        S.GRAD_PREV_UPDATE_COSINE: _cosine,
        S.TRIAL_LOSS: _trial_loss,
        S.SHARPNESS: _law_sharpness,
        S.PRECONDITIONED_SHARPNESS: _law_preconditioned_sharpness,
        S.TOP_EIGENVALUES: _top_eigenvalues,
        S.PRECONDITIONED_TOP_EIGENVALUES: _preconditioned_top_eigenvalues,
    }

    # ---------------------------------------------------------------------------------------------
    # spectral estimators
    # ---------------------------------------------------------------------------------------------
    def _preconditioner_of(self, pending: PendingStep) -> Vector | None:
        """:meth:`_preconditioner`, computed once per step."""
        if pending.preconditioner is _NOT_COMPUTED:
            pending.preconditioner = self._preconditioner(pending)
        return pending.preconditioner

    def _operator(self, pending: PendingStep, at: _AtW,
                  preconditioned: bool) -> tuple[HessianOperator, Callable[[Vector], Vector]]:
        """``v -> H v`` (the context to release its graph) and the operator to iterate on."""
        objective = self._require_objective(pending, "Hessian-vector products")
        hessian = self.oracle.hessian_operator(objective, at.params,
                                               base_grad=None if self.clipped_gradients else at.grads)
        if not preconditioned:
            return hessian, hessian
        precond = self._preconditioner_of(pending)
        if precond is None:
            raise RuntimeError(f"{_OWNER}: the preconditioned Hessian needs an optimizer with a diagonal "
                               f"preconditioner, got {type(self.optimizer).__name__}")
        return hessian, preconditioned_operator(hessian, precond, ops=self._ops)

    def _random_start(self, params: Vector, seed: int) -> Vector:
        """:func:`eos_core.spectral.random_start` on the parameters' shapes, in their dtype and device."""
        arrays = random_start([tuple(p.shape) for p in params], seed)
        return [torch.from_numpy(a).to(device=p.device, dtype=p.dtype) for a, p in zip(arrays, params, strict=True)]

    def _warm_start(self, at: _AtW, preconditioned: bool) -> Vector:
        """The operator's last top eigenvector; the first time, ``random_start(seed)`` for H and
        ``random_start(seed + 1)`` for the preconditioned Hessian (the same start in every framework)."""
        vector = self._preconditioned_eigenvector if preconditioned else self._eigenvector
        if vector is None:
            vector = self._random_start(at.params, self.settings.seed + int(preconditioned))
        return vector

    def _keep_warm_start(self, preconditioned: bool, vector: Vector) -> None:
        vector = [v.detach() for v in vector]
        if preconditioned:
            self._preconditioned_eigenvector = vector
        else:
            self._eigenvector = vector

    def _power_iteration(self, pending: PendingStep, at: _AtW, preconditioned: bool, max_iters: int,
                         tol: float) -> _Estimate:
        """lambda_max of H (or of the preconditioned H) by power iteration from the warm start, which it
        updates (power iteration keeps its vector where a product is not finite)."""
        hessian, matvec = self._operator(pending, at, preconditioned)
        with hessian:
            result = power_iteration(matvec, self._warm_start(at, preconditioned), tol=tol, max_iters=max_iters,
                                     ops=self._ops)
        self._keep_warm_start(preconditioned, result.eigenvector)
        return _Estimate(float(result.eigenvalue), int(result.iterations))

    def _lanczos(self, pending: PendingStep, at: _AtW, preconditioned: bool) -> np.ndarray:
        """The top-k eigenvalues by Lanczos from the operator's warm start; a finite top Ritz vector becomes the
        warm start (of the next Lanczos, and of tracking)."""
        hessian, matvec = self._operator(pending, at, preconditioned)
        n = self._ops.size(at.params)
        k = min(self._request.num_eigenvalues, n)
        with hessian:
            try:
                result = lanczos(matvec, self._warm_start(at, preconditioned), k,
                                 num_steps=self._request.lanczos_steps_for(n), ops=self._ops)
            except np.linalg.LinAlgError:  # NaN/Inf products: the law keeps its last lr (fallback)
                return np.full(k, np.nan)
        eigenvalues = np.asarray(result.eigenvalues, dtype=np.float64)
        if np.all(np.isfinite(eigenvalues)) and vec.all_finite(result.eigenvectors[0]):
            self._keep_warm_start(preconditioned, result.eigenvectors[0])
        return eigenvalues

    # ---------------------------------------------------------------------------------------------
    # track: lambda_max every sharpness_every steps
    # ---------------------------------------------------------------------------------------------
    def _track(self, pending: PendingStep, at: _AtW) -> dict[str, float]:
        """Tracked lambda_max of H (and of the preconditioned H for adaptive optimizers), alignment, products."""
        estimate = self._tracked(pending, at, preconditioned=False)
        out = {"sharpness": estimate.eigenvalue, "power_iterations": float(estimate.iterations),
               "alignment": self._alignment(at.delta)}
        if self._preconditioner_of(pending) is not None:
            out["preconditioned_sharpness"] = self._tracked(pending, at, preconditioned=True).eigenvalue
        return out

    @property
    def _law_as_strict_as_tracking(self) -> bool:
        """The law's power iteration is at least as strict as tracking's (its estimate can be reused)."""
        request, settings = self._request, self.settings
        return (request.power_iters >= settings.sharpness_iters
                and 0 < request.power_tol <= settings.sharpness_tol)

    def _tracked(self, pending: PendingStep, at: _AtW, *, preconditioned: bool) -> _Estimate:
        """Tracking's estimate: the law's own of this step when it is at least as strict (one power
        iteration, not two), else a run with tracking's settings, warm from the law's eigenvector."""
        estimate = pending.law_estimates.get(preconditioned)
        if estimate is not None and self._law_as_strict_as_tracking:
            return estimate
        settings = self.settings
        return self._power_iteration(pending, at, preconditioned, settings.sharpness_iters, settings.sharpness_tol)

    def _alignment(self, delta: Vector) -> float:
        """|cos(u, v_max)| (NaN without an update or an eigenvector)."""
        vector = self._eigenvector
        norm = vec.norm(delta)
        if vector is None or not norm > 0:
            return _NAN
        return abs(vec.dot(delta, vector)) / (norm * vec.norm(vector))

    # ---------------------------------------------------------------------------------------------
    # report
    # ---------------------------------------------------------------------------------------------
    def _step_values(self, pending: PendingStep, update_norm: float) -> dict[str, float]:
        """The loss, |g| and |u| of a step that was not skipped."""
        return {"loss": _NAN if pending.loss is None else float(pending.loss),
                "grad_norm": math.sqrt(pending.grad_sq) if pending.grad_sq >= 0 else _NAN,
                "update_norm": float(update_norm)}

    def _values(self, step: int, output: LawOutput | None, lr: float, measured: Mapping[str, float]
                ) -> dict[str, Any]:
        """The diagnostics of a step: exactly ``keys_for(law)``, NaN where nothing was measured."""
        values: dict[str, Any] = dict.fromkeys(self._keys, _NAN)
        law_values = {} if output is None else {k: float(v) for k, v in output.diagnostics.items()}
        values.update(law_values)
        if output is not None:
            values.update({k: float(v) for k, v in output.hyperparams.items()})
        values.update(measured)
        values.update(lr=float(lr), law_lr=float(lr) if output is None else float(output.lr),
                      probed=law_values.get("probed", 0.0), fallback=law_values.get("fallback", 0.0), skipped=0.0)
        plain, preconditioned = diag.law_sharpness(self.law, law_values)
        derived = diag.derive_sharpness(np, float(lr), measured.get("sharpness", _NAN),
                                        measured.get("preconditioned_sharpness", _NAN), plain, preconditioned)
        values.update({k: float(v) for k, v in derived.items()})
        values.update(self._counters(step))
        return {key: values[key] for key in self._keys}

    def _counters(self, step: int) -> dict[str, Any]:
        return {"step": int(step), "route": self.route, "skipped_steps": self._skipped_steps,
                "fallback_steps": self._fallback_steps}

    def _report(self, pending: PendingStep, output: LawOutput | None, lr: float,
                measured: Mapping[str, float]) -> None:
        self.diagnostics = self._values(pending.step, output, lr, measured)

    def _report_skipped(self, pending: PendingStep) -> None:
        """The previous step's values with ``skipped = 1``; ``step`` is the index the next real step gets."""
        self._skipped_steps += 1
        previous = self.diagnostics or self._initial_values()
        self.diagnostics = {**previous, "skipped": 1.0, **self._counters(self._step_count)}

    def _initial_values(self) -> dict[str, Any]:
        """What a skipped first step reports: the law's initial lr, nothing measured."""
        if self.law is None:
            return self._values(0, None, float(self.optimizer.param_groups[0]["lr"]), {})
        held = self.law.hold(self.law_state)
        return self._values(0, held, float(held.lr), {})

    # ---------------------------------------------------------------------------------------------
    # checkpoints
    # ---------------------------------------------------------------------------------------------
    def _tuner_state(self) -> dict[str, Any]:
        """The tuner's state (version :data:`STATE_VERSION`): plain data and tensors, ``weights_only``-safe.

        ``version``, ``law`` (class name), ``law_state`` (``law.state_to_host``: floats, integer counters as
        int), ``step`` (steps taken, skipped ones excluded), ``calls``, ``skipped_steps``, ``fallback_steps``,
        ``route`` (resolved, or None), ``exact_probes``, ``reference_lr``, ``hyperparam_ratios``,
        ``eigenvector``, ``preconditioned_eigenvector``, ``previous_update`` (tensors or None) and
        ``diagnostics`` (the last step's).
        """
        return {
            "version": STATE_VERSION,
            "law": None if self.law is None else type(self.law).__name__,
            "law_state": None if self.law is None else self.law.state_to_host(self.law_state),
            "step": self._step_count,
            "calls": self.calls,
            "skipped_steps": self._skipped_steps,
            "fallback_steps": self._fallback_steps,
            "route": self.oracle.resolved,
            "exact_probes": self.oracle.exact_probes,
            "reference_lr": self._reference_lr,
            "hyperparam_ratios": {k: list(v) for k, v in self._hyperparam_ratios.items()},
            "eigenvector": _copy(self._eigenvector),
            "preconditioned_eigenvector": _copy(self._preconditioned_eigenvector),
            "previous_update": _copy(self._previous_update),
            "diagnostics": dict(self.diagnostics),
        }

    def _state_dict_post(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict[STATE_KEY] = self._tuner_state()
        return state_dict

    def _load_state_dict_pre(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = dict(state_dict)
        saved = state_dict.pop(STATE_KEY, None)
        if saved is not None:
            self.load_tuner_state(saved)
        return state_dict

    def _parse_tuner_state(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        """Check a saved state and convert it to the tuner's attributes (nothing is changed here)."""
        _check_state_header(saved)
        name = None if self.law is None else type(self.law).__name__
        if saved["law"] != name:
            raise ValueError(f"the checkpoint's tuner state was saved with law {saved['law']}, "
                             f"but this tuner runs {name}")
        step = int(saved["step"])
        out: dict[str, Any] = {
            "law_state": self._restored_law_state(saved["law_state"]),
            "_step_count": step,
            "calls": int(saved.get("calls", step)),  # version 1 counted every call in "step"
            "_skipped_steps": int(saved.get("skipped_steps", 0)),
            "_fallback_steps": int(saved.get("fallback_steps", 0)),
            "route": saved.get("route"),
            "exact_probes": int(saved.get("exact_probes", 0)),
            "_reference_lr": float(saved["reference_lr"]),
        }
        if saved.get("hyperparam_ratios") is not None:
            out["_hyperparam_ratios"] = {k: [float(r) for r in v] for k, v in saved["hyperparam_ratios"].items()}
        for key in ("eigenvector", "preconditioned_eigenvector", "previous_update"):
            out["_" + key] = self._restored_vector(key, saved.get(key))
        if saved.get("diagnostics") is not None:
            out["diagnostics"] = dict(saved["diagnostics"])
        return out

    def _restored_law_state(self, saved: Any) -> Any:
        if self.law is None:
            return None
        if not isinstance(saved, Mapping):
            raise ValueError(f"the checkpoint's tuner state has no law state for {type(self.law).__name__}")
        return self.law.state_from_host(self.law_state, saved)  # dtypes kept: counters stay integers

    def _restored_vector(self, key: str, saved: Any) -> Vector | None:
        if saved is None:
            return None
        params = self._params()
        shapes = [tuple(t.shape) for t in saved]
        if shapes != [tuple(p.shape) for p in params]:
            raise ValueError(f"the checkpoint's tuner state has a {key} shaped {shapes}, but the optimizer's "
                             f"parameters are shaped {[tuple(p.shape) for p in params]}")
        return [t.to(device=p.device, dtype=p.dtype) for t, p in zip(saved, params, strict=True)]


# -------------------------------------------------------------------------------------------------
# construction helpers
# -------------------------------------------------------------------------------------------------
def _settings_from(settings: TunerSettings | None, options: Mapping[str, Any]) -> tuple[TunerSettings, int | None]:
    """The validated settings (``options`` override ``settings``) and the deprecated ``lanczos_steps``."""
    options = dict(options)
    lanczos_steps = options.pop("lanczos_steps", None)
    if lanczos_steps is not None:
        lanczos_steps = check.positive_int(_OWNER, "lanczos_steps", lanczos_steps)
        warnings.warn(f"{_OWNER}: lanczos_steps= is deprecated: set it on the law, DCAO(lanczos_steps=...) (the "
                      "tuner's value is used only while the law leaves lanczos_steps unset)", DeprecationWarning,
                      stacklevel=3)
    if settings is None:
        return TunerSettings.from_options(_OWNER, options, stacklevel=4), lanczos_steps
    if not isinstance(settings, TunerSettings):
        raise ValueError(f"{_OWNER}: settings must be an eos_core.settings.TunerSettings, got {settings!r}")
    base = settings.as_dict()
    for old, new in DEPRECATED.items():
        if old in options:  # the deprecated name overrides the settings' value of the new one
            base.pop(new)
    return TunerSettings.from_options(_OWNER, {**base, **options}, stacklevel=4), lanczos_steps


def _request_for(law: Law | None, lanczos_steps: int | None) -> StatsRequest:
    """``law.request()`` (nothing for ``law=None``), with the deprecated tuner option ``lanczos_steps`` applied
    to a DCAO law that leaves its own unset."""
    if law is None:
        return StatsRequest()
    request = law.request()
    if lanczos_steps is not None and isinstance(law, DCAO) and law.lanczos_steps is None:
        request = request._replace(lanczos_steps=max(lanczos_steps, request.num_eigenvalues))
    return request


def _check_law_fits(optimizer: torch.optim.Optimizer, law: Law | None, request: StatsRequest) -> None:
    """The optimizer has what the law decides (DCAO's knobs) and what it measures (a preconditioner)."""
    if law is None:
        return
    if law.decides:
        opt_info.check_knobs(optimizer, law.decides)
    if request.needs & _PRECONDITIONED_NEEDS and not isinstance(optimizer, opt_info.PRECONDITIONED):
        raise ValueError(
            f"{_OWNER}: {type(law).__name__}(preconditioned=True) needs an adaptive optimizer with a diagonal "
            f"preconditioner (Adam, AdamW, RMSprop, Adagrad), got {type(optimizer).__name__}"
        )


def _group_ratios(groups: list[dict[str, Any]], lrs: list[float]) -> list[float]:
    """Each group's lr over the first group's; at a schedule's 0 (a warm-up's first step), the ratio of the
    groups' base lrs (``"initial_lr"``), so an instrumented step still moves every group."""
    first = lrs[0]
    if first > 0:
        return [lr / first for lr in lrs]
    bases = [float(g.get("initial_lr", lr)) for g, lr in zip(groups, lrs, strict=True)]
    return [b / bases[0] if bases[0] > 0 else 1.0 for b in bases]


def _outside_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, seen from its caller, of the first frame outside this adapter and torch:
    the line that called ``optimizer.step`` / ``tuner.step`` (or the trainer that did)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_SOURCES):
        frame, level = frame.f_back, level + 1
    return level


def _copy(vector: Vector | None) -> list[torch.Tensor] | None:
    return None if vector is None else [t.detach().clone() for t in vector]


def _check_state_header(saved: Any) -> None:
    """A saved tuner state this release can read: a mapping with the required fields and a known version."""
    if not isinstance(saved, Mapping):
        raise ValueError(f"the checkpoint's tuner state must be a dict, got {type(saved).__name__}")
    missing = [key for key in REQUIRED_STATE_FIELDS if key not in saved]
    if missing:
        raise ValueError(f"the checkpoint's tuner state lacks {missing} (a state saved by {_OWNER} has "
                         f"{list(REQUIRED_STATE_FIELDS)})")
    version = saved["version"]
    if isinstance(version, bool) or not isinstance(version, int | np.integer) or version < 1:
        raise ValueError(f"the checkpoint's tuner state has an invalid version {version!r}")
    if version > STATE_VERSION:
        raise ValueError(f"the checkpoint's tuner state has version {version}, newer than this eos_core reads "
                         f"(versions 1 to {STATE_VERSION}): it was saved by a newer eos_core; upgrade to load it")
