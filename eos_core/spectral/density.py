"""Stochastic trace and spectral-density estimates (Hutchinson; stochastic Lanczos quadrature)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from eos_core import _validation as check
from eos_core.spectral.lanczos import lanczos_tridiagonal, tridiagonal_eigh
from eos_core.spectral.vector_ops import NumpyOps, VectorOps


def hutchinson_trace(
    matvec: Callable[[Any], Any], like: Any, *, num_samples: int = 10, ops: VectorOps | None = None, seed: int = 0
) -> Any:
    r"""Hutchinson's estimate $\operatorname{tr} H \approx \frac1s \sum_i z_i^\top H z_i$ with Rademacher z.

    Unbiased, with variance $2(\|H\|_F^2 - \sum_i H_{ii}^2)/s$.

    Args:
        matvec: the operator $v \mapsto Hv$.
        like: a vector of the operator's shape (its values are not used).
        num_samples: s, the number of Rademacher probes.
        ops: the vector operations (numpy by default).
        seed: seed of the probes.

    Returns:
        The estimate of $\operatorname{tr} H$.
    """
    num_samples = check.positive_int("hutchinson_trace", "num_samples", num_samples)
    ops = ops if ops is not None else NumpyOps()
    total = ops.numerics.scalar(0.0)
    for i in range(num_samples):
        z = ops.random_like(like, seed + i, rademacher=True)
        total = total + ops.dot(z, matvec(z))
    return total / num_samples


class SpectralDensity(NamedTuple):
    """Stochastic Lanczos quadrature: per probe, Ritz values (nodes) and Gauss weights summing to 1."""

    nodes: np.ndarray  #: shape (num_probes, num_steps)
    weights: np.ndarray  #: shape (num_probes, num_steps)

    def on_grid(self, grid: Any, *, bandwidth: float) -> np.ndarray:
        """The density smoothed by a Gaussian of width `bandwidth` and evaluated on `grid`."""
        grid = np.asarray(grid, dtype=float)[:, None, None]
        kernel = np.exp(-0.5 * ((grid - self.nodes[None]) / bandwidth) ** 2) / (bandwidth * np.sqrt(2 * np.pi))
        return (kernel * self.weights[None]).sum(axis=2).mean(axis=1)


def spectral_density(
    matvec: Callable[[Any], Any],
    like: Any,
    *,
    num_probes: int = 4,
    num_steps: int = 30,
    ops: VectorOps | None = None,
    seed: int = 0,
) -> SpectralDensity:
    r"""Stochastic Lanczos quadrature estimate of the eigenvalue density (Ghorbani et al. 2019).

    For each random probe z, `num_steps` Lanczos steps give $T = S \Theta S^\top$; the density is approximated by
    $\frac1p \sum_z \sum_j S_{1j}^2 \, \delta(\lambda - \theta_j)$. Use
    [`SpectralDensity.on_grid`][eos_core.spectral.density.SpectralDensity.on_grid] to smooth it for plotting.

    Args:
        matvec: the operator $v \mapsto Hv$.
        like: a vector of the operator's shape.
        num_probes: p, random probes.
        num_steps: Lanczos steps per probe.
        ops: the vector operations (numpy by default).
        seed: seed of the probes.

    Returns:
        The nodes and weights, one row per probe.
    """
    num_probes = check.positive_int("spectral_density", "num_probes", num_probes)
    num_steps = check.positive_int("spectral_density", "num_steps", num_steps)
    ops = ops if ops is not None else NumpyOps()
    xp = ops.numerics.xp
    num_steps = min(num_steps, ops.size(like))
    nodes, weights = [], []
    for i in range(num_probes):
        z = ops.random_like(like, seed + 7919 * (i + 1), rademacher=True)
        tri = lanczos_tridiagonal(matvec, z, num_steps, ops=ops, seed=seed + i)
        theta, s = tridiagonal_eigh(tri, xp)
        nodes.append(np.asarray(theta, dtype=float))
        weights.append(np.asarray(s[0, :], dtype=float) ** 2)
    return SpectralDensity(nodes=np.stack(nodes), weights=np.stack(weights))
