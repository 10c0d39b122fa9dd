"""DCAO: learning rate, momentum and weight decay from the top Hessian eigenvalues (DCAO proposal, 3.2)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from eos_core import _validation as check
from eos_core import stats as S
from eos_core.laws.base import Law, LawOutput, finite, safe
from eos_core.numerics import NUMPY, Numerics
from eos_core.request import StatsRequest


class DCAOState(NamedTuple):
    """The state of [`DCAO`][eos_core.laws.DCAO]: the lr, momentum and weight decay it set last."""

    lr: Any
    momentum: Any
    weight_decay: Any


class DCAO(Law):
    r"""Dynamic Curvature-Aware Optimizer rules (DCAO proposal, section 3.2.3).

    Every probe (`probe_every = T` steps) the adapter runs top-`num_eigenvalues` Lanczos on H
    (or on the preconditioned Hessian with `preconditioned=True`). With
    $r = \eta_t \lambda_1$ and target C:

    $$
    \eta_{t+1} = \eta_t\,\operatorname{clip}(C / r,\ \gamma_{\rm down}, \gamma_{\rm up}),\qquad
    \beta_{t+1} = \operatorname{clip}\big(\beta_t (1 - a_\beta (r - C)),\ \beta_{\min}, \beta_{\max}\big),
    $$

    $$
    \lambda_{wd,t+1} = \operatorname{clip}\big(\lambda_{wd,t} (1 + a_{wd} (r - C)),\ wd_{\min}, wd_{\max}\big).
    $$

    Momentum is the base optimizer's momentum (SGD `momentum`, Adam `beta1`), weight decay its
    `weight_decay`; the adapter writes both back into the wrapped optimizer. The rules are
    multiplicative, so a momentum or weight decay that starts at 0 stays at 0 unless the lower bound
    is positive. Reports lambda_1, lambda_2 and the gap lambda_1 - lambda_2 (NaN when k = 1).

    Defined outcomes: lambda_1 <= 0 means no curvature limits the step: the learning-rate factor is
    `gamma_up` and r is taken as 0 in the momentum and weight-decay rules. Non-finite eigenvalues
    keep every setting unchanged (`fallback = 1`).

    `lanczos_steps` defaults to 20 ([`eos_core.request.LANCZOS_STEPS`][]; the proposal ablates 5, 10 and 20), at least
    `num_eigenvalues`. `lr_lambda_1` reports r, with the lr before this probe's update.

    Needs per probe: `top_eigenvalues` (or `preconditioned_top_eigenvalues`) by Lanczos (a spectral estimator).

    Args:
        target: C > 0, the target of lr * lambda_1.
        lr_factor_bounds: $(\gamma_{\rm down}, \gamma_{\rm up})$, the lr's change per probe (positive, ordered).
        momentum_sensitivity: $a_\beta \ge 0$.
        momentum_bounds: $(\beta_{\min}, \beta_{\max})$, in [0, 1).
        weight_decay_sensitivity: $a_{wd} \ge 0$.
        weight_decay_bounds: $(wd_{\min}, wd_{\max})$, non-negative.
        num_eigenvalues: k of top-k Lanczos.
        lanczos_steps: Lanczos steps per probe (default 20), at least k.
        preconditioned: eigenvalues of $P^{-1/2} H P^{-1/2}$.
        lr_min: lower bound of the learning rate.
        lr_max: upper bound of the learning rate (may be inf).
        lr_init: the starting learning rate (> 0; default: the wrapped optimizer's).
        **unknown: rejected: any other keyword raises.

    Raises:
        ValueError: a setting out of its range (the message names it), or an unknown keyword.

    Examples:
        >>> import numpy as np
        >>> from eos_core import DCAO
        >>> law = DCAO(target=1.5)
        >>> state = law.init(lr=0.1, hyperparams={"momentum": 0.9, "weight_decay": 1e-4})
        >>> out = law.update(state, {"top_eigenvalues": np.array([20.0, 5.0])})  # r = 0.1 * 20 = 2 > C
        >>> round(float(out.lr), 6)  # C / r = 0.75, clipped to the lower bound 0.8
        0.08
        >>> round(float(out.hyperparams["momentum"]), 6), round(float(out.hyperparams["weight_decay"]), 9)
        (0.855, 0.000105)
    """

    decides = ("momentum", "weight_decay")
    measurements = ("lambda_1", "lambda_2", "gap", "lr_lambda_1")

    def __init__(
        self,
        target: float = 1.5,
        *,
        lr_factor_bounds: tuple[float, float] = (0.8, 1.1),
        momentum_sensitivity: float = 0.1,
        momentum_bounds: tuple[float, float] = (0.0, 0.999),
        weight_decay_sensitivity: float = 0.1,
        weight_decay_bounds: tuple[float, float] = (0.0, 1.0),
        num_eigenvalues: int = 2,
        lanczos_steps: int | None = None,
        preconditioned: bool = False,
        lr_min: float = 0.0,
        lr_max: float = math.inf,
        lr_init: float | None = None,
        **unknown: Any,
    ) -> None:
        name = type(self).__name__
        check.reject_unknown(name, unknown, (
            "target", "lr_factor_bounds", "momentum_sensitivity", "momentum_bounds", "weight_decay_sensitivity",
            "weight_decay_bounds", "num_eigenvalues", "lanczos_steps", "preconditioned", "lr_min", "lr_max",
            "lr_init"))
        self.target = check.positive(name, "target", target)
        self.lr_factor_bounds = check.ordered_pair(name, "lr_factor_bounds", lr_factor_bounds)
        if not self.lr_factor_bounds[0] > 0:
            raise ValueError(f"{name}: lr_factor_bounds must be positive, got {lr_factor_bounds!r}")
        self.momentum_sensitivity = check.non_negative(name, "momentum_sensitivity", momentum_sensitivity)
        self.momentum_bounds = check.ordered_pair(name, "momentum_bounds", momentum_bounds, low=0.0)
        if self.momentum_bounds[1] >= 1.0:
            raise ValueError(f"{name}: momentum_bounds must stay below 1, got {momentum_bounds!r}")
        self.weight_decay_sensitivity = check.non_negative(name, "weight_decay_sensitivity",
                                                           weight_decay_sensitivity)
        self.weight_decay_bounds = check.ordered_pair(name, "weight_decay_bounds", weight_decay_bounds, low=0.0)
        self.num_eigenvalues = check.positive_int(name, "num_eigenvalues", num_eigenvalues)
        self.lanczos_steps = None if lanczos_steps is None else check.positive_int(name, "lanczos_steps",
                                                                                     lanczos_steps)
        if self.lanczos_steps is not None and self.lanczos_steps < self.num_eigenvalues:
            raise ValueError(f"{name}: lanczos_steps must be >= num_eigenvalues")
        self.preconditioned = bool(preconditioned)
        self.lr_min, self.lr_max = check.lr_bounds(name, lr_min, lr_max)
        self.lr_init = None if lr_init is None else check.positive(name, "lr_init", lr_init)
        self.needs = frozenset({S.PRECONDITIONED_TOP_EIGENVALUES if self.preconditioned else S.TOP_EIGENVALUES})
        self._record(target=self.target, lr_factor_bounds=self.lr_factor_bounds,
                     momentum_sensitivity=self.momentum_sensitivity, momentum_bounds=self.momentum_bounds,
                     weight_decay_sensitivity=self.weight_decay_sensitivity,
                     weight_decay_bounds=self.weight_decay_bounds, num_eigenvalues=self.num_eigenvalues,
                     lanczos_steps=self.lanczos_steps, preconditioned=self.preconditioned,
                     lr_min=self.lr_min, lr_max=self.lr_max, lr_init=self.lr_init)

    @property
    def eigenvalues_key(self) -> str:
        """The statistic it consumes: `top_eigenvalues` or `preconditioned_top_eigenvalues`."""
        return next(iter(self.needs))

    def request(self) -> StatsRequest:
        """What an adapter measures: the top eigenvalues by Lanczos.

        Returns:
            The request: top-`num_eigenvalues` Lanczos with `lanczos_steps` steps (default
            [`eos_core.request.LANCZOS_STEPS`][]).
        """
        return StatsRequest.build(self.needs, num_eigenvalues=self.num_eigenvalues, lanczos_steps=self.lanczos_steps,
                                  owner="DCAO")

    def init(
        self, lr: float | None = None, *, hyperparams: Mapping[str, float] | None = None,
        numerics: Numerics = NUMPY,
    ) -> DCAOState:
        """The state before the first probe: the starting lr, the optimizer's momentum and weight decay.

        Args:
            lr: the wrapped optimizer's learning rate, when it has one.
            hyperparams: the optimizer's other settings (`momentum` and `weight_decay`; 0 when absent).
            numerics: the array namespace of the state (numpy here, `jax.numpy` in the JAX adapter).

        Returns:
            The initial [`DCAOState`][eos_core.laws.DCAOState].

        Raises:
            ValueError: no positive starting learning rate, or a momentum / weight decay out of range.
        """
        hyperparams = dict(hyperparams or {})
        lr0 = self._initial_lr(self.lr_init, lr, required=True)
        if not lr0 > 0:
            raise ValueError("DCAO: the initial learning rate must be > 0 (a multiplicative rule cannot leave 0)")
        momentum = check.in_interval("DCAO", "initial momentum", hyperparams.get("momentum", 0.0), 0.0, 1.0,
                                     closed_low=True, closed_high=False)
        weight_decay = check.non_negative("DCAO", "initial weight_decay", hyperparams.get("weight_decay", 0.0))
        return DCAOState(lr=numerics.scalar(lr0), momentum=numerics.scalar(momentum),
                         weight_decay=numerics.scalar(weight_decay))

    def update(self, state: DCAOState, stats: Mapping[str, Any], *, numerics: Numerics = NUMPY) -> LawOutput:
        """One probe: the three rules with this probe's lambda_1.

        Args:
            state: the law's state.
            stats: `top_eigenvalues` (or `preconditioned_top_eigenvalues`), descending, shape (k,).
            numerics: the array namespace of the state.

        Returns:
            The [`LawOutput`][eos_core.laws.LawOutput]: the learning rate for this step, the new state and the
            diagnostics.
        """
        xp = numerics.xp
        eigenvalues = xp.asarray(stats[self.eigenvalues_key], dtype=numerics.dtype).reshape(-1)
        lambda_1 = eigenvalues[0]
        lambda_2 = eigenvalues[1] if eigenvalues.shape[0] > 1 else numerics.scalar(math.nan)
        usable = finite(numerics, lambda_1)
        lam = xp.maximum(safe(numerics, lambda_1, usable), 0.0)
        r = state.lr * lam
        low, high = self.lr_factor_bounds
        # C / r is clipped to at most `high`, so flooring r at C / high changes nothing but keeps
        # r <= 0 and tiny r finite (both give the full increase `high`).
        factor = numerics.clip(self.target / xp.maximum(r, self.target / high), low, high)
        lr = numerics.clip(state.lr * factor, self.lr_min, self.lr_max)
        momentum = numerics.clip(state.momentum * (1.0 - self.momentum_sensitivity * (r - self.target)),
                                 *self.momentum_bounds)
        weight_decay = numerics.clip(state.weight_decay * (1.0 + self.weight_decay_sensitivity * (r - self.target)),
                                     *self.weight_decay_bounds)
        new_state = DCAOState(
            lr=xp.where(usable, lr, state.lr),
            momentum=xp.where(usable, momentum, state.momentum),
            weight_decay=xp.where(usable, weight_decay, state.weight_decay),
        )
        diagnostics = self.diagnostics(
            numerics, lr=new_state.lr, probed=True, fallback=~usable, lambda_1=lambda_1, lambda_2=lambda_2,
            gap=lambda_1 - lambda_2, lr_lambda_1=state.lr * lambda_1,
        )
        return LawOutput(lr=new_state.lr, state=new_state, diagnostics=diagnostics,
                         hyperparams={"momentum": new_state.momentum, "weight_decay": new_state.weight_decay})
