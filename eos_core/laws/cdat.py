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

NUMERATORS = ("same-batch", "previous-update")
DECAYS = ("cosine", "linear")


class CDATState(NamedTuple):
    """The state of [`CDAT`][eos_core.laws.CDAT]: the last lr, the two EMAs of eq. 8 and the step count."""

    lr: Any  #: last learning rate of the rule before any decay (the fallback when a measurement is unusable)
    numerator_ema: Any  #: n~, EMA of n_t (0 before the first measurement)
    denominator_ema: Any  #: d~, EMA of d_t (0 before the first measurement)
    count: Any = 0  #: steps taken (probes and holds), an integer: the position in the horizon of `decay`


def decay_factor(decay: str | None, count: Any, horizon: int | None, *, numerics: Numerics = NUMPY) -> Any:
    r"""The horizon decay $s(p)$ at step `count` of `horizon`: $p = \min(t / T, 1)$.

    $s(p) = (1 + \cos \pi p) / 2$ (`"cosine"`), $1 - p$ (`"linear"`), 1 without a decay.

    Args:
        decay: `"cosine"`, `"linear"` or None.
        count: the step $t$ (0-based).
        horizon: $T$, the number of steps of the run.
        numerics: the array namespace.

    Returns:
        The factor, a 0-d array.
    """
    xp = numerics.xp
    if decay is None or horizon is None:
        return numerics.scalar(1.0)
    progress = numerics.clip(numerics.scalar(count) / float(horizon), 0.0, 1.0)
    if decay == "cosine":
        return 0.5 * (1.0 + xp.cos(math.pi * progress))
    return 1.0 - progress


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

    **Mini-batches: an unbiased numerator** (`numerator="previous-update"`). On a mini-batch, $u_t$ is built
    from $g_t$, so $-g_t^\top u_t$ holds the batch's own noise along $u_t$ and overstates the descent of the
    expected loss, more and more as the gradient's signal-to-noise falls late in training. With the previous
    update $u_{t-1}$ (for lr 1), the rate $\eta_{t-1}$ applied to it and the current batch's gradient, which
    $u_{t-1}$ did not see, corrected to first order back to $w_{t-1}$:

    $$
    n_t = -g_t(w_t)^\top u_{t-1} + \eta_{t-1}\, u_{t-1}^\top H_t u_{t-1}, \qquad
    d_t = |u_{t-1}^\top H_t u_{t-1}| + \varepsilon,
    $$

    since $g_t(w_{t-1}) = g_t(w_t) - \eta_{t-1} H_t u_{t-1} + O(\eta^2)$; $\mathbb{E}[n_t]$ is the expected
    loss's descent along $u_{t-1}$, and both $n$ and $d$ describe that one direction. The EMA runs over the
    signed $n_t$ and the rate is $\sigma \max(\tilde n, 0) / \tilde d$. It costs what the same-batch rule
    costs (one curvature probe, along $u_{t-1}$ instead of $u_t$) plus one dot product; the adapter keeps
    $u_{t-1}$ (one parameter-sized vector). On the first probe, without a previous update, the rate stays
    `lr_init`.

    **A decay over a known horizon** (`decay="cosine"` or `"linear"`, `horizon=T`): the applied rate is
    the rule's times $s(t/T)$ (see [`decay_factor`][eos_core.laws.cdat.decay_factor]), no warm-up and no
    peak learning rate. The Lightning and Hugging Face callbacks fill in `horizon` from the trainer's number
    of optimizer steps when it is None ([`with_horizon`][eos_core.laws.CDAT.with_horizon]).

    Needs per probe: `grad_dot_update` ($g^\top u$) and `curvature` ($u^\top H u$, the curvature probe); with
    `numerator="previous-update"`: `grad_dot_previous_update`, `previous_update_curvature`, `previous_lr`.
    Reports: `numerator`, `denominator`, `numerator_ema`, `denominator_ema`, and `decay` with a decay.

    Args:
        scale: $\sigma > 0$: 1 is the greedy rule (eq. 3), 2 the on-edge rule (eq. 7).
        ema: $\beta \in [0, 1)$, the EMA weight of the past.
        eps: $\varepsilon \ge 0$ added to $|u^\top H u|$.
        lr_min: lower bound of the learning rate (`0 <= lr_min <= lr_max`).
        lr_max: upper bound of the learning rate (may be inf).
        lr_init: learning rate before the first usable measurement; defaults to the wrapped
            optimizer's learning rate, else 0.
        numerator: `"same-batch"` (eq. 8) or `"previous-update"` (the unbiased mini-batch numerator above).
        decay: None, `"cosine"` or `"linear"`: multiply the rate by a decay to 0 over `horizon` steps.
        horizon: the number of optimizer steps of the run (needed by `decay` before the first step; the
            trainer callbacks set it).
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
    optional_state_fields = ("count",)

    def __init__(
        self,
        scale: float = 2.0,
        *,
        ema: float = 0.0,
        eps: float = 0.0,
        lr_min: float = 0.0,
        lr_max: float = math.inf,
        lr_init: float | None = None,
        numerator: str = "same-batch",
        decay: str | None = None,
        horizon: int | None = None,
        **unknown: Any,
    ) -> None:
        name = type(self).__name__
        check.reject_unknown(name, unknown, ("scale", "ema", "eps", "lr_min", "lr_max", "lr_init", "numerator",
                                             "decay", "horizon"))
        self.scale = check.positive(name, "scale", scale)
        self.ema = check.in_interval(name, "ema", ema, 0.0, 1.0, closed_low=True, closed_high=False)
        self.eps = check.non_negative(name, "eps", eps)
        self.lr_min, self.lr_max = check.lr_bounds(name, lr_min, lr_max)
        self.lr_init = None if lr_init is None else check.non_negative(name, "lr_init", lr_init)
        if numerator not in NUMERATORS:
            raise ValueError(f"{name}: numerator must be one of {', '.join(NUMERATORS)}, got {numerator!r}")
        if decay is not None and decay not in DECAYS:
            raise ValueError(f"{name}: decay must be None, 'cosine' or 'linear', got {decay!r}")
        self.numerator = numerator
        self.decay = decay
        self.horizon = None if horizon is None else check.positive_int(name, "horizon", horizon)
        if numerator == "previous-update":
            self.needs = frozenset({S.GRAD_DOT_PREVIOUS_UPDATE, S.PREVIOUS_UPDATE_CURVATURE, S.PREVIOUS_LR})
        if decay is not None:
            self.measurements = (*type(self).measurements, "decay")
        self._record(scale=self.scale, ema=self.ema, eps=self.eps, lr_min=self.lr_min, lr_max=self.lr_max,
                     lr_init=self.lr_init, numerator=self.numerator, decay=self.decay, horizon=self.horizon)

    @classmethod
    def minibatch(cls, **overrides: Any) -> CDAT:
        r"""The mini-batch configuration: the previous-update numerator, scale 2, a slow EMA.

        $$
        n_t = -g_t(w_t)^\top u_{t-1} + \eta_{t-1}\, u_{t-1}^\top H_t u_{t-1}, \qquad
        d_t = |u_{t-1}^\top H_t u_{t-1}|,
        $$

        $$
        \tilde n_{t+1} = (1-\beta) n_t + \beta \tilde n_t, \qquad
        \tilde d_{t+1} = (1-\beta) d_t + \beta \tilde d_t, \qquad
        \eta_t = \sigma \max(\tilde n_{t+1}, 0) / \tilde d_{t+1},
        $$

        with $\sigma = 2$ (the on-edge rule of eq. 7 applied to the expected loss along $u_{t-1}$) and
        $\beta = 0.99$. The numerator is measured with a batch the update did not see, so it does not overstate
        the descent as the gradient's signal-to-noise falls (the same-batch numerator of eq. 8 does, more and more
        late in training); it shrinks by itself as the run converges, so no decay is set. Chosen on the
        mini-batch suite (`benchmarks/minibatch`: a character-level GPT, a CNN and an MLP, Adam base) as the
        setting with the best worst task among the variants tried; see the README's mini-batch table for what it
        reaches against a tuned warm-up + cosine schedule and the learning-rate-free optimizers. Run it with
        `route="fd-onesided"` (one extra gradient per probe).

        Args:
            **overrides: any other CDAT argument (e.g. `lr_min`, `decay="cosine"`), or a different `scale` /
                `ema`.

        Returns:
            `CDAT(scale=2.0, ema=0.99, numerator="previous-update", **overrides)`.

        Examples:
            >>> from eos_core import CDAT
            >>> law = CDAT.minibatch()
            >>> law.scale, law.ema, law.numerator
            (2.0, 0.99, 'previous-update')
        """
        settings: dict[str, Any] = {"scale": 2.0, "ema": 0.99, "numerator": "previous-update"}
        settings.update(overrides)
        return cls(**settings)

    @property
    def needs_horizon(self) -> bool:
        """True when a decay is set and its horizon is not (a trainer callback fills it in)."""
        return self.decay is not None and self.horizon is None

    def with_horizon(self, horizon: int) -> CDAT:
        """This law with `horizon` set (itself when it has one already or no decay).

        Args:
            horizon: the number of optimizer steps of the run.

        Returns:
            A law equal to this one but for `horizon`.
        """
        if not self.needs_horizon:
            return self
        return type(self)(**{**self._settings(), "horizon": horizon})

    def _settings(self) -> dict[str, Any]:
        settings = dict(self._config)
        for key, default in (("numerator", "same-batch"), ("decay", None), ("horizon", None)):
            if settings.get(key) == default:  # keep reprs and configs of the classic rule as they were
                settings.pop(key)
        return settings

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

        Raises:
            ValueError: a decay without a horizon.
        """
        if self.needs_horizon:
            raise ValueError("CDAT: decay needs horizon=<number of optimizer steps of the run> (the Lightning and "
                             "Hugging Face callbacks fill it in; elsewhere pass it, or use law.with_horizon(T))")
        lr0 = self._initial_lr(self.lr_init, lr, required=False)
        return CDATState(lr=numerics.scalar(lr0), numerator_ema=numerics.scalar(0.0),
                         denominator_ema=numerics.scalar(0.0), count=numerics.counter(0))

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
        n, d, ok, measured = self._pair(stats, numerics)
        signed = self.numerator == "previous-update"  # the unbiased numerator is averaged with its sign
        n_ema = xp.where(ok, ema_update(state.numerator_ema, n, self.ema), state.numerator_ema)
        d_ema = xp.where(ok, ema_update(state.denominator_ema, d, self.ema), state.denominator_ema)
        numerator = xp.maximum(n_ema, 0.0) if signed else n_ema
        ratio = self.scale * numerator / xp.where(d_ema > 0, d_ema, numerics.scalar(1.0))
        candidate = numerics.clip(ratio, self.lr_min, self.lr_max)
        usable = ok & (d_ema > 0) & xp.isfinite(candidate)
        rule_lr = xp.where(usable, candidate, state.lr)
        factor = decay_factor(self.decay, state.count, self.horizon, numerics=numerics)
        lr = rule_lr * factor
        new_state = CDATState(lr=rule_lr, numerator_ema=n_ema, denominator_ema=d_ema, count=state.count + 1)
        nan = numerics.scalar(math.nan)
        extra = {"decay": factor} if self.decay is not None else {}
        diagnostics = self.diagnostics(
            numerics, lr=lr, probed=True, fallback=measured & ~usable,
            numerator=xp.where(ok, n, nan), denominator=xp.where(ok, d, nan),
            numerator_ema=n_ema, denominator_ema=d_ema, **extra,
        )
        return LawOutput(lr=lr, state=new_state, diagnostics=diagnostics)

    def _pair(self, stats: Mapping[str, Any], numerics: Numerics) -> tuple[Any, Any, Any, Any]:
        """The numerator and denominator of this probe.

        Returns:
            `(n, d, ok, measured)`: ok when both are usable; measured unless there was nothing to measure yet
            (no previous update: not a fallback).
        """
        xp = numerics.xp
        if self.numerator == "same-batch":
            grad_dot_update = numerics.scalar(stats[S.GRAD_DOT_UPDATE])
            curvature = numerics.scalar(stats[S.CURVATURE])
            ok = finite(numerics, grad_dot_update, curvature)
            n = xp.maximum(-safe(numerics, grad_dot_update, ok), 0.0)
            return n, xp.abs(safe(numerics, curvature, ok)) + self.eps, ok, xp.asarray(True)
        grad_dot = numerics.scalar(stats[S.GRAD_DOT_PREVIOUS_UPDATE])
        curvature = numerics.scalar(stats[S.PREVIOUS_UPDATE_CURVATURE])
        previous_lr = numerics.scalar(stats[S.PREVIOUS_LR])
        measured = finite(numerics, previous_lr)  # NaN: no previous update yet (lr 0 is a measurement: w_t = w_{t-1})
        ok = measured & finite(numerics, grad_dot, curvature)
        c = safe(numerics, curvature, ok)
        n = -safe(numerics, grad_dot, ok) + safe(numerics, previous_lr, ok) * c
        return n, xp.abs(c) + self.eps, ok, measured

    def hold(self, state: CDATState, *, numerics: Numerics = NUMPY) -> LawOutput:
        """A step without a probe: the last rate, times the decay at this step.

        Args:
            state: the law's state.
            numerics: the array namespace of the state.

        Returns:
            The [`LawOutput`][eos_core.laws.LawOutput] of this step (the count advances).
        """
        factor = decay_factor(self.decay, state.count, self.horizon, numerics=numerics)
        lr = state.lr * factor
        extra = {"decay": factor} if self.decay is not None else {}
        return LawOutput(lr=lr, state=state._replace(count=state.count + 1),
                         diagnostics=self.diagnostics(numerics, lr=lr, probed=False, **extra))
