r"""The sharpness monitor of :func:`eos_core.adapters.jax.tune` (``monitor_budget``), traced under ``jax.jit``.

The monitor keeps a restarted-Lanczos tracker of lambda_max of H (and of ``P^{-1/2} H P^{-1/2}`` for an Adam /
RMSProp base) in :class:`MonitorState`, inside the :class:`~eos_core.adapters.jax.TuneState`, so it is checkpointed
with the optax state and resumes bit-identically. Each step decides in the compiled program whether to *tick*
(``lax.cond``: nothing of a tick runs on the other steps) and a tick applies each operator once to the tracker's
newest Lanczos vector (:mod:`eos_core.spectral.tracking`).

* **The product.** One-sided finite differences ``(g(w + h v) - g) / h`` reusing the step's gradient ``g`` (one
  extra gradient); at the 1st, 10th, 100th, ... tick also the exact product (``jvp-grad``, else
  ``double-backward``: the first that traces), and finite differences are used until the next check only when they
  agree to :data:`eos_core.monitor.CHECK_TOLERANCE` (``monitor_exact`` in the diagnostics). A loss that cannot be
  differentiated twice keeps finite differences.
* **The budget.** Nothing can be timed inside ``jit``, so the spacing follows a **cost model** kept in the state:
  ``cost_fd`` and ``cost_exact``, one product in training steps (defaults
  :data:`eos_core.monitor.COST_MODEL`: 1.1 and 2.5, from the routes' costs measured on an H100). A step earns
  ``monitor_budget`` steps of credit and a tick costs ``operators * cost`` (:func:`eos_core.monitor.wants_tick`),
  so ticks come every ``k = ceil(operators * cost / budget)`` steps. The costs are arrays of the state, not
  constants of the program: :func:`set_monitor_cost` (host side, between steps) changes ``k`` without
  recompiling, and :class:`MonitorTimer` measures them from the wall time of ticking and non-ticking steps (the
  Keras callback on the JAX backend uses it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from eos_core import monitor as rules
from eos_core import routes
from eos_core.adapters.jax.oracles import hvp, resolve_hvp_route
from eos_core.adapters.jax.tree_ops import TreeOps, tree_random_start
from eos_core.numerics import Numerics
from eos_core.spectral import preconditioned_operator
from eos_core.spectral.tracking import TrackerState, tracker_age, tracker_init, tracker_step

PyTree = Any
#: Lanczos vectors per tracker (see :mod:`eos_core.spectral.tracking`)
RESTART = 2
#: exact H v routes the checks try, in order
EXACT_CHAIN: tuple[str, ...] = (routes.JVP_GRAD, routes.DOUBLE_BACKWARD)


class MonitorState(NamedTuple):
    """The monitor's part of the :class:`~eos_core.adapters.jax.TuneState` (arrays only)."""

    tracker: TrackerState  #: lambda_max of H
    preconditioned: TrackerState | None  #: lambda_max of P^{-1/2} H P^{-1/2} (None without a preconditioner)
    credit: jax.Array  #: steps of monitoring time available (float)
    cost_fd: jax.Array  #: one finite-difference product, in training steps (host-adjustable)
    cost_exact: jax.Array  #: one exact product, in training steps (host-adjustable)
    exact: jax.Array  #: int32 1 while the products are exact
    ticks: jax.Array  #: int32, ticks so far
    streak: jax.Array  #: int32, consecutive fresh measurements above the warning threshold
    unstable: jax.Array  #: int32 1 while the warning is on
    seen: jax.Array  #: int32 1 once a fresh lr x sharpness was measured
    latest: jax.Array  #: the latest lr x sharpness the warning looked at (float)
    check: jax.Array  #: ||Hv_fd - Hv_exact|| / ||Hv_exact|| at the last check (float; NaN before)


class Tick(NamedTuple):
    """What one step's monitoring produced (for the report)."""

    state: MonitorState
    ticked: jax.Array  #: bool: the operators were applied on this step


def monitor_init(params: PyTree, seed: int, *, preconditioned: bool, numerics: Numerics) -> MonitorState:
    """The monitor's initial state: trackers at :func:`eos_core.spectral.random_start` (``seed``, ``seed + 1``)."""
    ops = TreeOps(numerics)
    scalar = numerics.scalar

    def zero() -> jax.Array:
        return jnp.zeros((), jnp.int32)

    def tracker(offset: int) -> TrackerState:
        return tracker_init(tree_random_start(params, seed + offset), restart=RESTART, ops=ops)

    return MonitorState(
        tracker=tracker(0), preconditioned=tracker(1) if preconditioned else None, credit=scalar(0.0),
        cost_fd=scalar(rules.COST_MODEL["fd"]), cost_exact=scalar(rules.COST_MODEL["exact"]), exact=zero(),
        ticks=zero(), streak=zero(), unstable=zero(), seen=zero(), latest=scalar(math.nan), check=scalar(math.nan))


def exact_route(value_fn: Callable[[PyTree], jax.Array], params: PyTree) -> str | None:
    """The exact H v route the checks use (the first of :data:`EXACT_CHAIN` that traces), or None."""
    try:
        route = resolve_hvp_route(value_fn, params, routes.AUTO)
    except Exception:  # noqa: BLE001 - nothing traces: finite differences only
        return None
    return route if route in EXACT_CHAIN else None


def tick_cost(state: MonitorState, operators: int) -> jax.Array:
    """A tick's cost in training steps: ``operators`` products of the route in use."""
    return operators * jnp.where(state.exact > 0, state.cost_exact, state.cost_fd)


def every(state: MonitorState, operators: int, budget: float) -> jax.Array:
    """``k = ceil(operators * cost / budget)`` (a float array, for the diagnostics)."""
    return jnp.maximum(1.0, jnp.ceil(tick_cost(state, operators) / budget - 1e-6))


def _advance(state: TrackerState, first: PyTree, matvec: Callable[[PyTree], PyTree], ops: TreeOps
             ) -> TrackerState:
    """One application whose product is ``first``; a cold tracker then continues with ``matvec`` until its
    relative residual is below :data:`eos_core.monitor.COLD_TOLERANCE` (at most :data:`COLD_PRODUCTS` in all)."""
    cold = state.products == 0
    state = tracker_step(state, lambda _: first, ops=ops)

    def keep_going(carry: tuple[TrackerState, jax.Array]) -> jax.Array:
        current, made = carry
        residual = rules.relative_residual(jnp, current.residual, current.eigenvalue)
        return (made < rules.COLD_PRODUCTS) & ((made < RESTART) | ~(residual <= rules.COLD_TOLERANCE))

    def more(carry: tuple[TrackerState, jax.Array]) -> tuple[TrackerState, jax.Array]:
        current, made = carry
        return tracker_step(current, matvec, ops=ops), made + 1

    def converge(current: TrackerState) -> TrackerState:
        return lax.while_loop(keep_going, more, (current, jnp.asarray(1, jnp.int32)))[0]

    return lax.cond(cold, converge, lambda current: current, state)


def _next_vector(state: TrackerState, ops: TreeOps) -> PyTree:
    m = state.alpha.shape[0]
    return ops.basis_combine(state.basis, (jnp.arange(m) == state.position).astype(ops.numerics.dtype))


def monitor_step(state: MonitorState, *, value_fn: Callable[[PyTree], jax.Array], params: PyTree, grads: PyTree,
                 precond: PyTree | None, finite: jax.Array, budget: float, danger: jax.Array, exact: str | None,
                 fd_eps: float | None, ops: TreeOps) -> Tick:
    """Advance the trackers' ages and tick when the credit allows (see the module docstring).

    Args:
        state: the monitor's state.
        value_fn: the loss on the batch.
        params: ``w``.
        grads: the step's gradient at ``w`` (reused by the finite differences).
        precond: P of this step (None without a preconditioned tracker).
        finite: the step's inputs are finite (no tick on a skipped step).
        budget: ``monitor_budget``.
        danger: the latest lr x sharpness is beyond the warning threshold and the warning has not fired.
        exact: the exact route (None: finite differences only, no checks).
        fd_eps: machine epsilon of the finite differences (None: the parameters').
        ops: vector operations.

    Returns:
        The new state and whether it ticked.
    """
    operators = 1 + int(state.preconditioned is not None)
    cost = tick_cost(state, operators)
    credit = rules.accrue(jnp, state.credit, budget, cost)
    cold = state.tracker.products == 0
    tick = finite & rules.wants_tick(jnp, credit, cost, cold=cold, danger=danger)

    def fd(v: PyTree) -> PyTree:
        return hvp(value_fn, params, v, route=routes.FD_ONESIDED, grads=grads, fd_eps=fd_eps)[0].product

    def exact_product(v: PyTree) -> PyTree:
        return hvp(value_fn, params, v, route=exact, grads=grads, fd_eps=fd_eps)[0].product

    def aged(current: MonitorState) -> MonitorState:
        def age(tracker: TrackerState | None) -> TrackerState | None:
            if tracker is None:
                return None
            return tracker._replace(age=jnp.where(tracker.products > 0, tracker_age(tracker).age, tracker.age))

        return current._replace(tracker=age(current.tracker), preconditioned=age(current.preconditioned),
                                credit=credit)

    def run(current: MonitorState) -> MonitorState:
        is_exact, ratio = current.exact > 0, current.check
        q = _next_vector(current.tracker, ops)
        if exact is None:
            first = fd(q)
            regular = fd
            extra = jnp.asarray(0.0, credit.dtype)
        else:
            checking = rules.is_check(jnp, current.ticks + 1)

            def checked(v: PyTree) -> tuple[PyTree, jax.Array, jax.Array]:
                approximate, reference = fd(v), exact_product(v)
                difference = ops.norm(jax.tree.map(lambda a, b: a - b, approximate, reference))
                size = ops.norm(reference)
                use_exact = ~rules.finite_differences_agree(jnp, difference, size)
                chosen = jax.tree.map(lambda a, b: jnp.where(use_exact, b, a), approximate, reference)
                return chosen, use_exact, (difference / size).astype(ratio.dtype)

            def plain(v: PyTree) -> tuple[PyTree, jax.Array, jax.Array]:
                return lax.cond(is_exact, exact_product, fd, v), is_exact, ratio

            first, is_exact, ratio = lax.cond(checking, checked, plain, q)

            def regular(v: PyTree) -> PyTree:
                return lax.cond(is_exact, exact_product, fd, v)

            other = jnp.where(is_exact, current.cost_fd, current.cost_exact)
            # the check's second product (the first tick's is part of the cold start, outside the budget)
            extra = jnp.where(checking & (current.tracker.products > 0), other, 0.0).astype(credit.dtype)
        tracker = _advance(current.tracker, first, regular, ops)
        preconditioned = current.preconditioned
        if preconditioned is not None:
            operator = preconditioned_operator(regular, precond, ops=ops)
            preconditioned = _advance(preconditioned, operator(_next_vector(preconditioned, ops)), operator, ops)
        spent = operators * jnp.where(is_exact, current.cost_exact, current.cost_fd) + extra
        return current._replace(tracker=tracker, preconditioned=preconditioned, credit=credit - spent,
                                exact=is_exact.astype(jnp.int32), ticks=current.ticks + 1, check=ratio)

    new = lax.cond(tick, run, aged, state)
    return Tick(new, tick)


def _unknown(edge: Any) -> bool:
    """The edge is the Python NaN of a base whose edge is not known (a traced edge is known)."""
    return isinstance(edge, float) and not math.isfinite(edge)


def warning_step(state: MonitorState, *, fresh: jax.Array, value: jax.Array, edge: float | jax.Array,
                 margin: float, patience: int, counted: jax.Array | None = None) -> tuple[MonitorState, jax.Array]:
    """The early-warning rule on this step's watched lr x sharpness; returns the state and ``fired``.

    ``edge`` is a float (NaN: unknown, no warning) or a traced scalar (it follows an injected momentum). ``fresh``:
    a new measurement was made; ``counted``: it enters the warning (:func:`eos_core.monitor.counts_for_warning`;
    default ``fresh``)."""
    counted = fresh if counted is None else counted
    known = jnp.isfinite(value)
    latest = jnp.where(known, value, state.latest).astype(state.latest.dtype)
    seen = state.seen | (fresh & known).astype(jnp.int32)
    if _unknown(edge):
        return state._replace(latest=latest, seen=seen), jnp.asarray(False)
    streak, now, fired = rules.warning_update(jnp, state.streak, state.unstable, counted, value,
                                              rules.threshold(edge, margin), patience)
    return state._replace(latest=latest, seen=seen, streak=streak.astype(jnp.int32),
                          unstable=now.astype(jnp.int32)), fired


def danger(state: MonitorState, edge: float | jax.Array, margin: float) -> jax.Array:
    """The latest lr x sharpness is beyond the warning threshold and the warning has not fired yet."""
    if _unknown(edge):
        return jnp.asarray(False)
    return (state.unstable == 0) & (state.latest > rules.threshold(edge, margin))


# -- host side ------------------------------------------------------------------------------------------------
def set_monitor_cost(state: Any, *, fd: float | None = None, exact: float | None = None) -> Any:
    """``state`` (an optax state holding one ``TuneState``) with the monitor's product costs replaced.

    The costs are in training steps (one finite-difference / exact product over one step); the spacing
    ``k = ceil(operators * cost / monitor_budget)`` follows at the next step, without recompiling.

    Raises:
        ValueError: no ``TuneState`` with a monitor in ``state``, or a cost that is not positive.
    """
    from eos_core.adapters.jax.transform import TuneState

    for name, value in (("fd", fd), ("exact", exact)):
        if value is not None and not (math.isfinite(float(value)) and float(value) > 0):
            raise ValueError(f"set_monitor_cost: {name} must be a positive number of training steps, got {value!r}")
    found = []

    def replace(node: Any) -> Any:
        if not isinstance(node, TuneState):
            return node
        found.append(node)
        if node.monitor is None:
            return node
        monitor = node.monitor
        if fd is not None:
            monitor = monitor._replace(cost_fd=jnp.asarray(fd, monitor.cost_fd.dtype))
        if exact is not None:
            monitor = monitor._replace(cost_exact=jnp.asarray(exact, monitor.cost_exact.dtype))
        return node._replace(monitor=monitor)

    out = jax.tree.map(replace, state, is_leaf=lambda node: isinstance(node, TuneState))
    if len(found) != 1 or found[0].monitor is None:
        raise ValueError("set_monitor_cost: the state must hold exactly one TuneState of a tune(...) built with "
                         "monitor_budget")
    return out


class MonitorTimer:
    """Measures the monitor's product cost from the wall time of whole steps, on the host.

    Inside ``jit`` nothing can be timed; outside, a step that ticked takes longer than one that did not. Feed
    :meth:`record` the wall time of each step (after ``block_until_ready``) with the state after it; it keeps EMAs
    of plain steps and of ticking steps and estimates one product as ``(t_tick - t_plain) / (operators t_plain)``.
    :meth:`cost` returns it once both are known; pass it to :func:`set_monitor_cost` (for the route in use).

    Args:
        smoothing: EMA weight of the past.
    """

    def __init__(self, smoothing: float = 0.9) -> None:
        self.smoothing = float(smoothing)
        self.plain: float | None = None
        self.ticking: float | None = None
        self.operators = 1
        self.exact = False
        self._ticks: int | None = None

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else self.smoothing * old + (1.0 - self.smoothing) * new

    def record(self, seconds: float, state: Any) -> None:
        """One step's wall time and the optax state after it."""
        from eos_core.adapters.jax.transform import find_tune_state

        monitor = find_tune_state(state).monitor
        if monitor is None:
            return
        ticks = int(jax.device_get(monitor.ticks))
        previous, self._ticks = self._ticks, ticks
        self.operators = 1 + int(monitor.preconditioned is not None)
        self.exact = bool(jax.device_get(monitor.exact))
        if previous is None or not (math.isfinite(seconds) and seconds > 0):
            return
        if ticks == previous:
            self.plain = self._smooth(self.plain, seconds)
        elif ticks > 1 and not bool(rules.is_check(np, ticks)):  # not the cold start, not a check (two products)
            self.ticking = self._smooth(self.ticking, seconds)

    def cost(self) -> float | None:
        """One product in training steps (None until both kinds of steps were seen)."""
        if self.plain is None or self.ticking is None:
            return None
        return max((self.ticking - self.plain) / (self.operators * self.plain), 1e-3)
