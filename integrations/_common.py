"""What the Lightning and Hugging Face callbacks share: settings, tuner creation, random-state replay, logging keys.

Not public. Imports torch and the PyTorch adapter, so only the framework integrations import it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from eos_core import _validation as check
from eos_core import routes
from eos_core.adapters.torch import STATE_KEY, CurvatureTuner
from eos_core.adapters.torch.objective import capture_rng
from eos_core.laws.base import Law

__all__ = ["STATE_KEY", "TunerSettings", "UnwrittenDiagnostics", "capture_rng", "loggable", "probing", "replay_rng",
           "unwrap_optimizer"]

#: Diagnostics that are not logged as numbers: the step index (the trainers log their own) and the route (a name).
_NOT_LOGGED = ("step", "route")


class TunerSettings:
    """The :class:`CurvatureTuner` settings a callback forwards, checked when the callback is built.

    Checking at construction (not when training starts) makes a bad setting fail in the line that
    wrote it, with the ValueError naming the setting, as every eos_core constructor does.
    """

    def __init__(self, owner: str, law: Law | None, *, probe_every: int, sharpness_every: int | None, route: str,
                 lr_mode: str, options: Mapping[str, Any]) -> None:
        if law is not None and not isinstance(law, Law):
            raise ValueError(f"{owner}: law must be an eos_core law (e.g. CDAT(scale=2.0)) or None to only "
                             f"measure, got {law!r}")
        check.positive_int(owner, "probe_every", probe_every)
        if sharpness_every is not None:
            check.positive_int(owner, "sharpness_every", sharpness_every)
        routes.validate_route(route, owner=owner)
        if lr_mode not in ("override", "multiply"):
            raise ValueError(f"{owner}: lr_mode must be 'override' or 'multiply', got {lr_mode!r}")
        reserved = {"optimizer", "model", "grad_scaler", "reference_lr"} & set(options)
        if reserved:
            raise ValueError(f"{owner}: {', '.join(sorted(reserved))} is set by the callback itself")
        self.owner = owner
        self.law = law
        self.kwargs: dict[str, Any] = dict(probe_every=probe_every, sharpness_every=sharpness_every, route=route,
                                           lr_mode=lr_mode, **options)

    def make_tuner(self, optimizer: torch.optim.Optimizer, *, model: torch.nn.Module | None,
                   grad_scaler: Any | None, clipped_gradients: bool, hint: str) -> CurvatureTuner:
        """Attach a tuner to ``optimizer``; the tuner's own ValueErrors get the callback's name and ``hint``.

        ``reference_lr`` is the scheduler's base lr (the group's ``initial_lr``, set by every torch
        scheduler) so that ``lr_mode="multiply"`` applies the schedule's factor even when it does not
        start at 1 (a warm-up from 0): both trainers create the scheduler before the callback attaches.
        ``clipped_gradients``: the trainer clips the gradient before the step, so finite-difference
        curvature must not reuse the step's gradient as g(w) (the user's ``clipped_gradients=True``
        option, for clipping the trainer does not know about, is kept).
        """
        group = optimizer.param_groups[0]
        base = group.get("initial_lr", group["lr"])
        reference = float(base) if isinstance(base, int | float) and base > 0 else None
        kwargs = dict(self.kwargs)
        kwargs["clipped_gradients"] = bool(clipped_gradients or kwargs.get("clipped_gradients", False))
        try:
            return CurvatureTuner(optimizer, self.law, model=model, grad_scaler=grad_scaler, reference_lr=reference,
                                  **kwargs)
        except ValueError as error:
            raise ValueError(f"{self.owner}: {error}. {hint}") from error

    @property
    def needs(self) -> frozenset[str]:
        return self.law.needs if self.law is not None else frozenset()


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a trainer's wrappers (Lightning's ``LightningOptimizer``, accelerate's
    ``AcceleratedOptimizer``): the tuner must hook the optimizer whose ``step`` updates the parameters."""
    seen = 0
    while seen < 8:
        inner = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            return optimizer
        optimizer = inner
        seen += 1
    return optimizer


def loggable(diagnostics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The tuner's diagnostics as ``{prefix + name: float}``, leaving out names, step indices and values that
    were not measured on this step (NaN: the law reports NaN for a measurement it did not make)."""
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

    Trainers write logs every few steps (Lightning's ``log_every_n_steps``, the HF Trainer's
    ``logging_steps``, 50 and 500 by default) while the tuner measures some values only every few steps
    (``sharpness_every``, ``probe_every``). Logging only the last step's values would lose every
    measurement made between two writes (a sharpness tracked every 100 steps would never reach a logger
    that writes at steps 50, 100, ... one step later). So each write gets, per name, the latest value
    measured since the previous write; ``skipped`` and ``fallback`` are summed (the number of such steps
    since the previous write). When the trainer writes at every step this is exactly that step's values.
    """

    COUNTED = ("skipped", "fallback")

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def add(self, diagnostics: Mapping[str, Any]) -> None:
        values = loggable(diagnostics, "")
        for name in self.COUNTED:
            if name in values:
                values[name] += self.values.get(name, 0.0)
        self.values.update(values)

    def clear(self) -> None:
        self.values = {}


def replay_rng(state: Mapping[str, Any]) -> None:
    """Set the random state captured by :func:`capture_rng` (probes run inside the tuner's ``fork_rng``, so the
    training's own random stream is untouched)."""
    torch.set_rng_state(state["cpu"])
    for device, cuda_state in state.get("cuda", {}).items():
        torch.cuda.set_rng_state(cuda_state, device)


def sum_losses(losses: Iterable[torch.Tensor]) -> torch.Tensor:
    total: torch.Tensor | None = None
    for loss in losses:
        total = loss if total is None else total + loss
    if total is None:
        raise RuntimeError("eos_core: no batch was recorded for this step's curvature probe")
    return total


@contextlib.contextmanager
def probing(callback: Any) -> Iterator[None]:
    """Set ``callback.probing`` while a probe re-runs the user's loss, so side effects can be guarded by it."""
    callback.probing = True
    try:
        yield
    finally:
        callback.probing = False
