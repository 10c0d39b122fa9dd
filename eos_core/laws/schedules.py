"""Fixed learning-rate schedules, as laws, so baselines run through the same adapters as the tuners."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from eos_core import _validation as check
from eos_core.laws.base import Law, LawOutput
from eos_core.numerics import NUMPY, Numerics


class ScheduleState(NamedTuple):
    """The state of a schedule: the current learning rate and the step count."""

    lr: Any  #: learning rate of the current step
    count: Any  #: steps taken so far (an integer)


class _Schedule(Law):
    """A law that needs no statistics: the learning rate is a function of the step count."""

    needs = frozenset()

    def lr_at(self, count: Any, *, numerics: Numerics = NUMPY) -> Any:
        """The learning rate of step `count` (0-based).

        Args:
            count: the step.
            numerics: the array namespace.

        Returns:
            The learning rate.

        Raises:
            NotImplementedError: in this base class.
        """
        raise NotImplementedError

    def init(
        self, lr: float | None = None, *, hyperparams: Mapping[str, float] | None = None,
        numerics: Numerics = NUMPY,
    ) -> ScheduleState:
        """The state of step 0.

        Args:
            lr: the wrapped optimizer's learning rate, when it has one.
            hyperparams: the optimizer's other settings (unused).
            numerics: the array namespace of the state (numpy here, `jax.numpy` in the JAX adapter).

        Returns:
            The initial [`ScheduleState`][eos_core.laws.ScheduleState].
        """
        zero = numerics.counter(0)
        return ScheduleState(lr=numerics.scalar(self.lr_at(zero, numerics=numerics)), count=zero)

    def update(self, state: ScheduleState, stats: Mapping[str, Any], *, numerics: Numerics = NUMPY) -> LawOutput:
        """The step's learning rate; advances the step count.

        Args:
            state: the law's state.
            stats: unused (a schedule needs none).
            numerics: the array namespace of the state.

        Returns:
            The [`LawOutput`][eos_core.laws.LawOutput]: the learning rate for this step, the new state and the
            diagnostics.
        """
        return self._advance(state, numerics=numerics, probed=True)

    def hold(self, state: ScheduleState, *, numerics: Numerics = NUMPY) -> LawOutput:
        """A step without a probe: a schedule advances all the same.

        Args:
            state: the schedule's state.
            numerics: the array namespace of the state.

        Returns:
            The [`LawOutput`][eos_core.laws.LawOutput] of this step.
        """
        return self._advance(state, numerics=numerics, probed=False)

    def _advance(self, state: ScheduleState, *, numerics: Numerics, probed: bool) -> LawOutput:
        lr = numerics.scalar(self.lr_at(state.count, numerics=numerics))
        new_state = ScheduleState(lr=lr, count=state.count + 1)
        return LawOutput(lr=lr, state=new_state, diagnostics=self.diagnostics(numerics, lr=lr, probed=probed))


class Constant(_Schedule):
    """A constant learning rate: the baseline every tuner is compared with.

    Args:
        lr: the learning rate, >= 0.
        **unknown: rejected: any other keyword raises.

    Raises:
        ValueError: a negative lr, or an unknown keyword.

    Examples:
        >>> from eos_core import Constant
        >>> law = Constant(0.3)
        >>> float(law.update(law.init(), {}).lr)
        0.3
    """

    def __init__(self, lr: float, **unknown: Any) -> None:
        check.reject_unknown("Constant", unknown, ("lr",))
        self.lr = check.non_negative("Constant", "lr", lr)
        self._record(lr=self.lr)

    def lr_at(self, count: Any, *, numerics: Numerics = NUMPY) -> Any:
        """The learning rate of any step.

        Args:
            count: the step (unused).
            numerics: the array namespace.

        Returns:
            `lr`.
        """
        return numerics.scalar(self.lr)


class WarmupCosine(_Schedule):
    r"""Linear warm-up to `peak_lr`, then a decay to `final_lr` by step `total_steps`.

    $$
    \eta_t = \eta_0 + (\eta_{\rm peak} - \eta_0)\, t / W \quad (t < W), \qquad
    \eta_t = \eta_{\rm end} + (\eta_{\rm peak} - \eta_{\rm end})\, s(p), \quad
    p = \min\Big(\frac{t - W}{T - W}, 1\Big)
    $$

    with `s(p) = (1 + cos(pi p)) / 2` (`decay="cosine"`), `1 - p` (`"linear"`) or `1`
    (`"constant"`: warm-up then constant). These are the schedule shapes the CDAT paper tunes
    its baselines over (appendix C.3). `warmup_steps` defaults to `warmup_fraction * total_steps`.

    Args:
        peak_lr: $\eta_{\rm peak} \ge 0$.
        total_steps: T, the step where the decay ends (>= 1).
        warmup_fraction: W / T when `warmup_steps` is not given, in [0, 1].
        warmup_steps: W, the warm-up steps (<= `total_steps`).
        init_lr: $\eta_0$, the lr at step 0.
        final_lr: $\eta_{\rm end}$, the lr from step T on.
        decay: `"cosine"`, `"linear"` or `"constant"`.
        **unknown: rejected: any other keyword raises.

    Raises:
        ValueError: a setting out of its range (the message names it), or an unknown keyword.

    Examples:
        >>> from eos_core import WarmupCosine
        >>> law = WarmupCosine(peak_lr=1.0, total_steps=10, warmup_steps=2)
        >>> [round(float(law.lr_at(t)), 3) for t in (0, 1, 2, 6, 10)]  # warm-up, peak, half-way, end
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """

    DECAYS = ("cosine", "linear", "constant")

    def __init__(
        self,
        peak_lr: float,
        total_steps: int,
        *,
        warmup_fraction: float = 0.1,
        warmup_steps: int | None = None,
        init_lr: float = 0.0,
        final_lr: float = 0.0,
        decay: str = "cosine",
        **unknown: Any,
    ) -> None:
        name = type(self).__name__
        check.reject_unknown(name, unknown, ("peak_lr", "total_steps", "warmup_fraction", "warmup_steps",
                                             "init_lr", "final_lr", "decay"))
        self.peak_lr = check.non_negative(name, "peak_lr", peak_lr)
        self.total_steps = check.positive_int(name, "total_steps", total_steps)
        fraction = check.in_interval(name, "warmup_fraction", warmup_fraction, 0.0, 1.0, closed_low=True,
                                     closed_high=True)
        if warmup_steps is None:
            self.warmup_steps = int(round(fraction * self.total_steps))
        else:
            if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
                raise ValueError(f"{name}: warmup_steps must be an integer >= 0, got {warmup_steps!r}")
            self.warmup_steps = int(warmup_steps)
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"{name}: warmup_steps ({self.warmup_steps}) exceeds total_steps ({self.total_steps})")
        self.init_lr = check.non_negative(name, "init_lr", init_lr)
        self.final_lr = check.non_negative(name, "final_lr", final_lr)
        if decay not in self.DECAYS:
            raise ValueError(f"{name}: decay must be one of {', '.join(self.DECAYS)}, got {decay!r}")
        self.decay = decay
        self._record(peak_lr=self.peak_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                     init_lr=self.init_lr, final_lr=self.final_lr, decay=self.decay)

    def lr_at(self, count: Any, *, numerics: Numerics = NUMPY) -> Any:
        """The learning rate of step `count`: linear warm-up, then the decay.

        Args:
            count: the step (0-based; traced arrays work).
            numerics: the array namespace.

        Returns:
            The learning rate.
        """
        xp = numerics.xp
        t = numerics.scalar(count)
        warm = self.warmup_steps
        warmup_lr = self.init_lr + (self.peak_lr - self.init_lr) * t / max(warm, 1)
        span = max(self.total_steps - warm, 1)
        progress = numerics.clip((t - warm) / span, 0.0, 1.0)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + xp.cos(math.pi * progress))
        elif self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = xp.ones_like(progress)
        decay_lr = self.final_lr + (self.peak_lr - self.final_lr) * shape
        return xp.where(t < warm, warmup_lr, decay_lr)
