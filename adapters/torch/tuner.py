"""`CurvatureTuner`: any law of the core driving any torch optimizer whose step is linear in lr.

How a step works (the tuner attaches to the optimizer through `register_step_pre_hook` /
`register_step_post_hook`, so `optimizer.step()`, `tuner.step()`, `GradScaler.step` and the
trainers' own calls all go through it). Each stage is one method of
[`CurvatureTuner`][eos_core.adapters.torch.CurvatureTuner]:

1. *Check the inputs* (before the step). With a closure, the tuner calls it once itself (recording the
   random state, so probes replay the same dropout masks) and hands the optimizer the resulting loss.
   The loss, `|g|` and their finiteness are read in one synchronisation. A non-finite loss or
   gradient skips the step: every `.grad` is set to None, which torch optimizers skip, so neither
   the parameters nor the optimizer state change.
2. *Plan*. The step index (skipped steps are not counted) decides whether the law probes
   (`step % probe_every == 0`), whether lambda_max is tracked (`step % sharpness_every == 0`) and
   whether the update must be kept for the next probe. Such a step is *instrumented*: every group's lr
   is set to `eta_probe * ratio_g` (`eta_probe` is the law's last lr, `ratio_g` the group's lr over
   the first group's, so per-group lr ratios are kept). Any other step is *direct*: the law decides
   before the step (`law.hold`, or `law.update` for a law that needs no statistics) and the groups
   get that lr. The parameters `w` are copied in both cases.
3. *The optimizer's own step* advances its state exactly as usual and moves the parameters to
   `w + eta * u`.
4. *Probe, track, decide, apply* (after an instrumented step). `D = eta_probe * u` is read off and
   the parameters go back to `w`. The statistics the law declares ([`eos_core.stats`][], listed by
   `law.request()`) are measured at `w` by `Probes` (g.u from the step's own gradient, u^T H u by the
   [`Oracle`][eos_core.adapters.torch.Oracle], lambda_max by warm-started power iteration and top-k
   eigenvalues by Lanczos in `SpectralEstimates`, trial losses, ...), averaged across data-parallel ranks;
   lambda_max is tracked; the law decides `eta` and the parameters become `w + eta * u`. After a direct step
   `|u| = |w_new - w| / eta` is all that is measured.
5. *Report*. [`CurvatureTuner.diagnostics`][eos_core.adapters.torch.CurvatureTuner.diagnostics] gets exactly
   the keys of [`keys_for(law)`][eos_core.diagnostics.keys_for] (NaN for what was not measured on the step) and
   the groups' lr settings are restored, so lr schedulers keep working.

`lr_mode="multiply"` multiplies the law's lr by the schedule factor `lr_0(t) / lr_0(attach)` of the
first group (the shape of a user's scheduler on top of the tuner's scale); `"override"` (default)
ignores the optimizer's lr except for group ratios.

The tuner's state (law state, step counters, resolved route, warm-start eigenvectors, previous update,
last diagnostics) travels in the optimizer's own `state_dict()` (`eos_core.adapters.torch.checkpoint`:
under the key `"eos_core"`, and in the first param group and the per-parameter state, which
`torch.distributed.checkpoint` keeps), so every framework that checkpoints the optimizer checkpoints the
tuner, and resuming is bit-identical.

Sharded parameters (PyTorch FSDP2, `fully_shard`: DTensor parameters) are tuned the same way on the local
shards: every sum over parameters is the all-reduced sum of the shards' partial sums and probes re-run the
step's closure, whose forward and backward go through FSDP's all-gather and reduce-scatter
(`eos_core.adapters.torch.sharding`); only the finite-difference routes run there.

The pieces, modules of `eos_core.adapters.torch`: `step` (what a step carries between the stages), `probes` (the
statistics), `spectral_estimates` (power iteration, Lanczos, warm starts), `checkpoint` (the saved state),
`sharding` (sums over shards), `configuration` (settings and the law's fit with the optimizer), `monitor` (the
sharpness monitor, `monitor_budget`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from eos_core import diagnostics as diag
from eos_core import monitor as rules
from eos_core import stats as S
from eos_core.adapters.torch import checkpoint, configuration
from eos_core.adapters.torch import monitor as monitoring
from eos_core.adapters.torch import optimizers as opt_info
from eos_core.adapters.torch import vector_ops as vec
from eos_core.adapters.torch.checkpoint import REQUIRED_STATE_FIELDS, STATE_KEY, STATE_VERSION
from eos_core.adapters.torch.monitor import Monitor
from eos_core.adapters.torch.objective import Objective, capture_rng
from eos_core.adapters.torch.oracles import Oracle
from eos_core.adapters.torch.probes import Probes
from eos_core.adapters.torch.sharding import ParameterSpace, local
from eos_core.adapters.torch.spectral_estimates import SpectralEstimates
from eos_core.adapters.torch.step import NOT_COMPUTED, AtW, PendingStep, Probe, group_ratios
from eos_core.laws.base import Law, LawOutput
from eos_core.numerics import PYTHON_SCALARS as scalars
from eos_core.routes import parameter_scale_along
from eos_core.settings import TunerSettings

__all__ = ["REQUIRED_STATE_FIELDS", "STATE_KEY", "STATE_VERSION", "CurvatureTuner", "PendingStep"]

Vector = list[torch.Tensor]
_OWNER = configuration.OWNER
_NAN = math.nan
_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, CurvatureTuner] = weakref.WeakKeyDictionary()
#: source folders whose frames a bad-step warning skips (it points at the caller of the optimizer's step)
_INTERNAL_SOURCES = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
                     os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


class CurvatureTuner:
    """Drive `optimizer` with a tuning law (the docs' default: `CDAT(scale=2.0)`).

    The tuner attaches to the optimizer's step hooks: train as usual with `optimizer.step()` or `tuner.step()`
    (see the module docstring for what happens at each step). Give the loss on the batch with a closure,
    `tuner.step(closure)`, or with `set_objective` before each step.

    Args:
        optimizer: a `torch.optim.Optimizer` whose step is linear in lr (SGD with or without
            momentum/Nesterov, Adam, AdamW, RMSprop, Adagrad, Adadelta, Adamax, NAdam, RAdam).
        law: a law from [`eos_core.laws`][], or None to leave the optimizer's lr alone and only
            measure (`sharpness_every`, `monitor_budget`).
        model: the model; needed by the `jvp-*` routes, lets probes restore buffers (BatchNorm
            running statistics) and run a DDP model under `no_sync()`.
        grad_scaler: the `torch.amp.GradScaler` in use, so probes scale their own backward passes.
        process_group: the data-parallel group (default: the world, when torch.distributed is initialised);
            with sharded parameters, the group the loss is averaged over (default: the parameters' mesh).
        settings: a [`TunerSettings`][eos_core.settings.TunerSettings]; `**options` given as well override it.
        **options: the options of [`TunerSettings`][eos_core.settings.TunerSettings], all supported here:
            `probe_every`, `route` (`"auto"` picks double backward, falls back to the math SDPA
            kernel, then to one-sided finite differences; on models with at least `fd_above`
            parameters it keeps one-sided finite differences once they agree with double backward to 1%,
            checked at the 1st, 10th, 100th, ... probe; on sharded parameters only `fd-onesided` (what
            `auto` is there) and `fd-central` run), `sharpness_every`, `sharpness_iters`,
            `sharpness_tol`, `lr_mode`, `warn` (True or `"jit"`: RuntimeWarnings for skipped steps
            and law fallbacks; False: none, the counts stay in the diagnostics), `skip_nonfinite`,
            `seed` (the spectral start vectors: [`random_start`][eos_core.spectral.start.random_start] with `seed`
            for H, `seed + 1` for the preconditioned Hessian), `fd_eps` (default: the epsilon of the lowest
            precision the loss is computed in, autocast included), `reference_lr` (`lr_0(attach)` of
            `lr_mode="multiply"` and the law's initial lr; default: the group's `"initial_lr"`, which
            torch schedulers record, else its lr), `fd_above`, `clipped_gradients` (the optimizer
            steps with a clipped gradient, not the objective's own: finite-difference routes evaluate
            g(w) again; also an attribute, read at every step), `linear_in_lr` (drive an optimizer not in
            the list above whose step is linear in lr), `monitor_budget` (the share of training time the
            sharpness monitor may take, in (0, 1]; None: off), `monitor_edge` (the edge of stability the early
            warning compares lr x sharpness with; default: the optimizer's, NaN for an unknown optimizer, which
            disables the warning), `monitor_margin` and `monitor_patience` (the warning fires after
            `monitor_patience` consecutive measurements above `edge * (1 + monitor_margin)`, or one that is a Ritz
            value of the step's own Hessian). Deprecated:
            `power_iters` / `power_tol` (`sharpness_iters` / `sharpness_tol`), `initial_lr` (`reference_lr`)
            and `lanczos_steps` (set `DCAO(lanczos_steps=...)`; used only while the law leaves it unset).

    Raises:
        ValueError: for an optimizer the tuner cannot drive (not linear in lr, `maximize=True`), a `law` that is
            not an eos_core law, an optimizer that already has a tuner attached, a law that needs what the
            optimizer lacks, a model that holds none of the optimizer's parameters, an invalid option (the
            message names it), an exact route on sharded parameters, FSDP1 parameters, or a checkpoint state
            left in the optimizer that this tuner cannot take.
        RuntimeError: sharded (DTensor) parameters on a torch older than 2.7.

    Laws that decide momentum and weight decay (DCAO) track the first param group that has a non-zero
    value and write `value * ratio_g` into group g, where `ratio_g` is the group's setting relative
    to that group's when the tuner attaches (so a no-decay group for biases and norms stays at 0).
    Momentum is SGD/RMSprop `momentum` or Adam-style `betas[0]`.

    After each step `diagnostics` holds exactly [`keys_for(law)`][eos_core.diagnostics.keys_for] (see
    [`eos_core.diagnostics`][]): NaN for a value not measured on the step; on a skipped step the
    previous step's values with `skipped = 1`. `calls` counts the optimizer steps processed,
    skipped ones included (a trainer compares it before and after its step to tell whether the optimizer
    stepped).

    `settings` holds the options; `probe_every`, `sharpness_every` and `clipped_gradients` are
    also attributes, settable between steps (checked when set). `route`, `fd_eps` and `fd_above` are
    fixed when the tuner is built; `seed` is read when a start vector is first drawn.

    A tuner attached to an optimizer whose state was loaded from a checkpoint before the tuner existed (the
    Hugging Face `Trainer` does that) picks up the tuner state that load left in the optimizer.

    Extension point: a subclass may override `_preconditioner` (the diagonal preconditioner P of
    the preconditioned sharpness, read after the optimizer's step); it is called at most once per step.

    Attributes:
        settings: the validated options ([`TunerSettings`][eos_core.settings.TunerSettings]).
        diagnostics: the last step's diagnostics by name (empty before the first step).
        calls: the optimizer steps processed, skipped ones included.
        law_state: the law's state (None without a law); checkpointed.

    Examples:
        A least-squares model trained by SGD whose lr CDAT sets at every step. The closure follows torch's
        convention: it zeroes the gradients, computes the loss, calls `backward()` and returns the loss.

        >>> import torch
        >>> from eos_core import CDAT
        >>> from eos_core.adapters.torch import CurvatureTuner
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 1)
        >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> tuner = CurvatureTuner(torch.optim.SGD(model.parameters(), lr=0.1), CDAT(scale=2.0), model=model)
        >>> def closure():
        ...     tuner.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(5):
        ...     loss = tuner.step(closure)
        >>> tuner.diagnostics["step"], tuner.calls
        (4, 5)
        >>> tuner.route  # auto: double backward, then one-sided finite differences once they agree (a quadratic)
        'fd-onesided'
        >>> tuner.lr == tuner.diagnostics["lr"] > 0  # the lr CDAT chose for the last step
        True
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        law: Law | None = None,
        *,
        model: torch.nn.Module | None = None,
        grad_scaler: Any | None = None,
        process_group: Any | None = None,
        settings: TunerSettings | None = None,
        **options: Any,
    ) -> None:
        self.settings, lanczos_steps = configuration.settings_from(settings, options)
        opt_info.check_supported(optimizer, linear_in_lr=self.settings.linear_in_lr)
        if law is not None and not isinstance(law, Law):
            raise ValueError(f"{_OWNER}: law must be an eos_core law (e.g. CDAT(scale=2.0)), got {law!r}")
        if optimizer in _ATTACHED:
            raise ValueError(f"{_OWNER}: this optimizer already has a CurvatureTuner attached; call .detach() on it "
                             "first (two tuners on one optimizer would both rewrite its step)")
        self.optimizer, self.law, self.model, self.grad_scaler = optimizer, law, model, grad_scaler
        self._request = configuration.request_for(law, lanczos_steps)
        configuration.check_law_fits(optimizer, law, self._request)
        configuration.check_model_holds(optimizer, model)
        #: the parameters as the tuner computes with them (whole, or this rank's shards)
        self.space = ParameterSpace(self._params(), process_group)
        self.reducer = self.space.reducer
        self.oracle = Oracle(self.settings.route, module=model, fd_eps=self.settings.fd_eps,
                             fd_above=self.settings.fd_above, space=self.space)
        #: the warm-started spectral estimators (their eigenvectors are part of the checkpoint)
        self.spectral = SpectralEstimates(self.oracle, self.space)
        self.probes = Probes(self._request, self.oracle, self.space, self.spectral)
        #: the sharpness monitor (`monitor_budget`; None when off)
        self.monitor = (Monitor(self.settings, self.space, self.oracle, model)
                        if self.settings.monitor_budget is not None else None)
        self._keys = diag.keys_for(law)
        self._reference_lr = self._initial_reference_lr()
        #: per-group momentum / weight-decay proportions kept when a law (DCAO) decides them
        self._hyperparam_ratios = opt_info.hyperparam_ratios(optimizer) if law is not None and law.decides else {}
        self.law_state = None if law is None else law.init(
            self._reference_lr if self._reference_lr > 0 else float(optimizer.param_groups[0]["lr"]),
            hyperparams=opt_info.read_hyperparams(optimizer))
        self._step_count = 0
        #: optimizer steps processed, skipped ones included
        self.calls = 0
        self._skipped_steps = 0
        self._fallback_steps = 0
        self._objective_fn: Callable[[], Any] | None = None
        self._pending: PendingStep | None = None
        self._previous_update: Vector | None = None
        self._previous_lr = 0.0  #: the lr applied to `_previous_update`
        self.diagnostics: dict[str, Any] = {}
        left = checkpoint.take_from_optimizer(optimizer, self._params())  # loaded before the tuner attached
        if left is not None:
            self.load_tuner_state(left)
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
            optimizer.register_state_dict_post_hook(self._state_dict_post),
            optimizer.register_load_state_dict_pre_hook(self._load_state_dict_pre),
        ]
        _ATTACHED[optimizer] = self

    # ---------------------------------------------------------------------------------------------
    # public API
    # ---------------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one optimizer step: `optimizer.step(closure)`, with the tuner's hooks.

        Args:
            closure: re-evaluates the loss on the batch in torch's convention (zero the gradients, compute the
                loss, call `backward()`, return the loss); the tuner calls it once and probes re-evaluate it.
                None: the gradient is already in `.grad` (then give probes the loss with `set_objective`).

        Returns:
            What `optimizer.step` returns: the closure's loss, or None without a closure.
        """
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients: `optimizer.zero_grad(set_to_none)`.

        Args:
            set_to_none: set each `.grad` to None instead of zeroing it (torch's default).
        """
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def set_objective(self, loss_fn: Callable[[], torch.Tensor]) -> None:
        """Give the next step's probes the loss on the current batch.

        Needed when the step is taken without a closure (`optimizer.step()`, `GradScaler.step`,
        trainer integrations). When the step also has a closure, the closure still computes the
        step's gradient (and its random state is replayed), but probes evaluate `loss_fn`. Used
        once, then forgotten: set it before every step. With sharded parameters (FSDP2) `loss_fn` must
        call the FSDP-wrapped model (its forward gathers the parameters; probes call `backward` on the
        loss, which reduce-scatters the gradient).

        Args:
            loss_fn: computes and returns the loss on the current batch at the current parameters (a scalar
                tensor), without calling `backward`.
        """
        self._objective_fn = loss_fn

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's param groups."""
        return self.optimizer.param_groups

    @property
    def lr(self) -> float:
        """The learning rate the last step applied (the first group's)."""
        return float(self.diagnostics.get("lr", self.optimizer.param_groups[0]["lr"]))

    @property
    def route(self) -> str:
        """The curvature route in use (the configured one, e.g. `"auto"`, until the first probe resolves it)."""
        return self.oracle.resolved or self.oracle.route

    @property
    def sharded(self) -> bool:
        """Whether the parameters are sharded (DTensors, PyTorch FSDP2)."""
        return self.space.sharded

    @property
    def probe_every(self) -> int:
        """Probe the law every that many steps (settable; read at every step)."""
        return self.settings.probe_every

    @probe_every.setter
    def probe_every(self, value: int) -> None:
        self.settings = self.settings.replace(_OWNER, probe_every=value)

    @property
    def sharpness_every(self) -> int | None:
        """Track lambda_max every that many steps, None for never (settable; read at every step)."""
        return self.settings.sharpness_every

    @sharpness_every.setter
    def sharpness_every(self, value: int | None) -> None:
        self.settings = self.settings.replace(_OWNER, sharpness_every=value)

    @property
    def clipped_gradients(self) -> bool:
        """The optimizer steps with a clipped gradient (settable; read at every step; trainer callbacks set it)."""
        return self.settings.clipped_gradients

    @clipped_gradients.setter
    def clipped_gradients(self, value: bool) -> None:
        self.settings = self.settings.replace(_OWNER, clipped_gradients=value)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict, which carries the tuner's state.

        Returns:
            `optimizer.state_dict()`: the tuner's state is under `"eos_core"`, in the first param group and in the
            per-parameter state (the layout of `eos_core.adapters.torch.checkpoint`).
        """
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an optimizer state dict, and the tuner's state too when the dict carries one.

        Args:
            state_dict: what `state_dict` (or `optimizer.state_dict()` with this tuner attached) returned.

        Raises:
            ValueError: as `load_tuner_state`, for a tuner state this tuner cannot take.
        """
        self.optimizer.load_state_dict(state_dict)

    def load_tuner_state(self, saved: Mapping[str, Any]) -> None:
        """Restore only the tuner's part of a checkpoint (`optimizer_state_dict["eos_core"]`).

        For trainers that load the optimizer's state before the tuner can attach and keep the file (the
        tuner also picks up a state such a load left in the optimizer by itself). Reads the state of versions
        5 to 2 (a version-4 monitor tracker had two Lanczos vectors: it resumes from its eigenvector estimate)
        and version 1 (the first release: the step count then included skipped steps, and the law state was
        stored as floats; integer counters are cast back).

        Args:
            saved: the state: `version`, `law`, `law_state`, `step` and `reference_lr` at least;
                `calls`, `skipped_steps`, `fallback_steps`, `route`, `exact_probes`, `previous_lr`,
                `hyperparam_ratios`, `eigenvector`, `preconditioned_eigenvector`,
                `previous_update`, `diagnostics` and `monitor` with the monitor's vectors when present. Vectors
                may be whole tensors, DTensors or this rank's shards (sharded parameters take their shard of a
                whole tensor).

        Raises:
            ValueError: for a state of an unknown (newer) version, of another law, lacking a required
                field, or whose vectors do not match the parameters. Nothing is changed then.
        """
        restored = self._parse_tuner_state(saved)
        for name, value in restored.items():
            if name == "route":
                self.oracle.restore_route(value)
            elif name == "exact_probes":
                self.oracle.exact_probes = value
            elif name in ("eigenvector", "preconditioned_eigenvector"):
                setattr(self.spectral, name, value)
            elif name == "monitor":
                self.monitor.load(*value)
            else:
                setattr(self, name, value)

    def load_distributed_checkpoint(self, path: str | os.PathLike, model: torch.nn.Module, *,
                                    key: str | None = None) -> bool:
        """Restore only the tuner's state from a `torch.distributed.checkpoint` folder.

        The folder holds `get_optimizer_state_dict(model, optimizer)` (under `key` of the saved dict, if given).
        For frameworks that load the optimizer's state before the tuner attaches *and* build the load's template
        from the optimizer without it (accelerate's `load_fsdp_optimizer` under FSDP2 with a sharded state dict
        calls `get_optimizer_state_dict` before any callback runs, so the tuner's entries are not loaded). The
        tuner's entries are read with the tuner's own layout as the template (a partial load). Every rank calls
        it (the load is collective).

        Args:
            path: the checkpoint folder.
            model: the (sharded) model the optimizer's parameters belong to.
            key: the key the optimizer state dict was saved under (accelerate: `"optimizer"`).

        Returns:
            Whether a tuner state was found and restored.

        Raises:
            ValueError: as `load_tuner_state`, for a state this tuner cannot take.
        """
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        template = get_optimizer_state_dict(model, self.optimizer)  # with this tuner's entries
        groups, fresh = template["param_groups"], template["param_groups"][0][STATE_KEY]
        ours = {"param_groups": [{STATE_KEY: fresh}],
                "state": {k: {n: v for n, v in entry.items() if str(n).startswith(checkpoint.VECTOR_PREFIX)}
                          for k, entry in template["state"].items()}}
        load({key: ours} if key else ours, storage_reader=FileSystemReader(os.fspath(path)),
             planner=DefaultLoadPlanner(allow_partial_load=True))
        found = ours["param_groups"][0][STATE_KEY]
        if found is fresh or found == fresh:
            return False
        merged = {"param_groups": [{**groups[0], STATE_KEY: found}, *groups[1:]], "state": ours["state"]}
        saved, _ = checkpoint.take(merged, checkpoint.parameter_keys(merged, self.optimizer, self._params()))
        if saved is None:
            return False
        self.load_tuner_state(saved)
        return True

    def detach(self) -> None:
        """Remove the tuner from the optimizer (its hooks); the optimizer steps as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if _ATTACHED.get(self.optimizer) is self:
            del _ATTACHED[self.optimizer]

    def __repr__(self) -> str:
        return (f"CurvatureTuner({type(self.optimizer).__name__}, {self.law!r}, probe_every={self.probe_every}, "
                f"route={self.route!r}, sharpness_every={self.sharpness_every})")

    # ---------------------------------------------------------------------------------------------
    # extension point
    # ---------------------------------------------------------------------------------------------
    def _preconditioner(self, pending: PendingStep) -> Vector | None:
        """The diagonal preconditioner P (tensors shaped like the parameters) after this step, or None.

        The preconditioned Hessian is `P^{-1/2} H P^{-1/2}` (Cohen et al. 2022, "Adaptive gradient methods at the
        edge of stability"); `pending.ratios` are the param groups' lr ratios of the step (a group with `ratio`
        times the first group's lr has `P / ratio`). Stable extension point: the Keras torch backend
        overrides it with the Keras optimizer's preconditioner. Called at most once per step. DTensors (the
        optimizer state of sharded parameters) are reduced to their local shards by the caller.

        Args:
            pending: the step (its `ratios`).

        Returns:
            One tensor per trainable parameter, in the tuner's order; None for an optimizer without a diagonal
            preconditioner.
        """
        return opt_info.preconditioner(self.optimizer, self._params_by_group(), pending.ratios)

    def _edge(self) -> tuple[float, bool]:
        """The edge of stability the early warning uses and whether it bounds the preconditioned sharpness.

        Extension point like `_preconditioner` (the Keras torch backend reads the Keras optimizer).

        Returns:
            `(edge, preconditioned)`: `monitor_edge` when given, else the optimizer's
            (`eos_core.adapters.torch.optimizers.edge`; NaN when unknown); `preconditioned` only when the tuner
            has a preconditioner to measure with.
        """
        found, preconditioned = opt_info.edge(self.optimizer)
        preconditioned = preconditioned and self._has_preconditioner()
        if self.settings.monitor_edge is not None:
            return float(self.settings.monitor_edge), preconditioned
        return found, preconditioned

    # ---------------------------------------------------------------------------------------------
    # helpers
    # ---------------------------------------------------------------------------------------------
    def _has_preconditioner(self) -> bool:
        """Whether the optimizer has a diagonal preconditioner (known, or given by a subclass)."""
        return isinstance(self.optimizer, opt_info.PRECONDITIONED) or (
            type(self)._preconditioner is not CurvatureTuner._preconditioner)

    def _current_preconditioner(self, pending: PendingStep) -> Vector | None:
        """P as the optimizer's state holds it now, as local tensors.

        Returns:
            The preconditioner's local tensors (not cached: before the step it is the previous step's), or None.
        """
        found = self._preconditioner(pending)
        return None if found is None else [local(t) for t in found]

    def _params_by_group(self) -> list[list[torch.Tensor]]:
        return [[p for p in group["params"] if p.requires_grad] for group in self.optimizer.param_groups]

    def _params(self) -> list[torch.Tensor]:
        """The trainable parameters (DTensors when sharded; `ParameterSpace.local` gives their shards)."""
        return [p for group in self._params_by_group() for p in group]

    def _loss_scale(self) -> float:
        scaler = self.grad_scaler
        if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            return float(scaler.get_scale())
        return 1.0

    def _initial_reference_lr(self) -> float:
        """The lr the law starts from and `lr_mode="multiply"` divides by.

        Returns:
            `reference_lr`, else the first group's base lr (a scheduler created before the tuner keeps it in
            `"initial_lr"`: a warm-up from 0 sets the group's lr to 0), else its lr.
        """
        if self.settings.reference_lr is not None:
            return float(self.settings.reference_lr)
        first = self.optimizer.param_groups[0]
        base = first.get("initial_lr", first["lr"])
        return float(base) if float(base) > 0 else float(first["lr"])

    def _warn(self, message: str) -> None:
        """A bad-step RuntimeWarning, unless `warn=False`, attributed to the caller's `step` line."""
        if self.settings.warn is not False:
            warnings.warn(message, RuntimeWarning, stacklevel=_outside_stacklevel())

    def _sync_space(self) -> None:
        """Follow the optimizer's parameters (`add_param_group` between steps)."""
        params = self._params()
        known = self.space.params
        if len(params) != len(known) or any(a is not b for a, b in zip(params, known, strict=True)):
            self.space.__init__(params, self.space.reducer.group)

    # ---------------------------------------------------------------------------------------------
    # before the optimizer's step: check the inputs, plan
    # ---------------------------------------------------------------------------------------------
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if _initialising_checkpoint_state(optimizer, args, kwargs):
            self._pending = PendingStep(step=self._step_count, passthrough=True)
            return None
        started = monitoring.now()
        self._sync_space()
        monitor = self.monitor
        if monitor is not None:
            monitor.start_step()
        pending = PendingStep(step=self._step_count)
        # measuring only, in one process: whether this step measures is decided first (it then reads g and copies w);
        # data-parallel ranks read g on every step, so that a NaN loss on one rank skips the step on all of them
        lean = self.law is None and not self.space.sharded and self.space.reducer.world_size == 1
        if lean:
            self._plan(pending)
        measuring = pending.tick or pending.instrumented or pending.along_update  # (False before the plan: not lean)
        positional, keywords, loss, objective = self._run_closure(list(args), dict(kwargs),
                                                                  measuring=measuring or not lean)
        pending.objective = objective
        elsewhere = self._closure_seconds  # the training step's own work, and the monitor's products below
        if lean:  # between measurements the loss alone decides a skip (its gradient is not read)
            proceed = self._check_inputs(pending, loss) if measuring else self._check_loss(pending, loss)
        else:
            proceed = self._check_inputs(pending, loss)
            if proceed:
                self._plan(pending)
        if proceed:
            self._set_step_lr(pending)
            if pending.tick or pending.instrumented or pending.along_update or self.law is not None:
                # measuring only: no copy of w otherwise
                pending.saved = vec.clone(self.space.local())
            if pending.tick:  # at w, with g(w) in .grad: see eos_core.adapters.torch.monitor
                elsewhere += monitor.tick(objective=objective, saved=pending.saved, clipped=self.clipped_gradients,
                                          seed=self.settings.seed,
                                          preconditioner=lambda: self._current_preconditioner(pending),
                                          wants_preconditioned=self._has_preconditioner())
        else:
            self._skip_inputs(pending)
        if monitor is not None and self.law is None:
            pending.bookkeeping = monitoring.now() - started - elsewhere
        self._pending = pending
        return tuple(positional), keywords

    def _run_closure(self, args: list, kwargs: dict, *, measuring: bool = True
                     ) -> tuple[list, dict, Any, Objective | None]:
        """Call the step's closure once (recording the random state) and hand the optimizer its result.

        Probes evaluate the objective given by `set_objective` when there is one (a trainer's
        closure may run hooks and logging that must not run again), else the step's own closure.

        Args:
            args: the optimizer step's positional arguments.
            kwargs: its keyword arguments.
            measuring: the step may measure: record the random state (probes replay the forward pass's
                randomness) and build the objective (False: a step that measures nothing needs neither).

        Returns:
            `(args, kwargs, loss, objective)`: the step's arguments with the closure replaced by one that returns
            the loss already computed, that loss (None without a closure), and the probes' objective (None
            without a closure or `set_objective`, or when not measuring).
        """
        params = self._params()
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        probe_fn, self._objective_fn = self._objective_fn, None
        loss, rng = None, None
        self._closure_seconds = 0.0
        if closure is not None:
            rng = capture_rng(self.space.local()) if measuring else None
            started = monitoring.now()
            with torch.enable_grad():
                loss = closure()
            self._closure_seconds = monitoring.now() - started
            probe_fn = probe_fn if probe_fn is not None else closure

            def cached() -> Any:
                return loss

            if "closure" in kwargs:
                kwargs["closure"] = cached
            else:
                args[1] = cached
        objective = None if probe_fn is None or not measuring else Objective(
            probe_fn, params, rng_state=rng, module=self.model, loss_scale=self._loss_scale(),
            sharded=self.space.sharded)
        return args, kwargs, loss, objective

    def _check_inputs(self, pending: PendingStep, loss: Any) -> bool:
        """Read the loss and |g|^2 (one synchronisation); False when the step must be skipped."""
        tensor = loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None
        value, pending.grad_sq, finite = self.space.step_inputs(tensor, self.space.grads())
        if isinstance(loss, int | float) and not isinstance(loss, bool):
            value = float(loss)
            finite = finite and math.isfinite(value)
        pending.loss = value
        return finite or not self.settings.skip_nonfinite

    def _check_loss(self, pending: PendingStep, loss: Any) -> bool:
        """Read the loss alone (measuring only, between measurements); False when the step must be skipped."""
        value = None
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            value = loss.item()
        elif isinstance(loss, int | float) and not isinstance(loss, bool):
            value = float(loss)
        pending.loss = value
        return value is None or math.isfinite(value) or not self.settings.skip_nonfinite

    def _skip_inputs(self, pending: PendingStep) -> None:
        """A non-finite loss or gradient: torch optimizers skip parameters without a gradient."""
        for p in self._params():
            p.grad = None
        pending.skipped = True
        self._warn(f"eos_core: step {pending.step} skipped: non-finite loss or gradient (parameters and optimizer "
                   f"state left unchanged; {self._skipped_steps + 1} step(s) skipped so far)")

    def _plan(self, pending: PendingStep) -> None:
        """Which measurements this step makes; the step index excludes skipped steps.

        The sharpness monitor's decision ([`plan`][eos_core.adapters.torch.monitor.Monitor.plan]) is part of it: it
        advances the monitor's credit and its trackers' ages, so it is made once per step that is not skipped.
        """
        step, request = pending.step, self._request
        pending.probe = self.law is not None and step % self.probe_every == 0
        pending.track = self.sharpness_every is not None and step % self.sharpness_every == 0
        pending.record = request.previous_update and (step + 1) % self.probe_every == 0
        pending.along_update = (self.monitor is not None and self.law is None and step < rules.UPDATE_STEPS
                                and bool(rules.watches_update(scalars, step, adaptive=self._edge()[1])))
        pending.instrumented = (pending.probe and bool(request.needs)) or pending.track or pending.record
        pending.tick = self.monitor is not None and self.monitor.plan(
            wants_preconditioned=self._has_preconditioner(), step=step)

    def _set_step_lr(self, pending: PendingStep) -> None:
        """The lr the optimizer steps with: `eta_probe` on an instrumented step, else the law's decision."""
        groups = self.optimizer.param_groups
        pending.group_lrs = [float(g["lr"]) for g in groups]
        pending.ratios = group_ratios(groups, pending.group_lrs)
        first = pending.group_lrs[0]
        if self.settings.lr_mode == "multiply" and self._reference_lr > 0:
            pending.schedule = first / self._reference_lr
        if pending.instrumented:
            last = first if self.law is None else float(self.law_state.lr)
            pending.eta_probe = pending.step_lr = last if math.isfinite(last) and last > 0 else 1.0
        elif self.law is None:
            pending.step_lr = first
            return  # measuring only: the groups keep their own lr
        else:
            law, state = self.law, self.law_state
            pending.output = law.update(state, {}) if pending.probe else law.hold(state)
            pending.step_lr = float(pending.output.lr) * pending.schedule
        for group, ratio in zip(groups, pending.ratios, strict=True):
            group["lr"] = pending.step_lr * ratio

    # ---------------------------------------------------------------------------------------------
    # after the optimizer's step
    # ---------------------------------------------------------------------------------------------
    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        started = monitoring.now()
        pending, self._pending = self._pending, None
        if pending is None or pending.passthrough:  # hooks attached mid-step; a checkpoint's state initialisation
            return
        try:
            if pending.skipped:
                self._report_skipped(pending)
            elif pending.saved is None:  # measuring only, on a step that measures nothing: no copy of w to use
                self._report(pending, None, pending.step_lr, self._step_values(pending, _NAN))
            elif self.settings.skip_nonfinite and not self.space.all_finite(self.space.local()):
                self._undo_non_finite_update(pending)
            elif pending.instrumented:
                self._instrumented_step(pending)
            else:
                self._direct_step(pending)
        finally:
            for group, lr in zip(optimizer.param_groups, pending.group_lrs, strict=False):
                group["lr"] = lr
            self.calls += 1
            if not pending.skipped:
                self._step_count += 1
            if pending.bookkeeping is not None:  # monitoring only: the whole of the tuner's work is the monitor's
                self.monitor.record_overhead(pending.bookkeeping + monitoring.now() - started
                                             - pending.along_update_seconds)

    def _undo_non_finite_update(self, pending: PendingStep) -> None:
        """Undo a NaN/Inf update that the optimizer produced from a finite gradient.

        E.g. Adam with `eps=0` where the second moment is 0: put the parameters back to `w` and report the step
        as skipped. The optimizer's moments have advanced as for any step it took.
        """
        with torch.no_grad():
            torch._foreach_copy_(self.space.local(), pending.saved)
        pending.skipped = True
        self._warn(f"eos_core: step {pending.step} skipped: the optimizer's update is not finite (the gradient "
                   f"is); parameters left unchanged ({self._skipped_steps + 1} step(s) skipped so far)")
        self._report_skipped(pending)

    def _direct_step(self, pending: PendingStep) -> None:
        """The optimizer stepped with the law's lr: |u| from the move, then adopt and report the decision."""
        if pending.along_update and pending.objective is not None:
            self._watch_update(pending)
        params, moved = self.space.local(), pending.saved
        with torch.no_grad():
            torch._foreach_sub_(moved, params)  # w - (w + lr u)
        lr = pending.step_lr
        update_norm = math.sqrt(max(self.space.sum_of_squares(moved), 0.0)) / lr if lr > 0 else _NAN
        pending.saved = None
        self._adopt(pending, pending.output)
        self._report(pending, pending.output, lr, self._step_values(pending, update_norm))

    def _instrumented_step(self, pending: PendingStep) -> None:
        """Probe, track and decide at `w`, then apply the decided lr (the last good one on an error)."""
        at = self._read_update(pending)
        objective = pending.objective
        probe = self._probe_for(pending, at)
        try:
            with objective.preserving_buffers() if objective is not None else contextlib.nullcontext():
                statistics = self.probes.statistics(probe) if pending.probe else {}
                tracked = self.probes.track(probe, self.settings) if pending.track else {}
            output = self._decide(pending, statistics)
        except BaseException:
            # Finish the step with the last good lr so the parameters never stay half-updated.
            self._finish_with_held_lr(pending, at)
            raise
        measured = self._step_values(pending, at.norms[1] / at.eta_probe)
        if S.LOSS in statistics:
            measured["loss"] = float(statistics[S.LOSS])  # averaged over data-parallel ranks
        measured.update(tracked)
        if pending.along_update and objective is not None:
            self._watch_update(pending, at)
        lr = self._apply(pending, at, output)
        self._report(pending, output, lr, measured)

    def _watch_update(self, pending: PendingStep, at: AtW | None = None) -> None:
        """The monitor's quotient along this step's update (an adaptive optimizer's first step) and its warning.

        `lr u^T H u / (-g^T u)` ([`update_quotient`][eos_core.monitor.update_quotient]) from one product along the
        optimizer's move at `w`. On a direct step (`at` None) the move `D = lr u` is `w + D` minus the tuner's copy
        of `w`, and the parameters go to `w` and back to `w + D` by copies, bit for bit, so the training is untouched;
        on an instrumented step (`at`) they are at `w` already, with `D = eta_probe u`.
        """
        started = monitoring.now()
        clipped = self.clipped_gradients
        if at is not None:
            curvature, descent, norm = self.monitor.along_update(objective=pending.objective, params=at.params,
                                                                 grads=at.grads, delta=at.delta, clipped=clipped)
            step = pending.group_lrs[0] / at.eta_probe * norm  # lr u = (lr / eta_probe) |D| v
        else:
            params = self.space.local()
            moved = vec.clone(params)  # w + D
            delta = list(torch._foreach_sub(moved, pending.saved))
            grads = [g if g is not None else torch.zeros_like(p)
                     for g, p in zip(self.space.grads(), params, strict=True)]
            try:
                with torch.no_grad():
                    torch._foreach_copy_(params, pending.saved)
                curvature, descent, norm = self.monitor.along_update(objective=pending.objective, params=params,
                                                                     grads=grads, delta=delta, clipped=clipped,
                                                                     saved=pending.saved)
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(params, moved)
            step = norm  # lr u = |D| v
        quotient = float(rules.update_quotient(scalars, step, curvature, descent))
        self.monitor.warn_along_update(value=quotient, step=pending.step, warn=self.settings.warn is not False,
                                       stacklevel=_outside_stacklevel() + 1)
        pending.along_update_seconds += monitoring.now() - started

    def _probe_for(self, pending: PendingStep, at: AtW) -> Probe:
        """What the probes of this step work with."""
        measuring = type(self.law).__name__ if self.law is not None else "sharpness tracking"
        return Probe(pending, at, measuring=measuring, clipped=self.clipped_gradients, seed=self.settings.seed,
                     preconditioner=lambda: self._preconditioner_of(pending), previous_update=self._previous_update,
                     previous_lr=self._previous_lr)

    def _preconditioner_of(self, pending: PendingStep) -> Vector | None:
        """`_preconditioner`, computed once per step, as local tensors."""
        if pending.preconditioner is NOT_COMPUTED:
            found = self._preconditioner(pending)
            pending.preconditioner = None if found is None else [local(t) for t in found]
        return pending.preconditioner

    def _read_update(self, pending: PendingStep) -> AtW:
        """`D = eta_probe * u` from the optimizer's move; the parameters go back to `w`."""
        params = self.space.local()
        delta = pending.saved  # w, then D
        with torch.no_grad():
            torch._foreach_sub_(delta, params)  # w - (w + D) = -D
            torch._foreach_neg_(delta)
            torch._foreach_sub_(params, delta)  # back to w (exact when w and w + D are within a factor 2)
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(self.space.grads(), params, strict=True)]
        grad_dot_delta, delta_sq, weighted = self.space.dots([(grads, delta), (delta, delta), (params, delta)],
                                                             absolute=(False, False, True))
        norm = math.sqrt(max(delta_sq, 0.0))
        return AtW(params, grads, delta, pending.eta_probe, grad_dot_delta,
                   (parameter_scale_along(weighted, norm), norm))  # as vec.scale_along

    def _decide(self, pending: PendingStep, statistics: Mapping[str, Any]) -> LawOutput | None:
        """The law's decision: `update` on a probe, `hold` otherwise (None when only measuring)."""
        if self.law is None:
            return None
        if not pending.probe:
            return self.law.hold(self.law_state)
        output = self.law.update(self.law_state, statistics)
        if float(output.diagnostics["fallback"]) > 0:
            bad = [k for k, v in statistics.items() if not callable(v) and not np.all(np.isfinite(v))]
            if bad:
                self._warn(f"eos_core: step {pending.step}: non-finite {', '.join(bad)}; keeping the last good "
                           f"learning rate ({self._fallback_steps + 1} fallback(s) so far)")
        return output

    def _apply(self, pending: PendingStep, at: AtW, output: LawOutput | None) -> float:
        """Move the parameters to `w + eta u`; u is kept for the next probe when the law needs it.

        Returns:
            The applied eta: the law's lr times the schedule factor (measuring only: the first group's own lr, 0
            included).
        """
        eta = pending.group_lrs[0] if output is None else float(output.lr) * pending.schedule
        with torch.no_grad():
            torch._foreach_add_(at.params, at.delta, alpha=eta / at.eta_probe)
        if self._request.previous_update:
            self._previous_update = [d.div_(at.eta_probe) for d in at.delta]  # u for lr 1, for the next probe
            self._previous_lr = eta
        pending.saved = None
        self._adopt(pending, output)
        return eta

    def _finish_with_held_lr(self, pending: PendingStep, at: AtW) -> None:
        """After an error while probing: take the step with the law's last good lr and report it."""
        output = None if self.law is None else self.law.hold(self.law_state)
        measured = self._step_values(pending, at.norms[1] / at.eta_probe)
        lr = self._apply(pending, at, output)
        self._report(pending, output, lr, measured)

    def _adopt(self, pending: PendingStep, output: LawOutput | None) -> None:
        """The law's new state and the hyperparameters it decides (DCAO) take effect."""
        if output is None:
            return
        self.law_state = output.state
        if output.hyperparams:
            opt_info.write_hyperparams(self.optimizer, {k: float(v) for k, v in output.hyperparams.items()},
                                       self._hyperparam_ratios)
        if pending.probe and float(output.diagnostics["fallback"]) > 0:
            self._fallback_steps += 1

    # ---------------------------------------------------------------------------------------------
    # report
    # ---------------------------------------------------------------------------------------------
    def _step_values(self, pending: PendingStep, update_norm: float) -> dict[str, float]:
        """The loss, |g| and |u| of a step that was not skipped."""
        return {"loss": _NAN if pending.loss is None else float(pending.loss),
                "grad_norm": math.sqrt(pending.grad_sq) if pending.grad_sq >= 0 else _NAN,
                "update_norm": float(update_norm)}

    def _values(self, step: int, output: LawOutput | None, lr: float, measured: Mapping[str, float],
                update: bool = False) -> dict[str, Any]:
        """The diagnostics of a step: exactly `keys_for(law)`, NaN where nothing was measured."""
        values: dict[str, Any] = dict.fromkeys(self._keys, _NAN)
        law_values = {} if output is None else {k: float(v) for k, v in output.diagnostics.items()}
        values.update(law_values)
        if output is not None:
            values.update({k: float(v) for k, v in output.hyperparams.items()})
        values.update(measured)
        values.update(lr=float(lr), law_lr=float(lr) if output is None else float(output.lr),
                      probed=law_values.get("probed", 0.0), fallback=law_values.get("fallback", 0.0), skipped=0.0)
        plain, preconditioned = diag.law_sharpness(self.law, law_values)
        exact = (measured.get("sharpness", _NAN), measured.get("preconditioned_sharpness", _NAN))
        laws = (float(plain), float(preconditioned))
        readings = [self.monitor.reading(i) if self.monitor is not None else (_NAN, _NAN, _NAN, False)
                    for i in range(2)]
        # exact measurements of this step (sharpness_every, then the law's own) win over the monitor's estimate
        fallback = [law if math.isfinite(law) else reading[0] for law, reading in zip(laws, readings, strict=True)]
        derived = diag.derive_sharpness(scalars, float(lr), exact[0], exact[1], fallback[0], fallback[1])
        values.update({k: float(v) for k, v in derived.items()})
        if self.monitor is not None:
            values.update(self._monitor_values(step, float(lr), exact, laws, readings, values, update))
        values.update(self._counters(step))
        if len(values) == len(self._keys):  # no other key: already exactly the keys, in their order
            return values
        return {key: values[key] for key in self._keys}

    def _monitor_values(self, step: int, lr: float, exact: tuple[float, float], laws: tuple[float, float],
                        readings: list[tuple[float, float, float, bool]], values: Mapping[str, float],
                        update: bool) -> dict[str, float]:
        """The monitor's diagnostics of a step (residual, age, edge, unstable, k, route) and its early warning."""
        monitor = self.monitor
        out: dict[str, float] = {}
        fresh, certain = [], []
        for index, (prefix, measured, law, reading) in enumerate(zip(("", "preconditioned_"), exact, laws, readings,
                                                                       strict=True)):
            if math.isfinite(measured) or math.isfinite(law):
                residual, age, new, alone = _NAN, 0.0, True, False
            else:
                residual, age, new = reading[1], reading[2], reading[3]
                alone = new and monitor.conclusive[index]
            out[prefix + "sharpness_residual"], out[prefix + "sharpness_age"] = residual, age
            fresh.append(new)
            certain.append(alone)
        edge, on_preconditioned = self._edge()
        watched = "preconditioned_lr_sharpness" if on_preconditioned else "lr_sharpness"
        unstable = monitor.unstable
        if update:
            index = int(on_preconditioned)
            counted = bool(rules.counts_for_warning(scalars, fresh[index], step, adaptive=on_preconditioned))
            unstable = monitor.warn_update(fresh=fresh[index], counted=counted, value=float(values[watched]),
                                           edge=edge, step=step, what=watched,
                                           warn=self.settings.warn is not False, certain=certain[index])
        out.update(edge=edge, unstable=float(unstable) if monitor.seen and math.isfinite(edge) else _NAN,
                   monitor_every=monitor.every, monitor_exact=float(monitor.exact), update_quotient=monitor.quotient)
        return out

    def _counters(self, step: int) -> dict[str, Any]:
        return {"step": int(step), "route": self.route, "skipped_steps": self._skipped_steps,
                "fallback_steps": self._fallback_steps}

    def _report(self, pending: PendingStep, output: LawOutput | None, lr: float,
                measured: Mapping[str, float]) -> None:
        self.diagnostics = self._values(pending.step, output, lr, measured, update=True)

    def _report_skipped(self, pending: PendingStep) -> None:
        """The previous step's values with `skipped = 1`; `step` is the index the next real step gets."""
        self._skipped_steps += 1
        previous = self.diagnostics or self._initial_values()
        self.diagnostics = {**previous, "skipped": 1.0, **self._counters(self._step_count)}

    def _initial_values(self) -> dict[str, Any]:
        """What a skipped first step reports: the law's initial lr, nothing measured."""
        if self.law is None:
            return self._values(0, None, float(self.optimizer.param_groups[0]["lr"]), {})
        held = self.law.hold(self.law_state)
        return self._values(0, held, float(held.lr), {})

    # ---------------------------------------------------------------------------------------------
    # checkpoints (the layout: eos_core.adapters.torch.checkpoint)
    # ---------------------------------------------------------------------------------------------
    def _tuner_header(self) -> dict[str, Any]:
        """The tuner's state without its vectors (version `STATE_VERSION`): plain data."""
        return {
            "version": STATE_VERSION,
            "law": None if self.law is None else type(self.law).__name__,
            "law_state": None if self.law is None else self.law.state_to_host(self.law_state),
            "step": self._step_count,
            "calls": self.calls,
            "skipped_steps": self._skipped_steps,
            "fallback_steps": self._fallback_steps,
            "route": self.oracle.resolved,
            "exact_probes": self.oracle.exact_probes,
            "reference_lr": self._reference_lr,
            "previous_lr": self._previous_lr,
            "hyperparam_ratios": {k: list(v) for k, v in self._hyperparam_ratios.items()},
            "diagnostics": dict(self.diagnostics),
            "monitor": None if self.monitor is None else self.monitor.state_dict(),
        }

    def _vector_slots(self) -> tuple[str, ...]:
        """The vectors this configuration may come to hold.

        Returns:
            Their names; they are written as zeros before they exist, so that a fresh tuner's state dict can
            receive them from `torch.distributed.checkpoint.load`.
        """
        needs, tracking = self._request.needs, self.sharpness_every is not None
        slots = []
        if tracking or needs & {S.SHARPNESS, S.TOP_EIGENVALUES}:
            slots.append("eigenvector")
        precondition = self._has_preconditioner()
        if needs & configuration.PRECONDITIONED_NEEDS or (tracking and precondition):
            slots.append("preconditioned_eigenvector")
        if self._request.previous_update:
            slots.append("previous_update")
        if self.monitor is not None:
            slots.extend(name for name in checkpoint.MONITOR_VECTORS
                         if precondition or not name.startswith("preconditioned_"))
        return tuple(slots)

    def _state_dict_post(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        space = self.space
        vectors = {"eigenvector": self.spectral.eigenvector,
                   "preconditioned_eigenvector": self.spectral.preconditioned_eigenvector,
                   "previous_update": self._previous_update,
                   **(dict.fromkeys(checkpoint.MONITOR_VECTORS) if self.monitor is None else self.monitor.vectors())}
        vectors = {name: None if value is None else space.saved(value) for name, value in vectors.items()}
        keys = checkpoint.parameter_keys(state_dict, optimizer, self._params())
        return checkpoint.write(state_dict, keys, self._tuner_header(), vectors, self._vector_slots(),
                                lambda: space.saved([torch.zeros_like(t) for t in space.local()]))

    def _load_state_dict_pre(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        try:
            keys = checkpoint.parameter_keys(state_dict, optimizer, self._params())
        except (KeyError, TypeError, ValueError):  # torch's load_state_dict says what is wrong with the groups
            return checkpoint.take(state_dict, None)[1] if isinstance(state_dict, dict) else state_dict
        saved, cleaned = checkpoint.take(state_dict, keys)
        if saved is not None:
            self.load_tuner_state(saved)
        return cleaned

    def _parse_tuner_state(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        """Check a saved state and convert it to the tuner's attributes (nothing is changed here)."""
        checkpoint.check_header(saved)
        name = None if self.law is None else type(self.law).__name__
        if saved["law"] != name:
            raise ValueError(f"the checkpoint's tuner state was saved with law {saved['law']}, "
                             f"but this tuner runs {name}")
        step = int(saved["step"])
        out: dict[str, Any] = {
            "law_state": self._restored_law_state(saved["law_state"]),
            "_step_count": step,
            "calls": int(saved.get("calls", step)),  # version 1 counted every call in "step"
            "_skipped_steps": int(saved.get("skipped_steps", 0)),
            "_fallback_steps": int(saved.get("fallback_steps", 0)),
            "route": saved.get("route"),
            "exact_probes": int(saved.get("exact_probes", 0)),
            "_reference_lr": float(saved["reference_lr"]),
            "_previous_lr": float(saved.get("previous_lr", 0.0)),
        }
        if saved.get("hyperparam_ratios") is not None:
            out["_hyperparam_ratios"] = {k: [float(r) for r in v] for k, v in saved["hyperparam_ratios"].items()}
        targets = {"eigenvector": "eigenvector", "preconditioned_eigenvector": "preconditioned_eigenvector",
                   "previous_update": "_previous_update"}
        like = self.space.local()
        for key, attribute in targets.items():
            value = saved.get(key)
            out[attribute] = None if value is None else self.space.restored(key, value, like)
        if saved.get("diagnostics") is not None:
            out["diagnostics"] = dict(saved["diagnostics"])
        if self.monitor is not None and saved.get("monitor") is not None:
            wide = [SimpleNamespace(shape=t.shape, device=t.device, dtype=torch.promote_types(t.dtype, torch.float32))
                    for t in like]  # the trackers' vectors are at least float32
            vectors = {name: None if saved.get(name) is None else self.space.restored(name, saved[name], wide)
                       for name in checkpoint.MONITOR_VECTORS}
            for prefix, entry in zip(("", "preconditioned_"), saved["monitor"].get("trackers", ()), strict=False):
                if entry is not None and monitoring.missing_basis(prefix, entry, vectors):
                    raise ValueError(f"the checkpoint's tuner state has a {prefix}monitor tracker without its basis "
                                     "vectors")
            out["monitor"] = (dict(saved["monitor"]), vectors)
        return out

    def _restored_law_state(self, saved: Any) -> Any:
        if self.law is None:
            return None
        if not isinstance(saved, Mapping):
            raise ValueError(f"the checkpoint's tuner state has no law state for {type(self.law).__name__}")
        return self.law.state_from_host(self.law_state, saved)  # dtypes kept: counters stay integers


# -------------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------------
def _initialising_checkpoint_state(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> bool:
    """Whether this `optimizer.step()` is `torch.distributed.checkpoint`'s state initialisation, not training.

    `get_optimizer_state_dict` / `set_optimizer_state_dict` call `_init_optim_state` (torch 2.13,
    `torch/distributed/checkpoint/state_dict.py`), which, for an optimizer without state and gradients, sets
    every gradient to zeros and every group's lr to 0 and calls `optimizer.step(closure=None)` so the
    optimizer creates its state. The tuner must leave that step alone: neither count it, nor set its own lr
    (AdamW's weight decay would move the parameters), nor probe.

    Returns:
        True when the step has no closure, every group's lr is 0 and a `_init_optim_state` of
        `torch.distributed.checkpoint` is found within 12 frames above the tuner's pre-step hook.
    """
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    if closure is not None or any(float(group.get("lr", 1.0)) != 0.0 for group in optimizer.param_groups):
        return False
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "_init_optim_state" and "checkpoint" in code.co_filename:
            return True
        frame = frame.f_back
    return False


def _outside_stacklevel() -> int:
    """The stacklevel that attributes a warning to the first frame outside this adapter and torch.

    Returns:
        `warnings.warn`'s stacklevel, seen from the caller of this function, of the line that called
        `optimizer.step` / `tuner.step` (or of the trainer that did).
    """
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_SOURCES):
        frame, level = frame.f_back, level + 1
    return level
