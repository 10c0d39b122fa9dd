"""The methods the suite compares, each a named `MethodSpec` that builds a `Trainer`.

Families (names as on the command line):

* `adamw-cos-<peak>`: `torch.optim.AdamW` (weight decay 0.01, torch's default) with a linear warm-up over
  the first 5% of the steps and a cosine decay to 0 (a `LambdaLR`), one per peak lr of the grid. The best
  of the grid, per seed, is the anchor every ratio refers to.
* `adam-<lr>`: `torch.optim.Adam` at a constant lr, one per lr of the grid.
* Learning-rate-free peers, each with its package's recommended settings (package READMEs):
  `prodigy` (`prodigyopt.Prodigy(lr=1)`, no schedule) and `prodigy-cos` (its README's alternative, a
  `CosineAnnealingLR` over the whole run); `dadapt-adam` (`dadaptation.DAdaptAdam(lr=1)`, no schedule) and
  `dadapt-adam-cos` (its README: "use the same learning rate scheduler you would normally use", here the
  anchor's 5% warm-up + cosine); `sf-adamw` (`schedulefree.AdamWScheduleFree`, its default lr 0.0025,
  `warmup_steps` = 5% as its README recommends, `optimizer.train()` / `optimizer.eval()` around
  evaluation); `dog` / `ldog` (`dog.DoG` / `dog.LDoG` with `reps_rel=1e-6`, evaluated on the
  `PolynomialDecayAverager(gamma=8)` average the package's README says they must be combined with).
* The library's laws through `eos_core.adapters.torch.CurvatureTuner` on `AdamW` (weight decay 0.01,
  base lr 1e-3 = the law's initial lr): `cdat-s<scale>-e<ema>[-p<k>][-auto][-cos]` (route `fd-onesided`
  unless `-auto`; `-cos` = `lr_mode="multiply"` with a cosine decay to 0 as a `LambdaLR`),
  `cdat-prev-s<scale>-e<ema>[-p<k>][-cosine]` (`CDAT(numerator="previous-update")`, the unbiased
  mini-batch numerator; `-cosine` = the law's own `decay="cosine"` over the run, no scheduler),
  `adaeos-pre` and `exact-pre` (AdaEoS and ExactSharpness on the preconditioned sharpness, `probe_every`
  10, with the target / scale at Adam's edge 2 (1 + beta1) / (1 - beta1) = 38, Cohen et al. 2022), and
  `adaeos-pre-2` / `exact-pre-2` with the laws' default target / scale 2.
* `proto-*`: the mini-batch CDAT prototypes of `benchmarks.minibatch.prototypes`.

A method whose package is missing is reported as skipped (`MethodSpec.requires`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: evaluates the loss on the current batch (forward only, no backward)
LossFn = Callable[[], torch.Tensor]

#: peak lrs of the AdamW warm-up + cosine grid (the anchor is the best of them, per seed)
COSINE_GRID = (3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 7e-3, 1e-2, 2e-2, 3e-2)
#: lrs of the constant Adam grid
CONSTANT_GRID = (3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2)
#: fraction of the steps spent in linear warm-up by the anchor schedule (and D-Adapt's, schedule-free's)
WARMUP = 0.05
#: AdamW weight decay of the anchors and of every tuned AdamW base (torch's default)
WEIGHT_DECAY = 0.01
#: base lr of the tuned AdamW optimizers (the laws' initial lr)
BASE_LR = 1e-3
#: Adam's edge of stability for the preconditioned sharpness, 2 (1 + beta1) / (1 - beta1) with beta1 = 0.9
ADAM_EDGE = 38.0


def warmup_cosine(step: int, total: int, warmup: float = WARMUP) -> float:
    """The anchor's lr factor: a linear warm-up then a cosine decay to 0.

    With `W = max(1, round(warmup * total))`: `(t + 1) / W` for `t < W`, then
    `0.5 * (1 + cos(pi * min(t - W, T - W) / max(1, T - W)))` with `T = total`.

    Args:
        step: the step t (0-based).
        total: T, the number of steps of the run.
        warmup: the fraction of the steps spent in warm-up (default `WARMUP`, 5%).

    Returns:
        The factor in [0, 1] that multiplies the peak lr (1 at the end of the warm-up, 0 from step T on).
    """
    w = max(1, round(warmup * total))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1.0 + math.cos(math.pi * min(step - w, total - w) / max(1, total - w)))


def cosine(step: int, total: int) -> float:
    """Cosine decay to 0 with no warm-up: `0.5 * (1 + cos(pi * min(t, T) / T))`.

    Args:
        step: the step t (0-based).
        total: T, the number of steps of the run (treated as at least 1).

    Returns:
        The factor in [0, 1]: 1 at step 0, 0 from step T on.
    """
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


def linear(step: int, total: int) -> float:
    """Linear decay to 0 with no warm-up: `max(0, 1 - t / T)`.

    Args:
        step: the step t (0-based).
        total: T, the number of steps of the run (treated as at least 1).

    Returns:
        The factor in [0, 1]: 1 at step 0, 0 from step T on.
    """
    return max(0.0, 1.0 - step / max(1, total))


#: the decays a tuned method can multiply its lr by (`-cos` in a method's name), `factor(step, total)`
DECAYS: dict[str, Callable[[int, int], float]] = {"cos": cosine, "linear": linear}


class Trainer:
    """One optimisation method on one model: `step` takes a training step, `lr` reports the lr applied.

    Subclasses set `optimizer` (the object timed) and override what differs.

    Args:
        model: the model being trained.
        optimizer: the optimizer over `model`'s parameters.
        scheduler: an lr scheduler stepped after every optimizer step (None: none).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self._lr = float(optimizer.param_groups[0]["lr"])

    def step(self, step: int, loss_fn: LossFn) -> float:
        """Take one training step on the batch `loss_fn` evaluates.

        Args:
            step: the step index (0-based); unused by the base trainer.
            loss_fn: evaluates the loss on the current batch.

        Returns:
            The batch loss before the update, as a float.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        self._lr = self._applied_lr()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return float(loss.detach())

    def _applied_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def lr(self) -> float:
        """The lr the last step applied (Adam units for the Adam-based methods).

        Returns:
            The lr; before the first step, the lr of the optimizer's first parameter group at construction.
        """
        return self._lr

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[nn.Module]:
        """Switch to the weights to evaluate, for the duration of the `with` block.

        A schedule-free or averaged model switches its weights here.

        Yields:
            The model to evaluate (the trained model itself for the base trainer).
        """
        yield self.model

    def extra(self) -> dict[str, Any]:
        """Method-specific facts for the run's JSON.

        Returns:
            A JSON-serialisable dict (e.g. `{"route": ...}` for a tuned method); empty for the base trainer.
        """
        return {}


class ScheduleFreeTrainer(Trainer):
    """Schedule-free AdamW, used as schedulefree's README says.

    `optimizer.train()` where `model.train()` is called, `optimizer.eval()` before evaluation.

    Args:
        model: the model being trained.
        optimizer: a `schedulefree` optimizer over `model`'s parameters; it is put in train mode here.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(model, optimizer)
        optimizer.train()

    def step(self, step: int, loss_fn: LossFn) -> float:
        """Take one training step; the lr reported is schedulefree's `scheduled_lr` (its warm-up included).

        Args:
            step: the step index (0-based).
            loss_fn: evaluates the loss on the current batch.

        Returns:
            The batch loss before the update.
        """
        loss = super().step(step, loss_fn)
        self._lr = float(self.optimizer.param_groups[0].get("scheduled_lr", self._lr))
        return loss

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[nn.Module]:
        """Switch the optimizer to its evaluation weights (`optimizer.eval()`), and back to training on exit.

        Yields:
            The model, holding the schedule-free evaluation weights.
        """
        self.optimizer.eval()
        try:
            yield self.model
        finally:
            self.optimizer.train()


class DAdaptTrainer(Trainer):
    """Prodigy and D-Adaptation: the effective Adam lr is `d * lr`.

    Args:
        model: the model being trained.
        optimizer: a `prodigyopt.Prodigy` or `dadaptation` optimizer over `model`'s parameters.
        scheduler: an lr scheduler stepped after every optimizer step (None: none).
    """

    def step(self, step: int, loss_fn: LossFn) -> float:
        """Take one training step; the lr reported is `d * lr` of the first parameter group after the step.

        Args:
            step: the step index (0-based).
            loss_fn: evaluates the loss on the current batch.

        Returns:
            The batch loss before the update.
        """
        loss = super().step(step, loss_fn)
        group = self.optimizer.param_groups[0]
        self._lr = float(group["d"]) * float(group["lr"]) if "d" in group else float(group["lr"])
        return loss

    def _applied_lr(self) -> float:
        return self._lr


class DoGTrainer(Trainer):
    """DoG / LDoG with the package's polynomial-decay iterate average (evaluated instead of the iterate).

    Args:
        model: the model being trained.
        optimizer: a `dog.DoG` or `dog.LDoG` optimizer over `model`'s parameters.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from dog import PolynomialDecayAverager

        super().__init__(model, optimizer)
        self.averager = PolynomialDecayAverager(model, gamma=8.0)

    def step(self, step: int, loss_fn: LossFn) -> float:
        """Take one training step and update the iterate average.

        The lr reported is DoG's step size `eta` (SGD-style units, not Adam's; LDoG: the first tensor's).

        Args:
            step: the step index (0-based).
            loss_fn: evaluates the loss on the current batch.

        Returns:
            The batch loss before the update.
        """
        loss = super().step(step, loss_fn)
        self.averager.step()
        etas = self.optimizer.param_groups[0].get("eta")
        if etas is not None:  # SGD-style step size (DoG units, not Adam's); LDoG: the first tensor's
            self._lr = float(etas[0])
        return loss

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[nn.Module]:
        """Evaluate the iterate average instead of the iterate.

        Yields:
            The averaged model (`PolynomialDecayAverager(gamma=8).av_model`).
        """
        yield self.averager.av_model


class TunerTrainer(Trainer):
    """A law of the library through `CurvatureTuner` (closure convention), optionally with a decay on top.

    The base optimizer is `AdamW(lr=BASE_LR, weight_decay=WEIGHT_DECAY)`. With a decay, a `LambdaLR` multiplies
    the law's lr by the decay factor (`lr_mode="multiply"`); without, the law's lr replaces the optimizer's
    (`"override"`).

    Args:
        model: the model being trained.
        law: the learning-rate law (e.g. `eos_core.CDAT(...)`).
        probe_every: probe the law every that many steps.
        route: the curvature route (e.g. `"fd-onesided"` or `"auto"`).
        decay: a key of `DECAYS` (`"cos"`, `"linear"`) or None.
        total_steps: the run's length, the horizon of the decay.
        lr_mode: the tuner's `lr_mode`; None chooses `"multiply"` with a decay, else `"override"`.
    """

    def __init__(self, model: nn.Module, law: Any, *, probe_every: int, route: str, decay: str | None,
                 total_steps: int, lr_mode: str | None = None) -> None:
        from eos_core.adapters.torch import CurvatureTuner

        optimizer = torch.optim.AdamW(model.parameters(), lr=BASE_LR, weight_decay=WEIGHT_DECAY)
        scheduler = None
        if decay is not None:
            fn = DECAYS[decay]
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: fn(t, total_steps))
        mode = lr_mode or ("multiply" if decay is not None else "override")
        super().__init__(model, optimizer, scheduler)
        self.tuner = CurvatureTuner(optimizer, law, probe_every=probe_every, route=route, lr_mode=mode, model=model)

    def step(self, step: int, loss_fn: LossFn) -> float:
        """Take one tuned step through `CurvatureTuner.step(closure)`, then step the decay.

        The lr reported is the tuner's diagnostic `lr` (NaN when absent).

        Args:
            step: the step index (0-based).
            loss_fn: evaluates the loss on the current batch.

        Returns:
            The batch loss before the update (the tuner's diagnostic `loss` when the step returns no tensor).
        """

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            return loss

        loss = self.tuner.step(closure)
        if self.scheduler is not None:
            self.scheduler.step()
        self._lr = float(self.tuner.diagnostics.get("lr", math.nan))
        return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(self.tuner.diagnostics["loss"])

    def extra(self) -> dict[str, Any]:
        """The route the tuner resolved, for the run's JSON.

        Returns:
            `{"route": <the curvature route in use>}`.
        """
        return {"route": self.tuner.route}


#: a method's trainer factory: `build(model, total_steps) -> Trainer`
Builder = Callable[[nn.Module, int], Trainer]


@dataclass(frozen=True)
class MethodSpec:
    """A named method: `build(model, total_steps) -> Trainer`.

    Attributes:
        name: the method's name (command line, file names, tables).
        family: `cosine`, `constant`, `peer`, `law` or `proto`.
        build: the trainer factory.
        settings: what the method is, for the JSON.
        requires: import names of the packages it needs (skipped, with the reason, when one is missing).
        tags: sets it belongs to (`suite`: the default comparison; `research`: prototype sweeps).
    """

    name: str
    family: str
    build: Builder
    settings: dict[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    tags: frozenset[str] = frozenset({"suite"})

    def missing(self) -> list[str]:
        """The packages this method needs that are not installed.

        Returns:
            The import names in `requires` that `importlib.util.find_spec` cannot find, in order; empty when the
            method can run.
        """
        return [name for name in self.requires if importlib.util.find_spec(name) is None]


#: pip package name of each import name in `MethodSpec.requires`
PACKAGES = {"prodigyopt": "prodigyopt", "dadaptation": "dadaptation", "schedulefree": "schedulefree",
            "dog": "dog-optimizer"}


def _fmt(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def _cosine_method(peak: float) -> MethodSpec:
    def build(model: nn.Module, total: int) -> Trainer:
        opt = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=WEIGHT_DECAY)
        return Trainer(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: warmup_cosine(t, total)))

    return MethodSpec(f"adamw-cos-{_fmt(peak)}", "cosine", build,
                      {"optimizer": "AdamW", "peak_lr": peak, "weight_decay": WEIGHT_DECAY, "warmup": WARMUP,
                       "schedule": "linear warm-up + cosine to 0"})


def _constant_method(lr: float) -> MethodSpec:
    def build(model: nn.Module, total: int) -> Trainer:
        return Trainer(model, torch.optim.Adam(model.parameters(), lr=lr))

    return MethodSpec(f"adam-{_fmt(lr)}", "constant", build, {"optimizer": "Adam", "lr": lr})


def _peers() -> list[MethodSpec]:
    def prodigy(cos: bool) -> Builder:
        def build(model: nn.Module, total: int) -> Trainer:
            from prodigyopt import Prodigy

            opt = Prodigy(model.parameters(), lr=1.0)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total) if cos else None
            return DAdaptTrainer(model, opt, sched)

        return build

    def dadapt(cos: bool) -> Builder:
        def build(model: nn.Module, total: int) -> Trainer:
            from dadaptation import DAdaptAdam

            opt = DAdaptAdam(model.parameters(), lr=1.0)
            sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda t: warmup_cosine(t, total)) if cos else None)
            return DAdaptTrainer(model, opt, sched)

        return build

    def schedule_free(model: nn.Module, total: int) -> Trainer:
        from schedulefree import AdamWScheduleFree

        return ScheduleFreeTrainer(model, AdamWScheduleFree(model.parameters(),
                                                            warmup_steps=max(1, round(WARMUP * total))))

    def dog_method(layerwise: bool) -> Builder:
        def build(model: nn.Module, total: int) -> Trainer:
            from dog import DoG, LDoG

            return DoGTrainer(model, (LDoG if layerwise else DoG)(model.parameters(), reps_rel=1e-6))

        return build

    return [
        MethodSpec("prodigy", "peer", prodigy(False), {"optimizer": "prodigyopt.Prodigy", "lr": 1.0},
                   ("prodigyopt",)),
        MethodSpec("prodigy-cos", "peer", prodigy(True),
                   {"optimizer": "prodigyopt.Prodigy", "lr": 1.0, "schedule": "CosineAnnealingLR(T_max=steps)"},
                   ("prodigyopt",)),
        MethodSpec("dadapt-adam", "peer", dadapt(False), {"optimizer": "dadaptation.DAdaptAdam", "lr": 1.0},
                   ("dadaptation",)),
        MethodSpec("dadapt-adam-cos", "peer", dadapt(True),
                   {"optimizer": "dadaptation.DAdaptAdam", "lr": 1.0, "schedule": "5% warm-up + cosine to 0"},
                   ("dadaptation",)),
        MethodSpec("sf-adamw", "peer", schedule_free,
                   {"optimizer": "schedulefree.AdamWScheduleFree", "lr": 0.0025, "warmup_steps": WARMUP},
                   ("schedulefree",)),
        MethodSpec("dog", "peer", dog_method(False),
                   {"optimizer": "dog.DoG", "reps_rel": 1e-6, "averaging": "PolynomialDecayAverager(gamma=8)"},
                   ("dog",)),
        MethodSpec("ldog", "peer", dog_method(True),
                   {"optimizer": "dog.LDoG", "reps_rel": 1e-6, "averaging": "PolynomialDecayAverager(gamma=8)"},
                   ("dog",)),
    ]


def _law_method(name: str, make_law: Callable[[int], Any], *, probe_every: int = 1, route: str = "fd-onesided",
                decay: str | None = None, settings: dict[str, Any] | None = None) -> MethodSpec:
    """`make_law(total_steps)` builds the law (a law with a decay takes the run's length as its horizon)."""
    def build(model: nn.Module, total: int) -> Trainer:
        return TunerTrainer(model, make_law(total), probe_every=probe_every, route=route, decay=decay,
                            total_steps=total)

    full = {"base": f"AdamW(lr={BASE_LR}, weight_decay={WEIGHT_DECAY})", "probe_every": probe_every, "route": route,
            "lr_mode": "multiply" if decay else "override", "decay": decay, **(settings or {})}
    return MethodSpec(name, "law", build, full)


def _laws() -> list[MethodSpec]:
    from eos_core import CDAT, AdaEoS, ExactSharpness

    out = []

    def cdat(scale: float, ema: float, probe: int = 1, route: str = "fd-onesided", decay: str | None = None) -> None:
        name = f"cdat-s{scale:g}-e{ema:g}" + (f"-p{probe}" if probe != 1 else "") + \
            ("-auto" if route == "auto" else "") + (f"-{decay}" if decay else "")
        out.append(_law_method(name, lambda total: CDAT(scale=scale, ema=ema), probe_every=probe, route=route,
                               decay=decay, settings={"law": f"CDAT(scale={scale:g}, ema={ema:g})"}))

    def cdat_previous(scale: float, ema: float, probe: int = 1, decay: str | None = None) -> None:
        name = f"cdat-prev-s{scale:g}-e{ema:g}" + (f"-p{probe}" if probe != 1 else "") + (f"-{decay}" if decay else "")
        law = f"CDAT(scale={scale:g}, ema={ema:g}, numerator='previous-update'" + (
            f", decay='{decay}', horizon=<steps>)" if decay else ")")
        out.append(_law_method(name, lambda total: CDAT(scale=scale, ema=ema, numerator="previous-update",
                                                        decay=decay, horizon=total if decay else None),
                               probe_every=probe, settings={"law": law}))

    for decay in (None, "cos"):
        for scale in (1.0, 2.0):
            for ema in (0.9, 0.99):
                cdat(scale, ema, decay=decay)
        cdat(1.0, 0.9, probe=10, decay=decay)
        cdat(1.0, 0.9, route="auto", decay=decay)
    for decay in (None, "cosine"):
        for scale in (1.0, 1.5, 2.0):
            for ema in (0.95, 0.99):
                cdat_previous(scale, ema, decay=decay)
        cdat_previous(3.0, 0.99, decay=decay)
        cdat_previous(1.5, 0.99, probe=10, decay=decay)
    for target, suffix in ((ADAM_EDGE, ""), (2.0, "-2")):
        out.append(_law_method(f"adaeos-pre{suffix}",
                               lambda total, target=target: AdaEoS(target=target, preconditioned=True, gamma=0.1),
                               probe_every=10,
                               settings={"law": f"AdaEoS(target={target:g}, preconditioned=True, gamma=0.1)"}))
        out.append(_law_method(f"exact-pre{suffix}",
                               lambda total, target=target: ExactSharpness(scale=target, preconditioned=True),
                               probe_every=10,
                               settings={"law": f"ExactSharpness(scale={target:g}, preconditioned=True)"}))
    return out


def all_methods() -> dict[str, MethodSpec]:
    """Every method the suite knows, by name.

    Returns:
        The registry in a fixed order: the AdamW warm-up + cosine grid, the constant Adam grid, the learning-rate-free
        peers, the library's laws, then the prototypes of `benchmarks.minibatch.prototypes`.

    Raises:
        ValueError: two methods have the same name.
    """
    from benchmarks.minibatch import prototypes

    specs = [*(_cosine_method(p) for p in COSINE_GRID), *(_constant_method(lr) for lr in CONSTANT_GRID),
             *_peers(), *_laws(), *prototypes.methods()]
    out: dict[str, MethodSpec] = {}
    for spec in specs:
        if spec.name in out:
            raise ValueError(f"duplicate method name {spec.name}")
        out[spec.name] = spec
    return out


def select(patterns: list[str] | None, methods: dict[str, MethodSpec] | None = None) -> list[MethodSpec]:
    """Select methods by name, glob, tag or family.

    Args:
        patterns: exact names, shell globs (`fnmatch`), `@tag` for a tag or a family (`@suite`, `@research`,
            `@cosine`, `@constant`, `@peer`, `@law`, `@proto`) or `all`; None or empty means `["@suite"]`.
        methods: the registry to select from (None: `all_methods()`).

    Returns:
        The methods matching any pattern, each once, in registry order.

    Raises:
        ValueError: a pattern that matches nothing.
    """
    methods = all_methods() if methods is None else methods
    patterns = patterns or ["@suite"]
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern == "all":
            hits = set(methods)
        elif pattern.startswith("@"):
            hits = {n for n, s in methods.items() if pattern[1:] in s.tags or pattern[1:] == s.family}
        else:
            hits = set(fnmatch.filter(methods, pattern))
        if not hits:
            raise ValueError(f"no method matches {pattern!r}")
        chosen |= hits
    return [spec for name, spec in methods.items() if name in chosen]
