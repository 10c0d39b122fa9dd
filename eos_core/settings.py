"""The tuner options, with one name, one meaning and one check in every adapter and callback.

The PyTorch `CurvatureTuner`, JAX `tune`, the Keras `CurvatureTuner` and the Lightning, Hugging Face and Keras
callbacks all take these options by the same keyword names and validate them here, when the object is built, so a bad
setting fails on the line that wrote it with a ValueError naming the setting. An adapter that cannot honour an option
it was given (e.g. `lr_mode` in JAX, which has no scheduler to multiply) says so instead of ignoring it. Options
renamed since 0.1 keep working for now with a DeprecationWarning ([`DEPRECATED`][eos_core.settings.DEPRECATED]).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from eos_core import _validation as check
from eos_core import monitor as monitor_rules
from eos_core import request as defaults
from eos_core import routes

#: Old option names and their replacements (the old names warn with DeprecationWarning).
DEPRECATED: dict[str, str] = {
    "power_iters": "sharpness_iters",
    "power_tol": "sharpness_tol",
    "initial_lr": "reference_lr",
}

WARN_MODES: tuple[Any, ...] = (True, "jit", False)
LR_MODES: tuple[str, ...] = ("override", "multiply")
#: `route="auto"` on PyTorch switches to one-sided finite differences, once they agree with the exact route, on
#: models with at least this many parameters (see fd_above): 1, every model
FD_ABOVE = 1


@dataclasses.dataclass(frozen=True)
class TunerSettings:
    """Options shared by every adapter and callback (each adapter documents which ones it supports).

    Attributes:
        probe_every: measure the law's statistics every that many steps (steps 0, k, 2k, ...) and reuse the learning
            rate in between (Sophia-style amortisation).
        route: the u^T H u / H v route ([`eos_core.routes`][]); `"auto"` lets the adapter pick.
        sharpness_every: every that many steps, estimate lambda_max of the Hessian (and, for adaptive optimizers, of
            the preconditioned Hessian) by warm-started power iteration; None: off.
        sharpness_iters: at most that many Hessian-vector products per sharpness estimate.
        sharpness_tol: stop each sharpness estimate when the Rayleigh quotient changes by at most this, relative (0:
            always `sharpness_iters`).
        lr_mode: `"override"` (the law's lr is applied; a scheduler only keeps per-group ratios) or `"multiply"` (the
            law's lr times the scheduler's factor `lr(t) / lr(0)`). PyTorch and the trainer callbacks.
        warn: how skipped steps and law fallbacks are reported: True (RuntimeWarning on the host), `"jit"` (JAX: from
            inside the compiled step, at about 10% per step), False (never; the counts stay in the diagnostics).
        skip_nonfinite: skip steps whose loss or gradient is NaN/Inf (parameters and optimizer state untouched).
            PyTorch and JAX. A PyTorch tuner that only measures (`law=None`), in a single process, reads the
            gradient on the steps that measure sharpness; between them it checks the loss alone and keeps no copy of
            the parameters.
        seed: seed of the random start vectors of the spectral estimators.
        fd_eps: machine epsilon the finite-difference steps are sized for (default: that of the lowest precision the
            loss is computed in).
        reference_lr: the learning rate the law starts from and, with `lr_mode="multiply"`, the lr that means a
            schedule factor of 1 (default: the wrapped optimizer's base learning rate).
        fd_above: PyTorch `route="auto"`: on models with at least this many parameters (default 1: every model),
            switch to one-sided finite differences once they agree with the exact route (checked at the 1st, 10th,
            100th, ... exact probe; None: never).
        clipped_gradients: the gradient the optimizer steps with is clipped (not the objective's own), so one-sided
            finite differences evaluate g(w) again. PyTorch.
        linear_in_lr: drive a PyTorch optimizer outside the known list whose step is linear in lr.
        monitor_budget: the fraction of training time the sharpness monitor may take, in (0, 1] (None: off): a
            streaming lambda_max ([`eos_core.spectral.tracking`][]) advanced by one Hessian-vector product every
            few steps, spaced to fit the budget ([`eos_core.monitor`][]).
        monitor_edge: the edge of stability the early warning compares lr x sharpness with (None: derived from the
            optimizer, e.g. 2 for gradient descent, 38 for Adam's preconditioned sharpness at beta1 = 0.9).
        monitor_margin: the warning counts a measurement above `edge * (1 + monitor_margin)`.
        monitor_patience: that many consecutive such measurements turn the warning on (one suffices when it is a
            Ritz value of the step's own Hessian, [`eos_core.monitor.conclusive`][]).
    """

    probe_every: int = 1
    route: str = routes.AUTO
    sharpness_every: int | None = None
    sharpness_iters: int = defaults.POWER_ITERS
    sharpness_tol: float = defaults.POWER_TOL
    lr_mode: str = "override"
    warn: bool | str = True
    skip_nonfinite: bool = True
    seed: int = 0
    fd_eps: float | None = None
    reference_lr: float | None = None
    fd_above: int | None = FD_ABOVE
    clipped_gradients: bool = False
    linear_in_lr: bool | None = None
    monitor_budget: float | None = None
    monitor_edge: float | None = None
    monitor_margin: float = monitor_rules.MARGIN
    monitor_patience: int = monitor_rules.PATIENCE

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every option name, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(
        cls,
        owner: str,
        options: Mapping[str, Any],
        *,
        supported: Collection[str] | None = None,
        supported_routes: Collection[str] = routes.ALL,
        stacklevel: int = 3,
    ) -> TunerSettings:
        """Validated settings from keyword options (old names accepted with a DeprecationWarning).

        Args:
            owner: the class or function the options were given to (named in errors).
            options: the keyword options as given by the user.
            supported: the option names `owner` honours (default: all). Giving another one a value
                different from its default raises.
            supported_routes: the routes `owner` implements.
            stacklevel: of the DeprecationWarning, counted from the caller of this method.

        Returns:
            The settings, every option checked.

        Raises:
            ValueError: for an unknown option, an option `owner` does not support, or an invalid value
                (the message names the option).
        """
        given = dict(options)
        for old, new in DEPRECATED.items():
            if old in given:
                if new in given:
                    raise ValueError(f"{owner}: pass {new}= only ({old}= is its deprecated name)")
                warnings.warn(f"{owner}: {old}= is deprecated, use {new}= (same meaning)", DeprecationWarning,
                              stacklevel=stacklevel)
                given[new] = given.pop(old)
        valid = cls.names()
        unknown = {k: v for k, v in given.items() if k not in valid}
        if unknown:
            allowed = valid if supported is None else [n for n in valid if n in supported]
            check.reject_unknown(owner, unknown, allowed)
        if supported is not None:
            field_defaults = {f.name: f.default for f in dataclasses.fields(cls)}
            refused = sorted(k for k, v in given.items() if k not in supported and not _same(v, field_defaults[k]))
            if refused:
                raise ValueError(f"{owner} does not support the option(s) {', '.join(refused)} "
                                 f"(it supports: {', '.join(n for n in valid if n in supported)})")
        settings = cls(**given)
        settings._check(owner, tuple(supported_routes))
        return settings

    def replace(self, owner: str = "TunerSettings", **changes: Any) -> TunerSettings:
        """A copy with `changes` applied and checked."""
        out = dataclasses.replace(self, **changes)
        out._check(owner, routes.ALL)
        return out

    def as_dict(self) -> dict[str, Any]:
        """The options as keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    # -- checks --------------------------------------------------------------------------------------------
    def _check(self, owner: str, supported_routes: tuple[str, ...]) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once, while checking
        set_(self, "probe_every", check.positive_int(owner, "probe_every", self.probe_every))
        set_(self, "route", routes.validate_route(self.route, owner=owner, supported=supported_routes))
        if self.sharpness_every is not None:
            set_(self, "sharpness_every", check.positive_int(owner, "sharpness_every", self.sharpness_every))
        set_(self, "sharpness_iters", check.positive_int(owner, "sharpness_iters", self.sharpness_iters))
        set_(self, "sharpness_tol", check.non_negative(owner, "sharpness_tol", self.sharpness_tol))
        if self.lr_mode not in LR_MODES:
            raise ValueError(f"{owner}: lr_mode must be 'override' or 'multiply', got {self.lr_mode!r}")
        warn = self.warn
        if isinstance(warn, bool | np.bool_):
            set_(self, "warn", bool(warn))
        elif not (isinstance(warn, str) and warn == "jit"):
            raise ValueError(f"{owner}: warn must be True (warnings on the host), 'jit' (JAX: from inside the "
                             f"compiled step) or False (none), got {warn!r}")
        set_(self, "skip_nonfinite", _flag(owner, "skip_nonfinite", self.skip_nonfinite))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise ValueError(f"{owner}: seed must be an integer, got {self.seed!r}")
        set_(self, "seed", int(self.seed))
        if self.fd_eps is not None:
            set_(self, "fd_eps", check.positive(owner, "fd_eps", self.fd_eps))
        if self.reference_lr is not None:
            set_(self, "reference_lr", check.positive(owner, "reference_lr", self.reference_lr))
        if self.fd_above is not None:
            set_(self, "fd_above", check.positive_int(owner, "fd_above", self.fd_above))
        set_(self, "clipped_gradients", _flag(owner, "clipped_gradients", self.clipped_gradients))
        if self.linear_in_lr is not None:
            set_(self, "linear_in_lr", _flag(owner, "linear_in_lr", self.linear_in_lr))
        if self.monitor_budget is not None:
            if isinstance(self.monitor_budget, bool | np.bool_):
                raise ValueError(f"{owner}: monitor_budget must be a fraction of training time in (0, 1] or None, "
                                 f"got {self.monitor_budget!r}")
            set_(self, "monitor_budget", check.in_interval(owner, "monitor_budget", self.monitor_budget, 0.0, 1.0,
                                                           closed_low=False, closed_high=True))
        if self.monitor_edge is not None:
            set_(self, "monitor_edge", check.positive(owner, "monitor_edge", self.monitor_edge))
        set_(self, "monitor_margin", check.non_negative(owner, "monitor_margin", self.monitor_margin))
        set_(self, "monitor_patience", check.positive_int(owner, "monitor_patience", self.monitor_patience))


def _flag(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{owner}: {name} must be True or False, got {value!r}")
    return bool(value)


def _same(value: Any, default: Any) -> bool:
    try:
        return bool(value == default) and type(value) is type(default) or (value is None and default is None)
    except Exception:  # noqa: BLE001 - an array or other object: not the default
        return False
