r"""What the tuner needs from a Keras optimizer: its update direction $u$ for learning rate 1.

Notation of the CDAT paper (Roulet et al. 2024, section 3, eq. 8): $w_{t+1} = w_t + \eta_t u_t$, $u$ the base
optimizer's update **for learning rate 1**. The tuner sets the wrapped optimizer's `learning_rate` to 1 and obtains
$u$ by running the optimizer's own update (`_backend_apply_gradients`: gradient clipping, then `update_step` for
every variable; `apply_update`) on variables whose value is 0, so that $0 + u$ is read off exactly, without the
cancellation of $(w + u) - w$:

* the optimizers accepted here ([`SUPPORTED_OPTIMIZERS`][eos_core.adapters.keras.SUPPORTED_OPTIMIZERS]) never read
  the variable's value in `update_step` (they only `assign_add` to it), so the update computed at 0 is the update
  at $w$;
* decoupled weight decay (`weight_decay=` on any Keras optimizer, AdamW's default 0.004) is the one term that
  depends on $w$: Keras applies $w \leftarrow w - \text{lr} \cdot \text{wd} \cdot w$ before the update, so for
  lr = 1 it contributes $-\text{wd} \cdot w$ to $u$ (for the variables `exclude_from_weight_decay` does not
  exclude), which the tuner adds itself;
* variable constraints (`kernel_constraint=...`) are applied to $w + \eta u$, after the step, as Keras applies them
  after its own update.

The optimizer's state (momentum, second moments, its iteration count) advances exactly as in a plain Keras step
with learning rate 1, so with a constant learning rate $\eta$ the tuned run is the plain run at learning rate
$\eta$: for SGD with momentum Keras keeps $m \leftarrow \mu m - \text{lr}\, g$ and $w \leftarrow w + m$, i.e.
$m = \eta m_1$ where $m_1 \leftarrow \mu m_1 - g$ is the state at lr = 1, and $u = m_1$ is the heavy-ball direction
(the same as `torch.optim.SGD`'s and `optax.sgd`'s with momentum). For Adam,
$u = -\frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t} \frac{m}{\sqrt{v} + \epsilon}$.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from eos_core import monitor as monitor_rules

#: Keras optimizers whose `update_step` is `w += lr * (direction independent of w and lr)`.
SUPPORTED: tuple[type, ...] = (
    keras.optimizers.SGD,
    keras.optimizers.Adam,
    keras.optimizers.AdamW,
    keras.optimizers.RMSprop,
    keras.optimizers.Adagrad,
    keras.optimizers.Adamax,
    keras.optimizers.Nadam,
    keras.optimizers.Adadelta,
    keras.optimizers.Lion,
)


def check_supported(owner: str, optimizer: Any, *, measuring: bool = False) -> None:
    """Check that the tuner can take the update direction $u$ from `optimizer`; raise, naming the setting, if not.

    Args:
        owner: the class named in the messages.
        optimizer: the Keras optimizer to wrap.
        measuring: the tuner only measures (`law=None`): the optimizer keeps its own learning rate, which may
            then be a `LearningRateSchedule`, and may have stepped already (its update is applied unchanged).
            With a law the learning rate must be a number and the optimizer must not have stepped (built on the
            model's variables by `fit` before any step is fine: its state is still zero).

    Raises:
        ValueError: a `LossScaleOptimizer`, an optimizer outside
            [`SUPPORTED`][eos_core.adapters.keras.optimizers.SUPPORTED], a schedule as the learning rate of a tuned
            optimizer, `use_ema`, `gradient_accumulation_steps`, `loss_scale_factor`, or a tuned optimizer that has
            stepped.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            f"{owner}: optimizer must be a plain Keras optimizer, got a LossScaleOptimizer; wrap the tuner instead "
            "(keras.optimizers.LossScaleOptimizer(CurvatureTuner(...)), which model.compile does by itself under "
            "the mixed_float16 policy)")
    if not isinstance(optimizer, SUPPORTED):
        names = ", ".join(cls.__name__ for cls in SUPPORTED)
        raise ValueError(
            f"{owner}: optimizer must be one of the Keras optimizers {names} (their update does not depend on the "
            f"weights, so the update for learning rate 1 is well defined), got {type(optimizer).__name__}")
    lr = optimizer._learning_rate
    if not measuring and not is_variable(lr):
        raise ValueError(
            f"{owner}: the optimizer's learning_rate must be a number (the law decides the learning rate; it "
            f"starts from this one), got {type(lr).__name__}. For a schedule use the WarmupCosine / Constant laws, "
            "or law=None to only measure.")
    for name, bad in (("use_ema", bool(optimizer.use_ema)),
                      ("gradient_accumulation_steps", bool(optimizer.gradient_accumulation_steps)),
                      ("loss_scale_factor", optimizer.loss_scale_factor is not None)):
        if bad:
            raise ValueError(f"{owner}: the optimizer's {name} is not supported (got {getattr(optimizer, name)!r}); "
                             "create the optimizer without it")
    if not measuring and optimizer.built and int(np.asarray(optimizer.iterations.numpy())) > 0:
        raise ValueError(f"{owner}: the optimizer has already stepped (its state holds the steps of another "
                         "learning rate); pass a freshly created optimizer")


def is_variable(value: Any) -> bool:
    """Whether `value` is a Keras variable (a learning rate given as a number is stored as one).

    `keras.Variable` is the variables' class in recent Keras 3 releases (3.15 is tested); Keras 3.5 exports another
    class under that name and creates the backend's own (`keras.src.backend.Variable`), which is checked too.

    Args:
        value: anything, e.g. an optimizer's `_learning_rate` (a variable, a schedule or a callable).

    Returns:
        True for a Keras variable of the active backend.
    """
    if isinstance(value, keras.Variable):
        return True
    backend_variable = getattr(getattr(getattr(keras, "src", None), "backend", None), "Variable", None)
    return isinstance(backend_variable, type) and isinstance(value, backend_variable)


def current_lr(optimizer: Any) -> float:
    """The learning rate `optimizer` applies at its next step.

    Args:
        optimizer: a Keras optimizer.

    Returns:
        Its `learning_rate` as a Python float: the number, or a `LearningRateSchedule` evaluated at its
        `iterations`.
    """
    return float(np.asarray(keras.ops.convert_to_numpy(optimizer.learning_rate)))


def edge(optimizer: Any) -> tuple[float, bool]:
    r"""The edge of stability of `optimizer` for the sharpness monitor's warning.

    The edge bounds lr x $\lambda_{\max}$ of $H$, or of the preconditioned Hessian $P^{-1/2} H P^{-1/2}$ for the
    adaptive optimizers:

    * `SGD` (Keras: `m <- mu m - lr g`, `w <- w + m`): heavy-ball momentum without dampening,
      $\text{lr}\,\lambda < 2 (1 + \mu)$ ([`eos_core.monitor.heavy_ball_edge`][]); with `nesterov=True`
      ($w \leftarrow w + \mu m - \text{lr}\,g$) $2 (1 + \mu) / (1 + 2 \mu)$
      ([`eos_core.monitor.nesterov_edge`][]).
    * `Adam` / `AdamW`: $2 (1 + \beta_1) / (1 - \beta_1)$ on the preconditioned sharpness (Cohen et al. 2022,
      "Adaptive gradient methods at the edge of stability"; [`eos_core.monitor.adam_edge`][]).
    * `RMSprop` without momentum: 2 on the preconditioned sharpness.
    * Any other optimizer (RMSprop with momentum, Adagrad, Adamax, Nadam, Adadelta, Lion): NaN, not known (give
      `monitor_edge`; it then bounds lr x lambda_max of H).

    Decoupled weight decay shifts every eigenvalue by `weight_decay` and is left out, as in the other adapters.

    Args:
        optimizer: a Keras optimizer.

    Returns:
        `(edge, preconditioned)`: the edge (NaN when not known) and whether it bounds the preconditioned
        sharpness rather than that of $H$.
    """
    if isinstance(optimizer, keras.optimizers.SGD):
        momentum = float(optimizer.momentum)
        if optimizer.nesterov:
            return monitor_rules.nesterov_edge(momentum), False
        return monitor_rules.heavy_ball_edge(momentum), False
    if isinstance(optimizer, keras.optimizers.Adam):  # AdamW too
        return monitor_rules.adam_edge(float(optimizer.beta_1)), True
    if isinstance(optimizer, keras.optimizers.RMSprop) and float(optimizer.momentum) == 0.0:
        return monitor_rules.heavy_ball_edge(0.0), True
    return math.nan, False


def decay_rates(optimizer: Any, variables: Sequence[Any]) -> list[float]:
    """The decoupled weight decay rate of each variable.

    Args:
        optimizer: a Keras optimizer.
        variables: the variables it updates.

    Returns:
        One float per variable: the optimizer's `weight_decay`, or 0 where it has none or excludes the variable
        (`exclude_from_weight_decay`).
    """
    wd = optimizer.weight_decay
    if wd is None or float(wd) == 0.0:
        return [0.0] * len(variables)
    return [float(wd) if optimizer._use_weight_decay(v) else 0.0 for v in variables]


def apply_update(optimizer: Any, grads: Sequence[Any], variables: Sequence[Any]) -> None:
    """One update of `optimizer` on `variables` (its `_backend_apply_gradients`), counted as exactly one step.

    `_backend_apply_gradients` is the part of `optimizer.apply` that clips the gradients, applies weight decay
    and runs `update_step` on every variable. Whether it also advances `optimizer.iterations` depends on the
    Keras release: 3.5 increments the count inside it, later releases (3.15) in `apply` after it. Adam's bias
    correction reads the count, so counting a step twice would change every later update. The count is
    therefore read before the call and set to that value plus one after it, whatever the call did.

    Args:
        optimizer: a built Keras optimizer (inside a `keras.StatelessScope` on JAX).
        grads: the gradients, one per variable.
        variables: the variables to update (the optimizer was built on them).
    """
    counter = optimizer._iterations
    after = counter.value + 1  # a new tensor, computed now: the call may increment the variable in place
    optimizer._backend_apply_gradients(list(grads), list(variables))
    counter.assign(after)
