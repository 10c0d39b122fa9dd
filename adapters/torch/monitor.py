"""The PyTorch tuner's sharpness monitor (`monitor_budget`): streaming lambda_max within a share of training time.

Each *tick* applies the Hessian (and, for an optimizer with a diagonal preconditioner, `P^{-1/2} H P^{-1/2}`) once
to the newest Lanczos vector of a warm-started restarted-Lanczos tracker ([`eos_core.spectral.tracking`][]), so the
estimate follows the Hessian across training steps; between ticks the last estimate is reported with its age.
The rules (edge, budget, which product, warning) are the core's, shared with the other adapters:
[`eos_core.monitor`][].

* **Where a tick runs.** In the optimizer's step *pre*-hook, after the tuner has read the step's gradient and
  copied the parameters `w` (its copy of `w` for `|u|`; measuring only, in one process, it copies `w` just on the
  steps that tick or measure, [`plan`][eos_core.adapters.torch.monitor.Monitor.plan] deciding first): there `w` and
  `g(w)` (`.grad`, averaged by DDP, reduce-scattered by FSDP2) are at hand, so the one-sided finite difference
  `(g(w + h v) - g(w)) / h` costs one gradient; the parameters are moved to `w + h v` in place and copied back
  from the tuner's copy, bit for bit, without a copy of their own. With a clipped gradient
  (`clipped_gradients`) `g(w)` is evaluated again. `P` is the optimizer's preconditioner as the previous step
  left it (a step's own `P` exists only after the step); the preconditioned tracker starts cold on step
  [`GRACE_STEPS`][eos_core.monitor.GRACE_STEPS], the first whose readings count for the warning
  ([`cold_start_due`][eos_core.monitor.cold_start_due]). A tick whose reading is stale (a relative residual above
  [`STALE_RESIDUAL`][eos_core.monitor.STALE_RESIDUAL], [`is_stale`][eos_core.monitor.is_stale]) completes a
  Lanczos cycle on the step's operator, charged to the budget.
* **Which product.** One-sided finite differences, checked against the exact product (double backward, with the
  math SDPA kernel if need be) at the 1st, 10th, 100th, ... tick; they are used until the next check only when
  they agree to [`CHECK_TOLERANCE`][eos_core.monitor.CHECK_TOLERANCE] (ReLU networks keep the exact product).
  Sharded parameters (FSDP2) always use finite differences (no exact route runs there); so does a model the exact
  route cannot differentiate.
* **When.** [`MonitorBudget`][eos_core.spectral.tracking.MonitorBudget] measures `t_step` (the interval between
  optimizer steps, monitoring excluded; not the first after a start or a resume), `t_product` and, measuring
  only, the tuner's own per-step work in its hooks (`t_overhead`, [`record_overhead`][
  eos_core.adapters.torch.monitor.Monitor.record_overhead]); a credit of
  `share * t_step` per step pays for products ([`product_share`][eos_core.monitor.product_share]: 90% of the budget
  less the bookkeeping, at least 40% of it; [`wants_tick`][eos_core.monitor.wants_tick]), so products come every
  `k = ceil(t_product / (share t_step))` steps on average. On CUDA each tick synchronises the device before and
  after, to time it.
* **Saved state.** The trackers (Lanczos basis, tridiagonal entries, counters), the times, the credit and the
  warning's state travel in the optimizer's state dict with the rest of the tuner's state.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from eos_core import monitor as rules
from eos_core import routes
from eos_core.adapters.torch import vector_ops as vec
from eos_core.adapters.torch.checkpoint import MONITOR_VECTORS
from eos_core.adapters.torch.oracles import Oracle, is_route_unavailable
from eos_core.adapters.torch.sharding import ParameterSpace
from eos_core.numerics import PYTHON_SCALARS as scalars
from eos_core.routes import finite_difference_step
from eos_core.settings import TunerSettings
from eos_core.spectral import preconditioned_operator
from eos_core.spectral.tracking import (
    MonitorBudget,
    TrackerState,
    tracker_age,
    tracker_init,
    tracker_refocused,
    tracker_restarted,
    tracker_step,
)

Vector = list[torch.Tensor]
#: Lanczos vectors per tracker ([`eos_core.monitor.TRACKER_RESTART`][])
RESTART = rules.TRACKER_RESTART
#: The two trackers: lambda_max of H, of P^{-1/2} H P^{-1/2}
OPERATORS = ("", "preconditioned_")
#: Names of the saved basis vectors (`<operator>monitor_basis_<i>`): the checkpoint layout's
VECTORS = MONITOR_VECTORS
_NAN = math.nan


def missing_basis(prefix: str, entry: Mapping[str, Any], vectors: Mapping[str, Any]) -> bool:
    """Whether a saved tracker (`entry`, one of the monitor state's `trackers`) lacks any of its basis vectors.

    A tracker saved with `m` Lanczos vectors (`len(entry["alpha"])`: `RESTART`, or 2 in a version-4 checkpoint)
    needs `<prefix>monitor_basis_0` to `<prefix>monitor_basis_<m-1>` in `vectors`; fewer than 2 is never valid.

    Returns:
        True when the entry has fewer than 2 Lanczos coefficients or a vector it needs is None or absent.
    """
    size = len(entry.get("alpha", ()))
    return size < 2 or any(vectors.get(f"{prefix}monitor_basis_{i}") is None for i in range(size))


def now() -> float:
    """The monitor's clock (`time.perf_counter`), read by the tuner too to time its own per-step work."""
    return time.perf_counter()


class Monitor:
    """The sharpness monitor of one [`CurvatureTuner`][eos_core.adapters.torch.CurvatureTuner] (see the module).

    The tuner calls `start_step`, `plan` and (on a step `plan` chose) `tick` in its pre-step hook,
    `record_overhead` (measuring only) and `warn_update` when it reports a step, and `state_dict`, `vectors` and
    `load` with its checkpoints.

    Args:
        settings: the tuner's settings (`monitor_budget` is not None).
        space: the parameters' space.
        oracle: the tuner's oracle (its machine epsilon for finite differences, its gradient through FSDP).
        model: the model (the exact route's SDPA retry, buffers).
    """

    def __init__(self, settings: TunerSettings, space: ParameterSpace, oracle: Oracle,
                 model: torch.nn.Module | None) -> None:
        self.settings = settings
        self.space = space
        self.oracle = oracle
        self.ops = vec.TorchOps(space=space if space.sharded else None)
        #: the times the schedule uses: the same on every rank (set at ticks from the ranks' mean)
        self.budget = MonitorBudget(float(settings.monitor_budget))
        #: this rank's own step times (EMA), averaged over the ranks into `budget` at each tick
        self.local = MonitorBudget(float(settings.monitor_budget))
        self.exact_oracle = None if space.sharded else Oracle(routes.DOUBLE_BACKWARD, module=model, space=space,
                                                              fd_eps=settings.fd_eps, fd_above=None)
        self.trackers: list[TrackerState | None] = [None, None]
        self.credit = 0.0
        self.ticks = 0  #: ticks so far
        self.step = 0  #: the step `plan` was last called for
        self.exact = False  #: the products are exact (finite differences disagreed at the last check)
        self.exact_available = not space.sharded  #: an exact product can be computed
        self.check: tuple[float, float] | None = None  #: (||Hv_fd - Hv_exact||, ||Hv_exact||) of the last check
        self.streak = 0
        self.unstable = False
        self.seen = False  #: a fresh lr x sharpness was measured
        self.latest = _NAN  #: the latest lr x sharpness the warning looked at (this step's lr, fresh or not)
        self.ticked = (False, False)  #: each tracker applied its operator on this step
        #: each tracker's reading of this step is a Ritz value of this step's operator alone
        #: ([`eos_core.monitor.conclusive`][])
        self.conclusive = (False, False)
        self.checking = False  #: the current tick compares finite differences with the exact product
        self.edge = _NAN  #: the edge the warning compared with on the last step
        #: the quotient along this step's update (`along_update`; NaN when not measured on this step)
        self.quotient = _NAN
        self.missing_objective_warned = False
        self.eps = float(torch.finfo(torch.float32).eps)  #: machine epsilon of this tick's finite differences
        self._last_start: float | None = None
        self._untimed = 1  #: intervals still to leave untimed after a (re)start
        self._spent = 0.0
        #: per tracker, (products, eigenvalue, relative residual) of its latest reading
        self._readings: list[tuple[int, float, float] | None] = [None, None]

    # -- scheduling ----------------------------------------------------------------------------------------
    def start_step(self) -> None:
        """Record a step time, at the pre-step hook of every step: the interval since the last one minus monitoring.

        The first interval of a run, and of a resumed run, is not recorded: it holds one-off work (the finite
        differences' machine-epsilon estimates, lazy initialisations) and a resumed run cannot measure the interval
        that spans the checkpoint, so the two runs would time different steps.
        """
        now = time.perf_counter()
        if self._last_start is None:  # the first step (of the run, or since a resume): its interval is not timed
            self._untimed = 1
        elif self._untimed:
            self._untimed -= 1
        else:
            self.local.record_step(now - self._last_start - self._spent)
        self._last_start, self._spent = now, 0.0
        self.ticked = self.conclusive = (False, False)
        self.quotient = _NAN

    def tick_cost(self, operators: int) -> float:
        """The cost of a tick in training steps.

        Args:
            operators: the number of operators the tick applies (1, or 2 with the preconditioned Hessian).

        Returns:
            `operators` times the cost of one product: measured, or before the first measurements the core's cost
            model ([`COST_MODEL`][eos_core.monitor.COST_MODEL]: 1.1 steps for finite differences, 2.5 for the exact
            product).
        """
        cost = self.budget.cost
        if cost is None:
            cost = rules.COST_MODEL["exact" if self.exact else "fd"]
        return operators * cost

    @property
    def every(self) -> float:
        """`k`, the steady-state spacing of ticks in steps.

        Returns:
            [`every`][eos_core.monitor.every] of the tick's cost and the budget left for products.
        """
        return float(rules.every(self.tick_cost(self._operators_in_use()), self.budget.share))

    def _operators_in_use(self) -> int:
        return 1 + int(self.trackers[1] is not None)

    def danger(self) -> bool:
        """Whether the latest lr x sharpness is beyond the warning threshold and the warning has not fired yet.

        Returns:
            True when the latest lr x sharpness and the edge are finite, the value exceeds
            `edge * (1 + monitor_margin)` ([`threshold`][eos_core.monitor.threshold]) and the monitor is not
            already unstable: the monitor then ticks at every step, in debt if need be.
        """
        edge = self.edge
        return (not self.unstable and math.isfinite(self.latest) and math.isfinite(edge)
                and self.latest > rules.threshold(edge, self.settings.monitor_margin))

    def plan(self, *, wants_preconditioned: bool, step: int) -> bool:
        """Advance the trackers' ages and the credit; whether this step ticks (decided before the tuner copies `w`).

        Args:
            wants_preconditioned: the optimizer has a diagonal preconditioner (a second tracker).
            step: the step's index (skipped steps not counted): the preconditioned tracker starts on step
                [`GRACE_STEPS`][eos_core.monitor.GRACE_STEPS] ([`cold_start_due`][eos_core.monitor.cold_start_due]).

        Returns:
            True when the credit (or the cold start, or danger) calls for a tick on this step: the tuner then copies
            `w` and calls [`tick`][eos_core.adapters.torch.monitor.Monitor.tick].
        """
        for i, state in enumerate(self.trackers):
            if state is not None and int(state.products) > 0:
                self.trackers[i] = tracker_age(state)
        cost = self.tick_cost(1 + int(wants_preconditioned))
        self.credit = float(rules.accrue(scalars, self.credit, self.budget.share, cost))
        self.step = step
        hessian, preconditioned = (0 if t is None else int(t.products) for t in self.trackers)
        cold = rules.cold_start_due(scalars, hessian, preconditioned if wants_preconditioned else None, step)
        return bool(rules.wants_tick(scalars, self.credit, cost, cold=cold, danger=self.danger()))

    def tick(self, *, objective: Any, saved: Vector, clipped: bool, seed: int,
             preconditioner: Callable[[], Vector | None], wants_preconditioned: bool) -> float:
        """Apply the trackers' operators at `w` (before the optimizer's step), on a step `plan` chose.

        Without an objective the monitor warns once (RuntimeWarning) and skips the tick.

        Args:
            objective: the step's objective (None: no tick is possible on this step).
            saved: the tuner's copy of `w` (the parameters are restored from it after each finite difference).
            clipped: the step's `.grad` is clipped: finite differences evaluate `g(w)` again.
            seed: the start vectors' seed (`seed` for H, `seed + 1` for the preconditioned Hessian).
            preconditioner: P as the optimizer's state holds it now (local tensors), or None.
            wants_preconditioned: the optimizer has a diagonal preconditioner (a second tracker).

        Returns:
            The tick's wall time in seconds (charged to the budget here; 0 for a skipped tick).
        """
        if objective is None:
            if not self.missing_objective_warned:
                self.missing_objective_warned = True
                warnings.warn("eos_core: the sharpness monitor (monitor_budget) needs the loss on the batch: call "
                              "tuner.step(closure) or tuner.set_objective(loss_fn) before each step; no sharpness is "
                              "measured meanwhile", RuntimeWarning, stacklevel=4)
            return 0.0
        before = time.perf_counter()
        with objective.preserving_buffers():  # may evaluate the loss once (not a product): BatchNorm stays put
            self.eps = self.oracle._eps(self.space.local(), objective)
        synchronize = any(t.is_cuda for t in saved)
        if synchronize:
            torch.cuda.synchronize()
        start = time.perf_counter()
        products, free = self._tick(objective, saved, clipped, seed, preconditioner if wants_preconditioned else None)
        if synchronize:
            torch.cuda.synchronize()
        end = time.perf_counter()
        self._spent += end - before
        self._account(end - start, products, free)  # the machine epsilon is estimated once: not charged
        self.ticks += 1
        return end - before

    def record_overhead(self, seconds: float) -> None:
        """The tuner's own work for this step outside the closure and the tick (its hooks), timed by the tuner.

        It is left out of the step time and charged to the budget ([`product_share`][eos_core.monitor.product_share]).
        """
        if seconds >= 0:
            self.local.record_overhead(seconds)
            self._spent += seconds

    def _account(self, seconds: float, products: int, free: int) -> None:
        """Charge a tick to the credit and update the times the schedule uses.

        From the mean over the data-parallel ranks (one all-reduce of four numbers, at a tick, which every rank
        takes together): every rank then takes the same decisions from the same numbers.

        Args:
            seconds: the products' time.
            products: the products made.
            free: how many of them were a cold start's (not charged).
        """
        local_step = self.local.step_time if self.local.step_time is not None else _NAN
        local_overhead = self.local.overhead_time if self.local.overhead_time is not None else _NAN
        step_time, seconds, products, overhead = self.space.mean_loss(
            [local_step, seconds, float(products), local_overhead])
        if math.isfinite(step_time) and step_time > 0:
            self.budget.step_time = step_time
        if math.isfinite(overhead):
            self.budget.overhead_time = overhead
        if products and not self.checking:  # a check tick also computes the other product: not a cost sample
            self.budget.record_product(seconds / products)
        charged = (products - free) / products if products else 0.0  # a tracker's cold start is a one-off cost
        if self.budget.step_time:
            self.credit -= charged * seconds / self.budget.step_time
        else:
            self.credit -= charged * products * self.tick_cost(1)

    # -- one tick ------------------------------------------------------------------------------------------
    def _tick(self, objective: Any, saved: Vector, clipped: bool, seed: int,
              preconditioner: Callable[[], Vector | None] | None) -> tuple[int, int]:
        """Apply each tracker's operator at `w` (a cold tracker: several times).

        Returns:
            `(made, free)`: the products made, checks included, and how many of them were a tracker's cold start
            beyond its first product (not charged to the budget).
        """
        params = self.space.local()
        base = None if clipped else [g if g is not None else torch.zeros_like(p)
                                     for g, p in zip(self.space.grads(), params, strict=True)]
        products = free = 0
        exact_operator = None
        # the preconditioned tracker from step GRACE_STEPS on (its cold start there: `plan`)
        starts = preconditioner is not None and bool(rules.tracks_preconditioned(scalars, self.step))
        precond = preconditioner() if starts else None
        if precond is not None and not any(bool(torch.isfinite(p).any()) for p in precond):
            precond = None  # no optimizer state yet: nothing to precondition with
        check = self.checking = self.exact_available and bool(rules.is_check(scalars, self.ticks + 1))
        try:
            with objective.preserving_buffers():
                if base is None:
                    base = self.space.mean_measured_tensors(self.oracle.gradient(objective, params))

                def fd(v: Vector) -> Vector:
                    return self._finite_difference(objective, params, saved, base, v)

                def exact(v: Vector) -> Vector:
                    nonlocal exact_operator
                    if exact_operator is None:
                        exact_operator = self.exact_oracle.hessian_operator(objective, params)
                    return list(exact_operator(v))

                def hessian(v: Vector) -> Vector:
                    nonlocal products, check
                    products += 1
                    v = [x.to(p.dtype) for x, p in zip(v, params, strict=True)]
                    if check:
                        check = False
                        return self._checked(fd, exact, v)
                    out = exact(v) if self.exact else fd(v)
                    return [x.to(torch.promote_types(x.dtype, torch.float32)) for x in out]

                for index, p in enumerate((None, precond)):
                    if index == 1 and p is None:
                        continue
                    operator = hessian if p is None else preconditioned_operator(
                        hessian, [t.to(torch.promote_types(t.dtype, torch.float32)) for t in p], ops=self.ops)
                    free += self._advance(index, operator, params, seed)[1]
                    self.ticked = (True, self.ticked[1]) if index == 0 else (self.ticked[0], True)
        finally:
            if exact_operator is not None:
                exact_operator.release()
        return products, free

    def _advance(self, index: int, operator: Callable[[Vector], Vector], params: Vector, seed: int) -> tuple[int, int]:
        """Advance tracker `index` by one product (a cold tracker: until its residual is small).

        A cold tracker converges from its random start
        ([`continues_cold_start`][eos_core.monitor.continues_cold_start]). A warm tracker whose reading is stale after
        the product ([`is_stale`][eos_core.monitor.is_stale]) completes a cycle on this step's operator (charged).
        While the monitor confirms a crossing (`danger`), a cycle ends after two products
        ([`tracker_refocused`][eos_core.spectral.tracking.tracker_refocused]).

        Returns:
            `(made, free)`: the products made, and how many of them were a cold start's beyond its first (not charged
            to the budget).
        """
        state = self.trackers[index]
        if state is None:
            like = [p.detach().to(torch.promote_types(p.dtype, torch.float32)) for p in params]
            state = tracker_init(self.space.random_start(seed + index, like), restart=RESTART, ops=self.ops)
        elif self.danger():  # confirming a crossing: this tick's reading proves it (a lower bound) or not
            state = tracker_refocused(state, ops=self.ops)
        cold = int(state.products) == 0
        state = tracker_step(state, operator, ops=self.ops)
        made = 1
        stale = not cold and bool(rules.is_stale(scalars, float(state.residual), float(state.eigenvalue)))
        if stale:  # a cycle on this step's operator, from the best vector when the cycle holds older products
            state = tracker_refocused(state, ops=self.ops)
        while rules.continues_tick(scalars, made, int(state.position), float(state.residual), float(state.eigenvalue),
                                   RESTART, cold=cold, stale=stale):
            state, made = tracker_step(state, operator, ops=self.ops), made + 1
        self.trackers[index] = state
        alone = bool(rules.conclusive(scalars, made, int(state.position), RESTART))
        self.conclusive = (alone, self.conclusive[1]) if index == 0 else (self.conclusive[0], alone)
        return made, made - 1 if cold else 0

    def _finite_difference(self, objective: Any, params: Vector, saved: Vector, base: Vector, v: Vector) -> Vector:
        """`(g(w + h v) - g(w)) / h`; the parameters go back to `w` (the tuner's copy) bit for bit."""
        space = self.space
        h = finite_difference_step(*space.scale_along(params, v), self.eps, central=False)
        if h == 0.0:
            return [torch.zeros_like(p) for p in params]
        try:
            with torch.no_grad():
                torch._foreach_add_(params, v, alpha=h)
            plus = space.mean_measured_tensors(self.oracle.gradient(objective, params))
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
        return list(torch._foreach_div(torch._foreach_sub(plus, list(base)), h))

    def _checked(self, fd: Callable[[Vector], Vector], exact: Callable[[Vector], Vector], v: Vector) -> Vector:
        """Both products of `v`; finite differences are kept when they agree with the exact product."""
        approximate = fd(v)
        reference = self._exact_or_none(exact, v)
        if reference is None:
            return approximate
        difference = self.space.norm(list(torch._foreach_sub(approximate, reference)))
        size = self.space.norm(reference)
        self.check = (float(difference), float(size))
        before, self.exact = self.exact, not bool(rules.finite_differences_agree(scalars, difference, size))
        if self.exact != before:
            self.budget.reset_product()  # the other product's cost is measured from the next tick on
        chosen = reference if self.exact else approximate
        return [x.to(torch.promote_types(x.dtype, torch.float32)) for x in chosen]

    # -- the first step of an adaptive optimizer ---------------------------------------------------------------
    def along_update(self, *, objective: Any, params: Vector, grads: Vector, delta: Vector, clipped: bool,
                     saved: Vector | None = None) -> tuple[float, float, float]:
        """One product along the step's update, at `w` ([`update_quotient`][eos_core.monitor.update_quotient]).

        Called after the optimizer's step was read off (the parameters back at `w`, `g(w)` in `.grad`), on the
        steps [`watches_update`][eos_core.monitor.watches_update] selects. The product is the exact one when it can
        be computed (made once per run; finite differences are inaccurate on ReLU networks), else the one-sided
        finite difference, as in the JAX adapter. Its time is left out of the step time and is not charged to the
        credit: like the cold start, a one-off cost (one product per step of
        [`UPDATE_STEPS`][eos_core.monitor.UPDATE_STEPS]).

        Args:
            objective: the step's objective.
            params: the parameters, at `w`.
            grads: `g(w)` as the optimizer read it.
            delta: the step's move `D` (any positive multiple of the update).
            clipped: `grads` are clipped: the slope uses `g(w)` evaluated again.
            saved: a copy of `w` the finite difference may restore the parameters from (None: it copies them).

        Returns:
            `(curvature, descent, norm)`: `v^T H v` and `-g^T v` for `v = D / |D|`, and `|D|`; NaNs when `D` is 0 or
            not finite.
        """
        before = time.perf_counter()
        norm = self.space.norm(delta)
        if not (math.isfinite(norm) and norm > 0):
            return _NAN, _NAN, norm
        v = [(d.to(torch.promote_types(d.dtype, torch.float32)) / norm).to(p.dtype)
             for d, p in zip(delta, params, strict=True)]
        operator = None

        def exact(x: Vector) -> Vector:
            nonlocal operator
            operator = self.exact_oracle.hessian_operator(objective, params)
            return list(operator(x))

        try:
            with objective.preserving_buffers():
                base = grads if not clipped else self.space.mean_measured_tensors(self.oracle.gradient(objective,
                                                                                                       params))
                product = self._exact_or_none(exact, v) if self.exact_available else None
                if product is None:
                    product = self._finite_difference(objective, params, saved if saved is not None
                                                      else vec.clone(params), base, v)
        finally:
            if operator is not None:
                operator.release()
        curvature, slope = self.space.dots([(v, product), (base, v)])
        self._spent += time.perf_counter() - before
        return float(curvature), -float(slope), norm

    def warn_along_update(self, *, value: float, step: int, warn: bool, stacklevel: int = 4) -> bool:
        """The early warning on the quotient along the update (finite: measured on this step).

        Above [`threshold`][eos_core.monitor.threshold]`(UPDATE_EDGE, monitor_margin)` it warns at once (`certain`):
        it measures this step's own update on this step's Hessian. Below, the episode ends, as with any fresh
        measurement.

        Args:
            value: the quotient (NaN: not measured, nothing changes).
            step: the step index, for the warning's message.
            warn: raise the RuntimeWarning (False: only the state changes).
            stacklevel: `warnings.warn`'s stacklevel.

        Returns:
            Whether the monitor is unstable after it.
        """
        self.quotient = value
        if not math.isfinite(value):
            return self.unstable
        self.seen = True
        limit = rules.threshold(rules.UPDATE_EDGE, self.settings.monitor_margin)
        streak, now, fired = rules.warning_update(scalars, self.streak, int(self.unstable), True, value, limit,
                                                  self.settings.monitor_patience, True)
        self.streak, self.unstable = int(streak), bool(now)
        if bool(fired) and warn:
            warnings.warn(rules.update_warning_message(value, self.settings.monitor_margin, step), RuntimeWarning,
                          stacklevel=stacklevel)
        return self.unstable

    def _exact_or_none(self, exact: Callable[[Vector], Vector], v: Vector) -> Vector | None:
        """`exact(v)`, or None when the exact route cannot run on this model (finite differences from then on)."""
        try:
            return exact(v)
        except Exception as error:
            if not is_route_unavailable(error):
                raise
            self.exact_available, self.exact = False, False
            return None

    # -- report --------------------------------------------------------------------------------------------
    def reading(self, index: int) -> tuple[float, float, float, bool]:
        """The current estimate of one tracker.

        Args:
            index: 0 for lambda_max of H, 1 for lambda_max of `P^{-1/2} H P^{-1/2}`.

        Returns:
            `(eigenvalue, relative residual, age, fresh)`: the estimate, its relative residual
            ([`relative_residual`][eos_core.monitor.relative_residual]), the steps since its last product, and
            whether the tracker applied its operator on this step; `(NaN, NaN, NaN, False)` before its first
            product.
        """
        state = self.trackers[index]
        if state is None or int(state.products) == 0:
            return _NAN, _NAN, _NAN, False
        products = int(state.products)
        cached = self._readings[index]
        if cached is None or cached[0] != products:  # the estimate changes only with a product
            value = float(state.eigenvalue)
            cached = self._readings[index] = (products, value,
                                              float(rules.relative_residual(scalars, float(state.residual), value)))
        return cached[1], cached[2], float(state.age), bool(self.ticked[index])

    def warn_update(self, *, fresh: bool, value: float, edge: float, step: int, what: str, warn: bool,
                    counted: bool | None = None, certain: bool = False) -> bool:
        """Apply the early-warning rule to this step's watched lr x sharpness.

        The rule is [`warning_update`][eos_core.monitor.warning_update]: `monitor_patience` consecutive counted
        measurements above `edge * (1 + monitor_margin)`, or one `certain` one, make the monitor unstable and raise
        one RuntimeWarning per episode (when `warn`).

        Args:
            fresh: a new measurement was made on this step.
            value: the watched lr x sharpness (NaN when unknown).
            edge: the optimizer's edge of stability (NaN: unknown, the rule is not applied).
            step: the step index, for the warning's message.
            what: the watched diagnostic's name (`lr_sharpness` or `preconditioned_lr_sharpness`), for the warning's
                message.
            warn: raise the RuntimeWarning (False: only the state changes).
            counted: the measurement enters the warning
                ([`counts_for_warning`][eos_core.monitor.counts_for_warning]; default: `fresh`).
            certain: the measurement is a reading of this step's operator alone (`conclusive`): above the
                threshold it warns at once.

        Returns:
            Whether the monitor is unstable after this step (False when the edge is not finite).
        """
        counted = fresh if counted is None else counted
        self.edge = edge
        if math.isfinite(value):
            self.latest = value
            self.seen = self.seen or bool(fresh)
        if not math.isfinite(edge):
            return False
        limit = rules.threshold(edge, self.settings.monitor_margin)
        streak, now, fired = rules.warning_update(scalars, self.streak, int(self.unstable), bool(counted), value,
                                                  limit, self.settings.monitor_patience, bool(certain))
        self.streak, self.unstable = int(streak), bool(now)
        if bool(fired) and warn:
            name = what.replace("_", " ").replace("lr ", "lr x ")  # lr_sharpness -> "lr x sharpness"
            warnings.warn(rules.warning_message(value, edge, self.settings.monitor_margin,
                                                self.settings.monitor_patience, step, name), RuntimeWarning,
                          stacklevel=4)
        return self.unstable

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every scalar of the monitor, for the tuner's checkpoint.

        Returns:
            A JSON-friendly dict: each tracker's tridiagonal entries and counters (None for a tracker not started),
            the step and product times, the credit, the tick count, the product choice and the warning's state.
            The basis vectors come from `vectors`.
        """
        trackers = []
        for state in self.trackers:
            if state is None:
                trackers.append(None)
                continue
            trackers.append({"alpha": [float(x) for x in np.asarray(state.alpha)],
                             "beta": [float(x) for x in np.asarray(state.beta)],
                             "position": int(state.position), "eigenvalue": float(state.eigenvalue),
                             "residual": float(state.residual), "products": int(state.products),
                             "age": int(state.age)})
        return {"trackers": trackers, "budget": self.budget.state_dict(), "local": self.local.state_dict(),
                "credit": self.credit,
                "ticks": self.ticks, "exact": self.exact, "exact_available": self.exact_available,
                "check": None if self.check is None else list(self.check),
                "streak": self.streak, "unstable": self.unstable, "seen": self.seen, "latest": self.latest,
                "edge": self.edge}

    def vectors(self) -> dict[str, Vector | None]:
        """The trackers' basis vectors by name, for the tuner's checkpoint.

        Returns:
            `{name: vector}` for each name of `VECTORS`: basis vector `i` of a tracker as local tensors shaped like
            the parameters; None for a tracker not started.
        """
        out: dict[str, Vector | None] = {}
        for op, state in zip(OPERATORS, self.trackers, strict=True):
            for i in range(RESTART):
                out[f"{op}monitor_basis_{i}"] = None if state is None else [b[i] for b in state.basis]
        return out

    def load(self, saved: Mapping[str, Any], vectors: Mapping[str, Vector | None]) -> None:
        """Restore what `state_dict` and `vectors` returned.

        Args:
            saved: the scalars (`state_dict`'s dict; missing entries take their initial values).
            vectors: the basis vectors by name, as local tensors.

        Raises:
            ValueError: a tracker whose basis vectors are missing.
        """
        trackers: list[TrackerState | None] = []
        for op, entry in zip(OPERATORS, saved.get("trackers", [None, None]), strict=True):
            if entry is None:
                trackers.append(None)
                continue
            if missing_basis(op, entry, vectors):
                raise ValueError(f"the checkpoint's tuner state has a {op or 'plain '}monitor tracker without its "
                                 "basis vectors")
            size = len(entry["alpha"])  # RESTART, or 2 in a version-4 checkpoint
            parts = [vectors[f"{op}monitor_basis_{i}"] for i in range(size)]
            basis = [torch.stack(list(column)) for column in zip(*parts, strict=True)]
            state = TrackerState(
                basis=basis, alpha=np.asarray(entry["alpha"], dtype=np.float64),
                beta=np.asarray(entry["beta"], dtype=np.float64), position=np.int64(entry["position"]),
                eigenvalue=np.float64(entry["eigenvalue"]), residual=np.float64(entry["residual"]),
                products=np.int64(entry["products"]), age=np.int64(entry["age"]))
            trackers.append(state if size == RESTART else tracker_restarted(state, RESTART, ops=self.ops))
        self.trackers = trackers
        self._readings = [None, None]
        self.budget.load_state_dict(saved.get("budget", {}))
        self.local.load_state_dict(saved.get("local", {}))
        self.credit = float(saved.get("credit", 0.0))
        self.ticks = int(saved.get("ticks", 0))
        self.exact = bool(saved.get("exact", False))
        self.exact_available = bool(saved.get("exact_available", not self.space.sharded)) and not self.space.sharded
        check = saved.get("check")
        self.check = None if check is None else (float(check[0]), float(check[1]))
        self.streak = int(saved.get("streak", 0))
        self.unstable = bool(saved.get("unstable", False))
        self.seen = bool(saved.get("seen", False))
        self.latest = float(saved.get("latest", _NAN))
        self.edge = float(saved.get("edge", _NAN))
        self._last_start, self._spent = None, 0.0
