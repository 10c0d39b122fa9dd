"""lambda_max and the top-k eigenvalues of the Hessian (or of the preconditioned Hessian), warm-started.

The core's estimators ([`power_iteration`][eos_core.spectral.power_iteration.power_iteration],
[`lanczos`][eos_core.spectral.lanczos.lanczos]; CDAT paper appendix C.4) iterate on Hessian-vector products from
the oracle's route. `SpectralEstimates` keeps one warm start per operator: the first time
[`random_start`][eos_core.spectral.start.random_start] (`seed` for H, `seed + 1` for `P^{-1/2} H P^{-1/2}`, the
same vector in every framework for the same parameter order; with sharded parameters each rank holds its shard of
that same vector), afterwards the operator's last top eigenvector (power iteration's vector, or Lanczos's top Ritz
vector when it is finite). Inner products go through the parameters'
[`ParameterSpace`][eos_core.adapters.torch.ParameterSpace], so with sharded parameters every v.Hv, norm and
reorthogonalisation coefficient is summed over the shards.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from eos_core.adapters.torch import vector_ops as vec
from eos_core.adapters.torch.oracles import HessianOperator, Oracle
from eos_core.adapters.torch.sharding import ParameterSpace
from eos_core.adapters.torch.step import Estimate, Probe
from eos_core.spectral import lanczos, power_iteration, preconditioned_operator

Vector = list[torch.Tensor]


class SpectralEstimates:
    """Warm-started spectral estimates of the Hessian at `w` (see the module docstring).

    Args:
        oracle: gives the Hessian-vector products.
        space: the parameters' space (sums over shards, start vectors).

    Attributes:
        eigenvector: the warm start of H (None before the first estimate); checkpointed.
        preconditioned_eigenvector: the warm start of the preconditioned Hessian; checkpointed.
    """

    def __init__(self, oracle: Oracle, space: ParameterSpace) -> None:
        self.oracle = oracle
        self.space = space
        self.ops = vec.TorchOps(space=space if space.sharded else None)
        self.eigenvector: Vector | None = None
        self.preconditioned_eigenvector: Vector | None = None

    def operator(self, probe: Probe, preconditioned: bool) -> tuple[HessianOperator, Callable[[Vector], Vector]]:
        """The Hessian at `w` and the operator to iterate on (H, or `P^{-1/2} H P^{-1/2}`).

        Args:
            probe: the instrumented step (its objective, `w`, gradient and preconditioner).
            preconditioned: iterate on `P^{-1/2} H P^{-1/2}` instead of H.

        Returns:
            `(hessian, operator)`: the `v -> H v` operator at `w` (a context manager that releases its graph on
            exit) and the operator to iterate on (`hessian` itself, or the preconditioned one built on it).
            Finite-difference products reuse the step's gradient unless it was clipped.

        Raises:
            RuntimeError: no objective on this step; the preconditioned Hessian of an optimizer without a
                diagonal preconditioner.
        """
        objective = probe.objective("Hessian-vector products")
        at = probe.at
        hessian = self.oracle.hessian_operator(objective, at.params, base_grad=None if probe.clipped else at.grads)
        if not preconditioned:
            return hessian, hessian
        precond = probe.preconditioner()
        if precond is None:
            raise RuntimeError("CurvatureTuner: the preconditioned Hessian needs an optimizer with a diagonal "
                               "preconditioner")
        return hessian, preconditioned_operator(hessian, precond, ops=self.ops)

    def warm_start(self, like: Vector, preconditioned: bool, seed: int) -> Vector:
        """The start vector of the operator's next estimate.

        Args:
            like: vectors shaped like the local parameters (the start's dtype and device).
            preconditioned: the preconditioned Hessian's start rather than H's.
            seed: the tuner's `seed` option.

        Returns:
            The operator's last top eigenvector; the first time, `random_start(seed)` for H and
            `random_start(seed + 1)` for the preconditioned Hessian (the same start in every framework; this rank's
            shard of it when the parameters are sharded).
        """
        vector = self.preconditioned_eigenvector if preconditioned else self.eigenvector
        if vector is None:
            vector = self.space.random_start(seed + int(preconditioned), like)
        return vector

    def keep(self, preconditioned: bool, vector: Vector) -> None:
        """Make `vector` (detached) the operator's warm start."""
        vector = [v.detach() for v in vector]
        if preconditioned:
            self.preconditioned_eigenvector = vector
        else:
            self.eigenvector = vector

    def power_iteration(self, probe: Probe, preconditioned: bool, max_iters: int, tol: float) -> Estimate:
        """lambda_max of H (or of the preconditioned H) by power iteration from the warm start, which it updates.

        Power iteration keeps its vector where a product is not finite, so the warm start stays finite.

        Args:
            probe: the instrumented step.
            preconditioned: estimate lambda_max of `P^{-1/2} H P^{-1/2}` instead of H.
            max_iters: at most that many Hessian-vector products.
            tol: stop when the Rayleigh quotient changes by at most this, relative (0: always `max_iters`).

        Returns:
            The estimate: the eigenvalue and the number of Hessian-vector products it used.

        Raises:
            RuntimeError: as `operator`.
        """
        hessian, matvec = self.operator(probe, preconditioned)
        with hessian:
            result = power_iteration(matvec, self.warm_start(probe.at.params, preconditioned, probe.seed), tol=tol,
                                     max_iters=max_iters, ops=self.ops)
        self.keep(preconditioned, result.eigenvector)
        return Estimate(float(result.eigenvalue), int(result.iterations))

    def lanczos(self, probe: Probe, preconditioned: bool, k: int, num_steps: int) -> np.ndarray:
        """The top-k eigenvalues by Lanczos from the operator's warm start.

        A finite top Ritz vector becomes the warm start (of the next Lanczos, and of power iteration and tracking).

        Args:
            probe: the instrumented step.
            preconditioned: the eigenvalues of `P^{-1/2} H P^{-1/2}` instead of H.
            k: how many of the largest (algebraic) eigenvalues.
            num_steps: Lanczos steps (the Krylov basis holds that many vectors).

        Returns:
            The `k` largest eigenvalues, a float64 array; all NaN when non-finite products make the eigensolver
            fail (`LinAlgError`).

        Raises:
            RuntimeError: as `operator`.
        """
        hessian, matvec = self.operator(probe, preconditioned)
        with hessian:
            try:
                result = lanczos(matvec, self.warm_start(probe.at.params, preconditioned, probe.seed), k,
                                 num_steps=num_steps, ops=self.ops)
            except np.linalg.LinAlgError:  # NaN/Inf products: the law keeps its last lr (fallback)
                return np.full(k, np.nan)
        eigenvalues = np.asarray(result.eigenvalues, dtype=np.float64)
        if np.all(np.isfinite(eigenvalues)) and self.space.all_finite(result.eigenvectors[0]):
            self.keep(preconditioned, result.eigenvectors[0])
        return eigenvalues

    def alignment(self, delta: Vector) -> float:
        """The alignment of the update with the top eigenvector of H, `|cos(u, v_max)|`.

        Args:
            delta: the update (any multiple of `u`: the cosine does not depend on its scale).

        Returns:
            `|<u, v_max>| / (||u|| ||v_max||)` over every shard; NaN without an eigenvector or for a zero update.
        """
        vector = self.eigenvector
        if vector is None:
            return float("nan")
        along, delta_sq, vector_sq = self.space.dots([(delta, vector), (delta, delta), (vector, vector)])
        norm = float(np.sqrt(max(delta_sq, 0.0)))
        if not norm > 0:
            return float("nan")
        return abs(along) / (norm * float(np.sqrt(max(vector_sq, 0.0))))
