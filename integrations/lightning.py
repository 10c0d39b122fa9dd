"""Lightning callback: one line puts a curvature-aware tuner on a LightningModule's optimizer and logs its dynamics.

```python
trainer = pl.Trainer(callbacks=[EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9))])
```

Design (Lightning 2.x; the facts below are from `lightning/pytorch` 2.6):

* **Where the tuner attaches.** In `on_fit_start`, to `trainer.optimizers[0]` (the torch optimizer
  inside Lightning's `LightningOptimizer`). `Trainer._run` calls `strategy.setup` (which runs
  `configure_optimizers`), then the `on_fit_start` hooks, and only then
  `_checkpoint_connector.restore_training_state()`, which calls `optimizer.load_state_dict` for every
  optimizer, whatever `strategy.restore_checkpoint_after_setup` says (that flag only moves the
  restore of the module and callbacks). So when a fit resumes (`ckpt_path=...`) the tuner is already
  attached when the optimizer's state is loaded, and its state rides in the optimizer's own
  `state_dict()` (key `"eos_core"`) in both directions: the callback has no state of its own and
  needs no `state_dict`.
* **How the step is tuned.** Automatic optimization calls `optimizer.step(closure)` through the
  precision plugin; the tuner's step hooks run it. The tuner calls Lightning's closure once itself
  (`training_step`, `backward`, `on_before_optimizer_step` and gradient clipping all run there, so
  the tuner sees the clipped gradient), and the callback gives the tuner, through
  `tuner.set_objective`, the loss function its curvature probes evaluate: the module's own
  `training_step` re-run on the step's batches (not Lightning's closure, which would run the hooks,
  zero the gradients and backpropagate again). Probes call `pl_module.training_step` directly, under
  the precision plugin's `train_step_context()` (autocast as in the real step), never through the DDP
  wrapper (so no gradient reduction starts). The callback tells that the optimizer stepped by
  `tuner.calls` (steps processed, skipped ones included) changing during the batch.
* **Random state (dropout masks).** Each probe evaluation replays, for every micro-batch of the step, the
  random state its `training_step` started from, so the probe sees the masks of the real step. The
  state is recorded where that micro-batch's computation starts, not in this callback's
  `on_train_batch_start`: Lightning runs every callback's `on_train_batch_start` (in list order),
  then the module's, then the strategy's, then the closure, and each of them may draw random numbers.

    - The micro-batch that steps: the callback's own step pre-hook on the optimizer, registered before the
      tuner's, records the state when `optimizer.step(closure)` starts; the tuner's pre-hook then calls
      the closure, which reaches `training_step` without drawing random numbers (precision plugin
      wrapper, `Closure`, `strategy.training_step`). This is exact, even for random numbers
      `training_step` draws before calling a module.
    - The micro-batches before it under `accumulate_grad_batches = k` (Lightning calls their closure
      itself, without `optimizer.step`), and the stepping one under `precision="16-mixed"` with a
      GradScaler (the precision plugin calls the closure before `scaler.step`): a forward pre-hook on
      every submodule of the LightningModule, armed in `on_train_batch_start` and removed at its first
      call, records the state at the first module call made while Lightning runs `training_step`
      (`pl_module._current_fx_name`; a forward call from a later callback's or the module's
      `on_train_batch_start`, or from `optimizer_step`, is ignored). Arming and removing the hooks
      costs about a microsecond per submodule and micro-batch; the rest of the forward pass and the probes
      run without them. Under DDP the strategy routes `training_step` through the wrapped module's
      `forward`, so that first call is the start of `training_step`: exact. On a single device it is
      the first module call inside `training_step`. **Not covered:** random numbers drawn inside
      `training_step` before its first module call (`torch.randn` noise added to the input, a random
      crop done there), on a single device, for these micro-batches: their probe sees other values than
      the real step did. Draw such numbers in a module's `forward` (or in the data pipeline) to have
      them replayed.
    - A micro-batch whose `training_step` calls no module of the LightningModule and does not step
      falls back to the state at this callback's `on_train_batch_start`.
* **Gradient accumulation** (`accumulate_grad_batches = k`). Lightning divides each micro-batch's loss
  by `k` before `backward` and zeroes the gradients at batches with `batch_idx % k == 0`, so the
  step's gradient is that of `sum_i loss_i / k` over the micro-batches since the last zeroing (a short
  last window of an epoch is still divided by `k`). The probe evaluates exactly that function, so the
  curvature and the gradient describe the same objective (CDAT's ratio is not scale-free in the
  objective). The `eos/loss` value logged under accumulation is that sum as well.
* **Gradient clipping** runs inside the closure, so `g` (in `g.u` and `grad_norm`) and the update
  `u` are the clipped ones: clipping shrinks the step as it does with a fixed lr. The clipped
  gradient is not the objective's, so when clipping is on (`gradient_clip_val` or an overridden
  `configure_gradient_clipping`) finite-difference curvature evaluates g(w) again instead of reusing
  it (`clipped_gradients=True` on the tuner; pass it yourself if `on_before_optimizer_step` clips).
* **The user's logging during probes.** `training_step` usually calls `self.log`. Each probe
  evaluation would log again (on-epoch means would count probes), so the values logged during a probe
  are discarded (the trainer's result collection is restored after each evaluation). Side effects
  outside `self.log` (a torchmetrics object's `update`, counters) do happen again in probes: guard
  them with `callback.probing` or pass `loss_fn=` (a side-effect-free loss).
* **Logging.** After each optimizer step the tuner's numeric diagnostics go through `pl_module.log`
  (`on_step=True`), named `"eos/<name>"` (`eos/lr`, `eos/sharpness`, `eos/lr_sharpness`, ...),
  so every Lightning logger (TensorBoard, CSV, ...) records them at Lightning's `log_every_n_steps`
  cadence, and `eos/lr` and `eos/unstable` show in the progress bar. Values not measured on a step (NaN) are
  left out.
* **The sharpness monitor** (`monitor_budget`, 0.05 of training time by default; None turns it off) runs in the
  tuner (with a law and with `law=None`, which leaves the user's lr and scheduler untouched: the parameters are
  those of a run without the callback). `eos/sharpness`, `eos/lr_sharpness` and, for adaptive optimizers,
  `eos/preconditioned_sharpness` / `eos/preconditioned_lr_sharpness` carry its latest estimate on every step
  (`eos/sharpness_age` steps old); `eos/unstable` turns 1 (and a RuntimeWarning is raised once) when lr x sharpness
  has been beyond the optimizer's edge (`eos/edge`) by more than `monitor_margin` for `monitor_patience`
  consecutive measurements, or on one that is a Ritz value of the step's own Hessian (such as the first step's).
  Its state (trackers, measured times, credit, warning) rides in the optimizer's state dict like the rest of the
  tuner's, so a resumed fit continues it.
* **The horizon of a decaying law** (`CDAT(decay="cosine" | "linear")` without `horizon=`): filled in at fit start
  from `trainer.estimated_stepping_batches`, the optimizer steps of the whole fit (the same number when a fit
  resumes from a checkpoint, whose law state holds the steps already taken).
  Loggers write every `log_every_n_steps` steps (50 by default): each write gets, per name, the
  latest value measured since the previous write (a sharpness tracked at step 100 is written at step
  149, not lost), and `eos/skipped` / `eos/fallback` count the steps since the previous write.
* **Schedulers and the lr curves.** `lr_mode="override"` (default): the law's lr is applied, the
  scheduler's only keeps the per-group lr ratios. `lr_mode="multiply"`: the law's lr times the
  schedule's factor `lr(t) / base lr` (the group's `initial_lr`). The tuner restores the groups'
  lr after each step, so the scheduler steps from its own values (chainable schedulers such as
  `LinearLR` multiply the group's current lr) and checkpoints hold them.

    `LearningRateMonitor` reads `param_group["lr"]` in its `on_train_batch_start` (and
    `on_train_epoch_start`) and logs it at the step about to run, before the law has decided that
    step's lr. In override mode the groups hold the scheduler's lr, which the tuner ignores, so its
    `lr-<Optimizer>` curve would contradict `eos/lr`. The callback therefore places, in `setup`, a
    pair of stateless helper callbacks around each `LearningRateMonitor` in `trainer.callbacks` (a
    new list is assigned, as Lightning's own callback connector does, so no hook iteration in progress
    is disturbed; they are removed at `teardown`): the one before it writes the lr the tuner applied
    last (times the groups' ratios) into the groups, the one after it puts the scheduler's values back.
    Nothing but the monitor runs in between, so the module, the scheduler, the tuner and checkpoints
    never see the written values. What each curve means:

    - override: `eos/lr` at step t is the lr step t applied; `lr-<Optimizer>` at step t is the lr the
      previous step applied (the lr in effect when step t starts; at the first step of a fit, the law's
      current lr: its initial lr, or the resumed one), i.e. `eos/lr` one step later. The monitor cannot
      show step t's own lr: it logs before step t runs, and the law decides that lr during the step, from
      the curvature measured there.
    - multiply: `lr-<Optimizer>` is the scheduler's lr `lr(t)`, left alone; `eos/lr` = `eos/law_lr`
      x `lr(t) / base lr` is the applied lr, and `eos/law_lr` the law's part of it.
    - `law=None` (measuring only): the optimizer's own lr is applied; both curves are the scheduler's.
* **Data parallel** (`strategy="ddp"`): DDP averages the gradient; every rank probes its own shard
  and the tuner averages the measurements over `torch.distributed`, so all ranks apply the same lr.
* **Sharded parameters** (`strategy=ModelParallelStrategy(...)`, FSDP2: the LightningModule applies
  `fully_shard` in `configure_model`; it runs on CPU with gloo, `init_device_mesh("cpu", ...)`). The
  optimizer holds DTensor parameters; the tuner works on each rank's shards and all-reduces its sums over the
  mesh (`eos_core.adapters.torch.sharding`), probes re-run `training_step` through the sharded modules
  (their forward gathers the parameters, the backward reduce-scatters the gradient), the route is
  `fd-onesided` (`auto`) or `fd-central`. The strategy saves `get_optimizer_state_dict` (sharded
  by default, through `torch.distributed.checkpoint`; full with `save_distributed_checkpoint=False`) and
  loads with `set_optimizer_state_dict` after `on_fit_start`, so the tuner's state travels in both
  directions (in the optimizer's first param group and per-parameter state, which those functions keep).
  `FSDPStrategy` (`strategy="fsdp"`) is FSDP1, whose flat parameters the tuner cannot read, and
  `DeepSpeedStrategy` replaces the optimizer: both are refused.
* **Bad input.** A step whose loss or gradient is NaN/Inf is skipped (parameters and optimizer state
  untouched, `RuntimeWarning`, `eos/skipped` = 1); a non-finite curvature keeps the last good lr
  (`RuntimeWarning`, `eos/fallback` = 1).
"""

from __future__ import annotations

from eos_core._optional import require

require("lightning", extra="lightning", feature="eos_core.integrations.lightning")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
from collections.abc import Callable, Iterator, Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor  # noqa: E402
from lightning.pytorch.strategies import (  # noqa: E402
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.utilities.model_helpers import is_overridden  # noqa: E402
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature  # noqa: E402

from eos_core import stats as S  # noqa: E402
from eos_core.adapters.torch import CurvatureTuner  # noqa: E402
from eos_core.integrations._common import (  # noqa: E402
    MONITOR_BUDGET,
    TunerSpec,
    UnwrittenDiagnostics,
    applied_group_lrs,
    capture_rng,
    law_with_horizon,
    probing,
    replay_rng,
    sum_losses,
    tuner_calls,
    unwrap_optimizer,
)
from eos_core.laws.base import Law  # noqa: E402

__all__ = ["EdgeOfStabilityCallback"]

_OWNER = "EdgeOfStabilityCallback"
LossFunction = Callable[[pl.LightningModule, Any, int], torch.Tensor]
#: `LightningModule._current_fx_name` while Lightning runs `training_step` (set by its strategy-hook caller)
_TRAINING_STEP = "training_step"


@dataclasses.dataclass
class _MicroBatch:
    """One micro-batch of the step, and the random state its `training_step` started from."""

    batch: Any
    batch_idx: int
    rng: dict[str, Any]


class EdgeOfStabilityCallback(pl.Callback):
    """Tune the learning rate of a LightningModule's optimizer with an eos_core law and log the curvature.

    Args:
        law: the tuning law (e.g. `CDAT(scale=2.0, ema=0.9)`), or None to leave the lr (and the user's scheduler)
            alone and only measure: the sharpness monitor, `sharpness_every`. A law with a decay over the run's
            horizon (`CDAT(decay="cosine")` without `horizon=`) gets `trainer.estimated_stepping_batches` (optimizer
            steps of the whole fit: max_steps, or max_epochs x batches / accumulate_grad_batches) at fit start.
        monitor_budget: the sharpness monitor's share of training time, in (0, 1] (default 0.05; None turns it
            off): a streaming lambda_max of the Hessian (and, for Adam / AdamW / RMSprop / Adagrad, of the
            preconditioned Hessian) advanced by one Hessian-vector product every few steps
            ([`eos_core.adapters.torch.monitor`][]), logged as `eos/sharpness`, `eos/lr_sharpness`,
            `eos/preconditioned_sharpness`, `eos/preconditioned_lr_sharpness` on every step, with
            `eos/unstable` (1 while lr x sharpness has been beyond the optimizer's edge of stability by more than
            `monitor_margin` for `monitor_patience` measurements; a RuntimeWarning marks each onset) and `eos/edge`.
            The options `monitor_edge`, `monitor_margin`, `monitor_patience` go in `tuner_options`.
        probe_every: measure the law's statistics every that many optimizer steps (reuse the lr between).
        sharpness_every: every that many steps, log `sharpness` (lambda_max), `lr_sharpness` and, for
            Adam-like optimizers, `preconditioned_sharpness`.
        route: curvature route; `"auto"` falls back from double backward to the math SDPA kernel to
            finite differences.
        lr_mode: `"override"` or `"multiply"` (see the module docstring).
        log_prefix: prefix of the logged names (`"eos/"`).
        prog_bar: diagnostics (names without the prefix) also shown in the progress bar: by default the applied
            `lr` and the monitor's warning `unstable` (0, or 1 while the run is beyond the edge of stability).
        loss_fn: `loss_fn(pl_module, batch, batch_idx) -> loss` for the probes, one micro-batch's loss as
            `training_step` returns it; default: `training_step` itself (its loss, or the dict's `"loss"`).
        **tuner_options: more tuner options, by the names of [`eos_core.settings.TunerSettings`][]
            (`monitor_edge`, `monitor_margin`, `monitor_patience`, `sharpness_iters`, `sharpness_tol`, `seed`,
            `fd_eps`, `fd_above`, `skip_nonfinite`, `warn` (True or False), `clipped_gradients`, `linear_in_lr`);
            `power_iters` / `power_tol` still work, with a DeprecationWarning. `reference_lr` is set by the callback
            (the scheduler's base lr).

    Raises:
        ValueError: an invalid law, option or `loss_fn`, named in the message (at construction); at fit start, a
            law that needs the run's horizon when Lightning does not know the number of steps (an iterable dataset
            without a length and no `max_steps`).

    Attributes:
        settings: the validated [`TunerSettings`][eos_core.settings.TunerSettings].
        tuner: the [`CurvatureTuner`][eos_core.adapters.torch.CurvatureTuner] (None before `fit` starts). It stays
            attached after `fit` (so a `trainer.save_checkpoint` after `fit` saves its state) until the next `fit`
            replaces it.
        probing: True while a probe evaluates the objective (so `training_step` can skip side effects).

    Examples:
        >>> callback = EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9), sharpness_every=100)  # doctest: +SKIP
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[callback])  # doctest: +SKIP
        >>> trainer.fit(module, datamodule=data)  # doctest: +SKIP
        >>> callback.tuner.diagnostics["lr"]  # the lr of the last step  # doctest: +SKIP
    """

    def __init__(
        self,
        law: Law | None,
        *,
        monitor_budget: float | None = MONITOR_BUDGET,
        probe_every: int = 1,
        sharpness_every: int | None = None,
        route: str = "auto",
        lr_mode: str = "override",
        log_prefix: str = "eos/",
        prog_bar: Sequence[str] = ("lr", "unstable"),
        loss_fn: LossFunction | None = None,
        **tuner_options: Any,
    ) -> None:
        super().__init__()
        options = dict(probe_every=probe_every, sharpness_every=sharpness_every, route=route, lr_mode=lr_mode,
                       monitor_budget=monitor_budget, **tuner_options)
        self._spec = TunerSpec(_OWNER, law, options, stacklevel=2)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"{_OWNER}: loss_fn must be callable(pl_module, batch, batch_idx), got {loss_fn!r}")
        self.law = law
        self.settings = self._spec.settings
        self.log_prefix = str(log_prefix)
        self.prog_bar = frozenset(prog_bar)
        self.loss_fn = loss_fn
        self.tuner: CurvatureTuner | None = None
        self.probing = False
        self._module: pl.LightningModule | None = None
        self._window: list[_MicroBatch] = []
        self._window_loss = 0.0
        self._calls: int | None = None  # tuner.calls when the current batch started
        self._unwritten = UnwrittenDiagnostics()
        self._devices: list[torch.Tensor] = []
        self._step_hook: Any | None = None  # the optimizer step pre-hook (a RemovableHandle)
        self._forward_hooks: list[Any] = []  # forward pre-hooks, while armed
        self._applied_lr: float | None = None  # the lr the last (not skipped) step applied, in this fit
        self._scheduler_lrs: list[Any] | None = None  # the groups' own lr while LearningRateMonitor reads

    # ---------------------------------------------------------------------------------------------
    # attach / detach
    # ---------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Lightning hook: for `fit`, check the run and place the helpers around each `LearningRateMonitor`.

        Args:
            trainer: the Lightning trainer.
            pl_module: the LightningModule.
            stage: `"fit"`, `"validate"`, `"test"` or `"predict"`; only `"fit"` acts.

        Raises:
            ValueError: manual optimization, an unsupported strategy (FSDP1, DeepSpeed, ...), or a law that needs
                the step's loss under `accumulate_grad_batches > 1`.
        """
        if stage == "fit":
            self._check(trainer, pl_module)
            self._surround_lr_monitors(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning hook: attach the tuner to the trainer's optimizer (before Lightning restores a checkpoint).

        A tuner of a previous `fit` is detached first; a law that needs the run's horizon gets
        `trainer.estimated_stepping_batches`.

        Args:
            trainer: the Lightning trainer.
            pl_module: the LightningModule.

        Raises:
            ValueError: as in `setup`; more or fewer than one optimizer; an optimizer or setting the tuner refuses;
                a law that needs the run's horizon when Lightning does not know the number of steps.
        """
        self._check(trainer, pl_module)
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"{_OWNER} tunes exactly one optimizer; configure_optimizers returned {len(optimizers)}")
        precision = trainer.precision_plugin
        self._release()
        if self.tuner is not None:  # from a previous fit
            self.tuner.detach()
            self.tuner = None
        optimizer = unwrap_optimizer(optimizers[0])
        # registered before the tuner's own pre-hook, so it runs first (hooks run in registration order)
        self._step_hook = optimizer.register_step_pre_hook(self._before_optimizer_step)
        clipping = bool(trainer.gradient_clip_val) or is_overridden("configure_gradient_clipping", pl_module)
        try:
            law = self.law
            if getattr(law, "needs_horizon", False):  # the whole fit's optimizer steps (accumulation counted)
                law = law_with_horizon(_OWNER, law, trainer.estimated_stepping_batches,
                                       "trainer.estimated_stepping_batches")
            self.tuner = self._spec.make_tuner(
                optimizer, model=pl_module, grad_scaler=getattr(precision, "scaler", None),
                clipped_gradients=clipping, law=law,
                hint="Return a supported optimizer from configure_optimizers and do not attach a CurvatureTuner to "
                     "it yourself (use one EdgeOfStabilityCallback per Trainer).")
        except ValueError:
            self._release()
            raise
        self._module = pl_module
        self._window, self._window_loss, self._calls = [], 0.0, None
        self._applied_lr = None
        self._unwritten.clear()
        # one tensor per device: what capture_rng needs to know which CUDA generators to record
        self._devices = list({p.device: p for p in pl_module.parameters()}.values())

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{_OWNER} needs automatic optimization, but {type(pl_module).__name__}.automatic_optimization is "
                "False. With manual optimization, wrap the optimizer yourself: tuner = CurvatureTuner(optimizer, law, "
                "model=self) (eos_core.adapters.torch), call tuner.set_objective(lambda: <loss on the batch>) before "
                "each opt.step(), and log tuner.diagnostics."
            )
        strategy = trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            raise ValueError(
                f"{_OWNER} does not support FSDPStrategy (strategy='fsdp'): it is FSDP1, whose flat parameters the "
                "tuner cannot read. Shard with FSDP2: strategy=ModelParallelStrategy(data_parallel_size=<processes>, "
                "tensor_parallel_size=1) and fully_shard(...) in configure_model (see the README, Sharded training)"
            )
        supported = SingleDeviceStrategy | DDPStrategy | ModelParallelStrategy
        if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, supported):
            raise ValueError(
                f"{_OWNER} supports single-device, DDP and ModelParallelStrategy (FSDP2) strategies "
                f"(strategy='auto', 'ddp', 'ddp_spawn', ModelParallelStrategy(...)); {type(strategy).__name__} "
                "replaces the optimizer or the parameters the tuner hooks"
            )
        if (self._spec.needs & {S.LOSS} and trainer.accumulate_grad_batches > 1):
            raise ValueError(
                f"{_OWNER}: {type(self.law).__name__} needs the step's loss, but with accumulate_grad_batches > 1 "
                "Lightning's closure returns only the last micro-batch's loss; use accumulate_grad_batches=1 or a "
                "law that does not use the loss (CDAT, AdaEoS, ...)"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Lightning hook: after `fit`, remove the hooks and helpers (the tuner stays attached until the next `fit`).

        Args:
            trainer: the Lightning trainer.
            pl_module: the LightningModule.
            stage: the stage ending; only `"fit"` acts.
        """
        # The tuner stays attached after fit, so that trainer.save_checkpoint(...) after fit still saves its
        # state; the next fit's on_fit_start detaches it. The hooks, helpers and batch references go.
        if stage == "fit":
            self._release()
            self._remove_lr_monitor_helpers(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Lightning hook: remove the hooks and helpers when training fails (the exception propagates).

        Args:
            trainer: the Lightning trainer.
            pl_module: the LightningModule.
            exception: the exception raised.
        """
        self._release()
        self._remove_lr_monitor_helpers(trainer)

    def _release(self) -> None:
        self._disarm()
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        self._restore_scheduler_lrs()
        self._window = []

    # ---------------------------------------------------------------------------------------------
    # the step
    # ---------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Lightning hook: record the micro-batch and hand the tuner the objective of the step this batch ends in.

        The random state is recorded here as a fallback; the exact one is taken where the micro-batch's
        `training_step` starts (see the module docstring).

        Args:
            trainer: the Lightning trainer.
            pl_module: the LightningModule.
            batch: the micro-batch.
            batch_idx: its index in the epoch.
        """
        tuner = self.tuner
        if tuner is None:
            return
        # Lightning zeroes the gradients at the first micro-batch of a window (batch_idx % k == 0): the
        # accumulated gradient is that of the micro-batches since then.
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self._window, self._window_loss = [], 0.0
        self._calls = tuner_calls(tuner)
        # the state now is only a fallback: later hooks may still draw random numbers before training_step
        self._window.append(_MicroBatch(batch, batch_idx, capture_rng(self._devices)))
        self._arm(pl_module)
        # The objective of the optimizer step that ends this window: set at every micro-batch, the last one
        # set before the step (this batch's, if it steps) is the one the tuner uses.
        tuner.set_objective(functools.partial(self._objective, trainer, pl_module, tuple(self._window)))

    def _arm(self, pl_module: pl.LightningModule) -> None:
        """Record the random state at the first module call of this micro-batch's `training_step`."""
        self._disarm()
        for module in pl_module.modules():
            try:
                self._forward_hooks.append(module.register_forward_pre_hook(self._at_first_forward))
            except RuntimeError:  # a TorchScript submodule takes no hooks: its calls are not watched
                continue

    def _disarm(self) -> None:
        for handle in self._forward_hooks:
            handle.remove()
        self._forward_hooks = []

    def _at_first_forward(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self.probing or not self._window:
            return
        running = getattr(self._module, "_current_fx_name", None)
        if running is not None and running != _TRAINING_STEP:
            return  # a forward call from another hook (a later callback's on_train_batch_start, ...)
        self._window[-1].rng = capture_rng(self._devices)
        self._disarm()

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...],
                               kwargs: dict[str, Any]) -> None:
        # runs right before the tuner's own pre-hook, which calls the closure (training_step) next
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is not None and self._window and not self.probing:
            self._window[-1].rng = capture_rng(self._devices)
            self._disarm()

    def _objective(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                   window: tuple[_MicroBatch, ...]) -> torch.Tensor:
        losses = []
        with probing(self), _discarding_logs(trainer), trainer.precision_plugin.train_step_context():
            for micro in window:
                replay_rng(micro.rng)
                losses.append(self._loss(pl_module, micro.batch, micro.batch_idx))
        return sum_losses(losses) / trainer.accumulate_grad_batches

    def _loss(self, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(pl_module, batch, batch_idx)
        if is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2):
            output = pl_module.training_step(batch, batch_idx)
        else:
            output = pl_module.training_step(batch)
        if isinstance(output, Mapping):
            output = output.get("loss")
        if not isinstance(output, torch.Tensor):
            raise RuntimeError(
                f"{_OWNER}: training_step returned {type(output).__name__} when re-run for the curvature probe; it "
                "must return the loss (or a dict with 'loss') on every batch, or pass loss_fn=..."
            )
        return output

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Lightning hook: after an optimizer step, log the tuner's diagnostics through `pl_module.log`.

        Nothing is logged for a micro-batch that did not step (gradient accumulation, a step skipped by a
        GradScaler). The values measured since the loggers last wrote are merged (latest value per name,
        `skipped` / `fallback` counted); under accumulation `loss` is the window's summed loss.

        Args:
            trainer: the Lightning trainer.
            pl_module: the LightningModule.
            outputs: what `training_step` returned (its loss, already divided by `accumulate_grad_batches`).
            batch: the micro-batch.
            batch_idx: its index in the epoch.
        """
        if self.tuner is None:
            return
        self._disarm()
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):  # already divided by accumulate_grad_batches by Lightning
            self._window_loss += float(loss.detach())
        # Whether the optimizer stepped in this batch: not while accumulating, nor when a GradScaler skipped the
        # step (inf gradients under 16-mixed), although Lightning counts it. (Not trainer.global_step: on resume
        # with ckpt_path=... Lightning restores it only after on_fit_start.)
        calls, self._calls = self._calls, None
        if calls is None or tuner_calls(self.tuner) == calls:
            return
        diagnostics = dict(self.tuner.diagnostics)
        if not diagnostics.get("skipped"):
            lr = float(diagnostics.get("lr", math.nan))
            self._applied_lr = lr if math.isfinite(lr) else self._applied_lr
            if trainer.accumulate_grad_batches > 1:
                diagnostics["loss"] = self._window_loss
        self._window, self._window_loss = [], 0.0
        self._unwritten.add(diagnostics)
        if trainer.barebones:
            self._unwritten.clear()
            return
        for name, value in self._unwritten.values.items():
            pl_module.log(self.log_prefix + name, value, on_step=True, on_epoch=False,
                          prog_bar=name in self.prog_bar, batch_size=1)
        if _loggers_write_now(trainer):
            self._unwritten.clear()

    # ---------------------------------------------------------------------------------------------
    # what LearningRateMonitor shows (see the module docstring)
    # ---------------------------------------------------------------------------------------------
    def _surround_lr_monitors(self, trainer: pl.Trainer) -> None:
        if not self._spec.overrides_lr:
            return
        callbacks: list[pl.Callback] = []
        for callback in trainer.callbacks:
            if isinstance(callback, _LearningRateShown) and callback.owner is self:
                continue  # from a fit that ended without teardown
            if isinstance(callback, LearningRateMonitor):
                callbacks += [_LearningRateShown(self, show=True), callback, _LearningRateShown(self, show=False)]
            else:
                callbacks.append(callback)
        # A new list: the hook iteration in progress (setup) goes on over the old one undisturbed.
        trainer.callbacks = callbacks

    def _remove_lr_monitor_helpers(self, trainer: pl.Trainer) -> None:
        mine = [cb for cb in trainer.callbacks if isinstance(cb, _LearningRateShown) and cb.owner is self]
        if mine:
            trainer.callbacks = [cb for cb in trainer.callbacks if not any(cb is m for m in mine)]

    def _show_applied_lr(self) -> None:
        """Write the lr the tuner applied last (times the groups' ratios) into the groups, saving theirs."""
        tuner = self.tuner
        if tuner is None or self._scheduler_lrs is not None:
            return
        lr = self._applied_lr
        if lr is None:  # no step yet in this fit: the law's current lr (its initial lr, or the resumed one)
            lr = float(getattr(tuner.law_state, "lr", math.nan))
        if not math.isfinite(lr):
            return
        groups = tuner.optimizer.param_groups
        self._scheduler_lrs = [group["lr"] for group in groups]
        for group, value in zip(groups, applied_group_lrs(lr, groups), strict=True):
            group["lr"] = value

    def _restore_scheduler_lrs(self) -> None:
        saved, self._scheduler_lrs = self._scheduler_lrs, None
        if saved is None or self.tuner is None:
            return
        for group, lr in zip(self.tuner.optimizer.param_groups, saved, strict=True):
            group["lr"] = lr


class _LearningRateShown(pl.Callback):
    """A helper placed right before (`show=True`) and right after (`show=False`) a `LearningRateMonitor`.

    The one before shows the monitor the applied lr in `lr_mode="override"`; the one after puts the scheduler's lr
    back once the monitor has read the groups.
    """

    def __init__(self, owner: EdgeOfStabilityCallback, *, show: bool) -> None:
        super().__init__()
        self.owner = owner
        self.show = show

    def _act(self) -> None:
        if self.show:
            self.owner._show_applied_lr()
        else:
            self.owner._restore_scheduler_lrs()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._act()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._act()


def _loggers_write_now(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this step's logged values to its loggers.

    Called from `on_train_batch_end`, as Lightning's own check is, right after.

    Returns:
        Lightning's `should_update_logs` (every `log_every_n_steps` steps and at the last step); True when it
        cannot be read.
    """
    flag = getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", None)
    return flag if isinstance(flag, bool) else True


@contextlib.contextmanager
def _discarding_logs(trainer: pl.Trainer) -> Iterator[None]:
    """Undo what `self.log` calls record while a probe re-runs `training_step`.

    Lightning keeps the values logged in the running loop's result collection (`trainer._results`, a dict
    of per-key metric objects whose state `self.log` replaces). The collection's entries and each entry's
    attributes are copied before and put back after, so probes leave no trace in step or epoch metrics.
    """
    results = getattr(trainer, "_results", None)
    if results is None or not isinstance(results, dict):
        yield
        return
    entries = dict(results)
    saved = [(entry, dict(vars(entry))) for entry in entries.values() if hasattr(entry, "__dict__")]
    own = dict(vars(results))
    connector = getattr(trainer, "_logger_connector", None)
    current_fx = getattr(connector, "_current_fx", None)  # self.log records the hook it was called from
    try:
        yield
    finally:
        results.clear()
        results.update(entries)
        for entry, attributes in saved:
            vars(entry).clear()
            vars(entry).update(attributes)
        vars(results).clear()
        vars(results).update(own)
        if connector is not None and hasattr(connector, "_current_fx"):
            connector._current_fx = current_fx
