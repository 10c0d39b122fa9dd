"""What the tuner needs to know about a torch optimizer: is its step linear in lr, which knobs DCAO may
turn, and what is its diagonal preconditioner."""

from __future__ import annotations

from typing import Any

import torch

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
    """Raise ValueError for an optimizer the tuner cannot drive, saying what to do instead."""
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
    """The param-group setting that holds the momentum (SGD/RMSprop ``momentum``, Adam ``betas[0]``)."""
    if "betas" in group:
        return "betas"
    if "momentum" in group:
        return "momentum"
    return None


def read_hyperparams(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    group = optimizer.param_groups[0]
    out: dict[str, float] = {}
    key = momentum_key(group)
    if key == "betas":
        out["momentum"] = float(group["betas"][0])
    elif key == "momentum":
        out["momentum"] = float(group["momentum"])
    if "weight_decay" in group:
        out["weight_decay"] = float(group["weight_decay"])
    return out


def check_knobs(optimizer: torch.optim.Optimizer, names: tuple[str, ...]) -> None:
    """A law that decides ``momentum`` / ``weight_decay`` needs the optimizer to have them."""
    group = optimizer.param_groups[0]
    for name in names:
        has = momentum_key(group) is not None if name == "momentum" else name in group
        if not has:
            raise ValueError(
                f"the law decides {name!r}, but {type(optimizer).__name__} has no {name} setting; "
                "use an optimizer that has one (SGD with momentum, Adam, AdamW, RMSprop)"
            )


def write_hyperparams(optimizer: torch.optim.Optimizer, values: dict[str, float]) -> None:
    """Apply a law's momentum / weight-decay decisions to every param group."""
    for group in optimizer.param_groups:
        if "momentum" in values:
            key = momentum_key(group)
            if key == "betas":
                group["betas"] = (float(values["momentum"]), group["betas"][1])
            elif key == "momentum":
                group["momentum"] = float(values["momentum"])
        if "weight_decay" in values and "weight_decay" in group:
            group["weight_decay"] = float(values["weight_decay"])


def preconditioner(optimizer: torch.optim.Optimizer, params_by_group: list[list[torch.Tensor]],
                   lr_ratios: list[float]) -> list[torch.Tensor] | None:
    """The diagonal P with update direction u = -P^{-1} (first moment), per parameter, or None.

    Adam/AdamW: ``P = (1 - beta1^t) (sqrt(v_t / (1 - beta2^t)) + eps)`` (with AMSGrad's max of v);
    RMSprop: ``sqrt(v) + eps`` (centred: ``sqrt(v - g_avg^2) + eps``); Adagrad:
    ``(sqrt(sum) + eps) (1 + (t - 1) lr_decay)``. A param group whose lr is ``ratio`` times the
    first group's has ``P / ratio``, so the operator matches the dynamics. Parameters the optimizer
    has not stepped yet (no state) get ``P = inf``: they drop out of the preconditioned operator.
    Returns None for optimizers without a diagonal preconditioner.
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
