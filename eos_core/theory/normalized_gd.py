r"""Reference problem of Arora, Li and Panigrahi (2022): two algorithms that provably run on the edge.

The paper shows, for any smooth L with a manifold Gamma of minimisers (under regularity conditions), that

* normalized GD, w <- w - eta grad L / ||grad L||, i.e. GD on L with the effective learning rate
  eta_t = eta / ||grad L(w_t)||, and
* GD with a constant eta on sqrt(L - min L), i.e. GD on L with eta_t = eta / (2 sqrt(L(w_t) - min L)),

both enter the edge of stability (eta_t lambda_1(grad^2 L) ~ 2) once they reach an O(eta) neighbourhood of
Gamma, and then drift along Gamma following a flow that decreases lambda_1(grad^2 L): the sharpness falls to
the flattest minimiser while the loss stays O(eta^2).

**Our problem** (the summary in our copy of the paper names none): the depth-D scalar factorisation

$$
L(w) = \tfrac12 (w_1 w_2 \cdots w_D - 1)^2, \qquad D \ge 2
\quad (\text{default } D = 2:\ \tfrac12 (uv - 1)^2),
$$

whose minimisers form the manifold prod w_i = 1. On it the Hessian is grad r grad r^T (r = prod w - 1), so
lambda_1 = sum_i 1/w_i^2 (= u^2 + v^2 for D = 2), minimised at w = (1, ..., 1) with value D. Everything is
exact: the Hessian is analytic, and the gradient-flow limit Phi(w) used by the paper (where gradient flow
from w lands on Gamma) follows from the conservation of w_i^2 - w_j^2 under gradient flow, so
`limit_sharpness` = lambda_1(grad^2 L(Phi(w_t))) is exact too.

**Measuring "on the edge".** Near Gamma both algorithms settle into a period-2 orbit across the valley. On
a quadratic with curvature lambda, two steps with learning rates e_1, e_2 form such an orbit exactly when
(1 - e_1 lambda)(1 - e_2 lambda) = 1, i.e. when the *two-step harmonic mean* of e_t lambda equals 2:
2 / (1/(e_1 lambda) + 1/(e_2 lambda)) = 2. With a single constant learning rate this is e lambda = 2, the
usual edge. For this problem (rank-one gradient, grad L parallel to grad r) the orbit need not be
symmetric: with the defaults a single e_t lambda_t alternates between values such as 1.5 and 2.8 (normalised
GD, step 10) or 1.2 and 5.5 (step 5000), while their two-step harmonic mean (`two_step_edge`) stays at 2
to O(eta). The tests and the figure use that quantity.

**Default settings (our choice).** Start at the imbalanced point w_0 = (3, 0.1) (loss 0.245, limit
sharpness sqrt((9 - 0.01)^2 + 4) = 9.21 against the minimum 2); eta = 0.05 and 5000 steps for both
algorithms. Within a few steps both reach the valley and then stay on the edge: for normalised GD every
two-step edge lies in [1.93, 2.00] and every single step overshoots (e_t lambda_t > 1, the iterate crosses
the valley each step); for GD on sqrt(L) the median two-step edge is 2.00 (90% within [1.86, 2.13]). The
limit sharpness falls monotonically from 9.21 to 2.011 (normalised GD) and 2.0001 (sqrt loss), while the loss
stays below 5e-3 (normalised GD) and 3.4e-2 (sqrt loss, 95% of the steps below 1e-2). For D = 2 the
balance u^2 - v^2 contracts by exactly (1 - eta^2 / (u^2 + v^2)) per normalised-GD step and (1 - eta^2 / 2)
per sqrt-loss step, the discrete form of the drift to the flattest minimiser; it takes Theta(eta^-2) steps,
as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from eos_core import _validation as check

__all__ = [
    "ManifoldTrajectory",
    "product_gradient",
    "product_hessian",
    "product_limit_point",
    "product_limit_sharpness",
    "product_loss",
    "product_sharpness",
    "simulate_normalized_gd",
    "simulate_sqrt_loss_gd",
    "two_step_edge",
]


class ManifoldTrajectory(NamedTuple):
    """Trajectory on L(w) = 1/2 (prod w - 1)^2, states t = 0..steps (`steps + 1` rows each)."""

    w: np.ndarray  #: parameters, shape (steps + 1, D)
    loss: np.ndarray  #: L(w_t)
    sharpness: np.ndarray  #: lambda_1(grad^2 L(w_t)), from the analytic Hessian
    effective_lr: np.ndarray  #: eta_t such that the step is w_t - eta_t grad L(w_t) (inf where grad L = 0)
    lr_times_sharpness: np.ndarray  #: eta_t lambda_1(w_t); see `two_step_edge`
    limit_sharpness: np.ndarray  #: lambda_1 at Phi(w_t), where gradient flow from w_t lands (nan if none)


def _as_points(w: np.ndarray | Sequence[float]) -> np.ndarray:
    arr = np.asarray(w, dtype=float)
    if arr.ndim == 0 or arr.shape[-1] < 2:
        raise ValueError(f"w must have a last axis of length >= 2 (D >= 2), got shape {arr.shape}")
    return arr


def _prod_except_one(w: np.ndarray) -> np.ndarray:
    """prod_{j != i} w_j for each i, without dividing (exact when some w_j = 0)."""
    ones = np.ones_like(w[..., :1])
    left = np.cumprod(np.concatenate([ones, w[..., :-1]], axis=-1), axis=-1)
    right = np.cumprod(np.concatenate([ones, w[..., :0:-1]], axis=-1), axis=-1)[..., ::-1]
    return left * right


def product_loss(w: np.ndarray | Sequence[float]) -> np.ndarray:
    """L(w) = 1/2 (prod_i w_i - 1)^2, over the last axis of `w` (any leading batch shape)."""
    r = np.prod(_as_points(w), axis=-1) - 1.0
    return 0.5 * r * r


def product_gradient(w: np.ndarray | Sequence[float]) -> np.ndarray:
    """The gradient r(w) grad r(w), with r = prod w - 1 and (grad r)_i = prod_{j != i} w_j.

    Args:
        w: points, the last axis the D coordinates (any leading batch shape).

    Returns:
        grad L(w), shaped like `w`.
    """
    w = _as_points(w)
    r = np.prod(w, axis=-1) - 1.0
    return r[..., None] * _prod_except_one(w)


def product_hessian(w: np.ndarray | Sequence[float]) -> np.ndarray:
    """Analytic Hessian grad^2 L = grad r grad r^T + r grad^2 r, shape (..., D, D).

    (grad^2 r)_ij = prod_{k != i, j} w_k for i != j and 0 on the diagonal.

    Args:
        w: points, the last axis the D coordinates (any leading batch shape).

    Returns:
        The Hessians, shape (..., D, D).
    """
    w = _as_points(w)
    dim = w.shape[-1]
    r = np.prod(w, axis=-1) - 1.0
    gr = _prod_except_one(w)
    hess = gr[..., :, None] * gr[..., None, :]
    for i in range(dim):
        for j in range(i + 1, dim):
            term = r * np.prod(np.delete(w, [i, j], axis=-1), axis=-1)
            hess[..., i, j] += term
            hess[..., j, i] += term
    return hess


def product_sharpness(w: np.ndarray | Sequence[float]) -> np.ndarray:
    """lambda_1(grad^2 L(w)), the largest eigenvalue of the analytic Hessian (nan for non-finite w)."""
    hess = product_hessian(w)
    out = np.full(hess.shape[:-2], np.nan)
    finite = np.all(np.isfinite(hess), axis=(-2, -1))
    if np.any(finite):
        out[finite] = np.linalg.eigvalsh(hess[finite])[..., -1]
    return out


def product_limit_point(w: np.ndarray | Sequence[float]) -> np.ndarray:
    """Phi(w): the minimiser that gradient flow on L reaches from w (nan where that is not defined here).

    Gradient flow keeps every w_i^2 - w_j^2 constant (d(w_i^2)/dt = -2 r prod w for all i) and never
    changes signs when prod w > 0, so Phi(w)_i = sign(w_i) sqrt(w_i^2 + c) with the unique c > -min_i w_i^2
    that puts the product at 1 (found by bisection to machine precision). Points with prod w <= 0 (the flow
    would cross a coordinate hyperplane) map to nan.

    Args:
        w: points, the last axis the D coordinates (any leading batch shape).

    Returns:
        Phi(w), shaped like `w`.
    """
    w = _as_points(w)
    sq = w * w
    low = -np.min(sq, axis=-1)
    high = np.maximum(low + 1.0, 1.0 - np.min(sq, axis=-1))  # there every factor is >= 1
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(200):
            mid = 0.5 * (low + high)
            below = np.sum(np.log(sq + mid[..., None]), axis=-1) < 0.0
            low = np.where(below, mid, low)
            high = np.where(below, high, mid)
        phi = np.sign(w) * np.sqrt(sq + high[..., None])
    valid = np.prod(np.sign(w), axis=-1) > 0
    return np.where(valid[..., None], phi, np.nan)


def product_limit_sharpness(w: np.ndarray | Sequence[float]) -> np.ndarray:
    """lambda_1(grad^2 L(Phi(w))) = sum_i 1/Phi(w)_i^2; its minimum over the manifold is D, at w = 1."""
    phi = product_limit_point(w)
    return np.sum(1.0 / (phi * phi), axis=-1)


def two_step_edge(lr_times_sharpness: np.ndarray | Sequence[float]) -> np.ndarray:
    """Harmonic mean of consecutive e_t lambda_t: `2 / (1/(e_t lambda_t) + 1/(e_{t+1} lambda_{t+1}))`.

    Equal to 2 exactly when two GD steps with learning rates e_t, e_{t+1} on a quadratic of curvature
    lambda form a period-2 orbit ((1 - e_t lambda)(1 - e_{t+1} lambda) = 1): the edge of stability for a
    learning rate that alternates.

    Args:
        lr_times_sharpness: the series e_t lambda_t.

    Returns:
        The two-step edge, one shorter than the input.
    """
    x = np.asarray(lr_times_sharpness, dtype=float)
    with np.errstate(divide="ignore"):
        return 2.0 / (1.0 / x[:-1] + 1.0 / x[1:])


def _check_start(owner: str, w0: Sequence[float]) -> np.ndarray:
    try:
        arr = np.asarray(w0, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: w0 must be a sequence of numbers, got {w0!r}") from None
    if arr.ndim != 1 or arr.size < 2 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{owner}: w0 must be a finite vector of length >= 2, got {w0!r}")
    return arr


def _trajectory(ws: np.ndarray, effective_lr: np.ndarray) -> ManifoldTrajectory:
    sharp = product_sharpness(ws)
    with np.errstate(invalid="ignore", over="ignore"):
        return ManifoldTrajectory(
            w=ws,
            loss=product_loss(ws),
            sharpness=sharp,
            effective_lr=effective_lr,
            lr_times_sharpness=effective_lr * sharp,
            limit_sharpness=product_limit_sharpness(ws),
        )


def simulate_normalized_gd(
    *, eta: float = 0.05, w0: Sequence[float] = (3.0, 0.1), steps: int = 5000
) -> ManifoldTrajectory:
    """Normalised GD on L(w) = 1/2 (prod w - 1)^2: `w <- w - eta grad L / ||grad L||`.

    The effective learning rate on L is eta_t = eta / ||grad L(w_t)||. Where grad L = 0 the direction is
    undefined: the iterate stays (eta_t = inf). Defaults (our choice, see the module docstring):
    eta = 0.05, w0 = (3, 0.1), 5000 steps. The length of `w0` sets D.

    Args:
        eta: the step length (> 0).
        w0: the start (finite, length D >= 2).
        steps: number of steps (>= 1).

    Returns:
        The [`ManifoldTrajectory`][eos_core.theory.normalized_gd.ManifoldTrajectory], one entry per iterate.

    Raises:
        ValueError: a setting out of its range (the message names it).
    """
    owner = "simulate_normalized_gd"
    eta = check.positive(owner, "eta", eta)
    w = _check_start(owner, w0)
    steps = check.positive_int(owner, "steps", steps)
    ws = np.empty((steps + 1, w.size))
    ws[0] = w
    for t in range(steps):
        grad = product_gradient(w)
        norm = math.sqrt(float(grad @ grad))
        if norm > 0 and math.isfinite(norm):
            w = w - (eta / norm) * grad
        ws[t + 1] = w
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = eta / np.linalg.norm(product_gradient(ws), axis=-1)
    return _trajectory(ws, eff)


def simulate_sqrt_loss_gd(
    *, eta: float = 0.05, w0: Sequence[float] = (3.0, 0.1), steps: int = 5000
) -> ManifoldTrajectory:
    """GD with constant eta on sqrt(L - min L), L(w) = 1/2 (prod w - 1)^2 and min L = 0.

    grad sqrt(L) = grad L / (2 sqrt(L)) = sign(r) grad r / sqrt(2), so this is GD on L with the effective
    learning rate eta_t = eta / (2 sqrt(L(w_t))). On the manifold (L = 0) sqrt(L) is not differentiable:
    the iterate stays (eta_t = inf). Defaults (our choice): eta = 0.05, w0 = (3, 0.1), 5000 steps.

    Args:
        eta: the constant learning rate on sqrt(L) (> 0).
        w0: the start (finite, length D >= 2).
        steps: number of steps (>= 1).

    Returns:
        The [`ManifoldTrajectory`][eos_core.theory.normalized_gd.ManifoldTrajectory], one entry per iterate.

    Raises:
        ValueError: a setting out of its range (the message names it).
    """
    owner = "simulate_sqrt_loss_gd"
    eta = check.positive(owner, "eta", eta)
    w = _check_start(owner, w0)
    steps = check.positive_int(owner, "steps", steps)
    ws = np.empty((steps + 1, w.size))
    ws[0] = w
    for t in range(steps):
        loss = float(product_loss(w))
        if loss > 0 and math.isfinite(loss):
            w = w - (eta / (2.0 * math.sqrt(loss))) * product_gradient(w)
        ws[t + 1] = w
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = eta / (2.0 * np.sqrt(product_loss(ws)))
    return _trajectory(ws, eff)
