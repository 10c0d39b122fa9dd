"""What the Lightning and Hugging Face callbacks share.

Settings, tuner creation, step detection, random-state replay, the lr shown to the trainers' own lr logs, logging
keys. Not public. Imports torch and the PyTorch adapter, so only the framework integrations import it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from eos_core.adapters.torch import STATE_KEY, CurvatureTuner
from eos_core.adapters.torch.objective import capture_rng
from eos_core.laws.base import Law
from eos_core.monitor import CALLBACK_BUDGET
from eos_core.settings import TunerSettings

__all__ = ["MONITOR_BUDGET", "STATE_KEY", "TunerSpec", "UnwrittenDiagnostics", "applied_group_lrs", "capture_rng",
           "law_with_horizon", "loggable", "probing", "replay_rng", "tuner_calls", "unwrap_optimizer"]

#: Diagnostics that are not logged as numbers: the step index (the trainers log their own) and the route (a name).
_NOT_LOGGED = ("step", "route")
#: Tuner arguments the callbacks set themselves (`initial_lr` is the deprecated name of `reference_lr`).
SET_BY_CALLBACK = ("optimizer", "model", "grad_scaler", "reference_lr", "initial_lr")
#: The callbacks' default share of training time for the sharpness monitor (`monitor_budget`; None turns it off).
MONITOR_BUDGET = CALLBACK_BUDGET


def law_with_horizon(owner: str, law: Law | None, horizon: Any, where: str) -> Law | None:
    """`law` with the run's horizon filled in when it needs one.

    A law needs one when `law.needs_horizon` (e.g. `CDAT(decay="cosine")` without `horizon=`); any other law (or
    None) is returned unchanged.

    Args:
        owner: the callback's name, for the error.
        law: the law, or None.
        horizon: the number of optimizer steps of the run as the trainer knows it (None, inf or NaN: unknown).
        where: where the number comes from, for the error (e.g. `"trainer.estimated_stepping_batches"`).

    Returns:
        `law.with_horizon(int(horizon))`, or `law`.

    Raises:
        ValueError: the law needs a horizon and the trainer does not know it.
    """
    if law is None or not getattr(law, "needs_horizon", False):
        return law
    known = isinstance(horizon, int | float) and not isinstance(horizon, bool) and math.isfinite(horizon)
    if not known or int(horizon) < 1:
        raise ValueError(f"{owner}: {type(law).__name__}(decay={getattr(law, 'decay', None)!r}) needs the number of "
                         f"optimizer steps of the run, but {where} is {horizon!r} (unknown); pass "
                         f"horizon=<optimizer steps> to the law")
    return law.with_horizon(int(horizon))


class TunerSpec:
    """The law and the validated [`TunerSettings`][eos_core.settings.TunerSettings] of the tuner a callback will attach.

    The options are checked when the callback is built (not when training starts), by the core's
    [`TunerSettings.from_options`][eos_core.settings.TunerSettings.from_options], the check every
    adapter uses: a bad setting fails in the line that wrote it with a ValueError naming the setting, and the
    deprecated names (`power_iters`, `power_tol`) keep working with a DeprecationWarning.

    Args:
        owner: the callback's name, for error messages.
        law: the law, or None to only measure.
        options: the tuner options the user gave the callback (core names).
        stacklevel: of the DeprecationWarning for an old option name, counted from the caller of this
            constructor (1: that caller's line).

    Raises:
        ValueError: `law` is not a law; an option the callback sets itself (`optimizer`, `model`,
            `grad_scaler`, `reference_lr`) was given; an unknown or invalid option; `warn="jit"`
            (JAX only).
    """

    def __init__(self, owner: str, law: Law | None, options: Mapping[str, Any], *, stacklevel: int = 1) -> None:
        if law is not None and not isinstance(law, Law):
            raise ValueError(f"{owner}: law must be an eos_core law (e.g. CDAT(scale=2.0)) or None to only "
                             f"measure, got {law!r}")
        reserved = set(SET_BY_CALLBACK) & set(options)
        if reserved:
            raise ValueError(f"{owner}: {', '.join(sorted(reserved))} is set by the callback itself")
        # stacklevel of from_options counts from its caller (this constructor) with 2 meaning "that caller's caller"
        settings = TunerSettings.from_options(owner, options, stacklevel=stacklevel + 2)
        if settings.warn == "jit":
            raise ValueError(f"{owner}: warn='jit' is for JAX's compiled step; the PyTorch tuner warns on the host "
                             "(warn=True) or not at all (warn=False)")
        self.owner = owner
        self.law = law
        self.settings = settings

    @property
    def needs(self) -> frozenset[str]:
        """The statistics the law needs (empty when only measuring)."""
        return self.law.needs if self.law is not None else frozenset()

    @property
    def overrides_lr(self) -> bool:
        """Whether the applied lr replaces the scheduler's (a law in `lr_mode="override"`)."""
        return self.law is not None and self.settings.lr_mode == "override"

    def make_tuner(self, optimizer: torch.optim.Optimizer, *, model: torch.nn.Module | None,
                   grad_scaler: Any | None, clipped_gradients: bool, hint: str,
                   law: Law | None = None) -> CurvatureTuner:
        """Attach a tuner to `optimizer`; the tuner's own ValueErrors get the callback's name and `hint`.

        `reference_lr` is the scheduler's base lr (the group's `initial_lr`, set by every torch
        scheduler) so that `lr_mode="multiply"` applies the schedule's factor even when it does not
        start at 1 (a warm-up from 0): both trainers create the scheduler before the callback attaches.
        `clipped_gradients`: the trainer clips the gradient before the step, so finite-difference
        curvature must not reuse the step's gradient as g(w) (the user's `clipped_gradients=True`
        option, for clipping the trainer does not know about, is kept).

        Args:
            optimizer: the trainer's torch optimizer.
            model: the module the probes run.
            grad_scaler: the trainer's GradScaler, if any.
            clipped_gradients: the trainer clips the gradient.
            hint: appended to a refusal.
            law: the law to run instead of the callback's own (its copy with the run's horizon,
                [`law_with_horizon`][eos_core.integrations._common.law_with_horizon]); default: the callback's.

        Returns:
            The attached tuner.

        Raises:
            ValueError: the tuner refused the optimizer or the settings (message prefixed and completed).
        """
        group = optimizer.param_groups[0]
        base = group.get("initial_lr", group["lr"])
        reference = float(base) if isinstance(base, int | float) and base > 0 else None
        settings = self.settings.replace(self.owner, reference_lr=reference,
                                         clipped_gradients=bool(clipped_gradients or self.settings.clipped_gradients))
        try:
            return CurvatureTuner(optimizer, self.law if law is None else law, model=model, grad_scaler=grad_scaler,
                                  settings=settings)
        except ValueError as error:
            raise ValueError(f"{self.owner}: {error}. {hint}") from error


def tuner_calls(tuner: CurvatureTuner) -> int:
    """How many optimizer steps `tuner` has processed, skipped ones included.

    Compared before and after a trainer's step, it tells whether the optimizer stepped: not while a trainer
    accumulates micro-batches, nor when a GradScaler skipped `optimizer.step` on inf gradients. (The
    diagnostics' `step` cannot tell: a skipped step reports the index the next real step will have.)

    Args:
        tuner: the PyTorch tuner.

    Returns:
        `tuner.calls` as an int.
    """
    return int(tuner.calls)


def applied_group_lrs(lr: float, groups: Sequence[Mapping[str, Any]]) -> list[float]:
    """The lr of each param group when the first group's is `lr`, as the tuner applies it.

    Args:
        lr: the lr applied to the first group.
        groups: the optimizer's param groups (their `lr` and, when a scheduler set it, `initial_lr`).

    Returns:
        `lr * ratio_g` per group, with `ratio_g` the group's lr over the first group's (the per-group ratios a
        scheduler keeps) or, while the first group's lr is 0 (a warm-up's first step), the ratio of their
        `initial_lr` (1 when that is 0 too).
    """
    current = [float(g["lr"]) for g in groups]
    if current[0] > 0:
        return [lr * value / current[0] for value in current]
    bases = [float(g.get("initial_lr", value)) for g, value in zip(groups, current, strict=True)]
    return [lr * (base / bases[0] if bases[0] > 0 else 1.0) for base in bases]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a trainer's wrappers: the one whose `step` updates the parameters.

    The tuner must hook that optimizer, not Lightning's `LightningOptimizer` or accelerate's
    `AcceleratedOptimizer` around it.

    Args:
        optimizer: the trainer's optimizer, wrapped or not.

    Returns:
        The innermost `torch.optim.Optimizer` reached through `_optimizer` / `optimizer` attributes (at most 8
        levels), or `optimizer` itself when it wraps none.
    """
    seen = 0
    while seen < 8:
        inner = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            return optimizer
        optimizer = inner
        seen += 1
    return optimizer


def loggable(diagnostics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The tuner's diagnostics as numbers to log.

    Args:
        diagnostics: the tuner's diagnostics.
        prefix: prepended to each name (e.g. `"eos/"`).

    Returns:
        `{prefix + name: float}`, leaving out `step` and `route`, strings, booleans, values that are not numbers
        and values not measured on this step (NaN: the law reports NaN for a measurement it did not make).
    """
    out: dict[str, float] = {}
    for key, value in diagnostics.items():
        if key in _NOT_LOGGED or isinstance(value, str | bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[prefix + key] = number
    return out


class UnwrittenDiagnostics:
    """The diagnostics of the steps since the trainer last wrote its logs, merged for the next write.

    Trainers write logs every few steps (Lightning's `log_every_n_steps`, the HF Trainer's
    `logging_steps`, 50 and 500 by default) while the tuner measures some values only every few steps
    (`sharpness_every`, `probe_every`). Logging only the last step's values would lose every
    measurement made between two writes (a sharpness tracked every 100 steps would never reach a logger
    that writes at steps 50, 100, ... one step later). So each write gets, per name, the latest value
    measured since the previous write; `skipped` and `fallback` are summed (the number of such steps
    since the previous write) and the monitor's warning `unstable` is the largest since then (1 when the run
    was beyond the edge of stability at any step of the window). When the trainer writes at every step this is
    exactly that step's values.
    """

    COUNTED = ("skipped", "fallback")
    LARGEST = ("unstable",)

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def add(self, diagnostics: Mapping[str, Any]) -> None:
        """Merge one step's diagnostics into the values of the next write."""
        values = loggable(diagnostics, "")
        for name in self.COUNTED:
            if name in values:
                values[name] += self.values.get(name, 0.0)
        for name in self.LARGEST:
            if name in values and name in self.values:
                values[name] = max(values[name], self.values[name])
        self.values.update(values)

    def clear(self) -> None:
        """Forget the merged values (after the trainer wrote them)."""
        self.values = {}


def replay_rng(state: Mapping[str, Any]) -> None:
    """Set torch's random state to one captured by `capture_rng`.

    Probes run inside the tuner's `fork_rng`, so the training's own random stream is untouched.

    Args:
        state: `{"cpu": ..., "cuda": {device: ...}}` as `capture_rng` returns it.
    """
    torch.set_rng_state(state["cpu"])
    for device, cuda_state in state.get("cuda", {}).items():
        torch.cuda.set_rng_state(cuda_state, device)


def sum_losses(losses: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of the micro-batch losses of a step.

    Args:
        losses: the losses (tensors with their graphs).

    Returns:
        Their sum, with its graph.

    Raises:
        RuntimeError: `losses` is empty (no batch was recorded for the step).
    """
    total: torch.Tensor | None = None
    for loss in losses:
        total = loss if total is None else total + loss
    if total is None:
        raise RuntimeError("eos_core: no batch was recorded for this step's curvature probe")
    return total


@contextlib.contextmanager
def probing(callback: Any) -> Iterator[None]:
    """Set `callback.probing` while a probe re-runs the user's loss, so side effects can be guarded by it.

    Args:
        callback: the callback whose `probing` attribute is set.

    Yields:
        None, once, with `callback.probing` True (False again afterwards, also on an error).
    """
    callback.probing = True
    try:
        yield
    finally:
        callback.probing = False
