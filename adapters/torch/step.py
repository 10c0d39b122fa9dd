"""What one optimizer step carries from the tuner's pre-step hook to its post-step hook, and what its probes see.

`PendingStep` is the plan and the inputs of a step (made before the optimizer's own step);
`AtW` is what an instrumented step knows at `w` once the update `D = eta_probe * u` has been read
off; `Probe` is what the measurements of such a step work with. Vectors are lists of local tensors
(the parameters themselves, or this rank's shards of sharded parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from eos_core.adapters.torch.objective import Objective
from eos_core.laws.base import LawOutput

Vector = list[torch.Tensor]
#: `PendingStep.preconditioner` before the preconditioner of the step was computed
NOT_COMPUTED = object()


class Estimate(NamedTuple):
    """A lambda_max estimate and the Hessian-vector products it used."""

    eigenvalue: float
    iterations: int


@dataclass
class PendingStep:
    """One optimizer step, from the pre-step hook to the post-step hook.

    Subclasses that override `CurvatureTuner._preconditioner` receive it; `ratios` (each param
    group's lr over the first group's on this step) is the stable part of it for them.
    """

    step: int  #: index of this step among the steps not skipped
    objective: Objective | None = None
    skipped: bool = False
    passthrough: bool = False  #: not a training step (torch.distributed.checkpoint's state initialisation)
    probe: bool = False  #: the law measures its statistics on this step
    track: bool = False  #: lambda_max is tracked on this step (`sharpness_every`)
    record: bool = False  #: u is kept for the next step's probe (HyperGradient's cos(g_t, u_{t-1}))
    instrumented: bool = False  #: the optimizer steps with `eta_probe` and the lr is decided afterwards
    tick: bool = False  #: the sharpness monitor applies its operators on this step (`monitor_budget`)
    #: the monitor measures the curvature along this step's update (`eos_core.monitor.watches_update`)
    along_update: bool = False
    #: seconds of the monitor's product along the update (left out of the tuner's bookkeeping)
    along_update_seconds: float = 0.0
    loss: float | None = None
    grad_sq: float = math.nan  #: |g|^2 of the step's gradient
    group_lrs: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    schedule: float = 1.0  #: the scheduler's factor (lr_mode="multiply")
    step_lr: float = 0.0  #: the first group's lr during the optimizer's step
    eta_probe: float = 1.0  #: `step_lr` of an instrumented step
    output: LawOutput | None = None  #: the law's decision, made before a direct step
    #: w before the step (on an instrumented step, then D = eta_probe u); with `law=None` only on the steps that
    #: measure (instrumented steps and monitor ticks)
    saved: Vector | None = None
    #: seconds of the tuner's own work in the pre-step hook (closure and monitor tick excluded), with `law=None`
    bookkeeping: float | None = None
    law_estimates: dict[bool, Estimate] = field(default_factory=dict)  #: the law's lambda_max, per operator
    preconditioner: Any = NOT_COMPUTED


@dataclass
class AtW:
    """What an instrumented step knows at `w` once the update has been read off."""

    params: Vector
    grads: Vector
    delta: Vector  #: D = eta_probe * u
    eta_probe: float
    grad_dot_delta: float  #: g . D (over every shard)
    norms: tuple[float, float]  #: (sum |w| |D| / ||D||, ||D||): the finite-difference scale along D, ||D||


@dataclass
class Probe:
    """What the measurements of one instrumented step work with.

    `preconditioner()` is the tuner's diagonal preconditioner of the step (computed at most once, None for
    an optimizer without one); `previous_update` is u of the previous step when the law asked for it.
    """

    pending: PendingStep
    at: AtW
    measuring: str  #: what measures (the law's class name, or "sharpness tracking"), for error messages
    clipped: bool  #: the optimizer stepped with a clipped gradient: finite differences re-evaluate g(w)
    seed: int  #: seed of the spectral start vectors (seed + 1 for the preconditioned Hessian)
    preconditioner: Callable[[], Vector | None]
    previous_update: Vector | None = None
    previous_lr: float = 0.0  #: the lr applied to `previous_update`

    def objective(self, what: str) -> Objective:
        """The step's objective: the loss on the current batch.

        Args:
            what: what is measured, for the error message (e.g. `"u^T H u"`).

        Returns:
            The objective of the pending step.

        Raises:
            RuntimeError: the step has no objective (neither a closure nor `set_objective`).
        """
        if self.pending.objective is None:
            raise RuntimeError(
                f"{self.measuring} needs {what} on the current batch: call tuner.step(closure) with a closure that "
                "computes the loss (torch convention), or tuner.set_objective(loss_fn) before optimizer.step()"
            )
        return self.pending.objective


def group_ratios(groups: list[dict[str, Any]], lrs: list[float]) -> list[float]:
    """Each param group's lr relative to the first group's.

    At a schedule's 0 (the first group's lr is 0, a warm-up's first step) the ratios of the groups' base lrs
    (`"initial_lr"`, which torch schedulers record; else their lr) are used instead, so an instrumented step still
    moves every group.

    Args:
        groups: the optimizer's param groups.
        lrs: the groups' current lrs, in the same order.

    Returns:
        One ratio per group (the first is 1); 1 for every group when the first group's base lr is not positive
        either.
    """
    first = lrs[0]
    if first > 0:
        return [lr / first for lr in lrs]
    bases = [float(g.get("initial_lr", lr)) for g, lr in zip(groups, lrs, strict=True)]
    return [b / bases[0] if bases[0] > 0 else 1.0 for b in bases]
