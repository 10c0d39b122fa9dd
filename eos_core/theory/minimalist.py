r"""Reference problem of Liu, Zhang, Du and Zhao (2025): minimalist progressive sharpening and EoS.

A two-layer, width-one linear network on 2-D inputs, f(x) = v (w^T x), trained by full-batch GD on the
population squared loss, with one relevant and one irrelevant input feature. The paper proves three phases
with eta = 1/20 and feature variances lambda_1 = 100, lambda_2 = 0.01: progressive sharpening, the edge of
stability (sharpness oscillating around 2/eta = 40) with further sharpening, then self-stabilisation and
convergence with a final sharpness at most (2 + delta)/eta.

**Our model** (the summary we have gives only lambda_1, lambda_2 and eta). Inputs x ~ N(0, Sigma) with
Sigma = [[lambda_1, kappa], [kappa, lambda_2]], kappa = rho sqrt(lambda_1 lambda_2); target y = c x_2.
With theta = v w (the end-to-end linear predictor) and theta* = (0, c):

$$
L(v, w) = \tfrac12 \mathbb{E}[(v\, w^\top x - y)^2] = \tfrac12 e^\top \Sigma e, \qquad e = v w - \theta^*,
$$

$$
\nabla_v L = w^\top s, \quad \nabla_w L = v s, \qquad s = \Sigma e,
$$

$$
\nabla^2 L = \begin{pmatrix} w^\top \Sigma w & (s + v \Sigma w)^\top \\ s + v \Sigma w & v^2 \Sigma
\end{pmatrix}.
$$

The choices, and why:

* **The relevant feature is x_2, the low-variance one** (lambda_2 = 0.01); x_1 (variance lambda_1 = 100)
  is irrelevant. Only this assignment produces the three phases, and it is the one the paper's Fig. 2
  implies: the irrelevant part of the loss is "near zero unless spikes occur" and the rest decays at the
  rate 2 log(1 - 2 lambda_2/lambda_1) per step, i.e. at eta lambda_2 v^2 with eta lambda_1 v^2 = 2. Near
  a minimiser the sharpness is about lambda_1 v^2. Fitting the relevant feature makes v and w_2 grow together
  (gradient flow keeps v^2 - ||w||^2 constant), so the sharpness rises: progressive sharpening, slow
  because lambda_2 is small. Once lambda_1 v^2 > 2/eta the irrelevant weight w_1 oscillates with growing
  amplitude and its feedback on v (the lambda_1 v w_1^2 term of grad_v L) pulls the sharpness back: the
  self-stabilisation of Damian et al. With the relevant feature the high-variance one instead, the
  sharpness direction is the relevant residual and the irrelevant weight only balances the layers, which
  lowers the sharpness: no progressive sharpening.
* **A small feature correlation, rho = 0.1** (kappa = 0.1; the eigenvalues of Sigma stay 100.0001 and
  0.0099). With exactly uncorrelated features w_1 = 0 is invariant and, below the edge, w_1 only gets
  multiplied by 1 - eta lambda_1 v^2: thousands of steps of progressive sharpening shrink it below 1e-300
  and in float64 the instability that starts the edge-of-stability phase never comes (or comes late, with
  huge overshoots of the sharpness). The correlation couples w_1 to the relevant residual and keeps it near
  1e-4, the role finite-sample cross-covariances play in practice (|rho| ~ 1/sqrt(n) for n samples).
* **Target scale c = 0.4**: gradient flow from our start would end at v_inf^2 = 0.57, i.e. a sharpness of
  about 57, well above 2/eta = 40, so GD must leave gradient flow; a larger c sharpens faster but makes
  the sawtooth of the edge phase wider.
* **Initialisation v_0 = 0.55, w_0 = (0.01, 0.1)**: the sharpness starts at 30.3 (3/4 of 2/eta), close
  enough to the edge that the sharpening phase takes a few thousand steps, not tens of thousands.

With eta = 1/20 (the paper's Fig. 1 runs 10000 steps; we default to 50000 so that the last phase
completes), the three phases:

1. progressive sharpening: the sharpness rises monotonically from 30.3 to 2/eta = 40 by step 2955;
2. edge of stability: a sawtooth around 40 (a slow rise above the edge, a catapult of the irrelevant
   weight with a spike of the loss, a drop to about 37.5) whose peaks shrink from 42.4; from the crossing
   to step 15000 the loss decays at 3.9e-4 per step in log scale, the paper's rate
   -2 log(1 - 2 lambda_2/lambda_1) = 4.0e-4; the median sharpness after the crossing is 40.0;
3. self-stabilisation and convergence: after step ~31000 the sharpness stays within 0.1 of 40; a last
   small catapult near step 43000 leaves it just below the edge (39.994 at the end), and the loss ends at
   1.2e-10 (6e-8 of its initial 1.9e-3), decaying geometrically.

The phases and the final bound (2 + 0.1)/eta = 42 persist for rho in [0.05, 0.2], c in [0.35, 0.45] and
v_0 in [0.5, 0.6].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from eos_core import _validation as check

__all__ = [
    "MinimalistTrajectory",
    "minimalist_covariance",
    "minimalist_gradient",
    "minimalist_hessian",
    "minimalist_loss",
    "minimalist_sharpness",
    "simulate_minimalist_gd",
]


class MinimalistTrajectory(NamedTuple):
    """GD trajectory on the minimalist model, states t = 0..steps (`steps + 1` rows each)."""

    v: np.ndarray  #: second-layer weight v_t
    w: np.ndarray  #: first-layer weights w_t = (irrelevant w_1, relevant w_2), shape (steps + 1, 2)
    theta: np.ndarray  #: end-to-end predictor v_t w_t, shape (steps + 1, 2); the minimiser is (0, c)
    loss: np.ndarray  #: population loss L(v_t, w_t)
    sharpness: np.ndarray  #: lambda_max of the analytic 3x3 Hessian


def minimalist_covariance(
    *, lambda1: float = 100.0, lambda2: float = 0.01, correlation: float = 0.1
) -> np.ndarray:
    """Sigma = [[lambda1, kappa], [kappa, lambda2]] with kappa = correlation * sqrt(lambda1 * lambda2)."""
    owner = "minimalist_covariance"
    lambda1 = check.positive(owner, "lambda1", lambda1)
    lambda2 = check.positive(owner, "lambda2", lambda2)
    rho = check.in_interval(owner, "correlation", correlation, -1.0, 1.0, closed_low=False, closed_high=False)
    kappa = rho * math.sqrt(lambda1 * lambda2)
    return np.array([[lambda1, kappa], [kappa, lambda2]])


def _split(params: np.ndarray | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(params, dtype=float)
    if arr.ndim == 0 or arr.shape[-1] != 3:
        raise ValueError(f"params must have a last axis (v, w_1, w_2) of length 3, got shape {arr.shape}")
    return arr[..., 0], arr[..., 1:]


def _residual(params: np.ndarray | Sequence[float], target_scale: float) -> tuple[np.ndarray, ...]:
    v, w = _split(params)
    e = v[..., None] * w
    e[..., 1] -= target_scale
    return v, w, e


def minimalist_loss(
    params: np.ndarray | Sequence[float],
    *,
    lambda1: float = 100.0,
    lambda2: float = 0.01,
    correlation: float = 0.1,
    target_scale: float = 0.4,
) -> np.ndarray:
    """L = 1/2 e^T Sigma e with e = v w - (0, c); `params` = (v, w_1, w_2) on the last axis."""
    sigma = minimalist_covariance(lambda1=lambda1, lambda2=lambda2, correlation=correlation)
    _, _, e = _residual(params, target_scale)
    return 0.5 * np.einsum("...i,ij,...j->...", e, sigma, e)


def minimalist_gradient(
    params: np.ndarray | Sequence[float],
    *,
    lambda1: float = 100.0,
    lambda2: float = 0.01,
    correlation: float = 0.1,
    target_scale: float = 0.4,
) -> np.ndarray:
    """(dL/dv, dL/dw_1, dL/dw_2) = (w^T s, v s) with s = Sigma e."""
    sigma = minimalist_covariance(lambda1=lambda1, lambda2=lambda2, correlation=correlation)
    v, w, e = _residual(params, target_scale)
    s = e @ sigma
    return np.concatenate([np.sum(w * s, axis=-1)[..., None], v[..., None] * s], axis=-1)


def minimalist_hessian(
    params: np.ndarray | Sequence[float],
    *,
    lambda1: float = 100.0,
    lambda2: float = 0.01,
    correlation: float = 0.1,
    target_scale: float = 0.4,
) -> np.ndarray:
    """Analytic Hessian [[w^T Sigma w, (s + v Sigma w)^T], [s + v Sigma w, v^2 Sigma]], shape (..., 3, 3)."""
    sigma = minimalist_covariance(lambda1=lambda1, lambda2=lambda2, correlation=correlation)
    v, w, e = _residual(params, target_scale)
    s = e @ sigma
    sw = w @ sigma
    hess = np.empty(v.shape + (3, 3))
    hess[..., 0, 0] = np.sum(w * sw, axis=-1)
    cross = s + v[..., None] * sw
    hess[..., 0, 1:] = cross
    hess[..., 1:, 0] = cross
    hess[..., 1:, 1:] = (v * v)[..., None, None] * sigma
    return hess


def minimalist_sharpness(
    params: np.ndarray | Sequence[float],
    *,
    lambda1: float = 100.0,
    lambda2: float = 0.01,
    correlation: float = 0.1,
    target_scale: float = 0.4,
) -> np.ndarray:
    """lambda_max of [`minimalist_hessian`][eos_core.theory.minimalist.minimalist_hessian].

    Args:
        params: `(v, w_1, w_2)` points, the last axis the three parameters.
        lambda1: variance of the irrelevant feature x_1.
        lambda2: variance of the relevant feature x_2.
        correlation: correlation of x_1 and x_2.
        target_scale: c in y = c x_2.

    Returns:
        The sharpness of each point (nan where the parameters are not finite).
    """
    hess = minimalist_hessian(
        params, lambda1=lambda1, lambda2=lambda2, correlation=correlation, target_scale=target_scale
    )
    out = np.full(hess.shape[:-2], np.nan)
    finite = np.all(np.isfinite(hess), axis=(-2, -1))
    if np.any(finite):
        out[finite] = np.linalg.eigvalsh(hess[finite])[..., -1]
    return out


def simulate_minimalist_gd(
    *,
    lr: float = 1 / 20,
    steps: int = 50_000,
    lambda1: float = 100.0,
    lambda2: float = 0.01,
    correlation: float = 0.1,
    target_scale: float = 0.4,
    v0: float = 0.55,
    w0: Sequence[float] = (0.01, 0.1),
) -> MinimalistTrajectory:
    """Full-batch GD with a constant learning rate on the minimalist model.

    Args:
        lr: eta (> 0); the paper's 1/20, so 2/eta = 40.
        steps: number of GD steps (>= 1); ours, 50000 (the paper's Fig. 1 runs 10000, which here covers the
            sharpening and part of the edge phase).
        lambda1: variance of the irrelevant feature x_1 (> 0); the paper's 100.
        lambda2: variance of the relevant feature x_2 (> 0); the paper's 0.01.
        correlation: correlation rho of x_1 and x_2, in (-1, 1); ours, 0.1 (see the module docstring).
        target_scale: c in y = c x_2; ours, 0.4.
        v0: initial second-layer weight; ours, 0.55 (sharpness 30.3).
        w0: initial first-layer weights (w_1, w_2); ours, (0.01, 0.1).

    Returns:
        The [`MinimalistTrajectory`][eos_core.theory.minimalist.MinimalistTrajectory], one entry per iterate.

    Raises:
        ValueError: a setting out of its range (the message names it).
    """
    owner = "simulate_minimalist_gd"
    lr = check.positive(owner, "lr", lr)
    steps = check.positive_int(owner, "steps", steps)
    target_scale = check.as_float(owner, "target_scale", target_scale)
    v = check.as_float(owner, "v0", v0)
    try:
        w = np.asarray(w0, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: w0 must be a pair of numbers (w_1, w_2), got {w0!r}") from None
    if w.shape != (2,) or not np.all(np.isfinite(w)):
        raise ValueError(f"{owner}: w0 must be a finite pair (w_1, w_2), got {w0!r}")
    if not (math.isfinite(v) and math.isfinite(target_scale)):
        raise ValueError(
            f"{owner}: v0 and target_scale must be finite, got v0={v0!r}, target_scale={target_scale!r}"
        )
    sigma = minimalist_covariance(lambda1=lambda1, lambda2=lambda2, correlation=correlation)
    (s11, s12), (s21, s22) = sigma.tolist()

    w1, w2 = float(w[0]), float(w[1])
    out = np.empty((steps + 1, 3))
    for t in range(steps + 1):
        out[t] = v, w1, w2
        if t == steps:
            break
        e1, e2 = v * w1, v * w2 - target_scale
        g1, g2 = s11 * e1 + s12 * e2, s21 * e1 + s22 * e2
        v, w1, w2 = v - lr * (w1 * g1 + w2 * g2), w1 - lr * v * g1, w2 - lr * v * g2

    settings = dict(lambda1=lambda1, lambda2=lambda2, correlation=correlation, target_scale=target_scale)
    with np.errstate(over="ignore", invalid="ignore"):
        return MinimalistTrajectory(
            v=out[:, 0],
            w=out[:, 1:],
            theta=out[:, :1] * out[:, 1:],
            loss=minimalist_loss(out, **settings),
            sharpness=minimalist_sharpness(out, **settings),
        )
