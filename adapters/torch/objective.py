"""The loss on the current batch as a function of the parameters: what every curvature probe evaluates.

An [`Objective`][eos_core.adapters.torch.Objective] wraps either a closure in torch's convention (zero the
gradients, compute the loss, call `backward()`, return the loss) or a plain loss function (return the loss, no
backward). Probes need the loss *with its graph*, so while a closure runs under
[`BackwardCapture`][eos_core.adapters.torch.BackwardCapture] its `backward()` call is recorded instead of executed
(a `TorchFunctionMode`, the documented extension point; no user object is patched).

Each evaluation

* replays the random-number state of the step's own forward pass when the tuner called the
  closure itself (same dropout masks), inside `torch.random.fork_rng` so the user's random stream
  is the same as without probes;
* hides the parameters' `.grad` (so a `zero_grad()` in the closure cannot touch the step's
  gradient) and puts them back afterwards;
* leaves the model's buffers (BatchNorm running statistics) as they were, when the tuner knows the
  model ([`Objective.preserving_buffers`][eos_core.adapters.torch.Objective.preserving_buffers] around a group
  of evaluations);
* runs DDP models under `no_sync()` so probes never start a gradient reduction;
* optionally forces the math kernel of scaled-dot-product attention (the flash and
  memory-efficient kernels cannot be differentiated twice).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

#: machine epsilon of the reduced-precision float types autocast computes in
_LOW_PRECISION_EPS = {torch.bfloat16: torch.finfo(torch.bfloat16).eps, torch.float16: torch.finfo(torch.float16).eps}


class BackwardCapture(TorchFunctionMode):
    """Records the tensor a closure calls `backward` on, without running the backward pass.

    Used as a context manager around the closure: calls to `Tensor.backward` and `torch.autograd.backward` are
    recorded in `captured` (the tensor, or the first of several) and return None; every other torch function runs
    as usual. It also notes the largest machine epsilon of a bf16/fp16 result along the way (`low_precision_eps`,
    0 when every op computed in fp32 or better): under autocast the gradient is only that precise, and
    finite-difference steps must be sized for it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.captured: list[torch.Tensor] = []
        self.low_precision_eps = 0.0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.backward:
            self.captured.append(args[0])
            return None
        if func is torch.autograd.backward:
            tensors = args[0] if args else kwargs["tensors"]
            if isinstance(tensors, list | tuple):
                tensors = tensors[0]
            self.captured.append(tensors)
            return None
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor):
            eps = _LOW_PRECISION_EPS.get(result.dtype)
            if eps is not None and eps > self.low_precision_eps:
                self.low_precision_eps = eps
        return result


def math_sdpa() -> contextlib.AbstractContextManager:
    """Force PyTorch's math implementation of scaled-dot-product attention (twice differentiable).

    Returns:
        A context manager (`torch.nn.attention.sdpa_kernel([SDPBackend.MATH])`).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def capture_rng(params: Sequence[torch.Tensor]) -> dict[str, Any]:
    """The CPU and CUDA random states, to replay a forward pass's randomness in probes.

    Args:
        params: the parameters; the CUDA states are those of the devices they live on.

    Returns:
        `{"cpu": state}`, plus `"cuda": {device index: state}` when a parameter is on a CUDA device: the
        `rng_state` argument of [`Objective`][eos_core.adapters.torch.Objective].
    """
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    if devices:
        state["cuda"] = {d: torch.cuda.get_rng_state(d) for d in devices}
    return state


def _cuda_devices(params: Sequence[torch.Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


class Objective:
    """The loss on the current batch, evaluated at the current parameters with its graph.

    Args:
        fn: a closure (torch convention, calls `backward`) or a loss function (no backward).
        params: the parameters being optimised (their `.grad` is hidden during evaluations).
        rng_state: random state to replay (from `capture_rng` before the step's own forward).
        module: the model, when known: its buffers are restored by `preserving_buffers` and a DDP
            model runs under `no_sync()`.
        loss_scale: multiply the loss by this before differentiating (GradScaler's scale under
            float16 autocast); the attribute `scale` tells callers what to divide by.
        sharded: the parameters are sharded by FSDP2 (see `value` and `backward_gradient`).
    """

    def __init__(
        self,
        fn: Callable[[], Any],
        params: Sequence[torch.Tensor],
        *,
        rng_state: dict[str, Any] | None = None,
        module: torch.nn.Module | None = None,
        loss_scale: float = 1.0,
        sharded: bool = False,
    ) -> None:
        self.fn = fn
        self.sharded = bool(sharded)
        self.params = list(params)
        self.rng_state = rng_state
        self.module = module
        self.scale = float(loss_scale)
        self.math_sdpa = False
        #: largest bf16/fp16 machine epsilon among the results of the evaluations so far (0: none seen;
        #: None: not evaluated yet). Autocast shows up here; see `BackwardCapture`.
        self.low_precision_eps: float | None = None

    @contextlib.contextmanager
    def _isolated(self) -> Iterator[None]:
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.random.fork_rng(devices=_cuda_devices(self.params)))
                if self.rng_state is not None:
                    torch.set_rng_state(self.rng_state["cpu"])
                    for device, state in self.rng_state.get("cuda", {}).items():
                        torch.cuda.set_rng_state(state, device)
                no_sync = getattr(self.module, "no_sync", None)
                if isinstance(self.module, torch.nn.parallel.DistributedDataParallel) and no_sync is not None:
                    stack.enter_context(no_sync())
                if self.math_sdpa:
                    stack.enter_context(math_sdpa())
                yield
        finally:
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g

    @contextlib.contextmanager
    def preserving_buffers(self) -> Iterator[None]:
        """Restore the model's buffers (BatchNorm running statistics) after a group of evaluations.

        A context manager. Restoring happens once, at the end: the graphs of the evaluations inside must be
        released by then (autograd saves some buffers and checks they were not modified). Without `module` it
        does nothing.

        Yields:
            None, once; the buffers are copied back when the block exits, also on an error.
        """
        if self.module is None:
            yield
            return
        saved = [(b, b.detach().clone()) for b in self.module.buffers()]
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)

    def _call(self) -> torch.Tensor:
        capture = BackwardCapture()
        with capture:
            returned = self.fn()
        self.low_precision_eps = max(self.low_precision_eps or 0.0, capture.low_precision_eps)
        loss = capture.captured[-1] if capture.captured else returned
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                "the closure or loss function must return the loss tensor (or call backward on it); "
                f"got {type(loss).__name__}"
            )
        if loss.numel() != 1:
            raise ValueError(f"the loss must be a scalar tensor, got shape {tuple(loss.shape)}")
        return loss.reshape(())

    def loss(self) -> torch.Tensor:
        """The loss (times `scale`) with its graph, at the current parameters.

        Returns:
            A 0-d tensor that can be differentiated (gradients enabled, `.grad` hidden, random state replayed).

        Raises:
            TypeError: the closure or loss function returned something other than a tensor and called no
                `backward`.
            ValueError: the loss has more than one element.
        """
        with self._isolated(), torch.enable_grad():
            loss = self._call()
        return loss * self.scale if self.scale != 1.0 else loss

    def value(self) -> float:
        """The loss at the current parameters, without building a graph.

        With FSDP2-sharded parameters the evaluation must leave every FSDP module resharded: FSDP does not
        reshard the root module after its forward (it expects the backward to follow), and a later forward
        reuses gathered parameters that are still there, so it would not see the shards the tuner moves in place
        (`torch/distributed/fsdp/_fully_shard/_fsdp_state.py`: the root's `post_forward_mesh_info` is None).
        With the model known (`module`), its FSDP modules are resharded (`FSDPModule.reshard()`); without it,
        the loss is evaluated with a graph and a zero backward pass lets FSDP reshard (one backward more).

        Returns:
            The loss as a Python float (not multiplied by `scale`), this rank's own.

        Raises:
            TypeError: as `loss`.
            ValueError: as `loss`.
        """
        if not self.sharded:
            with self._isolated(), torch.no_grad():
                return float(self._call())
        modules = _fsdp_modules(self.module)
        with self._isolated(), torch.set_grad_enabled(not modules):
            loss = self._call()
            if modules:
                for module in modules:
                    module.reshard()
            elif loss.requires_grad:
                (loss * 0.0).backward()
            return float(loss.detach())

    def backward_gradient(self) -> list[torch.Tensor]:
        """The gradient at the current parameters by `loss.backward()`, read from `.grad`.

        The gradient is divided by `scale`; the parameters' own `.grad` are put back afterwards. This is the route
        to a gradient under FSDP2: its forward all-gathers the parameters and its backward hooks reduce-scatter
        the gradient into the sharded parameters' `.grad`, so the result is this rank's shard of the gradient
        averaged over every data-parallel rank (`torch.autograd.grad` cannot reach the sharded parameters, which
        FSDP's forward does not use).

        Returns:
            One tensor per parameter (the local shard for a DTensor parameter), detached; zeros for a parameter
            that gets no gradient.

        Raises:
            TypeError: as `loss`.
            ValueError: as `loss`.
        """
        from eos_core.adapters.torch.sharding import local

        with self._isolated(), torch.enable_grad():
            loss = self._call()
            (loss * self.scale if self.scale != 1.0 else loss).backward()
            grads = [p.grad for p in self.params]
        out = []
        for g, p in zip(grads, self.params, strict=True):
            g = torch.zeros_like(local(p)) if g is None else local(g).detach()
            out.append(g / self.scale if self.scale != 1.0 else g)
        return out

    def call(self, function: Callable[[], Any]) -> Any:
        """Run `function` isolated, as an evaluation of this objective is.

        Inside: gradients enabled, the parameters' `.grad` hidden, the step's random state replayed, DDP's
        `no_sync()` and the math SDPA kernel when set.

        Args:
            function: evaluates this objective itself (e.g. a `torch.func` transform of it).

        Returns:
            What `function` returns.
        """
        with self._isolated(), torch.enable_grad():
            return function()


def _fsdp_modules(module: torch.nn.Module | None) -> list[Any]:
    """The FSDP2 modules (`fully_shard`) in `module` (none without it, or on a torch without FSDP2)."""
    if module is None:
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def shifted(params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], step: float) -> Iterator[None]:
    """Temporarily move the parameters to `w + step * direction`.

    A context manager; `w` is restored exactly from a saved copy when the block exits, also on an error.

    Args:
        params: the parameters `w` (moved in place).
        direction: the direction, shaped like `params`.
        step: the multiple of `direction` to add.

    Yields:
        None, once, with the parameters at `w + step * direction`.
    """
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            torch._foreach_add_([p.data for p in params], list(direction), alpha=float(step))
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in params], saved)
