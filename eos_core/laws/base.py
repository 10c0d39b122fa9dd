"""The law protocol: scalar statistics and explicit state in, a learning rate out.

A law never touches tensors. On a *probe* step an adapter measures the statistics named in `law.needs` (see
[`eos_core.stats`][]) and calls `law.update(state, stats)`; on the steps in between (`probe_every > 1`) it calls
`law.hold(state)`, which reuses the last learning rate. Both return a [`LawOutput`][eos_core.laws.base.LawOutput] with
the same pytree structure, so the JAX adapter can pick one with `lax.cond`. The state is a `NamedTuple` of 0-d arrays:
it checkpoints with the model in every framework.

Every law is written branch-free against [`eos_core.numerics.Numerics`][]; non-finite or degenerate statistics never
produce a non-finite or negative learning rate: the law keeps its last good learning rate and sets
`diagnostics["fallback"] = 1`.
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
        lr: learning rate to apply to this step's update `u` (a 0-d array, finite, >= 0).
        state: the law's new state.
        diagnostics: fixed-key mapping of 0-d arrays (`lr`, `probed`, `fallback` and the
            law's own measurements; NaN marks a value not measured on this step).
        hyperparams: other optimizer settings the law decides (DCAO: `momentum`,
            `weight_decay`); empty for pure learning-rate laws.
    """

    lr: Any
    state: Any
    diagnostics: dict[str, Any]
    hyperparams: dict[str, Any] = {}


class Law(abc.ABC):
    """Base class of every tuning law.

    Subclasses set [`needs`][eos_core.laws.base.Law.needs] and [`measurements`][eos_core.laws.base.Law.measurements]
    and implement [`init`][eos_core.laws.base.Law.init] and [`update`][eos_core.laws.base.Law.update].
    [`hold`][eos_core.laws.base.Law.hold] (no probe on this step) reuses the last learning rate unless overridden
    (schedules advance their step counter there).
    """

    #: Statistics (names from [`eos_core.stats`][]) the adapter must provide to `update`.
    needs: frozenset[str] = frozenset()
    #: Diagnostics keys the law reports besides `lr`, `probed` and `fallback`.
    measurements: tuple[str, ...] = ()
    #: Hyperparameters besides the learning rate that the law decides (keys of `hyperparams`).
    decides: tuple[str, ...] = ()

    # -- to implement -------------------------------------------------------------------------
    @abc.abstractmethod
    def init(
        self, lr: float | None = None, *, hyperparams: Mapping[str, float] | None = None,
        numerics: Numerics = NUMPY,
    ) -> Any:
        """The law's state before the first step.

        Args:
            lr: the wrapped optimizer's learning rate, when it has one.
            hyperparams: the optimizer's other settings a law may start from (DCAO: `momentum`, `weight_decay`).
            numerics: the array namespace of the state (numpy here, `jax.numpy` in the JAX adapter).

        Returns:
            The initial state, a NamedTuple of 0-d arrays.
        """

    @abc.abstractmethod
    def update(self, state: Any, stats: Mapping[str, Any], *, numerics: Numerics = NUMPY) -> LawOutput:
        """One probe step: consume `stats` (keys `self.needs`) and decide the learning rate.

        Args:
            state: the law's state.
            stats: the statistics the law declared in `needs`, measured on this step.
            numerics: the array namespace of the state.

        Returns:
            The learning rate, the new state and the diagnostics.
        """

    # -- shared -----------------------------------------------------------------------------------
    def request(self) -> StatsRequest:
        """What an adapter must measure on a probe step ([`StatsRequest`][eos_core.request.StatsRequest]).

        Laws that need eigenvalues override this to pass their power-iteration or Lanczos settings; every default is
        in [`eos_core.request`][].

        Returns:
            The request: `needs` and the spectral estimators' settings.
        """
        return StatsRequest.build(self.needs, owner=type(self).__name__)

    def state_to_host(self, state: Any) -> dict[str, Any]:
        """The law's state as plain Python numbers (`{field: float or int}`), for checkpoints.

        Args:
            state: a state of this law (numpy, JAX or other 0-d arrays).

        Returns:
            `{field: value}` with integer counters kept as `int`.
        """
        out: dict[str, Any] = {}
        for name, value in state._asdict().items():
            array = np.asarray(value)
            out[name] = array.tolist() if array.ndim else (int(array) if array.dtype.kind in "iu" else float(array))
        return out

    def state_from_host(self, template: Any, saved: Mapping[str, Any], *, numerics: Numerics = NUMPY) -> Any:
        """Rebuild a state from [`state_to_host`][eos_core.laws.base.Law.state_to_host]'s output.

        Each field gets the dtype it has in `template`.

        Args:
            template: a state of this law (its field dtypes are kept: counters stay integers).
            saved: `{field: value}`.
            numerics: the array namespace the state lives in.

        Returns:
            The restored state.

        Fields a release added to a law's state (`optional_state_fields`, e.g. CDAT's step counter) take the
        template's value when an older checkpoint lacks them.

        Raises:
            ValueError: when `saved` lacks a field of the state.
        """
        optional = getattr(type(self), "optional_state_fields", ())
        saved = {**{f: np.asarray(getattr(template, f)) for f in optional if f not in saved}, **dict(saved)}
        missing = [f for f in template._fields if f not in saved]
        if missing:
            raise ValueError(f"{type(self).__name__}: the saved law state lacks {missing}")
        values = []
        for name in template._fields:
            dtype = np.asarray(getattr(template, name)).dtype
            values.append(numerics.xp.asarray(np.asarray(saved[name]).astype(dtype), dtype=dtype))
        return type(template)(*values)

    def hold(self, state: Any, *, numerics: Numerics = NUMPY) -> LawOutput:
        """A step without a probe: reuse the last learning rate (`probe_every > 1`).

        Args:
            state: the law's state.
            numerics: the array namespace of the state.

        Returns:
            The last learning rate, the unchanged state and diagnostics with `probed = 0`.
        """
        return LawOutput(
            lr=state.lr,
            state=state,
            diagnostics=self.diagnostics(numerics, lr=state.lr, probed=False),
            hyperparams=self._held_hyperparams(state),
        )

    def diagnostics(
        self, numerics: Numerics, *, lr: Any, probed: bool, fallback: Any = False, **values: Any
    ) -> dict[str, Any]:
        """The fixed-key diagnostics mapping of one step.

        Args:
            numerics: the array namespace.
            lr: the learning rate applied.
            probed: whether the law measured its statistics on this step.
            fallback: whether the law kept its last good learning rate.
            **values: the law's own measurements (names from `measurements`).

        Returns:
            `lr`, `probed`, `fallback` and every name of `measurements` (NaN when not given).

        Raises:
            KeyError: a name that is not in `measurements` (a programming error in a law).
        """
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

    def get_config(self) -> dict[str, Any]:
        """The constructor settings: ``type(law)(**law.get_config())`` builds an equal law.

        Keras' serialization calls it, so a law subclass registered with
        ``keras.saving.register_keras_serializable`` saves and loads with the model without more code.

        Returns:
            ``{setting: value}``.
        """
        return self._settings()

    def __repr__(self) -> str:
        """`Name(setting=value, ...)`, every setting of the law."""
        args = ", ".join(f"{k}={v!r}" for k, v in self._settings().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        """Laws of the same type with the same settings are equal."""
        return type(self) is type(other) and self._settings() == other._settings()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        """A hash of the type and the settings."""
        return hash((type(self).__name__, tuple(sorted((k, repr(v)) for k, v in self._settings().items()))))

    # helpers for subclasses -------------------------------------------------------------------
    _config: dict[str, Any]

    def _record(self, **settings: Any) -> None:
        self._config = settings

    def _initial_lr(self, lr_option: float | None, lr: float | None, *, required: bool) -> float:
        """The law's own `lr_init` setting wins over the adapter's; some laws cannot start without one."""
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
    """Elementwise-and of `isfinite` over scalar `values`.

    Args:
        numerics: the array namespace.
        *values: scalars (0-d arrays).

    Returns:
        True where every value is finite.
    """
    xp = numerics.xp
    ok = xp.isfinite(values[0])
    for value in values[1:]:
        ok = ok & xp.isfinite(value)
    return ok


def safe(numerics: Numerics, value: Any, ok: Any, fill: float = 0.0) -> Any:
    """`value` where `ok` else `fill`: keeps NaN/Inf out of arithmetic that `where` discards.

    Args:
        numerics: the array namespace.
        value: the value to guard.
        ok: where it may be used.
        fill: the value used elsewhere.

    Returns:
        `where(ok, value, fill)`.
    """
    return numerics.xp.where(ok, value, numerics.scalar(fill))
