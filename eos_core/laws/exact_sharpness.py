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
    lr: Any  #: last learning rate applied


class ExactSharpness(Law):
    r"""Learning rate from the top Hessian eigenvalue (CDAT paper eq. 16; Cohen et al. 2021, app. F).

    .. math:: \eta_t = \operatorname{clip}(\sigma / \lambda_{\max}(H_t), \eta_{\min}, \eta_{\max})

    With ``preconditioned=True`` the eigenvalue is that of :math:`P^{-1/2} H P^{-1/2}` for the
    diagonal preconditioner P of an adaptive base optimizer (Cohen et al. 2022). Unlike CDAT, the
    rule ignores how u aligns with the top eigenvector, which is why the paper finds sigma = 2 too
    small and sigma = 3 competitive (Fig. 15). The adapter estimates lambda_max by warm-started
    power iteration to ``power_tol`` (at most ``power_iters`` iterations).

    Defined outcomes: lambda_max <= 0 or non-finite keeps the last learning rate (``fallback = 1``).
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
        """The statistic it consumes and reports: ``sharpness`` or ``preconditioned_sharpness``."""
        return next(iter(self.needs))

    def request(self) -> StatsRequest:
        """lambda_max by warm-started power iteration to ``power_tol``, at most ``power_iters`` products."""
        return StatsRequest.build(self.needs, power_iters=self.power_iters, power_tol=self.power_tol,
                                  owner="ExactSharpness")

    def init(
        self, lr: float | None = None, *, hyperparams: Mapping[str, float] | None = None,
        numerics: Numerics = NUMPY,
    ) -> ExactSharpnessState:
        return ExactSharpnessState(lr=numerics.scalar(self._initial_lr(self.lr_init, lr, required=False)))

    def update(
        self, state: ExactSharpnessState, stats: Mapping[str, Any], *, numerics: Numerics = NUMPY
    ) -> LawOutput:
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
