"""The statistics a law consumes, measured at `w` on an instrumented step, and lambda_max tracking.

`Probes` measures exactly the names of `law.request().needs` ([`eos_core.stats`][]), in a fixed
order (lambda_max before Lanczos, so Lanczos starts from this step's power-iteration vector):

* `grad_dot_update` g.u and `grad_norm_sq` |g|^2 from the step's own gradient (no extra pass);
* `curvature` u^T H u by the oracle's route (one-sided finite differences reuse g(w).u unless the
  optimizer stepped with a clipped gradient);
* `loss` f(w) and `trial_loss` eta -> f(w + eta u), averaged over data-parallel ranks;
* `grad_prev_update_cosine` cos(g_t, u_{t-1}); `grad_dot_previous_update` g_t.u_{t-1},
  `previous_update_curvature` u_{t-1}^T H_t u_{t-1} (the oracle's route, at `w_t`) and `previous_lr`
  (CDAT's previous-update numerator), u_{t-1} being the update of the last step taken, for lr 1;
* `sharpness` / `preconditioned_sharpness` by power iteration, `top_eigenvalues` /
  `preconditioned_top_eigenvalues` by Lanczos (`eos_core.adapters.torch.spectral_estimates.SpectralEstimates`).

Tracking (`sharpness_every`) reports lambda_max of H (and of the preconditioned H for adaptive
optimizers), the alignment |cos(u, v_max)| and the products used; when the law measured lambda_max on the
same step with settings at least as strict, its estimate is reused (one power iteration, not two).
Every inner product is over all shards of sharded parameters (the parameters' `ParameterSpace`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from eos_core import stats as S
from eos_core.adapters.torch.objective import shifted
from eos_core.adapters.torch.oracles import Oracle
from eos_core.adapters.torch.sharding import ParameterSpace
from eos_core.adapters.torch.spectral_estimates import SpectralEstimates
from eos_core.adapters.torch.step import Estimate, Probe
from eos_core.request import StatsRequest
from eos_core.routes import parameter_scale_along
from eos_core.settings import TunerSettings


class Probes:
    """Measures a law's statistics and tracks lambda_max (see the module docstring).

    Args:
        request: what the law asked for (`law.request()`).
        oracle: the curvature oracle (u^T H u, Hessian-vector products).
        space: the parameters' space (sums over shards, means over data-parallel ranks).
        spectral: the warm-started spectral estimators.
    """

    def __init__(self, request: StatsRequest, oracle: Oracle, space: ParameterSpace,
                 spectral: SpectralEstimates) -> None:
        self.request = request
        self.oracle = oracle
        self.space = space
        self.spectral = spectral

    # -- the law's statistics ------------------------------------------------------------------------------
    def statistics(self, probe: Probe) -> dict[str, Any]:
        """Measure every statistic of `request.needs`, in a fixed order (lambda_max before Lanczos).

        Args:
            probe: the instrumented step.

        Returns:
            The statistics by name ([`eos_core.stats`][]): floats, arrays of eigenvalues, and for `trial_loss` a
            function of the lr.

        Raises:
            RuntimeError: a statistic that evaluates the loss, and the step has no objective (no closure, no
                `set_objective`).
        """
        return {name: measure(self, probe) for name, measure in self._STATISTICS.items()
                if name in self.request.needs}

    def grad_dot_update(self, probe: Probe) -> float:
        """The directional derivative `g . u` of the step's own gradient along the update for lr 1."""
        return probe.at.grad_dot_delta / probe.at.eta_probe

    def grad_norm_sq(self, probe: Probe) -> float:
        """The squared gradient norm `|g|^2`, read with the step's inputs (over every shard)."""
        return probe.pending.grad_sq

    def curvature(self, probe: Probe) -> float:
        """The curvature `u^T H u` along the update for lr 1, by the oracle's route.

        One-sided finite differences reuse `g(w) . u` unless the gradient is clipped.

        Args:
            probe: the instrumented step.

        Returns:
            `u^T H u`, averaged over data-parallel ranks.

        Raises:
            RuntimeError: the step has no objective.
        """
        objective, at = probe.objective("u^T H u"), probe.at
        exact = None if probe.clipped else at.grad_dot_delta
        curvature = self.oracle.curvature(objective, at.params, at.delta, grad_dot_u=exact, norms=at.norms)
        return curvature / at.eta_probe**2

    def loss(self, probe: Probe) -> float:
        """The loss `f(w)` on the current batch, averaged over data-parallel ranks.

        The step's own loss when the tuner read it (with sharded parameters it is already the mean over the
        mesh), else one evaluation of the objective.

        Args:
            probe: the instrumented step.

        Returns:
            The mean loss over the data-parallel ranks.

        Raises:
            RuntimeError: the step's loss is unknown and the step has no objective.
        """
        loss = probe.pending.loss
        if loss is None:
            loss = probe.objective("the loss").value()
        elif self.space.sharded:
            return float(loss)  # the step's inputs averaged it over the mesh
        return self.space.mean_loss([loss])[0]

    def cosine(self, probe: Probe) -> float:
        """The cosine `cos(g_t, u_{t-1})` of the gradient with the previous update; 0 on the first step."""
        previous = probe.previous_update
        if previous is None:
            return 0.0
        along, previous_sq = self.space.dots([(probe.at.grads, previous), (previous, previous)])
        denominator = math.sqrt(max(probe.pending.grad_sq * previous_sq, 0.0))
        return along / denominator if denominator > 0 else 0.0

    def grad_dot_previous_update(self, probe: Probe) -> float:
        """`g_t . u_{t-1}` (u_{t-1} for lr 1); NaN on the first step, when there is no previous update."""
        previous = probe.previous_update
        if previous is None:
            return math.nan
        return self.space.dots([(probe.at.grads, previous)])[0]

    def previous_update_curvature(self, probe: Probe) -> float:
        """The curvature `u_{t-1}^T H_t u_{t-1}` along the previous update, at `w_t` on the current batch.

        By the oracle's route; one-sided finite differences reuse `g_t . u_{t-1}` unless the gradient is clipped.

        Args:
            probe: the instrumented step.

        Returns:
            `u_{t-1}^T H_t u_{t-1}` (u_{t-1} for lr 1), averaged over data-parallel ranks; NaN without a previous
            update, 0 for a zero one.

        Raises:
            RuntimeError: there is a nonzero previous update and the step has no objective.
        """
        previous = probe.previous_update
        if previous is None:
            return math.nan
        objective, at = probe.objective("u_{t-1}^T H u_{t-1}"), probe.at
        along, norm_sq, weighted = self.space.dots([(at.grads, previous), (previous, previous), (at.params, previous)],
                                                   absolute=(False, False, True))
        norm = math.sqrt(max(norm_sq, 0.0))
        if norm == 0.0:
            return 0.0
        exact = None if probe.clipped else along
        return self.oracle.curvature(objective, at.params, previous, grad_dot_u=exact,
                                     norms=(parameter_scale_along(weighted, norm), norm))

    def previous_lr(self, probe: Probe) -> float:
        """The learning rate applied to u_{t-1} (NaN without a previous update)."""
        return probe.previous_lr if probe.previous_update is not None else math.nan

    def trial_loss(self, probe: Probe) -> Callable[[Any], float]:
        """The trial loss `eta -> f(w + eta u)` for line searches (Armijo).

        Args:
            probe: the instrumented step.

        Returns:
            A function of the lr `eta` that evaluates the loss at `w + eta u` on the current batch (the parameters
            go back to `w` afterwards) and returns its mean over the data-parallel ranks.

        Raises:
            RuntimeError: the step has no objective.
        """
        objective, at = probe.objective("trial losses"), probe.at

        def trial_loss(eta: Any) -> float:
            with shifted(at.params, at.delta, float(eta) / at.eta_probe):
                return self.space.mean_loss([objective.value()])[0]

        return trial_loss

    def sharpness(self, probe: Probe) -> float:
        """The sharpness lambda_max(H) by warm-started power iteration.

        Args:
            probe: the instrumented step.

        Returns:
            The estimate, with the settings of the law's request (`power_iters`, `power_tol`); tracking on the
            same step may reuse it.

        Raises:
            RuntimeError: the step has no objective.
        """
        return self._law_power_iteration(probe, preconditioned=False)

    def preconditioned_sharpness(self, probe: Probe) -> float:
        """The preconditioned sharpness lambda_max(P^{-1/2} H P^{-1/2}) by warm-started power iteration.

        Args:
            probe: the instrumented step.

        Returns:
            The estimate, with the settings of the law's request (`power_iters`, `power_tol`).

        Raises:
            RuntimeError: the step has no objective, or the optimizer has no diagonal preconditioner.
        """
        return self._law_power_iteration(probe, preconditioned=True)

    def _law_power_iteration(self, probe: Probe, *, preconditioned: bool) -> float:
        request = self.request
        estimate = self.spectral.power_iteration(probe, preconditioned, request.power_iters, request.power_tol)
        probe.pending.law_estimates[preconditioned] = estimate  # tracking may reuse it
        return estimate.eigenvalue

    def top_eigenvalues(self, probe: Probe) -> np.ndarray:
        """The top-k eigenvalues of H by Lanczos, warm-started.

        Args:
            probe: the instrumented step.

        Returns:
            The `k = min(num_eigenvalues, number of parameters)` largest eigenvalues (float64 array), from
            `lanczos_steps_for(n)` Lanczos steps of the law's request; all NaN when non-finite products make the
            eigensolver fail.

        Raises:
            RuntimeError: the step has no objective.
        """
        return self._lanczos(probe, preconditioned=False)

    def preconditioned_top_eigenvalues(self, probe: Probe) -> np.ndarray:
        """The top-k eigenvalues of P^{-1/2} H P^{-1/2} by Lanczos, warm-started.

        Args:
            probe: the instrumented step.

        Returns:
            The `k` largest eigenvalues (float64 array), as for `top_eigenvalues`.

        Raises:
            RuntimeError: the step has no objective, or the optimizer has no diagonal preconditioner.
        """
        return self._lanczos(probe, preconditioned=True)

    def _lanczos(self, probe: Probe, *, preconditioned: bool) -> np.ndarray:
        n = self.space.numel() if self.space.sharded else sum(p.numel() for p in probe.at.params)
        k = min(self.request.num_eigenvalues, n)
        return self.spectral.lanczos(probe, preconditioned, k, self.request.lanczos_steps_for(n))

    _STATISTICS: dict[str, Callable[[Probes, Probe], Any]] = {
        S.GRAD_DOT_UPDATE: grad_dot_update,
        S.GRAD_NORM_SQ: grad_norm_sq,
        S.CURVATURE: curvature,
        S.LOSS: loss,
        S.GRAD_PREV_UPDATE_COSINE: cosine,
        S.GRAD_DOT_PREVIOUS_UPDATE: grad_dot_previous_update,
        S.PREVIOUS_UPDATE_CURVATURE: previous_update_curvature,
        S.PREVIOUS_LR: previous_lr,
        S.TRIAL_LOSS: trial_loss,
        S.SHARPNESS: sharpness,
        S.PRECONDITIONED_SHARPNESS: preconditioned_sharpness,
        S.TOP_EIGENVALUES: top_eigenvalues,
        S.PRECONDITIONED_TOP_EIGENVALUES: preconditioned_top_eigenvalues,
    }

    # -- tracking ------------------------------------------------------------------------------------------
    def track(self, probe: Probe, settings: TunerSettings) -> dict[str, float]:
        """Track lambda_max of H (and of the preconditioned H for adaptive optimizers).

        The law's estimate of this step is reused when its power iteration is at least as strict as tracking's
        (`sharpness_iters`, `sharpness_tol`); otherwise power iteration runs with tracking's settings.

        Args:
            probe: the instrumented step.
            settings: the tuner's settings.

        Returns:
            `sharpness` (lambda_max of H), `power_iterations` (the Hessian-vector products of that estimate),
            `alignment` (`|cos(u, v_max)|`) and, for an optimizer with a diagonal preconditioner,
            `preconditioned_sharpness`.

        Raises:
            RuntimeError: the step has no objective.
        """
        estimate = self._tracked(probe, settings, preconditioned=False)
        out = {"sharpness": estimate.eigenvalue, "power_iterations": float(estimate.iterations),
               "alignment": self.spectral.alignment(probe.at.delta)}
        if probe.preconditioner() is not None:
            out["preconditioned_sharpness"] = self._tracked(probe, settings, preconditioned=True).eigenvalue
        return out

    def _as_strict_as(self, settings: TunerSettings) -> bool:
        """The law's power iteration is at least as strict as tracking's (its estimate can be reused)."""
        request = self.request
        return request.power_iters >= settings.sharpness_iters and 0 < request.power_tol <= settings.sharpness_tol

    def _tracked(self, probe: Probe, settings: TunerSettings, *, preconditioned: bool) -> Estimate:
        """Tracking's estimate of lambda_max of H or of the preconditioned H.

        Returns:
            The law's own estimate of this step when it is at least as strict (one power iteration, not two),
            else a run with tracking's settings, warm from the law's eigenvector.
        """
        estimate = probe.pending.law_estimates.get(preconditioned)
        if estimate is not None and self._as_strict_as(settings):
            return estimate
        return self.spectral.power_iteration(probe, preconditioned, settings.sharpness_iters, settings.sharpness_tol)
