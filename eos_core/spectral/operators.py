"""Operators built from a Hessian-vector product: preconditioned and shifted Hessians."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eos_core.spectral.vector_ops import NumpyOps, VectorOps


def preconditioned_operator(
    matvec: Callable[[Any], Any], precond: Any, *, ops: VectorOps | None = None
) -> Callable[[Any], Any]:
    r"""The operator $v \mapsto P^{-1/2} H P^{-1/2} v$ for a diagonal preconditioner P.

    For Adam and RMSProp, `precond` is the denominator of the update (`sqrt(v_hat) + eps`,
    times Adam's first-moment bias correction), whose top eigenvalue defines the adaptive edge of
    stability (Cohen et al. 2022; CDAT paper appendix B.1). It has the spectrum of
    $P^{-1} H$ and is symmetric, so power iteration and Lanczos apply unchanged.
    `precond` must be entrywise positive.

    Args:
        matvec: the operator $v \mapsto Hv$.
        precond: the diagonal of P, shaped like the vectors.
        ops: the vector operations (numpy by default).

    Returns:
        The operator $v \mapsto P^{-1/2} H P^{-1/2} v$.
    """
    ops = ops if ops is not None else NumpyOps()
    inv_sqrt = ops.rsqrt(precond)

    def apply(v: Any) -> Any:
        return ops.multiply(inv_sqrt, matvec(ops.multiply(inv_sqrt, v)))

    return apply


def shifted_operator(matvec: Callable[[Any], Any], shift: Any, *, ops: VectorOps | None = None) -> Callable[[Any], Any]:
    r"""The operator $v \mapsto H v + \text{shift}\, v$."""
    ops = ops if ops is not None else NumpyOps()

    def apply(v: Any) -> Any:
        return ops.axpy(shift, v, matvec(v))

    return apply
