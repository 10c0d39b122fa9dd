"""The exact-sharpness rule eta = sigma / lambda_max (CDAT paper, appendix B.4, eq. 16)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from eos_core import _validation as check
from eos_core import stats as S
from eos_core.laws.base import Law, LawOutput, finite, safe
from eos_core.numerics import NUMPY, Numerics
from eos_core.request import POWER_ITERS, POWER_TOL, StatsRequest


class ExactSharpnessState(NamedTuple):
    """The state of [`ExactSharpness`][eos_core.laws.ExactSharpness]: the last learning rate."""

    lr: Any  #: last learning rate applied


class ExactSharpness(Law):
    r"""Learning rate from the top Hessian eigenvalue (CDAT paper eq. 16; Cohen et al. 2021, app. F).

    $$
    \eta_t = \operatorname{clip}(\sigma / \lambda_{\max}(H_t), \eta_{\min}, \eta_{\max})
    $$

    With `preconditioned=True` the eigenvalue is that of $P^{-1/2} H P^{-1/2}$ for the
    diagonal preconditioner P of an adaptive base optimizer (Cohen et al. 2022). Unlike CDAT, the
    rule ignores how u aligns with the top eigenvector, which is why the paper finds sigma = 2 too
    small and sigma = 3 competitive (Fig. 15). The adapter estimates lambda_max by warm-started
    power iteration to `power_tol` (at most `power_iters` iterations).

    Defined outcomes: lambda_max <= 0 or non-finite keeps the last learning rate (`fallback = 1`).

    Needs per probe: `sharpness` (or `preconditioned_sharpness`), by power iteration (a spectral estimator).
    Reports: that estimate.

    Args:
        scale: $\sigma > 0$.
        preconditioned: use $\lambda_{\max}(P^{-1/2} H P^{-1/2})$ of the base optimizer's preconditioner.
        lr_min: lower bound of the learning rate.
        lr_max: upper bound of the learning rate (may be inf).
        lr_init: learning rate before the first measurement (default: the wrapped optimizer's, else 0).
        power_iters: at most this many Hessian-vector products per estimate.
        power_tol: stop power iteration when the Rayleigh quotient changes by at most this, relative.
        **unknown: rejected: any other keyword raises.

    Raises:
        ValueError: a setting out of its range (the message names it), or an unknown keyword.

    Examples:
        >>> from eos_core import ExactSharpness
        >>> law = ExactSharpness(scale=2.0)
        >>> out = law.update(law.init(lr=0.1), {"sharpness": 4.0})
        >>> float(out.lr)  # sigma / lambda_max, eq. 16
        0.5
        >>> law.request().power_iters, law.request().power_tol
        (20, 0.001)
    """

    measurements = ("sharpness",)

    def __init__(
        self,
        scale: float = 2.0,
        *,
        preconditioned: bool = False,
        lr_min: float = 0.0,
        lr_max: float = math.inf,
        lr_init: float | None = None,
        power_iters: int = POWER_ITERS,
        power_tol: float = POWER_TOL,
        **unknown: Any,
    ) -> None:
        name = type(self).__name__
        check.reject_unknown(
            name, unknown, ("scale", "preconditioned", "lr_min", "lr_max", "lr_init", "power_iters", "power_tol")
        )
        self.scale = check.positive(name, "scale", scale)
        self.preconditioned = bool(preconditioned)
        self.lr_min, self.lr_max = check.lr_bounds(name, lr_min, lr_max)
        self.lr_init = None if lr_init is None else check.non_negative(name, "lr_init", lr_init)
        self.power_iters = check.positive_int(name, "power_iters", power_iters)
        self.power_tol = check.positive(name, "power_tol", power_tol)
        self.needs = frozenset({S.PRECONDITIONED_SHARPNESS if self.preconditioned else S.SHARPNESS})
        self.measurements = (self.sharpness_key,)
        self._record(scale=self.scale, preconditioned=self.preconditioned, lr_min=self.lr_min,
                     lr_max=self.lr_max, lr_init=self.lr_init, power_iters=self.power_iters,
                     power_tol=self.power_tol)

    @property
    def sharpness_key(self) -> str:
        """The statistic it consumes and reports: `sharpness` or `preconditioned_sharpness`."""
        return next(iter(self.needs))

    def request(self) -> StatsRequest:
        """What an adapter measures: lambda_max by warm-started power iteration.

        Returns:
            The request: `sharpness` (or `preconditioned_sharpness`) to `power_tol`, at most `power_iters`
            products.
        """
        return StatsRequest.build(self.needs, power_iters=self.power_iters, power_tol=self.power_tol,
                                  owner="ExactSharpness")

    def init(
        self, lr: float | None = None, *, hyperparams: Mapping[str, float] | None = None,
        numerics: Numerics = NUMPY,
    ) -> ExactSharpnessState:
        """The state before the first probe: `lr_init`, else `lr`, else 0.

        Args:
            lr: the wrapped optimizer's learning rate, when it has one.
            hyperparams: the optimizer's other settings (unused).
            numerics: the array namespace of the state (numpy here, `jax.numpy` in the JAX adapter).

        Returns:
            The initial [`ExactSharpnessState`][eos_core.laws.ExactSharpnessState].
        """
        return ExactSharpnessState(lr=numerics.scalar(self._initial_lr(self.lr_init, lr, required=False)))

    def update(
        self, state: ExactSharpnessState, stats: Mapping[str, Any], *, numerics: Numerics = NUMPY
    ) -> LawOutput:
        """One probe: eq. 16 with this probe's sharpness estimate.

        Args:
            state: the law's state.
            stats: `sharpness` (or `preconditioned_sharpness`) estimated on this step.
            numerics: the array namespace of the state.

        Returns:
            The [`LawOutput`][eos_core.laws.LawOutput]: the learning rate for this step, the new state and the
            diagnostics.
        """
        xp = numerics.xp
        sharpness = numerics.scalar(stats[self.sharpness_key])
        positive = finite(numerics, sharpness) & (sharpness > 0)
        candidate = numerics.clip(self.scale / safe(numerics, sharpness, positive, fill=1.0), self.lr_min,
                                  self.lr_max)
        usable = positive & xp.isfinite(candidate)
        lr = xp.where(usable, candidate, state.lr)
        diagnostics = self.diagnostics(numerics, lr=lr, probed=True, fallback=~usable,
                                       **{self.sharpness_key: sharpness})
        return LawOutput(lr=lr, state=ExactSharpnessState(lr=lr), diagnostics=diagnostics)
