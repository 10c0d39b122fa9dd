"""Spectral estimators against numpy.linalg.eigh / scipy on explicit matrices."""

import numpy as np
import pytest
import scipy.linalg

from eos_core.numerics import NUMPY
from eos_core.spectral import (
    NumpyOps,
    hutchinson_trace,
    lanczos,
    power_iteration,
    preconditioned_operator,
    shifted_operator,
    spectral_density,
)


def symmetric(rng, n, kind):
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    if kind == "wigner":
        m = rng.standard_normal((n, n))
        return (m + m.T) / 2
    if kind == "indefinite":
        ev = rng.uniform(-5.0, 3.0, n)
    elif kind == "clustered":
        ev = rng.uniform(0.0, 1.0, n)
        ev[-4:] = 10.0 * (1 - np.array([0.0, 1e-4, 2e-4, 3e-4]))
    elif kind == "negative_dominant":
        ev = rng.uniform(-1.0, 1.0, n)
        ev[:2] = [-20.0, -15.0]
        ev[-1] = 4.0
    elif kind == "gapped":
        ev = rng.uniform(0.0, 1.0, n)
        ev[-1], ev[-2] = 10.0, 7.0
    else:
        raise ValueError(kind)
    return (q * ev) @ q.T


@pytest.mark.parametrize("n", [50, 120, 300])
@pytest.mark.parametrize("kind", ["wigner", "indefinite", "clustered"])
def test_lanczos_top_k_against_eigh(n, kind):
    rng = np.random.default_rng(n + len(kind))
    h = symmetric(rng, n, kind)
    k = 5
    true = np.linalg.eigh(h)[0][::-1][:k]
    result = lanczos(lambda v: h @ v, rng.standard_normal(n), k)  # adaptive number of steps
    np.testing.assert_allclose(result.eigenvalues, true, rtol=1e-6)
    assert result.num_steps <= n
    if n == 300:  # far fewer steps than the dimension once the spectrum is large
        assert result.num_steps <= 0.6 * n
    vectors = np.stack(result.eigenvectors)
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(k), atol=1e-8)
    for theta, y, res in zip(result.eigenvalues, vectors, result.residuals, strict=True):
        residual = np.linalg.norm(h @ y - theta * y)
        assert residual <= 1e-6 * abs(true[0])
        assert residual == pytest.approx(res, abs=1e-8 * abs(true[0]))


@pytest.mark.parametrize("kind", ["wigner", "indefinite", "clustered"])
def test_lanczos_fixed_steps_half_the_dimension(kind):
    rng = np.random.default_rng(7)
    n = 300
    h = symmetric(rng, n, kind)
    true = np.linalg.eigh(h)[0][::-1][:3]
    result = lanczos(lambda v: h @ v, rng.standard_normal(n), 3, num_steps=150)
    assert result.num_steps == 150
    np.testing.assert_allclose(result.eigenvalues, true, rtol=1e-6)


def test_lanczos_breakdown_on_low_rank_operator():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 3))
    h = x @ x.T  # rank 3: the Krylov space is exhausted after 3-4 steps
    result = lanczos(lambda v: h @ v, rng.standard_normal(60), 4, num_steps=20)
    true = np.linalg.eigh(h)[0][::-1][:4]
    np.testing.assert_allclose(result.eigenvalues, true, rtol=1e-8, atol=1e-8)


def test_lanczos_rejects_bad_arguments():
    h = np.eye(4)
    with pytest.raises(ValueError, match="k"):
        lanczos(lambda v: h @ v, np.ones(4), 5)
    with pytest.raises(ValueError, match="num_steps"):
        lanczos(lambda v: h @ v, np.ones(4), 3, num_steps=2)


@pytest.mark.parametrize("n", [50, 200])
def test_power_iteration_reaches_its_tolerance_on_gapped_matrices(n):
    rng = np.random.default_rng(n)
    h = symmetric(rng, n, "gapped")  # lambda_2 / lambda_1 = 0.7
    tol = 1e-3
    result = power_iteration(lambda v: h @ v, rng.standard_normal(n), tol=tol, max_iters=500)
    assert bool(result.converged)
    ratio = 0.7
    assert abs(result.eigenvalue - 10.0) <= tol / (1 - ratio**2) * 10.0
    assert abs(result.eigenvalue - 10.0) <= tol * 10.0 * 1.0  # and, here, within tol itself
    assert np.linalg.norm(result.eigenvector) == pytest.approx(1.0)


def test_power_iteration_magnitude_vs_algebraic():
    rng = np.random.default_rng(3)
    h = symmetric(rng, 80, "negative_dominant")
    magnitude = power_iteration(lambda v: h @ v, rng.standard_normal(80), tol=1e-10, max_iters=2000)
    assert float(magnitude.eigenvalue) == pytest.approx(-20.0, rel=1e-6)  # the sign is reported honestly
    algebraic = power_iteration(lambda v: h @ v, rng.standard_normal(80), tol=1e-10, max_iters=2000,
                                which="algebraic")
    assert float(algebraic.eigenvalue) == pytest.approx(4.0, rel=1e-6)
    positive = symmetric(rng, 80, "gapped")
    same = power_iteration(lambda v: positive @ v, np.ones(80), which="algebraic", tol=1e-10, max_iters=2000)
    assert float(same.eigenvalue) == pytest.approx(10.0, rel=1e-8)


def test_warm_start_needs_a_third_of_the_cold_iterations():
    rng = np.random.default_rng(11)
    n = 150
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = rng.uniform(0.0, 1.0, n)
    ev[-1], ev[-2] = 10.0, 8.5
    h = (q * ev) @ q.T
    cold = power_iteration(lambda v: h @ v, rng.standard_normal(n), tol=1e-3, max_iters=500)
    e = rng.standard_normal((n, n))
    perturbed = h + 1e-3 * np.linalg.norm(h, 2) * (e + e.T) / np.linalg.norm(e + e.T, 2)
    cold_again = power_iteration(lambda v: perturbed @ v, rng.standard_normal(n), tol=1e-3, max_iters=500)
    warm = power_iteration(lambda v: perturbed @ v, cold.eigenvector, tol=1e-3, max_iters=500)
    assert int(warm.iterations) * 3 <= int(cold_again.iterations)
    assert float(warm.eigenvalue) == pytest.approx(np.linalg.eigvalsh(perturbed)[-1], rel=2e-3)


def test_zero_operator_and_zero_start():
    result = power_iteration(lambda v: 0.0 * v, np.zeros(5))
    assert float(result.eigenvalue) == 0.0 and bool(result.converged)


def test_preconditioned_operator_spectrum():
    rng = np.random.default_rng(5)
    n = 60
    h = symmetric(rng, n, "indefinite")
    p = rng.uniform(0.1, 3.0, n)
    op = preconditioned_operator(lambda v: h @ v, p)
    explicit = np.diag(p**-0.5) @ h @ np.diag(p**-0.5)
    top = np.linalg.eigh(explicit)[0][::-1][:4]
    np.testing.assert_allclose(lanczos(op, rng.standard_normal(n), 4).eigenvalues, top, rtol=1e-8)
    # same spectrum as P^{-1} H (non-symmetric), the operator Cohen et al. define the adaptive edge with
    nonsym = np.sort(scipy.linalg.eigvals(np.diag(1 / p) @ h).real)[::-1][:4]
    np.testing.assert_allclose(top, nonsym, rtol=1e-8)
    pi = power_iteration(op, rng.standard_normal(n), tol=1e-12, max_iters=5000, which="algebraic")
    assert float(pi.eigenvalue) == pytest.approx(top[0], rel=1e-6)


def test_shifted_operator():
    h = np.diag([1.0, 2.0, 3.0])
    op = shifted_operator(lambda v: h @ v, 10.0)
    np.testing.assert_allclose(op(np.ones(3)), [11.0, 12.0, 13.0])


def test_hutchinson_is_exact_on_diagonal_matrices_and_unbiased():
    d = np.arange(1.0, 11.0)
    assert float(hutchinson_trace(lambda v: d * v, np.zeros(10), num_samples=3)) == pytest.approx(d.sum())
    rng = np.random.default_rng(0)
    h = symmetric(rng, 40, "indefinite")
    estimate = float(hutchinson_trace(lambda v: h @ v, np.zeros(40), num_samples=4000))
    assert estimate == pytest.approx(np.trace(h), abs=5 * np.sqrt(2 * np.sum(h**2) / 4000))


def test_spectral_density_quadrature():
    rng = np.random.default_rng(2)
    n = 40
    h = symmetric(rng, n, "indefinite")
    density = spectral_density(lambda v: h @ v, np.zeros(n), num_probes=3, num_steps=n)
    np.testing.assert_allclose(density.weights.sum(axis=1), 1.0, rtol=1e-10)
    # with as many steps as the dimension the nodes are the eigenvalues
    np.testing.assert_allclose(np.sort(density.nodes[0]), np.linalg.eigvalsh(h), atol=1e-8)
    # first moment: E[z^T H z]/n estimates tr(H)/n
    assert np.mean(density.nodes * density.weights * n, axis=0).sum() == pytest.approx(np.trace(h), rel=0.5)
    grid = np.linspace(-8, 6, 400)
    curve = density.on_grid(grid, bandwidth=0.3)
    assert np.trapezoid(curve, grid) == pytest.approx(1.0, rel=1e-2)


def test_float32_numerics():
    float32 = NUMPY._replace(dtype=np.float32)
    ops = NumpyOps(float32)
    rng = np.random.default_rng(0)
    h = symmetric(rng, 30, "gapped").astype(np.float32)
    result = lanczos(lambda v: h @ v, rng.standard_normal(30).astype(np.float32), 2, ops=ops, num_steps=30)
    assert result.eigenvalues.dtype == np.float32
    np.testing.assert_allclose(result.eigenvalues, [10.0, 7.0], rtol=1e-5)
