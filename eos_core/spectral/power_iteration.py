"""Power iteration with warm starts (CDAT paper appendix C.4)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from eos_core import _validation as check
from eos_core.spectral.vector_ops import NumpyOps, VectorOps


class PowerIterationResult(NamedTuple):
    """What [`power_iteration`][eos_core.spectral.power_iteration] returns."""

    eigenvalue: Any  #: Rayleigh quotient of the last iterate (signed)
    eigenvector: Any  #: unit vector to warm-start the next call with
    iterations: Any  #: operator applications used
    converged: Any  #: whether the relative change fell below `tol`


def normalized(ops: VectorOps, v: Any, seed: int = 0) -> Any:
    """`v / ||v||`; a random unit vector when `v` is zero."""
    xp = ops.numerics.xp
    norm = ops.norm(v)
    if ops.numerics.eager and norm > 0:  # concrete scalars: the random fallback is not needed
        return ops.scale(1.0 / norm, v)
    fallback = ops.random_like(v, seed)
    fallback = ops.scale(1.0 / ops.norm(fallback), fallback)
    return ops.select(norm > 0, ops.scale(1.0 / xp.where(norm > 0, norm, 1.0), v), fallback)


def _iterate(
    matvec: Callable[[Any], Any], v: Any, *, tol: float, max_iters: Any, ops: VectorOps
) -> PowerIterationResult:
    numerics = ops.numerics
    xp = numerics.xp

    def keep_going(carry: tuple[Any, Any, Any, Any]) -> Any:
        _, _, i, converged = carry
        return (i < max_iters) & ~converged

    def step(carry: tuple[Any, Any, Any, Any]) -> tuple[Any, Any, Any, Any]:
        v, previous, i, _ = carry
        w = matvec(v)
        eigenvalue = ops.dot(v, w)
        w_norm = ops.norm(w)
        v_next = ops.select(w_norm > 0, ops.scale(1.0 / xp.where(w_norm > 0, w_norm, 1.0), w), v)
        converged = (xp.abs(eigenvalue - previous) <= tol * xp.abs(eigenvalue)) | (w_norm == 0)
        return v_next, eigenvalue, i + 1, converged

    init = (v, numerics.scalar(math.nan), numerics.scalar(0.0), xp.asarray(False))
    v, eigenvalue, iterations, converged = numerics.while_loop(keep_going, step, init)
    return PowerIterationResult(eigenvalue, v, iterations, converged)


def power_iteration(
    matvec: Callable[[Any], Any],
    v0: Any,
    *,
    tol: float = 1e-3,
    max_iters: int = 100,
    which: str = "magnitude",
    ops: VectorOps | None = None,
) -> PowerIterationResult:
    r"""Top eigenpair of a symmetric operator by power iteration.

    Iterates $v \leftarrow Hv / \|Hv\|$ from `v0` and stops when the Rayleigh quotient
    $\lambda = v^\top H v$ changes by at most `tol` relative to $|\lambda|$ between two
    iterations (the CDAT paper stops at 1e-3, appendix C.4), or after `max_iters` operator
    applications. `tol = 0` runs exactly `max_iters` (AdaEoS's "1-2 warm-started steps").

    **Which eigenvalue.** Power iteration converges to the eigenvalue of largest *magnitude*; the
    returned value keeps its sign, so a negative result means the most negative eigenvalue
    dominates. `which="algebraic"` returns the largest *algebraic* eigenvalue instead: when the
    dominant one is negative (lambda_neg), it reruns on the shifted operator $H - \lambda_{neg} I$
    (positive semi-definite) and shifts back.

    **Accuracy.** `tol` bounds the change per iteration, not the error: with eigenvalue ratio
    $r = |\lambda_2 / \lambda_1|$ the error is about `tol / (1 - r^2)`. For clustered top eigenvalues use
    [`eos_core.spectral.lanczos`][].

    **Warm starts.** Pass the previous `eigenvector` as `v0`: when the operator changed little
    (one training step) the iteration converges in a few applications.

    Returns:
        [`PowerIterationResult`][eos_core.spectral.power_iteration.PowerIterationResult]
        `(eigenvalue, eigenvector, iterations, converged)`; with `which="algebraic"`, `iterations` counts both runs.

    Raises:
        ValueError: `tol < 0`, `max_iters < 1` or an unknown `which`.
    """
    tol = check.non_negative("power_iteration", "tol", tol)
    max_iters = check.positive_int("power_iteration", "max_iters", max_iters)
    if which not in ("magnitude", "algebraic"):
        raise ValueError(f"power_iteration: which must be 'magnitude' or 'algebraic', got {which!r}")
    ops = ops if ops is not None else NumpyOps()
    xp = ops.numerics.xp
    start = normalized(ops, v0)
    first = _iterate(matvec, start, tol=tol, max_iters=max_iters, ops=ops)
    if which == "magnitude":
        return first
    shift = xp.minimum(first.eigenvalue, 0.0)
    needs_shift = shift < 0

    def shifted(v: Any) -> Any:
        return ops.axpy(-shift, v, matvec(v))

    second = _iterate(shifted, start, tol=tol, max_iters=xp.where(needs_shift, max_iters, 0), ops=ops)
    return PowerIterationResult(
        eigenvalue=xp.where(needs_shift, second.eigenvalue + shift, first.eigenvalue),
        eigenvector=ops.select(needs_shift, second.eigenvector, first.eigenvector),
        iterations=first.iterations + second.iterations,
        converged=xp.where(needs_shift, second.converged, first.converged),
    )
