r"""The CDAT paper's model of its own tuner on the edge of stability (Roulet et al. 2024, eq. 9-10).

Around a stationary point, with a Hessian H_t = lambda_t v v^T + nu v_perp v_perp^T, the CDAT learning rate
sigma (w^T H^2 w) / (w^T H^3 w) is (eq. 9)

$$
\eta^{\mathrm{cdat}} = \sigma\,\frac{\lambda^2 p + \nu^2 g}{\lambda^3 p + \nu^3 g},
$$

with p = (w^T v)^2 and g = (w^T v_perp)^2. Adding gradient descent in both directions and eq. 4's sharpness
dynamics gives the model of section 3.2 (eq. 10, with eq. 4 for lambda):

$$
\eta_{t+1} = \sigma\,\frac{\lambda_t^2 p_t + \nu^2 g_t}{\lambda_t^3 p_t + \nu^3 g_t}, \quad
g_{t+1} = (1 - \eta_t \nu)^2 g_t, \quad
p_{t+1} = (1 + y_t)^2 p_t, \quad
\lambda_{t+1} = \eta_t (a - b\, p_t) + \lambda_t,
$$

where y_t = eta_t lambda_t - 2. Note the one-step lag: eta_{t+1} is computed from the state at t, and eta_0
is a setting. The rate interpolates between sigma/lambda (p >> g) and sigma/nu (g >> p).

Settings (paper appendix C.5, Fig. 9 and 11): a = 5e-2, b = 1e-1, nu = 0.1, lambda_0 = 18, eta_0 = 0.05,
g_0 = p_0 = 4, sigma in {2, 1.9}; these are the defaults. The paper gives no horizon; the default is 10000
steps, long enough to see where each run goes:

* sigma = 2: y settles at a small positive value (about 3e-4 at step 1000, tending to 0), p grows to the
  value a/b = 0.5 that stops the sharpening, and lambda levels off (30.3 after 10000 steps, from 18; the
  limit is about 30.5). The ratio p/g grows without bound: the top direction dominates eq. 9.
* sigma = 1.9: y settles at a small negative value (about -0.01 at step 1000, -0.004 at step 10000, well
  inside (-0.1, 0)); p and g both decay while their ratio p/g only drifts slowly (4e-4 at step 1000, 9e-5
  at step 10000), nothing stops the sharpening and lambda keeps growing like sqrt(t) (48 after 10000
  steps).

p and g are propagated in log space, so very long runs (where both underflow, from about 7e4 steps at
sigma = 1.9) keep a well-defined ratio p/g and learning rate; the returned p and g may then read 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from eos_core import _validation as check

__all__ = ["CDATModelTrajectory", "cdat_model_lr", "simulate_cdat_model"]


class CDATModelTrajectory(NamedTuple):
    """Trajectory of eq. 10, states t = 0..steps (each array has `steps + 1` entries)."""

    eta: np.ndarray  #: eta_t, the learning rate applied from state t to t + 1
    sharpness: np.ndarray  #: lambda_t
    p: np.ndarray  #: p_t, squared projection on the top eigenvector v
    g: np.ndarray  #: g_t, squared projection on the orthogonal direction v_perp
    y: np.ndarray  #: y_t = eta_t lambda_t - 2 (0 is the edge of stability)


def cdat_model_lr(sharpness: float, p: float, g: float, *, sigma: float = 2.0, nu: float = 0.1) -> float:
    """Eq. 9: `sigma (lambda^2 p + nu^2 g) / (lambda^3 p + nu^3 g)` (nan when the denominator is 0)."""
    num = sharpness * sharpness * p + nu * nu * g
    den = sharpness * sharpness * sharpness * p + nu * nu * nu * g
    return sigma * num / den if den != 0 else math.nan


def _log(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


def simulate_cdat_model(
    *,
    sigma: float = 2.0,
    a: float = 5e-2,
    b: float = 1e-1,
    nu: float = 0.1,
    lambda0: float = 18.0,
    eta0: float = 0.05,
    p0: float = 4.0,
    g0: float = 4.0,
    steps: int = 10_000,
) -> CDATModelTrajectory:
    """Iterate the CDAT model (eq. 10 with eq. 4's sharpness update) for `steps` steps.

    Args:
        sigma: CDAT scale (> 0); 2 is the on-edge rule, the paper contrasts it with 1.9.
        a: progressive-sharpening rate of eq. 4 (any finite number).
        b: feedback strength of eq. 4 (>= 0).
        nu: the small, fixed eigenvalue of the orthogonal direction (>= 0).
        lambda0: initial sharpness (> 0).
        eta0: initial learning rate (> 0).
        p0: initial squared projection on the top eigenvector (>= 0; p0 and g0 not both 0).
        g0: initial squared projection on the orthogonal direction (>= 0).
        steps: number of updates (>= 1).

    Defaults are the paper's Fig. 9 settings (with sigma = 2) and our 10000 steps.

    Returns:
        The [`CDATModelTrajectory`][eos_core.theory.cdat_model.CDATModelTrajectory], one entry per state.

    Raises:
        ValueError: a setting out of its range (the message names it).
    """
    owner = "simulate_cdat_model"
    sigma = check.positive(owner, "sigma", sigma)
    a = check.as_float(owner, "a", a)
    b = check.non_negative(owner, "b", b)
    nu = check.non_negative(owner, "nu", nu)
    lam = check.positive(owner, "lambda0", lambda0)
    eta = check.positive(owner, "eta0", eta0)
    p0 = check.non_negative(owner, "p0", p0)
    g0 = check.non_negative(owner, "g0", g0)
    steps = check.positive_int(owner, "steps", steps)
    if p0 == 0 and g0 == 0:
        raise ValueError(f"{owner}: p0 and g0 must not both be 0 (the learning rate of eq. 9 is 0/0)")
    if math.isinf(a):
        raise ValueError(f"{owner}: a must be finite, got {a!r}")

    log_p, log_g = _log(p0), _log(g0)
    etas, lams, ps, gs = (np.empty(steps + 1) for _ in range(4))
    for t in range(steps + 1):
        p = math.exp(log_p)
        etas[t], lams[t], ps[t], gs[t] = eta, lam, p, math.exp(log_g)
        if t == steps:
            break
        y = eta * lam - 2.0
        # eq. 9 on the state at t, both terms scaled by exp(-max(log p, log g)) so that it never reads 0/0
        top = max(log_p, log_g)
        sp, sg = math.exp(log_p - top), math.exp(log_g - top)
        den = lam * lam * lam * sp + nu * nu * nu * sg
        eta_next = sigma * (lam * lam * sp + nu * nu * sg) / den if den != 0 else math.nan
        log_g += 2.0 * _log(abs(1.0 - eta * nu))
        log_p += 2.0 * _log(abs(1.0 + y))
        lam = eta * (a - b * p) + lam
        eta = eta_next
    return CDATModelTrajectory(eta=etas, sharpness=lams, p=ps, g=gs, y=etas * lams - 2.0)
