r"""Hessian spectra of a JAX loss through the core's estimators (power iteration, Lanczos) on pytrees.

The operator is $v \mapsto H v$ ([`hvp`][eos_core.adapters.jax.hvp]) or the
preconditioned $v \mapsto P^{-1/2} H P^{-1/2} v$ ([`eos_core.spectral.preconditioned_operator`][]);
the vector type is a pytree ([`TreeOps`][eos_core.adapters.jax.TreeOps]) and the control flow is
`lax` ([`jax_numerics`][eos_core.adapters.jax.jax_numerics]), so both estimators trace under
`jax.jit` with fixed shapes: power iteration is a `while_loop` bounded by `max_iters` and
stopped at relative change `tol` (CDAT paper, Roulet et al. 2024, appendix C.4: 1e-3), Lanczos a `fori_loop` of
`num_steps` steps with full reorthogonalisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eos_core import routes
from eos_core.adapters.jax.oracles import ValueFn, hvp, resolve_hvp_route
from eos_core.adapters.jax.tree_ops import TreeOps
from eos_core.spectral import (
    LanczosResult,
    PowerIterationResult,
    default_num_steps,
    lanczos,
    power_iteration,
    preconditioned_operator,
)

PyTree = Any


def hessian_operator(
    value_fn: ValueFn,
    params: PyTree,
    *,
    route: str = routes.AUTO,
    grads: PyTree | None = None,
    precond: PyTree | None = None,
    ops: TreeOps | None = None,
    fd_eps: float | None = None,
) -> tuple[Callable[[PyTree], PyTree], str]:
    r"""The Hessian of `value_fn` at `params` as an operator on pytrees, optionally preconditioned.

    The route is resolved once, at trace time (see [`resolve_hvp_route`][eos_core.adapters.jax.resolve_hvp_route]);
    each application is one [`hvp`][eos_core.adapters.jax.hvp] by that route.

    Args:
        value_fn: the loss on the batch as a function of the parameters.
        params: the point $w$ where the Hessian is taken.
        route: a route of [`eos_core.routes`][]; `auto` and `jvp-jvp` resolve to the first of
            [`HVP_AUTO_CHAIN`][eos_core.adapters.jax.HVP_AUTO_CHAIN] that traces.
        grads: the gradient at $w$, reused by `fd-onesided` (computed at each product when not given).
        precond: $P$, a pytree like `params` with positive entries (an adaptive optimizer's diagonal
            preconditioner); None: the plain Hessian.
        ops: the vector operations of the preconditioned operator (default: `TreeOps()`).
        fd_eps: machine epsilon the finite-difference step of the `fd-*` routes is sized for (see
            [`curvature`][eos_core.adapters.jax.curvature]; None: the lowest-precision leaf's).

    Returns:
        `(matvec, route_used)`: `matvec` maps a pytree $v$ like `params` to $H v$, or to
        $P^{-1/2} H P^{-1/2} v$ when `precond` is given ([`eos_core.spectral.preconditioned_operator`][]).

    Raises:
        ValueError: `route` is not a route name.
    """
    used = resolve_hvp_route(value_fn, params, route)

    def matvec(v: PyTree) -> PyTree:
        return hvp(value_fn, params, v, route=used, grads=grads, fd_eps=fd_eps)[0].product

    if precond is None:
        return matvec, used
    return preconditioned_operator(matvec, precond, ops=ops if ops is not None else TreeOps()), used


def top_eigenvalue(
    matvec: Callable[[PyTree], PyTree],
    v0: PyTree,
    *,
    tol: float = 1e-3,
    max_iters: int = 20,
    ops: TreeOps | None = None,
) -> PowerIterationResult:
    r"""The eigenvalue of largest magnitude of a pytree operator, by warm-started power iteration.

    The core's [`power_iteration`][eos_core.spectral.power_iteration.power_iteration] on pytrees: it stops when the
    Rayleigh quotient changes by at most `tol` relative to its magnitude between two iterations (the CDAT paper,
    Roulet et al. 2024, appendix C.4, uses 1e-3), or after `max_iters` products; traced, the loop is a
    `lax.while_loop`.

    Args:
        matvec: the operator, e.g. from [`hessian_operator`][eos_core.adapters.jax.hessian_operator].
        v0: the start vector (a pytree like the parameters): the previous call's eigenvector to warm-start, or
            [`eos_core.spectral.random_start`][] on the first call.
        tol: relative change of the eigenvalue between two iterations that stops the loop; 0 runs exactly
            `max_iters`.
        max_iters: most operator applications.
        ops: the vector operations (default: `TreeOps()`).

    Returns:
        A [`PowerIterationResult`][eos_core.spectral.power_iteration.PowerIterationResult]: `eigenvalue`, the
        Rayleigh quotient $v^\top H v$ of the last iterate (signed: the eigenvalue of largest magnitude),
        `eigenvector` (unit norm, to warm-start the next call), `iterations` and `converged`.

    Raises:
        ValueError: `tol < 0` or `max_iters < 1`.

    Examples:
        On $f(w) = \frac12 \sum_i a_i w_i^2$, whose Hessian is $\mathrm{diag}(a)$:

        >>> import jax.numpy as jnp
        >>> from eos_core.adapters.jax import hessian_operator, top_eigenvalue
        >>> def f(w):
        ...     return 0.5 * jnp.sum(jnp.array([1.0, 4.0, 9.0]) * w ** 2)
        >>> matvec, route = hessian_operator(f, jnp.zeros(3))
        >>> result = top_eigenvalue(matvec, jnp.ones(3), tol=0.0, max_iters=100)
        >>> round(float(result.eigenvalue), 4)
        9.0
    """
    return power_iteration(matvec, v0, tol=tol, max_iters=max_iters, ops=ops if ops is not None else TreeOps())


def top_eigenvalues(
    matvec: Callable[[PyTree], PyTree],
    v0: PyTree,
    k: int,
    *,
    num_steps: int | None = None,
    ops: TreeOps | None = None,
) -> LanczosResult:
    r"""The `k` largest eigenvalues (descending) of a pytree operator, by Lanczos with full reorthogonalisation.

    The core's [`lanczos`][eos_core.spectral.lanczos.lanczos] on pytrees, a `lax.fori_loop` of `num_steps` steps
    under `jit`. The Krylov basis holds `num_steps` parameter-sized vectors.

    Args:
        matvec: the operator, e.g. from [`hessian_operator`][eos_core.adapters.jax.hessian_operator].
        v0: the start vector (a pytree like the parameters).
        k: how many eigenvalues, at most the dimension.
        num_steps: Lanczos steps (operator applications); None:
            [`default_num_steps`][eos_core.spectral.lanczos.default_num_steps], $\max(2k + 40, 4k)$; at most the
            dimension either way.
        ops: the vector operations (default: `TreeOps()`).

    Returns:
        A [`LanczosResult`][eos_core.spectral.lanczos.LanczosResult]: `eigenvalues` (the top-`k` Ritz values,
        descending, shape `(k,)`), `eigenvectors` (the `k` Ritz vectors, unit norm), `residuals` (error estimates
        of $\|H y_i - \theta_i y_i\|$) and `num_steps`.

    Raises:
        ValueError: `k < 1`, `k` above the dimension, or fewer Lanczos steps than `k`.
    """
    ops = ops if ops is not None else TreeOps()
    steps = default_num_steps(k, ops.size(v0)) if num_steps is None else min(int(num_steps), ops.size(v0))
    return lanczos(matvec, v0, k, num_steps=steps, ops=ops)


__all__ = ["hessian_operator", "top_eigenvalue", "top_eigenvalues"]
