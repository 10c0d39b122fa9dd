"""Polyak step size (CDAT paper appendix B.2, eq. 14)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from eos_core import _validation as check
from eos_core import stats as S
from eos_core.laws.base import Law, LawOutput, finite, safe
from eos_core.numerics import NUMPY, Numerics


class PolyakState(NamedTuple):
    """The state of [`Polyak`][eos_core.laws.Polyak]: the last learning rate."""

    lr: Any


class Polyak(Law):
    r"""Polyak step size (CDAT paper eq. 14).

    $$
    \eta_t = \operatorname{clip}\Big(\frac{f(w_t) - f^\star}{\|\nabla f(w_t)\|^2},\ \eta_{\min}, \eta_{\max}\Big)
    $$

    `f_star` is the minimum of the objective (0 for a network that can interpolate its data).
    The rule is derived for u = -g; with other base optimizers it is still eq. 14 applied to the
    gradient. The paper takes the better of `lr_max` in {1, 100}.

    Defined outcomes: f(w) <= f_star gives `lr_min`; g = 0 (nothing to step along), non-finite
    statistics or an overflowing ratio with `lr_max = inf` keep the last learning rate
    (`fallback = 1`).

    Needs per probe: `loss` and `grad_norm_sq` (first order). Reports both.

    Args:
        f_star: $f^\star$, the minimum of the objective.
        lr_max: $\eta_{\max}$.
        lr_min: lower bound of the learning rate.
        lr_init: the learning rate before the first measurement.
        **unknown: rejected: any other keyword raises.

    Raises:
        ValueError: a setting out of its range (the message names it), or an unknown keyword.

    Examples:
        >>> from eos_core import Polyak
        >>> law = Polyak(f_star=0.0, lr_max=1.0)
        >>> float(law.update(law.init(), {"loss": 2.0, "grad_norm_sq": 4.0}).lr)  # (f - f*) / |g|^2
        0.5
        >>> float(law.update(law.init(), {"loss": 20.0, "grad_norm_sq": 4.0}).lr)  # capped at lr_max
        1.0
    """

    needs = frozenset({S.LOSS, S.GRAD_NORM_SQ})
    measurements = ("loss", "grad_norm_sq")

    def __init__(self, f_star: float = 0.0, *, lr_max: float = 1.0, lr_min: float = 0.0,
                 lr_init: float | None = None, **unknown: Any) -> None:
        name = type(self).__name__
        check.reject_unknown(name, unknown, ("f_star", "lr_max", "lr_min", "lr_init"))
        self.f_star = check.as_float(name, "f_star", f_star)
        self.lr_min, self.lr_max = check.lr_bounds(name, lr_min, lr_max)
        self.lr_init = None if lr_init is None else check.non_negative(name, "lr_init", lr_init)
        self._record(f_star=self.f_star, lr_max=self.lr_max, lr_min=self.lr_min, lr_init=self.lr_init)

    def init(
        self, lr: float | None = None, *, hyperparams: Mapping[str, float] | None = None,
        numerics: Numerics = NUMPY,
    ) -> PolyakState:
        """The state before the first probe: `lr_init`, else `lr`, else 0.

        Args:
            lr: the wrapped optimizer's learning rate, when it has one.
            hyperparams: the optimizer's other settings (unused).
            numerics: the array namespace of the state (numpy here, `jax.numpy` in the JAX adapter).

        Returns:
            The initial [`PolyakState`][eos_core.laws.PolyakState].
        """
        return PolyakState(lr=numerics.scalar(self._initial_lr(self.lr_init, lr, required=False)))

    def update(self, state: PolyakState, stats: Mapping[str, Any], *, numerics: Numerics = NUMPY) -> LawOutput:
        """One probe: eq. 14 with this step's loss and gradient norm.

        Args:
            state: the law's state.
            stats: `loss` and `grad_norm_sq` of this step.
            numerics: the array namespace of the state.

        Returns:
            The [`LawOutput`][eos_core.laws.LawOutput]: the learning rate for this step, the new state and the
            diagnostics.
        """
        xp = numerics.xp
        loss = numerics.scalar(stats[S.LOSS])
        grad_norm_sq = numerics.scalar(stats[S.GRAD_NORM_SQ])
        measured = finite(numerics, loss, grad_norm_sq) & (grad_norm_sq > 0)
        gap = xp.maximum(safe(numerics, loss, measured) - self.f_star, 0.0)
        candidate = numerics.clip(gap / safe(numerics, grad_norm_sq, measured, fill=1.0), self.lr_min, self.lr_max)
        usable = measured & xp.isfinite(candidate)
        lr = xp.where(usable, candidate, state.lr)
        diagnostics = self.diagnostics(numerics, lr=lr, probed=True, fallback=~usable, loss=loss,
                                       grad_norm_sq=grad_norm_sq)
        return LawOutput(lr=lr, state=PolyakState(lr=lr), diagnostics=diagnostics)
