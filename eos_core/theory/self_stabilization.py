r"""The self-stabilisation model of the edge of stability, with a learning-rate rule (CDAT paper, eq. 4-6).

Roulet et al. (2024), section 2.3 and appendix A, take the model of Damian et al. (2022): along the top
eigenvector v of the Hessian, x_t = v^T w_t and the sharpness lambda_t = lambda_max(H(w_t)) evolve as

$$
x_{t+1} = (1 - \eta_t \lambda_t)\, x_t, \qquad
\lambda_{t+1} = \eta_t\,(a - b\, x_t^2) + \lambda_t \qquad\text{(eq. 4)}
$$

where a = -grad(lambda).grad(f) drives progressive sharpening and b = ||grad(lambda)||^2 the non-linear
negative feedback. In the normalised variables p = x^2 and y = eta lambda - 2 (y = 0 is the edge):

$$
p_{t+1} = (1 + y_t)^2 p_t, \qquad
y_{t+1} = \eta_{t+1}\,[\eta_t (a - b p_t)] + \frac{\eta_{t+1}}{\eta_t} y_t
          + 2\Big[\frac{\eta_{t+1}}{\eta_t} - 1\Big] \qquad\text{(eq. 5)}
$$

Two learning-rate rules are provided: a constant eta (the original model) and the "fixed-y tuner" of eq. 6,
eta_t = 2 (1 - eps) / lambda_t, which keeps y_t = -2 eps: the paper's model of classical tuners that settle
just below the edge (Fig. 4 uses eta = 1.9 / lambda, i.e. eps = 0.05 and y = -0.1; the text calls that
value "-eps", eq. 6 gives -2 eps; we follow eq. 6).

Settings (paper appendix C.5, Fig. 4, 10): constant lr a = 3e-2, b = 3e-1, eta = 1; fixed-y rule a = 1,
b = 0.5, eta_0 = 1. The paper gives no x_0 or lambda_0. We start both runs from the same state,
x_0 = 0.3 and lambda_0 = 1.9 (y_0 = -0.1: what eta_0 = 1 means for the fixed-y rule), so that the
constant-lr run sharpens progressively from 1.9 up to the edge 2/eta = 2 before oscillating around it.

**The constant-lr model is only quasi-stable.** At its edge fixed point (p* = a/b, lambda* = 2/eta) the
Jacobian of eq. 4 in (p, lambda) has eigenvalues 1 +- i eta sqrt(2a), of modulus sqrt(1 + 2 eta^2 a) > 1
(1.03 per step at the paper's settings): the explicit map spirals out, the oscillation of y roughly
doubles every cycle (about 26 steps), and a run eventually collapses (lambda near 1 crushes x, the next
overshoot is too large: with the defaults lambda turns negative at step 104 and blows up a few steps
later). The paper's "quasi-stable oscillations" are the first cycles, which the default `steps = 85`
shows: lambda oscillates around 2/eta, its mean over the last 20% of the steps within 1% of 2/eta. The
map is written exactly as eq. 4, with x_t (not x_{t+1}) in the sharpness update; runs that diverge return
inf/nan rather than raising.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from eos_core import _validation as check

__all__ = [
    "SelfStabilizationTrajectory",
    "eq4_step",
    "fixed_y_lr",
    "simulate_constant_lr",
    "simulate_fixed_y",
    "simulate_self_stabilization",
]

LRRule = Callable[[int, float, float], float]
"""A learning-rate rule for eq. 4: `rule(t, x_t, lambda_t) -> eta_t`."""


class SelfStabilizationTrajectory(NamedTuple):
    """Trajectory of eq. 4, states t = 0..steps (each array has `steps + 1` entries).

    `eta[t]` is the learning rate the rule picks in state t (the one applied to go from t to t + 1;
    the last entry is what the rule would use next). `p` and `y` are eq. 5's normalised variables.
    """

    eta: np.ndarray  #: eta_t
    sharpness: np.ndarray  #: lambda_t
    x: np.ndarray  #: x_t, projection on the top eigenvector
    p: np.ndarray  #: p_t = x_t^2
    y: np.ndarray  #: y_t = eta_t lambda_t - 2 (0 is the edge of stability)


def eq4_step(x: float, sharpness: float, eta: float, *, a: float, b: float) -> tuple[float, float]:
    """One step of eq. 4: `(x_{t+1}, lambda_{t+1}) = ((1 - eta lambda) x, eta (a - b x^2) + lambda)`."""
    return (1.0 - eta * sharpness) * x, eta * (a - b * x * x) + sharpness


def fixed_y_lr(sharpness: float, *, eps: float = 0.05) -> float:
    """Eq. 6: `eta = 2 (1 - eps) / lambda`, which holds y = eta lambda - 2 at -2 eps.

    Args:
        sharpness: lambda.
        eps: the distance below the edge.

    Returns:
        The learning rate; nan when `sharpness <= 0` (the rule is undefined there).
    """
    return 2.0 * (1.0 - eps) / sharpness if sharpness > 0 else math.nan


def simulate_self_stabilization(
    lr_rule: LRRule, *, steps: int, a: float, b: float, x0: float, lambda0: float
) -> SelfStabilizationTrajectory:
    """Iterate eq. 4 for `steps` steps with eta_t = `lr_rule(t, x_t, lambda_t)`.

    Args:
        lr_rule: the learning-rate rule (any callable of (t, x_t, lambda_t)).
        steps: number of updates (>= 1); the trajectory holds `steps + 1` states.
        a: progressive-sharpening rate, a = -grad(lambda).grad(f) (any finite number).
        b: strength of the feedback, b = ||grad(lambda)||^2 (>= 0).
        x0: initial projection on the top eigenvector.
        lambda0: initial sharpness.

    Returns:
        The [`SelfStabilizationTrajectory`][eos_core.theory.self_stabilization.SelfStabilizationTrajectory], one
        entry per state t = 0..steps.

    Raises:
        ValueError: a setting out of its range (the message names it).
    """
    return _simulate("simulate_self_stabilization", lr_rule, steps=steps, a=a, b=b, x0=x0, lambda0=lambda0)


def _simulate(
    owner: str, lr_rule: LRRule, *, steps: int, a: float, b: float, x0: float, lambda0: float
) -> SelfStabilizationTrajectory:
    steps = check.positive_int(owner, "steps", steps)
    a = check.as_float(owner, "a", a)
    b = check.non_negative(owner, "b", b)
    x = check.as_float(owner, "x0", x0)
    lam = check.as_float(owner, "lambda0", lambda0)
    if not callable(lr_rule):
        raise ValueError(f"{owner}: lr_rule must be callable (t, x, lambda) -> eta, got {lr_rule!r}")
    if not (math.isfinite(x) and math.isfinite(lam)):
        raise ValueError(f"{owner}: x0 and lambda0 must be finite, got x0={x0!r}, lambda0={lambda0!r}")

    xs = np.empty(steps + 1)
    lams = np.empty(steps + 1)
    etas = np.empty(steps + 1)
    for t in range(steps + 1):
        eta = float(lr_rule(t, x, lam))
        xs[t], lams[t], etas[t] = x, lam, eta
        if t < steps:
            x, lam = eq4_step(x, lam, eta, a=a, b=b)
    with np.errstate(over="ignore", invalid="ignore"):
        return SelfStabilizationTrajectory(eta=etas, sharpness=lams, x=xs, p=xs * xs, y=etas * lams - 2.0)


def simulate_constant_lr(
    *,
    eta: float = 1.0,
    a: float = 3e-2,
    b: float = 3e-1,
    x0: float = 0.3,
    lambda0: float = 1.9,
    steps: int = 85,
) -> SelfStabilizationTrajectory:
    """Eq. 4 with a constant learning rate (CDAT paper Fig. 4 and 10, blue).

    Defaults: the paper's a = 3e-2, b = 3e-1, eta = 1; x0 = 0.3, lambda0 = 1.9 and `steps = 85` are our
    choice (the paper gives none): lambda rises from 1.9 to the edge 2/eta, then oscillates around it
    while y oscillates around 0. Longer runs leave the quasi-stable regime (see the module docstring).

    Args:
        eta: the learning rate (> 0).
        a: progressive-sharpening rate.
        b: feedback strength (>= 0).
        x0: initial projection on the top eigenvector.
        lambda0: initial sharpness.
        steps: number of updates (>= 1).

    Returns:
        The [`SelfStabilizationTrajectory`][eos_core.theory.self_stabilization.SelfStabilizationTrajectory], one
        entry per state t = 0..steps.

    Raises:
        ValueError: a setting out of its range (the message names it).
    """
    owner = "simulate_constant_lr"
    eta = check.positive(owner, "eta", eta)
    return _simulate(owner, lambda t, x, lam: eta, steps=steps, a=a, b=b, x0=x0, lambda0=lambda0)


def simulate_fixed_y(
    *,
    eps: float = 0.05,
    eta0: float = 1.0,
    a: float = 1.0,
    b: float = 0.5,
    x0: float = 0.3,
    steps: int = 200,
) -> SelfStabilizationTrajectory:
    """Eq. 4 with the fixed-y tuner of eq. 6, eta_t = 2 (1 - eps) / lambda_t (CDAT paper Fig. 4, 10, orange).

    The rule holds y_t = -2 eps below the edge, so p = x^2 decays like (1 - 2 eps)^(2t) and nothing feeds
    back on the sharpness: lambda grows without bound (lambda^2 grows by about 4 (1 - eps) a per step) and
    the learning rate decays like 1/lambda. Defaults: the paper's a = 1, b = 0.5, eta_0 = 1 (so
    lambda_0 = 2 (1 - eps) / eta_0 = 1.9) and eps = 0.05 (eta = 1.9 / lambda); x0 = 0.3 and 200 steps are
    our choice (lambda grows about 14x).

    Args:
        eps: the distance below the edge, in [0, 1).
        eta0: the initial learning rate (> 0), which sets lambda_0 = 2 (1 - eps) / eta0.
        a: progressive-sharpening rate.
        b: feedback strength (>= 0).
        x0: initial projection on the top eigenvector.
        steps: number of updates (>= 1).

    Returns:
        The [`SelfStabilizationTrajectory`][eos_core.theory.self_stabilization.SelfStabilizationTrajectory], one
        entry per state t = 0..steps.

    Raises:
        ValueError: a setting out of its range (the message names it).
    """
    owner = "simulate_fixed_y"
    eps = check.in_interval(owner, "eps", eps, 0.0, 1.0, closed_low=True, closed_high=False)
    eta0 = check.positive(owner, "eta0", eta0)
    return _simulate(
        owner,
        lambda t, x, lam: fixed_y_lr(lam, eps=eps),
        steps=steps,
        a=a,
        b=b,
        x0=x0,
        lambda0=2.0 * (1.0 - eps) / eta0,
    )
