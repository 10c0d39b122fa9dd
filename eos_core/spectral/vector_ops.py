"""The vector operations spectral estimators are written against, and their numpy implementation.

Estimators never see a model: they see a linear operator `v -> H v` (curvlinops-style) and a
[`VectorOps`][eos_core.spectral.vector_ops.VectorOps] for the vector type at hand. `NumpyOps` serves 1-D numpy arrays;
the adapters provide the same protocol for torch parameter lists and JAX pytrees, so one implementation of power
iteration and Lanczos serves all three.

A *basis* is a fixed-size block of `m` vectors (for Lanczos reorthogonalisation) that an
implementation stores however suits it (a 2-D array here, stacked tensors in the adapters).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from eos_core.numerics import NUMPY, Numerics


class VectorOps(Protocol):
    """Vector arithmetic for one vector type. Scalars are `numerics.xp` 0-d arrays."""

    numerics: Numerics

    def dot(self, x: Any, y: Any) -> Any:
        """The inner product `<x, y>` over all entries (a scalar)."""

    def norm(self, x: Any) -> Any:
        """The Euclidean norm `||x||` over all entries (a scalar)."""

    def axpy(self, alpha: Any, x: Any, y: Any) -> Any:
        """`alpha * x + y`."""

    def scale(self, alpha: Any, x: Any) -> Any:
        """`alpha * x`."""

    def multiply(self, x: Any, y: Any) -> Any:
        """Elementwise product."""

    def rsqrt(self, x: Any) -> Any:
        """Elementwise `x ** -0.5`."""

    def random_like(self, x: Any, seed: Any, *, rademacher: bool = False) -> Any:
        """Standard normal (or +-1) vector shaped like `x`, a deterministic function of `seed`."""

    def select(self, pred: Any, x: Any, y: Any) -> Any:
        """`x` if the scalar `pred` holds, else `y`."""

    def size(self, x: Any) -> int:
        """Number of scalar entries (a Python int)."""

    def basis_zeros(self, x: Any, m: int) -> Any:
        """A basis of `m` zero vectors shaped like `x`."""

    def basis_set(self, basis: Any, j: Any, x: Any) -> Any:
        """The basis with its vector `j` replaced by `x` (a new basis; `j` may be traced)."""

    def basis_vector(self, basis: Any, j: Any) -> Any:
        """Vector `j` of the basis (a view where the type has one: do not modify it; `j` may be traced)."""

    def basis_coeffs(self, basis: Any, x: Any) -> Any:
        """The `(m,)` array of inner products `<b_i, x>`."""

    def basis_combine(self, basis: Any, coeffs: Any) -> Any:
        """`sum_i coeffs[i] * b_i`."""


class NumpyOps:
    """[`VectorOps`][eos_core.spectral.vector_ops.VectorOps] for 1-D float numpy arrays (float64 by default)."""

    def __init__(self, numerics: Numerics = NUMPY) -> None:
        self.numerics = numerics

    def _vec(self, x: Any) -> np.ndarray:
        return np.asarray(x, dtype=self.numerics.dtype).reshape(-1)

    def dot(self, x: Any, y: Any) -> Any:
        """The inner product of the flattened arrays."""
        return np.dot(self._vec(x), self._vec(y))

    def norm(self, x: Any) -> Any:
        """The Euclidean norm of the flattened array."""
        return np.linalg.norm(self._vec(x))

    def axpy(self, alpha: Any, x: Any, y: Any) -> Any:
        """`alpha * x + y`."""
        return alpha * self._vec(x) + self._vec(y)

    def scale(self, alpha: Any, x: Any) -> Any:
        """`alpha * x`."""
        return alpha * self._vec(x)

    def multiply(self, x: Any, y: Any) -> Any:
        """Elementwise product."""
        return self._vec(x) * self._vec(y)

    def rsqrt(self, x: Any) -> Any:
        """Elementwise `x ** -0.5`."""
        return 1.0 / np.sqrt(self._vec(x))

    def random_like(self, x: Any, seed: Any, *, rademacher: bool = False) -> Any:
        """Standard normal (or +-1) vector shaped like `x`, from `numpy.random.default_rng(seed)`."""
        rng = np.random.default_rng(int(seed))
        shape = self._vec(x).shape
        if rademacher:
            return rng.choice(np.array([-1.0, 1.0], dtype=self.numerics.dtype), size=shape)
        return rng.standard_normal(shape).astype(self.numerics.dtype)

    def select(self, pred: Any, x: Any, y: Any) -> Any:
        """`x` if `pred` holds, else `y`."""
        chosen = x if bool(pred) else y  # a vector or a basis: keep its shape
        return np.asarray(chosen, dtype=self.numerics.dtype)

    def size(self, x: Any) -> int:
        """Number of entries."""
        return int(self._vec(x).size)

    def basis_zeros(self, x: Any, m: int) -> Any:
        """A `(m, size)` array of zeros."""
        return np.zeros((int(m), self.size(x)), dtype=self.numerics.dtype)

    def basis_set(self, basis: Any, j: Any, x: Any) -> Any:
        """A copy of `basis` with row `j` set to `x`."""
        out = np.array(basis, copy=True)
        out[int(j)] = self._vec(x)
        return out

    def basis_vector(self, basis: Any, j: Any) -> Any:
        """Row `j` of `basis` (a view)."""
        return basis[int(j)]

    def basis_coeffs(self, basis: Any, x: Any) -> Any:
        """`basis @ x`: the inner products with every basis vector."""
        return basis @ self._vec(x)

    def basis_combine(self, basis: Any, coeffs: Any) -> Any:
        """`coeffs @ basis`: the combination of the basis vectors."""
        return np.asarray(coeffs, dtype=self.numerics.dtype) @ basis
