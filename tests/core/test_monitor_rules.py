"""The sharpness monitor's framework-free rules (eos_core.monitor): edges, budget, early warning."""

import math

import numpy as np
import pytest

from eos_core import monitor as rules
from eos_core.numerics import PYTHON_SCALARS


def diverges(step, lam: float, lr: float, steps: int = 4000) -> bool:
    """Run a first-order method on f(w) = lam w^2 / 2 from w = 1; True when |w| grows."""
    w, state = 1.0, None
    for _ in range(steps):
        w, state = step(w, lam * w, lr, state)
        if not math.isfinite(w) or abs(w) > 1e6:
            return True
    return abs(w) > 1.0


def heavy_ball(beta, d):
    def step(w, g, lr, buf):
        buf = g * (1 - d) if buf is None else beta * buf + (1 - d) * g
        return w - lr * buf, buf
    return step


def nesterov(beta):
    def step(w, g, lr, buf):
        buf = g if buf is None else beta * buf + g
        return w - lr * (g + beta * buf), buf
    return step


def threshold_of(step, lam=1.0):
    """The lr x lambda at which the method starts to diverge, by bisection."""
    low, high = 0.01, 100.0
    for _ in range(50):
        mid = math.sqrt(low * high)
        low, high = (low, mid) if diverges(step, lam, mid) else (mid, high)
    return low


@pytest.mark.parametrize(("method", "edge"), [
    (heavy_ball(0.0, 0.0), rules.heavy_ball_edge(0.0)),
    (heavy_ball(0.9, 0.0), rules.heavy_ball_edge(0.9)),
    (heavy_ball(0.9, 0.9), rules.adam_edge(0.9)),  # Adam with P frozen: dampened heavy ball
    (nesterov(0.9), rules.nesterov_edge(0.9)),
])
def test_each_edge_is_where_the_method_starts_to_diverge_on_a_quadratic(method, edge):
    assert threshold_of(method) == pytest.approx(edge, rel=1e-3)


def test_the_edges_from_impulse_responses_match_the_formulas():
    k = np.arange(8)
    assert rules.edge_from_impulse_response([1.0, 0, 0, 0, 0]) == pytest.approx(2.0)
    assert rules.edge_from_impulse_response(0.1 * 0.9**k) == pytest.approx(rules.adam_edge(0.9))
    assert rules.edge_from_impulse_response(0.9**k) == pytest.approx(rules.heavy_ball_edge(0.9))
    nesterov_response = np.concatenate([[1.9], 0.9 ** (k[1:] + 1)])
    assert rules.edge_from_impulse_response(nesterov_response) == pytest.approx(rules.nesterov_edge(0.9))
    assert math.isnan(rules.edge_from_impulse_response([1.0, 0.5, 0.1, 0.3, 0.2]))  # not geometric: unknown
    assert rules.adam_edge(0.9) == pytest.approx(38.0)


def test_the_budget_spaces_the_products_and_the_credit_is_capped():
    assert rules.every(1.1, 0.05) == 22 and rules.every(1.0, 0.05) == 20
    credit, ticks = 0.0, 0
    for _ in range(1000):
        credit = rules.accrue(np, credit, 0.05, 1.0)
        if rules.wants_tick(np, credit, 1.0, cold=False, danger=False):
            credit -= 1.0
            ticks += 1
    assert ticks == 50
    assert rules.accrue(np, 5.0, 0.05, 1.0) == 1.0  # no burst saved up while nothing ticked
    assert rules.product_share(0.05, 0.0) == pytest.approx(0.045)  # 10% kept back for what cannot be timed
    assert rules.product_share(0.05, 0.01) == pytest.approx(0.035)
    assert rules.product_share(0.05, 0.2) == pytest.approx(0.02)  # bookkeeping beyond the budget: 40% is left


def test_host_scalars_follow_numpy():
    """The PyTorch adapter applies the per-step rules to Python floats: the same results as with numpy."""
    values = (0.0, -1.5, 2.5, 3.0, math.nan, math.inf, -math.inf)
    for x in values:
        assert PYTHON_SCALARS.isnan(x) == bool(np.isnan(x)) and PYTHON_SCALARS.isfinite(x) == bool(np.isfinite(x))
        assert PYTHON_SCALARS.logical_not(x > 0) is bool(np.logical_not(np.float64(x) > 0))
        for y in values:
            for name in ("minimum", "maximum"):
                got, want = getattr(PYTHON_SCALARS, name)(x, y), float(getattr(np, name)(x, y))
                assert got == want or (math.isnan(got) and math.isnan(want)), (name, x, y)
            for fresh in (False, True):
                for streak in (0, 2):
                    a = rules.warning_update(PYTHON_SCALARS, streak, 0, fresh, x, y, 3)
                    b = rules.warning_update(np, streak, 0, fresh, x, y, 3)
                    assert [int(v) for v in a] == [int(v) for v in b]
        assert rules.relative_residual(PYTHON_SCALARS, 0.5, x) == pytest.approx(
            float(rules.relative_residual(np, 0.5, x)), nan_ok=True)


def test_the_warning_needs_patience_fires_once_per_episode_and_ends_below_the_threshold():
    streak, unstable, fired_at = 0, 0, []
    values = [50, 50, 50, 50, 50, 30, 50, 50, 50]  # limit 47.5 (edge 38, margin 25%)
    for step, value in enumerate(values):
        streak, now, fired = rules.warning_update(np, streak, unstable, True, value, rules.threshold(38.0, 0.25), 3)
        unstable = int(now)
        if fired:
            fired_at.append(step)
    assert fired_at == [2, 8]


@pytest.mark.parametrize("xp", [np, PYTHON_SCALARS])
def test_a_converged_reading_above_the_threshold_fires_at_once_and_below_it_ends_the_episode(xp):
    limit = rules.threshold(2.0, rules.MARGIN)
    # (fresh, value, certain): one converged reading above the limit fires; a tracked one only adds to the streak
    runs = {"certain": [(True, 4.0, True)], "tracked": [(True, 4.0, False)],
            "certain below": [(True, 3.0, True)], "not fresh": [(False, 4.0, True)],
            "tracked then certain": [(True, 4.0, False), (True, 4.0, True), (True, 1.0, True), (True, 4.0, False)]}
    outcome = {}
    for name, steps in runs.items():
        streak, unstable, trace = 0, 0, []
        for fresh, value, certain in steps:
            streak, now, fired = rules.warning_update(xp, streak, unstable, fresh, value, limit, 3, certain)
            unstable = int(bool(now))
            trace.append((int(streak), unstable, bool(fired)))
        outcome[name] = trace
    assert outcome == {"certain": [(3, 1, True)], "tracked": [(1, 0, False)], "certain below": [(0, 0, False)],
                       "not fresh": [(0, 0, False)],
                       "tracked then certain": [(1, 0, False), (3, 1, True), (0, 0, False), (1, 0, False)]}


def test_a_reading_is_conclusive_when_this_tick_made_all_its_products():
    # (products this tick, position after them) -> conclusive; restart = 2
    cases = {(5, 1): True,  # a cold start stopping mid-cycle: the Rayleigh quotient of its new vector
             (4, 0): True,  # a cold start ending on a restart: a Ritz value of two of its own products
             (1, 1): True,  # a warm tick starting a cycle: the Rayleigh quotient on this step's operator
             (1, 0): False,  # a warm tick ending a cycle: mixes this product with one of an earlier step
             (0, 1): False}  # no tick on this step
    for (made, position), expected in cases.items():
        assert bool(rules.conclusive(np, made, position, 2)) is expected, (made, position)
        assert bool(rules.conclusive(PYTHON_SCALARS, made, position, 2)) is expected


@pytest.mark.parametrize("xp", [np, PYTHON_SCALARS], ids=["numpy", "host"])
def test_a_cold_start_converges_a_whole_cycle_then_to_the_tolerance_and_a_nan_residual_does_not_stop_it(xp):
    tol, restart = rules.COLD_TOLERANCE, 3
    assert rules.continues_cold_start(xp, 1, 0.0, 5.0, restart)  # converged, but not a whole cycle yet
    assert not rules.continues_cold_start(xp, restart, 0.5 * tol * 5.0, 5.0, restart)
    assert rules.continues_cold_start(xp, restart, 2.0 * tol * 5.0, 5.0, restart)
    assert rules.continues_cold_start(xp, restart, 2.0 * tol * 5.0, -5.0, restart)  # |theta|
    assert rules.continues_cold_start(xp, restart, math.nan, 5.0, restart)  # a non-finite product
    assert rules.continues_cold_start(xp, restart, 1.0, 0.0, restart)  # theta = 0: no relative residual
    assert not rules.continues_cold_start(xp, rules.COLD_PRODUCTS, math.nan, 5.0, restart)  # at most 16


@pytest.mark.parametrize("xp", [np, PYTHON_SCALARS], ids=["numpy", "host"])
def test_a_tick_makes_one_product_converges_when_cold_and_completes_a_cycle_when_stale(xp):
    restart, far = 3, 5.0  # a relative residual of 1: neither converged nor fresh
    warm = {"cold": False, "stale": False}
    assert not rules.continues_tick(xp, 1, 1, far, 5.0, restart, **warm)  # one product a tick
    cold = {"cold": True, "stale": False}
    assert rules.continues_tick(xp, 1, 1, 0.0, 5.0, restart, **cold)  # a whole cycle first
    assert not rules.continues_tick(xp, restart, 0, 0.0, 5.0, restart, **cold)
    assert rules.continues_tick(xp, restart, 0, far, 5.0, restart, **cold)
    # converged mid-cycle, or out of products: the cold start still ends at a cycle boundary, so that the next
    # tick's product is the Rayleigh quotient of the cycle's best vector on that step's operator
    assert rules.continues_tick(xp, 4, 1, 0.0, 5.0, restart, **cold)
    assert rules.continues_tick(xp, rules.COLD_PRODUCTS, 1, far, 5.0, restart, **cold)
    assert not rules.continues_tick(xp, rules.COLD_PRODUCTS + 2, 0, far, 5.0, restart, **cold)
    stale = {"cold": False, "stale": True}
    assert rules.continues_tick(xp, 1, 0, 0.0, 5.0, restart, **stale)  # refocused at position 0: a new cycle
    assert rules.continues_tick(xp, 2, 1, 0.0, 5.0, restart, **stale)  # until it ends...
    assert not rules.continues_tick(xp, 4, 0, far, 5.0, restart, **stale)  # ...at position 0, converged or not


@pytest.mark.parametrize("xp", [np, PYTHON_SCALARS], ids=["numpy", "host"])
def test_a_reading_is_stale_beyond_the_residual_bound_and_when_it_is_not_a_number(xp):
    limit = rules.STALE_RESIDUAL
    assert not rules.is_stale(xp, 0.99 * limit * 4.0, 4.0)
    assert not rules.is_stale(xp, 0.99 * limit * 4.0, -4.0)
    assert rules.is_stale(xp, 1.01 * limit * 4.0, 4.0)
    assert rules.is_stale(xp, math.nan, 4.0) and rules.is_stale(xp, 1.0, 0.0) and rules.is_stale(xp, 1.0, math.nan)


@pytest.mark.parametrize("xp", [np, PYTHON_SCALARS], ids=["numpy", "host"])
def test_the_preconditioned_tracker_starts_cold_on_the_first_counted_step(xp):
    grace = rules.GRACE_STEPS
    assert rules.cold_start_due(xp, 0, None, 0) and rules.cold_start_due(xp, 0, 0, 0)  # H: at the first step
    assert not rules.cold_start_due(xp, 3, 0, grace - 1)  # P waits for the first counted reading
    assert rules.cold_start_due(xp, 3, 0, grace)
    # only on that step: one that could not start then (no optimizer state yet) waits for a tick the budget pays for
    assert not rules.cold_start_due(xp, 3, 0, grace + 1) and not rules.cold_start_due(xp, 3, 0, grace + 50)
    assert not rules.cold_start_due(xp, 3, 4, grace) and not rules.cold_start_due(xp, 3, None, grace)
    assert not rules.tracks_preconditioned(xp, grace - 1) and rules.tracks_preconditioned(xp, grace)
    assert bool(rules.counts_for_warning(xp, True, grace, adaptive=True))  # its cold start's reading counts


def test_an_adaptive_optimizers_first_steps_do_not_count():
    assert not rules.counts_for_warning(np, True, rules.GRACE_STEPS - 1, adaptive=True)
    assert rules.counts_for_warning(np, True, rules.GRACE_STEPS, adaptive=True)
    assert rules.counts_for_warning(np, True, 0)  # gradient descent: no grace
    assert not rules.counts_for_warning(np, False, 100)


def test_the_quotient_along_the_update_is_the_quadratic_models_rise_test():
    # f(w) = 1/2 w'Aw at w, step D = lr u: f(w + D) - f(w) = g'D + 1/2 D'AD, which is > 0 exactly when q > 2
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    a = a @ a.T
    w = rng.normal(size=5)
    g = a @ w
    u = -g / np.linalg.norm(g)
    for lr in (0.01, 0.1, 0.5, 1.0, 3.0):
        q = float(rules.update_quotient(np, lr, u @ a @ u, -(g @ u)))
        d = lr * u
        rise = g @ d + 0.5 * d @ a @ d
        assert (q > rules.UPDATE_EDGE) == (rise > 0), (lr, q, rise)
        assert q == pytest.approx(float(rules.update_quotient(PYTHON_SCALARS, lr / 4, 16 * (u @ a @ u),
                                                              -4 * (g @ u))))  # only lr u matters
    assert math.isnan(rules.update_quotient(PYTHON_SCALARS, 0.1, 1.0, 0.0))  # not a descent direction
    assert math.isnan(rules.update_quotient(PYTHON_SCALARS, 0.1, 1.0, -1.0))


def test_only_an_adaptive_optimizers_first_step_is_watched_along_the_update():
    assert rules.UPDATE_STEPS == 1
    assert rules.watches_update(PYTHON_SCALARS, 0, adaptive=True)
    assert not rules.watches_update(PYTHON_SCALARS, 1, adaptive=True)
    assert not rules.watches_update(PYTHON_SCALARS, 0, adaptive=False)
    assert bool(rules.watches_update(np, np.int32(0), adaptive=True))
