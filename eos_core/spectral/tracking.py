r"""Streaming lambda_max: a top-eigenvalue tracker that spends one Hessian-vector product at a time.

A training run's Hessian changes little between steps, so the top eigenpair need not be recomputed from scratch every
time it is wanted. [`tracker_step`][eos_core.spectral.tracking.tracker_step] advances a *restarted Lanczos* iteration
by one operator application and returns an estimate after every application:

* a cycle starts from the current estimate $x$ of the top eigenvector;
* application $j$ ($0 \le j < m$) multiplies the newest Lanczos vector $q_j$, extends the
  tridiagonal matrix $T_{j+1} = Q_{j+1}^\top H Q_{j+1}$ by one row (three-term recurrence, full
  reorthogonalisation against the cycle's basis) and reports its top Ritz value $\theta$ with the
  Lanczos residual estimate $|\beta_{j+1} s_{j+1}|$ of $\|H y - \theta y\|$ (an absolute bound on the
  distance of $\theta$ to the spectrum, and $\approx r^2 / \text{gap}$ the actual error once converged);
* after $m$ applications (`restart`) the cycle restarts from the top Ritz vector, which becomes the
  new $x$.

With `restart=2` each cycle maximises the Rayleigh quotient over $\mathrm{span}\{x, Hx\}$, at least as
good per product as power iteration (whose next iterate lies in that span) and, unlike power iteration, it
converges to the largest *algebraic* eigenvalue whatever the sign of the smallest. Larger `restart` values
converge faster per product on clustered spectra, at the memory cost of `restart` parameter-sized vectors; the
adapters' monitors use [`TRACKER_RESTART`][eos_core.monitor.TRACKER_RESTART] = 3 (at the edge of stability the top
eigenvalues cluster, and a cycle of two products reads well below lambda_max).
The products of one cycle are taken at successive training steps, so they belong to slightly different
Hessians; the tracker follows the Hessian as it moves and the residual says how well the estimate fits.

Written against [`VectorOps`][eos_core.spectral.VectorOps] and [`Numerics`][eos_core.numerics.Numerics] with fixed
shapes and no value-dependent Python branching, so the same code runs on numpy arrays, torch parameter lists and JAX
pytrees under `jit`. The adapters decide *when* to call it (every `k` steps, `k` chosen from a time budget, see
[`MonitorBudget`][eos_core.spectral.tracking.MonitorBudget]).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from eos_core import _validation as check
from eos_core.monitor import product_share
from eos_core.spectral.power_iteration import normalized
from eos_core.spectral.vector_ops import NumpyOps, VectorOps


class TrackerState(NamedTuple):
    """State of the streaming tracker (checkpoint it with the run: resuming is then bit-identical)."""

    basis: Any  #: the cycle's Lanczos vectors (a VectorOps basis of `restart` vectors; slot 0 is `x`)
    alpha: Any  #: diagonal of T, shape (restart,)
    beta: Any  #: off-diagonal of T, shape (restart,); beta[j] couples q_j and q_{j+1}
    position: Any  #: j, the application within the cycle (int, 0 <= j < restart)
    eigenvalue: Any  #: the latest estimate theta of lambda_max (NaN before the first application)
    residual: Any  #: the latest residual estimate |beta s| of ||H y - theta y|| (NaN before the first)
    products: Any  #: operator applications so far (int)
    age: Any  #: training steps since the latest application (int; advanced by `tracker_age`)


def tracker_init(v0: Any, *, restart: int = 2, ops: VectorOps | None = None) -> TrackerState:
    """A tracker starting from `v0` (normalised; a random vector when `v0` is zero).

    Args:
        v0: the start vector, e.g. [`eos_core.spectral.random_start`][] or a previous eigenvector.
        restart: m, applications per restarted-Lanczos cycle (>= 2); m parameter-sized vectors are kept.
        ops: vector operations for `v0`'s type (default: numpy).

    Returns:
        The initial state (no application made yet).

    Raises:
        ValueError: when `restart` < 2.
    """
    m = check.positive_int("tracker_init", "restart", restart)
    if m < 2:
        raise ValueError(f"tracker_init: restart must be >= 2 (a cycle of one application cannot move x), got {m}")
    ops = ops if ops is not None else NumpyOps()
    numerics = ops.numerics
    xp = numerics.xp
    x = normalized(ops, v0)
    basis = ops.basis_set(ops.basis_zeros(x, m), 0, x)
    # a separate array per field: JAX refuses to donate one buffer twice (a jitted step donating the state)
    return TrackerState(basis=basis, alpha=xp.zeros((m,), dtype=numerics.dtype),
                        beta=xp.zeros((m,), dtype=numerics.dtype), position=numerics.counter(0),
                        eigenvalue=numerics.scalar(math.nan), residual=numerics.scalar(math.nan),
                        products=numerics.counter(0), age=numerics.counter(0))


def _top_ritz(alpha: Any, beta: Any, j: Any, numerics: Any) -> tuple[Any, Any]:
    """Top eigenpair of the leading (j+1) x (j+1) block of the tridiagonal matrix, with fixed shapes.

    Entries past `j` are masked: their diagonal is pushed below every active Ritz value and their coupling
    to the active block is 0, so the top eigenpair of the full matrix is the active block's (padded by zeros).

    Returns:
        `(theta, s)`: the top Ritz value and its unit eigenvector in the tridiagonal basis.
    """
    xp = numerics.xp
    m = alpha.shape[0]
    index = xp.arange(m)
    active = index <= j
    spread = xp.max(xp.abs(xp.where(active, alpha, 0.0))) + 2.0 * xp.max(xp.abs(beta)) + 1.0
    diagonal = xp.where(active, alpha, -4.0 * spread)
    off = xp.where(index[: m - 1] < j, beta[: m - 1], 0.0)
    matrix = xp.diag(diagonal) + xp.diag(off, 1) + xp.diag(off, -1)
    values, vectors = xp.linalg.eigh(matrix)
    top = vectors[:, m - 1]
    return values[m - 1], xp.where(active, top, 0.0)


def _extend(state: TrackerState, j: Any, a: Any, w: Any, ops: VectorOps) -> tuple[Any, ...]:
    """Extend the tridiagonal matrix by row `j` and read its top Ritz pair (both versions of the tracker step).

    Args:
        state: the tracker's state before the step.
        j: the application within the cycle.
        a: `alpha_j = <q_j, H q_j>`.
        w: `H q_j` orthogonalised against the cycle's basis.
        ops: vector operations.

    Returns:
        `(b, alpha, beta, theta, s, residual, breakdown)`: `b = ||w||`, the tridiagonal entries with row `j`, the top
        Ritz value and its vector in the tridiagonal basis, the residual estimate `|b s_j|`, and whether `b` is
        negligible against the spectrum seen (an invariant subspace).
    """
    numerics = ops.numerics
    xp = numerics.xp
    b = ops.norm(w)
    alpha = numerics.index_update(state.alpha, j, a)
    beta = numerics.index_update(state.beta, j, b)
    theta, s = _top_ritz(alpha, beta, j, numerics)
    residual = xp.abs(b * s[j])
    scale = xp.maximum(xp.abs(theta), xp.max(xp.abs(alpha)))
    breakdown = b <= 64.0 * float(xp.finfo(numerics.dtype).eps) * xp.where(scale > 0, scale, 1.0)
    return b, alpha, beta, theta, s, residual, breakdown


def tracker_step(state: TrackerState, matvec: Callable[[Any], Any], *, ops: VectorOps | None = None
                 ) -> TrackerState:
    r"""One operator application: extend the cycle's Krylov basis by one vector and update the estimate.

    Args:
        state: the tracker's state.
        matvec: `v -> H v` (or the preconditioned operator) at the current parameters.
        ops: vector operations (default: numpy).

    Returns:
        The new state: `eigenvalue` is the top Ritz value of the cycle so far, `residual` its Lanczos
        residual estimate, `age` reset to 0; after `restart` applications the cycle restarts from the top
        Ritz vector. A breakdown (an invariant subspace) restarts early from the Ritz vector, which is then an
        eigenvector.
    """
    ops = ops if ops is not None else NumpyOps()
    if ops.numerics.eager:
        return _eager_tracker_step(state, matvec, ops)
    numerics = ops.numerics
    xp = numerics.xp
    m = state.alpha.shape[0]
    j = state.position
    onehot = (xp.arange(m) == j).astype(numerics.dtype)
    previous = (xp.arange(m) == j - 1).astype(numerics.dtype)
    q = ops.basis_combine(state.basis, onehot)
    w = matvec(q)
    a = ops.dot(q, w)
    beta_prev = xp.where(j > 0, state.beta[xp.maximum(j - 1, 0)], numerics.scalar(0.0))
    w = ops.axpy(-a, q, w)
    w = ops.axpy(-beta_prev, ops.basis_combine(state.basis, previous), w)
    for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
        w = ops.axpy(-1.0, ops.basis_combine(state.basis, ops.basis_coeffs(state.basis, w)), w)
    b, alpha, beta, theta, s, residual, breakdown = _extend(state, j, a, w, ops)
    restart = (j + 1 >= m) | breakdown
    ritz = normalized(ops, ops.basis_combine(state.basis, s))
    fresh = ops.basis_set(ops.basis_zeros(ritz, m), 0, ritz)
    grown = ops.basis_set(state.basis, xp.minimum(j + 1, m - 1), ops.scale(1.0 / xp.where(breakdown, 1.0, b), w))
    zeros = xp.zeros((m,), dtype=numerics.dtype)
    return TrackerState(
        basis=ops.select(restart, fresh, grown),
        alpha=xp.where(restart, zeros, alpha),
        beta=xp.where(restart, zeros, beta),
        position=xp.where(restart, numerics.counter(0), j + 1).astype(numerics.int_dtype),
        eigenvalue=theta,
        residual=residual,
        products=state.products + 1,
        age=numerics.counter(0),
    )


def _eager_tracker_step(state: TrackerState, matvec: Callable[[Any], Any], ops: VectorOps) -> TrackerState:
    """[`tracker_step`][eos_core.spectral.tracking.tracker_step] with concrete scalars (numpy, eager PyTorch).

    The same arithmetic as the fixed-shape version, branching on the host: the Lanczos vectors are taken from the
    basis as views instead of combinations with one-hot coefficients, the reorthogonalisation subtracts the active
    vectors one by one, and the Ritz vector (with its normalisation) is formed only when the cycle restarts. On a
    small model (9k parameters, 6 tensors) this takes a third of the fixed-shape version's time, which there is
    nearly as long as a training step.

    Returns:
        The new state, as [`tracker_step`][eos_core.spectral.tracking.tracker_step] returns it.
    """
    numerics = ops.numerics
    xp = numerics.xp
    m = state.alpha.shape[0]
    j = int(state.position)
    q = ops.basis_vector(state.basis, j)
    w = matvec(q)
    a = ops.dot(q, w)
    w = ops.axpy(-a, q, w)
    if j > 0:
        w = ops.axpy(-state.beta[j - 1], ops.basis_vector(state.basis, j - 1), w)
    for _ in range(2):  # full reorthogonalisation against the active vectors, twice ("twice is enough")
        coeffs = ops.basis_coeffs(state.basis, w)
        for i in range(j + 1):
            w = ops.axpy(-coeffs[i], ops.basis_vector(state.basis, i), w)
    b, alpha, beta, theta, s, residual, breakdown = _extend(state, j, a, w, ops)
    if j + 1 >= m or bool(breakdown):
        ritz = normalized(ops, ops.basis_combine(state.basis, s))
        zeros = xp.zeros((m,), dtype=numerics.dtype)
        return TrackerState(basis=ops.basis_set(ops.basis_zeros(ritz, m), 0, ritz), alpha=zeros, beta=zeros.copy(),
                            position=numerics.counter(0), eigenvalue=theta, residual=residual,
                            products=state.products + 1, age=numerics.counter(0))
    return TrackerState(basis=ops.basis_set(state.basis, j + 1, ops.scale(1.0 / b, w)), alpha=alpha, beta=beta,
                        position=numerics.counter(j + 1), eigenvalue=theta, residual=residual,
                        products=state.products + 1, age=numerics.counter(0))


def tracker_age(state: TrackerState, steps: int = 1) -> TrackerState:
    """`state` with `steps` more training steps since its latest application (the staleness counter)."""
    return state._replace(age=state.age + steps)


def tracker_vector(state: TrackerState, *, ops: VectorOps | None = None) -> Any:
    """The current estimate `x` of the top eigenvector (the start of the current cycle, unit norm)."""
    ops = ops if ops is not None else NumpyOps()
    m = state.alpha.shape[0]
    first = (ops.numerics.xp.arange(m) == 0).astype(ops.numerics.dtype)
    return ops.basis_combine(state.basis, first)


def tracker_refocused(state: TrackerState, *, ops: VectorOps | None = None) -> TrackerState:
    """`state` with its cycle ended early: from position `j >= 2` on, a restart from the top Ritz vector of the cycle.

    The next application then starts a cycle: its reading is the Rayleigh quotient of the best vector so far on the
    operator of that step alone, a lower bound of its lambda_max
    ([`conclusive`][eos_core.monitor.conclusive]). The monitors call this before the products that confirm a crossing
    of the warning threshold, so that those readings prove it as often as a cycle of two products would; in
    between, cycles of `restart` products track better. At position 0 or 1 (no Ritz vector better than `x` yet) the
    state is returned unchanged.

    Returns:
        The state, restarted when its position is at least 2 (the estimate, residual, products and age kept).
    """
    ops = ops if ops is not None else NumpyOps()
    numerics = ops.numerics
    xp = numerics.xp
    m = state.alpha.shape[0]
    j = state.position
    if numerics.eager and int(j) < 2:
        return state
    _, s = _top_ritz(state.alpha, state.beta, xp.maximum(j - 1, 0), numerics)
    ritz = normalized(ops, ops.basis_combine(state.basis, s))
    fresh = ops.basis_set(ops.basis_zeros(ritz, m), 0, ritz)
    zeros = xp.zeros((m,), dtype=numerics.dtype)
    if numerics.eager:
        return state._replace(basis=fresh, alpha=zeros, beta=zeros.copy(), position=numerics.counter(0))
    early = j >= 2
    return state._replace(basis=ops.select(early, fresh, state.basis), alpha=xp.where(early, zeros, state.alpha),
                          beta=xp.where(early, zeros, state.beta),
                          position=xp.where(early, numerics.counter(0), j).astype(numerics.int_dtype))


def tracker_restarted(state: TrackerState, restart: int, *, ops: VectorOps | None = None) -> TrackerState:
    """`state` restarted from its eigenvector estimate with `restart` Lanczos vectors.

    For a tracker saved with another `restart` (a checkpoint of an earlier release): the estimate, its residual, the
    product count and the age are kept, and the next application starts a cycle from
    [`tracker_vector`][eos_core.spectral.tracking.tracker_vector] (the products of an unfinished cycle are lost).

    Returns:
        A state at the start of a cycle, with `restart` vectors.

    Raises:
        ValueError: when `restart` < 2.
    """
    ops = ops if ops is not None else NumpyOps()
    fresh = tracker_init(tracker_vector(state, ops=ops), restart=restart, ops=ops)
    return fresh._replace(eigenvalue=state.eigenvalue, residual=state.residual, products=state.products,
                          age=state.age)


class MonitorBudget:
    r"""Chooses how often the tracker may apply the operator so that monitoring costs `budget` of training time.

    The adapter reports the wall time of each training step
    ([`record_step`][eos_core.spectral.tracking.MonitorBudget.record_step], the interval between two optimizer steps,
    everything included) and of each operator application
    ([`record_product`][eos_core.spectral.tracking.MonitorBudget.record_product]) and, where it can be timed, of its
    own per-step work for monitoring ([`record_overhead`][eos_core.spectral.tracking.MonitorBudget.record_overhead]);
    all are smoothed (EMA). The tracker then applies the operator every

    $$
    k = \\max(1, \\lceil t_{\\rm product} / (s \\cdot t_{\\rm step}) \\rceil), \\qquad
    s = 0.9\\,\\text{budget} - \\min(t_{\\rm overhead} / t_{\\rm step}, \\tfrac12 \\text{budget})
    $$

    steps ([`product_share`][eos_core.monitor.product_share]), so products and bookkeeping together take at most
    `budget` (e.g. 0.05) of the time, a tenth of it kept back for what cannot be timed, while the bookkeeping takes
    at most half of it. Before both times are known the first application happens at the first step and
    [`every`][eos_core.spectral.tracking.MonitorBudget.every] is `initial_every`.

    Args:
        budget: the fraction of training time monitoring may take, in (0, 1].
        initial_every: `k` before the first measurements (default `ceil(1 / budget)`: one extra gradient
            costs about one step).
        smoothing: EMA weight of the past for the times.

    Raises:
        ValueError: for a budget outside (0, 1], `initial_every` < 1 or `smoothing` outside [0, 1).
    """

    def __init__(self, budget: float, *, initial_every: int | None = None, smoothing: float = 0.9) -> None:
        self.budget = check.in_interval("MonitorBudget", "budget", budget, 0.0, 1.0, closed_low=False,
                                        closed_high=True)
        default = math.ceil(1.0 / self.budget - 1e-9)
        self.initial_every = default if initial_every is None else check.positive_int(
            "MonitorBudget", "initial_every", initial_every)
        self.smoothing = check.in_interval("MonitorBudget", "smoothing", smoothing, 0.0, 1.0, closed_low=True,
                                           closed_high=False)
        self.step_time: float | None = None
        self.product_time: float | None = None
        self.overhead_time: float | None = None

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else self.smoothing * old + (1.0 - self.smoothing) * new

    def record_step(self, seconds: float) -> None:
        """The wall time of one training step (without monitoring)."""
        if math.isfinite(seconds) and seconds > 0:
            self.step_time = self._smooth(self.step_time, float(seconds))

    def record_overhead(self, seconds: float) -> None:
        """The wall time of the adapter's own per-step work for monitoring (outside products): a step's bookkeeping."""
        if math.isfinite(seconds) and seconds >= 0:
            self.overhead_time = self._smooth(self.overhead_time, float(seconds))

    def record_product(self, seconds: float) -> None:
        """The wall time of one operator application."""
        if math.isfinite(seconds) and seconds > 0:
            self.product_time = self._smooth(self.product_time, float(seconds))

    @property
    def every(self) -> int:
        """`k`: steps between two operator applications."""
        if self.step_time is None or self.product_time is None:
            return self.initial_every
        return max(1, math.ceil(self.product_time / (self.share * self.step_time) - 1e-9))

    @property
    def cost(self) -> float | None:
        """`t_product / t_step`: one application in training steps (None before both times are known)."""
        if self.step_time is None or self.product_time is None:
            return None
        return self.product_time / self.step_time

    @property
    def share(self) -> float:
        """The budget left for products per step ([`product_share`][eos_core.monitor.product_share])."""
        return product_share(self.budget, self.overhead)

    @property
    def overhead(self) -> float:
        """`t_overhead / t_step`: the per-step bookkeeping in training steps (0 before both times are known)."""
        if self.step_time is None or self.overhead_time is None or self.step_time <= 0:
            return 0.0
        return self.overhead_time / self.step_time

    def reset_product(self) -> None:
        """Forget the product time (the adapter switched to a product of another cost)."""
        self.product_time = None

    def state_dict(self) -> dict[str, Any]:
        """The measured times, for checkpoints."""
        return {"step_time": self.step_time, "product_time": self.product_time, "overhead_time": self.overhead_time}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore [`state_dict`][eos_core.spectral.tracking.MonitorBudget.state_dict]'s output."""
        self.step_time = saved.get("step_time")
        self.product_time = saved.get("product_time")
        self.overhead_time = saved.get("overhead_time")
