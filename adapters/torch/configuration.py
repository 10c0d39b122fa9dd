"""What a ``CurvatureTuner`` is built from, checked once: its settings, the law's request, the law's fit with
the optimizer."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from eos_core import _validation as check
from eos_core import stats as S
from eos_core.adapters.torch import optimizers as opt_info
from eos_core.laws.base import Law
from eos_core.laws.dcao import DCAO
from eos_core.request import StatsRequest
from eos_core.settings import DEPRECATED, TunerSettings

OWNER = "CurvatureTuner"
PRECONDITIONED_NEEDS = frozenset({S.PRECONDITIONED_SHARPNESS, S.PRECONDITIONED_TOP_EIGENVALUES})


def settings_from(settings: TunerSettings | None, options: Mapping[str, Any]) -> tuple[TunerSettings, int | None]:
    """The validated settings (``options`` override ``settings``) and the deprecated ``lanczos_steps``.

    Raises:
        ValueError: an unknown or invalid option, or ``settings`` that is not a ``TunerSettings``.
    """
    options = dict(options)
    lanczos_steps = options.pop("lanczos_steps", None)
    if lanczos_steps is not None:
        lanczos_steps = check.positive_int(OWNER, "lanczos_steps", lanczos_steps)
        warnings.warn(f"{OWNER}: lanczos_steps= is deprecated: set it on the law, DCAO(lanczos_steps=...) (the "
                      "tuner's value is used only while the law leaves lanczos_steps unset)", DeprecationWarning,
                      stacklevel=3)
    if settings is None:
        return TunerSettings.from_options(OWNER, options, stacklevel=4), lanczos_steps
    if not isinstance(settings, TunerSettings):
        raise ValueError(f"{OWNER}: settings must be an eos_core.settings.TunerSettings, got {settings!r}")
    base = settings.as_dict()
    for old, new in DEPRECATED.items():
        if old in options:  # the deprecated name overrides the settings' value of the new one
            base.pop(new)
    return TunerSettings.from_options(OWNER, {**base, **options}, stacklevel=4), lanczos_steps


def request_for(law: Law | None, lanczos_steps: int | None) -> StatsRequest:
    """``law.request()`` (nothing for ``law=None``), with the deprecated tuner option ``lanczos_steps`` applied
    to a DCAO law that leaves its own unset."""
    if law is None:
        return StatsRequest()
    request = law.request()
    if lanczos_steps is not None and isinstance(law, DCAO) and law.lanczos_steps is None:
        request = request._replace(lanczos_steps=max(lanczos_steps, request.num_eigenvalues))
    return request


def check_model_holds(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None) -> None:
    """The optimizer steps (some of) the model's parameters.

    Raises:
        ValueError: ``model`` holds none of the optimizer's parameters: the wrong model, or an optimizer over
            copies of them (DeepSpeed ZeRO steps a flat partition of the parameters, which the tuner cannot read).
    """
    if model is None or not isinstance(model, torch.nn.Module):
        return
    own = {id(p) for p in model.parameters()}
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    if stepped and own and not any(id(p) in own for p in stepped):
        raise ValueError(
            f"{OWNER}: the model holds none of the optimizer's parameters: pass the model whose parameters the "
            "optimizer steps. (An optimizer over flat partitions of them, as DeepSpeed ZeRO's, is not supported.)"
        )


def check_law_fits(optimizer: torch.optim.Optimizer, law: Law | None, request: StatsRequest) -> None:
    """The optimizer has what the law decides (DCAO's knobs) and what it measures (a preconditioner).

    Raises:
        ValueError: a knob or a preconditioner the optimizer lacks.
    """
    if law is None:
        return
    if law.decides:
        opt_info.check_knobs(optimizer, law.decides)
    if request.needs & PRECONDITIONED_NEEDS and not isinstance(optimizer, opt_info.PRECONDITIONED):
        raise ValueError(
            f"{OWNER}: {type(law).__name__}(preconditioned=True) needs an adaptive optimizer with a diagonal "
            f"preconditioner (Adam, AdamW, RMSprop, Adagrad), got {type(optimizer).__name__}"
        )
