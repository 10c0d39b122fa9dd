"""The vector operations spectral estimators are written against, and their numpy implementation.

Estimators never see a model: they see a linear operator ``v -> H v`` (curvlinops-style) and a
:class:`VectorOps` for the vector type at hand. ``NumpyOps`` serves 1-D numpy arrays; the adapters
provide the same protocol for torch parameter lists and JAX pytrees, so one implementation of power
iteration and Lanczos serves all three.

A *basis* is a fixed-size block of ``m`` vectors (for Lanczos reorthogonalisation) that an
implementation stores however suits it (a 2-D array here, stacked tensors in the adapters).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from eos_core.numerics import NUMPY, Numerics


class VectorOps(Protocol):
    """Vector arithmetic for one vector type. Scalars are ``numerics.xp`` 0-d arrays."""

    numerics: Numerics

    def dot(self, x: Any, y: Any) -> Any: ...
    def norm(self, x: Any) -> Any: ...
    def axpy(self, alpha: Any, x: Any, y: Any) -> Any:
        """``alpha * x + y``."""
    def scale(self, alpha: Any, x: Any) -> Any: ...
    def multiply(self, x: Any, y: Any) -> Any:
        """Elementwise product."""
    def rsqrt(self, x: Any) -> Any:
        """Elementwise ``x ** -0.5``."""
    def random_like(self, x: Any, seed: Any, *, rademacher: bool = False) -> Any:
        """Standard normal (or +-1) vector shaped like ``x``, a deterministic function of ``seed``."""
    def select(self, pred: Any, x: Any, y: Any) -> Any:
        """``x`` if the scalar ``pred`` holds, else ``y``."""
    def size(self, x: Any) -> int:
        """Number of scalar entries (a Python int)."""
    def basis_zeros(self, x: Any, m: int) -> Any: ...
    def basis_set(self, basis: Any, j: Any, x: Any) -> Any: ...
    def basis_coeffs(self, basis: Any, x: Any) -> Any:
        """The ``(m,)`` array of inner products ``<b_i, x>``."""
    def basis_combine(self, basis: Any, coeffs: Any) -> Any:
        """``sum_i coeffs[i] * b_i``."""


class NumpyOps:
    """:class:`VectorOps` for 1-D float numpy arrays (float64 by default)."""

    def __init__(self, numerics: Numerics = NUMPY) -> None:
        self.numerics = numerics

    def _vec(self, x: Any) -> np.ndarray:
        return np.asarray(x, dtype=self.numerics.dtype).reshape(-1)

    def dot(self, x: Any, y: Any) -> Any:
        return np.dot(self._vec(x), self._vec(y))

    def norm(self, x: Any) -> Any:
        return np.linalg.norm(self._vec(x))

    def axpy(self, alpha: Any, x: Any, y: Any) -> Any:
        return alpha * self._vec(x) + self._vec(y)

    def scale(self, alpha: Any, x: Any) -> Any:
        return alpha * self._vec(x)

    def multiply(self, x: Any, y: Any) -> Any:
        return self._vec(x) * self._vec(y)

    def rsqrt(self, x: Any) -> Any:
        return 1.0 / np.sqrt(self._vec(x))

    def random_like(self, x: Any, seed: Any, *, rademacher: bool = False) -> Any:
        rng = np.random.default_rng(int(seed))
        shape = self._vec(x).shape
        if rademacher:
            return rng.choice(np.array([-1.0, 1.0], dtype=self.numerics.dtype), size=shape)
        return rng.standard_normal(shape).astype(self.numerics.dtype)

    def select(self, pred: Any, x: Any, y: Any) -> Any:
        chosen = x if bool(pred) else y  # a vector or a basis: keep its shape
        return np.asarray(chosen, dtype=self.numerics.dtype)

    def size(self, x: Any) -> int:
        return int(self._vec(x).size)

    def basis_zeros(self, x: Any, m: int) -> Any:
        return np.zeros((int(m), self.size(x)), dtype=self.numerics.dtype)

    def basis_set(self, basis: Any, j: Any, x: Any) -> Any:
        out = np.array(basis, copy=True)
        out[int(j)] = self._vec(x)
        return out

    def basis_coeffs(self, basis: Any, x: Any) -> Any:
        return basis @ self._vec(x)

    def basis_combine(self, basis: Any, coeffs: Any) -> Any:
        return np.asarray(coeffs, dtype=self.numerics.dtype) @ basis
