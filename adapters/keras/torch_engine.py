r"""The torch backend: the Keras optimizer behind a `torch.optim.Optimizer`, tuned by the PyTorch adapter.

On the torch backend Keras variables hold `torch.nn.Parameter` values and the step runs eagerly, so the
PyTorch adapter's [`CurvatureTuner`][eos_core.adapters.torch.CurvatureTuner] ($u^\top H u$ by double backward or
finite differences, warm-started power iteration, non-finite skipping, law fallbacks, skipped-step and fallback
counts, the registry's diagnostics) drives the step unchanged:

1. `KerasDirection` is a `torch.optim.Optimizer` over those parameters whose step is $w \leftarrow w + \eta u$,
   $u$ the Keras optimizer's update for learning rate 1 (see `eos_core.adapters.keras.optimizers`), computed by
   running the Keras optimizer on the parameters set to 0. It is linear in $\eta$ with a state that does not
   depend on $\eta$, which is all the PyTorch tuner asks of an optimizer (`linear_in_lr=True`). Its `lr` is the
   learning rate the law starts from.
2. The PyTorch tuner gets the loss on the batch through `set_objective`: the wrapped `train_step`
   (`eos_core.adapters.keras.train_step`) publishes a `TorchBatch` whose `loss()` re-runs the model on the batch
   with the non-trainable variables entering the step.
3. Its state, `state_dict()["eos_core"]` (see `TorchEngine.build` for the layout), is copied into
   Keras variables after every step and handed back to `load_tuner_state` after `load_own_variables` /
   `set_weights` (what `keras.models.load_model`, `model.load_weights` and the checkpoint callbacks
   call), so a checkpoint restores every field of it and the resumed run continues bit-identically. A field
   this engine does not know how to store raises a RuntimeError at the first step rather than being lost.

The diagnostics are the PyTorch tuner's (exactly `eos_core.diagnostics.keys_for(law)`); the tuner itself
skips non-finite steps, counts them and the law fallbacks, and warns as `warn` says (`warn="jit"` is
`True` here: the step runs on the host).

**Monitoring only** (`law=None`): `KerasDirection` then runs the Keras optimizer's own `apply` on the weights (its
learning rate or schedule, its constraints), so the weights are those of a plain Keras run; the PyTorch tuner
measures beside it with the optimizer's current learning rate in its param group (for `lr` and `lr_sharpness`).

**The sharpness monitor** (`monitor_budget`) is the PyTorch adapter's ([`eos_core.adapters.torch.monitor`][]),
ticking in the step's pre-hook at $w$ with the step's gradient. The Keras optimizer's edge of stability and
preconditioner (`eos_core.adapters.keras.optimizers.edge`, `keras_preconditioner`) replace the torch optimizer's.
Its state (the trackers' Lanczos bases, the scalars of `state_dict()["eos_core"]["monitor"]` as JSON) is kept in
Keras variables like the rest (see `TorchEngine.build`).

Routes: `auto` (double backward, falling back to one-sided finite differences), `double-backward`,
`fd-central`, `fd-onesided`. `jvp-jvp` / `jvp-grad` need `torch.func.functional_call` to swap the
parameters, which Keras layers do not read through their module attributes, so they are refused.
Preconditioned sharpness (`sharpness_every`) is reported for Adam / AdamW / RMSprop without momentum; laws
that *need* the preconditioned Hessian (`preconditioned=True`) run on the JAX backend only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from eos_core import diagnostics as D
from eos_core.adapters.keras.optimizers import apply_update, current_lr, decay_rates
from eos_core.adapters.keras.train_step import TorchBatch, current_batch
from eos_core.adapters.torch import STATE_KEY
from eos_core.adapters.torch import CurvatureTuner as TorchCurvatureTuner
from eos_core.adapters.torch.checkpoint import MONITOR_VECTORS
from eos_core.laws.base import Law
from eos_core.monitor import TRACKER_RESTART

#: Counters of the PyTorch tuner's state kept in the `eos_core_counters` variable (int64), in this order; the
#: law state's integer fields follow them.
COUNTERS: tuple[str, ...] = ("version", "step", "calls", "skipped_steps", "fallback_steps", "exact_probes",
                             "has_diagnostics", "has_eigenvector", "has_preconditioned_eigenvector",
                             "has_previous_update")
#: The state's vectors (lists of tensors shaped like the parameters, or None).
VECTORS: tuple[str, ...] = ("eigenvector", "preconditioned_eigenvector", "previous_update")
#: Every field of the PyTorch tuner's state this engine stores.
STATE_FIELDS = frozenset({*COUNTERS[:6], "law", "law_state", "route", "reference_lr", "hyperparam_ratios",
                          "diagnostics", *VECTORS, "previous_lr", "monitor", *MONITOR_VECTORS})
#: Bytes kept for a route name (UTF-8, zero-padded).
TEXT_BYTES = 64
#: Bytes kept for the sharpness monitor's scalars (JSON, UTF-8, zero-padded; about 700 are used).
MONITOR_BYTES = 4096


def _host(variable: Any, dtype: Any = np.float64) -> np.ndarray:
    """A Keras variable's value as a numpy array (without Keras's `numpy()` copy warnings)."""
    return variable.value.detach().cpu().numpy().astype(dtype)


def _wide_dtype(variable: Any) -> str:
    """The dtype of a tracker's vector for `variable` (at least float32, as the PyTorch monitor keeps it)."""
    return str(torch.promote_types(variable.value.dtype, torch.float32)).removeprefix("torch.")


def _encode(text: str | None, size: int = TEXT_BYTES) -> np.ndarray:
    data = np.zeros(size, dtype=np.int32)
    raw = (text or "").encode()
    if len(raw) > size:
        raise RuntimeError(f"eos_core Keras torch engine: the text {text!r} is longer than {size} bytes")
    data[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return data


def _decode(row: np.ndarray) -> str:
    return bytes(int(b) for b in np.asarray(row).ravel() if b != 0).decode()


class KerasDirection(torch.optim.Optimizer):
    r"""A torch optimizer whose step is $w \leftarrow w + \eta u$, $u$ the Keras `optimizer`'s update for lr = 1.

    Parameters without a gradient are left alone (as Keras does), and a step where no parameter has one changes
    nothing (the PyTorch tuner's way of skipping a non-finite step).

    Args:
        optimizer: the Keras optimizer, built on `variables` (with learning rate 1 unless `measuring`).
        variables: the model's trainable variables.
        lr: the group's initial learning rate.
        measuring: the step is the Keras optimizer's own `apply` (its own learning rate; `lr` is only reported).
    """

    def __init__(self, optimizer: Any, variables: Sequence[Any], lr: float, *, measuring: bool = False) -> None:
        self.keras_optimizer = optimizer
        self.keras_variables = list(variables)
        self.measuring = measuring
        self.decay = decay_rates(optimizer, self.keras_variables)
        super().__init__([v.value for v in self.keras_variables], {"lr": float(lr)})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        r"""One step: $w \leftarrow w + \eta u$ for the parameters with a gradient, $\eta$ the group's `lr`.

        $u$ is the Keras optimizer's update at lr = 1, computed on the parameters set to 0, plus
        $-\text{wd} \cdot w$ for decoupled weight decay; the Keras optimizer's state advances by one step. With
        `measuring` the step is the Keras optimizer's own `apply` instead.

        Args:
            closure: re-evaluates the loss (run with gradients enabled), as for any torch optimizer.

        Returns:
            The closure's loss, or None without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        params, lr = group["params"], float(group["lr"])
        active = [i for i, p in enumerate(params) if p.grad is not None]
        if not active:
            return loss
        if self.measuring:  # Keras's own step, as its torch trainer runs it
            self.keras_optimizer.apply([params[i].grad for i in active], [self.keras_variables[i] for i in active])
            return loss
        weights = [params[i].detach().clone() for i in active]
        for i in active:
            params[i].zero_()
        apply_update(self.keras_optimizer, [params[i].grad for i in active], [self.keras_variables[i] for i in active])
        for i, w in zip(active, weights, strict=True):
            p = params[i]
            u = p.detach().clone()  # 0 + u
            if self.decay[i]:
                u.add_(w, alpha=-self.decay[i])
            p.copy_(w).add_(u, alpha=lr)
        return loss


class _KerasTorchTuner(TorchCurvatureTuner):
    """The PyTorch tuner, with the Keras optimizer's preconditioner and edge of stability.

    The preconditioner serves the preconditioned sharpness, the edge the monitor's warning; both replace the torch
    optimizer's.
    """

    keras_preconditioner: Callable[[], list[torch.Tensor] | None] = staticmethod(lambda: None)
    #: the Keras optimizer exposes a diagonal preconditioner (Adam, AdamW, RMSprop without momentum)
    keras_has_preconditioner = False
    #: `(edge, preconditioned)` of the monitor's warning (the Keras tuner's `edge`)
    keras_edge: tuple[float, bool] = (math.nan, False)

    def _preconditioner(self, pending: Any) -> list[torch.Tensor] | None:
        return self.keras_preconditioner()

    def _has_preconditioner(self) -> bool:
        return self.keras_has_preconditioner

    def _edge(self) -> tuple[float, bool]:
        return self.keras_edge


def keras_preconditioner(optimizer: Any, variables: Sequence[Any]) -> Callable[[], list[torch.Tensor]] | None:
    r"""The diagonal preconditioner $P$ of the Keras optimizer, as a callable that reads its current state.

    Adam / AdamW: $P = (\sqrt{v} + \epsilon) (1 - \beta_1^t) / \sqrt{1 - \beta_2^t}$ (`amsgrad`: $v$ is the
    running maximum); RMSprop without momentum: $P = \sqrt{v + \epsilon}$, centred
    $\sqrt{v - \bar g^2 + \epsilon}$. Read after the step by `sharpness_every` and before it by the monitor
    ($P$ as the previous step left it; NaN before Adam's first step, when its bias corrections are not defined).

    Args:
        optimizer: the Keras optimizer, built on `variables`.
        variables: the model's trainable variables.

    Returns:
        A callable `() -> P` (a list of tensors like the weights), or None for the other optimizers.
    """
    import keras

    positions = [optimizer._get_variable_index(v) for v in variables]
    if isinstance(optimizer, keras.optimizers.Adam):
        def adam() -> list[torch.Tensor]:
            second = optimizer._velocity_hats if optimizer.amsgrad else optimizer._velocities
            t = float(optimizer._iterations.value)
            if t == 0:  # no step yet (the monitor reads P before the step): no preconditioner
                return [torch.full_like(second[i].value, math.nan) for i in positions]
            scale = (1.0 - float(optimizer.beta_1) ** t) / math.sqrt(1.0 - float(optimizer.beta_2) ** t)
            return [(second[i].value.sqrt() + float(optimizer.epsilon)) * scale for i in positions]

        return adam
    if isinstance(optimizer, keras.optimizers.RMSprop) and float(optimizer.momentum) == 0.0:
        def rms() -> list[torch.Tensor]:
            eps = float(optimizer.epsilon)
            if optimizer.centered:
                return [(optimizer._velocities[i].value - optimizer._average_gradients[i].value ** 2 + eps).sqrt()
                        for i in positions]
            return [(optimizer._velocities[i].value + eps).sqrt() for i in positions]

        return rms
    return None


class TorchEngine:
    """Runs the tuner's step on the torch backend (see the module docstring).

    Args:
        tuner: the Keras `CurvatureTuner` that owns the engine (its settings, variables and wrapped optimizer).
        law: the law (None: measuring only).
    """

    def __init__(self, tuner: Any, law: Law | None) -> None:
        self.tuner = tuner
        self.law = law
        self.dirty = False
        self.request = law.request() if law is not None else None
        self.monitoring = tuner.monitor_budget is not None
        self.needs_objective = ((self.request is not None and self.request.objective)
                                or tuner.sharpness_every is not None or self.monitoring)
        self.keys = D.keys_for(law)
        self.float_keys = tuple(k for k in self.keys if k not in D.INTEGER_KEYS and k not in D.STRING_KEYS)
        self.int_keys = tuple(k for k in self.keys if k in D.INTEGER_KEYS)
        self.text_keys = tuple(k for k in self.keys if k in D.STRING_KEYS)
        initial = {} if law is None else law.state_to_host(law.init(tuner.reference_lr))
        self.law_ints = tuple(f for f, v in initial.items() if isinstance(v, int))
        self.law_floats = tuple(f for f in initial if f not in self.law_ints)

    # -- build -----------------------------------------------------------------------------------
    def build(self, trainable: Sequence[Any]) -> None:
        """Build the PyTorch tuner on the Keras optimizer, and the variables that hold its state.

        Layout (every value of the PyTorch tuner's `state_dict()["eos_core"]`):

        * `eos_core_counters` (int64): `COUNTERS` (`version` is the version of the PyTorch state
          these values came from; `has_*` say which optional parts exist), then the law state's integer
          fields;
        * `eos_core_scalars` (float64): `reference_lr`, then the law state's float fields;
        * `eos_core_text` (int32, UTF-8 bytes): the resolved `route` (empty: not resolved), then the
          diagnostics' string keys;
        * `eos_core_diagnostics` (float64) and `eos_core_diagnostic_counts` (int64): the last step's
          diagnostics, float and integer keys of `keys_for(law)`;
        * `eos_core_<vector>`: one variable per trainable variable for each vector of `VECTORS` the
          run can produce;
        * for a law that uses the previous update, `eos_core_previous_lr` (float64): the lr applied to it;
        * with the sharpness monitor (`monitor_budget`), `eos_core_monitor` (int32, UTF-8 bytes): the monitor's
          scalars (`state_dict()["eos_core"]["monitor"]`: trackers' tridiagonal entries and counters, measured
          times, credit, the warning's state) as JSON, whose float reprs restore every value exactly; and
          `eos_core_<monitor vector>` for each of the trackers' Lanczos vectors
          ([`MONITOR_VECTORS`][eos_core.adapters.torch.checkpoint.MONITOR_VECTORS]; the preconditioned ones with
          a preconditioner only), in at least float32. A tracker not started yet is None in the JSON.

        `law` is the law the tuner was built with (None: measuring only); `hyperparam_ratios` is empty (the
        Keras tuner refuses laws that decide hyperparameters).

        Args:
            trainable: the model's trainable variables.
        """
        tuner, optimizer = self.tuner, self.tuner.inner_optimizer
        self.trainable = list(trainable)
        self.params = [v.value for v in self.trainable]
        measuring = self.law is None
        start = current_lr(optimizer) if measuring else tuner.reference_lr
        self.shim = KerasDirection(optimizer, self.trainable, start, measuring=measuring)
        reference = tuner.reference_lr if tuner.reference_lr > 0 and not measuring else None
        self.torch_tuner = _KerasTorchTuner(self.shim, self.law, settings=tuner.settings, reference_lr=reference,
                                            linear_in_lr=True)
        precond = keras_preconditioner(optimizer, self.trainable)
        if precond is not None:
            self.torch_tuner.keras_preconditioner = precond
        self.torch_tuner.keras_has_preconditioner = precond is not None
        self.torch_tuner.keras_edge = tuner.edge
        add = tuner.add_variable
        self.counters = add(shape=(len(COUNTERS) + len(self.law_ints),), dtype="int64", name="eos_core_counters")
        self.scalars = add(shape=(1 + len(self.law_floats),), dtype="float64", name="eos_core_scalars")
        self.text = add(shape=(1 + len(self.text_keys), TEXT_BYTES), dtype="int32", name="eos_core_text")
        self.diagnostics_variable = add(shape=(len(self.float_keys),), dtype="float64", name="eos_core_diagnostics")
        self.counts_variable = add(shape=(len(self.int_keys),), dtype="int64", name="eos_core_diagnostic_counts")
        tracking = tuner.sharpness_every is not None
        request = self.request
        wanted = {
            "eigenvector": (request is not None and request.hessian_eigenvector) or tracking,
            "preconditioned_eigenvector": (request is not None and request.preconditioned)
            or (tracking and precond is not None),
            "previous_update": request is not None and request.previous_update,
        }
        self.vectors: dict[str, list[Any] | None] = {
            key: [tuner.add_variable_from_reference(v, name=f"eos_core_{key}") for v in self.trainable]
            if wanted[key] else None
            for key in VECTORS
        }
        #: the lr applied to the previous update (laws that use the previous update only; 0 for the others)
        self.previous_lr = (add(shape=(), dtype="float64", name="eos_core_previous_lr")
                            if wanted["previous_update"] else None)
        self.monitor_text = None
        self.monitor_vectors: dict[str, list[Any] | None] = dict.fromkeys(MONITOR_VECTORS)
        if self.monitoring:
            self.monitor_text = add(shape=(MONITOR_BYTES,), dtype="int32", name="eos_core_monitor")
            for key in MONITOR_VECTORS:
                if precond is None and key.startswith("preconditioned_"):
                    continue
                self.monitor_vectors[key] = [
                    add(shape=tuple(v.shape), dtype=_wide_dtype(v), initializer="zeros", name=f"eos_core_{key}")
                    for v in self.trainable]
        self._write()

    # -- step --------------------------------------------------------------------------------------
    def apply(self, grads: Sequence[Any]) -> float:
        """One tuned step from the step's gradients (the PyTorch tuner's `step`), on the Keras variables in place.

        The PyTorch tuner's objective is the published batch's loss; the step's own loss (recorded by the wrapped
        `train_step`) is handed over as the closure's value. The batch's non-trainable and metrics variables are
        put back to the values the real step produced after the probes, and the tuner's state is copied into the
        engine's variables.

        Args:
            grads: the gradients, one per trainable variable (None for a variable without one).

        Returns:
            The learning rate applied (the `lr` diagnostic).

        Raises:
            RuntimeError: the step needs the loss on the batch (the law, `sharpness_every` or the monitor) and no
                wrapped `train_step` published one (the model is not attached).
        """
        batch = current_batch()
        batch = batch if isinstance(batch, TorchBatch) else None
        if batch is None and self.needs_objective:
            raise RuntimeError(self.tuner.no_batch_message())
        if self.dirty:
            self._read()
            self.dirty = False
        for p, g in zip(self.params, grads, strict=True):
            p.grad = None if g is None else g.detach()
        if self.law is None:  # the optimizer's own lr (a schedule's value at this step), for lr and lr_sharpness
            self.shim.param_groups[0]["lr"] = current_lr(self.tuner.inner_optimizer)
        produced = batch.snapshot() if batch is not None else None
        try:
            closure = None
            if batch is not None:
                self.torch_tuner.set_objective(batch.loss)
                if batch.step_loss is not None:
                    step_loss = batch.step_loss.detach()

                    def closure() -> torch.Tensor:  # the step's loss, already back-propagated by Keras
                        return step_loss
            with torch.enable_grad():
                self.torch_tuner.step(closure)
        finally:
            if batch is not None:
                batch.restore(produced)
        self._write()
        return float(self.torch_tuner.diagnostics["lr"])

    # -- the state in Keras variables ----------------------------------------------------------------
    def _write(self) -> None:
        """Copy the PyTorch tuner's state into the variables (every field; an unknown one raises)."""
        saved = self.torch_tuner.state_dict()[STATE_KEY]
        unknown = sorted(set(saved) - STATE_FIELDS)
        if unknown or saved.get("hyperparam_ratios"):
            raise RuntimeError(f"eos_core Keras torch engine: the PyTorch tuner's state has fields it cannot store "
                               f"({unknown or ['hyperparam_ratios']}); a Keras checkpoint would lose them")
        law_state = saved["law_state"]
        diagnostics = saved.get("diagnostics") or self._initial_diagnostics()
        counters = {**{k: saved.get(k, 0) for k in COUNTERS[:6]}, "has_diagnostics": bool(saved.get("diagnostics")),
                    **{f"has_{k}": saved.get(k) is not None for k in VECTORS}}
        integers = [int(counters[k]) for k in COUNTERS] + [int(law_state[f]) for f in self.law_ints]
        self.counters.assign(np.asarray(integers, dtype=np.int64))
        floats = [float(saved["reference_lr"])] + [float(law_state[f]) for f in self.law_floats]
        self.scalars.assign(np.asarray(floats, dtype=np.float64))
        self.text.assign(np.stack([_encode(saved.get("route"))] + [_encode(diagnostics[k]) for k in self.text_keys]))
        self.diagnostics_variable.assign(np.asarray([float(diagnostics[k]) for k in self.float_keys], dtype=np.float64))
        self.counts_variable.assign(np.asarray([int(diagnostics[k]) for k in self.int_keys], dtype=np.int64))
        _assign_vectors(saved, self.vectors)
        previous_lr = float(saved.get("previous_lr", 0.0))
        if self.previous_lr is not None:
            self.previous_lr.assign(np.float64(previous_lr))
        elif previous_lr != 0.0:
            raise RuntimeError("eos_core Keras torch engine: the PyTorch tuner keeps a previous_lr for a law without a "
                               "previous update; a Keras checkpoint would lose it")
        self._write_monitor(saved)

    def _write_monitor(self, saved: dict[str, Any]) -> None:
        """The monitor's scalars (JSON) and its trackers' vectors into their variables."""
        monitor = saved.get("monitor")
        if monitor is None:
            if self.monitor_text is not None:
                raise RuntimeError("eos_core Keras torch engine: the PyTorch tuner has no sharpness monitor state")
            return
        if self.monitor_text is None:
            raise RuntimeError("eos_core Keras torch engine: the PyTorch tuner keeps a sharpness monitor this engine "
                               "did not expect; a Keras checkpoint would lose it")
        self.monitor_text.assign(_encode(json.dumps(monitor, allow_nan=True), MONITOR_BYTES))
        _assign_vectors(saved, self.monitor_vectors)

    def _read_monitor(self) -> dict[str, Any]:
        """The monitor's part of the state for `load_tuner_state` (empty without a monitor)."""
        if self.monitor_text is None:
            return {}
        text = _decode(_host(self.monitor_text, np.int32))
        if not text:
            return {}
        monitor = json.loads(text)
        trackers = list(monitor.get("trackers") or [None, None])
        out: dict[str, Any] = {"monitor": monitor}
        for index, prefix in enumerate(("", "preconditioned_")):
            started = index < len(trackers) and trackers[index] is not None
            for i in range(TRACKER_RESTART):
                key = f"{prefix}monitor_basis_{i}"
                variables = self.monitor_vectors[key]
                out[key] = ([v.value.detach().clone() for v in variables]
                            if started and variables is not None else None)
        return out

    def _read(self) -> None:
        """Hand the state held by the variables back to the PyTorch tuner (`load_tuner_state`)."""
        ints = _host(self.counters, np.int64).tolist()
        counters = dict(zip(COUNTERS, ints, strict=False))
        scalars = _host(self.scalars).tolist()
        law_state: dict[str, Any] = dict(zip(self.law_floats, scalars[1:], strict=True))
        law_state.update(zip(self.law_ints, ints[len(COUNTERS):], strict=True))

        def vector(key: str) -> list[torch.Tensor] | None:
            variables = self.vectors[key]
            if variables is None or not counters[f"has_{key}"]:
                return None
            return [v.value.detach().clone() for v in variables]

        self.torch_tuner.load_tuner_state({
            **{k: int(counters[k]) for k in COUNTERS[:6]},
            "law": None if self.law is None else type(self.law).__name__,
            "law_state": law_state,
            "route": _decode(_host(self.text, np.int32)[0]) or None,
            "reference_lr": float(scalars[0]),
            "hyperparam_ratios": {},
            **{key: vector(key) for key in VECTORS},
            "diagnostics": self.decode(_host_read) if counters["has_diagnostics"] else {},
            "previous_lr": float(_host(self.previous_lr)) if self.previous_lr is not None else 0.0,
            **self._read_monitor(),
        })

    def _initial_diagnostics(self) -> dict[str, Any]:
        """The diagnostics reported before the first step.

        Returns:
            The law's initial lr (with `law=None` the optimizer's) as `lr` and `law_lr`, the law's held
            diagnostics, `step`, `skipped_steps`, `fallback_steps` 0, the tuner's `route` and NaN for everything
            else.
        """
        values: dict[str, Any] = dict.fromkeys(self.keys, math.nan)
        if self.law is None:
            lr = current_lr(self.tuner.inner_optimizer)
        else:
            held = self.law.hold(self.law.init(self.tuner.reference_lr))
            lr = float(held.lr)
            values.update({k: float(v) for k, v in held.diagnostics.items()})
        values.update(lr=lr, law_lr=lr, skipped=0.0, step=0, skipped_steps=0, fallback_steps=0,
                      route=self.torch_tuner.route)
        return values

    def mark_loaded(self) -> None:
        """Hand the variables, just overwritten by a loaded checkpoint, to the PyTorch tuner now.

        A state it cannot read (a newer version of its state, vectors of other shapes) then fails the load itself
        rather than the next step.
        """
        self.dirty = True
        self._read()
        self.dirty = False

    def report(self, found: dict[str, Any], *, stacklevel: int = 1) -> None:
        """Nothing to report on a read: the PyTorch tuner warned during the step (see the module docstring)."""

    # -- reading ----------------------------------------------------------------------------------
    def decode(self, read: Callable[[Any], Any]) -> dict[str, Any]:
        """The last step's diagnostics, decoded from the engine's variables.

        Args:
            read: maps a Keras variable to its current value.

        Returns:
            Exactly `eos_core.diagnostics.keys_for(law)`, in that order: floats, the ints `step`,
            `skipped_steps`, `fallback_steps` and the str `route`.
        """
        values: dict[str, Any] = dict(zip(self.float_keys, np.asarray(read(self.diagnostics_variable),
                                                                      dtype=np.float64).tolist(), strict=True))
        values.update(zip(self.int_keys, np.asarray(read(self.counts_variable)).astype(np.int64).tolist(),
                          strict=True))
        text = np.asarray(read(self.text))
        values.update({k: _decode(text[1 + i]) for i, k in enumerate(self.text_keys)})
        return {k: values[k] for k in self.keys}


def _host_read(variable: Any) -> np.ndarray:
    return variable.value.detach().cpu().numpy()


def _assign_vectors(saved: dict[str, Any], table: dict[str, Any]) -> None:
    """Each saved vector of `table`'s keys into its Keras variables (`table[key]`, None when not expected)."""
    for key, variables in table.items():
        values = saved.get(key)
        if values is None:
            continue
        if variables is None:
            raise RuntimeError(f"eos_core Keras torch engine: the PyTorch tuner keeps a {key} this engine did not "
                               "expect; a Keras checkpoint would lose it")
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)
