"""CDAT, Curvature Dynamics Aware Tuning (Roulet et al. 2024, eq. 8)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from eos_core import _validation as check
from eos_core import stats as S
from eos_core.ema import ema_update
from eos_core.laws.base import Law, LawOutput, finite, safe
from eos_core.numerics import NUMPY, Numerics


class CDATState(NamedTuple):
    """The state of [`CDAT`][eos_core.laws.CDAT]: the last lr and the two EMAs of eq. 8."""

    lr: Any  #: last learning rate applied (the fallback when a measurement is unusable)
    numerator_ema: Any  #: n~, EMA of n_t (0 before the first measurement)
    denominator_ema: Any  #: d~, EMA of d_t (0 before the first measurement)


class CDAT(Law):
    r"""Curvature Dynamics Aware Tuning, the on-edge learning rate of the CDAT paper (eq. 8).

    $$
    n_t = \max(-g_t^\top u_t, 0), \qquad d_t = |u_t^\top H_t u_t| + \varepsilon,
    $$

    $$
    \tilde n_{t+1} = (1-\beta) n_t + \beta \tilde n_t, \qquad
    \tilde d_{t+1} = (1-\beta) d_t + \beta \tilde d_t, \qquad
    \eta_t = \operatorname{clip}\big(\sigma\, \tilde n_{t+1} / \tilde d_{t+1},\ \eta_{\min}, \eta_{\max}\big).
    $$

    `scale` (sigma) interpolates between the quadratically greedy rule (sigma = 1, eq. 3: the
    minimiser of the quadratic model along u) and the on-edge rule (sigma = 2, eq. 7: the largest
    step whose quadratic model does not increase the loss). Paper settings: full batch sigma in
    {1.9375, 2, 2.0625} with `ema = 0`; mini-batch `ema` in {0.9, 0.99} and a sigma that grows
    with the batch size (batch 256: sigma = 1.8, ema = 0.9).

    **EMA without bias correction.** Both EMAs start at 0, so after t measurements each carries the
    same factor (1 - beta^t); it cancels in the ratio, which is therefore unbiased from the first
    step on. Bias-correcting each EMA would change nothing but the reported EMA values.

    **Defined outcomes.**

    * `n = 0` (u is not a descent direction, or g = 0): the on-edge step along u is 0, so the rate
      is `lr_min` (0 by default: no step is taken), as in the paper.
    * `d~ = 0` (only possible with `eps = 0` and zero curvature along u): the quadratic model
      has no curvature to put the step on edge; the law keeps its last learning rate
      (`fallback = 1`). Likewise when the ratio overflows and `lr_max` is infinite.
    * non-finite `g.u` or `u.Hu`: the EMAs are left untouched and the last learning rate is kept
      (`fallback = 1`); the adapter warns.

    Needs per probe: `grad_dot_update` ($g^\top u$) and `curvature` ($u^\top H u$, the curvature probe).
    Reports: `numerator`, `denominator`, `numerator_ema`, `denominator_ema`.

    Args:
        scale: $\sigma > 0$: 1 is the greedy rule (eq. 3), 2 the on-edge rule (eq. 7).
        ema: $\beta \in [0, 1)$, the EMA weight of the past.
        eps: $\varepsilon \ge 0$ added to $|u^\top H u|$.
        lr_min: lower bound of the learning rate (`0 <= lr_min <= lr_max`).
        lr_max: upper bound of the learning rate (may be inf).
        lr_init: learning rate before the first usable measurement; defaults to the wrapped
            optimizer's learning rate, else 0.
        **unknown: rejected: any other keyword raises.

    Raises:
        ValueError: a setting out of its range (the message names it), or an unknown keyword.

    Examples:
        The law alone, fed what an adapter measures on a probe step:

        >>> from eos_core import CDAT
        >>> law = CDAT(scale=2.0)
        >>> state = law.init(lr=0.1)
        >>> out = law.update(state, {"grad_dot_update": -4.0, "curvature": 2.0})  # n = 4, d = 2
        >>> float(out.lr)  # sigma * n / d
        4.0
        >>> {key: float(out.diagnostics[key]) for key in ("numerator", "denominator", "fallback")}
        {'numerator': 4.0, 'denominator': 2.0, 'fallback': 0.0}
        >>> float(law.update(state, {"grad_dot_update": 1.0, "curvature": 2.0}).lr)  # an ascent direction: lr_min
        0.0
    """

    needs = frozenset({S.GRAD_DOT_UPDATE, S.CURVATURE})
    measurements = ("numerator", "denominator", "numerator_ema", "denominator_ema")

    def __init__(
        self,
        scale: float = 2.0,
        *,
        ema: float = 0.0,
        eps: float = 0.0,
        lr_min: float = 0.0,
        lr_max: float = math.inf,
        lr_init: float | None = None,
        **unknown: Any,
    ) -> None:
        name = type(self).__name__
        check.reject_unknown(name, unknown, ("scale", "ema", "eps", "lr_min", "lr_max", "lr_init"))
        self.scale = check.positive(name, "scale", scale)
        self.ema = check.in_interval(name, "ema", ema, 0.0, 1.0, closed_low=True, closed_high=False)
        self.eps = check.non_negative(name, "eps", eps)
        self.lr_min, self.lr_max = check.lr_bounds(name, lr_min, lr_max)
        self.lr_init = None if lr_init is None else check.non_negative(name, "lr_init", lr_init)
        self._record(scale=self.scale, ema=self.ema, eps=self.eps, lr_min=self.lr_min, lr_max=self.lr_max,
                     lr_init=self.lr_init)

    def init(
        self, lr: float | None = None, *, hyperparams: Mapping[str, float] | None = None,
        numerics: Numerics = NUMPY,
    ) -> CDATState:
        """The state before the first probe: the lr (`lr_init`, else `lr`, else 0) and empty EMAs.

        Args:
            lr: the wrapped optimizer's learning rate, when it has one.
            hyperparams: the optimizer's other settings (unused).
            numerics: the array namespace of the state (numpy here, `jax.numpy` in the JAX adapter).

        Returns:
            The initial [`CDATState`][eos_core.laws.CDATState].
        """
        lr0 = self._initial_lr(self.lr_init, lr, required=False)
        return CDATState(lr=numerics.scalar(lr0), numerator_ema=numerics.scalar(0.0),
                         denominator_ema=numerics.scalar(0.0))

    def update(self, state: CDATState, stats: Mapping[str, Any], *, numerics: Numerics = NUMPY) -> LawOutput:
        """One probe: fold this step's $n$ and $d$ into the EMAs and apply eq. 8.

        Args:
            state: the law's state.
            stats: `grad_dot_update` and `curvature` measured on this step.
            numerics: the array namespace of the state.

        Returns:
            The [`LawOutput`][eos_core.laws.LawOutput]: the learning rate for this step, the new state and the
            diagnostics.
        """
        xp = numerics.xp
        grad_dot_update = numerics.scalar(stats[S.GRAD_DOT_UPDATE])
        curvature = numerics.scalar(stats[S.CURVATURE])
        ok = finite(numerics, grad_dot_update, curvature)
        n = xp.maximum(-safe(numerics, grad_dot_update, ok), 0.0)
        d = xp.abs(safe(numerics, curvature, ok)) + self.eps
        n_ema = xp.where(ok, ema_update(state.numerator_ema, n, self.ema), state.numerator_ema)
        d_ema = xp.where(ok, ema_update(state.denominator_ema, d, self.ema), state.denominator_ema)
        ratio = self.scale * n_ema / xp.where(d_ema > 0, d_ema, numerics.scalar(1.0))
        candidate = numerics.clip(ratio, self.lr_min, self.lr_max)
        usable = ok & (d_ema > 0) & xp.isfinite(candidate)
        lr = xp.where(usable, candidate, state.lr)
        new_state = CDATState(lr=lr, numerator_ema=n_ema, denominator_ema=d_ema)
        diagnostics = self.diagnostics(
            numerics, lr=lr, probed=True, fallback=~usable,
            numerator=xp.where(ok, n, numerics.scalar(math.nan)),
            denominator=xp.where(ok, d, numerics.scalar(math.nan)),
            numerator_ema=n_ema, denominator_ema=d_ema,
        )
        return LawOutput(lr=lr, state=new_state, diagnostics=diagnostics)
