"""Vector arithmetic on lists of tensors (a model's parameters), for the core's spectral estimators.

Vectors are `list[torch.Tensor]` shaped like the parameters. Scalars are Python floats (the
adapter runs eagerly, so the core estimators use [`NUMPY`][eos_core.numerics.NUMPY]); inner products
accumulate in float64 whatever the parameter dtype, so curvature accumulates in at least fp32 under
mixed precision. `torch._foreach_*` kernels do the elementwise work.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from eos_core.numerics import NUMPY, Numerics
from eos_core.routes import parameter_scale_along

Vector = list[torch.Tensor]


def partial_dots(pairs: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]],
                 absolute: Sequence[bool] | None = None) -> torch.Tensor:
    """The inner products of `pairs` over the given tensors, without a host synchronisation.

    With sharded parameters these are one rank's partial sums
    ([`ParameterSpace`][eos_core.adapters.torch.ParameterSpace] adds them up).

    Args:
        pairs: `(x, y)` pairs of vectors (lists of tensors, paired tensor by tensor).
        absolute: for each pair, whether to sum `|x| |y|` instead of `x y` (see `scale_along`); None: `x y` for
            every pair.

    Returns:
        A 1-D float64 tensor of `sum_i <x_i, y_i>` per pair (accumulated in float64; 0 for an empty pair), on the
        device of the first non-empty pair (the CPU when there is none); empty when `pairs` is.
    """
    totals = []
    for index, (x, y) in enumerate(pairs):
        if absolute is not None and absolute[index]:
            parts = [torch.sum(a.detach().abs() * b.detach().abs(), dtype=torch.float64)
                     for a, b in zip(x, y, strict=True)]
        else:
            parts = [torch.sum(a.detach() * b.detach(), dtype=torch.float64) for a, b in zip(x, y, strict=True)]
        totals.append(torch.stack([p.to(parts[0].device) for p in parts]).sum() if parts else None)
    devices = [t.device for t in totals if t is not None]
    device = devices[0] if devices else torch.device("cpu")
    return torch.stack([t.to(device) if t is not None else torch.zeros((), dtype=torch.float64, device=device)
                        for t in totals]) if totals else torch.zeros(0, dtype=torch.float64)


def dots(pairs: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]],
         absolute: Sequence[bool] | None = None) -> list[float]:
    """Several inner products (float64 accumulation) with a single host synchronisation.

    Args:
        pairs: `(x, y)` pairs of vectors.
        absolute: for each pair, whether to sum `|x| |y|` instead of `x y` (see `scale_along`); None: `x y` for
            every pair.

    Returns:
        One Python float per pair: `sum_i <x_i, y_i>` (or `sum_i <|x_i|, |y_i|>`) over this process's tensors.
    """
    return [float(v) for v in partial_dots(pairs, absolute).tolist()]


def dot(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> float:
    """The inner product of two vectors, accumulated in float64 (one host synchronisation).

    Args:
        x: a vector (list of tensors).
        y: a vector shaped like `x`.

    Returns:
        `sum_i <x_i, y_i>` as a Python float; 0 for empty vectors.
    """
    if not x:
        return 0.0
    return dots([(x, y)])[0]


def _norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The per-tensor 2-norms in float64, stacked on the first tensor's device.

    One kernel per dtype family (before torch 2.4, one per bf16/fp16 tensor); bf16/fp16 tensors are reduced in
    fp32. NaN and Inf entries propagate into the norms.

    Returns:
        A 1-D float64 tensor with one norm per tensor (the fp32-and-wider tensors first, then the bf16/fp16 ones).
    """
    device = tensors[0].device
    low = [t.detach() for t in tensors if t.dtype in (torch.bfloat16, torch.float16)]
    other = [t.detach() for t in tensors if t.dtype not in (torch.bfloat16, torch.float16)]
    norms = list(torch._foreach_norm(other, 2)) if other else []
    if low:
        norms += _float32_norms(low)
    return torch.stack([n.to(device=device, dtype=torch.float64) for n in norms])


def _float32_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The 2-norms of bf16/fp16 tensors, reduced in fp32 (no fp32 copy of the tensors).

    `torch._foreach_norm` takes `dtype` from torch 2.4 on; torch 2.3 gets one `vector_norm` kernel per tensor.

    Returns:
        One fp32 scalar tensor per tensor.
    """
    if _foreach_norm_takes_dtype():
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    return [torch.linalg.vector_norm(t, 2, dtype=torch.float32) for t in tensors]


@functools.cache
def _foreach_norm_takes_dtype() -> bool:
    """Whether this torch's `_foreach_norm` takes `dtype` (asked once, on a one-element tensor).

    Returns:
        False on torch < 2.4, where the call raises TypeError.
    """
    try:
        torch._foreach_norm([torch.zeros(1, dtype=torch.bfloat16)], 2, dtype=torch.float32)
    except TypeError:
        return False
    return True


def step_inputs(loss: torch.Tensor | None, grads: Sequence[torch.Tensor | None]) -> tuple[float | None, float, bool]:
    """`(loss, |g|^2, finite)` of a step's inputs with a single host synchronisation.

    `|g|^2` sums the squared per-tensor norms in float64 (missing gradients count as 0); `finite` says
    whether the loss and `|g|^2` are finite: NaN and Inf entries make `|g|^2` non-finite, and so does a
    gradient whose norm overflows its float type (beyond 1.8e19 in fp32: a diverged step, best skipped too).

    Args:
        loss: the step's loss (a one-element tensor) or None.
        grads: the parameters' `.grad` (None entries allowed).

    Returns:
        The loss as a float (None without one), the squared gradient norm, and the finiteness flag.
    """
    tensors = [g for g in grads if g is not None]
    if tensors:
        norms = _norms(tensors)
        squared = (norms * norms).sum()
    else:
        device = loss.device if loss is not None else torch.device("cpu")
        squared = torch.zeros((), dtype=torch.float64, device=device)
    values = [squared]
    if loss is not None:
        values.append(loss.detach().reshape(-1)[0].to(device=squared.device, dtype=torch.float64))
    host = torch.stack(values).tolist()
    finite = all(math.isfinite(v) for v in host)
    return (host[1] if loss is not None else None), host[0], finite


def partial_sum_of_squares(x: Sequence[torch.Tensor]) -> torch.Tensor:
    """`[sum_i |x_i|^2]` (a 1-element float64 tensor, no host synchronisation) from the per-tensor norms."""
    if not x:
        return torch.zeros(1, dtype=torch.float64)
    norms = _norms(x)
    return (norms * norms).sum().reshape(1)


def sum_of_squares(x: Sequence[torch.Tensor]) -> float:
    """The squared norm of a vector from the per-tensor norms (one kernel, one synchronisation).

    Args:
        x: a vector (list of tensors).

    Returns:
        `sum_i |x_i|^2` as a Python float (0 for an empty vector); non-finite when an entry is, or when a tensor's
        norm overflows its float type.
    """
    if not x:
        return 0.0
    return float(partial_sum_of_squares(x)[0])


def scale_from(weighted: float, squared: float) -> tuple[float, float]:
    """The parameter scale along `u` and `||u||`, from sums already reduced.

    Args:
        weighted: `sum_i |w_i| |u_i|`.
        squared: `||u||^2` (a negative rounding error counts as 0).

    Returns:
        `(parameter_scale_along(weighted, ||u||), ||u||)`.
    """
    norm = math.sqrt(max(squared, 0.0))
    return parameter_scale_along(weighted, norm), norm


def scale_along(params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor]) -> tuple[float, float]:
    """The parameter scale along a direction and the direction's norm, for finite-difference steps.

    The parameter scale of a finite-difference step along `u`
    ([`parameter_scale_along`][eos_core.routes.parameter_scale_along]: Dennis and Schnabel's `typx^T |u|` rule,
    Numerical Methods for Unconstrained Optimization, section 5.6), with a single host synchronisation.

    Args:
        params: the parameters `w`.
        direction: the direction `u`, shaped like `params`.

    Returns:
        `(sum_i |w_i| |u_i| / ||u||, ||u||)`; the scale is 0 when `u = 0`.
    """
    weighted, squared = dots([(params, direction), (direction, direction)], absolute=(True, False))
    return scale_from(weighted, squared)


def squared_norm(x: Sequence[torch.Tensor]) -> float:
    """The squared norm `sum_i <x_i, x_i>` (float64 accumulation, one synchronisation), as a Python float."""
    return dot(x, x)


def norm(x: Sequence[torch.Tensor]) -> float:
    """The Euclidean norm `||x||` over every entry (float64 accumulation), as a Python float."""
    return float(np.sqrt(max(squared_norm(x), 0.0)))


def clone(x: Sequence[torch.Tensor]) -> Vector:
    """Detached copies of the tensors of `x` (a new vector that changes to `x` do not reach)."""
    return [t.detach().clone() for t in x]


def all_finite(x: Sequence[torch.Tensor | None]) -> bool:
    """Whether every entry of every tensor is finite, read from their 2-norms (one kernel, one synchronisation).

    A tensor whose norm overflows its float type (beyond 1.8e19 in fp32) counts as not finite. The 2-norm, not
    the max-norm: torch's max-norm kernel is 20x slower on CPU.

    Args:
        x: tensors (None entries are skipped).

    Returns:
        True when every tensor's 2-norm is finite (also when there is no tensor).
    """
    tensors = [t for t in x if t is not None]
    if not tensors:
        return True
    return bool(torch.isfinite(_norms(tensors)).all())


class TorchOps:
    """[`VectorOps`][eos_core.spectral.vector_ops.VectorOps] for lists of tensors.

    A vector is a list of tensors shaped like the parameters; a basis of `m` vectors is a list with one tensor of
    shape `(m, *shape)` per parameter. Scalars come back as numpy float64 values.

    Args:
        numerics: the core's numerics (eager numpy).
        space: a [`ParameterSpace`][eos_core.adapters.torch.ParameterSpace] when the vectors are shards of the
            parameters: inner products, basis coefficients, sizes and random vectors are then over every
            shard. Default: the vectors are whole.
    """

    def __init__(self, numerics: Numerics = NUMPY, space: Any | None = None) -> None:
        self.numerics = numerics
        self.space = space

    def dot(self, x: Vector, y: Vector) -> Any:
        """The inner product `sum_i <x_i, y_i>` (over every shard), as a numpy float64."""
        return np.float64(dot(x, y) if self.space is None else self.space.dot(x, y))

    def norm(self, x: Vector) -> Any:
        """The Euclidean norm `||x||` (over every shard), as a numpy float64."""
        return np.float64(norm(x) if self.space is None else self.space.norm(x))

    def axpy(self, alpha: Any, x: Vector, y: Vector) -> Vector:
        """`alpha * x + y`, a new vector."""
        return list(torch._foreach_add(y, x, alpha=float(alpha)))

    def scale(self, alpha: Any, x: Vector) -> Vector:
        """`alpha * x`, a new vector."""
        return list(torch._foreach_mul(x, float(alpha)))

    def multiply(self, x: Vector, y: Vector) -> Vector:
        """The elementwise product of `x` and `y`, a new vector."""
        return list(torch._foreach_mul(x, y))

    def rsqrt(self, x: Vector) -> Vector:
        """The elementwise `x ** -0.5`, a new vector."""
        return [torch.rsqrt(t) for t in x]

    def random_like(self, x: Vector, seed: Any, *, rademacher: bool = False) -> Vector:
        """A random vector shaped like `x`, a deterministic function of `seed`.

        Whole vectors: tensor `i` is drawn from a `torch.Generator` on its device seeded with
        `seed * 1_000_003 + i`, in its dtype. Shards: `ParameterSpace.random_like` (each rank draws its own
        shard).

        Args:
            x: the vector whose shapes, dtypes and devices the result takes.
            seed: an integer seed.
            rademacher: draw signs (+1 / -1) instead of standard normal entries.

        Returns:
            The random vector.
        """
        if self.space is not None:
            return self.space.random_like(x, int(seed), rademacher=rademacher)
        out = []
        for i, t in enumerate(x):
            generator = torch.Generator(device=t.device).manual_seed(int(seed) * 1_000_003 + i)
            sample = torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)
            out.append(torch.sign(sample) + (sample == 0) if rademacher else sample)
        return out

    def select(self, pred: Any, x: Vector, y: Vector) -> Vector:
        """`x` if the scalar `pred` holds, else `y` (no copy)."""
        return x if bool(pred) else y

    def size(self, x: Vector) -> int:
        """The number of entries of `x` (with shards: of the whole parameters, over every shard), a Python int."""
        if self.space is not None:
            return self.space.numel()
        return int(sum(t.numel() for t in x))

    def basis_zeros(self, x: Vector, m: int) -> Vector:
        """A basis of `m` zero vectors shaped like `x`: one `(m, *shape)` tensor per tensor of `x`."""
        return [torch.zeros((int(m), *t.shape), dtype=t.dtype, device=t.device) for t in x]

    def basis_set(self, basis: Vector, j: Any, x: Vector) -> Vector:
        """Copy `x` into vector `j` of `basis`, in place; returns `basis`."""
        for b, t in zip(basis, x, strict=True):
            b[int(j)].copy_(t)
        return basis

    def basis_vector(self, basis: Vector, j: Any) -> Vector:
        """Vector `j` of the basis: views of the basis' tensors (do not modify them)."""
        return [b[int(j)] for b in basis]

    def basis_coeffs(self, basis: Vector, x: Vector) -> Any:
        """The `(m,)` float64 numpy array of the inner products `<b_i, x>` (over every shard)."""
        total = None
        for b, t in zip(basis, x, strict=True):
            part = (b.reshape(b.shape[0], t.numel()) @ t.reshape(-1)).to(torch.float64)  # an empty shard too
            total = part if total is None else total + part.to(total.device)
        if self.space is not None:
            total = self.space.total_tensor(total)
        return total.cpu().numpy()

    def basis_combine(self, basis: Vector, coeffs: Any) -> Vector:
        """The combination `sum_i coeffs[i] b_i` of the basis vectors, a new vector."""
        out = []
        for b in basis:
            c = torch.as_tensor(np.asarray(coeffs), dtype=b.dtype, device=b.device)
            out.append(torch.tensordot(c, b, dims=1))
        return out
