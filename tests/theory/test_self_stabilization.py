"""Eq. 4-6 of the CDAT paper: the self-stabilisation model with a constant lr and with the fixed-y tuner."""

import math

import numpy as np
import pytest

from eos_core.theory import (
    eq4_step,
    fixed_y_lr,
    simulate_constant_lr,
    simulate_fixed_y,
    simulate_self_stabilization,
)


@pytest.fixture(scope="module")
def constant():
    return simulate_constant_lr()


@pytest.fixture(scope="module")
def fixed_y():
    return simulate_fixed_y()


def test_eq4_step_matches_a_hand_computation():
    # x' = (1 - 1 * 1.9) * 0.3 = -0.27;  lambda' = 1 * (0.03 - 0.3 * 0.3^2) + 1.9 = 1.903
    x, lam = eq4_step(0.3, 1.9, 1.0, a=3e-2, b=3e-1)
    assert x == pytest.approx(-0.27, rel=1e-15)
    assert lam == pytest.approx(1.903, rel=1e-15)


def test_constant_lr_first_steps_follow_eq4_by_hand(constant):
    a, b, eta = 3e-2, 3e-1, 1.0
    x, lam = 0.3, 1.9
    for t in range(4):
        assert constant.x[t] == pytest.approx(x, rel=1e-14)
        assert constant.sharpness[t] == pytest.approx(lam, rel=1e-14)
        assert constant.eta[t] == eta
        x, lam = (1 - eta * lam) * x, eta * (a - b * x**2) + lam  # lambda uses x_t, not x_{t+1}


def test_fixed_y_first_steps_follow_eq4_and_eq6_by_hand(fixed_y):
    x, lam = 0.3, 1.9  # lambda_0 = 2 (1 - eps) / eta_0 = 1.9 / 1
    for t in range(4):
        eta = 1.9 / lam
        assert fixed_y.eta[t] == pytest.approx(eta, rel=1e-14)
        assert fixed_y.x[t] == pytest.approx(x, rel=1e-14)
        assert fixed_y.sharpness[t] == pytest.approx(lam, rel=1e-14)
        x, lam = (1 - eta * lam) * x, eta * (1.0 - 0.5 * x**2) + lam


@pytest.mark.parametrize("which", ["constant", "fixed_y"])
def test_normalised_variables_agree_with_x_lambda_eta_and_follow_eq5(which, request):
    r = request.getfixturevalue(which)
    a, b = (3e-2, 3e-1) if which == "constant" else (1.0, 0.5)
    np.testing.assert_allclose(r.p, r.x**2, rtol=1e-15)
    np.testing.assert_allclose(r.y, r.eta * r.sharpness - 2.0, rtol=1e-15, atol=1e-15)
    # eq. 5: p_{t+1} = (1 + y_t)^2 p_t and
    # y_{t+1} = eta_{t+1} [eta_t (a - b p_t)] + (eta_{t+1}/eta_t) y_t + 2 (eta_{t+1}/eta_t - 1)
    p, y, eta = r.p, r.y, r.eta
    ratio = eta[1:] / eta[:-1]
    np.testing.assert_allclose(p[1:], (1 + y[:-1]) ** 2 * p[:-1], rtol=1e-12, atol=1e-300)
    y_next = eta[1:] * (eta[:-1] * (a - b * p[:-1])) + ratio * y[:-1] + 2 * (ratio - 1)
    np.testing.assert_allclose(y[1:], y_next, rtol=1e-9, atol=1e-12)


def test_constant_lr_sharpens_to_the_edge_then_oscillates_around_it(constant):
    """CDAT paper Fig. 4 (blue): lambda rises to 2/eta and stabilises there; y oscillates around 0."""
    edge = 2.0 / constant.eta[0]
    lam, y = constant.sharpness, constant.y
    steps = len(lam) - 1
    assert lam[0] < edge
    cross = int(np.argmax(lam >= edge))
    assert cross > 0 and np.all(np.diff(lam[: cross + 1]) > 0)  # progressive sharpening up to the edge
    assert abs(lam[int(0.8 * steps) :].mean() - edge) <= 0.1 * edge
    after = y[cross:]
    assert after.max() > 0.1 and after.min() < -0.1  # y swings to both sides of the edge ...
    assert np.count_nonzero(np.diff(np.sign(after)) != 0) >= 4  # ... several times
    assert abs(after.mean()) < 0.1  # ... around 0
    assert np.all(np.abs(lam - edge) < 0.5 * edge)  # and lambda stays near the edge for the whole run


def test_constant_lr_edge_fixed_point_is_a_slowly_repelling_focus():
    """The documented quasi-stability: eigenvalues 1 +- i eta sqrt(2a) of eq. 4's map in (p, lambda)."""
    for a, b, eta in ((3e-2, 3e-1, 1.0), (1e-2, 2e-1, 0.5)):

        def step(state, a=a, b=b, eta=eta):
            p, lam = state
            x, lam_next = eq4_step(math.sqrt(p), lam, eta, a=a, b=b)
            return np.array([x * x, lam_next])

        fixed = np.array([a / b, 2.0 / eta])
        np.testing.assert_allclose(step(fixed), fixed, rtol=1e-14)
        h = 1e-6
        jac = np.column_stack([(step(fixed + h * e) - step(fixed - h * e)) / (2 * h) for e in np.eye(2)])
        eig = np.linalg.eigvals(jac)
        omega = eta * math.sqrt(2 * a)
        np.testing.assert_allclose(sorted(eig.imag), [-omega, omega], rtol=1e-6)
        np.testing.assert_allclose(eig.real, [1.0, 1.0], rtol=1e-6)
        assert np.all(np.abs(eig) > 1.0)


def test_fixed_y_rule_keeps_y_below_the_edge_and_lets_sharpness_run_away(fixed_y):
    """CDAT paper Fig. 4 (orange): y = -0.1 throughout, lambda grows >= 10x, the learning rate decays."""
    lam, eta, p = fixed_y.sharpness, fixed_y.eta, fixed_y.p
    np.testing.assert_allclose(fixed_y.y, -0.1, atol=1e-12)
    assert eta[0] == pytest.approx(1.0)
    assert lam[-1] >= 10 * lam[0]
    assert np.all(np.diff(lam) > 0) and np.all(np.diff(eta) < 0)
    assert eta[-1] <= eta[0] / 10
    # p decays geometrically, (1 + y)^2 = 0.81 per step (Fig. 10): no feedback on the sharpness left
    np.testing.assert_allclose(p, p[0] * 0.81 ** np.arange(len(p)), rtol=1e-10)
    # lambda^2 grows by about 4 (1 - eps) a = 3.8 per step once p is negligible
    assert np.diff(lam[100:] ** 2) == pytest.approx(3.8, rel=0.01)


def test_fixed_y_lr_is_eq6():
    assert fixed_y_lr(19.0, eps=0.05) == pytest.approx(0.1)
    assert fixed_y_lr(2.0, eps=0.0) == pytest.approx(1.0)
    assert math.isnan(fixed_y_lr(0.0))


def test_custom_rule_receives_t_x_lambda_and_reproduces_the_constant_run(constant):
    seen = []

    def rule(t, x, lam):
        seen.append((t, x, lam))
        return 1.0

    r = simulate_self_stabilization(rule, steps=85, a=3e-2, b=3e-1, x0=0.3, lambda0=1.9)
    for field in ("eta", "sharpness", "x", "p", "y"):
        np.testing.assert_array_equal(getattr(r, field), getattr(constant, field))
    assert [s[0] for s in seen] == list(range(86))
    assert seen[1][1:] == (constant.x[1], constant.sharpness[1])


def test_trajectories_have_one_entry_per_state():
    r = simulate_constant_lr(steps=7)
    assert all(len(v) == 8 for v in r)
    assert r._fields == ("eta", "sharpness", "x", "p", "y")


def test_long_constant_lr_runs_diverge_to_non_finite_values_without_raising():
    r = simulate_constant_lr(steps=200)
    assert not np.all(np.isfinite(r.sharpness))
    assert np.all(np.isfinite(r.sharpness[:100]))


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: simulate_constant_lr(eta=0.0), "eta"),
        (lambda: simulate_constant_lr(eta=-1.0), "eta"),
        (lambda: simulate_constant_lr(steps=0), "steps"),
        (lambda: simulate_constant_lr(steps=2.5), "steps"),
        (lambda: simulate_constant_lr(b=-0.1), "b"),
        (lambda: simulate_constant_lr(a=float("nan")), "a"),
        (lambda: simulate_constant_lr(x0=float("inf")), "x0"),
        (lambda: simulate_constant_lr(lambda0="high"), "lambda0"),
        (lambda: simulate_fixed_y(eps=1.0), "eps"),
        (lambda: simulate_fixed_y(eps=-0.1), "eps"),
        (lambda: simulate_fixed_y(eta0=0.0), "eta0"),
        (lambda: simulate_self_stabilization(None, steps=3, a=0, b=0, x0=0, lambda0=1), "lr_rule"),
    ],
)
def test_invalid_settings_raise_value_error_naming_the_setting(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()
