"""Multiplicative hypergradient descent on the learning rate (CDAT paper appendix B.2, eq. 15)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from eos_core import _validation as check
from eos_core import stats as S
from eos_core.laws.base import Law, LawOutput, finite, safe
from eos_core.numerics import NUMPY, Numerics


class HyperGradientState(NamedTuple):
    """The state of [`HyperGradient`][eos_core.laws.HyperGradient]: the last learning rate."""

    lr: Any


class HyperGradient(Law):
    r"""Multiplicative hypergradient rule (Almeida et al. 1999, Baydin et al. 2017; CDAT paper eq. 15).

    $$
    \eta_{t+1} = \operatorname{clip}\Big(\eta_t \Big(1 - \beta\,
        \frac{\nabla f(w_t + \eta_t u_t)^\top u_t}{\|\nabla f(w_t + \eta_t u_t)\|\,\|u_t\|}\Big),
        \eta_{\min}, \eta_{\max}\Big)
    $$

    The gradient at the new point is the next step's own gradient, so the rule costs no extra
    gradient: at step t+1 the adapter passes cos(g_{t+1}, u_t) (0 on the first step) and the law
    returns eta_{t+1} for that step. The rate grows while successive updates keep pointing downhill
    and shrinks when the new gradient opposes the last update.

    Defined outcomes: a non-finite cosine keeps the last learning rate (`fallback = 1`).

    Needs per probe: `grad_prev_update_cosine` (first order; the adapter keeps the previous update).
    Reports: `cosine`.

    Args:
        beta: the hyper learning rate, in (0, 1).
        lr_init: the starting learning rate (> 0; default: the wrapped optimizer's).
        lr_min: lower bound of the learning rate.
        lr_max: upper bound of the learning rate (may be inf).
        **unknown: rejected: any other keyword raises.

    Raises:
        ValueError: a setting out of its range (the message names it), or an unknown keyword.

    Examples:
        >>> from eos_core import HyperGradient
        >>> law = HyperGradient(beta=0.1, lr_init=0.5)
        >>> state = law.init()
        >>> round(float(law.update(state, {"grad_prev_update_cosine": -1.0}).lr), 6)  # still downhill: grow
        0.55
        >>> round(float(law.update(state, {"grad_prev_update_cosine": 1.0}).lr), 6)  # overshot: shrink
        0.45
    """

    needs = frozenset({S.GRAD_PREV_UPDATE_COSINE})
    measurements = ("cosine",)

    def __init__(self, beta: float = 0.01, *, lr_init: float | None = None, lr_min: float = 0.0,
                 lr_max: float = math.inf, **unknown: Any) -> None:
        name = type(self).__name__
        check.reject_unknown(name, unknown, ("beta", "lr_init", "lr_min", "lr_max"))
        self.beta = check.in_interval(name, "beta", beta, 0.0, 1.0, closed_low=False, closed_high=False)
        self.lr_min, self.lr_max = check.lr_bounds(name, lr_min, lr_max)
        self.lr_init = None if lr_init is None else check.positive(name, "lr_init", lr_init)
        self._record(beta=self.beta, lr_init=self.lr_init, lr_min=self.lr_min, lr_max=self.lr_max)

    def init(
        self, lr: float | None = None, *, hyperparams: Mapping[str, float] | None = None,
        numerics: Numerics = NUMPY,
    ) -> HyperGradientState:
        """The state before the first step: the starting lr.

        Args:
            lr: the wrapped optimizer's learning rate, when it has one.
            hyperparams: the optimizer's other settings (unused).
            numerics: the array namespace of the state (numpy here, `jax.numpy` in the JAX adapter).

        Returns:
            The initial [`HyperGradientState`][eos_core.laws.HyperGradientState].

        Raises:
            ValueError: no positive starting learning rate (`lr_init` or `lr`).
        """
        lr0 = self._initial_lr(self.lr_init, lr, required=True)
        if not lr0 > 0:
            raise ValueError("HyperGradient: the initial learning rate must be > 0 (the rule is multiplicative)")
        return HyperGradientState(lr=numerics.scalar(lr0))

    def update(
        self, state: HyperGradientState, stats: Mapping[str, Any], *, numerics: Numerics = NUMPY
    ) -> LawOutput:
        """One step: eq. 15 with the cosine between this step's gradient and the last update.

        Args:
            state: the law's state.
            stats: `grad_prev_update_cosine`, cos(g_t, u_{t-1}) (0 on the first step).
            numerics: the array namespace of the state.

        Returns:
            The [`LawOutput`][eos_core.laws.LawOutput]: the learning rate for this step, the new state and the
            diagnostics.
        """
        xp = numerics.xp
        cosine = numerics.scalar(stats[S.GRAD_PREV_UPDATE_COSINE])
        usable = finite(numerics, cosine)
        cos = numerics.clip(safe(numerics, cosine, usable), -1.0, 1.0)
        candidate = numerics.clip(state.lr * (1.0 - self.beta * cos), self.lr_min, self.lr_max)
        usable = usable & xp.isfinite(candidate)
        lr = xp.where(usable, candidate, state.lr)
        diagnostics = self.diagnostics(numerics, lr=lr, probed=True, fallback=~usable, cosine=cosine)
        return LawOutput(lr=lr, state=HyperGradientState(lr=lr), diagnostics=diagnostics)
