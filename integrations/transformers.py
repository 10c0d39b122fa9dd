"""Hugging Face `Trainer` callback: a curvature-aware tuner on the Trainer's optimizer, with no Trainer subclass.

```python
trainer = Trainer(model, args, train_dataset=data,
                  callbacks=[EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9))])
```

Design (the facts below are from `transformers` 5.25's `trainer.py` / `trainer_callback.py` and
`accelerate` 1.15):

* **Where the tuner attaches.** In `on_train_begin`, to the torch optimizer inside accelerate's
  `AcceleratedOptimizer` (`Trainer.optimizer.optimizer`): the Trainer creates the optimizer and the
  scheduler in `_prepare_for_training`, which runs before `on_train_begin` (callbacks never see the
  optimizer earlier). `optimizer.step()` of the Trainer reaches the inner optimizer, whose step hooks
  run the tuner; the Trainer calls it once per optimizer step, after the last micro-batch and after
  gradient clipping (`max_grad_norm`, 1.0 by default), so the tuner sees the clipped, accumulated
  gradient (in `g.u`, `grad_norm` and the update). The clipped gradient is not the objective's,
  so with `max_grad_norm > 0` finite-difference curvature evaluates g(w) again instead of reusing
  it (one more gradient per probe; set `max_grad_norm=0` to save it).
* **How the batch and model are obtained.** The callback gets the model as the `model` argument of the
  events (the unwrapped model, not the DDP wrapper). It registers a forward pre-hook with kwargs on it
  (`register_forward_pre_hook(..., with_kwargs=True)`) and records, between `on_step_begin` (fired
  before the first micro-batch of a step) and `on_pre_optimizer_step`, the inputs of every training
  forward call (`module.training` and grad enabled; evaluation and the probes themselves are not
  recorded), together with the random state at that moment. In `on_pre_optimizer_step` it hands the
  tuner (`tuner.set_objective`) the loss on those inputs: the model is called again on each recorded
  micro-batch with the same random state (same dropout masks) and its `outputs.loss` is taken, as
  `Trainer.compute_loss` does. Probes call the unwrapped model, so DDP never starts a gradient
  reduction for them, and accelerate's mixed-precision forward wrapper (autocast) applies as in training.
* **Gradient accumulation** (`gradient_accumulation_steps = k`). The probe evaluates the function whose
  gradient the Trainer accumulated: when the Trainer passed `num_items_in_batch` to the model (models
  that accept loss kwargs: each micro-batch's loss is already normalised by the token count of the whole
  step), the sum of the micro-batch losses (times the world size under `average_tokens_across_devices`,
  as `compute_loss` does); otherwise their mean (the Trainer divides each loss by the number of
  micro-batches of the step, `current_gradient_accumulation_steps`).
* **Curvature route.** `route="auto"`: double backward; a model using the flash / memory-efficient SDPA
  kernels (which cannot be differentiated twice) is retried with the math SDPA kernel, then one-sided
  finite differences; bf16 parameters are handled by the same chain. The route in use is
  `callback.tuner.route` and is logged once as text (`eos/route`).
* **Scheduler.** The Trainer steps its scheduler after every optimizer step; the tuner restores the
  groups' lr after its own step, so the scheduler runs unchanged. `lr_mode="override"` (default): the
  law's lr is applied and the scheduler is ignored (it only sets per-group ratios).
  `lr_mode="multiply"`: the law's lr times the schedule's factor `lr(t) / base lr` (the base lr is
  the group's `initial_lr`, so a warm-up that starts at 0 starts the tuned lr at 0 too).
* **The lr curves.** The Trainer logs `learning_rate` (`Trainer._get_learning_rate()`, read after
  `optimizer.step()` and before `lr_scheduler.step()`: the scheduler's lr of the step just taken)
  next to `eos/lr`. In override mode the scheduler's lr is not applied, so the callback replaces
  `learning_rate` in the logs (and in the `state.log_history` entry `Trainer.log` just appended)
  with the applied lr of the last step, `eos/lr`: the two curves are the same. In multiply mode
  `learning_rate` stays the scheduler's `lr(t)` (its factor is part of the applied lr), `eos/lr` =
  `eos/law_lr` x `lr(t) / base lr` is the applied lr and `eos/law_lr` the law's part of it.
  With `law=None` the optimizer's own lr is applied and both show it.
* **Logs.** `Trainer.log` appends a copy of the logs to `state.log_history` and then calls
  `on_log` on the callbacks in list order; `Trainer.__init__` puts the reporting integrations
  (`report_to`: TensorBoard, W&B, ...) before the callbacks passed in `callbacks=`. So in
  `on_init_end` and `on_train_begin` this callback moves itself right after `DefaultFlowCallback`
  in the Trainer's callback list (found as the `CallbackHandler` that is calling it), and in
  `on_log` it adds the last step's diagnostics as `"eos/<name>"` to the training logs (the ones with
  `learning_rate`) and to the entry `Trainer.log` just appended to `state.log_history`: every
  reporting callback, the progress bar and `trainer_state.json` get them. The Trainer logs every
  `logging_steps` steps; each log gets, per name, the latest value measured since the previous log
  (so a sharpness tracked at step 101 appears in the log of step 500 with the default
  `logging_steps=500`), and `eos/skipped` / `eos/fallback` count the steps since the previous log.
* **Checkpoints.** `Trainer._save_checkpoint` saves `optimizer.state_dict()` to `optimizer.pt` (under FSDP2,
  accelerate's `save_fsdp_optimizer`: `get_optimizer_state_dict`, a `torch.distributed.checkpoint` folder `optimizer_0`
  with `SHARDED_STATE_DICT`), which carries the tuner's state (`eos_core.adapters.torch.checkpoint`).
  `_prepare_for_training` loads it *before* `on_train_begin`: torch's `load_state_dict` drops the top-level `"eos_core"`
  key but keeps the copy in the first param group and the per-parameter state, and the tuner picks that up when the
  callback attaches it. accelerate's `load_fsdp_optimizer` (FSDP2, sharded) loads into a template it builds with
  `get_optimizer_state_dict` before any callback runs, so the tuner's entries are not loaded at all. When the tuner
  found no state (that case, or a checkpoint of state version 2) on resume (`state.global_step > 0` at
  `on_train_begin`), the callback reads it from the checkpoint itself: the `optimizer_0` folder with
  [`CurvatureTuner.load_distributed_checkpoint`][eos_core.adapters.torch.CurvatureTuner.load_distributed_checkpoint],
  else `optimizer.pt`. The folder the Trainer loaded is the `resume_from_checkpoint` argument of `train()`, resolved
  (`True` becomes `get_last_checkpoint(output_dir)`) and passed as a local variable to `Trainer._inner_training_loop`,
  which fires `on_train_begin`; the Trainer stores it nowhere else (`TrainingArguments.resume_from_checkpoint` is only
  what the user set in the arguments). So the callback looks for it on the call stack (the frame of the Trainer whose
  callback handler holds this callback, as it finds the `CallbackHandler`), then tries `args.resume_from_checkpoint` and
  `<output_dir>/checkpoint-<global_step>`. A file is used only if its optimizer state equals the state the Trainer just
  loaded; if none matches the callback warns and the tuner starts afresh.
* **Sharded parameters** (`TrainingArguments(fsdp=..., fsdp_config={"version": 2})`: accelerate applies
  FSDP2's `fully_shard`, the optimizer holds DTensor parameters). The tuner works on each rank's shards and
  all-reduces its sums (`eos_core.adapters.torch.sharding`); the probes call the sharded model (its
  forward gathers the parameters, the backward reduce-scatters the gradient); the route is `fd-onesided`
  (`auto`) or `fd-central`. FSDP1 (`fsdp_config["version"] = 1`) and DeepSpeed are refused. accelerate
  1.16 turns FSDP on only for GPU-type distributed runs (`AcceleratorState`: `MULTI_CPU` is not among them),
  so on CPU `fsdp=` is ignored and the Trainer runs DDP.
* **Step detection.** The callback tells that the optimizer stepped by `tuner.calls` (steps processed,
  skipped ones included) changing between `on_pre_optimizer_step` and `on_optimizer_step` (a
  GradScaler that skips `optimizer.step` on inf gradients leaves it unchanged).
* **Bad input.** A step whose loss or gradient is NaN/Inf is skipped (parameters and optimizer state
  untouched, `RuntimeWarning`, `eos/skipped` = 1); a non-finite curvature keeps the last good lr.
* **The sharpness monitor** (`monitor_budget`, 0.05 of training time by default; None turns it off) runs in the
  tuner, with a law and with `law=None` (which leaves the Trainer's lr and scheduler untouched: the parameters are
  those of a run without the callback). Each log gets `eos/sharpness`, `eos/lr_sharpness` and, for AdamW,
  `eos/preconditioned_sharpness` / `eos/preconditioned_lr_sharpness` (the latest estimates), `eos/edge` and
  `eos/unstable`: 1 (with a RuntimeWarning at its onset) when lr x sharpness has been beyond the optimizer's edge of
  stability by more than `monitor_margin` for `monitor_patience` consecutive measurements (or on one that is a
  Ritz value of the step's own Hessian, such as the first step's), so the console log
  line, `trainer_state.json` and every reporting integration show it. Its state rides in `optimizer.pt` with
  the rest of the tuner's.
* **The horizon of a decaying law** (`CDAT(decay="cosine" | "linear")` without `horizon=`): filled in at
  `on_train_begin` from `state.max_steps`, the Trainer's optimizer steps of the whole run (`max_steps`, or the
  epochs' steps after gradient accumulation; the same number when training resumes).
"""

from __future__ import annotations

from eos_core._optional import require

require("transformers", extra="transformers", feature="eos_core.integrations.transformers")

import functools  # noqa: E402
import inspect  # noqa: E402
import os  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments  # noqa: E402
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback  # noqa: E402

from eos_core import stats as S  # noqa: E402
from eos_core.adapters.torch import CurvatureTuner  # noqa: E402
from eos_core.integrations._common import (  # noqa: E402
    MONITOR_BUDGET,
    STATE_KEY,
    TunerSpec,
    UnwrittenDiagnostics,
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
_OPTIMIZER_FILE = "optimizer.pt"
#: accelerate's save_fsdp_optimizer folder (torch.distributed.checkpoint, SHARDED_STATE_DICT)
_FSDP_OPTIMIZER_FOLDER = "optimizer_0"
LossFunction = Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]
_Batch = tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]
#: statistics the tuner measures from the step's own gradient and update, without evaluating the loss
_GRADIENT_ONLY = frozenset({S.GRAD_DOT_UPDATE, S.GRAD_NORM_SQ, S.GRAD_PREV_UPDATE_COSINE})


class EdgeOfStabilityCallback(TrainerCallback):
    """Tune the learning rate of a `transformers.Trainer` with an eos_core law and log the curvature.

    Args:
        law: the tuning law (e.g. `CDAT(scale=2.0, ema=0.9)`), or None to leave the lr (and the Trainer's
            scheduler) alone and only measure: the sharpness monitor, `sharpness_every`. A law with a decay over the
            run's horizon (`CDAT(decay="cosine")` without `horizon=`) gets `state.max_steps` (the Trainer's
            optimizer steps of the whole run) when training begins.
        monitor_budget: the sharpness monitor's share of training time, in (0, 1] (default 0.05; None turns it
            off): a streaming lambda_max of the Hessian (and, for AdamW and the other adaptive optimizers, of the
            preconditioned Hessian; [`eos_core.adapters.torch.monitor`][]), logged as `eos/sharpness`,
            `eos/lr_sharpness`, `eos/preconditioned_sharpness`, `eos/preconditioned_lr_sharpness`, with
            `eos/unstable` (1 while lr x sharpness has been beyond the optimizer's edge of stability by more than
            `monitor_margin` for `monitor_patience` measurements; a RuntimeWarning marks each onset) and `eos/edge`.
            The options `monitor_edge`, `monitor_margin`, `monitor_patience` go in `tuner_options`.
        probe_every: measure the law's statistics every that many optimizer steps (reuse the lr between).
        sharpness_every: every that many steps, log `sharpness` (lambda_max), `lr_sharpness` and, for
            Adam-like optimizers, `preconditioned_sharpness`.
        route: curvature route (`"auto"`: see the module docstring).
        lr_mode: `"override"` or `"multiply"` (how the law's lr combines with the Trainer's scheduler).
        log_prefix: prefix of the logged names (`"eos/"`).
        loss_fn: `loss_fn(model, inputs) -> loss` for the probes, for one micro-batch's `inputs` (the
            keyword arguments the Trainer passed to the model), normalised as the Trainer's loss is before
            accumulation; default: `model(**inputs)`'s `loss`.
        **tuner_options: more tuner options, by the names of [`eos_core.settings.TunerSettings`][]
            (`monitor_edge`, `monitor_margin`, `monitor_patience`, `sharpness_iters`, `sharpness_tol`, `seed`,
            `fd_eps`, `fd_above`, `skip_nonfinite`, `warn` (True or False), `clipped_gradients`, `linear_in_lr`);
            `power_iters` / `power_tol` still work, with a DeprecationWarning. `reference_lr` is set by the callback
            (the scheduler's base lr).

    Raises:
        ValueError: an invalid law, option or `loss_fn`, named in the message (at construction); when training
            begins, a law that needs the run's horizon when the Trainer does not know its number of steps.

    Attributes:
        settings: the validated [`TunerSettings`][eos_core.settings.TunerSettings].
        tuner: the [`CurvatureTuner`][eos_core.adapters.torch.CurvatureTuner] (None before training starts). It
            stays attached after `train()` until the next `train()` replaces it.
        probing: True while a probe evaluates the model (a forward hook of yours can skip side effects).

    Examples:
        >>> callback = EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9), sharpness_every=100)  # doctest: +SKIP
        >>> trainer = Trainer(model, args, train_dataset=data, callbacks=[callback])  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> [entry.get("eos/lr") for entry in trainer.state.log_history]  # doctest: +SKIP
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
        loss_fn: LossFunction | None = None,
        **tuner_options: Any,
    ) -> None:
        options = dict(probe_every=probe_every, sharpness_every=sharpness_every, route=route, lr_mode=lr_mode,
                       monitor_budget=monitor_budget, **tuner_options)
        self._spec = TunerSpec(_OWNER, law, options, stacklevel=2)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"{_OWNER}: loss_fn must be callable(model, inputs), got {loss_fn!r}")
        self.law = law
        self.settings = self._spec.settings
        self.log_prefix = str(log_prefix)
        self.loss_fn = loss_fn
        self.tuner: CurvatureTuner | None = None
        self.probing = False
        self._model: torch.nn.Module | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._recording = False
        self._batches: list[_Batch] = []
        self._devices: list[torch.Tensor] = []
        self._unwritten = UnwrittenDiagnostics()
        self._calls: int | None = None  # tuner.calls before the optimizer step in progress
        self._route: str | None = None
        self._logged_route: str | None = None
        self._placement_warned = False

    # ---------------------------------------------------------------------------------------------
    # attach / detach
    # ---------------------------------------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """Trainer event: check the arguments and move this callback before the reporting integrations.

        Args:
            args: the Trainer's arguments.
            state: the Trainer's state.
            control: the Trainer's control flags.
            **kwargs: the event's other arguments.

        Raises:
            ValueError: arguments the callback does not support (`torch.nn.DataParallel` over several GPUs,
                `label_smoothing_factor`, DeepSpeed, FSDP1).
        """
        _check_arguments(args)
        self._place_before_reporters()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        """Trainer event: attach the tuner to the Trainer's optimizer and start recording the model's inputs.

        A tuner of a previous `train()` is detached first; a law that needs the run's horizon gets
        `state.max_steps`. When training resumes and the tuner found no state in the loaded optimizer, the
        callback reads it from the checkpoint itself (see the module docstring).

        Args:
            args: the Trainer's arguments.
            state: the Trainer's state.
            control: the Trainer's control flags.
            model: the (unwrapped) model.
            optimizer: the Trainer's optimizer (accelerate's wrapper around the torch optimizer).
            **kwargs: the event's other arguments.

        Raises:
            ValueError: unsupported arguments (see `on_init_end`), no model or optimizer, an optimizer or setting
                the tuner refuses, or a law that needs the run's horizon when the Trainer does not know it.
        """
        _check_arguments(args)
        self._place_before_reporters()
        if model is None or optimizer is None:
            raise ValueError(f"{_OWNER}: the Trainer passed no model or optimizer to on_train_begin")
        self._release()
        if self.tuner is not None:  # from a previous train() call
            self.tuner.detach()
            self.tuner = None
        inner = unwrap_optimizer(optimizer)
        law = law_with_horizon(_OWNER, self.law, state.max_steps if state.max_steps else None, "state.max_steps")
        self.tuner = self._spec.make_tuner(
            inner, model=model, grad_scaler=getattr(optimizer, "scaler", None), law=law,
            clipped_gradients=bool(args.max_grad_norm and args.max_grad_norm > 0),
            hint="Use a supported optimizer (TrainingArguments(optim='adamw_torch' or 'sgd'), or optimizers=(...)) "
                 "and do not attach a CurvatureTuner to the Trainer's optimizer yourself (one callback per Trainer).")
        self._model = model
        self._devices = list({p.device: p for p in model.parameters()}.values())
        self._hook = model.register_forward_pre_hook(self._record, with_kwargs=True)
        self._unwritten.clear()
        self._route, self._logged_route, self._calls = None, None, None
        if state.global_step > 0 and self.tuner.calls == 0:  # not already picked up from the loaded optimizer
            self._resume(args, state, inner)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        """Trainer event: remove the forward hook (the tuner stays attached until the next `train()`).

        Args:
            args: the Trainer's arguments.
            state: the Trainer's state.
            control: the Trainer's control flags.
            **kwargs: the event's other arguments.
        """
        # The tuner stays attached (a checkpoint saved after train() keeps its state); the hook goes.
        self._release()

    def _release(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._batches, self._recording = [], False

    def _place_before_reporters(self) -> None:
        """Move this callback right after `DefaultFlowCallback` in the Trainer's callback list.

        The reporting integrations (`report_to`) come first in that list, and `on_log` reaches the
        callbacks in list order: to add its values to the logs they write, this callback must come before
        them. The list is the `callbacks` attribute of the `CallbackHandler` now calling this callback
        (found on the call stack). Moving an element from a later to an earlier position while the
        handler iterates over the list does not make it skip or repeat any other callback.
        """
        handler = _calling_handler(self)
        if handler is None:
            if not self._placement_warned:
                warnings.warn(f"{_OWNER}: could not find the Trainer's callback list; the diagnostics reach "
                              "trainer.state.log_history and the callbacks after this one, but not reporting "
                              "callbacks (TensorBoard, ...) that come before it", RuntimeWarning, stacklevel=3)
                self._placement_warned = True
            return
        callbacks = handler.callbacks
        flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
        target = flow[-1] + 1 if flow else 0
        current = next(i for i, cb in enumerate(callbacks) if cb is self)
        if current > target:
            callbacks.insert(target, callbacks.pop(current))

    def _resume(self, args: TrainingArguments, state: TrainerState, optimizer: torch.optim.Optimizer) -> None:
        assert self.tuner is not None
        candidates = [_loaded_checkpoint(self), args.resume_from_checkpoint,
                      os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        folders: list[str] = []
        for candidate in candidates:
            if isinstance(candidate, str | os.PathLike) and os.fspath(candidate) not in folders:
                folders.append(os.fspath(candidate))
        for folder in folders[:2]:  # the folder the Trainer loaded: FSDP2's sharded optimizer (accelerate)
            distributed = os.path.join(folder, _FSDP_OPTIMIZER_FOLDER)
            if os.path.isdir(distributed) and self._model is not None:
                if self.tuner.load_distributed_checkpoint(distributed, self._model, key="optimizer"):
                    return
        for folder in folders:
            path = os.path.join(folder, _OPTIMIZER_FILE)
            if not os.path.isfile(path):
                continue
            saved = _load(path)
            if STATE_KEY in saved and _same_optimizer_state(saved, optimizer):
                self.tuner.load_tuner_state(saved[STATE_KEY])
                return
        warnings.warn(
            f"{_OWNER}: training resumes at step {state.global_step}, but no checkpoint matching the optimizer "
            f"state the Trainer loaded was found in {', '.join(folders)} ({_OPTIMIZER_FILE} with the tuner's state "
            "under 'eos_core'); the tuner starts afresh. Resume from a checkpoint saved while this callback was "
            "attached (trainer.train(resume_from_checkpoint=<folder>)).", RuntimeWarning, stacklevel=3)

    # ---------------------------------------------------------------------------------------------
    # the step
    # ---------------------------------------------------------------------------------------------
    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        """Trainer event (before the first micro-batch of a step): start recording the model's training inputs.

        Args:
            args: the Trainer's arguments.
            state: the Trainer's state.
            control: the Trainer's control flags.
            **kwargs: the event's other arguments.
        """
        self._batches, self._recording = [], True

    def _record(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._recording and not self.probing and module.training and torch.is_grad_enabled():
            self._batches.append((args, dict(kwargs), capture_rng(self._devices)))

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        """Trainer event: stop recording and hand the tuner the loss on the step's recorded micro-batches.

        Args:
            args: the Trainer's arguments.
            state: the Trainer's state.
            control: the Trainer's control flags.
            **kwargs: the event's other arguments.

        Raises:
            RuntimeError: no training forward call of the model was recorded in this step while the law or
                `sharpness_every` needs the loss (a compiled model, or a Trainer subclass that calls another
                module).
        """
        self._recording = False
        if self.tuner is None:
            return
        self._calls = tuner_calls(self.tuner)
        if self._batches:
            self.tuner.set_objective(functools.partial(self._objective, tuple(self._batches), args))
        elif self._spec.needs - _GRADIENT_ONLY or self.settings.sharpness_every is not None:
            raise RuntimeError(
                f"{_OWNER}: no training forward call of the model was seen in this step, so the curvature probe "
                "has no batch to evaluate. The callback records the inputs of the model the Trainer passes to "
                "callbacks (a forward pre-hook); a compiled model (torch_compile=True) or a Trainer subclass that "
                "calls another module bypasses it."
            )

    def _objective(self, batches: tuple[_Batch, ...], args: TrainingArguments) -> torch.Tensor:
        model = self._model
        assert model is not None
        losses = []
        with probing(self):
            for positional, inputs, rng in batches:
                replay_rng(rng)
                losses.append(self._loss(model, positional, inputs))
        total = sum_losses(losses)
        if "num_items_in_batch" in batches[0][1]:
            # each loss is normalised by the whole step's item count; compute_loss scales by the world size
            if getattr(args, "average_tokens_across_devices", False) and args.world_size > 1:
                total = total * args.world_size
            return total
        return total / len(batches)

    def _loss(self, model: torch.nn.Module, positional: tuple[Any, ...], inputs: dict[str, Any]) -> torch.Tensor:
        if self.loss_fn is not None:
            if positional:
                raise RuntimeError(f"{_OWNER}: loss_fn needs keyword inputs; the model got positional ones")
            return self.loss_fn(model, inputs)
        outputs = model(*positional, **inputs)
        if isinstance(outputs, Mapping):
            loss = outputs.get("loss")
        elif isinstance(outputs, tuple | list) and outputs:
            loss = outputs[0]
        else:
            loss = outputs
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise RuntimeError(
                f"{_OWNER}: the model returned no loss for the inputs the Trainer passed it (no 'labels', or a "
                "compute_loss_func / label smoothing that computes the loss outside the model); the curvature "
                "probe needs the model to return the training loss, or pass loss_fn=..."
            )
        return loss

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        """Trainer event: when the tuner stepped, merge its diagnostics into the values of the next log.

        Args:
            args: the Trainer's arguments.
            state: the Trainer's state.
            control: the Trainer's control flags.
            **kwargs: the event's other arguments.
        """
        calls, self._calls = self._calls, None
        # the tuner ran (not when a GradScaler skipped optimizer.step on inf gradients)
        if self.tuner is not None and calls is not None and tuner_calls(self.tuner) != calls:
            diagnostics = self.tuner.diagnostics
            self._unwritten.add(diagnostics)
            self._route = diagnostics.get("route")
        self._batches = []

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Trainer event: add the diagnostics since the previous log to the training logs, as `"eos/<name>"`.

        Only the training logs (those with `learning_rate`) get them, and the `state.log_history` entry the
        Trainer just appended too. In `lr_mode="override"` `learning_rate` is replaced by the applied lr; the
        route is added once as text when it is first known.

        Args:
            args: the Trainer's arguments.
            state: the Trainer's state.
            control: the Trainer's control flags.
            logs: the logs being written, updated in place.
            **kwargs: the event's other arguments.
        """
        if logs is None or "learning_rate" not in logs or not self._unwritten.values:
            return  # evaluation and end-of-training logs
        values: dict[str, Any] = {self.log_prefix + k: v for k, v in self._unwritten.values.items()}
        if self._spec.overrides_lr and "lr" in self._unwritten.values:
            values["learning_rate"] = self._unwritten.values["lr"]  # the applied lr, not the ignored scheduler's
        self._unwritten.clear()
        route = self._route
        if isinstance(route, str) and route != self._logged_route and route != "auto":
            values[self.log_prefix + "route"] = route
            self._logged_route = route
        logs.update(values)
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and entry.get("step") == state.global_step and "learning_rate" in entry:
            entry.update(values)


def _check_arguments(args: TrainingArguments) -> None:
    problems = []
    if getattr(args, "n_gpu", 1) > 1:
        problems.append("torch.nn.DataParallel over several GPUs (use DDP: torchrun / accelerate launch)")
    if getattr(args, "label_smoothing_factor", 0.0):
        problems.append("label_smoothing_factor (the Trainer computes that loss outside the model; pass loss_fn)")
    if getattr(args, "deepspeed", None):
        problems.append("DeepSpeed (it replaces the optimizer the tuner hooks)")
    if getattr(args, "fsdp", None) and _fsdp_version(args) != 2:
        problems.append("FSDP1 (fsdp_config['version'] = 1: flat parameters the tuner cannot read; use FSDP2, "
                        "fsdp_config={'version': 2}, the default)")
    if problems:
        raise ValueError(f"{_OWNER} does not support {'; '.join(problems)}")


def _fsdp_version(args: TrainingArguments) -> int:
    """The FSDP version the Trainer runs.

    Returns:
        `fsdp_config["version"]` (or `"fsdp_version"`); 2, the default in transformers 5, when not set.
    """
    config = getattr(args, "fsdp_config", None) or {}
    return int(config.get("version", config.get("fsdp_version", 2)))


def _calling_handler(callback: TrainerCallback) -> CallbackHandler | None:
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler) and any(cb is callback for cb in owner.callbacks):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


def _loaded_checkpoint(callback: TrainerCallback) -> str | os.PathLike | None:
    """The checkpoint folder the Trainer running `callback` resumed from (None if not found).

    `Trainer.train` resolves its `resume_from_checkpoint` argument and passes it to
    `_inner_training_loop` (a local variable there, stored nowhere else), which loads the checkpoint and
    then fires `on_train_begin`. The innermost frame on the call stack that belongs to a `Trainer`
    whose callback handler holds `callback` and has that local is read.

    Returns:
        That folder (a path or str), or None when no such frame exists or its value is not a path (e.g. None:
        training did not resume from a checkpoint).
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer) and "resume_from_checkpoint" in frame.f_locals:
                handler = getattr(owner, "callback_handler", None)
                if any(cb is callback for cb in getattr(handler, "callbacks", ())):
                    path = frame.f_locals["resume_from_checkpoint"]
                    return path if isinstance(path, str | os.PathLike) else None
            frame = frame.f_back
        return None
    finally:
        del frame


def _load(path: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip archive: no mmap
        return torch.load(path, map_location="cpu", weights_only=True)


def _same_optimizer_state(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> bool:
    """Whether `saved` is the optimizer state the Trainer just loaded, not a same-numbered checkpoint of another run.

    Returns:
        True when the parameter groups (without the tuner's entries), the state keys and the first and last
        per-parameter states (without the tuner's entries) are equal.
    """
    current = optimizer.state_dict()
    groups = [{k: v for k, v in g.items() if k not in ("params", STATE_KEY)} for g in current["param_groups"]]
    saved_groups = [{k: v for k, v in g.items() if k not in ("params", STATE_KEY)}
                    for g in saved.get("param_groups", [])]

    def own(entries: Mapping[Any, Any]) -> dict[Any, dict[str, Any]]:  # the optimizer's state, not the tuner's
        out = {key: {n: v for n, v in entry.items() if not str(n).startswith(STATE_KEY)}
               for key, entry in entries.items()}
        return {key: entry for key, entry in out.items() if entry}

    mine_state, saved_state = own(current["state"]), own(saved.get("state", {}))
    if groups != saved_groups or set(mine_state) != set(saved_state):
        return False
    keys = sorted(mine_state)
    for key in keys[:1] + keys[-1:]:
        mine, theirs = mine_state[key], saved_state[key]
        if set(mine) != set(theirs):
            return False
        for name, value in mine.items():
            other = theirs[name]
            if isinstance(value, torch.Tensor):
                if not (isinstance(other, torch.Tensor) and torch.equal(value.cpu(), other.cpu())):
                    return False
            elif value != other:
                return False
    return True
