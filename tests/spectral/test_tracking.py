"""The streaming top-eigenvalue tracker (restarted Lanczos, one application at a time) and the monitor budget."""

import math

import numpy as np
import pytest
import scipy.linalg as sl

from eos_core.spectral import power_iteration
from eos_core.spectral.tracking import (
    MonitorBudget,
    tracker_age,
    tracker_init,
    tracker_refocused,
    tracker_restarted,
    tracker_step,
    tracker_vector,
)

N = 80


def moving_operator(seed: int = 0, speed: float = 0.005):
    """H(t) = Q(t) diag(lambda(t)) Q(t)^T: a slowly rotating basis, top eigenvalues rescaled by 1 + 0.2 sin(t/40),
    and a most-negative eigenvalue larger in magnitude than lambda_max (power iteration's failure case)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((N, N))
    a = (a - a.T) / 2.0
    a /= np.linalg.norm(a, 2)
    q0, _ = np.linalg.qr(rng.standard_normal((N, N)))
    base = np.concatenate([[10.0, 8.5, 8.0], np.linspace(-15.0, 6.0, N - 3)])

    def at(t: int):
        q = sl.expm(speed * t * a) @ q0
        lam = base.copy()
        lam[:3] *= 1.0 + 0.2 * np.sin(t / 40.0)
        return (q * lam) @ q.T, lam[0]

    return at


def test_tracks_a_rotating_and_rescaling_operator_with_one_product_per_step():
    at = moving_operator()
    state = tracker_init(np.random.default_rng(1).standard_normal(N), restart=2)
    errors = []
    for t in range(400):
        h, top = at(t)
        state = tracker_step(state, lambda v, h=h: h @ v)
        if t >= 200:
            errors.append(abs(float(state.eigenvalue) - top) / top)
    assert np.median(errors) < 1e-3 and max(errors) < 0.02
    assert int(state.products) == 400


def test_finds_the_largest_algebraic_eigenvalue_where_power_iteration_finds_the_most_negative():
    h, top = moving_operator(speed=0.0)(0)
    start = np.random.default_rng(2).standard_normal(N)
    assert float(power_iteration(lambda v: h @ v, start, tol=0.0, max_iters=60).eigenvalue) < 0
    state = tracker_init(start, restart=2)
    for _ in range(200):
        state = tracker_step(state, lambda v: h @ v)
    assert float(state.eigenvalue) == pytest.approx(top, rel=1e-9)
    x = tracker_vector(state)
    assert abs(float(x @ np.linalg.eigh(h)[1][:, -1])) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("restart", [2, 3, 5])
def test_the_residual_bounds_the_distance_to_the_spectrum(restart):
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    spectrum = np.linspace(-3.0, 9.0, N)
    h = (q * spectrum) @ q.T
    state = tracker_init(rng.standard_normal(N), restart=restart)
    for _ in range(40):
        state = tracker_step(state, lambda v: h @ v)
        distance = np.min(np.abs(spectrum - float(state.eigenvalue)))
        assert distance <= float(state.residual) * (1 + 1e-8) + 1e-12


def test_age_counts_steps_since_the_last_product_and_a_product_resets_it():
    h = np.diag(np.arange(1.0, 6.0))
    state = tracker_init(np.ones(5))
    state = tracker_age(tracker_age(state), 3)
    assert int(state.age) == 4 and math.isnan(float(state.eigenvalue))
    state = tracker_step(state, lambda v: h @ v)
    assert int(state.age) == 0 and int(state.products) == 1


def test_an_invariant_start_vector_restarts_cleanly():
    h = np.diag([5.0, 1.0, 1.0, -2.0])
    state = tracker_init(np.array([1.0, 0.0, 0.0, 0.0]), restart=3)
    for _ in range(4):
        state = tracker_step(state, lambda v: h @ v)
        assert float(state.eigenvalue) == pytest.approx(5.0) and np.all(np.isfinite(state.basis))


def test_a_copied_state_continues_bit_identically():
    at = moving_operator(seed=4)
    state = tracker_init(np.random.default_rng(5).standard_normal(N), restart=3)
    for t in range(7):
        h = at(t)[0]
        state = tracker_step(state, lambda v, h=h: h @ v)
    copy = type(state)(*[np.array(x, copy=True) for x in state])
    for t in range(7, 20):
        h = at(t)[0]
        state = tracker_step(state, lambda v, h=h: h @ v)
        copy = tracker_step(copy, lambda v, h=h: h @ v)
    assert all(np.array_equal(a, b) for a, b in zip(state, copy, strict=True))


@pytest.mark.parametrize("restart", [2, 3])
def test_the_eager_step_follows_the_fixed_shape_step(restart):
    """Concrete scalars take a host-branching path (views, the Ritz vector only at a restart); under `jit` the
    fixed-shape one runs. The same operator sequence, a breakdown included, gives the same states."""
    from eos_core.numerics import NUMPY
    from eos_core.spectral.vector_ops import NumpyOps

    eager, fixed = NumpyOps(), NumpyOps(NUMPY._replace(eager=False))
    at = moving_operator(seed=6)
    start = np.random.default_rng(7).standard_normal(N)
    states = {"eager": tracker_init(start, restart=restart, ops=eager),
              "fixed": tracker_init(start, restart=restart, ops=fixed)}
    for t in range(25):
        h = at(t)[0] if t < 20 else 3.0 * np.eye(N)  # then every vector is an eigenvector: breakdowns
        for name, ops in (("eager", eager), ("fixed", fixed)):
            states[name] = tracker_step(states[name], lambda v, h=h: h @ v, ops=ops)
        a, b = states["eager"], states["fixed"]
        assert int(a.position) == int(b.position) and int(a.products) == int(b.products) == t + 1
        for field in ("basis", "alpha", "beta", "eigenvalue", "residual"):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-10, atol=1e-12, err_msg=field)
    assert int(states["eager"].position) == 0 and float(states["eager"].eigenvalue) == pytest.approx(3.0)


@pytest.mark.parametrize("eager", [True, False])
def test_a_cycle_refocused_after_two_products_continues_as_a_cycle_of_two(eager):
    """The monitors end a cycle after two products while they confirm a crossing: a 3-vector tracker refocused at
    position 2 must then read exactly what a 2-vector tracker reads (its restart vector is the same Ritz vector)."""
    from eos_core.numerics import NUMPY
    from eos_core.spectral.vector_ops import NumpyOps

    ops = NumpyOps(NUMPY._replace(eager=eager))
    at = moving_operator(seed=4)
    start = np.random.default_rng(5).standard_normal(N)
    two, three = tracker_init(start, restart=2, ops=ops), tracker_init(start, restart=3, ops=ops)
    for t in range(12):
        h = at(t)[0]
        for _ in range(2):  # two products on the same operator, then the 3-vector tracker is refocused
            two = tracker_step(two, lambda v, h=h: h @ v, ops=ops)
            three = tracker_step(three, lambda v, h=h: h @ v, ops=ops)
        assert int(two.position) == 0 and int(three.position) == 2
        three = tracker_refocused(three, ops=ops)
        assert int(three.position) == 0 and not np.any(three.alpha) and not np.any(three.beta)
        np.testing.assert_allclose(tracker_vector(three, ops=ops), tracker_vector(two, ops=ops), atol=1e-10)
        assert float(three.eigenvalue) == pytest.approx(float(two.eigenvalue), rel=1e-10)
    # at positions 0 and 1 there is no better vector than x: unchanged
    assert tracker_refocused(three, ops=ops) is three or all(
        np.array_equal(a, b) for a, b in zip(tracker_refocused(three, ops=ops), three, strict=True))
    one = tracker_step(three, lambda v: at(12)[0] @ v, ops=ops)
    same = tracker_refocused(one, ops=ops)
    assert int(same.position) == 1 and np.array_equal(same.basis, one.basis)


def test_a_tracker_saved_with_another_restart_resumes_from_its_vector():
    at = moving_operator(seed=8)
    state = tracker_init(np.random.default_rng(9).standard_normal(N), restart=2)
    for t in range(7):
        state = tracker_step(state, lambda v, t=t: at(t)[0] @ v)
    state = tracker_age(state, 5)
    resized = tracker_restarted(state, 3)
    assert resized.basis.shape == (3, N) and resized.alpha.shape == resized.beta.shape == (3,)
    assert int(resized.position) == 0 and not np.any(resized.alpha) and not np.any(resized.basis[1:])
    np.testing.assert_array_equal(resized.basis[0], tracker_vector(state))
    for field in ("eigenvalue", "residual", "products", "age"):
        assert getattr(resized, field) == getattr(state, field)
    h, top = at(7)
    for _ in range(90):
        resized = tracker_step(resized, lambda v: h @ v)
    assert float(resized.eigenvalue) == pytest.approx(top, rel=1e-6)


def test_restart_must_be_at_least_two():
    with pytest.raises(ValueError, match="restart"):
        tracker_init(np.ones(3), restart=1)


def test_budget_spaces_products_to_the_budget():
    budget = MonitorBudget(0.05)
    assert budget.every == 20  # one extra gradient costs about one step
    budget.record_step(0.1)
    budget.record_product(0.08)
    assert budget.every == math.ceil(0.08 / (0.045 * 0.1))  # 10% of the budget is kept back (monitor.RESERVE)
    budget.record_product(1.0)  # smoothed
    assert budget.every == math.ceil((0.9 * 0.08 + 0.1 * 1.0) / (0.045 * 0.1))
    copy = MonitorBudget(0.05)
    copy.load_state_dict(budget.state_dict())
    assert copy.every == budget.every
    for bad in (0.0, 1.5, -0.1, math.nan):
        with pytest.raises(ValueError, match="budget"):
            MonitorBudget(bad)


def test_the_bookkeeping_is_charged_to_the_budget_up_to_half_of_it():
    """Products get what the adapter's per-step work leaves of 90% of the budget, and always 40% of it."""
    budget = MonitorBudget(0.05)
    budget.record_step(0.1)
    budget.record_product(0.08)
    assert budget.overhead == 0.0 and budget.every == math.ceil(0.08 / (0.045 * 0.1))  # not measured: 90%
    budget.record_overhead(0.002)  # 2% of a step
    assert budget.overhead == pytest.approx(0.02) and budget.share == pytest.approx(0.025)
    assert budget.every == math.ceil(0.08 / (0.025 * 0.1))
    budget.overhead_time = 0.01  # 10% of a step, beyond the budget: products keep 40% of it
    assert budget.share == pytest.approx(0.02) and budget.every == math.ceil(0.08 / (0.02 * 0.1))
    copy = MonitorBudget(0.05)
    copy.load_state_dict(budget.state_dict())
    assert copy.share == budget.share


def test_lanczos_on_non_finite_products_returns_nan_instead_of_raising():
    from eos_core.spectral import lanczos

    result = lanczos(lambda v: v * np.nan, np.ones(5), 2, num_steps=3)
    assert np.all(np.isnan(result.eigenvalues))

