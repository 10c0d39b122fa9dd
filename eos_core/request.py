"""What an adapter must measure for a law: one typed request, with every default in one place.

A law declares *which* statistics it consumes (`law.needs`, names from [`eos_core.stats`][]) and *how* the spectral
ones are to be estimated (power-iteration budget, number of eigenvalues, Lanczos steps).
[`eos_core.laws.Law.request`][] turns that into a [`StatsRequest`][eos_core.request.StatsRequest]; every adapter
(PyTorch, JAX, Keras) reads the request instead of probing the law's attributes, so a setting means the same thing in
every framework and its default lives here only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from eos_core import _validation as check
from eos_core import stats as S

#: Power-iteration budget for a law that asks for lambda_max and sets none (Hessian-vector products).
POWER_ITERS = 20
#: Relative change of the Rayleigh quotient at which power iteration stops (CDAT paper, appendix C.4).
POWER_TOL = 1e-3
#: Lanczos steps for the top-k eigenvalues when a law sets none (the DCAO proposal ablates 5, 10 and 20).
LANCZOS_STEPS = 20


class StatsRequest(NamedTuple):
    """The statistics an adapter computes on a probe step, and how.

    Attributes:
        needs: names from [`eos_core.stats`][] (exactly what `law.update` receives).
        power_iters: at most this many Hessian-vector products per lambda_max estimate (`sharpness` /
            `preconditioned_sharpness`).
        power_tol: stop power iteration when the Rayleigh quotient changes by at most this, relative (0: always run
            `power_iters`, as AdaEoS's "1-2 warm-started steps").
        num_eigenvalues: k of `top_eigenvalues` / `preconditioned_top_eigenvalues`.
        lanczos_steps: Lanczos steps for those (at least k; capped at the parameter count by
            [`lanczos_steps_for`][eos_core.request.StatsRequest.lanczos_steps_for]).
    """

    needs: frozenset[str] = frozenset()
    power_iters: int = POWER_ITERS
    power_tol: float = POWER_TOL
    num_eigenvalues: int = 1
    lanczos_steps: int = LANCZOS_STEPS

    @classmethod
    def build(
        cls,
        needs: Iterable[str] = (),
        *,
        power_iters: int | None = None,
        power_tol: float | None = None,
        num_eigenvalues: int | None = None,
        lanczos_steps: int | None = None,
        owner: str = "StatsRequest",
    ) -> StatsRequest:
        """A validated request; `None` means "the default" ([`POWER_ITERS`][eos_core.request.POWER_ITERS], ...).

        Args:
            needs: the statistics' names ([`eos_core.stats`][]).
            power_iters: at most this many Hessian-vector products per lambda_max estimate.
            power_tol: relative change at which power iteration stops (0: run all).
            num_eigenvalues: k of the top-k eigenvalues.
            lanczos_steps: Lanczos steps for those.
            owner: who asks (named in errors).

        Returns:
            The request.

        Raises:
            ValueError: for a statistic name not in [`eos_core.stats.ALL`][] or an invalid setting.
        """
        needs = frozenset(needs)
        unknown = needs - S.ALL
        if unknown:
            raise ValueError(f"{owner}: unknown statistics {sorted(unknown)}; known: {sorted(S.ALL)}")
        k = 1 if num_eigenvalues is None else check.positive_int(owner, "num_eigenvalues", num_eigenvalues)
        steps = LANCZOS_STEPS if lanczos_steps is None else check.positive_int(owner, "lanczos_steps", lanczos_steps)
        return cls(
            needs=needs,
            power_iters=POWER_ITERS if power_iters is None else check.positive_int(owner, "power_iters", power_iters),
            power_tol=POWER_TOL if power_tol is None else check.non_negative(owner, "power_tol", power_tol),
            num_eigenvalues=k,
            lanczos_steps=max(steps, k),
        )

    # -- what the adapter has to do ---------------------------------------------------------------------
    @property
    def curvature(self) -> bool:
        """u^T H u is needed (CDAT)."""
        return S.CURVATURE in self.needs

    @property
    def spectral(self) -> frozenset[str]:
        """The eigenvalue statistics needed (power iteration or Lanczos on H or P^{-1/2} H P^{-1/2})."""
        return self.needs & S.SPECTRAL

    @property
    def preconditioned(self) -> bool:
        """The preconditioned Hessian of an adaptive optimizer is needed."""
        return bool(self.needs & {S.PRECONDITIONED_SHARPNESS, S.PRECONDITIONED_TOP_EIGENVALUES})

    @property
    def hessian_eigenvector(self) -> bool:
        """A warm-start eigenvector of H is kept between probes."""
        return bool(self.needs & {S.SHARPNESS, S.TOP_EIGENVALUES})

    @property
    def previous_update(self) -> bool:
        """The previous step's update u_{t-1} must be kept (cos(g_t, u_{t-1}), CDAT's previous-update numerator)."""
        return bool(self.needs & {S.GRAD_PREV_UPDATE_COSINE, S.GRAD_DOT_PREVIOUS_UPDATE, S.PREVIOUS_UPDATE_CURVATURE})

    @property
    def objective(self) -> bool:
        """The loss on the current batch must be re-evaluated at other parameters.

        True for curvature, spectra and trial losses: the step's own loss, gradient and update are not enough.
        """
        return bool(self.needs & ({S.CURVATURE, S.PREVIOUS_UPDATE_CURVATURE, S.TRIAL_LOSS} | S.SPECTRAL))

    def lanczos_steps_for(self, dimension: int) -> int:
        """Lanczos steps on a problem of `dimension` parameters: `min(lanczos_steps, dimension)`, and >= k."""
        k = min(self.num_eigenvalues, int(dimension))
        return max(min(self.lanczos_steps, int(dimension)), k)
