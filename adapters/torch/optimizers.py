"""What the tuner needs to know about a torch optimizer: its step's linearity in lr, knobs, preconditioner, edge.

Whether its step is linear in lr (the tuner reads the update `u` off a step taken with a known lr), which knobs
DCAO may turn (momentum, weight decay), what its diagonal preconditioner `P` is (for the preconditioned
sharpness, the largest eigenvalue of `P^{-1/2} H P^{-1/2}`) and where its edge of stability lies.
"""

from __future__ import annotations

from typing import Any

import torch

from eos_core import monitor as monitor_rules

#: Optimizers whose step is exactly linear in the learning rate (their state updates do not depend
#: on it): the step for lr = eta is eta times the step for lr = 1.
LINEAR_IN_LR = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
)

#: Optimizers whose preconditioner P (update = -P^{-1} m) the tuner can read, for preconditioned sharpness.
PRECONDITIONED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad)


def check_supported(optimizer: torch.optim.Optimizer, *, linear_in_lr: bool | None) -> None:
    """Check that the tuner can drive `optimizer`; the error says what to do instead.

    Args:
        optimizer: the optimizer to wrap.
        linear_in_lr: the `linear_in_lr` option: None (trust the known list `LINEAR_IN_LR`), True (the user
            vouches that the step is linear in lr), False (it is not).

    Raises:
        ValueError: not a `torch.optim.Optimizer`; a param group with `maximize=True`; an optimizer outside
            `LINEAR_IN_LR` with `linear_in_lr=None`; `linear_in_lr=False`.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"CurvatureTuner wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if any(group.get("maximize", False) for group in optimizer.param_groups):
        raise ValueError("CurvatureTuner minimises: the optimizer has maximize=True; negate the loss instead")
    if linear_in_lr is None and not isinstance(optimizer, LINEAR_IN_LR):
        supported = ", ".join(cls.__name__ for cls in LINEAR_IN_LR)
        raise ValueError(
            f"CurvatureTuner needs an optimizer whose step is linear in the learning rate ({supported}); "
            f"{type(optimizer).__name__} is not known to be. If its step is lr times a direction that does "
            "not depend on lr, pass linear_in_lr=True."
        )
    if linear_in_lr is False:
        raise ValueError("CurvatureTuner cannot drive an optimizer whose step is not linear in the learning rate")


def momentum_key(group: dict[str, Any]) -> str | None:
    """The param-group setting that holds the momentum.

    Args:
        group: a param group.

    Returns:
        `"betas"` (Adam-style: the momentum is `betas[0]`), `"momentum"` (SGD, RMSprop), or None when the group
        has neither.
    """
    if "betas" in group:
        return "betas"
    if "momentum" in group:
        return "momentum"
    return None


def _read(group: dict[str, Any], name: str) -> float | None:
    """A group's `momentum` (its `betas[0]` for Adam-style optimizers) or `weight_decay`; None if absent."""
    if name == "momentum":
        key = momentum_key(group)
        if key is None:
            return None
        return float(group["betas"][0]) if key == "betas" else float(group["momentum"])
    return float(group[name]) if name in group else None


def _reference_group(optimizer: torch.optim.Optimizer, name: str) -> int:
    """The group whose setting a law tracks: the first with a non-zero value (else the first group).

    Laws such as DCAO change momentum and weight decay multiplicatively, so a setting that starts at
    0 stays 0; reading it from a no-decay group (biases, norms) listed first would switch weight
    decay off everywhere.

    Returns:
        The index of that group in `optimizer.param_groups`.
    """
    for index, group in enumerate(optimizer.param_groups):
        value = _read(group, name)
        if value is not None and value != 0.0:
            return index
    return 0


def read_hyperparams(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The momentum and weight decay a law starts from.

    Each is read from its reference group: the first param group where it is non-zero (else the first group), so
    a no-decay group listed first does not set the law's weight decay to 0.

    Args:
        optimizer: the wrapped optimizer.

    Returns:
        `{"momentum": ..., "weight_decay": ...}`, with only the settings the optimizer has (momentum: `betas[0]`
        for Adam-style optimizers).
    """
    out: dict[str, float] = {}
    for name in ("momentum", "weight_decay"):
        value = _read(optimizer.param_groups[_reference_group(optimizer, name)], name)
        if value is not None:
            out[name] = value
    return out


def hyperparam_ratios(optimizer: torch.optim.Optimizer) -> dict[str, list[float]]:
    """Each group's momentum and weight decay relative to the reference group's.

    `write_hyperparams` sets a group's value to `law value * ratio`, so per-group settings keep
    their proportions the way per-group learning rates keep theirs (a no-decay group stays at 0).

    Args:
        optimizer: the wrapped optimizer.

    Returns:
        For each of `"momentum"` and `"weight_decay"` that the optimizer has, one ratio per param group: the
        group's value over the reference group's (the first non-zero one); 0 for a group without the setting;
        1 for every group that has it when it is 0 in all of them.
    """
    out: dict[str, list[float]] = {}
    for name in ("momentum", "weight_decay"):
        reference = _read(optimizer.param_groups[_reference_group(optimizer, name)], name)
        if reference is None:
            continue
        ratios = []
        for group in optimizer.param_groups:
            value = _read(group, name)
            ratios.append(1.0 if reference == 0.0 and value is not None
                          else 0.0 if value is None else value / reference)
        out[name] = ratios
    return out


def check_knobs(optimizer: torch.optim.Optimizer, names: tuple[str, ...]) -> None:
    """Check that the optimizer has the settings a law decides (read from its first param group).

    Args:
        optimizer: the wrapped optimizer.
        names: the settings the law decides (`law.decides`: `"momentum"`, `"weight_decay"`).

    Raises:
        ValueError: the first param group has no such setting (momentum: neither `momentum` nor `betas`).
    """
    group = optimizer.param_groups[0]
    for name in names:
        has = momentum_key(group) is not None if name == "momentum" else name in group
        if not has:
            raise ValueError(
                f"the law decides {name!r}, but {type(optimizer).__name__} has no {name} setting; "
                "use an optimizer that has one (SGD with momentum, Adam, AdamW, RMSprop)"
            )


def write_hyperparams(optimizer: torch.optim.Optimizer, values: dict[str, float],
                      ratios: dict[str, list[float]] | None = None, *, momentum_max: float = 0.999999) -> None:
    """Apply a law's momentum / weight-decay decisions: group g gets `value * ratios[name][g]`.

    Without `ratios` every group gets the law's value. A group's momentum stays at most
    `max(law value, momentum_max)` (a group whose momentum was above the reference group's could
    otherwise reach 1). Groups added after the ratios were taken get the law's value. Names other than
    `momentum` and `weight_decay` are ignored, and so is a setting a group does not have.

    Args:
        optimizer: the wrapped optimizer (its param groups are changed in place).
        values: the law's decisions by name.
        ratios: per-group proportions from `hyperparam_ratios` (None: 1 for every group).
        momentum_max: the cap on a group's momentum, unless the law's own value is higher.
    """
    ratios = ratios or {}
    for index, group in enumerate(optimizer.param_groups):
        for name, value in values.items():
            if name not in ("momentum", "weight_decay"):
                continue
            group_ratios = ratios.get(name, [])
            ratio = group_ratios[index] if index < len(group_ratios) else 1.0
            target = float(value) * ratio
            if name == "momentum":
                key = momentum_key(group)
                target = min(target, max(float(value), momentum_max))
                if key == "betas":
                    group["betas"] = (target, group["betas"][1])
                elif key == "momentum":
                    group["momentum"] = target
            elif "weight_decay" in group:
                group["weight_decay"] = target


def preconditioner(optimizer: torch.optim.Optimizer, params_by_group: list[list[torch.Tensor]],
                   lr_ratios: list[float]) -> list[torch.Tensor] | None:
    """The diagonal preconditioner `P` with update direction `u = -P^{-1} m` (`m` the first moment), per parameter.

    Adam/AdamW: `P = (1 - beta1^t) (sqrt(v_t / (1 - beta2^t)) + eps)` (with AMSGrad's max of v);
    RMSprop: `sqrt(v) + eps` (centred: `sqrt(v - g_avg^2) + eps`); Adagrad:
    `(sqrt(sum) + eps) (1 + (t - 1) lr_decay)`. A param group whose lr is `ratio` times the
    first group's has `P / ratio`, so the operator matches the dynamics. Parameters the optimizer
    has not stepped yet (no state) get `P = inf`: they drop out of the preconditioned operator, and so do the
    parameters of a group whose ratio is 0.

    Args:
        optimizer: the wrapped optimizer (its state as the last step left it).
        params_by_group: the trainable parameters of each param group.
        lr_ratios: each group's lr over the first group's.

    Returns:
        One tensor per parameter, shaped like it, in the order of `params_by_group`; None for an optimizer
        without a diagonal preconditioner (not one of `PRECONDITIONED`).
    """
    if not isinstance(optimizer, PRECONDITIONED):
        return None
    out: list[torch.Tensor] = []
    for group, params, ratio in zip(optimizer.param_groups, params_by_group, lr_ratios, strict=True):
        for p in params:
            state = optimizer.state.get(p)
            if not state:
                out.append(torch.full_like(p, float("inf")))
                continue
            step = float(state["step"])
            if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
                beta1, beta2 = group["betas"]
                second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
                denom = (second / (1 - beta2**step)).sqrt() + group["eps"]
                p_diag = denom * (1 - beta1**step)
            elif isinstance(optimizer, torch.optim.RMSprop):
                second = state["square_avg"]
                if group.get("centered"):
                    second = second - state["grad_avg"] ** 2
                p_diag = second.sqrt() + group["eps"]
            else:  # Adagrad
                p_diag = (state["sum"].sqrt() + group["eps"]) * (1 + (step - 1) * group.get("lr_decay", 0.0))
            out.append(p_diag / ratio if ratio > 0 else torch.full_like(p_diag, float("inf")))
    return out


def edge(optimizer: torch.optim.Optimizer) -> tuple[float, bool]:
    """The edge of stability of `optimizer`'s first param group, the bound on lr x sharpness.

    SGD: `2 (1 + momentum) / (1 - dampening)` ([`heavy_ball_edge`][eos_core.monitor.heavy_ball_edge]; dampening
    counts only with momentum), Nesterov `2 (1 + momentum) / (1 + 2 momentum)`
    ([`nesterov_edge`][eos_core.monitor.nesterov_edge]); Adam / AdamW: `2 (1 + beta1) / (1 - beta1)` on
    `P^{-1/2} H P^{-1/2}` ([`adam_edge`][eos_core.monitor.adam_edge]; Cohen et al. 2022, "Adaptive gradient methods
    at the edge of stability"); RMSprop: `2 (1 + momentum)` on it (its momentum buffer accumulates `g / P`
    undamped); Adagrad: 2 on it. Other optimizers (Adamax, NAdam, RAdam, Adadelta, custom ones): NaN (give
    `monitor_edge`). Weight decay adds `weight_decay` to every eigenvalue and is left out.

    Args:
        optimizer: the wrapped optimizer.

    Returns:
        `(edge, preconditioned)`: the edge (NaN when not known) and whether it bounds lr times the
        preconditioned sharpness (True) rather than lr times the sharpness of H (False).
    """
    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.SGD):
        momentum, dampening = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
        if group.get("nesterov"):
            return monitor_rules.nesterov_edge(momentum), False
        return monitor_rules.heavy_ball_edge(momentum, dampening if momentum > 0 else 0.0), False
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return monitor_rules.adam_edge(float(group["betas"][0])), True
    if isinstance(optimizer, torch.optim.RMSprop):
        return monitor_rules.heavy_ball_edge(float(group.get("momentum", 0.0))), True
    if isinstance(optimizer, torch.optim.Adagrad):
        return 2.0, True
    return float("nan"), isinstance(optimizer, PRECONDITIONED)
