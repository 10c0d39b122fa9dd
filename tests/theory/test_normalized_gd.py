"""Arora, Li, Panigrahi's reference problem: normalised GD and GD on sqrt(L) on L = 1/2 (prod w - 1)^2."""

import math

import numpy as np
import pytest

from eos_core.theory import (
    product_gradient,
    product_hessian,
    product_limit_point,
    product_limit_sharpness,
    product_loss,
    product_sharpness,
    simulate_normalized_gd,
    simulate_sqrt_loss_gd,
    two_step_edge,
)

RNG_POINTS = np.random.default_rng(0).uniform(0.3, 2.0, size=(6, 3))


@pytest.fixture(scope="module")
def ngd():
    return simulate_normalized_gd()


@pytest.fixture(scope="module")
def sqrt_gd():
    return simulate_sqrt_loss_gd()


def _finite_difference(fn, w, h=1e-6):
    w = np.asarray(w, dtype=float)
    cols = [(np.asarray(fn(w + h * e)) - np.asarray(fn(w - h * e))) / (2 * h) for e in np.eye(w.size)]
    return np.stack(cols, axis=-1)


@pytest.mark.parametrize("dim", [2, 3, 4])
def test_gradient_and_hessian_match_finite_differences(dim):
    rng = np.random.default_rng(dim)
    for w in rng.uniform(-1.5, 1.5, size=(5, dim)):
        np.testing.assert_allclose(product_gradient(w), _finite_difference(product_loss, w), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(product_hessian(w), _finite_difference(product_gradient, w), rtol=1e-6, atol=1e-7)


def test_two_dimensional_hessian_is_the_textbook_formula():
    u, v = 1.7, -0.4
    expected = np.array([[v * v, 2 * u * v - 1], [2 * u * v - 1, u * u]])
    np.testing.assert_allclose(product_hessian([u, v]), expected, rtol=1e-15)
    assert product_sharpness([u, v]) == pytest.approx(np.linalg.eigvalsh(expected)[-1], rel=1e-14)


def test_batched_evaluation_equals_pointwise():
    np.testing.assert_allclose(product_hessian(RNG_POINTS), np.stack([product_hessian(w) for w in RNG_POINTS]))
    np.testing.assert_allclose(product_sharpness(RNG_POINTS), [product_sharpness(w) for w in RNG_POINTS])
    np.testing.assert_allclose(product_gradient(RNG_POINTS), np.stack([product_gradient(w) for w in RNG_POINTS]))


def test_gradient_is_exact_with_a_zero_coordinate():
    # the prefix/suffix products never divide by w_i
    np.testing.assert_allclose(product_gradient([0.0, 2.0, 3.0]), [-6.0, 0.0, 0.0])


def _gradient_flow_endpoint(w, t_end=12.0, dt=1e-2):
    """RK4 integration of dw/dt = -grad L (independent of the conservation-law formula); w may be batched."""
    w = np.array(w, dtype=float)
    for _ in range(int(t_end / dt)):
        k1 = -product_gradient(w)
        k2 = -product_gradient(w + 0.5 * dt * k1)
        k3 = -product_gradient(w + 0.5 * dt * k2)
        k4 = -product_gradient(w + dt * k3)
        w = w + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return w


def test_limit_point_is_where_gradient_flow_lands():
    for points in (np.array([[3.0, 0.1], [0.5, 0.8], [2.0, 1.5]]), np.array([[1.2, 0.3, 2.0], [-1.5, -0.2, 0.9]])):
        phi = product_limit_point(points)
        np.testing.assert_allclose(np.prod(phi, axis=-1), 1.0, rtol=1e-12)
        sq = points**2 - phi**2
        np.testing.assert_allclose(sq - sq[:, :1], 0.0, atol=1e-12)  # w_i^2 - w_j^2 conserved
        np.testing.assert_allclose(_gradient_flow_endpoint(points), phi, atol=1e-8)


def test_limit_sharpness_is_the_hessian_sharpness_at_the_limit_and_at_least_d():
    for w in [*RNG_POINTS, np.array([3.0, 0.1])]:
        phi = product_limit_point(w)
        assert product_limit_sharpness(w) == pytest.approx(product_sharpness(phi), rel=1e-10)
        assert product_limit_sharpness(w) >= w.size * (1 - 1e-12)
    u, v = 3.0, 0.1  # D = 2: sqrt((u^2 - v^2)^2 + 4)
    assert product_limit_sharpness([u, v]) == pytest.approx(math.sqrt((u * u - v * v) ** 2 + 4), rel=1e-12)
    assert product_limit_sharpness([1.0, 1.0, 1.0]) == pytest.approx(3.0)
    assert np.isnan(product_limit_sharpness([-1.0, 2.0]))  # the flow crosses an axis: not handled


def test_two_step_edge_is_two_exactly_on_a_period_two_orbit():
    # GD on lambda/2 z^2 with learning rates e1, e2: (1 - e1 lambda)(1 - e2 lambda) = 1  <=>  harmonic mean 2
    lam, e1 = 4.0, 0.375
    e2 = 1.0 / (lam * (1.0 - 1.0 / (e1 * lam)))
    z = 0.3
    z2 = (1 - e2 * lam) * ((1 - e1 * lam) * z)
    assert z2 == pytest.approx(z)
    np.testing.assert_allclose(two_step_edge([e1 * lam, e2 * lam, e1 * lam]), [2.0, 2.0])
    assert two_step_edge([2.0, 2.0])[0] == pytest.approx(2.0)


@pytest.mark.parametrize("which", ["ngd", "sqrt_gd"])
def test_steps_follow_the_update_rule_and_effective_lr(which, request):
    r = request.getfixturevalue(which)
    w = r.w
    grad = product_gradient(w[:-1])
    # w_{t+1} = w_t - eta_t grad L(w_t), with eta_t as documented
    np.testing.assert_allclose(w[1:], w[:-1] - r.effective_lr[:-1, None] * grad, rtol=1e-12, atol=1e-14)
    if which == "ngd":
        np.testing.assert_allclose(np.linalg.norm(np.diff(w, axis=0), axis=1), 0.05, rtol=1e-12)
        np.testing.assert_allclose(r.effective_lr, 0.05 / np.linalg.norm(product_gradient(w), axis=1))
    else:
        np.testing.assert_allclose(r.effective_lr, 0.05 / (2 * np.sqrt(product_loss(w))))
    np.testing.assert_allclose(r.loss, product_loss(w))
    np.testing.assert_allclose(r.sharpness, product_sharpness(w))
    np.testing.assert_allclose(r.lr_times_sharpness, r.effective_lr * r.sharpness)
    np.testing.assert_allclose(r.limit_sharpness, product_limit_sharpness(w))


@pytest.mark.parametrize(("which", "factor"), [("ngd", "ngd"), ("sqrt_gd", "sqrt")])
def test_balance_contracts_by_the_exact_factor(which, factor, request):
    """D = 2: u^2 - v^2 shrinks by (1 - eta^2/(u^2 + v^2)) per normalised step, (1 - eta^2/2) on sqrt(L)."""
    w = request.getfixturevalue(which).w
    u, v = w[:-1, 0], w[:-1, 1]
    shrink = 1 - 0.05**2 / (u * u + v * v) if factor == "ngd" else 1 - 0.05**2 / 2
    np.testing.assert_allclose(w[1:, 0] ** 2 - w[1:, 1] ** 2, (u * u - v * v) * shrink, rtol=1e-9, atol=1e-12)


def test_normalized_gd_enters_the_edge_and_drifts_to_the_flattest_minimiser(ngd):
    edge = two_step_edge(ngd.lr_times_sharpness)
    assert edge[0] < 1.5  # it starts off the edge ...
    assert np.all(np.abs(edge[10:] - 2.0) < 0.1)  # ... and is on it from step 10 to the end
    assert np.all(ngd.lr_times_sharpness[10:] > 1.0)  # every step overshoots the valley floor
    lim = ngd.limit_sharpness
    assert lim[0] > 9.0
    assert np.all(np.diff(lim) <= 1e-12)  # the sharpness of the minimiser below decreases ...
    assert lim[-1] == pytest.approx(2.0, rel=0.01)  # ... to the manifold's minimum
    assert ngd.sharpness[-1] == pytest.approx(2.0, rel=0.1)
    assert ngd.loss[10:].max() < 5e-3 < ngd.loss[0] / 40  # the loss stays O(eta^2)


def test_sqrt_loss_gd_enters_the_edge_and_drifts_to_the_flattest_minimiser(sqrt_gd):
    edge = two_step_edge(sqrt_gd.lr_times_sharpness)[10:]
    assert np.median(edge) == pytest.approx(2.0, abs=0.02)
    low, high = np.quantile(edge, [0.05, 0.95])
    assert 1.8 < low and high < 2.2
    lim = sqrt_gd.limit_sharpness
    assert lim[0] > 9.0
    assert np.all(np.diff(lim) <= 1e-12)
    assert lim[-1] == pytest.approx(2.0, rel=0.01)
    loss = sqrt_gd.loss[10:]
    assert loss.max() < 0.05 and np.quantile(loss, 0.95) < 0.02 < sqrt_gd.loss[0] / 10


def test_higher_dimensional_problem_also_drifts_towards_its_flattest_point():
    r = simulate_normalized_gd(w0=(3.0, 0.4, 0.9), steps=3000)
    assert np.all(np.abs(two_step_edge(r.lr_times_sharpness)[10:] - 2.0) < 0.1)
    lim = r.limit_sharpness
    assert np.all(np.diff(lim) <= 1e-9)
    assert lim[-1] < 0.6 * lim[0] and lim[-1] >= 3.0


def test_a_start_on_the_manifold_stays_put():
    r = simulate_normalized_gd(w0=(2.0, 0.5), steps=5)
    np.testing.assert_array_equal(r.w, np.tile([2.0, 0.5], (6, 1)))
    assert np.all(np.isinf(r.effective_lr))
    r = simulate_sqrt_loss_gd(w0=(2.0, 0.5), steps=5)
    np.testing.assert_array_equal(r.w, np.tile([2.0, 0.5], (6, 1)))


@pytest.mark.parametrize("simulate", [simulate_normalized_gd, simulate_sqrt_loss_gd])
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"eta": 0.0}, "eta"),
        ({"eta": float("inf")}, "eta"),
        ({"w0": (1.0,)}, "w0"),
        ({"w0": (1.0, float("nan"))}, "w0"),
        ({"w0": ((1.0, 2.0), (3.0, 4.0))}, "w0"),
        ({"w0": "ab"}, "w0"),
        ({"steps": 0}, "steps"),
    ],
)
def test_invalid_settings_raise_value_error_naming_the_setting(simulate, kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        simulate(**kwargs)
