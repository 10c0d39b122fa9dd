"""Lightning callback: one line puts a curvature-aware tuner on a LightningModule's optimizer and logs its dynamics.

>>> trainer = pl.Trainer(callbacks=[EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9))])  # doctest: +SKIP

Design (Lightning 2.x; the facts below are from ``lightning/pytorch`` 2.6):

* **Where the tuner attaches.** In ``on_fit_start``, to ``trainer.optimizers[0]`` (the torch optimizer
  inside Lightning's ``LightningOptimizer``). ``Trainer._run`` calls ``strategy.setup`` (which runs
  ``configure_optimizers``), then the ``on_fit_start`` hooks, and only then
  ``_checkpoint_connector.restore_training_state()``, which calls ``optimizer.load_state_dict`` for every
  optimizer, whatever ``strategy.restore_checkpoint_after_setup`` says (that flag only moves the
  restore of the module and callbacks). So when a fit resumes (``ckpt_path=...``) the tuner is already
  attached when the optimizer's state is loaded, and its state rides in the optimizer's own
  ``state_dict()`` (key ``"eos_core"``) in both directions: the callback has no state of its own and
  needs no ``state_dict``.
* **How the step is tuned.** Automatic optimization calls ``optimizer.step(closure)`` through the
  precision plugin; the tuner's step hooks run it. The tuner calls Lightning's closure once itself
  (``training_step``, ``backward``, ``on_before_optimizer_step`` and gradient clipping all run there, so
  the tuner sees the clipped gradient), and the callback gives the tuner, through
  ``tuner.set_objective``, the loss function its curvature probes evaluate: the module's own
  ``training_step`` re-run on the step's batches (not Lightning's closure, which would run the hooks,
  zero the gradients and backpropagate again). Probes call ``pl_module.training_step`` directly, under
  the precision plugin's ``train_step_context()`` (autocast as in the real step), never through the DDP
  wrapper (so no gradient reduction starts), with the random state each batch had when it was fetched
  (same dropout masks as the real step).
* **Gradient accumulation** (``accumulate_grad_batches = k``). Lightning divides each micro-batch's loss
  by ``k`` before ``backward`` and zeroes the gradients at batches with ``batch_idx % k == 0``, so the
  step's gradient is that of ``sum_i loss_i / k`` over the micro-batches since the last zeroing (a short
  last window of an epoch is still divided by ``k``). The probe evaluates exactly that function, so the
  curvature and the gradient describe the same objective (CDAT's ratio is not scale-free in the
  objective). The ``eos/loss`` value logged under accumulation is that sum as well.
* **Gradient clipping** runs inside the closure, so ``g`` (in ``g.u`` and ``grad_norm``) and the update
  ``u`` are the clipped ones: clipping shrinks the step as it does with a fixed lr. The clipped
  gradient is not the objective's, so when clipping is on (``gradient_clip_val`` or an overridden
  ``configure_gradient_clipping``) finite-difference curvature evaluates g(w) again instead of reusing
  it (``clipped_gradients=True`` on the tuner; pass it yourself if ``on_before_optimizer_step`` clips).
* **The user's logging during probes.** ``training_step`` usually calls ``self.log``. Each probe
  evaluation would log again (on-epoch means would count probes), so the values logged during a probe
  are discarded (the trainer's result collection is restored after each evaluation). Side effects
  outside ``self.log`` (a torchmetrics object's ``update``, counters) do happen again in probes: guard
  them with ``callback.probing`` or pass ``loss_fn=`` (a side-effect-free loss).
* **Logging.** After each optimizer step the tuner's numeric diagnostics go through ``pl_module.log``
  (``on_step=True``), named ``"eos/<name>"`` (``eos/lr``, ``eos/sharpness``, ``eos/lr_sharpness``, ...),
  so every Lightning logger (TensorBoard, CSV, ...) records them at Lightning's ``log_every_n_steps``
  cadence, and ``eos/lr`` shows in the progress bar. Values not measured on a step (NaN) are left out.
  Loggers write every ``log_every_n_steps`` steps (50 by default): each write gets, per name, the
  latest value measured since the previous write (a sharpness tracked at step 100 is written at step
  149, not lost), and ``eos/skipped`` / ``eos/fallback`` count the steps since the previous write.
  The applied lr is ``eos/lr``; Lightning's ``LearningRateMonitor`` shows the scheduler's lr, which
  the tuner restores after each step.
* **Schedulers.** ``lr_mode="override"`` (default): the law's lr is applied, the scheduler's only
  keeps the per-group lr ratios. ``lr_mode="multiply"``: the law's lr times the schedule's factor
  ``lr(t) / base lr`` (the group's ``initial_lr``).
* **Data parallel** (``strategy="ddp"``): DDP averages the gradient; every rank probes its own shard
  and the tuner averages the measurements over ``torch.distributed``, so all ranks apply the same lr.
  Sharded strategies (FSDP, DeepSpeed, model parallel) are refused: the tuner needs whole parameters.
* **Bad input.** A step whose loss or gradient is NaN/Inf is skipped (parameters and optimizer state
  untouched, ``RuntimeWarning``, ``eos/skipped`` = 1); a non-finite curvature keeps the last good lr
  (``RuntimeWarning``, ``eos/fallback`` = 1).
"""

from __future__ import annotations

from eos_core._optional import require

require("lightning", extra="lightning", feature="eos_core.integrations.lightning")

import contextlib  # noqa: E402
import functools  # noqa: E402
from collections.abc import Callable, Iterator, Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
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
    TunerSettings,
    UnwrittenDiagnostics,
    capture_rng,
    probing,
    replay_rng,
    sum_losses,
)
from eos_core.laws.base import Law  # noqa: E402

__all__ = ["EdgeOfStabilityCallback"]

_OWNER = "EdgeOfStabilityCallback"
LossFunction = Callable[[pl.LightningModule, Any, int], torch.Tensor]


class EdgeOfStabilityCallback(pl.Callback):
    """Tune the learning rate of a LightningModule's optimizer with an eos_core law and log the curvature.

    Args:
        law: the tuning law (e.g. ``CDAT(scale=2.0, ema=0.9)``), or None to leave the lr alone and only
            measure (with ``sharpness_every``).
        probe_every: measure the law's statistics every that many optimizer steps (reuse the lr between).
        sharpness_every: every that many steps, log ``sharpness`` (lambda_max), ``lr_sharpness`` and, for
            Adam-like optimizers, ``preconditioned_sharpness``.
        route: curvature route; ``"auto"`` falls back from double backward to the math SDPA kernel to
            finite differences.
        lr_mode: ``"override"`` or ``"multiply"`` (see the module docstring).
        log_prefix: prefix of the logged names (``"eos/"``).
        prog_bar: diagnostics (names without the prefix) also shown in the progress bar.
        loss_fn: ``loss_fn(pl_module, batch, batch_idx) -> loss`` for the probes, one micro-batch's loss as
            ``training_step`` returns it; default: ``training_step`` itself (its loss, or the dict's ``"loss"``).
        **tuner_options: more :class:`~eos_core.adapters.torch.CurvatureTuner` settings (``power_iters``,
            ``fd_eps``, ``skip_nonfinite``, ``linear_in_lr``, ...).

    Attributes:
        tuner: the :class:`CurvatureTuner` (None before ``fit`` starts). It stays attached after ``fit`` (so a
            ``trainer.save_checkpoint`` after ``fit`` saves its state) until the next ``fit`` replaces it.
        probing: True while a probe evaluates the objective (so ``training_step`` can skip side effects).
    """

    def __init__(
        self,
        law: Law | None,
        *,
        probe_every: int = 1,
        sharpness_every: int | None = None,
        route: str = "auto",
        lr_mode: str = "override",
        log_prefix: str = "eos/",
        prog_bar: Sequence[str] = ("lr",),
        loss_fn: LossFunction | None = None,
        **tuner_options: Any,
    ) -> None:
        super().__init__()
        self.settings = TunerSettings(_OWNER, law, probe_every=probe_every, sharpness_every=sharpness_every,
                                      route=route, lr_mode=lr_mode, options=tuner_options)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"{_OWNER}: loss_fn must be callable(pl_module, batch, batch_idx), got {loss_fn!r}")
        self.law = law
        self.log_prefix = str(log_prefix)
        self.prog_bar = frozenset(prog_bar)
        self.loss_fn = loss_fn
        self.tuner: CurvatureTuner | None = None
        self.probing = False
        self._window: list[tuple[Any, int, dict[str, Any]]] = []
        self._window_loss = 0.0
        self._last_step: int | None = None
        self._unwritten = UnwrittenDiagnostics()
        self._devices: list[torch.Tensor] = []

    # ---------------------------------------------------------------------------------------------
    # attach / detach
    # ---------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module)
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"{_OWNER} tunes exactly one optimizer; configure_optimizers returned {len(optimizers)}")
        precision = trainer.precision_plugin
        if self.tuner is not None:  # from a previous fit
            self.tuner.detach()
            self.tuner = None
        clipping = bool(trainer.gradient_clip_val) or is_overridden("configure_gradient_clipping", pl_module)
        self.tuner = self.settings.make_tuner(
            optimizers[0], model=pl_module, grad_scaler=getattr(precision, "scaler", None),
            clipped_gradients=clipping,
            hint="Return a supported optimizer from configure_optimizers and do not attach a CurvatureTuner to it "
                 "yourself (use one EdgeOfStabilityCallback per Trainer).")
        self._window, self._window_loss = [], 0.0
        self._last_step = None  # the tuner's step index of the last step whose diagnostics were logged
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
        sharded = (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy)
        if isinstance(strategy, sharded) or not isinstance(strategy, SingleDeviceStrategy | DDPStrategy):
            raise ValueError(
                f"{_OWNER} supports single-device and DDP strategies (strategy='auto', 'ddp', 'ddp_spawn', ...); "
                f"{type(strategy).__name__} shards or replaces the parameters the tuner has to read whole"
            )
        if (self.settings.needs & {S.LOSS} and trainer.accumulate_grad_batches > 1):
            raise ValueError(
                f"{_OWNER}: {type(self.law).__name__} needs the step's loss, but with accumulate_grad_batches > 1 "
                "Lightning's closure returns only the last micro-batch's loss; use accumulate_grad_batches=1 or a "
                "law that does not use the loss (CDAT, AdaEoS, ...)"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The tuner stays attached after fit, so that trainer.save_checkpoint(...) after fit still saves its
        # state; the next fit's on_fit_start detaches it. Only the batch references are dropped here.
        self._window = []

    # ---------------------------------------------------------------------------------------------
    # the step
    # ---------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        tuner = self.tuner
        if tuner is None:
            return
        # Lightning zeroes the gradients before the first micro-batch of a window (batch_idx % k == 0):
        # the accumulated gradient is that of the micro-batches since then.
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self._window, self._window_loss = [], 0.0
        self._window.append((batch, batch_idx, capture_rng(self._devices)))
        # The objective of the optimizer step that ends this window: set at every micro-batch, the last one
        # set before the step (this batch's, if it steps) is the one the tuner uses.
        tuner.set_objective(functools.partial(self._objective, trainer, pl_module, tuple(self._window)))

    def _objective(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                   window: tuple[tuple[Any, int, dict[str, Any]], ...]) -> torch.Tensor:
        losses = []
        with probing(self), _discarding_logs(trainer), trainer.precision_plugin.train_step_context():
            for batch, batch_idx, rng in window:
                replay_rng(rng)
                losses.append(self._loss(pl_module, batch, batch_idx))
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
        if self.tuner is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):  # already divided by accumulate_grad_batches by Lightning
            self._window_loss += float(loss.detach())
        # The tuner's step index tells whether the optimizer stepped in this batch: not while accumulating, nor
        # when a GradScaler skipped the step (inf gradients under 16-mixed), although Lightning counts it. (Not
        # trainer.global_step: on resume with ckpt_path=... Lightning restores it only after on_fit_start.)
        step = self.tuner.diagnostics.get("step")
        if step is None or step == self._last_step:
            return
        self._last_step = step
        diagnostics = dict(self.tuner.diagnostics)
        if trainer.accumulate_grad_batches > 1 and not diagnostics.get("skipped"):
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


def _loggers_write_now(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this step's logged values to its loggers (every ``log_every_n_steps`` steps
    and at the last step); called from ``on_train_batch_end``, as Lightning's own check is, right after."""
    flag = getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", None)
    return flag if isinstance(flag, bool) else True


@contextlib.contextmanager
def _discarding_logs(trainer: pl.Trainer) -> Iterator[None]:
    """Undo what ``self.log`` calls record while a probe re-runs ``training_step``.

    Lightning keeps the values logged in the running loop's result collection (``trainer._results``, a dict
    of per-key metric objects whose state ``self.log`` replaces). The collection's entries and each entry's
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
