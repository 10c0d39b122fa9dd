"""The statistics a law consumes, measured at ``w`` on an instrumented step, and lambda_max tracking.

:class:`Probes` measures exactly the names of ``law.request().needs`` (:mod:`eos_core.stats`), in a fixed
order (lambda_max before Lanczos, so Lanczos starts from this step's power-iteration vector):

* ``grad_dot_update`` g.u and ``grad_norm_sq`` |g|^2 from the step's own gradient (no extra pass);
* ``curvature`` u^T H u by the oracle's route (one-sided finite differences reuse g(w).u unless the
  optimizer stepped with a clipped gradient);
* ``loss`` f(w) and ``trial_loss`` eta -> f(w + eta u), averaged over data-parallel ranks;
* ``grad_prev_update_cosine`` cos(g_t, u_{t-1}); ``grad_dot_previous_update`` g_t.u_{t-1},
  ``previous_update_curvature`` u_{t-1}^T H_t u_{t-1} (the oracle's route, at ``w_t``) and ``previous_lr``
  (CDAT's previous-update numerator), u_{t-1} being the update of the last step taken, for lr 1;
* ``sharpness`` / ``preconditioned_sharpness`` by power iteration, ``top_eigenvalues`` /
  ``preconditioned_top_eigenvalues`` by Lanczos
  (:class:`~eos_core.adapters.torch.spectral_estimates.SpectralEstimates`).

Tracking (``sharpness_every``) reports lambda_max of H (and of the preconditioned H for adaptive
optimizers), the alignment |cos(u, v_max)| and the products used; when the law measured lambda_max on the
same step with settings at least as strict, its estimate is reused (one power iteration, not two).
Every inner product is over all shards of sharded parameters (the parameters' ``ParameterSpace``).
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
        request: what the law asked for (``law.request()``).
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
        """Every statistic of ``request.needs``, in a fixed order (lambda_max before Lanczos)."""
        return {name: measure(self, probe) for name, measure in self._STATISTICS.items()
                if name in self.request.needs}

    def grad_dot_update(self, probe: Probe) -> float:
        """g . u."""
        return probe.at.grad_dot_delta / probe.at.eta_probe

    def grad_norm_sq(self, probe: Probe) -> float:
        """|g|^2 (read with the step's inputs)."""
        return probe.pending.grad_sq

    def curvature(self, probe: Probe) -> float:
        """u^T H u by the oracle; one-sided finite differences reuse g(w).u unless the gradient is clipped."""
        objective, at = probe.objective("u^T H u"), probe.at
        exact = None if probe.clipped else at.grad_dot_delta
        curvature = self.oracle.curvature(objective, at.params, at.delta, grad_dot_u=exact, norms=at.norms)
        return curvature / at.eta_probe**2

    def loss(self, probe: Probe) -> float:
        """f(w), averaged over data-parallel ranks (already averaged when the parameters are sharded)."""
        loss = probe.pending.loss
        if loss is None:
            loss = probe.objective("the loss").value()
        elif self.space.sharded:
            return float(loss)  # the step's inputs averaged it over the mesh
        return self.space.mean_loss([loss])[0]

    def cosine(self, probe: Probe) -> float:
        """cos(g_t, u_{t-1}); 0 on the first step."""
        previous = probe.previous_update
        if previous is None:
            return 0.0
        along, previous_sq = self.space.dots([(probe.at.grads, previous), (previous, previous)])
        denominator = math.sqrt(max(probe.pending.grad_sq * previous_sq, 0.0))
        return along / denominator if denominator > 0 else 0.0

    def grad_dot_previous_update(self, probe: Probe) -> float:
        """g_t . u_{t-1} (u_{t-1} for lr 1); NaN on the first step, when there is no previous update."""
        previous = probe.previous_update
        if previous is None:
            return math.nan
        return self.space.dots([(probe.at.grads, previous)])[0]

    def previous_update_curvature(self, probe: Probe) -> float:
        """u_{t-1}^T H_t u_{t-1} at ``w_t`` on the current batch, by the oracle's route (NaN without a previous
        update); one-sided finite differences reuse g_t . u_{t-1} unless the gradient is clipped."""
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
        """``eta -> f(w + eta u)`` for line searches (averaged over data-parallel ranks)."""
        objective, at = probe.objective("trial losses"), probe.at

        def trial_loss(eta: Any) -> float:
            with shifted(at.params, at.delta, float(eta) / at.eta_probe):
                return self.space.mean_loss([objective.value()])[0]

        return trial_loss

    def sharpness(self, probe: Probe) -> float:
        """lambda_max(H) with the law's power-iteration settings."""
        return self._law_power_iteration(probe, preconditioned=False)

    def preconditioned_sharpness(self, probe: Probe) -> float:
        """lambda_max(P^{-1/2} H P^{-1/2}) with the law's power-iteration settings."""
        return self._law_power_iteration(probe, preconditioned=True)

    def _law_power_iteration(self, probe: Probe, *, preconditioned: bool) -> float:
        request = self.request
        estimate = self.spectral.power_iteration(probe, preconditioned, request.power_iters, request.power_tol)
        probe.pending.law_estimates[preconditioned] = estimate  # tracking may reuse it
        return estimate.eigenvalue

    def top_eigenvalues(self, probe: Probe) -> np.ndarray:
        """The top-k eigenvalues of H (Lanczos)."""
        return self._lanczos(probe, preconditioned=False)

    def preconditioned_top_eigenvalues(self, probe: Probe) -> np.ndarray:
        """The top-k eigenvalues of P^{-1/2} H P^{-1/2} (Lanczos)."""
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
        """Tracked lambda_max of H (and of the preconditioned H for adaptive optimizers), alignment, products."""
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
        """Tracking's estimate: the law's own of this step when it is at least as strict (one power
        iteration, not two), else a run with tracking's settings, warm from the law's eigenvector."""
        estimate = probe.pending.law_estimates.get(preconditioned)
        if estimate is not None and self._as_strict_as(settings):
            return estimate
        return self.spectral.power_iteration(probe, preconditioned, settings.sharpness_iters, settings.sharpness_tol)
