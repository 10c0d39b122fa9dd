"""Averaging probe statistics across data-parallel ranks, so every rank computes the same learning rate.

(Sharded parameters, FSDP2, are the business of `eos_core.adapters.torch.sharding`.)
Under DDP the step's gradient is already averaged by DDP itself, so g.u is identical on every rank;
what each rank measures on its own shard (u^T H u, the loss, Hessian-vector products) is averaged
here. With equal shards, the mean of the per-rank Hessians is the Hessian of the mean loss, so the
result equals a single process on the union batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


class Reducer:
    """Mean over the ranks of a process group; the identity when not running distributed.

    Args:
        process_group: the `torch.distributed` process group to average over (None: the default group, the
            world, once `torch.distributed` is initialised).
    """

    def __init__(self, process_group: object | None = None) -> None:
        self.group = process_group

    @property
    def world_size(self) -> int:
        """The number of ranks in the group; 1 when `torch.distributed` is unavailable or not initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    def _device(self, like: torch.device) -> torch.device:
        return self.device_for(like, self.group)

    @staticmethod
    def device_for(like: torch.device, group: object | None) -> torch.device:
        """Where a collective over `group` takes its tensors.

        Args:
            like: the device the tensors live on.
            group: the process group (None: the default group).

        Returns:
            Under the NCCL backend, `like` when it is a CUDA device and the current CUDA device otherwise (NCCL
            takes no CPU tensors: a CPU buffer of scalars goes to the GPU); under gloo, the CPU; under another
            backend, `like`.
        """
        backend = dist.get_backend(group)
        if backend == "nccl":
            return like if like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        return like if like.type != "cpu" and backend != "gloo" else torch.device("cpu")

    def mean_scalars(self, values: Sequence[float], device: torch.device | None = None) -> list[float]:
        """Average Python floats across ranks (one all-reduce of a float64 tensor).

        Args:
            values: this rank's values.
            device: the device the all-reduce's buffer goes to, passed through
                [`device_for`][eos_core.adapters.torch.Reducer.device_for] (default: the CPU).

        Returns:
            The mean over the group's ranks of each value, as Python floats (the values themselves when the world
            size is 1).
        """
        if self.world_size == 1:
            return [float(v) for v in values]
        target = self._device(device or torch.device("cpu"))
        buffer = torch.tensor([float(v) for v in values], dtype=torch.float64, device=target)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        return (buffer / self.world_size).tolist()

    def mean_tensors(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Average a list of tensors across ranks (one all-reduce per tensor, on detached copies).

        Args:
            tensors: this rank's tensors; they are not modified.

        Returns:
            The mean over the group's ranks of each tensor, on that tensor's device (the tensors themselves when the
            world size is 1).
        """
        if self.world_size == 1:
            return list(tensors)
        out = []
        for t in tensors:
            work = t.detach().clone()
            device = self._device(work.device)
            moved = work.to(device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=self.group)
            out.append((moved / self.world_size).to(t.device))
        return out
