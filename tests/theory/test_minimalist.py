"""Liu, Zhang, Du, Zhao's minimalist example: progressive sharpening, edge of stability, self-stabilisation."""

import math

import numpy as np
import pytest

from eos_core.theory import (
    minimalist_covariance,
    minimalist_gradient,
    minimalist_hessian,
    minimalist_loss,
    minimalist_sharpness,
    simulate_minimalist_gd,
)

ETA = 1 / 20
EDGE = 2 / ETA  # 40
LAMBDA1, LAMBDA2 = 100.0, 0.01
SETTINGS = {"lambda1": LAMBDA1, "lambda2": LAMBDA2, "correlation": 0.3, "target_scale": 0.7}


@pytest.fixture(scope="module")
def run():
    return simulate_minimalist_gd()


def _finite_difference(fn, x, h=1e-6):
    cols = [(np.asarray(fn(x + h * e)) - np.asarray(fn(x - h * e))) / (2 * h) for e in np.eye(x.size)]
    return np.stack(cols, axis=-1)


def test_covariance_has_the_feature_variances_and_correlation():
    sigma = minimalist_covariance(lambda1=100.0, lambda2=0.01, correlation=0.1)
    np.testing.assert_allclose(sigma, [[100.0, 0.1], [0.1, 0.01]])
    assert minimalist_covariance(correlation=0.0)[0, 1] == 0.0


def test_loss_is_the_population_squared_error():
    v, w1, w2 = 0.7, -0.2, 0.5
    kappa = 0.3 * math.sqrt(LAMBDA1 * LAMBDA2)
    e1, e2 = v * w1, v * w2 - 0.7  # theta - theta*, theta* = (0, c)
    expected = 0.5 * (LAMBDA1 * e1**2 + 2 * kappa * e1 * e2 + LAMBDA2 * e2**2)
    assert minimalist_loss([v, w1, w2], **SETTINGS) == pytest.approx(expected, rel=1e-14)
    # Monte Carlo check of 1/2 E[(v w.x - c x_2)^2] with x ~ N(0, Sigma)
    sigma = minimalist_covariance(lambda1=LAMBDA1, lambda2=LAMBDA2, correlation=0.3)
    x = np.random.default_rng(0).multivariate_normal([0.0, 0.0], sigma, size=100_000)
    mc = 0.5 * np.mean((v * (x @ [w1, w2]) - 0.7 * x[:, 1]) ** 2)
    assert mc == pytest.approx(expected, rel=0.02)


def test_gradient_and_hessian_match_finite_differences():
    rng = np.random.default_rng(1)
    for params in rng.uniform(-1.0, 1.0, size=(6, 3)):
        grad = minimalist_gradient(params, **SETTINGS)
        np.testing.assert_allclose(
            grad, _finite_difference(lambda p: minimalist_loss(p, **SETTINGS), params), rtol=1e-6, atol=1e-8
        )
        np.testing.assert_allclose(
            minimalist_hessian(params, **SETTINGS),
            _finite_difference(lambda p: minimalist_gradient(p, **SETTINGS), params),
            rtol=1e-6,
            atol=1e-7,
        )
        hess = minimalist_hessian(params, **SETTINGS)
        assert minimalist_sharpness(params, **SETTINGS) == pytest.approx(np.linalg.eigvalsh(hess)[-1])


def test_sharpness_at_a_minimiser_is_about_lambda1_v_squared():
    v = math.sqrt(0.4)
    params = [v, 0.0, 0.4 / v]  # theta = (0, c): a global minimiser
    assert minimalist_loss(params) == pytest.approx(0.0, abs=1e-30)
    assert minimalist_sharpness(params) == pytest.approx(LAMBDA1 * v * v, rel=0.01)  # = 2/eta


def test_gd_steps_follow_the_gradient(run):
    params = np.column_stack([run.v, run.w])
    grad = minimalist_gradient(params[:-1])
    np.testing.assert_allclose(params[1:], params[:-1] - ETA * grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(run.theta, run.v[:, None] * run.w)
    np.testing.assert_allclose(run.loss, minimalist_loss(params))
    np.testing.assert_allclose(run.sharpness, minimalist_sharpness(params))
    assert run.w.shape == (len(run.v), 2)


def _log_loss_slope(loss, start, stop, window=500):
    starts = np.arange(start, stop - window + 1, window)
    medians = np.array([np.median(loss[i : i + window]) for i in starts])
    return np.polyfit(starts + window / 2, np.log(medians), 1)[0]


def test_three_phases_sharpening_edge_of_stability_then_convergence(run):
    sharp, loss = run.sharpness, run.loss
    steps = len(sharp) - 1
    # 1. progressive sharpening: from well below 2/eta, monotonically up to it
    assert sharp[0] < 0.8 * EDGE
    cross = int(np.argmax(sharp >= EDGE))
    assert 1000 < cross < 10_000
    assert np.all(np.diff(sharp[100 : cross + 1]) > 0)
    # 2. edge of stability: the sharpness oscillates around 2/eta, with bounded overshoots
    after = sharp[cross:]
    assert np.median(after) == pytest.approx(EDGE, rel=0.01)
    assert np.count_nonzero(np.diff(np.sign(after - EDGE)) != 0) >= 8
    assert after.max() < 1.1 * EDGE and after.min() > 0.9 * EDGE
    # the loss keeps decreasing at the paper's rate 2 log(1 - 2 lambda_2 / lambda_1) per step
    assert _log_loss_slope(loss, cross, 15_000) == pytest.approx(2 * math.log(1 - 2 * LAMBDA2 / LAMBDA1), rel=0.1)
    # 3. self-stabilisation and convergence: final sharpness <= (2 + delta)/eta with delta = 0.1
    assert sharp[int(0.95 * steps) :].max() <= (2 + 0.1) / ETA
    assert sharp[-1] == pytest.approx(EDGE, rel=0.01)
    assert loss[-1] < 1e-6 * loss[0]
    np.testing.assert_allclose(run.theta[-1], [0.0, 0.4], atol=1e-4)  # the minimiser theta* = (0, c)


def test_phases_do_not_hinge_on_the_exact_choices():
    for kwargs in ({"correlation": 0.05, "v0": 0.5}, {"correlation": 0.2, "target_scale": 0.35, "v0": 0.6}):
        r = simulate_minimalist_gd(**kwargs)
        cross = int(np.argmax(r.sharpness >= EDGE))
        assert r.sharpness[0] < EDGE and cross > 0
        assert np.median(r.sharpness[cross:]) == pytest.approx(EDGE, rel=0.01)
        assert r.sharpness[int(0.95 * (len(r.loss) - 1)) :].max() <= (2 + 0.1) / ETA


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"steps": 0}, "steps"),
        ({"lambda1": 0.0}, "lambda1"),
        ({"lambda2": -1.0}, "lambda2"),
        ({"correlation": 1.0}, "correlation"),
        ({"correlation": -1.5}, "correlation"),
        ({"target_scale": float("nan")}, "target_scale"),
        ({"v0": float("inf")}, "v0"),
        ({"w0": (1.0, 2.0, 3.0)}, "w0"),
        ({"w0": (1.0, float("nan"))}, "w0"),
        ({"w0": None}, "w0"),
    ],
)
def test_invalid_settings_raise_value_error_naming_the_setting(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        simulate_minimalist_gd(**kwargs)


def test_helpers_reject_bad_shapes():
    with pytest.raises(ValueError, match="params"):
        minimalist_loss([1.0, 2.0])
