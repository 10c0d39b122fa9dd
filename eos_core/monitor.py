r"""The sharpness monitor's rules, shared by every adapter: edge of stability, budget, product choice, warning.

The rules say what the optimizer's edge of stability is, when to spend a Hessian-vector product, which product to
trust, and when to warn.

The monitor (option `monitor_budget`) keeps a streaming estimate of lambda_max of the Hessian (and of the
preconditioned Hessian $P^{-1/2} H P^{-1/2}$ for adaptive optimizers) with
[`eos_core.spectral.tracking`][], one product at a time. This module holds what does not depend on a framework,
written for numpy scalars and traced JAX arrays alike (every function that branches on a value takes the array
namespace `xp`):

* **The edge** of lr x sharpness beyond which the optimizer diverges on a quadratic
  $f(w) = \tfrac12 \lambda w^2$ ([`heavy_ball_edge`][eos_core.monitor.heavy_ball_edge],
  [`nesterov_edge`][eos_core.monitor.nesterov_edge], [`adam_edge`][eos_core.monitor.adam_edge],
  [`edge_from_impulse_response`][eos_core.monitor.edge_from_impulse_response]).
* **The budget as credit** ([`accrue`][eos_core.monitor.accrue], [`wants_tick`][eos_core.monitor.wants_tick]): every
  step earns `budget` step-times of credit, less the adapter's measured per-step bookkeeping
  ([`product_share`][eos_core.monitor.product_share]: PyTorch times it, inside `jit` it is not measured); a product
  costs `cost` step-times (`cost = t_product / t_step`, measured or modelled), and the monitor applies the operator
  when the credit covers it, i.e. every $k = \lceil \text{cost} / \text{share} \rceil$ steps on average. Two
  exceptions, both bounded: a tracker's first tick runs up to [`COLD_PRODUCTS`][eos_core.monitor.COLD_PRODUCTS]
  products at once (the cold start from a random vector, a one-off cost outside the budget: the Hessian's tracker
  on the first step, the preconditioned one on step [`GRACE_STEPS`][eos_core.monitor.GRACE_STEPS],
  [`cold_start_due`][eos_core.monitor.cold_start_due]), and while the latest lr x sharpness
  lies beyond the warning threshold and the warning has not fired yet, the monitor ticks at every step, going into
  debt by at most [`DEBT_PRODUCTS`][eos_core.monitor.DEBT_PRODUCTS] products (repaid from later credit), so a crossing
  is confirmed within a few steps instead of a few hundred.
* **Which product** ([`is_check`][eos_core.monitor.is_check], [`finite_differences_agree`][
  eos_core.monitor.finite_differences_agree]): the one-sided finite difference of gradients
  $(g(w + h v) - g(w)) / h$ reusing the step's own gradient costs one gradient; at the 1st, 10th, 100th, ... tick
  the exact product is computed too, and finite differences are used until the next check only when they agree
  with it to [`CHECK_TOLERANCE`][eos_core.monitor.CHECK_TOLERANCE] (relative norm of the difference). They do not on
  ReLU networks: a step of a few 1e-4 crosses kinks that the autograd Hessian does not see (measured on a
  784-256-256-10 MLP: 8x relative error along the top eigenvector with ReLU, 1e-3 with tanh or GELU).
* **The early warning** ([`warning_update`][eos_core.monitor.warning_update]): lr x sharpness above
  `edge * (1 + margin)` on `patience` consecutive fresh measurements, or on one that is a Ritz value of the step's
  own Hessian ([`conclusive`][eos_core.monitor.conclusive], e.g. the cold start's), sets `unstable` and
  raises one RuntimeWarning per episode (an episode ends at the first fresh measurement below the threshold).
  Measurements of an adaptive optimizer's first [`GRACE_STEPS`][eos_core.monitor.GRACE_STEPS] steps do not count
  ([`counts_for_warning`][eos_core.monitor.counts_for_warning]).
* **The first step of an adaptive optimizer** ([`watches_update`][eos_core.monitor.watches_update],
  [`update_quotient`][eos_core.monitor.update_quotient]): there the monitor also measures the curvature along
  the step's own update $D = \text{lr}\, u$, one product: the quadratic model of the loss along the step (CDAT
  paper, eq. 2) predicts that the step raises the loss when
  $\text{lr}\, u^\top H u / (-g^\top u) > 2$ ([`UPDATE_EDGE`][eos_core.monitor.UPDATE_EDGE]; the lr is then above
  the on-edge lr of eq. 7). Above `UPDATE_EDGE * (1 + margin)` it warns at once: a measurement of this step's
  own update and Hessian.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: The callbacks' (Lightning, Hugging Face, Keras) default `monitor_budget`: the monitor may take 5% of training
#: time (the tuners themselves default to None, off).
CALLBACK_BUDGET = 0.05
#: Default relative margin above the edge before a measurement counts as beyond it. Stable runs overshoot the edge:
#: full-batch GD at its best constant lr (a tanh MLP on digits, benchmarks/README.md, "Sharpness monitor") enters the
#: edge of stability with an exact lr x lambda_max of 2.9-3.2 (up to 1.6 x the edge of 2) before it settles at
#: 2.0-2.3, and a run started at 1.44 x the edge trains without a loss spike; the diverging runs of that benchmark
#: start at 1.78 x the edge or more.
MARGIN = 0.6
#: Default number of consecutive fresh measurements beyond the threshold before the warning fires.
PATIENCE = 3
#: Measurements of an adaptive optimizer's first steps do not count towards the warning: Adam's moments rest on a
#: handful of gradients there and its preconditioned lr x sharpness starts far above its steady state (72 and up to
#: 1.5e4 against the edge 38 at step 2 of stable Lightning and Trainer runs with Adam at lr 1e-3).
GRACE_STEPS = 10
#: The edge of the quotient `lr u^T H u / (-g^T u)` along the step's update (`update_quotient`): beyond it the
#: quadratic model of the loss along the step predicts a rise.
UPDATE_EDGE = 2.0
#: An adaptive optimizer's first UPDATE_STEPS steps are watched along the update (`watches_update`). Only the first:
#: its update rests on the step's own gradient alone, and the quotient of later steps is erratic on mini-batches
#: (Adam at 1.5x its best lr on a character-level GPT: 2.45 at step 0, below the threshold, then 5.7 at step 8 of a
#: run that trains as well as the best one).
UPDATE_STEPS = 1
#: Lanczos vectors per tracker, the products of one restarted-Lanczos cycle (`eos_core.spectral.tracking`). At the
#: edge of stability the top of the spectrum is a cluster (full-batch GD on the digits MLP: the top six eigenvalues
#: within 2-6%), and a cycle of two products (span{x, Hx}) leaves the tracker's vector partly outside it: with the
#: same exact product every 104 steps its reading was 8.4% below lambda_max (median), with three 5.6%, with four 5.5%
#: (every 42 steps: 4.9% and 4.1%); the monitor at its default budget read 8.9% with two, 7.2% with three. Each
#: vector costs one parameter-sized buffer per tracker.
TRACKER_RESTART = 3
#: Products the first tick may spend to converge from the random start (stopping at COLD_TOLERANCE), before it
#: completes its cycle (at most COLD_PRODUCTS + TRACKER_RESTART - 1 in all).
COLD_PRODUCTS = 16
#: Relative residual at which the cold start stops early.
COLD_TOLERANCE = 1e-2
#: A warm tick whose reading has a relative residual above this completes a cycle of products on the step's own
#: operator (`is_stale`). At the edge of stability the warm readings' residuals are 5-25% (full-batch GD on the digits
#: MLP); after the edge transient, and with Adam on mini-batches at nearly every tick, a tracker's vector no longer
#: resembles an eigenvector of the new operator (residuals of 0.4-26) and its Rayleigh quotient there reads a small
#: fraction of lambda_max, or below 0.
STALE_RESIDUAL = 0.2
#: Products the monitor may borrow from future credit to confirm a crossing at every step.
DEBT_PRODUCTS = 8
#: The share of the budget the adapter's own per-step work for monitoring may take before products get the rest: the
#: PyTorch tuner times its hooks (outside the step's closure and the products) and charges them to the budget up to
#: this share, so products and bookkeeping together stay within the budget unless the bookkeeping alone exceeds it.
OVERHEAD_SHARE = 0.5
#: The share of the budget kept back for what no adapter can time: the optimizer's hook dispatch, the caches a tick
#: evicts from the next steps' working set (measured on the PyTorch CPU MLP: the three steps after a tick run 5%
#: slower with SGD, 9% with Adam), the timing noise of the step-time estimate.
RESERVE = 0.1
#: Finite differences are trusted when ||Hv_fd - Hv_exact|| <= CHECK_TOLERANCE ||Hv_exact||.
CHECK_TOLERANCE = 0.05
#: Cost model of one product in training steps (JAX, where nothing can be timed inside `jit`): one extra gradient
#: for the one-sided finite difference, forward-over-reverse for the exact product (measured for the CDAT paper's
#: models on an H100: 1.0-1.2 and 1.7-2.8 training steps; benchmarks/README.md).
COST_MODEL: dict[str, float] = {"fd": 1.1, "exact": 2.5}
#: Ticks at which finite differences are checked against the exact product (1, 10, 100, ...).
_CHECKS = tuple(10**i for i in range(10))


# -- the edge of stability of an optimizer ------------------------------------------------------------------------
def heavy_ball_edge(momentum: float = 0.0, dampening: float = 0.0) -> float:
    r"""The edge of lr x lambda for gradient descent with heavy-ball momentum (torch SGD's convention).

    With `buf <- beta buf + (1 - d) g` and `w <- w - lr buf` on $f = \tfrac12 \lambda w^2$,
    $w_{t+1} = (1 + \beta - a) w_t - \beta w_{t-1}$ with $a = \text{lr} (1 - d) \lambda$; both roots of
    $z^2 - (1 + \beta - a) z + \beta$ lie inside the unit circle iff $0 < a < 2 (1 + \beta)$, so the edge is

    $$ \text{lr}\,\lambda < \frac{2 (1 + \beta)}{1 - d} $$

    (2 for plain gradient descent). Keras's SGD (`v <- m v - lr g`, `w <- w + v`) is the case `d = 0`.

    Args:
        momentum: beta in [0, 1).
        dampening: d in [0, 1).

    Returns:
        The edge.
    """
    return 2.0 * (1.0 + float(momentum)) / (1.0 - float(dampening))


def nesterov_edge(momentum: float) -> float:
    r"""The edge of lr x lambda for Nesterov momentum (torch SGD `nesterov=True`, optax/Keras `nesterov`).

    With `buf <- beta buf + g` and `w <- w - lr (g + beta buf)`, the iterates on $\tfrac12 \lambda w^2$ follow
    $w_{t+1} = (1 - a)(1 + \beta) w_t - \beta (1 - a) w_{t-1}$, $a = \text{lr} \lambda$. Jury's conditions give
    $p(-1) = 1 + (1 - a)(1 + 2\beta) > 0$, i.e.

    $$ \text{lr}\,\lambda < \frac{2 (1 + \beta)}{1 + 2 \beta} $$

    (2 at beta = 0, 1.357 at beta = 0.9: Nesterov's look-ahead makes the edge lower, not higher).

    Args:
        momentum: beta in [0, 1).

    Returns:
        The edge.
    """
    beta = float(momentum)
    return 2.0 * (1.0 + beta) / (1.0 + 2.0 * beta)


def adam_edge(beta1: float) -> float:
    r"""The edge of lr x lambda_max(P^{-1/2} H P^{-1/2}) for Adam with first-moment EMA beta1.

    Adam's step is `w <- w - lr P^{-1} m` with `m <- beta1 m + (1 - beta1) g` (P holding the second-moment root
    and the bias corrections): with P frozen it is heavy-ball momentum with dampening `d = beta1` on the
    preconditioned Hessian, so (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability": 38/lr
    for beta1 = 0.9)

    $$ \text{lr}\,\lambda_{\max}(P^{-1} H) < \frac{2 (1 + \beta_1)}{1 - \beta_1}. $$

    Args:
        beta1: in [0, 1).

    Returns:
        The edge.
    """
    return heavy_ball_edge(beta1, float(beta1))


def edge_from_impulse_response(response: Sequence[float], *, rtol: float = 1e-4) -> float:
    r"""The edge of a linear first-order method identified from its impulse response (NaN when not recognised).

    `response[k]` is the update for learning rate 1 at step `k` after a unit gradient at step 0 and zero gradients
    since, negated (gradient descent: 1, 0, 0, ...; heavy ball: `(1 - d) beta^k`; Nesterov: `1 + beta`,
    `beta^{k + 1}`). A method whose transfer function is $H(z) = (b_0 + b_1 z^{-1}) / (1 - \beta z^{-1})$ (every
    one of these) has on $\tfrac12 \lambda w^2$ the characteristic polynomial
    $z^2 + (a b_0 - 1 - \beta) z + \beta + a b_1$, $a = \text{lr}\,\lambda$; Jury's conditions
    give the edge $\min(2 (1 + \beta) / (b_0 - b_1), (1 - \beta) / b_1 \text{ if } b_1 > 0,
    -(1 + \beta) / b_1 \text{ if } b_1 < 0)$.

    Args:
        response: at least 4 values.
        rtol: relative tolerance of the check that the tail is geometric.

    Returns:
        The edge, or NaN for a response of another form (then the edge must be given, `monitor_edge`).
    """
    h = [float(x) for x in response]
    if len(h) < 4 or not all(math.isfinite(x) for x in h) or h[0] <= 0:
        return math.nan
    scale = max(abs(x) for x in h)
    beta = h[2] / h[1] if abs(h[1]) > rtol * scale else 0.0
    for k in range(2, len(h) - 1):  # the tail must be geometric with ratio beta
        if abs(h[k + 1] - beta * h[k]) > rtol * scale:
            return math.nan
    if not 0.0 <= beta < 1.0:
        return math.nan
    b0, b1 = h[0], h[1] - beta * h[0]
    edges = []
    if b0 - b1 > 0:
        edges.append(2.0 * (1.0 + beta) / (b0 - b1))
    if b1 > 0:
        edges.append((1.0 - beta) / b1)
    elif b1 < 0:
        edges.append(-(1.0 + beta) / b1)
    return min(edges) if edges else math.nan


# -- the budget as credit -----------------------------------------------------------------------------------------
def accrue(xp: Any, credit: Any, budget: float, cost: Any) -> Any:
    """The credit after one more training step (step-times).

    The cap keeps a monitor that could not tick (no objective, a skipped product) from saving up a burst.

    Returns:
        `min(credit + budget, max(cost, budget))`.
    """
    return xp.minimum(credit + budget, xp.maximum(cost, budget))


def product_share(budget: float, overhead: float) -> float:
    """The budget left for products after the per-step bookkeeping (step-times per step).

    Args:
        budget: `monitor_budget`, the fraction of training time monitoring may take.
        overhead: the measured per-step bookkeeping in step-times (0 where it is not measured, as inside `jit`).

    Returns:
        `(1 - RESERVE) budget - min(overhead, OVERHEAD_SHARE * budget)`: products always keep at least 40% of the
        budget ([`RESERVE`][eos_core.monitor.RESERVE], [`OVERHEAD_SHARE`][eos_core.monitor.OVERHEAD_SHARE]).
    """
    budget = float(budget)
    return (1.0 - RESERVE) * budget - min(max(float(overhead), 0.0), OVERHEAD_SHARE * budget)


def wants_tick(xp: Any, credit: Any, cost: Any, *, cold: Any, danger: Any) -> Any:
    """Whether the monitor applies the operator on this step (after [`accrue`][eos_core.monitor.accrue]).

    Args:
        xp: the array namespace.
        credit: the credit after this step's accrual (step-times).
        cost: the cost of this tick's products (step-times).
        cold: a tracker's cold start is due ([`cold_start_due`][eos_core.monitor.cold_start_due]).
        danger: the latest lr x sharpness lies beyond the warning threshold and the warning has not fired: tick
            as long as the debt stays within [`DEBT_PRODUCTS`][eos_core.monitor.DEBT_PRODUCTS] products.

    Returns:
        A boolean scalar.
    """
    return cold | (credit >= cost) | (danger & (credit - cost >= -DEBT_PRODUCTS * cost))


def tracks_preconditioned(xp: Any, step: Any) -> Any:
    """Whether the preconditioned tracker of an adaptive optimizer applies its operator on step `step`.

    From step [`GRACE_STEPS`][eos_core.monitor.GRACE_STEPS] on, the first whose measurements count for the warning
    ([`counts_for_warning`][eos_core.monitor.counts_for_warning]): before it Adam's `P` rests on a handful of
    gradients, and a vector tracked on those operators starts the counted readings from a stale direction.

    Args:
        xp: the array namespace.
        step: the step's index (0-based, skipped steps not counted).

    Returns:
        A boolean scalar.
    """
    return step >= GRACE_STEPS


def cold_start_due(xp: Any, products: Any, preconditioned_products: Any | None, step: Any) -> Any:
    """Whether a tracker's cold start is due on this step ([`wants_tick`][eos_core.monitor.wants_tick]'s `cold`).

    The tracker of the Hessian starts on the first step; the preconditioned tracker of an adaptive optimizer on
    step [`GRACE_STEPS`][eos_core.monitor.GRACE_STEPS] ([`tracks_preconditioned`][
    eos_core.monitor.tracks_preconditioned]), not at the first scheduled tick after it (step `k`, 40-200 steps on
    the benchmark models): its cold start is a Ritz value of that step's operator alone, which warns at once
    ([`conclusive`][eos_core.monitor.conclusive]), so a run whose preconditioned lr x sharpness is beyond the
    threshold from step 10 on is warned on step 10 rather than at step `k`.

    Only on that step: when the preconditioned tracker cannot start then (a PyTorch optimizer with no state to
    precondition with yet), it starts at the next tick the budget pays for, as a tracker whose cold start is due
    on every step would make the Hessian's tracker tick on every step while it waits.

    Args:
        xp: the array namespace.
        products: the Hessian tracker's product count.
        preconditioned_products: the preconditioned tracker's product count (0 before it exists; None without one).
        step: the step's index (0-based, skipped steps not counted).

    Returns:
        A boolean scalar.
    """
    due = products == 0
    if preconditioned_products is None:
        return due
    return due | ((preconditioned_products == 0) & (step == GRACE_STEPS))


def continues_cold_start(xp: Any, made: Any, residual: Any, eigenvalue: Any, restart: int) -> Any:
    """Whether a cold tracker makes another product on its first tick.

    It converges from its random start: at least `restart` products (a whole cycle), then until its relative
    residual ([`relative_residual`][eos_core.monitor.relative_residual]) is at most
    [`COLD_TOLERANCE`][eos_core.monitor.COLD_TOLERANCE], at most [`COLD_PRODUCTS`][eos_core.monitor.COLD_PRODUCTS] in
    all. A residual that is not a number (a zero eigenvalue, a non-finite product) does not stop it.

    Args:
        xp: the array namespace.
        made: the products made so far on this tick.
        residual: the tracker's residual estimate after them.
        eigenvalue: its eigenvalue estimate.
        restart: products per cycle (the tracker's `restart`).

    Returns:
        A boolean scalar.
    """
    converged = relative_residual(xp, residual, eigenvalue) <= COLD_TOLERANCE
    return (made < COLD_PRODUCTS) & ((made < restart) | xp.logical_not(converged))


def continues_tick(xp: Any, made: Any, position: Any, residual: Any, eigenvalue: Any, restart: int, *, cold: Any,
                   stale: Any) -> Any:
    """Whether a tracker makes another product on this tick, after its first (`made >= 1`).

    A cold tracker converges ([`continues_cold_start`][eos_core.monitor.continues_cold_start]), then completes its
    cycle: the next tick's product starts a cycle, so its reading is the Rayleigh quotient of the converged vector on
    that step's operator and its residual is exact for it. (A cold start that stopped mid-cycle, at
    [`COLD_PRODUCTS`][eos_core.monitor.COLD_PRODUCTS], left the next ticks a Ritz value of a matrix built mostly
    from the cold start's operator: on a CNN trained with Adam it read the step-0 lambda_max, 1.76, with a relative
    residual of 0.003 until step 650, against 26-39.) A stale one ([`is_stale`][eos_core.monitor.is_stale] after the
    first product, then refocused on its best vector) completes a cycle on this step's operator: at least one more
    product, until its position is 0 again. Any other tracker makes one product a tick.

    Args:
        xp: the array namespace.
        made: the products made so far on this tick.
        position: the tracker's position in its cycle after them.
        residual: the tracker's residual estimate after them.
        eigenvalue: its eigenvalue estimate.
        restart: products per cycle (the tracker's `restart`).
        cold: the tracker had no product before this tick.
        stale: its reading after the tick's first product was stale.

    Returns:
        A boolean scalar.
    """
    cycle = stale & ((made == 1) | (position != 0))
    converging = continues_cold_start(xp, made, residual, eigenvalue, restart) | (position != 0)
    return xp.where(cold, converging, cycle)


def is_stale(xp: Any, residual: Any, eigenvalue: Any) -> Any:
    r"""Whether a warm tick's reading comes from a vector that no longer resembles an eigenvector of the operator.

    The residual bound of a symmetric operator: some eigenvalue lies within $\|H x - \theta x\|$ of the reading
    $\theta$; with a relative residual $\rho$ above [`STALE_RESIDUAL`][eos_core.monitor.STALE_RESIDUAL] the reading
    need not be near any. The monitor then completes a cycle of products on this step's operator, from the cycle's
    best vector when the cycle holds products of earlier ticks ([`continues_tick`][eos_core.monitor.continues_tick]),
    charged to the budget: the new reading is a Ritz value of this step's operator alone
    ([`conclusive`][eos_core.monitor.conclusive]). A residual that is not a number counts as stale.

    Args:
        xp: the array namespace.
        residual: the tracker's residual estimate after the tick's product.
        eigenvalue: its eigenvalue estimate.

    Returns:
        A boolean scalar.
    """
    return xp.logical_not(relative_residual(xp, residual, eigenvalue) <= STALE_RESIDUAL)


def every(cost: float, budget: float) -> int:
    """`k = ceil(cost / budget)`: the steady-state number of steps between ticks."""
    return max(1, math.ceil(float(cost) / float(budget) - 1e-9))


def is_check(xp: Any, ticks: Any) -> Any:
    """Whether tick number `ticks` (1-based) compares finite differences with the exact product: 1, 10, 100, ..."""
    found = ticks == _CHECKS[0]
    for value in _CHECKS[1:]:
        found = found | (ticks == value)
    return found


def finite_differences_agree(xp: Any, difference_norm: Any, exact_norm: Any,
                             tolerance: float = CHECK_TOLERANCE) -> Any:
    """`||Hv_fd - Hv_exact|| <= tolerance ||Hv_exact||` (False when either is not finite)."""
    ok = difference_norm <= tolerance * exact_norm
    return ok & xp.isfinite(difference_norm) & xp.isfinite(exact_norm)


def relative_residual(xp: Any, residual: Any, eigenvalue: Any) -> Any:
    """The tracker's residual estimate relative to its eigenvalue, `|beta s| / |theta|` (NaN for theta = 0)."""
    magnitude = xp.abs(eigenvalue)
    return xp.where(magnitude > 0, residual / xp.where(magnitude > 0, magnitude, 1.0), math.nan)


# -- the early warning ----------------------------------------------------------------------------------------------
def threshold(edge: Any, margin: float) -> Any:
    """`edge * (1 + margin)`: a fresh lr x sharpness above it counts towards the warning."""
    return edge * (1.0 + margin)


def counts_for_warning(xp: Any, fresh: Any, step: Any, *, adaptive: bool = False) -> Any:
    """Whether this step's measurement enters the early warning ([`warning_update`][eos_core.monitor.warning_update]).

    A tracked estimate far from converged (a large residual) still counts: while a run diverges the Hessian moves
    at every step and the residual stays large, yet the estimates are far beyond the edge (measured on an MLP at 11x
    its edge: residuals 0.1-5.7 on the steps before the blow-up).

    Args:
        xp: the array namespace.
        fresh: a new lr x sharpness was measured on this step.
        step: the step's index (0-based, skipped steps not counted).
        adaptive: the warning watches the preconditioned sharpness of an adaptive optimizer (Adam), whose first
            steps are not counted.

    Returns:
        `fresh`, and for an adaptive optimizer only after its first [`GRACE_STEPS`][eos_core.monitor.GRACE_STEPS]
        steps.
    """
    return fresh & (step >= GRACE_STEPS) if adaptive else fresh


def watches_update(xp: Any, step: Any, *, adaptive: bool) -> Any:
    """Whether the monitor measures the curvature along this step's update, one product.

    The quantity is [`update_quotient`][eos_core.monitor.update_quotient]. It is measured on an adaptive optimizer's
    first [`UPDATE_STEPS`][eos_core.monitor.UPDATE_STEPS] step, where its preconditioned sharpness cannot be
    measured (the preconditioner exists only after the first step, and readings of the first
    [`GRACE_STEPS`][eos_core.monitor.GRACE_STEPS] do not count, [`counts_for_warning`][
    eos_core.monitor.counts_for_warning]) and a run with too large an lr blows up at once (Adam at 150-500x its best
    lr on a character-level GPT: the loss spikes at step 1 or 2). The quotient needs no preconditioner: it is the
    quadratic model along the update the optimizer actually takes.

    Args:
        xp: the array namespace.
        step: the step's index (0-based, skipped steps not counted).
        adaptive: the warning watches the preconditioned sharpness of an adaptive optimizer.

    Returns:
        `step < UPDATE_STEPS` for an adaptive optimizer; False otherwise.
    """
    return (step < UPDATE_STEPS) & adaptive


def update_quotient(xp: Any, lr: Any, curvature: Any, descent: Any) -> Any:
    r"""The lr times the curvature along the update, relative to its slope: $q = \text{lr}\, u^\top H u / (-g^\top u)$.

    Along the step $w \to w + \text{lr}\, u$ the quadratic model of the CDAT paper (eq. 2) changes the loss by
    $-\text{lr}\,(-g^\top u)\,(1 - q / 2)$: the step lowers the loss when $q < 2$
    ([`UPDATE_EDGE`][eos_core.monitor.UPDATE_EDGE]) and raises it when $q > 2$, i.e. when lr exceeds the on-edge lr
    $2 (-g^\top u) / u^\top H u$ of eq. 7. For gradient descent ($u = -g$) $q = \text{lr}\, g^\top H g / g^\top g
    \le \text{lr}\, \lambda_{\max}$. Only the step $\text{lr}\, u$ matters: `(lr / c, c u)` gives the same q.

    Args:
        xp: the array namespace.
        lr: the step's learning rate.
        curvature: $u^\top H u$.
        descent: $-g^\top u$.

    Returns:
        q, NaN when u is not a descent direction (`descent <= 0`) or the inputs are not finite.
    """
    safe = xp.where(descent > 0, descent, 1.0)
    return xp.where(descent > 0, lr * curvature / safe, math.nan)


def conclusive(xp: Any, made: Any, position: Any, restart: int) -> Any:
    r"""Whether a tracker's reading is a Ritz value of this step's operator alone (beyond the threshold: a warning).

    The reading after a tick is the top Ritz value of the current restarted-Lanczos cycle, built from the products
    since the cycle started: `restart` of them when the tick ended on a restart (`position == 0`), else `position`.
    When this tick made all of them they are products of one operator, so the reading is a Ritz value of this step's
    (batch) Hessian and a lower bound of its lambda_max: lr x reading above the threshold proves lr x lambda_max above
    it, however far from converged. A reading that mixes products of steps several ticks apart is neither. Two kinds
    of tick qualify: the cold start, and a warm tick that starts a cycle (one product: the Rayleigh quotient of the
    tracker's vector on this step's operator).

    Args:
        xp: the array namespace.
        made: the products this tick made on the tracker (0 when it did not tick).
        position: the tracker's position in its cycle after them.
        restart: products per cycle (the tracker's `restart`).

    Returns:
        `made > 0` and `made >= (restart if position == 0 else position)`.
    """
    needed = xp.where(position == 0, restart, position)
    return (made > 0) & (made >= needed)


def warning_update(xp: Any, streak: Any, unstable: Any, fresh: Any, value: Any, limit: Any, patience: int,
                   certain: Any = False) -> tuple[Any, Any, Any]:
    """One step of the early-warning rule.

    Args:
        xp: the array namespace.
        streak: consecutive fresh measurements above `limit` so far (int).
        unstable: whether the warning is on (int 0/1).
        fresh: a new measurement of lr x sharpness was made on this step.
        value: that measurement (NaN counts as below).
        limit: `edge * (1 + margin)` ([`threshold`][eos_core.monitor.threshold]).
        patience: measurements above `limit` in a row that turn the warning on.
        certain: the measurement is a Ritz value of this step's operator alone
            ([`conclusive`][eos_core.monitor.conclusive]), a lower bound of its lambda_max: above `limit` it counts as
            `patience` measurements. Patience guards against the tracker's other readings, which mix Hessians
            several steps apart and can overshoot; runs far above the edge blow up within a few steps (1-7 on the
            benchmark's MLP), too soon for three readings.

    Returns:
        `(streak, unstable, fired)` (`unstable` a boolean): `fired` is True on the step the warning turns on (once
        per episode; the episode ends at the first fresh measurement at or below `limit`).
    """
    above = fresh & (value > limit)
    counted = xp.where(certain, xp.maximum(streak + 1, patience), streak + 1)
    streak = xp.where(above, counted, xp.where(fresh, 0, streak))
    now = streak >= patience
    fired = now & (unstable == 0)
    return streak, now, fired


def warning_message(value: float, edge: float, margin: float, patience: int, step: int, what: str) -> str:
    """The RuntimeWarning's text."""
    return (f"eos_core: step {step}: {what} = {value:.4g} is above the optimizer's edge of stability {edge:.4g} by "
            f"more than {100 * margin:.0f}% ({patience} consecutive measurements, or one of this step's Hessian "
            "alone): the loss is likely "
            "to spike or diverge, or, with an adaptive optimizer, to stall well above what a lower learning rate "
            "reaches (lower the learning rate; the diagnostic 'unstable' is 1 while this lasts)")


def update_warning_message(value: float, margin: float, step: int) -> str:
    """The RuntimeWarning's text when the quotient along the update fires.

    Returns:
        The text, for [`update_quotient`][eos_core.monitor.update_quotient] equal to `value` on step `step`.
    """
    return (f"eos_core: step {step}: lr x curvature along the update, lr u'Hu / (-g'u) = {value:.4g}, is above "
            f"{UPDATE_EDGE:g}, the edge of stability along the update, by more than {100 * margin:.0f}%: the "
            "quadratic model predicts that this step raises the loss (an adaptive optimizer's first step, before its "
            "preconditioned sharpness can be measured); the loss is likely to spike or diverge, or to stall well "
            "above what a lower learning rate reaches (lower the learning rate; the diagnostic 'unstable' is 1 while "
            "this lasts)")
