"""The diagnostics every adapter and callback reports: one registry of names, meanings and derivations.

After each step the PyTorch tuner (`tuner.diagnostics`), the JAX transformation (`eos_core.adapters.jax.diagnostics`),
the Keras tuner and the trainer callbacks (`eos/<name>`) report the same keys with the same meaning, listed in
[`REGISTRY`][eos_core.diagnostics.REGISTRY]. For a given law the key set is fixed
([`keys_for`][eos_core.diagnostics.keys_for]): values not measured on a step are NaN (left out of trainer logs).

Two rules fix what used to differ between frameworks:

* `sharpness` is lambda_max of the Hessian measured on this step: by sharpness tracking when it ran,
  else by the law's own probe when the law measures it (ExactSharpness and AdaEoS on H, DCAO's
  lambda_1), else NaN. The same for `preconditioned_sharpness`.
* `lr_sharpness` is always the applied `lr` times `sharpness` (2 is the edge of stability of
  gradient descent on a quadratic), `preconditioned_lr_sharpness` the applied `lr` times
  `preconditioned_sharpness`. Values internal to a law carry their own names (AdaEoS:
  `lr_smoothed_sharpness`; DCAO: `lr_lambda_1`).

Nothing here imports a framework; [`derive_sharpness`][eos_core.diagnostics.derive_sharpness] works on numpy scalars
and traced JAX arrays alike (it takes the array namespace).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple


class Diagnostic(NamedTuple):
    """One entry of the registry."""

    name: str
    meaning: str
    #: when it holds a value: `"step"` (every step), `"probe"` (steps where the law measured),
    #: `"tracked"` (steps where sharpness was measured), `"total"` (cumulative since the start)
    when: str
    #: `"float"`, `"int"` or `"str"`
    kind: str = "float"


#: Every name an adapter or callback may report, in the order of the documentation table.
REGISTRY: tuple[Diagnostic, ...] = (
    Diagnostic("step", "index of the step these values describe (0-based; skipped steps are not counted)",
               "step", "int"),
    Diagnostic("lr", "learning rate applied to this step's update u", "step"),
    Diagnostic("law_lr", "the law's learning rate before the schedule factor of lr_mode='multiply' "
               "(equal to lr otherwise)", "step"),
    Diagnostic("probed", "1 when the law's statistics were measured on this step (every probe_every steps)", "step"),
    Diagnostic("fallback", "1 when the law kept its last good lr (non-finite or degenerate statistics)", "step"),
    Diagnostic("skipped", "1 when the step was skipped (NaN/Inf loss, gradient or update; parameters untouched); "
               "the other values are then the previous step's", "step"),
    Diagnostic("loss", "the loss on the batch at the step's parameters (NaN when the adapter was not given it)",
               "step"),
    Diagnostic("grad_norm", "|g|, the norm of the step's gradient (PyTorch measuring only, law=None, one process: on "
               "the steps that measure sharpness, NaN between)", "step"),
    Diagnostic("update_norm", "|u|, the norm of the update for lr = 1 (PyTorch measuring only, law=None, one "
               "process: on the steps that measure sharpness, NaN between)", "step"),
    Diagnostic("route", "the second-order route in use: u^T H u's for a law that needs it, else that of the H v "
               "products of spectra and tracking, else the route setting ('auto' until resolved)", "step", "str"),
    Diagnostic("skipped_steps", "steps skipped so far", "total", "int"),
    Diagnostic("fallback_steps", "probe steps so far where the law kept its last lr", "total", "int"),
    # -- tracking (sharpness_every) and the laws that measure the spectrum ----------------------------------
    Diagnostic("sharpness", "lambda_max of the Hessian on the batch (tracking, else the law's own measurement)",
               "tracked"),
    Diagnostic("lr_sharpness", "lr * sharpness: 2 is the edge of stability of gradient descent", "tracked"),
    Diagnostic("preconditioned_sharpness", "lambda_max of P^{-1/2} H P^{-1/2} for Adam/RMSProp/Adagrad: the "
               "adaptive edge (Cohen et al. 2022)", "tracked"),
    Diagnostic("preconditioned_lr_sharpness", "lr * preconditioned_sharpness", "tracked"),
    Diagnostic("alignment", "|cos(u, v_max)|: how much of the update lies along the top eigenvector", "tracked"),
    Diagnostic("power_iterations", "Hessian-vector products the last sharpness estimate used", "tracked"),
    # -- the sharpness monitor (monitor_budget; NaN when it is off) -----------------------------------------
    Diagnostic("sharpness_residual", "relative residual |H y - theta y| / |theta| of the monitor's estimate behind "
               "sharpness (Lanczos residual; NaN when sharpness is an exact measurement of this step)", "step"),
    Diagnostic("sharpness_age", "steps since the Hessian-vector product behind sharpness (0: measured on this step)",
               "step"),
    Diagnostic("preconditioned_sharpness_residual", "the same for preconditioned_sharpness", "step"),
    Diagnostic("preconditioned_sharpness_age", "the same for preconditioned_sharpness", "step"),
    Diagnostic("edge", "the optimizer's edge of stability for lr * sharpness (preconditioned for adaptive "
               "optimizers): 2 for gradient descent, 2(1 + beta)/(1 - dampening) with heavy-ball momentum, "
               "2(1 + beta1)/(1 - beta1) for Adam; NaN when not known or the monitor is off", "step"),
    Diagnostic("unstable", "1 while lr * sharpness (preconditioned for adaptive optimizers) has been above edge * "
               "(1 + monitor_margin) for monitor_patience consecutive measurements, or on one that is a Ritz value "
               "of the step's own Hessian, or update_quotient above 2 * (1 + monitor_margin) (a RuntimeWarning marks "
               "each onset), else 0; NaN before the first measurement and while the monitor is off", "step"),
    Diagnostic("monitor_every", "the monitor's steady-state spacing k = ceil(cost of its products / (monitor_budget "
               "x a training step))", "step"),
    Diagnostic("monitor_exact", "1 when the monitor's products are exact (finite differences disagreed with the "
               "exact product at the last check), 0 for one-sided finite differences", "step"),
    Diagnostic("update_quotient", "lr u^T H u / (-g^T u): lr times the curvature along the step's update over its "
               "slope; above 2 the quadratic model predicts that the step raises the loss. The monitor measures it "
               "on an adaptive optimizer's first step (measuring only, law=None), NaN on the other steps",
               "step"),
    # -- the laws' own measurements (present for the laws that make them) -------------------------------
    Diagnostic("numerator", "CDAT's n = max(-g.u, 0) of this probe (eq. 8)", "probe"),
    Diagnostic("denominator", "CDAT's d = |u^T H u| + eps of this probe (eq. 8)", "probe"),
    Diagnostic("numerator_ema", "CDAT's EMA of n (equal to n when ema = 0)", "probe"),
    Diagnostic("denominator_ema", "CDAT's EMA of d (equal to d when ema = 0)", "probe"),
    Diagnostic("decay", "CDAT with decay=: the horizon factor s(t/T) multiplying the rule's rate (no warm-up, no "
               "peak lr)", "step"),
    Diagnostic("trials", "Armijo: trial losses evaluated by the line search", "probe"),
    Diagnostic("accepted", "Armijo: 1 when a trial step met the sufficient-decrease condition", "probe"),
    Diagnostic("grad_norm_sq", "Polyak: |g|^2 (eq. 14)", "probe"),
    Diagnostic("cosine", "HyperGradient: cos(g_t, u_{t-1}) (eq. 15)", "probe"),
    Diagnostic("smoothed_sharpness", "AdaEoS: the bias-corrected EMA of its lambda_max estimates", "probe"),
    Diagnostic("lr_smoothed_sharpness", "AdaEoS: lr * smoothed_sharpness, the quantity it drives to its target",
               "probe"),
    Diagnostic("lambda_1", "DCAO: the largest eigenvalue found by Lanczos", "probe"),
    Diagnostic("lambda_2", "DCAO: the second largest eigenvalue (NaN when num_eigenvalues = 1)", "probe"),
    Diagnostic("gap", "DCAO: lambda_1 - lambda_2", "probe"),
    Diagnostic("lr_lambda_1", "DCAO: r = eta_t * lambda_1 with the lr before this probe, the input of its rules",
               "probe"),
    Diagnostic("momentum", "DCAO: the momentum it set (SGD momentum, Adam beta1)", "step"),
    Diagnostic("weight_decay", "DCAO: the weight decay it set", "step"),
)

BY_NAME: dict[str, Diagnostic] = {entry.name: entry for entry in REGISTRY}

#: Reported by every adapter on every step, whatever the law.
STEP_KEYS: tuple[str, ...] = ("step", "lr", "law_lr", "probed", "fallback", "skipped", "loss", "grad_norm",
                              "update_norm", "route", "skipped_steps", "fallback_steps")
#: Reported by every adapter on every step (NaN unless measured on that step).
TRACKING_KEYS: tuple[str, ...] = ("sharpness", "lr_sharpness", "preconditioned_sharpness",
                                  "preconditioned_lr_sharpness", "alignment", "power_iterations")
#: Reported by every adapter on every step (NaN while the monitor is off).
MONITOR_KEYS: tuple[str, ...] = ("sharpness_residual", "sharpness_age", "preconditioned_sharpness_residual",
                                 "preconditioned_sharpness_age", "edge", "unstable", "monitor_every", "monitor_exact",
                                 "update_quotient")
#: Keys whose value is not a float.
INTEGER_KEYS: tuple[str, ...] = tuple(e.name for e in REGISTRY if e.kind == "int")
STRING_KEYS: tuple[str, ...] = tuple(e.name for e in REGISTRY if e.kind == "str")


def keys_for(law: Any) -> tuple[str, ...]:
    """The exact keys an adapter reports after each step for `law` (None: measuring only), in table order.

    Args:
        law: a law, or None for an adapter that only measures.

    Returns:
        The names, in the order of [`REGISTRY`][eos_core.diagnostics.REGISTRY].

    Raises:
        KeyError: when the law reports a name that is not in [`REGISTRY`][eos_core.diagnostics.REGISTRY] (a
            programming error in a law).
    """
    own: tuple[str, ...] = ()
    if law is not None:
        own = (*law.measurements, *law.decides)
        unknown = [name for name in own if name not in BY_NAME]
        if unknown:
            raise KeyError(f"{type(law).__name__} reports names missing from eos_core.diagnostics.REGISTRY: "
                           f"{unknown}")
    wanted = set(STEP_KEYS) | set(TRACKING_KEYS) | set(MONITOR_KEYS) | set(own)
    return tuple(entry.name for entry in REGISTRY if entry.name in wanted)


def law_sharpness(law: Any, values: Mapping[str, Any], nan: Any = math.nan) -> tuple[Any, Any]:
    """`(sharpness, preconditioned_sharpness)` the law measured itself on this step (`nan` where it did not).

    ExactSharpness and AdaEoS report their estimate under `sharpness` or `preconditioned_sharpness`;
    DCAO reports `lambda_1` of H or, with `preconditioned=True`, of P^{-1/2} H P^{-1/2}.

    Args:
        law: the law (None: no law).
        values: the law's diagnostics of this step.
        nan: the "not measured" value (a traced NaN in JAX).

    Returns:
        `(sharpness, preconditioned_sharpness)`.
    """
    if law is None:
        return nan, nan
    plain = values.get("sharpness", nan) if "sharpness" in law.measurements else nan
    preconditioned = values.get("preconditioned_sharpness", nan) if (
        "preconditioned_sharpness" in law.measurements) else nan
    if "lambda_1" in law.measurements:
        if getattr(law, "preconditioned", False):
            preconditioned = values.get("lambda_1", nan)
        else:
            plain = values.get("lambda_1", nan)
    return plain, preconditioned


def derive_sharpness(xp: Any, lr: Any, tracked: Any, tracked_preconditioned: Any, law_value: Any,
                     law_preconditioned: Any) -> dict[str, Any]:
    """`sharpness`, `lr_sharpness` and their preconditioned versions by the two rules of this module.

    `tracked*` are the tracker's values (NaN when it did not run on this step), `law_*` the law's own
    ([`law_sharpness`][eos_core.diagnostics.law_sharpness]). Works for numpy and `jax.numpy` (`xp`), traced or not.

    Args:
        xp: the array namespace.
        lr: the applied learning rate.
        tracked: the tracked lambda_max of H (NaN when not tracked on this step).
        tracked_preconditioned: the tracked lambda_max of the preconditioned Hessian.
        law_value: the law's own lambda_max of H.
        law_preconditioned: the law's own lambda_max of the preconditioned Hessian.

    Returns:
        `sharpness`, `lr_sharpness`, `preconditioned_sharpness` and `preconditioned_lr_sharpness`.
    """
    sharpness = xp.where(xp.isnan(tracked), law_value, tracked)
    preconditioned = xp.where(xp.isnan(tracked_preconditioned), law_preconditioned, tracked_preconditioned)
    return {
        "sharpness": sharpness,
        "lr_sharpness": lr * sharpness,
        "preconditioned_sharpness": preconditioned,
        "preconditioned_lr_sharpness": lr * preconditioned,
    }


def markdown_table(names: tuple[str, ...] | None = None) -> str:
    """The registry (or the given names) as the markdown table of the documentation."""
    rows = ["| name | meaning |", "|---|---|"]
    for entry in REGISTRY:
        if names is None or entry.name in names:
            meaning = entry.meaning.replace("|", "\\|")  # a literal pipe inside a table cell
            rows.append(f"| `{entry.name}` | {meaning} |")
    return "\n".join(rows)
