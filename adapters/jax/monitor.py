r"""The sharpness monitor of [`eos_core.adapters.jax.tune`][] (`monitor_budget`), traced under `jax.jit`.

The monitor keeps a restarted-Lanczos tracker of $\lambda_{\max}(H)$ (and of $\lambda_{\max}(P^{-1/2} H P^{-1/2})$
for an Adam / RMSProp base) in [`MonitorState`][eos_core.adapters.jax.MonitorState], inside the
[`TuneState`][eos_core.adapters.jax.TuneState], so it is checkpointed with the optax state and resumes
bit-identically. Each step decides in the compiled program whether to *tick* (`lax.cond`: nothing of a tick runs on
the other steps) and a tick applies each operator once to the tracker's newest Lanczos vector
([`eos_core.spectral.tracking`][]); a tick whose reading is stale ([`eos_core.monitor.is_stale`][]) completes a
Lanczos cycle on the step's operator, charged to the budget. The preconditioned tracker starts cold on step
[`eos_core.monitor.GRACE_STEPS`][], the first whose readings count for the warning
([`eos_core.monitor.cold_start_due`][]).

* **The product.** One-sided finite differences $(g(w + h v) - g) / h$ reusing the step's gradient $g$ (one
  extra gradient); at the 1st, 10th, 100th, ... tick also the exact product (`jvp-grad`, else
  `double-backward`: the first that traces), and finite differences are used until the next check only when they
  agree to [`eos_core.monitor.CHECK_TOLERANCE`][] (`monitor_exact` in the diagnostics). A loss that cannot be
  differentiated twice keeps finite differences.
* **The budget.** Nothing can be timed inside `jit`, so the spacing follows a **cost model** kept in the state:
  `cost_fd` and `cost_exact`, one product in training steps (defaults [`eos_core.monitor.COST_MODEL`][]: 1.1 and
  2.5, from the routes' costs measured on an H100). A step earns 90% of `monitor_budget` in steps of credit
  ([`eos_core.monitor.product_share`][] with no bookkeeping timed: the rest is kept back for what cannot be timed)
  and a tick costs `operators * cost` ([`eos_core.monitor.wants_tick`][]), so ticks come every
  $k = \lceil \text{operators} \cdot \text{cost} / (0.9\,\text{budget}) \rceil$ steps. The costs are arrays of
  the state, not constants of the program: [`set_monitor_cost`][eos_core.adapters.jax.set_monitor_cost] (host
  side, between steps) changes $k$ without recompiling, and [`MonitorTimer`][eos_core.adapters.jax.MonitorTimer]
  measures them from the wall time of ticking and non-ticking steps (the Keras callback on the JAX backend uses it).
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
from eos_core.adapters.jax.tree_ops import TreeOps, tree_random_start, tree_select
from eos_core.numerics import Numerics
from eos_core.spectral import preconditioned_operator
from eos_core.spectral.tracking import TrackerState, tracker_age, tracker_init, tracker_refocused, tracker_step

PyTree = Any
#: Lanczos vectors per tracker ([`eos_core.monitor.TRACKER_RESTART`][])
RESTART = rules.TRACKER_RESTART
#: exact H v routes the checks try, in order
EXACT_CHAIN: tuple[str, ...] = (routes.JVP_GRAD, routes.DOUBLE_BACKWARD)


class MonitorState(NamedTuple):
    """The monitor's part of the [`TuneState`][eos_core.adapters.jax.TuneState] (arrays only).

    Built by `monitor_init`, advanced by `monitor_step` and `warning_step` inside the compiled update; the two
    costs can be changed between steps with [`set_monitor_cost`][eos_core.adapters.jax.set_monitor_cost].
    """

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

    state: MonitorState  #: the monitor's state after the step
    ticked: jax.Array  #: bool: the operators were applied on this step
    #: bool, shape (2,): each tracker's reading is a Ritz value of this step's operator alone
    #: ([`eos_core.monitor.conclusive`][]: the early warning then needs no patience)
    conclusive: jax.Array


def monitor_init(params: PyTree, seed: int, *, preconditioned: bool, numerics: Numerics) -> MonitorState:
    r"""The monitor's initial state: cold trackers, no credit, the default cost model.

    Args:
        params: the parameters (a pytree; only shapes, dtypes and shardings are read).
        seed: seed of the start vectors ([`eos_core.spectral.random_start`][]): `seed` for H, `seed + 1` for the
            preconditioned operator.
        preconditioned: also track $\lambda_{\max}(P^{-1/2} H P^{-1/2})$ (an Adam / RMSProp base).
        numerics: the numerics of the float scalars (their dtype).

    Returns:
        A [`MonitorState`][eos_core.adapters.jax.MonitorState] with `credit = 0`, the costs of
        [`eos_core.monitor.COST_MODEL`][], every counter 0 and `latest` / `check` NaN.
    """
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
    """The exact $H v$ route the finite-difference checks compare with.

    Args:
        value_fn: the loss on the batch as a function of the parameters.
        params: the parameters.

    Returns:
        The route `auto` resolves to (`resolve_hvp_route`) when it is one of `EXACT_CHAIN` (`jvp-grad`,
        `double-backward`); None when only finite differences trace (then there are no checks).
    """
    try:
        route = resolve_hvp_route(value_fn, params, routes.AUTO)
    except Exception:  # noqa: BLE001 - nothing traces: finite differences only
        return None
    return route if route in EXACT_CHAIN else None


def tick_cost(state: MonitorState, operators: int) -> jax.Array:
    """A tick's cost in training steps.

    Args:
        state: the monitor's state (its `exact` flag and the two costs).
        operators: the operators a tick applies (1, or 2 with the preconditioned tracker).

    Returns:
        `operators * cost_exact` while the products are exact, else `operators * cost_fd` (a 0-d float array).
    """
    return operators * jnp.where(state.exact > 0, state.cost_exact, state.cost_fd)


def every(state: MonitorState, operators: int, budget: float) -> jax.Array:
    r"""The spacing of the ticks, for the `monitor_every` diagnostic.

    Args:
        state: the monitor's state.
        operators: the operators a tick applies (1 or 2).
        budget: `monitor_budget`, the share of training time the monitor may take.

    Returns:
        $k = \max(1, \lceil \text{operators} \cdot \text{cost} / s \rceil)$ steps, as a 0-d float array, with $s$
        the budget left for products ([`product_share`][eos_core.monitor.product_share]: 90% of it, no bookkeeping
        is timed inside `jit`).
    """
    return jnp.maximum(1.0, jnp.ceil(tick_cost(state, operators) / rules.product_share(budget, 0.0) - 1e-6))


def _advance(state: TrackerState, first: PyTree, matvec: Callable[[PyTree], PyTree], ops: TreeOps
             ) -> tuple[TrackerState, jax.Array, jax.Array]:
    """One tracker step whose product is `first`; a cold or stale tracker then continues with `matvec`.

    A tracker with no product yet converges from its random start; a warm tracker whose reading is stale after the
    product ([`eos_core.monitor.is_stale`][]) completes a cycle on this step's operator, from the best vector so far
    ([`tracker_refocused`][eos_core.spectral.tracking.tracker_refocused]) when its cycle holds products of earlier
    ticks: one loop, [`eos_core.monitor.continues_tick`][].

    Returns:
        The tracker's state after the products, whether its reading is a Ritz value of this step's operator alone
        ([`eos_core.monitor.conclusive`][]), and the stale cycle's extra products (0 on other ticks: charged to the
        budget, unlike a cold start's).
    """
    cold = state.products == 0
    state = tracker_step(state, lambda _: first, ops=ops)
    stale = ~cold & rules.is_stale(jnp, state.residual, state.eigenvalue)
    # a stale cycle starts from the best vector when the cycle holds products of earlier ticks
    state = lax.cond(stale, lambda current: tracker_refocused(current, ops=ops), lambda current: current, state)

    def keep_going(carry: tuple[TrackerState, jax.Array]) -> jax.Array:
        current, made = carry
        return rules.continues_tick(jnp, made, current.position, current.residual, current.eigenvalue, RESTART,
                                    cold=cold, stale=stale)

    def more(carry: tuple[TrackerState, jax.Array]) -> tuple[TrackerState, jax.Array]:
        current, made = carry
        return tracker_step(current, matvec, ops=ops), made + 1

    state, made = lax.while_loop(keep_going, more, (state, jnp.asarray(1, jnp.int32)))
    extra = jnp.where(stale, made - 1, 0)
    return state, rules.conclusive(jnp, made, state.position, RESTART), extra


def _next_vector(state: TrackerState, ops: TreeOps) -> PyTree:
    m = state.alpha.shape[0]
    return ops.basis_combine(state.basis, (jnp.arange(m) == state.position).astype(ops.numerics.dtype))


def monitor_step(state: MonitorState, *, value_fn: Callable[[PyTree], jax.Array], params: PyTree, grads: PyTree,
                 precond: PyTree | None, finite: jax.Array, budget: float, danger: jax.Array, exact: str | None,
                 fd_eps: float | None, ops: TreeOps, step: jax.Array | int) -> Tick:
    """Advance the trackers' ages and tick when the credit allows (see the module docstring).

    The credit grows by `budget` per step, capped at one tick's cost ([`eos_core.monitor.accrue`][]); a tick
    happens when [`eos_core.monitor.wants_tick`][] says so (enough credit, a cold tracker, or `danger` within the
    allowed debt) and the inputs are finite, and spends `operators * cost` plus, on a check, the other route's
    product.

    Args:
        state: the monitor's state.
        value_fn: the loss on the batch as a function of the parameters.
        params: $w$.
        grads: the step's gradient at $w$ (reused by the finite differences).
        precond: $P$ of this step (None without a preconditioned tracker).
        finite: the step's inputs are finite (no tick on a skipped step).
        budget: `monitor_budget`.
        danger: the latest lr x sharpness is beyond the warning threshold and the warning has not fired.
        exact: the exact route (None: finite differences only, no checks).
        fd_eps: machine epsilon of the finite differences (None: the parameters').
        ops: vector operations.
        step: the step's index (skipped steps not counted): the preconditioned tracker applies its operator from
            step [`GRACE_STEPS`][eos_core.monitor.GRACE_STEPS] on and starts cold there
            ([`eos_core.monitor.cold_start_due`][]).

    Returns:
        A [`Tick`][eos_core.adapters.jax.monitor.Tick]: the new state (ages advanced, credit updated; trackers,
        `exact`, `ticks` and `check` updated on a tick) and whether it ticked.
    """
    operators = 1 + int(state.preconditioned is not None)
    cost = tick_cost(state, operators)
    credit = rules.accrue(jnp, state.credit, rules.product_share(budget, 0.0), cost)  # bookkeeping is not timed
    cold = rules.cold_start_due(jnp, state.tracker.products,
                                None if state.preconditioned is None else state.preconditioned.products, step)
    tick = finite & rules.wants_tick(jnp, credit, cost, cold=cold, danger=danger)
    tracks_preconditioned = rules.tracks_preconditioned(jnp, step)

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
                                credit=credit), jnp.zeros((2,), bool)

    def refocus(tracker: TrackerState | None) -> TrackerState | None:
        # confirming a crossing: a cycle ends after two products, so the reading proves it (a lower bound) or not
        if tracker is None:
            return None
        return lax.cond(danger, lambda t: tracker_refocused(t, ops=ops), lambda t: t, tracker)

    def run(current: MonitorState) -> MonitorState:
        current = current._replace(tracker=refocus(current.tracker), preconditioned=refocus(current.preconditioned))
        is_exact, ratio = current.exact > 0, current.check
        q = _next_vector(current.tracker, ops)
        if exact is None:
            first = fd(q)
            regular = fd
            extra = jnp.asarray(0.0, credit.dtype)
        else:
            checking = rules.is_check(jnp, current.ticks + 1)

            def checked(v: PyTree) -> tuple[PyTree, jax.Array, jax.Array]:
                approximate = fd(v)
                # the exact product in a computation of its own (a branch of `checking`, true here): XLA then lets
                # its temporaries share memory with the finite difference's (67 -> 50 MB on a small GPT)
                reference = lax.cond(checking, exact_product, lambda u: u, v)
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
        tracker, alone, stale = _advance(current.tracker, first, regular, ops)
        preconditioned, alone_preconditioned = current.preconditioned, jnp.asarray(False)
        applied = 1 + stale  # products charged: one per operator, and a stale reading's cycle
        if preconditioned is not None:
            operator = preconditioned_operator(regular, precond, ops=ops)

            def advance(tracker: TrackerState) -> tuple[TrackerState, jax.Array, jax.Array]:
                return _advance(tracker, operator(_next_vector(tracker, ops)), operator, ops)

            preconditioned, alone_preconditioned, stale_preconditioned = lax.cond(
                tracks_preconditioned, advance,
                lambda tracker: (tracker, jnp.asarray(False), jnp.asarray(0, jnp.int32)), preconditioned)
            applied = applied + tracks_preconditioned.astype(jnp.int32) + stale_preconditioned
        spent = applied.astype(credit.dtype) * jnp.where(is_exact, current.cost_exact, current.cost_fd) + extra
        return current._replace(tracker=tracker, preconditioned=preconditioned, credit=credit - spent,
                                exact=is_exact.astype(jnp.int32), ticks=current.ticks + 1,
                                check=ratio), jnp.stack([alone, alone_preconditioned])

    new, alone = lax.cond(tick, run, aged, state)
    return Tick(new, tick, alone)


def update_quotient(*, value_fn: Callable[[PyTree], jax.Array], params: PyTree, grads: PyTree, step: PyTree,
                    exact_route: str | None, fd_eps: float | None, ops: TreeOps) -> jax.Array:
    r"""One product along the step's update: $q = \text{lr}\, u^\top H u / (-g^\top u)$.

    The quotient of [`eos_core.monitor.update_quotient`][] for the step $D = \text{lr}\, u$, i.e.
    $|D|\, v^\top H v / (-g^\top v)$, from the product of $v = D / |D|$: the exact one when
    an exact route traces (it is made once per run, and finite differences are inaccurate on ReLU networks), else
    the one-sided finite difference reusing `grads`. It does not wait for the step's tick to choose: a product
    depending on the tick kept a parameter-sized buffer alive across it (one more in the compiled step's
    temporaries).

    Args:
        value_fn: the loss on the batch as a function of the parameters.
        params: $w$.
        grads: the step's gradient at $w$.
        step: the step $D = \text{lr}\, u$ the base takes.
        exact_route: the exact route (None: finite differences only).
        fd_eps: machine epsilon of the finite differences (None: the parameters').
        ops: vector operations.

    Returns:
        q as a 0-d array (NaN when the step is 0, not a descent direction or not finite).
    """
    norm = ops.norm(step)
    safe = jnp.where(norm > 0, norm, 1.0)
    v = jax.tree.map(lambda x: (x / safe.astype(x.dtype)).astype(x.dtype), step)

    route = routes.FD_ONESIDED if exact_route is None else exact_route
    product = hvp(value_fn, params, v, route=route, grads=grads, fd_eps=fd_eps)[0].product
    descent = jnp.where(norm > 0, -ops.dot(grads, v), 0.0)
    return rules.update_quotient(jnp, norm, ops.dot(v, product), descent)  # lr u = |D| v


def update_warning_step(state: MonitorState, *, quotient: jax.Array, margin: float, patience: int
                        ) -> tuple[MonitorState, jax.Array]:
    """The early warning on the quotient along the update (NaN: not measured on this step, nothing changes).

    The quotient is [`update_quotient`][eos_core.adapters.jax.monitor.update_quotient]'s. Above
    `UPDATE_EDGE * (1 + margin)` ([`eos_core.monitor.UPDATE_EDGE`][]) it warns at once: a measurement of this step's
    own update on this step's Hessian. `latest` (the lr x sharpness `danger` reads) is left alone.

    Returns:
        `(state, fired)` as [`warning_step`][eos_core.adapters.jax.monitor.warning_step].
    """
    measured = jnp.isfinite(quotient)
    streak, now, fired = rules.warning_update(jnp, state.streak, state.unstable, measured, quotient,
                                              rules.threshold(rules.UPDATE_EDGE, margin), patience, True)
    return state._replace(seen=state.seen | measured.astype(jnp.int32), streak=streak.astype(jnp.int32),
                          unstable=now.astype(jnp.int32)), fired


def keep_when_skipped(applied: jax.Array, new: MonitorState, old: MonitorState) -> MonitorState:
    """`new` after an applied step, else `old`, except the trackers' Lanczos vectors, which are `new`'s.

    A step that is not applied does not tick (`monitor_step`'s `finite` includes it), so its vectors equal `old`'s.
    Leaving them out of the select lets XLA update them in place: a select of the whole state kept the old vectors
    alive after the tick's `lax.cond`, whose idle branch then copied them on every step, and read both copies again.

    Args:
        applied: the step was applied (a scalar bool).
        new: the monitor's state after the step.
        old: its state before.

    Returns:
        The selected state.
    """
    def without_vectors(state: MonitorState) -> MonitorState:
        def strip(tracker: TrackerState | None) -> TrackerState | None:
            return None if tracker is None else tracker._replace(basis=None)

        return state._replace(tracker=strip(state.tracker), preconditioned=strip(state.preconditioned))

    chosen = tree_select(applied, without_vectors(new), without_vectors(old))

    def restore(tracker: TrackerState | None, source: TrackerState | None) -> TrackerState | None:
        return None if tracker is None else tracker._replace(basis=source.basis)  # same structure as `new`

    return chosen._replace(tracker=restore(chosen.tracker, new.tracker),
                           preconditioned=restore(chosen.preconditioned, new.preconditioned))


def _unknown(edge: Any) -> bool:
    """The edge is the Python NaN of a base whose edge is not known (a traced edge is known)."""
    return isinstance(edge, float) and not math.isfinite(edge)


def warning_step(state: MonitorState, *, fresh: jax.Array, value: jax.Array, edge: float | jax.Array,
                 margin: float, patience: int, counted: jax.Array | None = None,
                 certain: jax.Array | bool = False) -> tuple[MonitorState, jax.Array]:
    """The early-warning rule ([`eos_core.monitor.warning_update`][]) on this step's watched lr x sharpness.

    Args:
        state: the monitor's state.
        fresh: a new measurement was made on this step.
        value: the watched lr x sharpness of this step (NaN when unknown).
        edge: the edge of stability, a float (NaN: unknown, no warning) or a traced scalar (it follows an
            injected momentum).
        margin: `monitor_margin`: the threshold is `edge * (1 + margin)`.
        patience: `monitor_patience`, consecutive counted measurements above the threshold.
        counted: the measurement enters the warning ([`eos_core.monitor.counts_for_warning`][]); default `fresh`.
        certain: the measurement is a reading of this step's operator alone (`Tick.conclusive`): above the
            threshold it warns at once.

    Returns:
        `(state, fired)`: the state with `latest`, `seen`, `streak` and `unstable` updated, and a bool array, True
        on the step the warning turns on.
    """
    counted = fresh if counted is None else counted
    known = jnp.isfinite(value)
    latest = jnp.where(known, value, state.latest).astype(state.latest.dtype)
    seen = state.seen | (fresh & known).astype(jnp.int32)
    if _unknown(edge):
        return state._replace(latest=latest, seen=seen), jnp.asarray(False)
    streak, now, fired = rules.warning_update(jnp, state.streak, state.unstable, counted, value,
                                              rules.threshold(edge, margin), patience, certain)
    return state._replace(latest=latest, seen=seen, streak=streak.astype(jnp.int32),
                          unstable=now.astype(jnp.int32)), fired


def danger(state: MonitorState, edge: float | jax.Array, margin: float) -> jax.Array:
    """Whether the run looks unstable and the warning has not fired yet (ticks may then run into debt).

    Args:
        state: the monitor's state.
        edge: the edge of stability (a float, NaN when unknown, or a traced scalar).
        margin: `monitor_margin`.

    Returns:
        A bool array: the latest lr x sharpness is above `edge * (1 + margin)` and `unstable` is 0; False when
        the edge is unknown.
    """
    if _unknown(edge):
        return jnp.asarray(False)
    return (state.unstable == 0) & (state.latest > rules.threshold(edge, margin))


# -- host side ------------------------------------------------------------------------------------------------
def set_monitor_cost(state: Any, *, fd: float | None = None, exact: float | None = None) -> Any:
    r"""Replace the monitor's product costs in an optax state, on the host between steps.

    The costs are in training steps (one finite-difference / exact product over one step); the spacing
    $k = \lceil \text{operators} \cdot \text{cost} / \text{monitor\_budget} \rceil$ follows at the next step,
    without recompiling (the costs are arrays of the state).

    Args:
        state: an optax state holding exactly one [`TuneState`][eos_core.adapters.jax.TuneState] of a `tune`
            built with `monitor_budget`.
        fd: the cost of one finite-difference product (None: unchanged).
        exact: the cost of one exact product (None: unchanged).

    Returns:
        A state of the same structure with `cost_fd` / `cost_exact` replaced (dtypes kept).

    Raises:
        ValueError: no `TuneState`, more than one, or one without a monitor in `state`; or a cost that is not a
            positive finite number.

    Examples:
        A finite-difference product measured at 0.8 training steps
        ([`MonitorTimer.cost`][eos_core.adapters.jax.MonitorTimer.cost]):

        >>> state = set_monitor_cost(state, fd=0.8)  # doctest: +SKIP
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
    r"""Measures the monitor's product cost from the wall time of whole steps, on the host.

    Inside `jit` nothing can be timed; outside, a step that ticked takes longer than one that did not. Feed
    [`record`][eos_core.adapters.jax.MonitorTimer.record] the wall time of each step (after `block_until_ready`)
    with the state after it; it keeps EMAs of plain steps and of ticking steps that made one product per operator
    (the cold starts, the checks and a stale reading's cycle left out) and estimates one product as
    $(t_{\text{tick}} - t_{\text{plain}}) / (\text{operators} \cdot t_{\text{plain}})$ training steps.
    [`cost`][eos_core.adapters.jax.MonitorTimer.cost] returns it once both are known; pass it to
    [`set_monitor_cost`][eos_core.adapters.jax.set_monitor_cost] (for the route in use: `exact` tells which).

    Args:
        smoothing: EMA weight of the past, in [0, 1) (0: the last step only).

    Attributes:
        plain: EMA of the wall time of a step without a tick, in seconds (None before one was seen).
        ticking: EMA of the wall time of a ticking step, in seconds (None before one was seen).
        operators: operators a tick applies (1, or 2 with the preconditioned tracker), from the last state.
        exact: whether the monitor's products were exact at the last step recorded.

    Examples:
        >>> timer = MonitorTimer()  # doctest: +SKIP
        >>> for batch in batches:  # doctest: +SKIP
        ...     start = time.perf_counter()
        ...     params, state = step(params, state, batch)
        ...     jax.block_until_ready(params)
        ...     timer.record(time.perf_counter() - start, state)
        >>> if timer.cost() is not None:  # doctest: +SKIP
        ...     state = set_monitor_cost(state, **{"exact" if timer.exact else "fd": timer.cost()})
    """

    def __init__(self, smoothing: float = 0.9) -> None:
        self.smoothing = float(smoothing)
        self.plain: float | None = None
        self.ticking: float | None = None
        self.operators = 1
        self.exact = False
        self._ticks: int | None = None
        self._products: int | None = None

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else self.smoothing * old + (1.0 - self.smoothing) * new

    def record(self, seconds: float, state: Any) -> None:
        """Record one step's wall time and the optax state after it.

        The first call only remembers the tick count; a non-positive or non-finite time is ignored.

        Args:
            seconds: the step's wall time (after `block_until_ready`).
            state: the optax state after the step (holding one [`TuneState`][eos_core.adapters.jax.TuneState]).

        Raises:
            ValueError: `state` holds no `TuneState`, or more than one.
        """
        from eos_core.adapters.jax.transform import find_tune_state

        monitor = find_tune_state(state, caller="MonitorTimer.record").monitor
        if monitor is None:
            return
        ticks = int(jax.device_get(monitor.ticks))
        products = sum(int(jax.device_get(t.products)) for t in (monitor.tracker, monitor.preconditioned)
                       if t is not None)
        previous, self._ticks = self._ticks, ticks
        made, self._products = products - (self._products or 0), products
        self.operators = 1 + int(monitor.preconditioned is not None)
        self.exact = bool(jax.device_get(monitor.exact))
        if previous is None or not (math.isfinite(seconds) and seconds > 0):
            return
        if ticks == previous:
            self.plain = self._smooth(self.plain, seconds)
        elif made == self.operators and not bool(rules.is_check(np, ticks)):
            # one product per operator: not a cold start, a stale reading's cycle or a check (two products)
            self.ticking = self._smooth(self.ticking, seconds)

    def cost(self) -> float | None:
        r"""The estimated cost of one product, in training steps.

        Returns:
            $(t_{\text{tick}} - t_{\text{plain}}) / (\text{operators} \cdot t_{\text{plain}})$, at least 1e-3;
            None until both a plain and a ticking step were recorded.
        """
        if self.plain is None or self.ticking is None:
            return None
        return max((self.ticking - self.plain) / (self.operators * self.plain), 1e-3)
