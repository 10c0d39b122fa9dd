"""The law protocol: scalar statistics and explicit state in, a learning rate out.

A law never touches tensors. On a *probe* step an adapter measures the statistics named in
``law.needs`` (see :mod:`eos_core.stats`) and calls ``law.update(state, stats)``; on the steps in
between (``probe_every > 1``) it calls ``law.hold(state)``, which reuses the last learning rate.
Both return a :class:`LawOutput` with the same pytree structure, so the JAX adapter can pick one
with ``lax.cond``. The state is a ``NamedTuple`` of 0-d arrays: it checkpoints with the model in
every framework.

Every law is written branch-free against :class:`eos_core.numerics.Numerics`; non-finite or
degenerate statistics never produce a non-finite or negative learning rate: the law keeps its last
good learning rate and sets ``diagnostics["fallback"] = 1``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from eos_core import _validation as check
from eos_core.numerics import NUMPY, Numerics
from eos_core.request import StatsRequest


class LawOutput(NamedTuple):
    """What a law decides for one step.

    Attributes:
        lr: learning rate to apply to this step's update ``u`` (a 0-d array, finite, >= 0).
        state: the law's new state.
        diagnostics: fixed-key mapping of 0-d arrays (``lr``, ``probed``, ``fallback`` and the
            law's own measurements; NaN marks a value not measured on this step).
        hyperparams: other optimizer settings the law decides (DCAO: ``momentum``,
            ``weight_decay``); empty for pure learning-rate laws.
    """

    lr: Any
    state: Any
    diagnostics: dict[str, Any]
    hyperparams: dict[str, Any] = {}


class Law(abc.ABC):
    """Base class of every tuning law.

    Subclasses set :attr:`needs` and :attr:`measurements` and implement :meth:`init` and
    :meth:`update`. :meth:`hold` (no probe on this step) reuses the last learning rate unless
    overridden (schedules advance their step counter there).
    """

    #: Statistics (names from :mod:`eos_core.stats`) the adapter must provide to ``update``.
    needs: frozenset[str] = frozenset()
    #: Diagnostics keys the law reports besides ``lr``, ``probed`` and ``fallback``.
    measurements: tuple[str, ...] = ()
    #: Hyperparameters besides the learning rate that the law decides (keys of ``hyperparams``).
    decides: tuple[str, ...] = ()

    # -- to implement -------------------------------------------------------------------------
    @abc.abstractmethod
    def init(
        self, lr: float | None = None, *, hyperparams: Mapping[str, float] | None = None,
        numerics: Numerics = NUMPY,
    ) -> Any:
        """Initial state. ``lr`` is the wrapped optimizer's learning rate, when it has one."""

    @abc.abstractmethod
    def update(self, state: Any, stats: Mapping[str, Any], *, numerics: Numerics = NUMPY) -> LawOutput:
        """One probe step: consume ``stats`` (keys ``self.needs``) and decide the learning rate."""

    # -- shared -----------------------------------------------------------------------------------
    def request(self) -> StatsRequest:
        """What an adapter must measure on a probe step (:class:`~eos_core.request.StatsRequest`).

        Laws that need eigenvalues override this to pass their power-iteration or Lanczos settings; every
        default is in :mod:`eos_core.request`.

        Returns:
            The request: ``needs`` and the spectral estimators' settings.
        """
        return StatsRequest.build(self.needs, owner=type(self).__name__)

    def state_to_host(self, state: Any) -> dict[str, Any]:
        """The law's state as plain Python numbers (``{field: float or int}``), for checkpoints.

        Args:
            state: a state of this law (numpy, JAX or other 0-d arrays).

        Returns:
            ``{field: value}`` with integer counters kept as ``int``.
        """
        out: dict[str, Any] = {}
        for name, value in state._asdict().items():
            array = np.asarray(value)
            out[name] = array.tolist() if array.ndim else (int(array) if array.dtype.kind in "iu" else float(array))
        return out

    def state_from_host(self, template: Any, saved: Mapping[str, Any], *, numerics: Numerics = NUMPY) -> Any:
        """Rebuild a state from :meth:`state_to_host`'s output, each field in the dtype ``template`` has.

        Args:
            template: a state of this law (its field dtypes are kept: counters stay integers).
            saved: ``{field: value}``.
            numerics: the array namespace the state lives in.

        Returns:
            The restored state.

        Raises:
            ValueError: when ``saved`` lacks a field of the state.
        """
        missing = [f for f in template._fields if f not in saved]
        if missing:
            raise ValueError(f"{type(self).__name__}: the saved law state lacks {missing}")
        values = []
        for name in template._fields:
            dtype = np.asarray(getattr(template, name)).dtype
            values.append(numerics.xp.asarray(np.asarray(saved[name]).astype(dtype), dtype=dtype))
        return type(template)(*values)

    def hold(self, state: Any, *, numerics: Numerics = NUMPY) -> LawOutput:
        """A step without a probe: reuse the last learning rate (``probe_every > 1``)."""
        return LawOutput(
            lr=state.lr,
            state=state,
            diagnostics=self.diagnostics(numerics, lr=state.lr, probed=False),
            hyperparams=self._held_hyperparams(state),
        )

    def diagnostics(
        self, numerics: Numerics, *, lr: Any, probed: bool, fallback: Any = False, **values: Any
    ) -> dict[str, Any]:
        """The fixed-key diagnostics mapping; measurements not given are NaN."""
        unknown = set(values) - set(self.measurements)
        if unknown:  # a programming error in a law, not user input
            raise KeyError(f"{type(self).__name__} reports undeclared measurements {sorted(unknown)}")
        out = {
            "lr": numerics.scalar(lr),
            "probed": numerics.scalar(1.0 if probed else 0.0),
            "fallback": numerics.xp.where(fallback, numerics.scalar(1.0), numerics.scalar(0.0)),
        }
        for key in self.measurements:
            out[key] = numerics.scalar(values.get(key, math.nan))
        return out

    def _held_hyperparams(self, state: Any) -> dict[str, Any]:
        return {name: getattr(state, name) for name in self.decides}

    def _settings(self) -> dict[str, Any]:
        return dict(self._config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._settings().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._settings() == other._settings()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted((k, repr(v)) for k, v in self._settings().items()))))

    # helpers for subclasses -------------------------------------------------------------------
    _config: dict[str, Any]

    def _record(self, **settings: Any) -> None:
        self._config = settings

    def _initial_lr(self, lr_option: float | None, lr: float | None, *, required: bool) -> float:
        """The law's own ``lr_init`` setting wins over the adapter's; some laws cannot start without one."""
        chosen = lr_option if lr_option is not None else lr
        if chosen is None:
            if required:
                raise ValueError(
                    f"{type(self).__name__} needs an initial learning rate: pass lr_init=... to the law "
                    "or wrap an optimizer that has a learning rate"
                )
            return 0.0
        return check.non_negative(type(self).__name__, "initial learning rate", chosen)


def finite(numerics: Numerics, *values: Any) -> Any:
    """Elementwise-and of ``isfinite`` over scalar ``values``."""
    xp = numerics.xp
    ok = xp.isfinite(values[0])
    for value in values[1:]:
        ok = ok & xp.isfinite(value)
    return ok


def safe(numerics: Numerics, value: Any, ok: Any, fill: float = 0.0) -> Any:
    """``value`` where ``ok`` else ``fill``: keeps NaN/Inf out of arithmetic that ``where`` discards."""
    return numerics.xp.where(ok, value, numerics.scalar(fill))
