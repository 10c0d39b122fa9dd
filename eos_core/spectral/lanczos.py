"""Lanczos with full reorthogonalisation: top-k eigenpairs of a symmetric operator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from eos_core import _validation as check
from eos_core.spectral.power_iteration import normalized
from eos_core.spectral.vector_ops import NumpyOps, VectorOps


class Tridiagonal(NamedTuple):
    """The Lanczos tridiagonal matrix and its basis."""

    alpha: Any  #: diagonal, shape (m,)
    beta: Any  #: off-diagonal, shape (m,); beta[j] couples steps j and j+1 (beta[m-1] is the residual norm)
    basis: Any  #: the m Lanczos vectors (a VectorOps basis)


class LanczosResult(NamedTuple):
    """What [`lanczos`][eos_core.spectral.lanczos.lanczos] returns."""

    eigenvalues: Any  #: top-k Ritz values, descending, shape (k,)
    eigenvectors: list[Any]  #: the k Ritz vectors (unit norm), same order
    residuals: Any  #: Lanczos error estimates |beta_m s_{m,i}| of ||H y_i - theta_i y_i||, shape (k,)
    num_steps: int  #: Lanczos steps (operator applications) used


def default_num_steps(k: int, n: int) -> int:
    """Steps used when `num_steps` is not given: `max(2k + 40, 4k)`, at most the dimension `n`."""
    return min(n, max(2 * k + 40, 4 * k))


def lanczos_tridiagonal(
    matvec: Callable[[Any], Any], v0: Any, num_steps: int, *, ops: VectorOps, seed: int = 0
) -> Tridiagonal:
    r"""Run `num_steps` Lanczos steps from `v0` with full reorthogonalisation.

    Each new vector is orthogonalised twice against every previous one ("twice is enough",
    Parlett), which keeps the basis orthonormal to working precision, so no spurious copies of
    converged Ritz values appear. On breakdown (an invariant subspace, $\beta_j \approx 0$) the
    iteration continues from a random vector orthogonal to the basis and records $\beta_j = 0$,
    so the tridiagonal matrix splits into blocks whose eigenvalues are still eigenvalues of H.
    Fixed shapes throughout: the loop runs through `numerics.fori_loop` and traces under `jit`.

    Args:
        matvec: the operator $v \mapsto Hv$ (symmetric).
        v0: the start vector (normalised here; a random one when it is zero).
        num_steps: m, the Lanczos steps (operator applications).
        ops: the vector operations.
        seed: seed of the random vectors used on breakdown.

    Returns:
        The [`Tridiagonal`][eos_core.spectral.lanczos.Tridiagonal]: `alpha`, `beta` and the `m` basis vectors.
    """
    numerics = ops.numerics
    xp = numerics.xp
    tiny = float(xp.finfo(numerics.dtype).eps) * 64.0

    def orthogonalise(basis: Any, w: Any) -> Any:
        for _ in range(2):
            w = ops.axpy(-1.0, ops.basis_combine(basis, ops.basis_coeffs(basis, w)), w)
        return w

    def step(j: Any, carry: tuple[Any, ...]) -> tuple[Any, ...]:
        basis, alpha, beta, v, v_prev, beta_prev, scale = carry
        basis = ops.basis_set(basis, j, v)
        w = matvec(v)
        a = ops.dot(v, w)
        w = ops.axpy(-a, v, w)
        w = ops.axpy(-beta_prev, v_prev, w)
        w = orthogonalise(basis, w)
        b = ops.norm(w)
        scale = xp.maximum(scale, xp.maximum(xp.abs(a), b))
        breakdown = b <= tiny * scale
        restart = orthogonalise(basis, ops.random_like(v, seed + 1 + j))
        restart = ops.scale(1.0 / xp.where(ops.norm(restart) > 0, ops.norm(restart), 1.0), restart)
        v_next = ops.select(breakdown, restart, ops.scale(1.0 / xp.where(breakdown, 1.0, b), w))
        b = xp.where(breakdown, numerics.scalar(0.0), b)
        alpha = numerics.index_update(alpha, j, a)
        beta = numerics.index_update(beta, j, b)
        return basis, alpha, beta, v_next, v, b, scale

    v = normalized(ops, v0, seed)
    zeros = xp.zeros((num_steps,), dtype=numerics.dtype)
    init = (ops.basis_zeros(v, num_steps), zeros, zeros, v, ops.scale(0.0, v), numerics.scalar(0.0),
            numerics.scalar(0.0))
    basis, alpha, beta, *_ = numerics.fori_loop(0, num_steps, step, init)
    return Tridiagonal(alpha=alpha, beta=beta, basis=basis)


def tridiagonal_eigh(tri: Tridiagonal, xp: Any) -> tuple[Any, Any]:
    """Eigenvalues (ascending) and eigenvectors of the Lanczos tridiagonal matrix.

    A matrix with a non-finite entry (a NaN Hessian-vector product) gives NaN eigenvalues and vectors, as
    `jax.numpy.linalg.eigh` does, instead of numpy's LinAlgError: the law then falls back to its last rate.

    Args:
        tri: the tridiagonal matrix.
        xp: the array namespace.

    Returns:
        `(eigenvalues, eigenvectors)`, the eigenvectors as the columns of an (m, m) array.
    """
    m = tri.alpha.shape[0]
    off = tri.beta[: m - 1]
    matrix = xp.diag(tri.alpha) + xp.diag(off, 1) + xp.diag(off, -1)
    finite = xp.all(xp.isfinite(matrix))
    safe = xp.where(finite, matrix, xp.zeros_like(matrix))
    values, vectors = xp.linalg.eigh(safe)
    nan = xp.asarray(float("nan"), dtype=values.dtype)
    return xp.where(finite, values, nan), xp.where(finite, vectors, nan)


def lanczos(
    matvec: Callable[[Any], Any],
    v0: Any,
    k: int,
    *,
    num_steps: int | None = None,
    tol: float = 1e-8,
    ops: VectorOps | None = None,
    seed: int = 0,
) -> LanczosResult:
    r"""The `k` largest (algebraic) eigenvalues and Ritz vectors of a symmetric operator.

    Builds an `m = num_steps`-dimensional Krylov basis from `v0` (see
    [`lanczos_tridiagonal`][eos_core.spectral.lanczos.lanczos_tridiagonal]), diagonalises the tridiagonal matrix
    $T_m = V_m^\top H V_m = S \Theta S^\top$ and returns the top `k` Ritz pairs $(\theta_i, V_m s_i)$. The error
    estimate of each pair is $|\beta_m S_{m,i}|$, the norm of $H y_i - \theta_i y_i$, which bounds the distance of
    $\theta_i$ to the spectrum.

    **Steps.** With `num_steps` given, exactly that many steps run (fixed shapes: this is the form to use under
    `jax.jit` and for large models, where the basis of `num_steps` vectors is the memory cost). With `num_steps=None`
    and eager numerics, Lanczos starts with [`default_num_steps`][eos_core.spectral.lanczos.default_num_steps]
    (`max(2k + 40, 4k)`) and grows the number of steps by half (up to the dimension, which is exact) until every top-k
    residual is at most `tol` times the largest Ritz value's magnitude; under tracing it runs the default number of
    steps once.

    Args:
        matvec: the operator $v \mapsto Hv$ (symmetric).
        v0: the start vector (e.g. the previous top eigenvector, or [`random_start`][eos_core.spectral.random_start]).
        k: how many of the largest eigenvalues.
        num_steps: Lanczos steps (None: adaptive, see above).
        tol: the relative residual at which the adaptive form stops.
        ops: the vector operations (numpy by default).
        seed: seed of the random vectors used on breakdown.

    Returns:
        The [`LanczosResult`][eos_core.spectral.lanczos.LanczosResult]: the top-k Ritz values (descending), their
        vectors, residual estimates and the steps used.

    Raises:
        ValueError: `k` larger than the dimension, `num_steps < k`, or a negative `tol`.
    """
    k = check.positive_int("lanczos", "k", k)
    ops = ops if ops is not None else NumpyOps()
    xp = ops.numerics.xp
    n = ops.size(v0)
    if k > n:
        raise ValueError(f"lanczos: k ({k}) exceeds the dimension of the operator ({n})")
    tol = check.non_negative("lanczos", "tol", tol)
    adaptive = num_steps is None and ops.numerics.eager
    m = default_num_steps(k, n) if num_steps is None else check.positive_int("lanczos", "num_steps", num_steps)
    m = min(m, n)
    if m < k:
        raise ValueError(f"lanczos: num_steps ({m}) must be >= k ({k})")
    while True:
        tri = lanczos_tridiagonal(matvec, v0, m, ops=ops, seed=seed)
        theta, s = tridiagonal_eigh(tri, xp)
        order = xp.arange(m - 1, m - 1 - k, -1)
        residuals = xp.abs(tri.beta[m - 1] * s[m - 1, order])
        converged = bool(xp.all(residuals <= tol * xp.max(xp.abs(theta)))) if adaptive else True
        if converged or m == n:
            break
        m = min(m + m // 2, n)
    vectors = [ops.basis_combine(tri.basis, s[:, order[i]]) for i in range(k)]
    return LanczosResult(eigenvalues=theta[order], eigenvectors=vectors, residuals=residuals, num_steps=m)
