r"""Hessian spectra of a JAX loss through the core's estimators (power iteration, Lanczos) on pytrees.

The operator is :math:`v \mapsto H v` (:func:`eos_core.adapters.jax.oracles.hvp`) or the
preconditioned :math:`v \mapsto P^{-1/2} H P^{-1/2} v` (:func:`eos_core.spectral.preconditioned_operator`);
the vector type is a pytree (:class:`~eos_core.adapters.jax.tree_ops.TreeOps`) and the control flow is
``lax`` (:func:`~eos_core.adapters.jax.numerics.jax_numerics`), so both estimators trace under
``jax.jit`` with fixed shapes: power iteration is a ``while_loop`` bounded by ``max_iters`` and
stopped at relative change ``tol`` (CDAT paper appendix C.4: 1e-3), Lanczos a ``fori_loop`` of
``num_steps`` steps with full reorthogonalisation.
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
    r"""``(matvec, route_used)``: :math:`v \mapsto Hv`, or :math:`P^{-1/2} H P^{-1/2} v` when ``precond`` (P) is given.

    The route is resolved once, at trace time (see :func:`~eos_core.adapters.jax.oracles.resolve_hvp_route`);
    ``fd_eps`` sizes the finite-difference step of the ``fd-*`` routes (see
    :func:`~eos_core.adapters.jax.oracles.curvature`).
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
    r"""Warm-started power iteration (:func:`eos_core.spectral.power_iteration`) on a pytree operator.

    Returns the Rayleigh quotient :math:`v^\top H v` of the eigenvalue of largest magnitude (signed)
    and the unit eigenvector to warm-start the next call with. ``tol = 0`` runs exactly ``max_iters``.
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
    """The ``k`` largest eigenvalues (descending) by Lanczos with full reorthogonalisation.

    ``num_steps`` defaults to :func:`eos_core.spectral.default_num_steps` (``max(2k + 40, 4k)``, at
    most the dimension); the Krylov basis holds that many parameter-sized vectors.
    """
    ops = ops if ops is not None else TreeOps()
    steps = default_num_steps(k, ops.size(v0)) if num_steps is None else min(int(num_steps), ops.size(v0))
    return lanczos(matvec, v0, k, num_steps=steps, ops=ops)


__all__ = ["hessian_operator", "top_eigenvalue", "top_eigenvalues"]
