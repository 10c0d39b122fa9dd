"""Shared parts of `monitor_tracking.py` and `monitor_warning.py`: the runs, and lambda_max to convergence.

Runs (every one monitoring only, `CurvatureTuner(optimizer, None, monitor_budget=...)`):

* `mlp-gd`: the B1-B3 network of `reproduce_mlp.py` (digits, 64-64-64-10 tanh MLP, squared error, the numpy
  initial weights of `eos_core.demo.models`), full batch, `torch.optim.SGD` at a constant lr (0.5, the best
  constant of the 2^i grid, trains at the edge: lambda_max ~ 2/lr = 4 from step ~100 on);
* `chargpt-adam`: the character-level GPT of `benchmarks/minibatch/tasks.py` (2 layers, width 64, ~120k
  parameters, batch 32 x 64 bytes of stdlib source), `torch.optim.Adam` at a constant lr (2e-3, the best
  constant of the suite's grid);
* `cnn-adam`: the suite's digits CNN (3 ReLU convolutions, 8,410 parameters, batch 32 with shifts and noise),
  `torch.optim.Adam` (3e-3): ReLU, so the monitor keeps exact products (finite differences cross kinks).

`exact_top` is the reference: lambda_max of the Hessian of the loss (or of `P^{-1/2} H P^{-1/2}` with the
optimizer's own preconditioner P) at the current weights, computed on a float64 (or float32) copy of the model by
ARPACK (`scipy.sparse.linalg.eigsh`, largest algebraic eigenvalue, relative tolerance 1e-6, 1e-5 in float32) on
exact double-backward Hessian-vector products, warm-started from the previous reference's eigenvector.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from eos_core.adapters.torch import CurvatureTuner  # noqa: E402
from eos_core.adapters.torch import optimizers as opt_info  # noqa: E402

Batch = Any
#: the default lr of each run (the best constant of its benchmark's grid)
DEFAULT_LR = {"mlp-gd": 0.5, "chargpt-adam": 2e-3, "cnn-adam": 3e-3}
#: the default length of each run (the benchmark's own)
DEFAULT_STEPS = {"mlp-gd": 1500, "chargpt-adam": 1000, "cnn-adam": 1500}
RUNS = tuple(DEFAULT_LR)
#: batches a mini-batch sampler holds beyond the run's steps
EXTRA_BATCHES = 64


@dataclass
class Setup:
    """A training run: model, optimizer, the batch of each step and the loss of a batch."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], Batch]  #: step -> the step's batch
    loss: Callable[[torch.nn.Module, Batch], torch.Tensor]
    full_batch: bool


def make_setup(name: str, lr: float, *, seed: int = 0, steps: int = 1000, quick: bool = False) -> Setup:
    """The run `name` (see the module docstring) at learning rate `lr`.

    Args:
        name: one of `RUNS`.
        lr: the constant learning rate.
        seed: the initial weights' and the batches' seed.
        steps: how many training batches the sampler must provide (it provides `EXTRA_BATCHES` more, which
            the run does not train on: `steps + i` for the reference batches of the tracking benchmark).
        quick: the suite's smoke-test sizes (mini-batch runs: a smaller batch and context).

    Returns:
        The `Setup`.
    """
    if name == "mlp-gd":
        from eos_core.demo.data import load_dataset
        from eos_core.demo.models import ModelSpec
        from eos_core.demo.torch_backend import build_model, loss_function

        data = load_dataset("digits", num_samples=200 if quick else None)
        spec = ModelSpec(arch="mlp", width=64, loss="mse")
        model = build_model(spec, data, seed=seed)
        inputs = torch.from_numpy(data.x).float()
        targets = torch.from_numpy(data.one_hot()).float()
        del loss_function  # same loss, written on (inputs, targets) so that a float64 copy can evaluate it

        def mse(m: torch.nn.Module, batch: Batch) -> torch.Tensor:
            x, y = batch
            return 0.5 * (m(x) - y).square().sum(dim=1).mean()

        return Setup(name, model, torch.optim.SGD(model.parameters(), lr=lr), lambda _: (inputs, targets), mse, True)
    from benchmarks.minibatch.tasks import chargpt_task, cnn_task

    task = chargpt_task(quick=quick) if name == "chargpt-adam" else cnn_task(quick=quick)
    model = task.make_model(seed)
    sampler = task.sampler(seed, max(steps, 1) + EXTRA_BATCHES)
    return Setup(name, model, torch.optim.Adam(model.parameters(), lr=lr), sampler, task.loss, False)


def monitored(setup: Setup, budget: float, **options: Any) -> CurvatureTuner:
    """`CurvatureTuner(optimizer, None, monitor_budget=budget)`: monitoring only."""
    return CurvatureTuner(setup.optimizer, None, monitor_budget=budget, model=setup.model, **options)


def closure_for(setup: Setup, batch: Batch) -> Callable[[], torch.Tensor]:
    """The step's closure on `batch`."""

    def closure() -> torch.Tensor:
        setup.optimizer.zero_grad(set_to_none=True)
        loss = setup.loss(setup.model, batch)
        loss.backward()
        return loss

    return closure


def restart_step_clock(tuner: CurvatureTuner) -> None:
    """Tell the monitor that the time since the last step was not training (a reference measurement ran).

    The monitor measures a training step as the interval between two optimizer steps; the benchmark's own work
    between steps (seconds of exact eigenvalue computations) would inflate it, lower the monitor's cost estimate
    and make it tick more often than in training. There is no public call for this yet: the private clock is
    reset (see benchmarks/README.md, "Sharpness monitor").
    """
    if tuner.monitor is not None:
        tuner.monitor._last_start = None


def _to_dtype(batch: Batch, dtype: torch.dtype) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, tuple | list):
        return type(batch)(_to_dtype(b, dtype) for b in batch)
    return batch


class ExactTop:
    """lambda_max of H (or of `P^{-1/2} H P^{-1/2}`) to convergence, on a float64 copy of the model.

    Args:
        setup: the run.
        tol: ARPACK's relative tolerance.
        dtype: the copy's dtype (float32 is about twice as fast; its products' rounding limits `tol` to ~1e-5).
    """

    def __init__(self, setup: Setup, tol: float = 1e-6, dtype: torch.dtype = torch.float64) -> None:
        self.setup = setup
        self.tol = tol
        self.dtype = dtype
        self.copy = copy.deepcopy(setup.model).to(dtype)
        self.previous: dict[str, np.ndarray] = {}
        self.matvecs = 0

    def operator(self, batch: Batch, *, preconditioned: bool = False) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
        """`v -> H v` (float64 numpy vectors) at the model's current weights on `batch`, and the dimension.

        Args:
            batch: the batch whose loss defines H.
            preconditioned: `P^{-1/2} H P^{-1/2}` with the optimizer's preconditioner as it is now.

        Returns:
            `(matvec, n)`; `(None, 0)` when the preconditioner is missing or not finite.
        """
        with torch.no_grad():
            for target, source in zip(self.copy.parameters(), self.setup.model.parameters(), strict=True):
                target.copy_(source)
        params = [p for p in self.copy.parameters() if p.requires_grad]
        scale = None
        if preconditioned:
            source = [p for p in self.setup.model.parameters() if p.requires_grad]
            found = opt_info.preconditioner(self.setup.optimizer, [source], [1.0])
            if found is None or not all(bool(torch.isfinite(p).all()) for p in found):
                return None, 0
            scale = torch.cat([p.to(self.dtype).reshape(-1) for p in found]).rsqrt()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):  # the fused kernels have no double backward
            loss = self.setup.loss(self.copy, _to_dtype(batch, self.dtype))
            grads = torch.autograd.grad(loss, params, create_graph=True)
        flat_grad = torch.cat([g.reshape(-1) for g in grads])
        n = flat_grad.numel()

        def matvec(v: np.ndarray) -> np.ndarray:
            self.matvecs += 1
            x = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1)).to(self.dtype)
            if scale is not None:
                x = x * scale
            with sdpa_kernel([SDPBackend.MATH]):
                hv = torch.autograd.grad(flat_grad, params, grad_outputs=x, retain_graph=True)
            out = torch.cat([h.reshape(-1) for h in hv])
            if scale is not None:
                out = out * scale
            return out.double().numpy()

        return matvec, n

    def __call__(self, batch: Batch, *, preconditioned: bool = False, key: str = "") -> float:
        """The top eigenvalue at the model's current weights on `batch` (NaN: no preconditioner yet).

        Args:
            batch: the batch whose loss defines H.
            preconditioned: use `P^{-1/2} H P^{-1/2}` with the optimizer's preconditioner as it is now (before the
                step: the one the monitor uses on this step).
            key: the warm start's name (one per operator and batch kind).

        Returns:
            lambda_max.
        """
        from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

        matvec, n = self.operator(batch, preconditioned=preconditioned)
        if matvec is None:
            return math.nan
        operator = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
        start = self.previous.get(key)
        try:
            values, vectors = eigsh(operator, k=1, which="LA", tol=self.tol, v0=start, ncv=min(n, 24), maxiter=2000)
        except ArpackNoConvergence as error:  # keep what converged (reported as NaN otherwise)
            if len(error.eigenvalues) == 0:
                return math.nan
            values, vectors = error.eigenvalues, error.eigenvectors
        self.previous[key] = vectors[:, 0]
        return float(values[0])


def loss_spike(losses: list[float], factor: float = 2.0) -> int | None:
    """The first step whose loss is NaN / inf or above `factor` times the running minimum of the steps before."""
    best = math.inf
    for step, value in enumerate(losses):
        if not math.isfinite(value) or (step > 0 and value > factor * best):
            return step
        best = min(best, value)
    return None


def divergence_onset(losses: list[float], factor: float = 2.0) -> int | None:
    """The first step of the excursion above `factor` times the running minimum that the run does not recover from.

    Args:
        losses: the loss of each step.
        factor: the spike factor (as `loss_spike`).

    Returns:
        The step from which every loss is NaN / inf or above `factor` times the lowest loss of the steps before it,
        or None when the last loss is not such a loss.
    """
    above = []
    low = math.inf
    for step, value in enumerate(losses):
        above.append(not math.isfinite(value) or (step > 0 and value > factor * low))
        if math.isfinite(value):
            low = min(low, value)
    if not above or not above[-1]:
        return None
    step = len(losses) - 1
    while step > 0 and above[step - 1]:
        step -= 1
    return step
