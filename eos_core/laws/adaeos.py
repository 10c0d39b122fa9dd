"""AdaEoS: multiplicative feedback of lr * lambda_max towards the edge (AdaEoS proposal, section 3.2)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from eos_core import _validation as check
from eos_core import stats as S
from eos_core.ema import bias_correction, ema_update
from eos_core.laws.base import Law, LawOutput, finite, safe
from eos_core.numerics import NUMPY, Numerics
from eos_core.request import StatsRequest


class AdaEoSState(NamedTuple):
    """The state of [`AdaEoS`][eos_core.laws.AdaEoS]: the lr, the EMA of the sharpness and its count."""

    lr: Any  #: eta_k
    sharpness_ema: Any  #: EMA of lambda_hat (0 before the first measurement)
    count: Any  #: number of measurements folded into the EMA (an integer)


class AdaEoS(Law):
    r"""Adaptive edge-of-stability learning rate (AdaEoS proposal, section 3.2).

    $$
    \tilde\lambda_k = \frac{\mathrm{EMA}_\beta(\hat\lambda)_k}{1-\beta^{k}}, \qquad
    \eta_{k+1} = \operatorname{clip}\Big(\eta_k \cdot
        \operatorname{clip}\big((\sigma_{\rm target} / (\eta_k \tilde\lambda_k))^{\gamma},
        1/c, c\big), \eta_{\min}, \eta_{\max}\Big)
    $$

    `lambda_hat` comes from `power_iters` (1-2 in the proposal) warm-started power-iteration
    steps on the Hessian (or the preconditioned Hessian with `preconditioned=True`), measured every
    `probe_every` steps by the adapter. `gamma` in (0, 1] damps the feedback; the factor is
    clipped to [1/max_change, max_change] and the EMA (bias-corrected, since it is used on its own)
    smooths lambda_hat.

    Reports `sharpness` (`preconditioned_sharpness` with `preconditioned=True`): this probe's
    lambda_hat; `smoothed_sharpness`: the bias-corrected EMA; `lr_smoothed_sharpness`: the new lr
    times it, the quantity the rule drives to `target`.

    Defined outcomes: lambda_hat <= 0 or non-finite keeps the learning rate and the EMA unchanged
    (`fallback = 1`). The initial learning rate must be positive (a multiplicative rule cannot
    leave 0).

    Needs per probe: `sharpness` (or `preconditioned_sharpness`) from exactly `power_iters` warm-started
    power-iteration steps (a spectral estimator).

    Args:
        target: $\sigma_{\rm target} > 0$, the value of lr * smoothed sharpness the rule drives to.
        gamma: $\gamma \in (0, 1]$, the damping exponent.
        sharpness_ema: $\beta \in [0, 1)$, the EMA weight of past estimates.
        max_change: $c \ge 1$: the lr changes by at most this factor per probe.
        preconditioned: use $\lambda_{\max}(P^{-1/2} H P^{-1/2})$.
        lr_min: lower bound of the learning rate.
        lr_max: upper bound of the learning rate (may be inf).
        lr_init: the starting learning rate (> 0; default: the wrapped optimizer's).
        power_iters: power-iteration steps per probe (the proposal: 1-2).
        **unknown: rejected: any other keyword raises.

    Raises:
        ValueError: a setting out of its range (the message names it), or an unknown keyword.

    Examples:
        >>> from eos_core import AdaEoS
        >>> law = AdaEoS(target=2.0, gamma=1.0, lr_init=0.1)
        >>> out = law.update(law.init(), {"sharpness": 10.0})  # lr * lambda = 1: the factor (2 / 1)^1 = 2
        >>> round(float(out.lr), 6), round(float(out.diagnostics["lr_smoothed_sharpness"]), 6)
        (0.2, 2.0)
    """

    measurements = ("sharpness", "smoothed_sharpness", "lr_smoothed_sharpness")

    def __init__(
        self,
        target: float = 2.0,
        *,
        gamma: float = 0.1,
        sharpness_ema: float = 0.0,
        max_change: float = 2.0,
        preconditioned: bool = False,
        lr_min: float = 0.0,
        lr_max: float = math.inf,
        lr_init: float | None = None,
        power_iters: int = 2,
        **unknown: Any,
    ) -> None:
        name = type(self).__name__
        check.reject_unknown(name, unknown, ("target", "gamma", "sharpness_ema", "max_change", "preconditioned",
                                             "lr_min", "lr_max", "lr_init", "power_iters"))
        self.target = check.positive(name, "target", target)
        self.gamma = check.in_interval(name, "gamma", gamma, 0.0, 1.0, closed_low=False, closed_high=True)
        self.sharpness_ema = check.in_interval(name, "sharpness_ema", sharpness_ema, 0.0, 1.0,
                                               closed_low=True, closed_high=False)
        self.max_change = check.as_float(name, "max_change", max_change)
        if not self.max_change >= 1.0:
            raise ValueError(f"{name}: max_change must be >= 1, got {max_change!r}")
        self.preconditioned = bool(preconditioned)
        self.lr_min, self.lr_max = check.lr_bounds(name, lr_min, lr_max)
        self.lr_init = None if lr_init is None else check.positive(name, "lr_init", lr_init)
        self.power_iters = check.positive_int(name, "power_iters", power_iters)
        self.power_tol = 0.0  # a fixed number of warm-started iterations, as the proposal describes
        self.needs = frozenset({S.PRECONDITIONED_SHARPNESS if self.preconditioned else S.SHARPNESS})
        self.measurements = (self.sharpness_key, "smoothed_sharpness", "lr_smoothed_sharpness")
        self._record(target=self.target, gamma=self.gamma, sharpness_ema=self.sharpness_ema,
                     max_change=self.max_change, preconditioned=self.preconditioned, lr_min=self.lr_min,
                     lr_max=self.lr_max, lr_init=self.lr_init, power_iters=self.power_iters)

    @property
    def sharpness_key(self) -> str:
        """The statistic it consumes: `sharpness` or `preconditioned_sharpness`."""
        return next(iter(self.needs))

    def request(self) -> StatsRequest:
        """What an adapter measures: lambda_max by exactly `power_iters` warm-started power-iteration steps.

        Returns:
            The request (tolerance 0: every step runs).
        """
        return StatsRequest.build(self.needs, power_iters=self.power_iters, power_tol=0.0, owner="AdaEoS")

    def init(
        self, lr: float | None = None, *, hyperparams: Mapping[str, float] | None = None,
        numerics: Numerics = NUMPY,
    ) -> AdaEoSState:
        """The state before the first probe: the starting lr and an empty EMA.

        Args:
            lr: the wrapped optimizer's learning rate, when it has one.
            hyperparams: the optimizer's other settings (unused).
            numerics: the array namespace of the state (numpy here, `jax.numpy` in the JAX adapter).

        Returns:
            The initial [`AdaEoSState`][eos_core.laws.AdaEoSState].

        Raises:
            ValueError: no positive starting learning rate (`lr_init` or `lr`).
        """
        lr0 = self._initial_lr(self.lr_init, lr, required=True)
        if not lr0 > 0:
            raise ValueError("AdaEoS: the initial learning rate must be > 0 (a multiplicative rule cannot leave 0)")
        return AdaEoSState(lr=numerics.scalar(lr0), sharpness_ema=numerics.scalar(0.0), count=numerics.counter(0))

    def update(self, state: AdaEoSState, stats: Mapping[str, Any], *, numerics: Numerics = NUMPY) -> LawOutput:
        """One probe: smooth this estimate into the EMA and move the lr by the damped factor.

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
        usable = finite(numerics, sharpness) & (sharpness > 0)
        lam = safe(numerics, sharpness, usable, fill=1.0)
        ema = xp.where(usable, ema_update(state.sharpness_ema, lam, self.sharpness_ema), state.sharpness_ema)
        count = xp.where(usable, state.count + 1, state.count)
        smoothed = ema / xp.where(count > 0, bias_correction(self.sharpness_ema, count), numerics.scalar(1.0))
        # (target / x)^gamma <= max_change  <=>  x >= target * max_change^(-1/gamma): flooring x there
        # keeps the power finite without changing the clipped factor.
        floor = self.target * self.max_change ** (-1.0 / self.gamma)
        product = xp.maximum(state.lr * xp.where(smoothed > 0, smoothed, numerics.scalar(1.0)), floor)
        factor = numerics.clip((self.target / product) ** self.gamma, 1.0 / self.max_change, self.max_change)
        lr = xp.where(usable, numerics.clip(state.lr * factor, self.lr_min, self.lr_max), state.lr)
        reported = xp.where(count > 0, smoothed, numerics.scalar(math.nan))
        diagnostics = self.diagnostics(
            numerics, lr=lr, probed=True, fallback=~usable, smoothed_sharpness=reported,
            lr_smoothed_sharpness=lr * reported, **{self.sharpness_key: sharpness},
        )
        return LawOutput(lr=lr, state=AdaEoSState(lr=lr, sharpness_ema=ema, count=count), diagnostics=diagnostics)
