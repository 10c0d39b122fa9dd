"""Backtracking Armijo line search with relative slack (CDAT paper eq. 1 and appendix C.3)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from eos_core import _validation as check
from eos_core import stats as S
from eos_core.laws.base import Law, LawOutput, finite, safe
from eos_core.numerics import NUMPY, Numerics


class ArmijoState(NamedTuple):
    """The state of [`Armijo`][eos_core.laws.Armijo]: the last accepted learning rate."""

    lr: Any  #: last accepted learning rate eta_{t-1}


class Armijo(Law):
    r"""Backtracking line search (CDAT paper eq. 1, appendix C.3).

    From the guess $\eta_{t,0} = \min(c_+ \eta_{t-1}, \eta_{\max})$ the step shrinks by
    `c_minus` until

    $$
    f(w_t + \eta u_t) \le (1 + \delta) f(w_t) + c\, \eta\, g_t^\top u_t
    $$

    holds, for at most `max_tries` trial losses (the paper's mini-batch cap is 30; in full batch it
    searches until the criterion holds, which `max_tries` large enough reproduces). The result is
    the largest trial step that satisfies the condition. `c_plus = inf` restarts every search at
    `lr_max` (the paper's guess 1), and so does a previous rate of 0 (a warm-up scheduler at its
    first step), which would otherwise accept 0 forever. A non-finite trial loss counts as a failed trial.

    Defined outcomes: when no trial satisfies the condition within `max_tries` the smallest trial
    step is taken and `accepted = 0` is reported; non-finite f(w) or g.u keeps the last learning
    rate (`fallback = 1`) without evaluating any trial.

    The adapter provides `trial_loss` (`lr -> f(w + lr u)` on the current batch, no backward).
    The search loop runs through `numerics.while_loop`, so it traces under `jax.jit`.

    Needs per probe: `loss`, `grad_dot_update` and `trial_loss` (forward passes only: first order).
    Reports: `loss`, `trials`, `accepted`.

    Args:
        c: the sufficient-decrease constant, in [0, 1).
        c_plus: growth of the first guess over the last accepted lr (>= 1; inf restarts at `lr_max`).
        c_minus: shrink factor per failed trial, in (0, 1).
        delta: the relative slack $\delta \ge 0$ of appendix C.3.
        max_tries: trial losses per step at most.
        lr_max: the largest step tried (> 0).
        lr_init: the previous lr of the first search (default: the wrapped optimizer's, else `lr_max`).
        **unknown: rejected: any other keyword raises.

    Raises:
        ValueError: a setting out of its range (the message names it), or an unknown keyword.

    Examples:
        On $f(w) = w^2$ at $w = 1$ with $u = -g = -2$: the first guess 1 overshoots, the second (0.8) is accepted.

        >>> from eos_core import Armijo
        >>> law = Armijo(c=1e-4, lr_max=1.0)
        >>> stats = {"loss": 1.0, "grad_dot_update": -4.0, "trial_loss": lambda lr: (1.0 - 2.0 * lr) ** 2}
        >>> out = law.update(law.init(), stats)
        >>> round(float(out.lr), 6), int(out.diagnostics["trials"]), int(out.diagnostics["accepted"])
        (0.8, 2, 1)
    """

    needs = frozenset({S.LOSS, S.GRAD_DOT_UPDATE, S.TRIAL_LOSS})
    measurements = ("loss", "trials", "accepted")

    def __init__(
        self,
        c: float = 1e-4,
        *,
        c_plus: float = 4.0,
        c_minus: float = 0.8,
        delta: float = 0.0,
        max_tries: int = 30,
        lr_max: float = 1.0,
        lr_init: float | None = None,
        **unknown: Any,
    ) -> None:
        name = type(self).__name__
        check.reject_unknown(name, unknown, ("c", "c_plus", "c_minus", "delta", "max_tries", "lr_max", "lr_init"))
        self.c = check.in_interval(name, "c", c, 0.0, 1.0, closed_low=True, closed_high=False)
        self.c_plus = check.as_float(name, "c_plus", c_plus)
        if not self.c_plus >= 1.0:
            raise ValueError(f"{name}: c_plus must be >= 1 (use inf to restart at lr_max), got {c_plus!r}")
        self.c_minus = check.in_interval(name, "c_minus", c_minus, 0.0, 1.0, closed_low=False, closed_high=False)
        self.delta = check.non_negative(name, "delta", delta)
        self.max_tries = check.positive_int(name, "max_tries", max_tries)
        self.lr_max = check.positive(name, "lr_max", lr_max)
        self.lr_init = None if lr_init is None else check.positive(name, "lr_init", lr_init)
        self._record(c=self.c, c_plus=self.c_plus, c_minus=self.c_minus, delta=self.delta,
                     max_tries=self.max_tries, lr_max=self.lr_max, lr_init=self.lr_init)

    def init(
        self, lr: float | None = None, *, hyperparams: Mapping[str, float] | None = None,
        numerics: Numerics = NUMPY,
    ) -> ArmijoState:
        """The state before the first search: the previous lr it grows from (`lr_max` when there is none).

        Args:
            lr: the wrapped optimizer's learning rate, when it has one.
            hyperparams: the optimizer's other settings (unused).
            numerics: the array namespace of the state (numpy here, `jax.numpy` in the JAX adapter).

        Returns:
            The initial [`ArmijoState`][eos_core.laws.ArmijoState].
        """
        # The first search starts from the law's lr_init, else the wrapped optimizer's lr, else lr_max. A
        # zero rate (a warm-up scheduler at its first step) is no previous step to grow from: start at lr_max.
        previous = self.lr_init if self.lr_init is not None else lr
        if previous is not None:
            check.non_negative(type(self).__name__, "initial learning rate", previous)
        lr0 = self.lr_max if previous is None or not float(previous) > 0 else min(float(previous), self.lr_max)
        return ArmijoState(lr=numerics.scalar(lr0))

    def initial_guess(self, state: ArmijoState, *, numerics: Numerics = NUMPY) -> Any:
        """The first trial step `min(c_plus * lr_prev, lr_max)`.

        Args:
            state: the law's state (its `lr` is the previous accepted step).
            numerics: the array namespace of the state.

        Returns:
            The first trial step; `lr_max` when `lr_prev` is not positive (no previous step to grow from: a
            search started at 0 would accept 0 forever).
        """
        if math.isinf(self.c_plus):
            return numerics.scalar(self.lr_max)
        xp = numerics.xp
        grown = xp.minimum(self.c_plus * state.lr, self.lr_max)
        return xp.where(state.lr > 0, grown, numerics.scalar(self.lr_max))

    def satisfied(self, trial: Any, lr: Any, loss: Any, grad_dot_update: Any, *, numerics: Numerics = NUMPY) -> Any:
        r"""The sufficient-decrease condition $f(w + \eta u) \le (1 + \delta) f(w) + c \eta g^\top u$ at step `lr`.

        Args:
            trial: $f(w + \eta u)$, the trial loss.
            lr: $\eta$, the trial step.
            loss: $f(w)$.
            grad_dot_update: $g^\top u$.
            numerics: the array namespace.

        Returns:
            Whether the condition holds (False for a non-finite trial loss).
        """
        bound = (1.0 + self.delta) * loss + self.c * lr * grad_dot_update
        return numerics.xp.isfinite(trial) & (trial <= bound)

    def update(self, state: ArmijoState, stats: Mapping[str, Any], *, numerics: Numerics = NUMPY) -> LawOutput:
        """One search: backtrack from the first guess until the condition holds.

        Args:
            state: the law's state.
            stats: `loss`, `grad_dot_update` and `trial_loss` (`lr -> f(w + lr u)` on this batch).
            numerics: the array namespace of the state.

        Returns:
            The [`LawOutput`][eos_core.laws.LawOutput]: the learning rate for this step, the new state and the
            diagnostics.
        """
        xp = numerics.xp
        loss = numerics.scalar(stats[S.LOSS])
        grad_dot_update = numerics.scalar(stats[S.GRAD_DOT_UPDATE])
        trial_loss: Callable[[Any], Any] = stats[S.TRIAL_LOSS]
        usable = finite(numerics, loss, grad_dot_update)
        loss_safe, gu_safe = safe(numerics, loss, usable), safe(numerics, grad_dot_update, usable)

        def keep_searching(carry: tuple[Any, Any, Any]) -> Any:
            _, tries, accepted = carry
            return usable & ~accepted & (tries < self.max_tries)

        def try_step(carry: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
            lr, tries, _ = carry
            ok = self.satisfied(numerics.scalar(trial_loss(lr)), lr, loss_safe, gu_safe, numerics=numerics)
            return xp.where(ok, lr, lr * self.c_minus), tries + 1, ok

        start = self.initial_guess(state, numerics=numerics)
        lr, tries, accepted = numerics.while_loop(
            keep_searching, try_step, (start, numerics.scalar(0.0), xp.asarray(False))
        )
        # A failed search shrank once more after its last trial: take back that untested shrink.
        lr = xp.where(accepted, lr, lr / self.c_minus)
        lr = xp.where(usable, lr, state.lr)
        diagnostics = self.diagnostics(numerics, lr=lr, probed=True, fallback=~usable, loss=loss, trials=tries,
                                       accepted=xp.where(accepted, 1.0, 0.0))
        return LawOutput(lr=lr, state=ArmijoState(lr=lr), diagnostics=diagnostics)
