r"""`tune`: an optax transformation that applies a tuning law's learning rate to a base optimizer.

Notation of the CDAT paper (Roulet et al. 2024, "Stepping on the edge: curvature aware learning rate tuners"): $w$
the parameters, $g$ the gradient, $u$ the base optimizer's update **for learning rate 1** and $H$ the Hessian of the
loss on the current batch. `base` is a complete optax optimizer built with learning rate 1 (`optax.sgd(1.0)`,
`optax.adam(1.0)`, ...), so its output is $u$; the transformation outputs $\eta_t u_t$ with $\eta_t$ the law's
decision for this step (for CDAT, eq. 8: $\eta_t = \sigma \max(-g_t^\top u_t, 0) / (|u_t^\top H_t u_t| + \varepsilon)$,
optionally EMA-smoothed).

Usage (the convention of optax's line searches: `value_fn(params)` is the loss on the batch):

```python
opt = tune(optax.sgd(1.0), CDAT(scale=2.0))
state = opt.init(params)

@jax.jit
def step(params, state, batch):
    value_fn = lambda p: loss(p, batch)
    grads = jax.grad(value_fn)(params)
    updates, state = opt.update(grads, state, params, value_fn=value_fn)
    return optax.apply_updates(params, updates), state
```

**Options.** The tuner options of [`TunerSettings`][eos_core.settings.TunerSettings], by the names every adapter
uses, as keywords or as `settings=`: `probe_every`, `route`, `sharpness_every`, `sharpness_iters`, `sharpness_tol`,
`warn`, `skip_nonfinite`, `seed`, `fd_eps`, `reference_lr`, `monitor_budget`, `monitor_edge`, `monitor_margin`,
`monitor_patience` ([`SUPPORTED_OPTIONS`][eos_core.adapters.jax.SUPPORTED_OPTIONS]). `lr_mode`, `fd_above`,
`clipped_gradients` and `linear_in_lr` concern the PyTorch optimizer and its scheduler: giving them a non-default
value raises a ValueError. The old names `power_iters`, `power_tol` and `initial_lr` still work with a
DeprecationWarning.

**Design.**

* **Statistics.** On a probe step the transformation measures exactly what `law.request()`
  ([`eos_core.request.StatsRequest`][]) asks for: $g^\top u$; $u^\top H u$ (`eos_core.adapters.jax.oracles`);
  $f(w)$ (free with every exact curvature route, or the `value` extra argument, else one forward pass);
  $\|g\|^2$; $\lambda_{\max}$ by warm-started power iteration (`request.power_iters` / `request.power_tol`); the
  top `k` eigenvalues by Lanczos (`request.num_eigenvalues`, `request.lanczos_steps_for(n)`; 20 steps unless the
  law sets them); the preconditioned variants (`eos_core.adapters.jax.preconditioner`); `trial_loss`, the callable
  $\eta \mapsto f(w + \eta u)$ (forward passes only; the law loops with `lax.while_loop`);
  $\cos(g_t, u_{t-1})$ from the previous direction kept in the state (0 on the first step); CDAT's
  previous-update numerator (`numerator="previous-update"`): $g_t^\top u_{t-1}$, $u_{t-1}^\top H_t u_{t-1}$ (the
  curvature route, along $u_{t-1}$: still one curvature probe per probe step) and the lr applied to $u_{t-1}$,
  where $u_{t-1}$ (kept in the state with that lr, the parameters' shardings included) is the update for lr 1 of
  the last applied step, also between probes; NaN before the first one (the law keeps `lr_init`).
* **Start vectors.** Power iteration and Lanczos start from [`eos_core.spectral.random_start`][] (numpy, float64,
  unit norm over the leaves in `jax.tree.leaves` order; `seed` for $H$, `seed + 1` for the preconditioned
  operator), the start vector of every adapter, and are warm-started from the previous estimate afterwards.
  Lanczos on $H$ starts from the $H$ warm-start vector.
* **Probing every k steps.** `lax.cond(count % probe_every == 0, probe, hold)` with `count` the steps taken
  (skipped steps excluded): between probes `law.hold` reuses the last learning rate. **Convolutions on CPU:**
  XLA:CPU runs the *gradient* convolutions of a conv net 30-100x slower inside a `lax.cond` branch or a loop body
  than at the top level of the program (jax-ml/jax#12868; measured with jax 0.10 on a small CNN: a gradient 6 ms at
  top level, 480 ms inside a `cond`; forward convolutions are unaffected). On CPU a conv net therefore pays that
  price for every probe that takes a gradient inside the `cond` (`probe_every > 1` with a finite-difference,
  `jvp-grad` or `double-backward` route) and for every power-iteration / Lanczos step (spectral laws,
  `sharpness_every`); the default `jvp-jvp` probe is forward-mode only and keeps its cost.
* **Routes.** `route` picks the $u^\top H u$ oracle; `auto` resolves at trace time to the first of `jvp-jvp`,
  `jvp-grad`, `double-backward`, `fd-onesided` that `value_fn` can be traced through (a `custom_vjp` function has
  no forward mode). Hessian-vector products for spectra use the same route when it is an $H v$ route, else the
  `auto` chain `jvp-grad`, `double-backward`, `fd-onesided`. [`diagnostics`][eos_core.adapters.jax.diagnostics]
  reports the first as `route` (the second when the law needs no $u^\top H u$, the `route` setting when neither is
  used); [`hvp_route`][eos_core.adapters.jax.hvp_route] tells the second. The finite-difference step is the core's
  ([`eos_core.routes.finite_difference_step`][]), sized for `fd_eps` when given. Cost on a GPT-2 124M step (H100,
  fp32, `benchmarks/jax_overhead.py`): a `jvp-jvp` probe is about 2.2 training steps, a one-sided finite
  difference about 1.1.
* **Sharpness tracking.** `sharpness_every=m` estimates $\lambda_{\max}(H)$ every m steps (of `count`) by
  warm-started power iteration (`sharpness_iters` products at most, stopping at relative change `sharpness_tol`)
  and, for an Adam / RMSProp base, $\lambda_{\max}(P^{-1/2} H P^{-1/2})$. When the law's probe estimated
  $\lambda_{\max}$ of the same operator on the same step with settings at least as strict
  (`power_iters >= sharpness_iters` and `0 < power_tol <= sharpness_tol`), tracking reuses that estimate;
  otherwise it continues from the law's new vector. Power iteration returns the eigenvalue of largest magnitude,
  with its sign.
* **Diagnostics.** [`diagnostics`][eos_core.adapters.jax.diagnostics] reports exactly
  [`eos_core.diagnostics.keys_for(law)`][eos_core.diagnostics.keys_for], with the meanings of
  [`eos_core.diagnostics.REGISTRY`][]: `sharpness` is the tracked $\lambda_{\max}$, else the law's own
  measurement, `lr_sharpness` the applied lr times it, `alignment` $= |\cos(u, v_{\max})|$ and `power_iterations`
  on tracked steps (NaN on the others), `step` the index of the step among the steps taken. The state keeps them
  as one float vector ([`Diagnostics`][eos_core.adapters.jax.Diagnostics]); the integer keys come from the state's
  int32 counters.
* **Other hyperparameters (DCAO).** A law that decides `momentum` / `weight_decay` writes them into the base's
  `optax.inject_hyperparams` state (`momentum` or `b1`; `weight_decay`). They take effect from the next step: this
  step's $u$ was formed before the law measured the curvature. A ValueError is raised when the base is not built
  with `inject_hyperparams`, when a knob is a schedule (it would overwrite the law), or when a knob the law would
  move off 0 is missing (a missing knob is read as 0, and DCAO's rules are multiplicative).
* **Bad input.** A non-finite gradient, update $u$ or loss (when the loss is known: the `value` argument or a
  route that computed it) skips the step inside `jit` (`skip_nonfinite=True`, the default): the update is 0 and
  the base state, law state, warm-start vectors and step count are left unchanged, as `optax.apply_if_finite`
  does. `skip_nonfinite=False` applies such a step (the non-finite values reach the parameters, as with a plain
  optax optimizer). Non-finite or degenerate curvature is handled by the law: it keeps its last good learning rate
  (`fallback = 1`). The state counts both (`skipped`, `fallbacks`; reported as `skipped_steps` and
  `fallback_steps`).
* **Warnings** (`warn`). `True` (default): the compiled update holds no host callback; the RuntimeWarning is
  raised on the host by [`diagnostics`][eos_core.adapters.jax.diagnostics] when the last step was skipped or fell
  back, with the cumulative counts ([`warn_bad_steps`][eos_core.adapters.jax.warn_bad_steps]). `"jit"`: from
  inside `jit` through `jax.debug.callback` on probe steps (steps skipped between probes are reported at the next
  probe). A host callback anywhere in the program slows every step: +9-12% per step on GPT-2 124M (H100),
  1.23-1.26x instead of 1.12-1.14x a plain step on the CPU model of `benchmarks/jax_overhead.py`. `False`:
  never; the counts stay in the state.
* **Composition with other optax transformations.** `tune` must receive the raw gradient of `value_fn`: it is $g$ in
  $g^\top u$ (CDAT's numerator), $\|g\|^2$ (Polyak), the base point of one-sided finite differences and the cosine of
  HyperGradient. Put gradient transformations *inside* `base`, which then forms $u$ from them:
  `tune(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), CDAT(scale=2.0))`. CDAT's rate scales as
  $1 / \|u\|$, so a global-norm clip inside `base` leaves SGD's step $\eta u$ unchanged (it does change Adam's moments);
  bound the step with the law's `lr_max` instead. [`diagnostics`][eos_core.adapters.jax.diagnostics] finds the
  `TuneState` inside a chained or wrapped state.
* **Data parallel.** Every statistic is a function of `value_fn` and `grads` on the whole batch: under `jax.jit`
  with a batch-sharded input XLA inserts the reductions itself; under `shard_map` `value_fn` must return the
  global loss (`lax.pmean(loss(p, local_batch), "data")`) and `grads` its gradient. jax < 0.7 runs `tune` under
  `shard_map` only with `check_rep=False` (no replication rule for `lax.cond`), and there the transpose of `pmean`
  does not sum over the devices: reverse mode through that `value_fn` gives the local gradient divided by the
  device count (jax 0.4.30). There pass `grads = lax.pmean(jax.grad(local_loss)(p), "data")` and keep the
  products forward-mode (`route="jvp-jvp"`; no spectral law, `sharpness_every` or `monitor_budget`), or use `jit`
  with a batch-sharded input.
* **State.** [`TuneState`][eos_core.adapters.jax.TuneState] is a NamedTuple of arrays (and `None` for unused
  slots; counters are int32, the law's included): it checkpoints with the parameters, and resuming from a saved
  copy continues bit-identically.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from eos_core import diagnostics as D
from eos_core import monitor as monitor_rules
from eos_core import routes
from eos_core import stats as S
from eos_core.adapters.jax import hyperparams as knobs
from eos_core.adapters.jax import monitor as mon
from eos_core.adapters.jax.monitor import MonitorState
from eos_core.adapters.jax.numerics import jax_numerics
from eos_core.adapters.jax.oracles import HVP_ROUTES, curvature, resolve_curvature_route, resolve_hvp_route
from eos_core.adapters.jax.preconditioner import AdamPreconditioner, RmsPreconditioner, find_preconditioner, identify
from eos_core.adapters.jax.spectral import hessian_operator, top_eigenvalue, top_eigenvalues
from eos_core.adapters.jax.tree_ops import TreeOps, ready_after, tree_dot, tree_norm, tree_random_start, tree_select
from eos_core.laws.base import Law, LawOutput
from eos_core.laws.schedules import Constant
from eos_core.numerics import NUMPY, Numerics
from eos_core.settings import DEPRECATED, TunerSettings

PyTree = Any
Preconditioner = AdamPreconditioner | RmsPreconditioner | Callable[[Any], PyTree]

#: The [`TunerSettings`][eos_core.settings.TunerSettings] options `tune` honours.
SUPPORTED_OPTIONS: tuple[str, ...] = ("probe_every", "route", "sharpness_every", "sharpness_iters", "sharpness_tol",
                                      "warn", "skip_nonfinite", "seed", "fd_eps", "reference_lr", "monitor_budget",
                                      "monitor_edge", "monitor_margin", "monitor_patience")

#: Route names by code (the diagnostics vector stores the code; `none`: no H v route was used).
ROUTE_NAMES: tuple[str, ...] = ("none", *routes.EXACT, *routes.FINITE_DIFFERENCES, routes.AUTO)

#: Entries of the diagnostics vector that are not diagnostics: the codes of the u^T H u and H v routes, and 1 on
#: the step the monitor's early warning fired (raised on the host by
#: [`diagnostics`][eos_core.adapters.jax.diagnostics]).
CODE_KEYS: tuple[str, ...] = ("route_code", "hvp_route_code", "monitor_fired")


def vector_keys(law: Law | None) -> tuple[str, ...]:
    """The entries of the [`Diagnostics`][eos_core.adapters.jax.Diagnostics] vector of a `tune` with `law`.

    Args:
        law: the law (None: measuring only).

    Returns:
        The float keys of [`eos_core.diagnostics.keys_for`][] (registry order; the integer and string keys come
        from the state's counters), then `CODE_KEYS`.
    """
    skip = set(D.INTEGER_KEYS) | set(D.STRING_KEYS)
    return (*(k for k in D.keys_for(law) if k not in skip), *CODE_KEYS)


@jax.tree_util.register_pytree_node_class
class Diagnostics:
    """The last step's diagnostics as one float vector, the `diagnostics` field of a `TuneState`.

    A pytree whose only leaf is the vector of values; the names, the transformation's `warn` mode and the early
    warning's rule are static (auxiliary data). One array keeps the per-step bookkeeping to a single select;
    `d["lr"]` reads one value (a traced or device array) and [`diagnostics`][eos_core.adapters.jax.diagnostics]
    converts all of them to host values (and, when `warn` is True, raises the warnings of a skipped or fallen-back
    last step). `key in d` tells whether a name is in the vector.

    Args:
        keys: the names of the entries (`vector_keys(law)`).
        values: the float vector, one value per key (NaN: not measured on the last step).
        warn: the `warn` option of the transformation (True, `"jit"` or False).
        rule: the early warning's `(monitor_margin, monitor_patience)`, None without a monitor.

    Raises:
        KeyError: `d[key]` for a name not in `keys`.
    """

    def __init__(self, keys: tuple[str, ...], values: Any, warn: bool | str = True,
                 rule: tuple[float, int] | None = None) -> None:
        self.keys = tuple(keys)
        self.values = values
        self.warn = warn
        #: the early warning's `(monitor_margin, monitor_patience)` (None without a monitor), for its message
        self.rule = rule

    def tree_flatten(self) -> tuple[tuple[Any], tuple[Any, ...]]:
        """The pytree protocol: `((values,), (keys, warn, rule))`, the vector as the only child."""
        return (self.values,), (self.keys, self.warn, self.rule)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any, ...]) -> Diagnostics:
        """The pytree protocol: the `Diagnostics` of `tree_flatten`'s `aux` data and its one child."""
        keys, warn, rule = aux
        return cls(keys, children[0], warn, rule)

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys:
            raise KeyError(key)
        return self.values[self.keys.index(key)]

    def __contains__(self, key: object) -> bool:
        return key in self.keys

    def __repr__(self) -> str:
        return f"Diagnostics({dict(zip(self.keys, np.asarray(self.values).tolist(), strict=True))})"


class TuneState(NamedTuple):
    """State of [`tune`][eos_core.adapters.jax.tune]: a pytree of arrays (unused slots are `None`).

    It checkpoints with the parameters (any pytree checkpointer) and a run resumed from a saved copy continues
    bit-identically. Read it on the host with [`diagnostics`][eos_core.adapters.jax.diagnostics]; inside a chained or
    wrapped optax state, [`find_tune_state`][eos_core.adapters.jax.find_tune_state] finds it.
    """

    base_state: Any  #: the base optimizer's state
    law_state: Any  #: the law's state (a NamedTuple of 0-d arrays; counters are int32)
    count: jax.Array  #: int32, steps taken (skipped steps excluded); probes when `count % probe_every == 0`
    skipped: jax.Array  #: int32, steps skipped because of a non-finite loss, gradient or update
    fallbacks: jax.Array  #: int32, probe steps where the law kept its last learning rate (`fallback = 1`)
    reported_skips: jax.Array  #: int32, skipped steps counted up to the last probe (reported there by `warn="jit"`)
    eigenvector: PyTree | None  #: warm start of power iteration / Lanczos on H (unit norm)
    preconditioned_eigenvector: PyTree | None  #: warm start on P^{-1/2} H P^{-1/2}
    previous_update: PyTree | None  #: u_{t-1}, the last applied step's update for lr 1 (HyperGradient, CDAT)
    diagnostics: Diagnostics  #: the last step's diagnostics (see [`diagnostics`][eos_core.adapters.jax.diagnostics])
    monitor: MonitorState | None = None  #: the sharpness monitor (`monitor_budget`; `eos_core.adapters.jax.monitor`)
    #: the lr applied to `previous_update` (NaN before the first applied step; CDAT's previous-update numerator)
    previous_lr: jax.Array | None = None


# -- the stages' results (NamedTuples, so that both branches of a lax.cond return one structure) -----------
class _Inputs(NamedTuple):
    """Stage "check inputs": what the step was given and what the base optimizer made of it."""

    grads: PyTree
    params: PyTree
    u: PyTree  #: the base's update for lr = 1
    base_state: Any  #: the base's state after this step
    value_fn: Callable[[PyTree], jax.Array] | None
    value: Any  #: the loss at `params` when the caller gave it, else None
    grad_sq: jax.Array
    update_sq: jax.Array
    finite: jax.Array  #: gradient, update and given loss are finite
    precond: PyTree | None  #: P of an adaptive base, when a preconditioned estimate may be needed
    curvature_code: int  #: code (`ROUTE_NAMES`) of the u^T H u route
    hvp_code: int  #: code of the H v route
    numerics: Numerics
    ops: TreeOps
    raw: PyTree | None = None  #: law=None: the base's own update, applied unchanged
    lr: Any = None  #: law=None: the learning rate the base applied (`raw = lr * u`)
    extra: Mapping[str, Any] | None = None  #: the extra keyword arguments the base's update was given


class _Probed(NamedTuple):
    """Stage "probe": the law's output (`law.update` on a probe step, `law.hold` otherwise)."""

    out: LawOutput
    loss: jax.Array  #: f(w) (NaN when unknown)
    loss_known: jax.Array
    finite: jax.Array  #: the inputs and the loss are finite
    eigenvector: PyTree | None  #: warm starts after the law's spectral estimates
    preconditioned_eigenvector: PyTree | None
    reported_skips: jax.Array
    fell_back: jax.Array  #: the law kept its last lr on a step that is taken
    law_iterations: tuple[jax.Array, jax.Array]  #: products of the law's power iterations on H, on P^-1/2 H P^-1/2


class _Tracked(NamedTuple):
    """Stage "track": the `sharpness_every` estimates (NaN when not tracked on this step)."""

    sharpness: jax.Array
    preconditioned_sharpness: jax.Array
    iterations: jax.Array
    alignment: jax.Array
    eigenvector: PyTree | None
    preconditioned_eigenvector: PyTree | None


class _Decision(NamedTuple):
    """Stage "decide": whether the step is taken and with which learning rate."""

    applied: jax.Array
    lr: jax.Array
    fell_back: jax.Array


#: The statistics of CDAT's previous-update numerator (they need u_{t-1} and its lr in the state).
_PREVIOUS_STATS = frozenset({S.GRAD_DOT_PREVIOUS_UPDATE, S.PREVIOUS_UPDATE_CURVATURE, S.PREVIOUS_LR})

_NO_LR = ("tune(base, None): with law=None the base's own update is applied and the learning rate it uses is needed "
          "for lr * sharpness: build base with optax.inject_hyperparams (e.g. optax.inject_hyperparams(optax.sgd)("
          "learning_rate=0.1)) or give reference_lr=<the base's constant learning rate>")


def _injected_lr(base_state: Any) -> bool:
    """Whether the base injects a `learning_rate` hyperparameter (`optax.inject_hyperparams`)."""
    return any("learning_rate" in hyperparams for hyperparams, _ in knobs.injected(base_state))


#: Zero-gradient steps `_impulse_edge` may take until the base's learning rate is positive (a warm-up from 0).
_WARM_STEPS = 64
#: Steps of the impulse response (at least 4 for [`eos_core.monitor.edge_from_impulse_response`][]).
_RESPONSE_STEPS = 6


def _impulse_edge(base: optax.GradientTransformation, lr: float | None, spec: Any = None) -> float:
    r"""The edge of `base` from its response to one unit gradient, in the coordinates of its preconditioner.

    [`eos_core.monitor.edge_from_impulse_response`][] of the base run on a one-parameter problem: a unit gradient
    at step 0 and zero gradients after, `h_k = -u_k / lr_k` (gradient descent: 1, 0, 0, ...; heavy ball
    `beta^k`). For an adaptive base `P` is frozen at its value (Cohen et al. 2022) and the response is taken on
    `P^{-1} H`: `h_k = -P_k u_k / lr_k` for Adam (the momentum filters the gradient, then `P_k` divides it:
    `h_k = (1 - b1) b1^k`, edge `2 (1 + b1) / (1 - b1)`, Nesterov's Adam too), `h_k = -P_0 u_k / lr_k` for
    RMSProp (a momentum, if any, filters the preconditioned gradient: edge 2, or `2 (1 + beta)` with heavy-ball
    momentum). Zero-gradient steps come first while the base's learning rate is 0 (a warm-up from 0); they leave a
    linear filter's state at 0.

    Args:
        base: the base optimizer.
        lr: the base's learning rate (None: read from its injected `learning_rate` at each step; 1 for a base of
            learning rate 1).
        spec: the base's preconditioner spec (None: not adaptive).

    Returns:
        The edge; NaN when the base cannot run on one parameter, its learning rate stays 0, or its response is not
        of a recognised form.
    """
    def rate(state: Any) -> float:
        return float(lr) if lr is not None else float(knobs.read(state, "learning_rate"))

    try:
        params = jnp.zeros((1,), jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32)
        zeros = jnp.zeros_like(params)
        state = base.init(params)
        for _ in range(_WARM_STEPS):
            _, after = base.update(zeros, state, params)
            if rate(after) > 0:  # state is the one before a step with a positive learning rate
                break
            state = after
        else:
            return math.nan
        response: list[float] = []
        first = None
        for k in range(_RESPONSE_STEPS):
            update, state = base.update(jnp.ones_like(params) if k == 0 else zeros, state, params)
            step_lr = rate(state)
            if not step_lr > 0:
                return math.nan
            scale = 1.0
            if isinstance(spec, AdamPreconditioner | RmsPreconditioner):
                precond = float(np.asarray(find_preconditioner(state, spec))[0])
                first = precond if first is None else first
                scale = precond if isinstance(spec, AdamPreconditioner) else first
            response.append(-float(np.asarray(update)[0]) * scale / step_lr)
    except Exception:  # noqa: BLE001 - a base that needs its real parameter structure: edge unknown
        return math.nan
    return monitor_rules.edge_from_impulse_response(response)


#: Edges of lr x sharpness as functions of a momentum hyperparameter ([`eos_core.monitor`][]), traceable: the
#: formulas of `adam_edge`, `heavy_ball_edge` and `nesterov_edge`.
_EDGE_FORMULAS: dict[str, Callable[[Any], Any]] = {
    "adam": lambda b: 2.0 * (1.0 + b) / (1.0 - b),
    "heavy-ball": lambda b: 2.0 * (1.0 + b),
    "nesterov": lambda b: 2.0 * (1.0 + b) / (1.0 + 2.0 * b),
}


def _warn_unstable(value: Any, edge: Any, quotient: Any, *, margin: float, patience: int, count: Any,
                   what: str) -> None:
    """Host side of `warn="jit"`'s early warning."""
    warnings.warn(_unstable_message(float(value), float(edge), float(quotient), margin, patience, int(count), what),
                  RuntimeWarning, stacklevel=2)


def _unstable_message(value: float, edge: float, quotient: float, margin: float, patience: int, step: int,
                      what: str) -> str:
    """The early warning's text: the quotient along the update when it fired, else the watched lr x sharpness."""
    if math.isfinite(quotient) and quotient > monitor_rules.threshold(monitor_rules.UPDATE_EDGE, margin):
        return monitor_rules.update_warning_message(quotient, margin, step)
    return monitor_rules.warning_message(value, edge, margin, patience, step,
                                         what.replace("_", " ").replace("lr ", "lr x "))


def _route_code(name: str | None) -> int:
    return 0 if name is None else ROUTE_NAMES.index(name)


def _law_numerics(law_state: Any) -> Numerics:
    leaves = [leaf for leaf in jax.tree.leaves(law_state) if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
    return jax_numerics(jnp.result_type(leaves[0]) if leaves else None)


def _warn(count: Any, unreported: Any, fallback: Any) -> None:
    """Host side of the in-jit warning of `warn="jit"` (`jax.debug.callback` on a probe step)."""
    if int(unreported) > 0:
        warnings.warn(
            f"eos_core tune: {int(unreported)} step(s) with a non-finite loss, gradient or update were skipped "
            f"(parameters and optimizer state unchanged) up to step {int(count)}", RuntimeWarning, stacklevel=2)
    if bool(fallback):
        warnings.warn(
            f"eos_core tune: the law could not use this step's statistics (non-finite or degenerate curvature) at "
            f"step {int(count)}; it keeps its last learning rate", RuntimeWarning, stacklevel=2)


def warn_bad_steps(found: Mapping[str, Any], *, new_skips: int | None = None, new_fallbacks: int | None = None,
                   stacklevel: int = 1) -> None:
    """Raise the host-side RuntimeWarnings of `warn=True` for skipped steps and law fallbacks.

    Reads host diagnostics (the dict of [`diagnostics`][eos_core.adapters.jax.diagnostics]). By default the
    warnings describe the last step: skipped (`skipped` = 1), or else fell back (`fallback` = 1). A caller that
    remembers the counts it saw last (the Keras callback, reading every `log_every` steps) passes `new_skips` /
    `new_fallbacks`, the increase of `skipped_steps` / `fallback_steps` since then. The messages number steps by
    update call from `init` (0-based, skipped steps included): the last one is `step + skipped_steps - skipped`
    (`step` excludes skipped steps).

    Args:
        found: host diagnostics with `step`, `skipped`, `fallback`, `skipped_steps` and `fallback_steps`.
        new_skips: skipped steps to report (default: 1 when the last step was skipped).
        new_fallbacks: fallbacks to report (default: 1 when the last step fell back).
        stacklevel: as in `warnings.warn`; 1 points the warning at the caller of this function.

    Warns:
        RuntimeWarning: one for the skipped steps (a non-finite loss, gradient or update) and one for the
            fallbacks (non-finite or degenerate curvature), each with the cumulative count; none when there are
            none to report.
    """
    skipped_steps, fallback_steps = int(found["skipped_steps"]), int(found.get("fallback_steps", 0))
    last_skipped = float(found.get("skipped", 0.0)) > 0
    last = int(found["step"]) + skipped_steps - int(last_skipped)
    if new_skips is None:
        new_skips = int(last_skipped)
    if new_fallbacks is None:
        new_fallbacks = int(not last_skipped and float(found.get("fallback", 0.0)) > 0)
    if new_skips > 0:
        what = (f"step {last} was skipped" if new_skips == 1 and last_skipped
                else f"{new_skips} step(s) up to step {last} were skipped")
        warnings.warn(f"eos_core tune: {what} (non-finite loss, gradient or update); {skipped_steps} step(s) "
                      "skipped so far; parameters and optimizer state unchanged", RuntimeWarning,
                      stacklevel=stacklevel + 1)
    if new_fallbacks > 0:
        what = (f"at step {last}" if new_fallbacks == 1 and not last_skipped
                else f"on {new_fallbacks} probe step(s) up to step {last}")
        warnings.warn(f"eos_core tune: {what} the law could not use the statistics (non-finite or degenerate "
                      f"curvature) and kept its last learning rate; {fallback_steps} such step(s) so far",
                      RuntimeWarning, stacklevel=stacklevel + 1)


def _resolve_settings(settings: TunerSettings | None, options: Mapping[str, Any]) -> TunerSettings:
    """`settings` with `options` applied on top (old names accepted), checked against `SUPPORTED_OPTIONS`.

    Returns:
        The checked settings.

    Raises:
        ValueError: `settings` is not a `TunerSettings`, or an option is unknown, unsupported or invalid.
    """
    given: dict[str, Any] = {}
    if settings is not None:
        if not isinstance(settings, TunerSettings):
            raise ValueError(f"tune: settings must be an eos_core.settings.TunerSettings, "
                             f"got {type(settings).__name__}")
        given = settings.as_dict()
        for name in options:
            given.pop(DEPRECATED.get(name, name), None)
    # stacklevel 4: the DeprecationWarning points at the caller of tune
    return TunerSettings.from_options("tune", {**given, **options}, supported=SUPPORTED_OPTIONS, stacklevel=4)


def _synthetic_state(base: optax.GradientTransformation) -> Any:
    """`base.init` of a small float32 vector, for the checks that need a base state before `init`.

    Returns:
        The state, or None when the base needs the real parameter structure (`optax.masked`,
        `optax.multi_transform`, ...); then the checks of `_init_law` run at `init`.
    """
    try:
        return base.init(jnp.zeros((4,), jnp.float32))
    except Exception:  # noqa: BLE001 - any failure means "checked at init instead"
        return None


def _base_hyperparams(law: Law, base_state: Any) -> dict[str, Any]:
    """The current values of the hyperparameters `law` decides, read from the base's injected state.

    Returns:
        `{law name: value}`; 0.0 for a hyperparameter the base does not have (allowed when the law's lower bound
        for it is 0).

    Raises:
        ValueError: when the base cannot take them: not built with `optax.inject_hyperparams`, a hyperparameter
            missing that the law would move off 0, or one given as a schedule.
    """
    decides = tuple(law.decides)
    owner = f"tune({type(law).__name__})"
    if not knobs.injected(base_state):
        raise ValueError(
            f"{owner}: the law decides {', '.join(decides)}, which can only be applied to a base built with "
            "optax.inject_hyperparams (e.g. optax.inject_hyperparams(optax.sgd)(learning_rate=1.0, momentum=0.9))")
    names = knobs.resolve_names(base_state, decides)
    values: dict[str, Any] = {}
    for name in decides:
        key = names[name]
        if key is None:
            bounds = getattr(law, f"{name}_bounds", (0.0, 0.0))
            if bounds[0] > 0:
                raise ValueError(
                    f"{owner}: the base optimizer has no {name} hyperparameter ({'/'.join(knobs.OPTAX_NAMES[name])}) "
                    f"to set, but the law's {name}_bounds lower bound {bounds[0]} would move it off 0")
            values[name] = 0.0
        elif knobs.is_scheduled(base_state, key):
            raise ValueError(f"{owner}: the base's {key} is a schedule; the law sets {name} itself, pass a number")
        else:
            values[name] = knobs.read(base_state, key)
    return values


def _init_law(law: Law, base_state: Any, numerics: Numerics, reference_lr: float | None) -> Any:
    """The law's initial state, `law.init(reference_lr)`.

    For a law that decides hyperparameters it is seeded with the base's values (traced values when `init` runs
    under `jit`; the law validated its settings at construction then).

    Returns:
        The law's state.

    Raises:
        ValueError: the base cannot take the law's hyperparameters (`_base_hyperparams`), or the law cannot
            start (from `law.init`).
    """
    if not law.decides:
        return law.init(reference_lr, numerics=numerics)
    values = _base_hyperparams(law, base_state)
    try:
        concrete = {k: float(v) for k, v in values.items()}
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
        concrete = None
    if concrete is not None:
        return law.init(reference_lr, hyperparams=concrete, numerics=numerics)
    state = law.init(reference_lr, numerics=numerics)  # traced init: validation was done at construction
    return state._replace(**{k: jnp.array(v, dtype=numerics.dtype, copy=True) for k, v in values.items()})


def _cosine(grads: PyTree, previous: PyTree, grad_sq: jax.Array, numerics: Numerics) -> jax.Array:
    """cos(g_t, u_{t-1}); 0 when either vector is zero (the first step)."""
    dot = tree_dot(grads, previous, numerics.dtype)
    norms = grad_sq ** 0.5 * tree_dot(previous, previous, numerics.dtype) ** 0.5
    return jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), numerics.scalar(0.0))


def _alignment(step: PyTree, v: PyTree, numerics: Numerics) -> jax.Array:
    """|cos(step, v)|; NaN when either is zero (`alignment` of the registry with `step = u`)."""
    norms = tree_norm(step, numerics.dtype) * tree_norm(v, numerics.dtype)
    value = jnp.abs(tree_dot(step, v, numerics.dtype)) / jnp.where(norms > 0, norms, 1.0)
    return jnp.where(norms > 0, value, numerics.scalar(math.nan))


class _Tuner:
    """The static configuration of one [`tune`][eos_core.adapters.jax.tune] transformation and its stages.

    `update` runs the stages check inputs, probe, track, decide, apply and report; every method is a
    pure function of arrays (the configuration is Python data), so all of it traces under `jax.jit`.
    """

    def __init__(self, base: optax.GradientTransformation, law: Law | None, settings: TunerSettings,
                 preconditioner: Preconditioner | None) -> None:
        self.base = optax.with_extra_args_support(base)
        #: law=None: the base's update is applied unchanged, its learning rate only read (see `tune`)
        self.measuring = law is None
        self.user_law = law
        self.law = Constant(1.0) if law is None else law
        self.settings = settings
        self.request = self.law.request()
        self.decides = tuple(self.law.decides)
        self.keys = vector_keys(law)
        #: CDAT's previous-update numerator: g_t . u_{t-1}, u_{t-1}^T H_t u_{t-1} and the lr of u_{t-1}
        self.previous_stats = self.request.needs & _PREVIOUS_STATS
        self.tracking = settings.sharpness_every is not None
        self.monitoring = settings.monitor_budget is not None
        self.spec = self._identify(preconditioner)
        self.tracks_preconditioned = self.tracking and self.spec is not None
        self.keeps_eigenvector = self.request.hessian_eigenvector or self.tracking
        self.keeps_preconditioned_eigenvector = self.request.preconditioned or self.tracks_preconditioned
        self.hvp_route = settings.route if settings.route in HVP_ROUTES else routes.AUTO
        #: tracking reuses the law's lambda_max of H / of the preconditioned Hessian on probe steps
        self.reuses = tuple(self._reuses(key) for key in (S.SHARPNESS, S.PRECONDITIONED_SHARPNESS))
        self._check_law()
        #: the early warning's edge and whether it bounds the preconditioned sharpness
        self.edge, self.edge_preconditioned, self.edge_rule = self._edge() if self.monitoring else (
            math.nan, False, None)
        #: measuring only, an adaptive base: its first step is watched along the update
        #: ([`eos_core.monitor.watches_update`][])
        self.watching_update = self.measuring and self.monitoring and bool(self.edge_preconditioned)

    # -- construction ----------------------------------------------------------------------------------
    def _identify(self, explicit: Preconditioner | None) -> Preconditioner | None:
        if not (self.request.preconditioned or self.tracking or self.monitoring):
            return None
        spec, reason = identify(self.base, explicit, scaled=self.measuring)
        if self.request.preconditioned and spec is None:
            raise ValueError(f"tune: law {self.law!r} needs the preconditioned Hessian, but {reason}")
        return spec

    def _reuses(self, key: str) -> bool:
        """The rule for one estimate: the law measures it by power iteration at least as strictly as tracking."""
        req, s = self.request, self.settings
        return (self.tracking and key in req.needs and req.power_iters >= s.sharpness_iters
                and 0 < req.power_tol <= s.sharpness_tol)

    def _edge(self) -> tuple[float, bool, tuple[str, Callable[[Any], Any]] | None]:
        """The early warning's edge: `monitor_edge`, else the base's.

        The base's edge comes from `_impulse_edge` (gradient descent, heavy-ball and Nesterov momentum; Adam's
        `2 (1 + b1) / (1 - b1)` and RMSProp's on the preconditioned sharpness); NaN when not recognised (then no
        warning).

        Returns:
            `(edge, preconditioned, rule)`: `rule` is `(hyperparameter, formula)` when the edge follows an
            injected momentum (`b1` of Adam, `momentum` of SGD / RMSProp; DCAO moves them): then each step's
            edge is the formula of the value in the base's state (`_step_edge`).
        """
        preconditioned = self.spec is not None
        if self.settings.monitor_edge is not None:
            return float(self.settings.monitor_edge), preconditioned, None
        if preconditioned and not isinstance(self.spec, AdamPreconditioner | RmsPreconditioner):
            return math.nan, True, None  # a callable P: its optimizer's form is unknown
        edge = _impulse_edge(self.base, self._constant_lr(), self.spec)
        rule = None
        synthetic = _synthetic_state(self.base) if math.isfinite(edge) else None
        injected = {}
        if synthetic is not None:
            injected = {k: v for hyperparams, _ in knobs.injected(synthetic) for k, v in hyperparams.items()}
        forms = (("b1", "adam"),) if isinstance(self.spec, AdamPreconditioner) else (
            ("momentum", "heavy-ball"), ("momentum", "nesterov"))
        for name, form in forms:
            if name in injected:
                formula = _EDGE_FORMULAS[form]
                if math.isclose(edge, float(formula(float(np.asarray(injected[name])))), rel_tol=1e-4):
                    rule = (name, formula)
                    break
        return edge, preconditioned, rule

    def _step_edge(self, base_state: Any, numerics: Numerics) -> Any:
        """This step's edge of stability, for the early warning.

        Returns:
            The formula of the injected momentum in `base_state` (traced) when the edge follows one, else the
            constant edge (a Python float; NaN when unknown).
        """
        if self.edge_rule is None:
            return self.edge
        name, formula = self.edge_rule
        return numerics.scalar(formula(numerics.scalar(knobs.read(base_state, name))))

    def _constant_lr(self) -> float | None:
        """The base's learning rate when `law=None` (`reference_lr`; 1 with a law: the contract)."""
        if not self.measuring:
            return 1.0
        return self.settings.reference_lr

    def _check_law(self) -> None:
        """A law that cannot start raises its ValueError here, at construction."""
        if self.measuring:
            synthetic = _synthetic_state(self.base)
            if self.settings.reference_lr is None and synthetic is not None and not _injected_lr(synthetic):
                raise ValueError(_NO_LR)
            return
        try:
            self.law.init(self.settings.reference_lr, numerics=NUMPY)
        except ValueError as exc:
            if self.settings.reference_lr is not None:
                raise
            raise ValueError(f"tune: {exc} (the base's learning rate is 1 by contract: give the law lr_init=... "
                             "or tune reference_lr=...)") from exc
        if self.decides:  # the knobs the law sets must exist in base: check now, on a synthetic parameter vector
            synthetic = _synthetic_state(self.base)
            if synthetic is not None:
                _init_law(self.law, synthetic, NUMPY, self.settings.reference_lr)

    # -- init --------------------------------------------------------------------------------------------
    def init(self, params: PyTree) -> TuneState:
        numerics = jax_numerics()
        base_state = self.base.init(params)
        law_state = _init_law(self.law, base_state, numerics, self.settings.reference_lr)
        if self.measuring and self.settings.reference_lr is None and not _injected_lr(base_state):
            raise ValueError(_NO_LR)
        seed = self.settings.seed

        def zero() -> jax.Array:  # one buffer per counter: a caller may donate the state's buffers
            return jnp.zeros((), jnp.int32)

        return TuneState(
            base_state=base_state,
            law_state=law_state,
            count=zero(),
            skipped=zero(),
            fallbacks=zero(),
            reported_skips=zero(),
            eigenvector=tree_random_start(params, seed) if self.keeps_eigenvector else None,
            preconditioned_eigenvector=(tree_random_start(params, seed + 1)
                                        if self.keeps_preconditioned_eigenvector else None),
            previous_update=jax.tree.map(jnp.zeros_like, params) if self.request.previous_update else None,
            diagnostics=self._initial_diagnostics(law_state, numerics),
            monitor=mon.monitor_init(params, seed, preconditioned=self.spec is not None, numerics=numerics)
            if self.monitoring else None,
            previous_lr=numerics.scalar(math.nan) if self.previous_stats else None,
        )

    def _initial_diagnostics(self, law_state: Any, numerics: Numerics) -> Diagnostics:
        lr = self.law.hold(law_state, numerics=numerics).lr
        values: dict[str, Any] = dict.fromkeys(self.keys, math.nan)
        values.update(probed=0.0, fallback=0.0, skipped=0.0, route_code=_route_code(self.settings.route),
                      hvp_route_code=0.0, monitor_fired=0.0, lr=lr, law_lr=lr)
        if self.measuring:
            values.update(lr=math.nan, law_lr=math.nan)
        values.update({k: getattr(law_state, k) for k in self.decides})
        vector = jnp.stack([jnp.asarray(values[k], dtype=numerics.dtype) for k in self.keys])
        return Diagnostics(self.keys, vector, self.settings.warn, self._rule())

    def _rule(self) -> tuple[float, int] | None:
        settings = self.settings
        return (settings.monitor_margin, settings.monitor_patience) if self.monitoring else None

    # -- update ------------------------------------------------------------------------------------------
    def update(self, updates: PyTree, state: TuneState, params: PyTree | None = None, *,
               value_fn: Callable[[PyTree], jax.Array] | None = None, value: jax.Array | None = None,
               **extra: Any) -> tuple[PyTree, TuneState]:
        inputs = self._check_inputs(updates, state, params, value_fn, value, extra)
        probed = self._probe(inputs, state)
        if self.measuring:  # the base's own learning rate is the step's
            lr = inputs.lr.astype(probed.out.lr.dtype)
            probed = probed._replace(out=probed.out._replace(lr=lr, diagnostics={**probed.out.diagnostics, "lr": lr}))
        tracked = self._track(inputs, state, probed)
        decision = self._decide(probed)
        new_updates, base_state = self._apply(inputs, probed, decision)
        monitor = self._monitor(inputs, state, decision.applied) if self.monitoring else None
        quotient = self._update_quotient(inputs, state, decision.applied) if self.watching_update else None
        report, monitor = self._report(inputs, state, probed, tracked, decision, monitor, quotient)
        applied = decision.applied
        if self.tracking or self.monitoring or self.watching_update:
            # the branches that read the parameters and the base's state run before the new values overwrite them
            # in place (else XLA copies them on every step)
            ready = ready_after(tracked.iterations, None if monitor is None else monitor.credit, quotient)
            new_updates = tree_select(ready, new_updates, jax.tree.map(jnp.zeros_like, new_updates))
            applied_after = applied & ready
        else:
            applied_after = applied
        new_state = TuneState(
            base_state=tree_select(applied_after, base_state, state.base_state),
            law_state=tree_select(applied, probed.out.state, state.law_state),
            count=state.count + applied.astype(jnp.int32),
            skipped=state.skipped + (~applied).astype(jnp.int32),
            fallbacks=state.fallbacks + decision.fell_back.astype(jnp.int32),
            reported_skips=probed.reported_skips,
            eigenvector=tracked.eigenvector,  # already guarded where it was measured
            preconditioned_eigenvector=tracked.preconditioned_eigenvector,
            previous_update=tree_select(applied, inputs.u, state.previous_update) if self.request.previous_update
            else None,
            diagnostics=report,
            monitor=None if monitor is None else mon.keep_when_skipped(applied, monitor, state.monitor),
            previous_lr=jnp.where(applied, inputs.numerics.scalar(decision.lr), state.previous_lr)
            if self.previous_stats else None,
        )
        return new_updates, new_state

    # -- stage 1: check the inputs ----------------------------------------------------------------------
    def _check_inputs(self, grads: PyTree, state: TuneState, params: PyTree | None, value_fn: Any, value: Any,
                      extra: Mapping[str, Any]) -> _Inputs:
        if params is None:
            raise ValueError("tune: update needs params (call opt.update(grads, state, params, value_fn=...))")
        needs_value_fn = (self.request.objective or self.tracking or self.monitoring
                          or (S.LOSS in self.request.needs and value is None))
        if needs_value_fn and value_fn is None:
            wanted = [f"{self.user_law!r}"] if self.request.objective else []
            wanted += ["sharpness_every"] if self.tracking else []
            wanted += ["monitor_budget"] if self.monitoring else []
            raise ValueError("tune: update needs value_fn=... (the loss on the current batch as a function of the "
                             f"parameters) for {' and '.join(wanted) or repr(self.user_law)}")
        numerics = _law_numerics(state.law_state)
        u, base_state = self.base.update(grads, state.base_state, params, **extra)
        raw = lr = None
        if self.measuring:  # u for lr = 1 from the base's own update
            lr = self._base_lr(base_state, numerics)
            raw, safe = u, jnp.where(lr > 0, lr, 1.0)
            u = jax.tree.map(lambda d: (d / safe.astype(d.dtype)).astype(d.dtype), raw)
        # Squared norms double as the finiteness test: a NaN or Inf entry makes them non-finite (so does a
        # squared norm beyond the float range, a diverged step that is best skipped too).
        grad_sq, update_sq = tree_dot(grads, grads, numerics.dtype), tree_dot(u, u, numerics.dtype)
        finite = jnp.isfinite(grad_sq) & jnp.isfinite(update_sq)
        if value is not None:
            finite = finite & jnp.isfinite(value)
        curvature_code = hvp_code = 0
        if self.request.curvature:
            curvature_code = _route_code(resolve_curvature_route(value_fn, params, u, self.settings.route))
        elif S.PREVIOUS_UPDATE_CURVATURE in self.request.needs:  # the same oracle, along u_{t-1}
            curvature_code = _route_code(resolve_curvature_route(value_fn, params, state.previous_update,
                                                                 self.settings.route))
        if self.request.spectral or self.tracking:
            hvp_code = _route_code(resolve_hvp_route(value_fn, params, self.hvp_route))
        wants_precond = self.keeps_preconditioned_eigenvector or (self.monitoring and self.spec is not None)
        return _Inputs(grads=grads, params=params, u=u, base_state=base_state, value_fn=value_fn, value=value,
                       grad_sq=grad_sq, update_sq=update_sq, finite=finite,
                       precond=self._preconditioner(base_state) if wants_precond else None,
                       curvature_code=curvature_code, hvp_code=hvp_code, numerics=numerics, ops=TreeOps(numerics),
                       raw=raw, lr=lr, extra=extra)

    def _base_lr(self, base_state: Any, numerics: Numerics) -> jax.Array:
        """With law=None, the learning rate of this step's base update.

        Returns:
            The injected `learning_rate` of `base_state`, else `reference_lr`, as a 0-d array.

        Raises:
            ValueError: neither is there.
        """
        if _injected_lr(base_state):
            return numerics.scalar(knobs.read(base_state, "learning_rate"))
        if self.settings.reference_lr is None:
            raise ValueError(_NO_LR)
        return numerics.scalar(self.settings.reference_lr)

    # -- the sharpness monitor ---------------------------------------------------------------------------
    def _monitor(self, inputs: _Inputs, state: TuneState, applied: jax.Array) -> mon.Tick:
        """A tick of the monitor at `w` when its credit allows (`eos_core.adapters.jax.monitor.monitor_step`).

        A step that is not applied does not tick, so its trackers' vectors stay as they were
        ([`keep_when_skipped`][eos_core.adapters.jax.monitor.keep_when_skipped]).

        Returns:
            The monitor's [`Tick`][eos_core.adapters.jax.monitor.Tick].
        """
        settings = self.settings
        return mon.monitor_step(
            state.monitor, value_fn=inputs.value_fn, params=inputs.params, grads=inputs.grads, precond=inputs.precond,
            finite=inputs.finite & applied, budget=settings.monitor_budget,
            danger=mon.danger(state.monitor, self._step_edge(inputs.base_state, inputs.numerics),
                              settings.monitor_margin),
            exact=mon.exact_route(inputs.value_fn, inputs.params), fd_eps=settings.fd_eps, ops=inputs.ops,
            step=state.count)

    def _update_quotient(self, inputs: _Inputs, state: TuneState, applied: jax.Array) -> jax.Array:
        """On an adaptive base's first step, the quotient along the update (NaN on the other steps).

        It is [`eos_core.adapters.jax.monitor.update_quotient`][]: one product, in a branch taken on those steps
        only ([`eos_core.monitor.watches_update`][]); outside the budget, like the cold start.

        Returns:
            `lr u^T H u / (-g^T u)` of this step, or NaN.
        """
        watched = monitor_rules.watches_update(jnp, state.count, adaptive=True) & inputs.finite & applied
        nan = inputs.numerics.scalar(math.nan)

        def measure(_: None) -> jax.Array:
            # the base's update lr u made again from its inputs: the branch taking `raw` itself made XLA write it out
            # on every step (apply_updates otherwise fuses it into the new parameters): 2-3% of the MLP's Adam step
            step, _ = self.base.update(inputs.grads, state.base_state, inputs.params, **(inputs.extra or {}))
            return inputs.numerics.scalar(mon.update_quotient(
                value_fn=inputs.value_fn, params=inputs.params, grads=inputs.grads, step=step,
                exact_route=mon.exact_route(inputs.value_fn, inputs.params), fd_eps=self.settings.fd_eps,
                ops=inputs.ops))

        return lax.cond(watched, measure, lambda _: nan, None)

    def _preconditioner(self, base_state: Any) -> PyTree:
        if isinstance(self.spec, AdamPreconditioner | RmsPreconditioner):
            return find_preconditioner(base_state, self.spec)
        return self.spec(base_state)

    def _operator(self, inputs: _Inputs, *, preconditioned: bool) -> Callable[[PyTree], PyTree]:
        """`v -> H v` or `v -> P^{-1/2} H P^{-1/2} v` at this step's parameters."""
        matvec, _ = hessian_operator(inputs.value_fn, inputs.params, route=ROUTE_NAMES[inputs.hvp_code],
                                     grads=inputs.grads, precond=inputs.precond if preconditioned else None,
                                     ops=inputs.ops, fd_eps=self.settings.fd_eps)
        return matvec

    # -- stage 2: probe -------------------------------------------------------------------------------------
    def _probing(self, state: TuneState) -> jax.Array:
        return state.count % self.settings.probe_every == 0

    def _probe(self, inputs: _Inputs, state: TuneState) -> _Probed:
        if self.settings.probe_every == 1:
            return self._measure(inputs, state)
        return lax.cond(self._probing(state), lambda _: self._measure(inputs, state),
                        lambda _: self._hold(inputs, state), None)

    def _measure(self, inputs: _Inputs, state: TuneState) -> _Probed:
        """A probe step: the statistics of `law.request()`, then `law.update`."""
        numerics = inputs.numerics
        stats, loss = self._scalar_statistics(inputs, state)
        finite = inputs.finite if loss is None else inputs.finite & jnp.isfinite(loss)
        spectral, eigvec, peigvec, iterations = self._spectral_statistics(inputs, state, finite)
        out = self.law.update(state.law_state, {**stats, **spectral}, numerics=numerics)
        taken = finite if self.settings.skip_nonfinite else jnp.asarray(True)
        fell_back = taken & (out.diagnostics["fallback"] > 0) if self.request.needs else jnp.asarray(False)
        skipped_through = state.skipped + (~taken).astype(jnp.int32)  # skips up to this probe, this one too
        if self.settings.warn == "jit":  # raised here, on probe steps only, so that a hold step has no callback
            unreported = skipped_through - state.reported_skips
            lax.cond((unreported > 0) | fell_back,
                     lambda: jax.debug.callback(_warn, state.count, unreported, fell_back), lambda: None)
        loss_out = numerics.scalar(math.nan) if loss is None else numerics.scalar(loss)
        return _Probed(out=out, loss=loss_out, loss_known=jnp.asarray(loss is not None), finite=finite,
                       eigenvector=eigvec, preconditioned_eigenvector=peigvec, reported_skips=skipped_through,
                       fell_back=fell_back, law_iterations=iterations)

    def _hold(self, inputs: _Inputs, state: TuneState) -> _Probed:
        """A step between probes: `law.hold` reuses the last learning rate."""
        numerics = inputs.numerics
        nan = numerics.scalar(math.nan)
        known = inputs.value is not None
        return _Probed(out=self.law.hold(state.law_state, numerics=numerics),
                       loss=numerics.scalar(inputs.value) if known else nan, loss_known=jnp.asarray(known),
                       finite=inputs.finite, eigenvector=state.eigenvector,
                       preconditioned_eigenvector=state.preconditioned_eigenvector,
                       reported_skips=state.reported_skips, fell_back=jnp.asarray(False), law_iterations=(nan, nan))

    def _scalar_statistics(self, inputs: _Inputs, state: TuneState) -> tuple[dict[str, Any], Any]:
        """Every statistic but the spectra, and the loss when known (None otherwise)."""
        needs, numerics = self.request.needs, inputs.numerics
        grads, params, u, value_fn = inputs.grads, inputs.params, inputs.u, inputs.value_fn
        stats: dict[str, Any] = {}
        loss = None if inputs.value is None else jnp.asarray(inputs.value)
        if S.GRAD_DOT_UPDATE in needs:
            stats[S.GRAD_DOT_UPDATE] = tree_dot(grads, u, numerics.dtype)
        if S.CURVATURE in needs:
            result, _ = curvature(value_fn, params, u, route=ROUTE_NAMES[inputs.curvature_code], grads=grads,
                                  fd_eps=self.settings.fd_eps)
            stats[S.CURVATURE] = result.value
            loss = result.loss if loss is None else loss
        if S.LOSS in needs:
            loss = value_fn(params) if loss is None else loss
            stats[S.LOSS] = loss
        if S.GRAD_NORM_SQ in needs:
            stats[S.GRAD_NORM_SQ] = inputs.grad_sq
        if S.TRIAL_LOSS in needs:
            stats[S.TRIAL_LOSS] = lambda eta: value_fn(jax.tree.map(
                lambda w, d: w + jnp.asarray(eta).astype(jnp.result_type(w)) * d.astype(jnp.result_type(w)),
                params, u))
        if S.GRAD_PREV_UPDATE_COSINE in needs:
            stats[S.GRAD_PREV_UPDATE_COSINE] = _cosine(grads, state.previous_update, inputs.grad_sq, numerics)
        if self.previous_stats:
            previous, loss = self._previous_statistics(inputs, state, loss)
            stats.update(previous)
        return stats, loss

    def _previous_statistics(self, inputs: _Inputs, state: TuneState, loss: Any) -> tuple[dict[str, Any], Any]:
        r"""CDAT's previous-update statistics (CDAT docstring, `numerator="previous-update"`) and the loss.

        `g_t(w_t) . u_{t-1}`, `u_{t-1}^T H_t u_{t-1}` (at `w_t` on this step's batch, with the route of
        `curvature`) and the lr applied to `u_{t-1}`, where `u_{t-1}` is the update for lr 1 of the last
        applied step (the step just before this probe, also with `probe_every > 1`; skipped steps keep the one
        before). All three are NaN before the first applied step: the law then keeps `lr_init`. The curvature
        probe runs on every probe step (a zero `u_{t-1}` on the first), so that the compiled step has no
        branch.

        Returns:
            `(stats, loss)`: the statistics by their `eos_core.stats` names, and the loss (the one given, else
            the curvature route's, else None).
        """
        needs, numerics = self.request.needs, inputs.numerics
        previous_lr = numerics.scalar(state.previous_lr)
        known = jnp.isfinite(previous_lr)
        nan = numerics.scalar(math.nan)
        stats: dict[str, Any] = {}
        if S.GRAD_DOT_PREVIOUS_UPDATE in needs:
            stats[S.GRAD_DOT_PREVIOUS_UPDATE] = jnp.where(
                known, tree_dot(inputs.grads, state.previous_update, numerics.dtype), nan)
        if S.PREVIOUS_UPDATE_CURVATURE in needs:
            result, _ = curvature(inputs.value_fn, inputs.params, state.previous_update,
                                  route=ROUTE_NAMES[inputs.curvature_code], grads=inputs.grads,
                                  fd_eps=self.settings.fd_eps)
            stats[S.PREVIOUS_UPDATE_CURVATURE] = jnp.where(known, numerics.scalar(result.value), nan)
            loss = result.loss if loss is None else loss
        if S.PREVIOUS_LR in needs:
            stats[S.PREVIOUS_LR] = previous_lr
        return stats, loss

    def _spectral_statistics(self, inputs: _Inputs, state: TuneState, finite: jax.Array
                             ) -> tuple[dict[str, Any], PyTree | None, PyTree | None, tuple[Any, Any]]:
        """The law's eigenvalue statistics on a probe step.

        Returns:
            `(stats, eigenvector, preconditioned_eigenvector, iterations)`: the statistics, the new warm starts
            (the old ones kept on a step with non-finite inputs) and the products each power iteration used (NaN
            for an operator not estimated).
        """
        nan = inputs.numerics.scalar(math.nan)
        stats: dict[str, Any] = {}
        vectors = [state.eigenvector, state.preconditioned_eigenvector]
        iterations = [nan, nan]
        for index, wanted in enumerate((self.request.hessian_eigenvector, self.request.preconditioned)):
            if not wanted:
                continue
            matvec = self._operator(inputs, preconditioned=bool(index))
            found_vec, found, used = self._spectrum(inputs, matvec, vectors[index], preconditioned=bool(index))
            vectors[index] = tree_select(finite, found_vec, vectors[index])
            iterations[index] = used
            stats.update(found)
        return stats, vectors[0], vectors[1], (iterations[0], iterations[1])

    def _spectrum(self, inputs: _Inputs, matvec: Callable[[PyTree], PyTree], v0: PyTree, *, preconditioned: bool
                  ) -> tuple[PyTree, dict[str, Any], Any]:
        """The eigenvalue statistics of one operator: `(new warm start, stats, power-iteration products)`."""
        req, ops, numerics = self.request, inputs.ops, inputs.numerics
        sharp_key = S.PRECONDITIONED_SHARPNESS if preconditioned else S.SHARPNESS
        top_key = S.PRECONDITIONED_TOP_EIGENVALUES if preconditioned else S.TOP_EIGENVALUES
        stats: dict[str, Any] = {}
        used = numerics.scalar(math.nan)
        if sharp_key in req.needs:
            result = top_eigenvalue(matvec, v0, tol=req.power_tol, max_iters=req.power_iters, ops=ops)
            stats[sharp_key] = result.eigenvalue
            v0, used = result.eigenvector, numerics.scalar(result.iterations)
        if top_key in req.needs:
            n = ops.size(v0)
            result = top_eigenvalues(matvec, v0, min(req.num_eigenvalues, n), num_steps=req.lanczos_steps_for(n),
                                     ops=ops)
            stats[top_key] = result.eigenvalues
            v0 = result.eigenvectors[0]
        return v0, stats, used

    # -- stage 3: track ---------------------------------------------------------------------------------
    def _track(self, inputs: _Inputs, state: TuneState, probed: _Probed) -> _Tracked:
        nan = inputs.numerics.scalar(math.nan)
        untracked = _Tracked(nan, nan, nan, nan, probed.eigenvector, probed.preconditioned_eigenvector)
        every = self.settings.sharpness_every
        if every is None:
            return untracked
        if every == 1:
            return self._estimate(inputs, state, probed)
        return lax.cond(state.count % every == 0, lambda _: self._estimate(inputs, state, probed),
                        lambda _: untracked, None)

    def _estimate(self, inputs: _Inputs, state: TuneState, probed: _Probed) -> _Tracked:
        nan = inputs.numerics.scalar(math.nan)
        value, iterations, v = self._lambda_max(inputs, state, probed, preconditioned=False)
        pvalue, pv = nan, probed.preconditioned_eigenvector
        if self.tracks_preconditioned:
            pvalue, _, pv = self._lambda_max(inputs, state, probed, preconditioned=True)
        return _Tracked(value, pvalue, iterations, _alignment(inputs.u, v, inputs.numerics), v, pv)

    def _lambda_max(self, inputs: _Inputs, state: TuneState, probed: _Probed, *, preconditioned: bool
                    ) -> tuple[Any, Any, PyTree]:
        r"""The tracked $\lambda_{\max}$ of one operator ($H$, or $P^{-1/2} H P^{-1/2}$ when `preconditioned`).

        Returns:
            `(lambda_max, products, eigenvector)`: the law's estimate of this step when the reuse rule holds,
            else warm-started power iteration from the law's (or the last) vector.
        """
        numerics = inputs.numerics
        v0 = probed.preconditioned_eigenvector if preconditioned else probed.eigenvector

        def run(_: Any) -> tuple[Any, Any, PyTree]:
            top = top_eigenvalue(self._operator(inputs, preconditioned=preconditioned), v0,
                                 tol=self.settings.sharpness_tol, max_iters=self.settings.sharpness_iters,
                                 ops=inputs.ops)
            return (numerics.scalar(top.eigenvalue), numerics.scalar(top.iterations),
                    tree_select(probed.finite, top.eigenvector, v0))

        if not self.reuses[int(preconditioned)]:
            return run(None)
        key = S.PRECONDITIONED_SHARPNESS if preconditioned else S.SHARPNESS

        def reuse(_: Any) -> tuple[Any, Any, PyTree]:
            return numerics.scalar(probed.out.diagnostics[key]), probed.law_iterations[int(preconditioned)], v0

        if self.settings.probe_every == 1:
            return reuse(None)
        return lax.cond(self._probing(state), reuse, run, None)

    # -- stage 4: decide -----------------------------------------------------------------------------------
    def _decide(self, probed: _Probed) -> _Decision:
        """The step is taken unless its inputs are not finite (and `skip_nonfinite`); lr is the law's."""
        applied = probed.finite if self.settings.skip_nonfinite else jnp.asarray(True)
        return _Decision(applied=applied, lr=probed.out.lr, fell_back=applied & probed.fell_back)

    # -- stage 5: apply -------------------------------------------------------------------------------------
    def _apply(self, inputs: _Inputs, probed: _Probed, decision: _Decision) -> tuple[PyTree, Any]:
        """`lr * u` (0 on a skipped step) and the base state with the law's other hyperparameters written in."""
        base_state = inputs.base_state
        if self.decides:
            names = knobs.resolve_names(base_state, self.decides)
            base_state = knobs.write(base_state, {names[k]: probed.out.hyperparams[k] for k in self.decides
                                                  if names[k]})
        lr, applied = decision.lr, decision.applied
        if self.measuring:  # the base's own update, unchanged
            return jax.tree.map(lambda d: jnp.where(applied, d, 0).astype(d.dtype), inputs.raw), base_state
        updates = jax.tree.map(lambda d: jnp.where(applied, jnp.asarray(lr).astype(d.dtype) * d, 0).astype(d.dtype),
                               inputs.u)
        return updates, base_state

    # -- stage 6: report ------------------------------------------------------------------------------------
    def _route_in_use(self, inputs: _Inputs) -> int:
        r"""The code (`ROUTE_NAMES` index) of the registry's `route`.

        Returns:
            The $u^\top H u$ route's code when the law needs it, else the $H v$ route's of the spectral estimates
            when there are any, else the `route` setting's (`auto`: never resolved), as the PyTorch adapter,
            whose one oracle serves both, reports it.
        """
        return inputs.curvature_code or inputs.hvp_code or _route_code(self.settings.route)

    def _report(self, inputs: _Inputs, state: TuneState, probed: _Probed, tracked: _Tracked,
                decision: _Decision, tick: mon.Tick | None, quotient: jax.Array | None = None
                ) -> tuple[Diagnostics, MonitorState | None]:
        """Stage "report": this step's diagnostics.

        Returns:
            `(diagnostics, monitor)`: the diagnostics vector (a skipped step keeps the previous one with
            `skipped = 1`) and the monitor's state after its early warning (None without a monitor).
        """
        scalar = inputs.numerics.scalar
        nan = scalar(math.nan)
        values = {k: scalar(v) for k, v in probed.out.diagnostics.items()}
        lr = scalar(decision.lr)
        law_plain, law_preconditioned = D.law_sharpness(self.user_law, values, nan)
        monitor = None
        readings = [(nan, nan, nan, jnp.asarray(False))] * 2
        if tick is not None:
            monitor = tick.state
            trackers = (monitor.tracker, monitor.preconditioned)
            readings = [(nan, nan, nan, jnp.asarray(False)) if t is None else self._reading(t, tick.ticked, scalar)
                        for t in trackers]
        exact = (tracked.sharpness, tracked.preconditioned_sharpness)
        laws = (law_plain, law_preconditioned)
        # exact measurements of this step (sharpness_every, then the law's own) win over the monitor's estimate
        fallback = [jnp.where(jnp.isnan(law), reading[0], law) for law, reading in zip(laws, readings, strict=True)]
        values.update(D.derive_sharpness(jnp, lr, tracked.sharpness, tracked.preconditioned_sharpness, fallback[0],
                                         fallback[1]))
        fired = jnp.asarray(False)
        if monitor is not None:
            fresh, certain = [], []
            for index, (prefix, measured, law, reading) in enumerate(zip(("", "preconditioned_"), exact, laws,
                                                                           readings, strict=True)):
                known = ~jnp.isnan(measured) | ~jnp.isnan(law)
                values[prefix + "sharpness_residual"] = jnp.where(known, nan, reading[1])
                values[prefix + "sharpness_age"] = jnp.where(known, scalar(0.0), reading[2])
                fresh.append(known | reading[3])
                certain.append(~known & reading[3] & tick.conclusive[index])
            watched = "preconditioned_lr_sharpness" if self.edge_preconditioned else "lr_sharpness"
            edge = self._step_edge(inputs.base_state, inputs.numerics)
            index = int(self.edge_preconditioned)
            counted = monitor_rules.counts_for_warning(jnp, fresh[index], state.count,
                                                       adaptive=bool(self.edge_preconditioned))
            fired_along_update = jnp.asarray(False)
            if quotient is not None:  # the first step of an adaptive base (not counted above): at once
                monitor, fired_along_update = mon.update_warning_step(monitor, quotient=quotient,
                                                                      margin=self.settings.monitor_margin,
                                                                      patience=self.settings.monitor_patience)
                values["update_quotient"] = quotient
            monitor, fired = mon.warning_step(monitor, fresh=fresh[index], counted=counted, certain=certain[index],
                                              value=values[watched], edge=edge,
                                              margin=self.settings.monitor_margin,
                                              patience=self.settings.monitor_patience)
            fired = fired | fired_along_update
            known_edge = math.isfinite(self.edge)
            values.update(edge=scalar(edge),
                          unstable=jnp.where((monitor.seen > 0) & known_edge, scalar(monitor.unstable), nan),
                          monitor_every=scalar(mon.every(monitor, 1 + int(monitor.preconditioned is not None),
                                                         self.settings.monitor_budget)),
                          monitor_exact=scalar(monitor.exact))
            if self.settings.warn == "jit":
                # the static arguments bound in Python (jax < 0.4.3x's callbacks take arrays only)
                report = functools.partial(_warn_unstable, margin=self.settings.monitor_margin,
                                           patience=self.settings.monitor_patience, what=watched)
                lax.cond(fired, lambda: jax.debug.callback(report, values[watched], edge,
                                                            values.get("update_quotient", nan), count=state.count),
                         lambda: None)
        values.update(lr=lr, law_lr=lr, loss=probed.loss, grad_norm=inputs.grad_sq ** 0.5,
                      update_norm=inputs.update_sq ** 0.5, skipped=scalar(0.0), alignment=tracked.alignment,
                      power_iterations=tracked.iterations, route_code=scalar(self._route_in_use(inputs)),
                      hvp_route_code=scalar(inputs.hvp_code), monitor_fired=scalar(fired))
        values.update({name: probed.out.hyperparams[name] for name in self.decides})
        for key in D.MONITOR_KEYS:  # NaN while the monitor is off
            values.setdefault(key, nan)
        measured = jnp.stack([scalar(values[k]) for k in self.keys])
        kept = state.diagnostics.values.at[self.keys.index("skipped")].set(1.0)
        kept = kept.at[self.keys.index("monitor_fired")].set(0.0)
        return Diagnostics(self.keys, jnp.where(decision.applied, measured, kept), self.settings.warn,
                           self._rule()), monitor

    @staticmethod
    def _reading(tracker: Any, ticked: jax.Array, scalar: Callable[[Any], jax.Array]
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """`(eigenvalue, relative residual, age, fresh)` of a tracker (NaNs before its first product)."""
        started = tracker.products > 0
        nan = scalar(math.nan)
        value = jnp.where(started, scalar(tracker.eigenvalue), nan)
        residual = jnp.where(started, scalar(monitor_rules.relative_residual(jnp, tracker.residual,
                                                                             tracker.eigenvalue)), nan)
        return value, residual, jnp.where(started, scalar(tracker.age), nan), started & ticked


def tune(
    base: optax.GradientTransformation,
    law: Law | None,
    *,
    preconditioner: Preconditioner | None = None,
    settings: TunerSettings | None = None,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""Wrap `base` (an optax optimizer with learning rate 1) so that its update is scaled by `law`.

    The returned transformation's update is
    `update(grads, state, params, *, value_fn=None, value=None, **extra) -> (lr * u, state)` where
    `u` is `base`'s update, `value_fn(params)` the loss on the current batch as a scalar (needed
    for curvature, spectra and line searches; for a loss with auxiliary outputs pass
    `lambda p: loss_and_aux(p)[0]`) and `value` optionally its value at `params`. `grads` must be
    the raw gradient of `value_fn` at `params`: chain gradient transformations (clipping, ...) inside
    `base`, not before `tune` (see the module docstring). For CDAT the learning rate is eq. 8 of the
    CDAT paper (Roulet et al. 2024, "Stepping on the edge: curvature aware learning rate tuners"),
    $\eta_t = \sigma \max(-g_t^\top u_t, 0) / (|u_t^\top H_t u_t| + \varepsilon)$ (with its EMAs), and
    [`diagnostics`][eos_core.adapters.jax.diagnostics] reads what the last step measured.

    Args:
        base: an `optax.GradientTransformation` with learning rate 1.
        law: a tuning law from [`eos_core.laws`][], or None to only measure: the base's own update
            (with its own learning rate, injected with `optax.inject_hyperparams` or given as
            `reference_lr`) is applied unchanged, and the diagnostics report it (with `monitor_budget`).
        preconditioner: $P$ of an adaptive base; by default identified from `base`
            (`eos_core.adapters.jax.preconditioner.identify`). Either a spec
            ([`AdamPreconditioner`][eos_core.adapters.jax.AdamPreconditioner],
            [`RmsPreconditioner`][eos_core.adapters.jax.RmsPreconditioner]) or a callable `base_state -> P` (a
            pytree like the parameters, entrywise positive).
        settings: the tuner options as one [`TunerSettings`][eos_core.settings.TunerSettings]; keyword `options`
            given as well replace its values.
        **options: the options of [`TunerSettings`][eos_core.settings.TunerSettings] this adapter supports
            ([`SUPPORTED_OPTIONS`][eos_core.adapters.jax.SUPPORTED_OPTIONS]):

            * `probe_every`: measure the statistics every that many steps (steps 0, k, 2k, ... of the
              steps taken) and reuse the learning rate in between. Meant for laws whose rate changes
              slowly (CDAT with an EMA, AdaEoS, DCAO, ExactSharpness); the Polyak step is a property of
              the current point only, and holding it for several steps can diverge.
            * `route`: $u^\top H u$ oracle: `auto`, `jvp-jvp`, `jvp-grad`, `double-backward`,
              `fd-central`, `fd-onesided` (see `eos_core.adapters.jax.oracles`).
            * `sharpness_every`, `sharpness_iters`, `sharpness_tol`: sharpness tracking every m steps
              (None: off) and its power-iteration budget and tolerance.
            * `warn`: `True` (RuntimeWarnings raised by [`diagnostics`][eos_core.adapters.jax.diagnostics], no
              host callback in the compiled update), `"jit"` (from inside `jit`, about 10% per step) or
              `False`.
            * `skip_nonfinite`: skip a step whose gradient, update or known loss is not finite (default
              True); False applies it.
            * `seed`: seed of the start vectors ([`eos_core.spectral.random_start`][]).
            * `fd_eps`: machine epsilon the finite-difference routes size their step for (default: that
              of the lowest-precision parameter).
            * `reference_lr`: the learning rate the law starts from when it has no `lr_init`
              (`law.init(reference_lr)`; the base's own rate is 1 by contract). With `law=None`: the
              base's constant learning rate, when it does not inject one.
            * `monitor_budget`: the sharpness monitor (`eos_core.adapters.jax.monitor`), the share of
              training time it may take (None: off); `monitor_edge` (default: the base's edge, derived from
              its impulse response in the coordinates of its preconditioner, and following an injected
              `b1` / `momentum`), `monitor_margin` and `monitor_patience` set its early warning
              ([`eos_core.monitor`][]).

            The old names `power_iters`, `power_tol` and `initial_lr` warn with a DeprecationWarning.

    Returns:
        An `optax.GradientTransformationExtraArgs` whose state is a
        [`TuneState`][eos_core.adapters.jax.TuneState] and whose update returns $\eta_t u_t$ (0 on a skipped
        step).

    Raises:
        ValueError: naming the setting, for an invalid `base`, `law` or option, an option this adapter
            does not support given a non-default value (`lr_mode`, `fd_above`, `clipped_gradients`,
            `linear_in_lr`), a law that cannot start (e.g. a multiplicative law without `lr_init` or
            `reference_lr`), a preconditioned law on a base without a preconditioner, or a law that
            decides a hyperparameter `base` cannot take (DCAO on a base not built with
            `optax.inject_hyperparams`; checked on a synthetic parameter vector, or at `init` for a base
            that needs the real parameter structure). The returned transformation's `update` raises it
            without `params`, or without `value_fn` when the law, `sharpness_every` or `monitor_budget` needs
            the loss.

    Examples:
        One CDAT step of gradient descent on $f(w) = \frac12 (w_1^2 + 10 w_2^2)$:

        >>> import jax, jax.numpy as jnp, optax
        >>> from eos_core import CDAT
        >>> from eos_core.adapters.jax import diagnostics, tune
        >>> def loss(w):
        ...     return 0.5 * jnp.sum(jnp.array([1.0, 10.0]) * w ** 2)
        >>> opt = tune(optax.sgd(1.0), CDAT(scale=2.0))
        >>> params = jnp.array([1.0, 1.0])
        >>> state = opt.init(params)
        >>> updates, state = opt.update(jax.grad(loss)(params), state, params, value_fn=loss)
        >>> params = optax.apply_updates(params, updates)
        >>> found = diagnostics(state)
        >>> round(found["lr"], 4), found["route"]  # sigma (g.g) / (g^T H g) = 2 * 101 / 1001
        (0.2018, 'jvp-jvp')
    """
    if not isinstance(base, optax.GradientTransformation):
        raise ValueError(f"tune: base must be an optax.GradientTransformation (e.g. optax.sgd(1.0)), "
                         f"got {type(base).__name__}")
    if law is not None and not isinstance(law, Law):
        raise ValueError(f"tune: law must be an eos_core law (e.g. CDAT(scale=2.0)) or None to only measure, got "
                         f"{type(law).__name__}")
    tuner = _Tuner(base, law, _resolve_settings(settings, options), preconditioner)
    return optax.GradientTransformationExtraArgs(tuner.init, tuner.update)


# -- reading the state on the host ------------------------------------------------------------------------
def find_tune_state(state: Any, *, caller: str = "find_tune_state") -> TuneState:
    """The [`TuneState`][eos_core.adapters.jax.TuneState] in an optax state.

    Args:
        state: the state of a [`tune`][eos_core.adapters.jax.tune] transformation, or of a chain or wrapper
            holding one (`optax.chain` tuples, `optax.named_chain` dicts, `optax.apply_if_finite` /
            `inject_hyperparams` NamedTuples).
        caller: the public function asking, named in the error message.

    Returns:
        `state` itself, or the one `TuneState` found inside it.

    Raises:
        ValueError: `state` holds no `TuneState`, or more than one.
    """
    found: list[TuneState] = []

    def walk(node: Any) -> None:
        if isinstance(node, TuneState):
            found.append(node)
        elif isinstance(node, dict):
            for child in node.values():
                walk(child)
        elif isinstance(node, list | tuple):
            for child in node:
                walk(child)

    walk(state)
    if len(found) != 1:
        raise ValueError(f"{caller}: expected one TuneState (the state of a tune(...) transformation) in the "
                         f"optimizer state, found {len(found)}")
    return found[0]


def decode_diagnostics(keys: Sequence[str], values: Any, *, count: Any, skipped_steps: Any,
                       fallback_steps: Any) -> dict[str, float | int | str]:
    """Host diagnostics from a diagnostics vector and the three counters of a `TuneState`.

    The one decoding of a [`TuneState`][eos_core.adapters.jax.TuneState], for
    [`diagnostics`][eos_core.adapters.jax.diagnostics] and for code that keeps the state elsewhere (the Keras engine
    keeps it in variables).

    Args:
        keys: the vector's entries (`Diagnostics.keys`, from `vector_keys(law)`).
        values: the vector (`Diagnostics.values`; any array convertible by `numpy.asarray`).
        count: `TuneState.count`, steps taken (skipped steps excluded).
        skipped_steps: `TuneState.skipped`.
        fallback_steps: `TuneState.fallbacks`.

    Returns:
        The keys of [`eos_core.diagnostics.keys_for`][] in registry order (the law's own keys last): floats,
        `route` (a str) and the ints `step` (`count - 1` after a step taken, `count` after a skipped one: the
        index the next step taken gets; 0 before any step), `skipped_steps` and `fallback_steps`.
    """
    host = dict(zip(keys, np.asarray(values, dtype=np.float64).tolist(), strict=True))
    skipped = host.get("skipped", 0.0) > 0
    out: dict[str, float | int | str] = {k: float(v) for k, v in host.items() if k not in CODE_KEYS}
    out["route"] = ROUTE_NAMES[int(host["route_code"])]
    out["step"] = max(int(count) - 1 + int(skipped), 0)
    out["skipped_steps"] = int(skipped_steps)
    out["fallback_steps"] = int(fallback_steps)
    order = {entry.name: i for i, entry in enumerate(D.REGISTRY)}
    return dict(sorted(out.items(), key=lambda item: order.get(item[0], len(order))))


def diagnostics(state: Any) -> dict[str, float | int | str]:
    r"""The last step's diagnostics as host values: exactly the keys of `eos_core.diagnostics.keys_for(law)`.

    The meanings are those of [`eos_core.diagnostics.REGISTRY`][]: `lr` (= `law_lr`) the rate applied to the last
    step, `probed`, `fallback`, `skipped` (1 when the last step was skipped; the other values are then the
    previous step's), `loss` (when known: the `value` argument or computed by the oracle), `grad_norm` and
    `update_norm` (of $u$, the update for lr = 1), `route` (the $u^\top H u$ route, else the $H v$ route of the
    spectral estimates, else the setting; the $H v$ route itself is
    [`hvp_route`][eos_core.adapters.jax.hvp_route]), `step`, `skipped_steps`, `fallback_steps`; `sharpness`,
    `lr_sharpness`, `preconditioned_sharpness`, `preconditioned_lr_sharpness`, `alignment`, `power_iterations`;
    with `monitor_budget` the monitor's `sharpness_age`, `sharpness_residual`, `edge`, `unstable`,
    `monitor_every`, `monitor_exact`; the law's own measurements and the hyperparameters it decides. NaN marks a
    value not measured on the last step.

    For a transformation built with `warn=True` (the default) this is where the warnings are raised: a
    RuntimeWarning when the last step was skipped, or else when the law fell back on it, with the cumulative
    counts in the message ([`warn_bad_steps`][eos_core.adapters.jax.warn_bad_steps]), and the monitor's early
    warning ([`warn_unstable`][eos_core.adapters.jax.warn_unstable]) on the step it fired. `warn="jit"` (warned
    inside `jit` already) and `warn=False` read silently.

    Args:
        state: the state of a [`tune`][eos_core.adapters.jax.tune] transformation, or any optax state that holds
            exactly one (see [`find_tune_state`][eos_core.adapters.jax.find_tune_state]).

    Returns:
        `{name: value}` in registry order: floats, the str `route` and the ints `step`, `skipped_steps`,
        `fallback_steps` (see [`decode_diagnostics`][eos_core.adapters.jax.decode_diagnostics]).

    Raises:
        ValueError: `state` holds no `TuneState`, or more than one.

    Warns:
        RuntimeWarning: with `warn=True`, for a skipped or fallen-back last step and for the early warning.
    """
    state = find_tune_state(state, caller="diagnostics")
    count, skipped, fallbacks, values = jax.device_get((state.count, state.skipped, state.fallbacks,
                                                        state.diagnostics.values))
    out = decode_diagnostics(state.diagnostics.keys, values, count=count, skipped_steps=skipped,
                             fallback_steps=fallbacks)
    if state.diagnostics.warn is True:
        warn_bad_steps(out, stacklevel=2)
        if "monitor_fired" in state.diagnostics.keys and float(values[state.diagnostics.keys.index("monitor_fired")]):
            warn_unstable(out, state.diagnostics.rule, stacklevel=2)
    return out


def warn_unstable(found: Mapping[str, Any], rule: tuple[float, int] | None = None, *, stacklevel: int = 1) -> None:
    """Raise the sharpness monitor's early warning ([`eos_core.monitor`][]) on the host.

    Reads the host diagnostics (the dict of [`diagnostics`][eos_core.adapters.jax.diagnostics]) of the step the
    warning fired on: `update_quotient` when it is above its threshold (an adaptive base's first step,
    [`eos_core.monitor.update_quotient`][]), else the preconditioned lr x sharpness when it is measured (an adaptive
    base), else lr x sharpness, against `edge`.

    Args:
        found: host diagnostics with `edge`, `step`, `lr_sharpness` / `preconditioned_lr_sharpness` and, when
            present, `update_quotient`.
        rule: `(monitor_margin, monitor_patience)` (default: the core's defaults, [`eos_core.monitor.MARGIN`][]
            and [`eos_core.monitor.PATIENCE`][]).
        stacklevel: as in `warnings.warn`; 1 points the warning at the caller of this function.

    Warns:
        RuntimeWarning: always, with the value, the edge, the rule and the step
            ([`eos_core.monitor.warning_message`][]).
    """
    margin, patience = rule if rule is not None else (monitor_rules.MARGIN, monitor_rules.PATIENCE)
    preconditioned = np.isfinite(float(found.get("preconditioned_lr_sharpness", math.nan)))
    what = "preconditioned_lr_sharpness" if preconditioned else "lr_sharpness"
    warnings.warn(_unstable_message(float(found[what]), float(found["edge"]),
                                    float(found.get("update_quotient", math.nan)), margin, patience,
                                    int(found["step"]), what), RuntimeWarning, stacklevel=stacklevel + 1)


def hvp_route(state: Any) -> str:
    r"""The route of the Hessian-vector products of the last step's spectral estimates.

    Not a diagnostics key: the registry's `route` is the $u^\top H u$ route in every adapter.

    Args:
        state: the state of a [`tune`][eos_core.adapters.jax.tune] transformation or an optax state holding one.

    Returns:
        The `route` setting when it gives $H v$, else the first of `jvp-grad`, `double-backward`, `fd-onesided`
        that traces (see [`resolve_hvp_route`][eos_core.adapters.jax.resolve_hvp_route]); `"none"` when the
        transformation makes no spectral estimates (no spectral law, no `sharpness_every`).

    Raises:
        ValueError: `state` holds no `TuneState`, or more than one.
    """
    found = find_tune_state(state, caller="hvp_route")
    return ROUTE_NAMES[int(jax.device_get(found.diagnostics["hvp_route_code"]))]
