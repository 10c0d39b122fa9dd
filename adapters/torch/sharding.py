"""Where the parameters live: whole on every rank, or sharded (PyTorch FSDP2, DTensor parameters).

Every statistic a law consumes is a sum over parameters (g.u, u^T H u, |u|^2, sum |w| |u|, v.Hv inside
power iteration and Lanczos). [`ParameterSpace`][eos_core.adapters.torch.ParameterSpace] is the one place that knows
how such a sum is formed:

* **Whole parameters** (one process, or DDP: every rank holds the whole model). A sum is computed
  locally. What a rank *measures* on its own batch (u^T H u by autograd, a Hessian-vector product, the
  loss) is averaged over the data-parallel group by [`Reducer`][eos_core.adapters.torch.Reducer]:
  with equal shards of the batch, the mean of the per-rank Hessians is the Hessian of the mean loss.
* **Sharded parameters** (`torch.distributed.fsdp.fully_shard`: every parameter, gradient and optimizer
  state is a `DTensor` whose local tensor is this rank's shard). The tuner computes on the local shards
  (`DTensor.to_local()`: views of the parameters' storage, so an in-place change moves the parameter).
  A sum is the sum of the shards' partial sums, one all-reduce (SUM) of a few float64 scalars over the
  mesh dimensions the parameters are sharded on (FSDP: the mesh; HSDP, a 2-D `(replicate, shard)`
  mesh: the shard dimension only, the replicas hold equal shards). Gradients come from a backward pass
  through FSDP's hooks (its forward all-gathers the parameters, its backward reduce-scatters the
  gradient), so they are already averaged over every data-parallel rank: measurements made from them are
  *not* averaged again. Only the loss, which each rank computes on its own batch, is averaged over the
  whole mesh (or the `process_group` given to the tuner).

Facts this relies on (verified with torch 2.13, CPU, gloo, 2 processes): FSDP2 parameters and gradients
are DTensors with `Shard(0)` placements (uneven sizes are split as `torch.chunk` does, 7 rows as 4 + 3);
`torch.autograd.grad` with respect to the sharded parameters fails (they are not in the graph: FSDP's
forward uses the gathered parameters), `loss.backward()` sets `param.grad` to the reduce-scattered
mean gradient; writing into `param.to_local()` changes what the next forward gathers. So the exact
curvature routes (double backward, forward-mode) cannot run: they differentiate the gradient, and
FSDP's reduce-scatter is not part of any autograd graph. Finite differences of the gradient only need
backward passes: `fd-onesided` and `fd-central` work.

Sharded parameters need torch >= 2.7 (`torch.distributed.fsdp.fully_shard` and `torch.distributed.tensor`
are public from 2.6; `distribute_tensor(..., src_data_rank=None)`, which cuts a rank's shard out of a
vector every rank holds whole without communicating, from 2.7). FSDP1 (`FullyShardedDataParallel`, flat
parameters) is refused: its parameters are plain tensors holding slices of a flattened concatenation of
the model's parameters, whose layout the tuner cannot read through a public API. DeepSpeed ZeRO-1/2 (0.19.8,
CPU, gloo) steps the same kind of flat partition with its inner optimizer (its reduced gradient exists only
inside `DeepSpeedZeroOptimizer.step`): not supported either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eos_core.adapters.torch import vector_ops as vec
from eos_core.adapters.torch.distributed import Reducer

Vector = list[torch.Tensor]
#: the oldest torch that runs the tuner on sharded (DTensor) parameters
MIN_TORCH_SHARDED = (2, 7)


def torch_version() -> tuple[int, int]:
    """`(major, minor)` of the installed torch."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def is_dtensor(tensor: Any) -> bool:
    """Whether `tensor` is a `DTensor` (checked by class name, so it imports nothing on any torch)."""
    return any(cls.__name__ == "DTensor" for cls in type(tensor).__mro__)


def is_fsdp1_parameter(tensor: Any) -> bool:
    """Whether `tensor` is a parameter of FSDP1 (`FullyShardedDataParallel`).

    Args:
        tensor: a parameter.

    Returns:
        True for a `FlatParameter` or a view of one (`use_orig_params=True`); FSDP1 marks both with
        `_fsdp_flattened`.
    """
    return bool(getattr(tensor, "_fsdp_flattened", False)) or type(tensor).__name__ == "FlatParameter"


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view of its storage), or the tensor itself."""
    if is_dtensor(tensor):
        with torch.no_grad():
            return tensor.to_local()
    return tensor


def _sharded_dims(param: torch.Tensor) -> tuple[int, ...]:
    """The mesh dimensions a DTensor parameter is sharded on."""
    return tuple(i for i, placement in enumerate(param.placements) if placement.is_shard())


class ParameterSpace:
    """The optimizer's trainable parameters as the tuner computes with them (see the module docstring).

    Args:
        params: the parameters (the optimizer's, with `requires_grad`), all plain tensors or all DTensors.
        process_group: the data-parallel group whose per-rank measurements are averaged (default: the world
            when `torch.distributed` is initialised); with sharded parameters, the group the loss is averaged
            over (default: every rank of the parameters' mesh).

    Raises:
        ValueError: FSDP1 parameters; plain and DTensor parameters mixed; DTensor parameters on different
            meshes or sharded over different mesh dimensions.
        RuntimeError: DTensor parameters on a torch older than 2.7 (`MIN_TORCH_SHARDED`).
    """

    def __init__(self, params: Sequence[torch.Tensor], process_group: Any | None = None) -> None:
        self.params = list(params)
        self.reducer = Reducer(process_group)
        self._process_group = process_group
        if any(is_fsdp1_parameter(p) for p in self.params):
            raise ValueError(
                "CurvatureTuner does not support FSDP1 (FullyShardedDataParallel, flat parameters): shard the model "
                "with FSDP2, torch.distributed.fsdp.fully_shard (DTensor parameters), instead"
            )
        sharded = [is_dtensor(p) for p in self.params]
        self.sharded = bool(sharded) and all(sharded)
        if any(sharded) and not self.sharded:
            raise ValueError(
                "CurvatureTuner: the optimizer mixes sharded (DTensor) and plain parameters; apply fully_shard to "
                "the root module too, so that every parameter is sharded"
            )
        self.mesh: Any = None
        self.shard_dims: tuple[int, ...] = ()
        if self.sharded:
            self._check_sharded()

    # -- construction --------------------------------------------------------------------------------------
    def _check_sharded(self) -> None:
        if torch_version() < MIN_TORCH_SHARDED:
            raise RuntimeError(
                f"CurvatureTuner on sharded (DTensor / FSDP2) parameters needs torch >= "
                f"{'.'.join(map(str, MIN_TORCH_SHARDED))}; this is torch {torch.__version__}"
            )
        first = self.params[0]
        self.mesh = first.device_mesh
        self.shard_dims = _sharded_dims(first)
        for p in self.params:
            if p.device_mesh != self.mesh or _sharded_dims(p) != self.shard_dims:
                raise ValueError(
                    "CurvatureTuner: every sharded parameter must live on the same device mesh and be sharded over "
                    f"the same mesh dimensions (found {p.device_mesh} sharded over {_sharded_dims(p)} and "
                    f"{self.mesh} over {self.shard_dims})"
                )

    # -- the parameters as local tensors -------------------------------------------------------------------
    def local(self, tensors: Sequence[torch.Tensor | None] | None = None) -> list[Any]:
        """Local shards of `tensors` (default: the parameters); None entries stay None.

        Args:
            tensors: tensors shaped like the parameters (None: the parameters themselves).

        Returns:
            A new list: the tensors themselves when the parameters are whole, else each DTensor's local shard (a
            view of its storage).
        """
        source = self.params if tensors is None else tensors
        if not self.sharded:
            return list(source)
        return [None if t is None else local(t) for t in source]

    def grads(self) -> list[torch.Tensor | None]:
        """The parameters' `.grad` (local shards; None where a parameter has none)."""
        return self.local([p.grad for p in self.params])

    def numel(self) -> int:
        """The number of parameter entries, over every shard."""
        return int(sum(p.numel() for p in self.params))

    @property
    def gradients_are_averaged(self) -> bool:
        """Whether a probe's gradient is already the mean over data-parallel ranks (FSDP reduce-scatters it)."""
        return self.sharded

    # -- sums over parameters ------------------------------------------------------------------------------
    def total(self, partials: torch.Tensor) -> list[float]:
        """Sums over every parameter entry from this rank's partial sums.

        One host synchronisation, and one all-reduce per sharded mesh dimension when the parameters are sharded.

        Args:
            partials: this rank's partial sums, a 1-D float64 tensor.

        Returns:
            The totals as Python floats, in the order of `partials`.
        """
        return self.total_tensor(partials).tolist()

    def total_tensor(self, partials: torch.Tensor) -> torch.Tensor:
        """`total` as a float64 tensor, without a host synchronisation.

        Args:
            partials: this rank's partial sums, a 1-D float64 tensor.

        Returns:
            `partials` itself for whole parameters (or when empty); else the all-reduced sums, on the CPU under
            gloo and on the partials' device otherwise.
        """
        if not self.sharded or not partials.numel():
            return partials
        return self._all_reduce(partials, self.shard_dims)

    def _all_reduce(self, values: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
        buffer = values.detach().to(dtype=torch.float64).clone()
        for dim in dims:
            group = self.mesh.get_group(dim)
            target = self.reducer.device_for(buffer.device, group)
            moved = buffer.to(target)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
            buffer = moved
        return buffer

    def dots(self, pairs: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]],
             absolute: Sequence[bool] | None = None) -> list[float]:
        """Several inner products over every parameter entry, with one host synchronisation.

        Args:
            pairs: `(x, y)` pairs of vectors of local tensors.
            absolute: for each pair, whether to sum `|x| |y|` instead of `x y` (None: `x y` for every pair).

        Returns:
            One Python float per pair.
        """
        return self.total(vec.partial_dots(pairs, absolute))

    def dot(self, x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> float:
        """The inner product `sum_i <x_i, y_i>` over every parameter entry, as a Python float."""
        return self.dots([(x, y)])[0]

    def norm(self, x: Sequence[torch.Tensor]) -> float:
        """The Euclidean norm `||x||` over every parameter entry, as a Python float."""
        return float(np.sqrt(max(self.dot(x, x), 0.0)))

    def sum_of_squares(self, x: Sequence[torch.Tensor]) -> float:
        """The squared norm `sum_i |x_i|^2` over every parameter entry, from per-tensor norms.

        Args:
            x: a vector of local tensors.

        Returns:
            The squared norm as a Python float; non-finite when an entry is (or a tensor's norm overflows).
        """
        return self.total(vec.partial_sum_of_squares(x))[0]

    def scale_along(self, params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor]) -> tuple[float, float]:
        """The parameter scale along a direction and the direction's norm, over every parameter entry.

        Args:
            params: the local parameters `w`.
            direction: the direction `u`, shaped like `params`.

        Returns:
            `(sum_i |w_i| |u_i| / ||u||, ||u||)` ([`parameter_scale_along`][eos_core.routes.parameter_scale_along];
            the scale is 0 when `u = 0`).
        """
        weighted, squared = self.dots([(params, direction), (direction, direction)], absolute=(True, False))
        return vec.scale_from(weighted, squared)

    def all_finite(self, x: Sequence[torch.Tensor | None]) -> bool:
        """Whether every entry of every tensor, on every shard, is finite (None entries are skipped)."""
        tensors = [t for t in x if t is not None]
        if not self.sharded:
            return vec.all_finite(tensors)
        partial = vec.partial_sum_of_squares(tensors) if tensors else torch.zeros(1, dtype=torch.float64)
        return bool(np.isfinite(self.total(partial)[0]))

    def step_inputs(self, loss: torch.Tensor | None, grads: Sequence[torch.Tensor | None]
                    ) -> tuple[float | None, float, bool]:
        """The loss, `|g|^2` and their finiteness, over every shard (one host synchronisation for whole parameters).

        Args:
            loss: the step's loss (a one-element tensor) or None.
            grads: the parameters' `.grad` as local tensors (None entries count as 0).

        Returns:
            `(loss, grad_sq, finite)`: the loss as a float (None without one; with sharded parameters the mean over
            the data-parallel ranks, so every rank skips the same steps and reports the same loss), the squared
            gradient norm over every shard, and whether both are finite.
        """
        if not self.sharded:
            return vec.step_inputs(loss, grads)
        tensors = [g for g in grads if g is not None]
        partial = vec.partial_sum_of_squares(tensors) if tensors else torch.zeros(1, dtype=torch.float64)
        grad_sq = self.total(partial)[0]
        value = None
        if loss is not None:
            value = self.mean_loss([float(loss.detach().reshape(-1)[0])])[0]
        finite = bool(np.isfinite(grad_sq)) and (value is None or bool(np.isfinite(value)))
        return value, grad_sq, finite

    # -- means over data-parallel ranks --------------------------------------------------------------------
    def mean_measured(self, values: Sequence[float]) -> list[float]:
        """Per-rank measurements of the objective (u^T H u, ...) averaged over the data-parallel ranks.

        Args:
            values: this rank's measurements.

        Returns:
            The means as Python floats; with sharded parameters the values as they are (they come from gradients
            FSDP already averaged).
        """
        return [float(v) for v in values] if self.gradients_are_averaged else self.reducer.mean_scalars(values)

    def mean_measured_tensors(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-rank Hessian-vector products averaged over the data-parallel ranks.

        Args:
            tensors: this rank's product, as local tensors.

        Returns:
            The mean over the ranks of each tensor; with sharded parameters the tensors as they are (as in
            `mean_measured`).
        """
        return list(tensors) if self.gradients_are_averaged else self.reducer.mean_tensors(tensors)

    def mean_loss(self, values: Sequence[float]) -> list[float]:
        """Per-rank losses averaged over the data-parallel ranks.

        Args:
            values: this rank's losses (or other per-rank scalars).

        Returns:
            The means as Python floats: over the process group (whole parameters, or sharded parameters with a
            `process_group` given), else over every rank of the parameters' mesh.
        """
        if not self.sharded or self._process_group is not None:
            return self.reducer.mean_scalars(values)
        buffer = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dims = range(self.mesh.ndim)
        size = int(np.prod([self.mesh.size(d) for d in dims]))
        return (self._all_reduce(buffer, dims) / size).tolist()

    # -- vectors every rank must agree on ------------------------------------------------------------------
    def random_start(self, seed: int, like: Sequence[torch.Tensor]) -> Vector:
        """The spectral estimators' start vector: this rank's shard of a unit vector drawn over the whole parameters.

        [`random_start`][eos_core.spectral.start.random_start] over the parameters' (global) shapes, with exactly
        the same numbers: the draws, the norm and the division are the same operations in the same order, one
        parameter at a time (a sharded rank never holds more than one whole parameter in float64).

        Args:
            seed: the seed of numpy's `default_rng`.
            like: the local parameters (the result's dtype and device).

        Returns:
            One tensor per parameter, shaped like its local shard, the vector divided by its norm (not divided
            when the norm is 0).
        """
        rng = np.random.default_rng(int(seed))
        parts, norm_sq = [], 0.0
        for p in self.params:
            whole = rng.standard_normal(tuple(int(n) for n in p.shape))
            norm_sq += float(np.sum(whole * whole))
            parts.append(self._shard_of(torch.from_numpy(whole), p))
        norm = float(np.sqrt(norm_sq))
        out = []
        for part, t in zip(parts, like, strict=True):
            array = part.cpu().numpy()
            if norm != 0.0:
                array = array / norm  # in numpy, as random_start divides
            out.append(torch.from_numpy(np.ascontiguousarray(array)).to(device=t.device, dtype=t.dtype))
        return out

    def _shard_of(self, whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """This rank's shard of `whole` (a tensor shaped like `param` that every rank holds), no communication."""
        if not self.sharded:
            return whole
        from torch.distributed.tensor import distribute_tensor

        device = local(param).device
        return distribute_tensor(whole.to(device), param.device_mesh, param.placements, src_data_rank=None).to_local()

    def random_like(self, x: Sequence[torch.Tensor], seed: int, *, rademacher: bool = False) -> Vector:
        """A random vector shaped like `x`, for the spectral estimators' fallbacks (a zero start, a Lanczos breakdown).

        Whole parameters: tensor `i` is drawn from a generator seeded with `seed * 1_000_003 + i`, as
        [`TorchOps.random_like`][eos_core.adapters.torch.TorchOps.random_like] does. Sharded: each rank draws its own
        shard (the seed offset by `7919 * (1 + rank)`): a valid random global vector without drawing the whole
        model on every rank, so a breakdown restart differs from an unsharded run's (the spectral estimates are
        still of the same operator).

        Args:
            x: local tensors whose shapes, dtypes and devices the result takes.
            seed: an integer seed.
            rademacher: draw signs (+1 / -1) instead of standard normal entries.

        Returns:
            The random vector, as local tensors.
        """
        offset = 0
        if self.sharded:
            offset = 7919 * (1 + int(self.mesh.get_rank()))
        out = []
        for i, t in enumerate(x):
            generator = torch.Generator(device=t.device).manual_seed(int(seed) * 1_000_003 + i + offset)
            sample = torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)
            out.append(torch.sign(sample) + (sample == 0) if rademacher else sample)
        return out

    # -- checkpoints ---------------------------------------------------------------------------------------
    def saved(self, vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """A vector in the form a state dict holds it.

        Args:
            vector: local tensors shaped like the parameters' local shards.

        Returns:
            The tensors, detached; as DTensors shaped and placed like the parameters when sharded (so
            `torch.distributed.checkpoint` saves, gathers and reshards them like the optimizer's own state).
        """
        if not self.sharded:
            return [t.detach() for t in vector]
        from torch.distributed.tensor import DTensor

        return [DTensor.from_local(t.detach(), p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                   stride=p.stride()) for t, p in zip(vector, self.params, strict=True)]

    def restored(self, key: str, saved: Sequence[Any], like: Sequence[torch.Tensor]) -> Vector:
        """A vector read from a state dict, as local tensors in the dtype and device of `like`.

        Accepts what `saved` wrote (DTensors, resharded by `torch.distributed.checkpoint` if the mesh
        changed), whole tensors (a full state dict: this rank takes its shard), or this rank's local shards.

        Args:
            key: the vector's name in the tuner's state (for the error message).
            saved: one tensor per parameter.
            like: the local parameters (or objects with their `shape`, `dtype` and `device`).

        Returns:
            Copies of the tensors as local tensors shaped like `like`, in its dtype and device.

        Raises:
            ValueError: not one tensor per parameter, or a tensor shaped neither like its parameter nor like this
                rank's shard of it.
        """
        saved = list(saved)
        if len(saved) != len(self.params):
            raise self._shape_error(key, saved)
        out = []
        for t, p, target in zip(saved, self.params, like, strict=True):
            if is_dtensor(t):
                if tuple(t.shape) != tuple(p.shape):
                    raise self._shape_error(key, saved)
                t = local(t) if self.sharded else t.full_tensor()
            elif self.sharded and tuple(t.shape) == tuple(p.shape):
                t = self._shard_of(t, p)
            if tuple(t.shape) != tuple(target.shape):
                raise self._shape_error(key, saved)
            out.append(t.detach().to(device=target.device, dtype=target.dtype).clone())
        return out

    def _shape_error(self, key: str, saved: Sequence[Any]) -> ValueError:
        shapes = [tuple(t.shape) for t in saved]
        return ValueError(f"the checkpoint's tuner state has a {key} shaped {shapes}, but the optimizer's "
                          f"parameters are shaped {[tuple(p.shape) for p in self.params]}")
