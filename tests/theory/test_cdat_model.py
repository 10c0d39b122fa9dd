"""Eq. 9/10 of the CDAT paper: the model of the CDAT tuner on the edge of stability (Fig. 9, 11)."""

import math

import numpy as np
import pytest

from eos_core.theory import cdat_model_lr, simulate_cdat_model

A, B, NU = 5e-2, 1e-1, 0.1


@pytest.fixture(scope="module")
def runs():
    return {sigma: simulate_cdat_model(sigma=sigma) for sigma in (2.0, 1.9)}


def test_eq9_by_hand_and_its_limits():
    # sigma (lambda^2 p + nu^2 g) / (lambda^3 p + nu^3 g) at the paper's initial state
    expected = 2.0 * (18.0**2 * 4 + 0.1**2 * 4) / (18.0**3 * 4 + 0.1**3 * 4)
    assert cdat_model_lr(18.0, 4.0, 4.0, sigma=2.0, nu=0.1) == pytest.approx(expected, rel=1e-15)
    assert cdat_model_lr(18.0, 4.0, 0.0, sigma=2.0, nu=0.1) == pytest.approx(2.0 / 18.0)  # only the top one
    assert cdat_model_lr(18.0, 0.0, 4.0, sigma=2.0, nu=0.1) == pytest.approx(2.0 / 0.1)  # only the flat one
    assert math.isnan(cdat_model_lr(18.0, 0.0, 0.0))


@pytest.mark.parametrize("sigma", [2.0, 1.9])
def test_first_steps_follow_eq10_by_hand(sigma, runs):
    r = runs[sigma]
    eta, lam, p, g = 0.05, 18.0, 4.0, 4.0
    for t in range(5):
        assert r.eta[t] == pytest.approx(eta, rel=1e-12)
        assert r.sharpness[t] == pytest.approx(lam, rel=1e-12)
        assert r.p[t] == pytest.approx(p, rel=1e-12)
        assert r.g[t] == pytest.approx(g, rel=1e-12)
        y = eta * lam - 2
        eta, g, p, lam = (
            sigma * (lam**2 * p + NU**2 * g) / (lam**3 * p + NU**3 * g),  # eta_{t+1} from the state at t
            (1 - eta * NU) ** 2 * g,
            (1 + y) ** 2 * p,
            eta * (A - B * p) + lam,
        )


@pytest.mark.parametrize("sigma", [2.0, 1.9])
def test_trajectory_satisfies_eq10_and_eq5_at_every_step(sigma, runs):
    r = runs[sigma]
    eta, lam, p, g, y = r
    np.testing.assert_allclose(y, eta * lam - 2.0, rtol=0, atol=1e-15)
    eq9 = [cdat_model_lr(*state, sigma=sigma, nu=NU) for state in zip(lam[:-1], p[:-1], g[:-1], strict=True)]
    np.testing.assert_allclose(eta[1:], eq9, rtol=1e-10)
    np.testing.assert_allclose(lam[1:], eta[:-1] * (A - B * p[:-1]) + lam[:-1], rtol=1e-13)
    np.testing.assert_allclose(p[1:], (1 + y[:-1]) ** 2 * p[:-1], rtol=1e-9, atol=0)
    np.testing.assert_allclose(g[1:], (1 - eta[:-1] * NU) ** 2 * g[:-1], rtol=1e-9, atol=0)
    ratio = eta[1:] / eta[:-1]
    y_eq5 = eta[1:] * (eta[:-1] * (A - B * p[:-1])) + ratio * y[:-1] + 2 * (ratio - 1)
    np.testing.assert_allclose(y[1:], y_eq5, rtol=0, atol=1e-12)


def test_sigma_2_keeps_y_near_the_edge_and_sharpness_bounded(runs):
    """CDAT paper Fig. 9 / 11 (orange): y ~ 0, p stabilises at a/b and lambda levels off."""
    r = runs[2.0]
    lam, y, p = r.sharpness, r.y, r.p
    steps = len(y) - 1
    assert np.abs(y[steps // 2 :]).mean() < 0.05
    assert np.all(np.abs(y[10:]) < 0.01)  # from the first few steps on
    assert lam.max() < 2 * lam[0]
    growth_last_fifth = lam[-1] / lam[int(0.8 * steps)] - 1
    growth_first_fifth = lam[int(0.2 * steps)] / lam[0] - 1
    assert growth_last_fifth < 0.02 < growth_first_fifth  # levelling off
    assert np.all(np.diff(lam[steps // 2 :]) >= 0) and np.all(np.diff(np.diff(lam[steps // 2 :])) <= 1e-12)
    assert p[-1] == pytest.approx(A / B, rel=0.05)  # the value of p that stops the sharpening
    assert r.p[-1] / r.g[-1] > 1e50  # the top direction dominates eq. 9


def test_sigma_1_9_settles_y_just_below_the_edge_and_sharpness_keeps_growing(runs):
    """CDAT paper Fig. 9 / 11 (blue): -0.1 < y < 0, lambda grows slowly, p/g stays nearly constant."""
    r, r2 = runs[1.9], runs[2.0]
    lam, y, p, g = r.sharpness, r.y, r.p, r.g
    half = (len(y) - 1) // 2
    assert np.all((y[half:] > -0.1) & (y[half:] < 0))
    assert np.all(np.diff(lam[half:]) > 0)
    assert lam[-1] > 1.25 * lam[half]  # still sharpening in the second half ...
    assert np.diff(lam[-100:]).mean() < np.diff(lam[half : half + 100]).mean()  # ... slowly
    assert lam[-1] > r2.sharpness[-1] * 1.5
    assert p[-1] < 1e-40 * p[0]  # p decays ...
    ratio = p[half:] / g[half:]
    assert ratio.max() / ratio.min() < 3  # ... with an almost fixed ratio to g


def test_log_space_propagation_survives_underflow_of_both_projections():
    r = simulate_cdat_model(sigma=1.9, p0=1e-300, g0=1e-300, steps=5000)
    assert r.p[-1] == 0.0 and r.g[-1] == 0.0  # both underflowed ...
    assert np.all(np.isfinite(r.eta)) and np.all(np.isfinite(r.y))  # ... the learning rate did not
    assert np.all((r.y[2500:] > -0.1) & (r.y[2500:] < 0))


def test_only_the_orthogonal_or_only_the_top_direction():
    r = simulate_cdat_model(g0=0.0, steps=50)
    np.testing.assert_allclose(r.eta[1:], 2.0 / r.sharpness[:-1], rtol=1e-12)  # eq. 9 -> sigma / lambda
    r = simulate_cdat_model(p0=0.0, steps=50)
    np.testing.assert_allclose(r.eta[1:], 2.0 / NU, rtol=1e-12)  # eq. 9 -> sigma / nu
    assert np.all(r.p == 0.0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"nu": -0.1}, "nu"),
        ({"b": -1.0}, "b"),
        ({"a": float("inf")}, "a"),
        ({"lambda0": 0.0}, "lambda0"),
        ({"eta0": -0.05}, "eta0"),
        ({"p0": -1.0}, "p0"),
        ({"g0": -1.0}, "g0"),
        ({"p0": 0.0, "g0": 0.0}, "p0"),
        ({"steps": 0}, "steps"),
        ({"steps": 1.5}, "steps"),
    ],
)
def test_invalid_settings_raise_value_error_naming_the_setting(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        simulate_cdat_model(**kwargs)
