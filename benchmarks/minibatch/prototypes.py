r"""Mini-batch CDAT prototypes: a small training loop around `torch.optim.AdamW` that measures what a rule needs.

Notation (CDAT paper eq. 8): w_t the parameters, g_t = grad f_{B_t}(w_t) the gradient of batch B_t, u_t the
base optimizer's update for lr 1 (AdamW: u = -m_hat / (sqrt(v_hat) + eps) - wd w), eta_t the applied lr,
w_{t+1} = w_t + eta_t u_t, H_t the Hessian of f_{B_t} at w_t.

**Numerators** (`numerator=`):

* `"same"`: n_t = max(-g_t . u_t, 0), d_t = |u_t^T H_t u_t| (the library's CDAT). u_t is built from g_t, so
  -g_t . u_t contains the batch's own noise along u_t: it overstates the full-batch descent.
* `"lag"`: with the previous update u_{t-1} and the lr eta_{t-1} applied to it, on the current batch,

  $$
  n_t = -g_t \cdot u_{t-1} + \eta_{t-1}\, u_{t-1}^\top H_t u_{t-1}, \qquad
  d_t = u_{t-1}^\top H_t u_{t-1}.
  $$

  g_t is independent of u_{t-1} (batch t was not seen by the update), so E[-g_t . u_{t-1}] = -grad f(w_t) .
  u_{t-1}; the second term corrects it to first order back to w_{t-1}: -grad f(w_{t-1}) . u_{t-1} =
  -grad f(w_t) . u_{t-1} + eta_{t-1} u_{t-1}^T H u_{t-1} + O(eta^2). The curvature is measured along u_{t-1}
  too, so n and d are unbiased estimates of the full-batch quantities along the same direction. n is EMA'd
  signed; the ratio is clipped at 0 afterwards.
* `"next"`: the curvature is measured along the current update on the current batch, d_t = u_t^T H_t u_t,
  and the numerator waits for the next step's gradient, n_t = -g_{t+1}(w_{t+1}) . u_t + eta_t d_t (no extra
  gradient for n; the lr moves one step later).

* `"window"`: at a probe (step p) the curvature is measured along the current update and kept as a vector,
  H_p u_p (one extra gradient, one-sided finite differences), with d_p = u_p^T H_p u_p; every later batch s
  until the next probe contributes one numerator sample from a gradient u_p did not see, corrected back to
  w_p to first order, n_s = -g_s(w_s) . u_p + (w_s - w_p) . H_p u_p (two dot products per step, no extra
  gradient); the next probe folds (mean of the samples, d_p) into the law. With `probe_every=k` the
  numerator averages k batches, so its variance is about k times smaller than `"next"`'s at the same cost.

Until the first (n, d) pair of a `lag` / `next` / `window` rule is complete (1 to k steps), the lr is
`lr_init` (1e-3).

**Smoothing** (`smoothing=`), per probe: `"ema"` (ratio of the EMAs of n and d, eta = sigma max(n~, 0) /
d~, EMAs from 0 without bias correction, as the library's CDAT); `"logema"` (bias-corrected EMA of
log(sigma n_t / d_t), single-probe ratios floored at 1e-8); `"median"` (median of the last `window`
single-probe ratios sigma n_t / d_t, clipped at 0). `max_growth=c` bounds the law's lr to
[eta_prev / c^k, eta_prev c^k] for a probe k steps after the previous one (from `lr_init` at the first).
`max_rise=r` caps the law's lr at r eta_1, eta_1 the first positive lr the law measured (after its first
probe; a bound against the run-away growth of the lr on ReLU networks, relative to the run's own scale).

**Decay** (`decay=`): the applied lr is the law's lr times `cos`: 0.5 (1 + cos(pi t / T)) or `linear`:
1 - t / T over the run's T steps (no warm-up, no peak lr).

**Curvature route** (`route=`): `"fd"`, one-sided finite differences (g_B(w + h v) - g_B(w)) . v / h with h
from `eos_core.routes.finite_difference_step` (parameter scale along v, float32 epsilon), one extra
gradient on the probe's batch; `"exact"`: double backward; `"secant"`: the same difference at the scale of
the step about to be taken, h = the lr the law would apply now, or the finite-difference h when larger (the
parabola through the step, as in M. Mutschler and A. Zell, *Parabolic Approximation Line Search for DNNs*,
NeurIPS 2020; it sees the ReLU kinks a step crosses, which an infinitesimal h does not).

`probe_every=k`: measure every k steps and reuse the law's lr in between (the decay still moves every step).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.minibatch.methods import BASE_LR, DECAYS, WEIGHT_DECAY, LossFn, MethodSpec, Trainer
from eos_core.routes import finite_difference_step, parameter_scale_along

#: one tensor per parameter (a parameter-shaped vector)
Vector = list[torch.Tensor]
#: the values of `ProtoConfig.numerator` (see the module docstring)
NUMERATORS = ("same", "lag", "next", "window")
#: the values of `ProtoConfig.smoothing` (see the module docstring)
SMOOTHINGS = ("ema", "logema", "median")
#: at most this many per-probe records are kept in a run's JSON
MAX_RECORDS = 400


def _dot(x: Vector, y: Vector) -> float:
    return float(sum(torch.sum(a.double() * b.double()) for a, b in zip(x, y, strict=True)))


def _abs_dot(x: Vector, y: Vector) -> float:
    return float(sum(torch.sum(a.double().abs() * b.double().abs()) for a, b in zip(x, y, strict=True)))


def _gradient(params: Vector, loss_fn: LossFn, create_graph: bool = False) -> Vector:
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def curvature(params: Vector, loss_fn: LossFn, grads: Vector, w: Vector, v: Vector, *, exact: bool = False,
              eps: float = float(torch.finfo(torch.float32).eps), vector: bool = False,
              step: float | None = None) -> Any:
    """The curvature v^T H v of the loss `loss_fn` evaluates, along v at the current parameters.

    One-sided finite differences (g(w + h v) - g(w)) . v / h with the library's step rule
    (`eos_core.routes.finite_difference_step`: h from the parameter scale along v and `eps`), or double backward
    with `exact=True`. With `step` > 0 the difference is taken at `h = max(h, step)`: a secant at the scale of
    the step, (g(w + step v) - g(w)) . v / step, the average curvature over a step of that length (kinks of ReLU
    networks included) rather than the local one.

    Args:
        params: the trainable parameters; shifted to w + h v for the finite difference and copied back to `w`
            exactly afterwards.
        loss_fn: evaluates the loss on the batch whose Hessian is measured.
        grads: the gradient of that loss at `w` (unused with `exact=True`).
        w: the current values of `params`.
        v: the direction.
        exact: double backward (a Hessian-vector product) instead of finite differences.
        eps: the machine epsilon of the step rule (default float32's).
        vector: also return H v.
        step: the secant's scale (None, or not > 0 and finite: the finite-difference step alone).

    Returns:
        v^T H v as a float; with `vector=True` the pair (v^T H v, H v), H v a `Vector`. NaN (and None for H v)
        when the finite-difference step is 0 (v = 0).
    """
    if exact:
        with torch.enable_grad():
            g = _gradient(params, loss_fn, create_graph=True)
            gv = sum(torch.sum(a * b) for a, b in zip(g, v, strict=True))
            hv = torch.autograd.grad(gv, params, allow_unused=True)
        hv = [(torch.zeros_like(p) if h is None else h).detach() for h, p in zip(hv, params, strict=True)]
        return (_dot(hv, v), hv) if vector else _dot(hv, v)
    norm = math.sqrt(max(_dot(v, v), 0.0))
    h = finite_difference_step(parameter_scale_along(_abs_dot(w, v), norm), norm, eps, central=False)
    if step is not None and step > 0 and math.isfinite(step):
        h = max(h, step)
    if h == 0.0:
        return (math.nan, None) if vector else math.nan
    with torch.no_grad():
        torch._foreach_add_(params, v, alpha=h)
    try:
        shifted = _gradient(params, loss_fn)
    finally:
        with torch.no_grad():
            for p, w0 in zip(params, w, strict=True):
                p.copy_(w0)
    if vector:
        hv = [(a - b) / h for a, b in zip(shifted, grads, strict=True)]
        return _dot(hv, v), hv
    return (_dot(shifted, v) - _dot(grads, v)) / h


def direction(optimizer: torch.optim.Optimizer, params: Vector) -> tuple[Vector, Vector]:
    """Read the base optimizer's update for lr 1 off one of its steps.

    Sets every parameter group's lr to 1 (left so), runs `optimizer.step()` (its state advances as for any step,
    from the gradients already in `.grad`), records u = w_after - w and copies w back into the parameters. Exact for
    optimizers whose step is linear in lr (AdamW: u = -m_hat / (sqrt(v_hat) + eps) - wd w).

    Args:
        optimizer: the base optimizer, its gradients computed.
        params: the parameters it updates.

    Returns:
        The pair (w, u): clones of the parameters before the step, and the update for lr 1.
    """
    w = [p.detach().clone() for p in params]
    for group in optimizer.param_groups:
        group["lr"] = 1.0
    optimizer.step()
    with torch.no_grad():
        u = [p.detach() - w0 for p, w0 in zip(params, w, strict=True)]
        for p, w0 in zip(params, w, strict=True):
            p.copy_(w0)
    return w, u


@dataclass(frozen=True)
class ProtoConfig:
    """Settings of a prototype (see the module docstring for the equations).

    Attributes:
        scale: sigma > 0.
        ema: beta in [0, 1), per probe.
        numerator: `same`, `lag`, `next` or `window`.
        smoothing: `ema`, `logema` or `median`.
        window: probes in the running median.
        max_growth: c > 1 bounds the law's lr change per step (None: unbounded).
        max_rise: r >= 1 caps the law's lr at r times the first positive lr it measured (None: no cap).
        decay: `cos`, `linear` or None.
        probe_every: k >= 1.
        route: `fd`, `exact` or `secant`.
        lr_init: the law's lr before its first measurement.
        calibrate: f in (0, 1) or None: measure only during the first W = round(f T) steps, applying the law's lr
            times a linear warm-up (t + 1) / W; then hold the peak P = median of the law's lr over the second half
            of those steps and apply P times `decay` (default cosine) over the remaining T - W steps, with no
            probes (a warm-up + cosine whose peak is measured).

    Raises:
        ValueError: a setting outside the ranges above, or an unknown numerator, smoothing, decay or route.
    """

    scale: float = 1.0
    ema: float = 0.9
    numerator: str = "same"
    smoothing: str = "ema"
    window: int = 20
    max_growth: float | None = None
    max_rise: float | None = None
    decay: str | None = None
    probe_every: int = 1
    route: str = "fd"
    lr_init: float = BASE_LR
    calibrate: float | None = None

    def __post_init__(self) -> None:
        if self.numerator not in NUMERATORS:
            raise ValueError(f"numerator must be one of {NUMERATORS}, got {self.numerator!r}")
        if self.smoothing not in SMOOTHINGS:
            raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {self.smoothing!r}")
        if self.decay is not None and self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {tuple(DECAYS)} or None, got {self.decay!r}")
        if self.route not in ("fd", "exact", "secant"):
            raise ValueError(f"route must be 'fd', 'exact' or 'secant', got {self.route!r}")
        if not (self.scale > 0 and 0 <= self.ema < 1 and self.probe_every >= 1 and self.window >= 1):
            raise ValueError("need scale > 0, 0 <= ema < 1, probe_every >= 1, window >= 1")
        if self.calibrate is not None and not 0 < self.calibrate < 1:
            raise ValueError(f"calibrate must be in (0, 1) or None, got {self.calibrate!r}")
        if self.max_growth is not None and not self.max_growth > 1:
            raise ValueError(f"max_growth must be > 1 or None, got {self.max_growth!r}")
        if self.max_rise is not None and not self.max_rise >= 1:
            raise ValueError(f"max_rise must be >= 1 or None, got {self.max_rise!r}")

    @property
    def name(self) -> str:
        """The method's name, which spells out every setting that differs from the defaults.

        Returns:
            `proto-<numerator>-s<scale>-e<ema>[-logema|-med<W>][-g<c>][-r<r>][-<decay>][-p<k>][-exact|-secant]`
            `[-cal<f>]`, e.g. `proto-lag-s2-e0.9-cos-p10`.
        """
        parts = [f"proto-{self.numerator}", f"s{self.scale:g}", f"e{self.ema:g}"]
        if self.smoothing == "logema":
            parts.append("logema")
        elif self.smoothing == "median":
            parts.append(f"med{self.window}")
        if self.max_growth is not None:
            parts.append(f"g{self.max_growth:g}")
        if self.max_rise is not None:
            parts.append(f"r{self.max_rise:g}")
        if self.decay:
            parts.append(self.decay)
        if self.probe_every != 1:
            parts.append(f"p{self.probe_every}")
        if self.route != "fd":
            parts.append(self.route)
        if self.calibrate is not None:
            parts.append(f"cal{self.calibrate:g}")
        return "-".join(parts)


class ProtoLaw:
    """The lr rule of a prototype: folds (n_t, d_t) samples into the law's lr (before any decay).

    Args:
        config: the prototype's settings; the lr starts at `config.lr_init`.
    """

    def __init__(self, config: ProtoConfig) -> None:
        self.config = config
        self.lr = float(config.lr_init)
        self.n_ema = 0.0
        self.d_ema = 0.0
        self.log_ema = 0.0
        self.count = 0
        self.first: float | None = None  # the first positive lr measured (for `max_rise`)
        self.window: deque[float] = deque(maxlen=config.window)

    def update(self, n: float, d: float, steps: int) -> float:
        """Fold one probe's (n, d) pair into the law's lr.

        d is taken in absolute value; n is clipped at 0 for the `same` numerator and kept signed otherwise. The
        smoothing (`ema`, `logema`, `median`) gives a candidate sigma n / d, then `max_growth` and `max_rise`
        bound it (see the module docstring).

        Args:
            n: the numerator sample.
            d: the curvature sample.
            steps: steps since the previous update (the exponent k of the `max_growth` bound c^k; at least 1).

        Returns:
            The law's new lr; the previous lr, unchanged, when n or d is not finite or the smoothed ratio is not
            finite (e.g. d~ = 0).
        """
        c = self.config
        if not (math.isfinite(n) and math.isfinite(d)):
            return self.lr
        d = abs(d)
        if c.numerator == "same":
            n = max(n, 0.0)
        self.count += 1
        beta = c.ema
        self.n_ema = beta * self.n_ema + (1 - beta) * n
        self.d_ema = beta * self.d_ema + (1 - beta) * d
        single = c.scale * n / d if d > 0 else math.nan
        if c.smoothing == "ema":
            candidate = c.scale * max(self.n_ema, 0.0) / self.d_ema if self.d_ema > 0 else math.nan
        elif c.smoothing == "logema":
            if not math.isfinite(single):
                return self.lr
            self.log_ema = beta * self.log_ema + (1 - beta) * math.log(max(single, 1e-8))
            candidate = math.exp(self.log_ema / (1 - beta ** self.count))
        else:
            if math.isfinite(single):
                self.window.append(single)
            candidate = max(float(np.median(self.window)), 0.0) if self.window else math.nan
        if not math.isfinite(candidate):
            return self.lr
        if c.max_growth is not None:
            bound = c.max_growth ** max(steps, 1)
            candidate = min(max(candidate, self.lr / bound), self.lr * bound)
        if c.max_rise is not None:
            if self.first is None and candidate > 0:
                self.first = candidate
            if self.first is not None:
                candidate = min(candidate, c.max_rise * self.first)
        self.lr = candidate
        return self.lr


class ProtoTrainer(Trainer):
    """AdamW driven by a `ProtoLaw` (see the module docstring for the step).

    Args:
        model: the model being trained.
        config: the prototype's settings.
        total_steps: T, the run's length (the horizon of the decay and of `calibrate`).
    """

    def __init__(self, model: nn.Module, config: ProtoConfig, total_steps: int) -> None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr_init, weight_decay=WEIGHT_DECAY)
        super().__init__(model, optimizer)
        self.config = config
        self.total = total_steps
        self.law = ProtoLaw(config)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.eps = float(torch.finfo(self.params[0].dtype).eps)
        self._recorded: tuple[Vector, float] | None = None  # (u_{t-1}, eta_{t-1}) for "lag"
        self._pending: tuple[Vector, float, float] | None = None  # (u_t, d_t, eta_t) for "next"
        #: "window": (u_p, H u_p, w_p . H u_p, d_p, samples of the numerator since probe p)
        self._window: tuple[Vector, Vector, float, float, list[float]] | None = None
        self._last_update = 0
        self._step = 0
        self._peak: float | None = None
        self.probes = 0
        #: per probe: (step, n, d, same-batch -g_t.u_t, uncorrected -g.u of the numerator, law lr)
        self.records: list[tuple[int, float, float, float, float, float]] = []

    # -- measurements ------------------------------------------------------------------------------
    def curvature(self, loss_fn: LossFn, grads: Vector, w: Vector, v: Vector) -> float:
        """The curvature v^T H v on the batch of `loss_fn` at the current parameters `w` (restored exactly).

        Uses the configured route: finite differences, double backward (`exact`), or a secant at the scale of the
        lr the law would apply now (`secant`).

        Args:
            loss_fn: evaluates the loss on the current batch.
            grads: its gradient at `w`.
            w: the current values of the parameters.
            v: the direction.

        Returns:
            v^T H v; NaN when v = 0.
        """
        return curvature(self.params, loss_fn, grads, w, v, exact=self.config.route == "exact", eps=self.eps,
                         step=self._secant_step())

    def _secant_step(self) -> float | None:
        """The `secant` route's scale: the lr the law would apply now (decay included)."""
        if self.config.route != "secant":
            return None
        if self.config.calibrate is not None:
            return self.law.lr * (self._step + 1) / max(2, round(self.config.calibrate * self.total))
        factor = DECAYS[self.config.decay](self._step, self.total) if self.config.decay else 1.0
        return self.law.lr * factor

    def _direction(self) -> tuple[Vector, Vector]:
        """Run the optimizer's step at lr 1 and read u off it; the parameters go back to w. Returns (w, u)."""
        return direction(self.optimizer, self.params)

    def _fold(self, step: int, n: float, d: float, same: float, raw: float) -> None:
        lr = self.law.update(n, d, step - self._last_update if self.probes else step + 1)
        self._last_update = step
        self.probes += 1
        self.records.append((step, n, d, same, raw, lr))

    # -- the step ----------------------------------------------------------------------------------
    def step(self, step: int, loss_fn: LossFn) -> float:
        """Take one step: measure (at a probe), fold the measurement into the law, apply the law's lr x the decay.

        Between probes the base optimizer steps at the law's current lr times the decay factor; at a probe (and at
        the step before a `lag` probe) the update u for lr 1 is read off the optimizer and applied at that lr.
        After the calibration phase of `calibrate`, the measured peak times the decay is applied, with no probe.

        Args:
            step: the step index t (0-based).
            loss_fn: evaluates the loss on the current batch.

        Returns:
            The batch loss before the update.
        """
        c = self.config
        k = c.probe_every
        self._step = step
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        if c.calibrate is not None:
            calibration = max(2, round(c.calibrate * self.total))
            if step >= calibration:
                if self._peak is None:
                    late = [r[5] for r in self.records if r[0] >= calibration // 2 and math.isfinite(r[5])]
                    self._peak = float(np.median(late)) if late else self.law.lr
                    if not self._peak > 0:  # nothing usable measured: the law's initial lr
                        self._peak = c.lr_init
                shape = DECAYS[c.decay or "cos"](step - calibration, self.total - calibration)
                self._lr = self._peak * shape
                for group in self.optimizer.param_groups:
                    group["lr"] = self._lr
                self.optimizer.step()
                return float(loss.detach())
        if c.numerator == "next" and self._pending is not None:
            u_prev, d_prev, lr_prev = self._pending
            self._pending = None
            raw = -_dot(grads, u_prev)
            self._fold(step, raw + lr_prev * d_prev, d_prev, math.nan, raw)
        probe = step % k == 0
        if c.numerator == "window" and self._window is not None:
            # n sample from a batch the probe's update did not see, corrected back to w_p: -g_s . u_p +
            # (w_s - w_p) . H u_p, with H u_p measured at the probe (two dot products per step)
            u_p, hu_p, w_hu, d_p, samples = self._window
            samples.append(-_dot(grads, u_p) + _dot(self.params, hu_p) - w_hu)
            if probe:
                self._window = None
                self._fold(step, float(np.mean(samples)), d_p, math.nan, float(np.mean(samples)))
        record = c.numerator == "lag" and (step + 1) % k == 0
        if c.calibrate is not None:
            factor = (step + 1) / max(2, round(c.calibrate * self.total))
        else:
            factor = DECAYS[c.decay](step, self.total) if c.decay else 1.0
        if not (probe or record):
            self._lr = self.law.lr * factor
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr
            self.optimizer.step()
            return float(loss.detach())
        w, u = self._direction()
        if probe:
            same = -_dot(grads, u)
            if c.numerator == "same":
                d = self.curvature(loss_fn, grads, w, u)
                self._fold(step, same, d, same, same)
            elif c.numerator == "lag":
                if self._recorded is not None:
                    u_prev, lr_prev = self._recorded
                    d = self.curvature(loss_fn, grads, w, u_prev)
                    raw = -_dot(grads, u_prev)
                    self._fold(step, raw + lr_prev * d, d, same, raw)
            elif c.numerator == "next":  # n arrives with the next gradient
                d = self.curvature(loss_fn, grads, w, u)
                self._pending = (u, d, math.nan)
            else:  # window: n arrives with the next probe_every gradients
                d, hu = curvature(self.params, loss_fn, grads, w, u, exact=c.route == "exact", eps=self.eps,
                                  vector=True, step=self._secant_step())
                if hu is not None and math.isfinite(d):
                    self._window = (u, hu, _dot(w, hu), d, [])
        self._lr = self.law.lr * factor
        with torch.no_grad():
            torch._foreach_add_(self.params, u, alpha=self._lr)
        if record:
            self._recorded = (u, self._lr)
        if self._pending is not None and math.isnan(self._pending[2]):
            self._pending = (self._pending[0], self._pending[1], self._lr)
        return float(loss.detach())

    def extra(self) -> dict[str, Any]:
        """The prototype's measurements, for the run's JSON.

        Returns:
            `config` (the settings), `probes` (number of (n, d) pairs folded in), `records` (per probe, at most
            `MAX_RECORDS` evenly spaced: `step`, `n`, `d`, `n_same` (-g_t . u_t on the same batch, NaN where not
            measured), `n_raw` (the numerator's -g . u before the first-order correction) and `law_lr`),
            `quarters` (per quarter of the run, the means of n, n_raw, n_same and d over the probes after the
            first) and, when a probe gave a finite ratio, `single_probe_lr_quantiles`: the 10%, 50% and 90%
            quantiles of the single-probe lr sigma n / |d|.
        """
        records = self.records
        if len(records) > MAX_RECORDS:
            idx = np.unique(np.linspace(0, len(records) - 1, MAX_RECORDS).astype(int))
            records = [records[i] for i in idx]
        single = [self.config.scale * r[1] / abs(r[2]) for r in self.records
                  if math.isfinite(r[1]) and math.isfinite(r[2]) and r[2] != 0]
        out: dict[str, Any] = {"config": asdict(self.config), "probes": self.probes,
                               "records": {"step": [r[0] for r in records], "n": [r[1] for r in records],
                                           "d": [r[2] for r in records], "n_same": [r[3] for r in records],
                                           "n_raw": [r[4] for r in records], "law_lr": [r[5] for r in records]},
                               "quarters": _quarters(self.records, self.total)}
        if single:
            q = np.quantile(single, [0.1, 0.5, 0.9])
            out["single_probe_lr_quantiles"] = {"q10": float(q[0]), "q50": float(q[1]), "q90": float(q[2])}
        return out


def _quarters(records: list[tuple[int, float, float, float, float, float]], total: int) -> dict[str, list[float]]:
    """Per quarter of the run, over all probes: mean n, mean uncorrected -g.u, mean same-batch -g_t.u_t, mean d."""
    out: dict[str, list[float]] = {"n": [], "n_raw": [], "n_same": [], "d": []}
    for q in range(4):
        rows = [r for r in records[1:] if q * total / 4 <= r[0] < (q + 1) * total / 4]
        for key, i in (("n", 1), ("n_raw", 4), ("n_same", 3), ("d", 2)):
            vals = [r[i] for r in rows if math.isfinite(r[i])]
            out[key].append(float(np.mean(vals)) if vals else math.nan)
    return out


class ObserverTrainer(Trainer):
    """AdamW on a fixed schedule that *measures* what the rules would see without acting on it.

    Every `every` steps (from step `every` on), the lag pair (n_t = -g_t.u_{t-1} + eta_{t-1} u_{t-1}^T H_t u_{t-1},
    d_t = u_{t-1}^T H_t u_{t-1}) and the same-batch pair (-g_t.u_t, u_t^T H_t u_t) are measured. `extra()`
    reports, per quarter of the run, the median of the applied lr over the greedy lr n~/d~ (EMAs over probes, beta
    0.9): where a tuned schedule sits relative to the quadratic model along its own updates.

    Args:
        model: the model being trained.
        peak: the peak lr (`cos`) or the constant lr.
        total_steps: the run's length, the horizon of the schedule.
        schedule: `"cos"` for the anchor's warm-up + cosine (`warmup_cosine`); anything else: constant.
        every: steps between probes.
    """

    def __init__(self, model: nn.Module, peak: float, total_steps: int, schedule: str = "cos", every: int = 5) -> None:
        from benchmarks.minibatch.methods import warmup_cosine

        optimizer = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=WEIGHT_DECAY)
        super().__init__(model, optimizer)
        self.peak = peak
        self.factor = (lambda t: warmup_cosine(t, total_steps)) if schedule == "cos" else (lambda t: 1.0)
        self.total = total_steps
        self.every = every
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.eps = float(torch.finfo(self.params[0].dtype).eps)
        self._recorded: tuple[Vector, float] | None = None
        self.records: list[tuple[float, ...]] = []

    def step(self, step: int, loss_fn: LossFn) -> float:
        """Take one step at the schedule's lr, measuring the lag and same-batch pairs at a probe.

        Args:
            step: the step index t (0-based).
            loss_fn: evaluates the loss on the current batch.

        Returns:
            The batch loss before the update.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        lr = self.peak * self.factor(step)
        probe = step > 0 and step % self.every == 0 and self._recorded is not None
        record = (step + 1) % self.every == 0
        if probe or record:
            w, u = direction(self.optimizer, self.params)
            if probe:
                u_prev, lr_prev = self._recorded
                d_lag = curvature(self.params, loss_fn, grads, w, u_prev, eps=self.eps)
                raw = -_dot(grads, u_prev)
                d_same = curvature(self.params, loss_fn, grads, w, u, eps=self.eps)
                self.records.append((step, lr, raw + lr_prev * d_lag, d_lag, -_dot(grads, u), d_same, raw))
            with torch.no_grad():
                torch._foreach_add_(self.params, u, alpha=lr)
            if record:
                self._recorded = (u, lr)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self._lr = lr
        return float(loss.detach())

    def extra(self) -> dict[str, Any]:
        """Where the schedule sits relative to the greedy lr, for the run's JSON.

        Returns:
            `every`; for each pair `lag` and `same`, `rho_<pair>` (per quarter of the run, the median over its probes
            of the applied lr / the greedy lr n~ / d~, EMAs with beta 0.9 of n and |d|; inf where the greedy lr
            is not > 0) and `greedy_lr_<pair>` (per quarter, the median greedy lr); and `quarters` (per quarter,
            the means of n, n_raw, n_same and d of the lag pair, as for a prototype). NaN for a quarter without
            probes.
        """
        out: dict[str, Any] = {"every": self.every}
        for name, (ni, di) in {"lag": (2, 3), "same": (4, 5)}.items():
            n_ema = d_ema = 0.0
            rho = []
            for r in self.records:
                n_ema, d_ema = 0.9 * n_ema + 0.1 * r[ni], 0.9 * d_ema + 0.1 * abs(r[di])
                greedy = n_ema / d_ema if d_ema > 0 else math.nan
                rho.append((r[0], r[1] / greedy if greedy > 0 else math.inf, greedy))
            quarters, greedy_q = [], []
            for q in range(4):
                rows = [x for x in rho if q * self.total / 4 <= x[0] < (q + 1) * self.total / 4]
                quarters.append(float(np.median([x[1] for x in rows])) if rows else math.nan)
                greedy_q.append(float(np.median([x[2] for x in rows])) if rows else math.nan)
            out[f"rho_{name}"] = quarters
            out[f"greedy_lr_{name}"] = greedy_q
        out["quarters"] = _quarters([(r[0], r[2], r[3], r[4], r[6], r[1]) for r in self.records], self.total)
        return out


def observer_methods() -> list[MethodSpec]:
    """The observers: fixed schedules with passive probes (family and tag `observe`).

    Returns:
        `observe-cos-<peak>` (warm-up + cosine) and `observe-adam-<lr>` (constant lr; AdamW with weight decay
        `WEIGHT_DECAY`) for the lrs 3e-3, 5e-3, 7e-3 and 1e-2, probing every 5 steps.
    """
    out = []
    for peak in (3e-3, 5e-3, 7e-3, 1e-2):
        for schedule in ("cos", "const"):
            def build(model: nn.Module, total: int, peak: float = peak, schedule: str = schedule) -> Trainer:
                return ObserverTrainer(model, peak, total, schedule)

            label = f"{peak:.0e}".replace("e-0", "e-")
            name = f"observe-{'cos' if schedule == 'cos' else 'adam'}-{label}"
            out.append(MethodSpec(name, "observe", build, {"peak_lr": peak, "schedule": schedule,
                                                           "weight_decay": WEIGHT_DECAY},
                                  tags=frozenset({"observe"})))
    return out


def spec(config: ProtoConfig, tags: tuple[str, ...] = ("research",)) -> MethodSpec:
    """The `MethodSpec` of a prototype.

    Args:
        config: the prototype's settings.
        tags: the method's tags (default: `research` only).

    Returns:
        The method named `config.name`, family `proto`, that builds a `ProtoTrainer`.
    """

    def build(model: nn.Module, total: int) -> Trainer:
        return ProtoTrainer(model, config, total)

    return MethodSpec(config.name, "proto", build, {"prototype": asdict(config), "base": "AdamW",
                                                     "weight_decay": WEIGHT_DECAY}, tags=frozenset(tags))


def _grid() -> list[ProtoConfig]:
    out: list[ProtoConfig] = []
    # (a) numerators x scale, with and without the horizon-aware decay (b)
    for numerator in NUMERATORS:
        for scale in (1.0, 2.0):
            for decay in (None, "cos"):
                out.append(ProtoConfig(scale=scale, numerator=numerator, decay=decay))
    for numerator in ("same", "lag"):
        for scale in (1.0, 2.0):
            out.append(ProtoConfig(scale=scale, ema=0.99, numerator=numerator))
            out.append(ProtoConfig(scale=scale, ema=0.99, numerator=numerator, decay="cos"))
        out.append(ProtoConfig(numerator=numerator, decay="linear"))
    # (c) robustness against single-batch noise
    for decay in (None, "cos"):
        out.append(ProtoConfig(smoothing="logema", decay=decay))
        out.append(ProtoConfig(smoothing="median", decay=decay))
        out.append(ProtoConfig(max_growth=1.02, decay=decay))
        out.append(ProtoConfig(numerator="lag", smoothing="median", decay=decay))
        out.append(ProtoConfig(numerator="lag", max_growth=1.02, decay=decay))
    # (d) probe_every with one-sided finite differences
    for k in (5, 10, 20):
        for numerator in ("same", "lag"):
            out.append(ProtoConfig(numerator=numerator, decay="cos", probe_every=k))
    out.append(ProtoConfig(numerator="lag", decay="cos", route="exact"))
    # (a') the numerator averaged over every batch between probes
    for k in (5, 10):
        for scale in (1.0, 2.0, 3.0):
            for decay in (None, "cos"):
                out.append(ProtoConfig(scale=scale, numerator="window", decay=decay, probe_every=k))
    for decay in (None, "cos"):
        out.append(ProtoConfig(scale=2.0, numerator="window", decay=decay, probe_every=10, max_growth=1.01))
    for ema in (0.8, 0.95):
        out.append(ProtoConfig(scale=2.0, ema=ema, numerator="window", decay="cos", probe_every=10))
    out.append(ProtoConfig(scale=2.0, numerator="window", decay="cos", probe_every=10, route="exact"))
    out.append(ProtoConfig(scale=2.0, numerator="window", probe_every=10, route="exact"))
    for scale in (1.0, 1.5, 2.0):
        for decay in (None, "cos"):
            out.append(ProtoConfig(scale=scale, numerator="window", decay=decay, probe_every=10, route="secant"))
    out.append(ProtoConfig(scale=1.5, numerator="window", decay="cos", probe_every=10))
    # a warm-up + cosine whose peak is measured: sigma x the unbiased greedy lr during the warm-up
    for scale in (1.5, 2.0, 3.0):
        for f in (0.05, 0.1):
            out.append(ProtoConfig(scale=scale, numerator="lag", calibrate=f))
    out.append(ProtoConfig(scale=2.0, numerator="lag", calibrate=0.1, decay="linear"))
    out.append(ProtoConfig(scale=2.0, numerator="lag", calibrate=0.1, smoothing="median"))
    out.append(ProtoConfig(scale=0.5, numerator="same", calibrate=0.1))
    out.append(ProtoConfig(scale=1.0, numerator="same", calibrate=0.1))
    # between the greedy (sigma 1, too low) and the on-edge (sigma 2, runs away on ReLU networks) unbiased rule
    for scale in (1.25, 1.5):
        for k in (1, 10):
            for decay in (None, "cos"):
                out.append(ProtoConfig(scale=scale, numerator="lag", decay=decay, probe_every=k))
                out.append(ProtoConfig(scale=scale, numerator="lag", decay=decay, probe_every=k, max_growth=1.02))
    out.extend(_sweep())
    return out


#: the settings searched for the mini-batch default (one configuration for every task)
SWEEP_NUMERATORS = (("lag", 1), ("lag", 10), ("window", 10))
SWEEP_SCALES = (1.0, 1.5, 2.0)
SWEEP_EMAS = (0.9, 0.95, 0.99)
SWEEP_RISES = (2.0, 4.0)


def _sweep() -> list[ProtoConfig]:
    """The search space of the mini-batch default.

    Returns:
        One configuration per combination of numerator lag (probe_every 1 or 10) or window (10), scale
        (`SWEEP_SCALES`), ema (`SWEEP_EMAS`), with and without the cosine decay, and without or with a cap
        `max_rise` (`SWEEP_RISES`) relative to the first measured lr.
    """
    out = []
    for numerator, k in SWEEP_NUMERATORS:
        for scale in SWEEP_SCALES:
            for ema in SWEEP_EMAS:
                for decay in (None, "cos"):
                    for rise in (None, *SWEEP_RISES):
                        out.append(ProtoConfig(scale=scale, ema=ema, numerator=numerator, decay=decay,
                                               probe_every=k, max_rise=rise))
    return out


#: prototypes that are also part of the default comparison (`suite` tag), decided by the research figures
SUITE: tuple[ProtoConfig, ...] = ()


def methods() -> list[MethodSpec]:
    """Every prototype as a method, then the observers.

    Returns:
        One method per distinct prototype name (the `SUITE` ones first, tagged `research` and `suite`, then the
        research grid, tagged `research`), followed by `observer_methods()`.
    """
    seen: dict[str, MethodSpec] = {}
    for config in (*SUITE, *_grid()):
        if config.name not in seen:
            tags = ("research", "suite") if config in SUITE else ("research",)
            seen[config.name] = spec(config, tags)
    return [*seen.values(), *observer_methods()]

