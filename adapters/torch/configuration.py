"""What a `CurvatureTuner` is built from, checked once: its settings, the law's request, the law's fit.

The settings are validated by [`TunerSettings`][eos_core.settings.TunerSettings]; the law's request
([`StatsRequest`][eos_core.request.StatsRequest]) says what the tuner measures; the law must fit the optimizer
(the knobs it decides, a preconditioner for a preconditioned law) and the model must hold the optimizer's
parameters.
"""

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
    """The validated settings (`options` override `settings`) and the deprecated `lanczos_steps`.

    A deprecated option name in `options` (`power_iters`, `power_tol`, `initial_lr`) overrides the value of its
    new name in `settings`. `lanczos_steps` warns with a DeprecationWarning (set it on the law instead).

    Args:
        settings: settings to start from (None: the defaults).
        options: the tuner's keyword options, `lanczos_steps` included.

    Returns:
        `(settings, lanczos_steps)`: the checked settings, and the deprecated option's value (None when not
        given).

    Raises:
        ValueError: an unknown or invalid option, or `settings` that is not a `TunerSettings`.
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
    """What the tuner measures for `law`: `law.request()`, with the deprecated tuner option `lanczos_steps` applied.

    Args:
        law: the tuning law, or None (measuring only).
        lanczos_steps: the deprecated tuner option (None: not given). It applies to a DCAO law that leaves its own
            `lanczos_steps` unset, raised to at least the number of eigenvalues the law asks for.

    Returns:
        The law's request; an empty `StatsRequest` (nothing to measure) for `law=None`.
    """
    if law is None:
        return StatsRequest()
    request = law.request()
    if lanczos_steps is not None and isinstance(law, DCAO) and law.lanczos_steps is None:
        request = request._replace(lanczos_steps=max(lanczos_steps, request.num_eigenvalues))
    return request


def check_model_holds(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None) -> None:
    """Check that the optimizer steps (some of) the model's parameters.

    Nothing is checked when `model` is None or not a `torch.nn.Module`, or when either side has no parameters.

    Args:
        optimizer: the wrapped optimizer.
        model: the model given to the tuner.

    Raises:
        ValueError: `model` holds none of the optimizer's parameters: the wrong model, or an optimizer over
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
    """Check that the optimizer has what the law decides (DCAO's knobs) and what it measures (a preconditioner).

    Args:
        optimizer: the wrapped optimizer.
        law: the tuning law (None: nothing to check).
        request: the law's request (its `needs`).

    Raises:
        ValueError: the law decides `momentum` or `weight_decay` and the optimizer has no such setting, or it
            measures the preconditioned sharpness or eigenvalues and the optimizer is not one with a diagonal
            preconditioner (Adam, AdamW, RMSprop, Adagrad).
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
