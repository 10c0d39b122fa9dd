r"""``tune``: an optax transformation that applies a tuning law's learning rate to a base optimizer.

Notation of the CDAT paper (Roulet et al. 2024): ``w`` the parameters, ``g`` the gradient,
``u`` the base optimizer's update **for learning rate 1** and ``H`` the Hessian of the loss on the
current batch. ``base`` is a complete optax optimizer built with learning rate 1
(``optax.sgd(1.0)``, ``optax.adam(1.0)``, ...), so its output is ``u``; the transformation outputs
``lr * u`` with ``lr`` the law's decision for this step (for CDAT, eq. 8:
``lr = sigma * max(-g.u, 0) / (|u^T H u| + eps)``, optionally EMA-smoothed).

Usage (the convention of optax's line searches: ``value_fn(params)`` is the loss on the batch)::

    opt = tune(optax.sgd(1.0), CDAT(scale=2.0))
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        value_fn = lambda p: loss(p, batch)
        grads = jax.grad(value_fn)(params)
        updates, state = opt.update(grads, state, params, value_fn=value_fn)
        return optax.apply_updates(params, updates), state

Design
------
* **Statistics.** On a probe step the transformation measures exactly ``law.needs``
  (:mod:`eos_core.stats`): ``g.u``; ``u^T H u`` (:mod:`.oracles`); ``f(w)`` (free with every exact
  curvature route, or the ``value`` extra argument, else one forward pass); ``|g|^2``; lambda_max by
  warm-started power iteration (``law.power_iters`` / ``law.power_tol``); the top ``k`` eigenvalues by
  Lanczos (``law.num_eigenvalues``, ``law.lanczos_steps``); the preconditioned variants
  (:mod:`.preconditioner`); ``trial_loss``, the callable ``eta -> value_fn(w + eta u)`` (forward
  passes only; the law loops with ``lax.while_loop``); ``cos(g_t, u_{t-1})`` from the previous
  direction kept in the state (0 on the first step).
* **Probing every k steps.** ``lax.cond(count % probe_every == 0, probe, hold)``: between probes
  ``law.hold`` reuses the last learning rate; probes happen at steps 0, k, 2k, ...
  **Convolutions on CPU:** XLA:CPU runs the *gradient* convolutions of a conv net 30-100x slower inside a
  ``lax.cond`` branch or a loop body than at the top level of the program (jax-ml/jax#12868; measured
  with jax 0.10 on a small CNN: a gradient 6 ms at top level, 480 ms inside a ``cond``; forward
  convolutions are unaffected). On CPU a conv net therefore pays that price for every probe that takes a
  gradient inside the ``cond`` (``probe_every > 1`` with a finite-difference, ``jvp-grad`` or
  ``double-backward`` route) and for every power-iteration / Lanczos step (spectral laws,
  ``sharpness_every``); the default ``jvp-jvp`` probe is forward-mode only and keeps its cost. The
  slow path is XLA:CPU's (on a GPU, convolutions in nested computations still go to cuDNN; not
  measured in this repository's CI).
* **Routes.** ``route`` picks the u^T H u oracle; ``auto`` resolves at trace time to the first of
  jvp-jvp, jvp-grad, double-backward, fd-onesided that ``value_fn`` can be traced through (a
  ``custom_vjp`` function has no forward mode). Hessian-vector products for spectra use the same
  route when it is an H v route, else the ``auto`` chain jvp-grad, double-backward, fd-onesided.
  Both routes are reported (``route``, ``hvp_route``). Cost on a GPT-2 124M step (H100, fp32,
  measured with ``benchmarks/jax_overhead.py``): a jvp-jvp probe is about 2.2 training steps, a
  one-sided finite difference about 1.1; only the latter meets the 2.1x target when probing every
  step.
* **Sharpness tracking.** ``sharpness_every=m`` estimates lambda_max(H) every m steps by
  warm-started power iteration (``sharpness_iters`` iterations at most, stopping at relative change
  ``sharpness_tol``) and, for an Adam / RMSProp base, lambda_max(P^{-1/2} H P^{-1/2}); reported as
  ``sharpness``, ``lr_sharpness`` (= lr * sharpness) and ``preconditioned_sharpness`` (NaN on steps
  without a measurement, the core's convention). Power iteration returns the eigenvalue of largest
  magnitude, with its sign.
* **Other hyperparameters (DCAO).** A law that decides ``momentum`` / ``weight_decay`` writes them
  into the base's ``optax.inject_hyperparams`` state (``momentum`` or ``b1``; ``weight_decay``).
  They take effect from the next step: this step's ``u`` was formed before the law measured the
  curvature. At ``init`` a ValueError is raised when the base is not built with
  ``inject_hyperparams``, when a knob is a schedule (it would overwrite the law), or when a knob the
  law would move is missing. A missing knob is read as 0, and DCAO's rules are multiplicative, so a
  knob that starts at 0 stays there unless its lower bound is positive: the missing knob is only an
  error when the law's lower bound for it is > 0. What can be applied is applied.
* **Bad input** (SPEC section 10). A non-finite gradient, update ``u`` or loss (when the loss is
  known: the ``value`` argument or a route that computed it) skips the step inside ``jit``: the
  update is 0 and the base state, law state, warm-start vectors and step count are left unchanged,
  as ``optax.apply_if_finite`` does. Non-finite or degenerate curvature is handled by the law: it
  keeps its last good learning rate (``fallback = 1``). The state counts both, cumulatively
  (``skipped``, ``fallbacks``; :func:`diagnostics` reports them as ``skipped_steps`` and
  ``fallback_steps``). The grad and update squared norms serve as the finiteness test (one dot
  product per tree; a squared norm that overflows the float range counts as non-finite too) and are
  reported every step.
* **Warnings** (``warn``). With ``warn=True`` (the default) the compiled update contains no host
  callback: the RuntimeWarning is raised on the host by :func:`diagnostics` when the last step was
  skipped or fell back, with the cumulative counts in its message (a training loop that reads the
  diagnostics every step therefore warns at every bad step; one that reads them every ``n`` steps
  warns only when the step it reads was bad, and the counts tell how many there were in all; such a
  loop can pass the counts' increase since its last read to :func:`warn_bad_steps`, as the Keras
  adapter does). ``warn="jit"`` warns from inside ``jit`` instead, through ``jax.debug.callback`` in
  a ``lax.cond`` on probe steps (steps skipped between probes are reported at the next probe,
  ``reported_skips`` keeps track), without any call to :func:`diagnostics`. ``warn=False`` warns
  nowhere; the counts stay in the state and in :func:`diagnostics`. :func:`diagnostics` learns the
  mode from the state: its :class:`Diagnostics` carries it as static pytree data (not an array, so
  nothing is added to the step or the checkpoint's arrays), written by ``init`` and by every
  ``update``, so after one step a restored state reports with the running transformation's mode.
  **Cost of the in-jit warning:** a host callback anywhere in the program slows every step, not only
  the ones that call it. GPT-2 124M on an H100: +12% per step probing every 10 steps, +9% probing
  every step. The 2-layer GPT-like model of ``benchmarks/jax_overhead.py`` on CPU (jax 0.10, routes
  jvp-jvp and fd-onesided), probing every 10 steps: 1.23-1.26x a plain step with ``warn="jit"``,
  1.12-1.14x with ``warn=True`` or ``False`` (identical programs). That is why ``warn=True`` leaves it out
  (``--warn jit`` measures it).
* **Composition with other optax transformations.** ``tune`` must receive the raw gradient of
  ``value_fn``: it is ``g`` in ``g.u`` (CDAT's numerator), ``|g|^2`` (Polyak), the base point of
  one-sided finite differences and the cosine of HyperGradient. Put gradient transformations
  *inside* ``base``, which then forms ``u`` from them::

      opt = tune(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), CDAT(scale=2.0))

  rather than ``optax.chain(optax.clip_by_global_norm(1.0), tune(...))``, where ``g`` would be the
  clipped gradient (the numerator shrinks with the clipping factor and one-sided differences
  subtract the wrong gradient). CDAT's rate scales as ``1 / |u|``, so a global-norm clip inside
  ``base`` leaves SGD's step ``lr * u`` unchanged (it does change Adam's moments); bound the step
  with the law's ``lr_max`` instead. A transformation chained *after* ``tune`` sees ``lr * u``.
  :func:`diagnostics` finds the ``TuneState`` inside a chained or wrapped state
  (``optax.chain``, ``optax.named_chain``, ``optax.apply_if_finite``, ...).
* **Data parallel** (SPEC section 10). Every statistic is a function of ``value_fn`` and ``grads`` on
  the whole batch, so every device computes the same learning rate when those are global: under
  ``jax.jit`` with a batch-sharded input (``NamedSharding(mesh, P("data"))``) XLA inserts the
  reductions itself (the lr equals the single-device run's, tested with 2 host devices); under
  ``shard_map`` ``value_fn`` must return the global loss (``lax.pmean(loss(p, local_batch), "data")``)
  and ``grads`` its gradient.
* **State.** :class:`TuneState` is a NamedTuple of arrays (and ``None`` for unused slots): it
  checkpoints with the parameters, and resuming from a saved copy continues bit-identically (all
  randomness comes from a fixed seed at ``init``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from eos_core import _validation as check
from eos_core import routes
from eos_core import stats as S
from eos_core.adapters.jax import hyperparams as knobs
from eos_core.adapters.jax.numerics import jax_numerics
from eos_core.adapters.jax.oracles import HVP_ROUTES, curvature, resolve_curvature_route, resolve_hvp_route
from eos_core.adapters.jax.preconditioner import AdamPreconditioner, RmsPreconditioner, find_preconditioner, identify
from eos_core.adapters.jax.spectral import hessian_operator, top_eigenvalue, top_eigenvalues
from eos_core.adapters.jax.tree_ops import (
    TreeOps,
    tree_dot,
    tree_random_normal,
    tree_scale,
    tree_select,
)
from eos_core.laws.base import Law, LawOutput
from eos_core.numerics import NUMPY, Numerics

PyTree = Any

#: Route names by code (the state stores an int32 code; ``none`` when no curvature was needed).
ROUTE_NAMES: tuple[str, ...] = ("none", *routes.EXACT, *routes.FINITE_DIFFERENCES)

#: Diagnostics the adapter reports besides the law's own (``lr``, ``probed``, ``fallback``, measurements).
ADAPTER_KEYS: tuple[str, ...] = (
    "loss", "grad_norm", "update_norm", "numerator", "denominator", "sharpness", "lr_sharpness",
    "preconditioned_sharpness", "power_iterations", "skipped",
)

_SPECTRAL_NEEDS = frozenset(S.SPECTRAL)
_PRECONDITIONED_NEEDS = frozenset({S.PRECONDITIONED_SHARPNESS, S.PRECONDITIONED_TOP_EIGENVALUES})
_VALUE_FN_NEEDS = frozenset({S.CURVATURE, S.TRIAL_LOSS}) | _SPECTRAL_NEEDS


@jax.tree_util.register_pytree_node_class
class Diagnostics:
    """The last step's diagnostics: a fixed tuple of names and the transformation's ``warn`` mode (static) and
    one vector of values (a pytree leaf).

    One array keeps the per-step bookkeeping to a single select; ``d["lr"]`` reads one value and
    :func:`diagnostics` converts all of them to host floats (and, when ``warn`` is True, raises the
    warnings of a skipped or fallen-back last step).
    """

    def __init__(self, keys: tuple[str, ...], values: Any, warn: bool | str = True) -> None:
        self.keys = tuple(keys)
        self.values = values
        self.warn = warn

    def tree_flatten(self) -> tuple[tuple[Any], tuple[tuple[str, ...], bool | str]]:
        return (self.values,), (self.keys, self.warn)

    @classmethod
    def tree_unflatten(cls, aux: tuple[tuple[str, ...], bool | str], children: tuple[Any, ...]) -> Diagnostics:
        keys, warn = aux
        return cls(keys, children[0], warn)

    def __getitem__(self, key: str) -> Any:
        return self.values[self.keys.index(key)]

    def __contains__(self, key: object) -> bool:
        return key in self.keys

    def __repr__(self) -> str:
        return f"Diagnostics({dict(zip(self.keys, np.asarray(self.values).tolist(), strict=True))})"


class TuneState(NamedTuple):
    """State of :func:`tune`: a pytree of arrays (unused slots are ``None``)."""

    base_state: Any  #: the base optimizer's state
    law_state: Any  #: the law's state (a NamedTuple of 0-d arrays)
    count: jax.Array  #: int32, steps taken (skipped steps excluded); probes when ``count % probe_every == 0``
    skipped: jax.Array  #: int32, steps skipped because of a non-finite loss, gradient or update
    fallbacks: jax.Array  #: int32, probe steps where the law kept its last learning rate (``fallback = 1``)
    reported_skips: jax.Array  #: int32, skipped steps counted up to the last probe (reported there by ``warn="jit"``)
    eigenvector: PyTree | None  #: warm start of power iteration / Lanczos on H (unit norm)
    preconditioned_eigenvector: PyTree | None  #: warm start on P^{-1/2} H P^{-1/2}
    previous_update: PyTree | None  #: u_{t-1}, for cos(g_t, u_{t-1}) (HyperGradient)
    diagnostics: Diagnostics  #: the last step's diagnostics (see :func:`diagnostics`)


def _route_code(name: str | None) -> int:
    return 0 if name is None else ROUTE_NAMES.index(name)


def _law_numerics(law_state: Any) -> Numerics:
    leaves = [leaf for leaf in jax.tree.leaves(law_state) if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
    return jax_numerics(jnp.result_type(leaves[0]) if leaves else None)


@functools.partial(jax.jit, static_argnums=1)
def _unit_random(params: PyTree, seed: int) -> PyTree:
    """A unit-norm standard normal pytree shaped like ``params`` (one compiled program: eager, the draw and the
    normalisation would compile one small program per leaf shape, seconds in all for a small model)."""
    v = tree_random_normal(params, seed)
    return tree_scale(1.0 / tree_dot(v, v) ** 0.5, v)


#: Accepted values of ``tune``'s ``warn`` (see the module docstring).
WARN_MODES: tuple[bool | str, ...] = (True, "jit", False)


def _warn_mode(owner: str, warn: Any) -> bool | str:
    if isinstance(warn, bool | np.bool_):
        return bool(warn)
    if isinstance(warn, str) and warn == "jit":
        return "jit"
    raise ValueError(f"{owner}: warn must be True (warnings raised by diagnostics(), no host callback in the step), "
                     f"'jit' (warnings from inside jit through jax.debug.callback) or False (none), got {warn!r}")


def _warn(count: Any, unreported: Any, fallback: Any) -> None:
    """Host side of the in-jit warning of ``warn="jit"`` (``jax.debug.callback`` on a probe step)."""
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
    """Raise the host-side RuntimeWarnings of ``warn=True`` from host diagnostics (:func:`diagnostics`' dict).

    By default they describe the last step: skipped (``skipped`` = 1), or else fell back (``fallback`` = 1).
    A caller that remembers the counts it saw last (the Keras callback, reading every ``log_every`` steps)
    passes ``new_skips`` / ``new_fallbacks``, the increase of ``skipped_steps`` / ``fallback_steps`` since
    then. Steps are numbered by update call from ``init`` (0-based, skipped steps included), so the index of
    the last one is ``step + skipped_steps - 1``. ``stacklevel`` as in ``warnings.warn``: 1 points the warning
    at the caller of this function.
    """
    skipped_steps, fallback_steps = int(found["skipped_steps"]), int(found.get("fallback_steps", 0))
    last = int(found["step"]) + skipped_steps - 1
    last_skipped = float(found.get("skipped", 0.0)) > 0
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


def tune(
    base: optax.GradientTransformation,
    law: Law,
    *,
    probe_every: int = 1,
    route: str = routes.AUTO,
    sharpness_every: int | None = None,
    sharpness_iters: int = 20,
    sharpness_tol: float = 1e-3,
    preconditioner: AdamPreconditioner | RmsPreconditioner | Callable[[Any], PyTree] | None = None,
    seed: int = 0,
    warn: bool | str = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Wrap ``base`` (an optax optimizer with learning rate 1) so that its update is scaled by ``law``.

    The returned transformation's update is
    ``update(grads, state, params, *, value_fn=None, value=None, **extra) -> (lr * u, state)`` where
    ``u`` is ``base``'s update, ``value_fn(params)`` the loss on the current batch as a scalar (needed
    for curvature, spectra and line searches; for a loss with auxiliary outputs pass
    ``lambda p: loss_and_aux(p)[0]``) and ``value`` optionally its value at ``params``. ``grads`` must be
    the raw gradient of ``value_fn`` at ``params``: chain gradient transformations (clipping, ...) inside
    ``base``, not before ``tune`` (see the module docstring). For CDAT
    the learning rate is eq. 8 of the CDAT paper,
    :math:`\eta_t = \sigma \max(-g_t^\top u_t, 0) / (|u_t^\top H_t u_t| + \varepsilon)`.

    Args:
        base: an ``optax.GradientTransformation`` with learning rate 1.
        law: a tuning law from :mod:`eos_core.laws`.
        probe_every: measure the statistics every ``probe_every`` steps (steps 0, k, 2k, ...) and
            reuse the learning rate in between. Meant for laws whose rate changes slowly (CDAT with
            an EMA, AdaEoS, DCAO, ExactSharpness); the Polyak step is a property of the current point
            only, and holding it for several steps can diverge.
        route: u^T H u oracle: ``auto``, ``jvp-jvp``, ``jvp-grad``, ``double-backward``, ``fd-central``,
            ``fd-onesided`` (see :mod:`eos_core.adapters.jax.oracles`).
        sharpness_every: every ``m`` steps, estimate lambda_max(H) (and, for an adaptive base, of the
            preconditioned Hessian) for the diagnostics; None disables it.
        sharpness_iters, sharpness_tol: power-iteration budget and stopping tolerance of that estimate.
        preconditioner: P of an adaptive base; by default identified from ``base``
            (:func:`eos_core.adapters.jax.preconditioner.identify`). Either a spec
            (:class:`AdamPreconditioner`, :class:`RmsPreconditioner`) or a callable
            ``base_state -> P`` (a pytree like the parameters, entrywise positive).
        seed: seed of the initial warm-start vectors.
        warn: how a skipped step (non-finite loss, gradient or update) and a law fallback (non-finite or
            degenerate curvature) are reported. ``True`` (default): on the host, by :func:`diagnostics`, when
            the last step was skipped or fell back (the message has the cumulative counts); the compiled
            update holds no host callback. ``"jit"``: from inside ``jit`` through ``jax.debug.callback``, in a
            ``lax.cond`` on probe steps taken only when steps were skipped since the last report or the law
            fell back (steps skipped between probes are reported at the next probe); the callback costs
            about 10% on every step (see the module docstring). ``False``: never. In every mode the counts
            are in the state (``skipped``, ``fallbacks``) and in :func:`diagnostics` (``skipped_steps``,
            ``fallback_steps``).

    Raises:
        ValueError: naming the setting, for an invalid ``base``, ``law``, ``probe_every``, ``route``,
            ``sharpness_every``, ``sharpness_iters``, ``sharpness_tol``, ``warn``, or a law that cannot start
            (e.g. a multiplicative law without ``lr_init``: the base's learning rate is 1 by contract,
            so no initial rate is taken from it), or a law that decides a hyperparameter ``base`` cannot
            take (DCAO on a base not built with ``optax.inject_hyperparams``; checked on a synthetic
            parameter vector, or at ``init`` for a base that needs the real parameter structure).
    """
    owner = "tune"
    if not isinstance(base, optax.GradientTransformation):
        raise ValueError(f"{owner}: base must be an optax.GradientTransformation (e.g. optax.sgd(1.0)), "
                         f"got {type(base).__name__}")
    if not isinstance(law, Law):
        raise ValueError(f"{owner}: law must be an eos_core law (e.g. CDAT(scale=2.0)), got {type(law).__name__}")
    probe_every = check.positive_int(owner, "probe_every", probe_every)
    route = routes.validate_route(route, owner=f"{owner}: route")
    if sharpness_every is not None:
        sharpness_every = check.positive_int(owner, "sharpness_every", sharpness_every)
    sharpness_iters = check.positive_int(owner, "sharpness_iters", sharpness_iters)
    sharpness_tol = check.non_negative(owner, "sharpness_tol", sharpness_tol)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"{owner}: seed must be an integer, got {seed!r}")
    warn = _warn_mode(owner, warn)
    unknown = set(law.needs) - set(S.ALL)
    if unknown:
        raise ValueError(f"{owner}: law {law!r} needs statistics this adapter does not know: {sorted(unknown)}")
    law.init(None, numerics=NUMPY)  # a law that cannot start raises its ValueError here, at construction

    needs = frozenset(law.needs)
    base = optax.with_extra_args_support(base)
    wants_preconditioner = bool(needs & _PRECONDITIONED_NEEDS) or sharpness_every is not None
    spec, reason = identify(base, preconditioner) if wants_preconditioner else (None, "not needed")
    if needs & _PRECONDITIONED_NEEDS and spec is None:
        raise ValueError(f"{owner}: law {law!r} needs the preconditioned Hessian, but {reason}")
    needs_eigenvector = bool(needs & {S.SHARPNESS, S.TOP_EIGENVALUES}) or sharpness_every is not None
    needs_precond_eigenvector = bool(needs & _PRECONDITIONED_NEEDS) or (
        sharpness_every is not None and spec is not None)
    needs_previous = S.GRAD_PREV_UPDATE_COSINE in needs
    hvp_route = route if route in HVP_ROUTES else routes.AUTO
    decides = tuple(law.decides)
    if decides:  # the knobs the law sets must exist in base: check now, on a synthetic parameter vector
        synthetic_state = _synthetic_state(base)
        if synthetic_state is not None:
            _init_law(law, synthetic_state, NUMPY)

    def precond_of(base_state: Any) -> PyTree:
        if isinstance(spec, AdamPreconditioner | RmsPreconditioner):
            return find_preconditioner(base_state, spec)
        return spec(base_state)

    # -- init ------------------------------------------------------------------------------------
    template = law.hold(law.init(None, numerics=NUMPY), numerics=NUMPY).diagnostics
    keys = tuple(dict.fromkeys((*template, *ADAPTER_KEYS, *decides, "route_code", "hvp_route_code")))

    def init_fn(params: PyTree) -> TuneState:
        numerics = jax_numerics()
        base_state = base.init(params)
        law_state = _init_law(law, base_state, numerics)
        held = law.hold(law_state, numerics=numerics)
        initial = {k: math.nan for k in keys}
        initial.update(probed=0.0, fallback=0.0, skipped=0.0, route_code=0.0, hvp_route_code=0.0)
        values = [jnp.asarray(held.lr if k == "lr" else getattr(law_state, k) if k in decides else initial[k],
                              dtype=numerics.dtype) for k in keys]
        return TuneState(
            base_state=base_state,
            law_state=law_state,
            count=jnp.zeros((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
            fallbacks=jnp.zeros((), jnp.int32),
            reported_skips=jnp.zeros((), jnp.int32),
            eigenvector=_unit_random(params, seed) if needs_eigenvector else None,
            preconditioned_eigenvector=_unit_random(params, seed + 1) if needs_precond_eigenvector else None,
            previous_update=jax.tree.map(jnp.zeros_like, params) if needs_previous else None,
            diagnostics=Diagnostics(keys, jnp.stack(values), warn),
        )

    # -- update ----------------------------------------------------------------------------------
    def update_fn(
        updates: PyTree,
        state: TuneState,
        params: PyTree | None = None,
        *,
        value_fn: Callable[[PyTree], jax.Array] | None = None,
        value: jax.Array | None = None,
        **extra: Any,
    ) -> tuple[PyTree, TuneState]:
        if params is None:
            raise ValueError(f"{owner}: update needs params (call opt.update(grads, state, params, value_fn=...))")
        needs_value_fn = bool(needs & _VALUE_FN_NEEDS) or sharpness_every is not None or (
            S.LOSS in needs and value is None)
        if needs_value_fn and value_fn is None:
            raise ValueError(f"{owner}: update needs value_fn=... (the loss on the current batch as a function of "
                             f"the parameters) for {law!r}" + (" and sharpness_every" if sharpness_every else ""))
        numerics = _law_numerics(state.law_state)
        ops = TreeOps(numerics)
        nan = numerics.scalar(math.nan)
        grads = updates
        u, base_state = base.update(grads, state.base_state, params, **extra)
        # Squared norms double as the finiteness test: a NaN or Inf entry makes them non-finite (so does a
        # squared norm beyond the float range, a diverged step that is best skipped too). One dot product per
        # tree instead of a separate isfinite reduction.
        grad_sq, update_sq = tree_dot(grads, grads, numerics.dtype), tree_dot(u, u, numerics.dtype)
        ok_inputs = jnp.isfinite(grad_sq) & jnp.isfinite(update_sq)
        if value is not None:
            ok_inputs = ok_inputs & jnp.isfinite(value)
        precond = precond_of(base_state) if needs_precond_eigenvector else None

        curvature_code, hvp_code = 0, 0
        if S.CURVATURE in needs:
            curvature_code = _route_code(resolve_curvature_route(value_fn, params, u, route))
        if needs & _SPECTRAL_NEEDS or sharpness_every is not None:
            hvp_code = _route_code(resolve_hvp_route(value_fn, params, hvp_route))

        # -- probe: the statistics the law needs, then law.update -------------------------------
        def probe(_: Any) -> tuple[LawOutput, Any, Any, Any, Any, Any, Any]:
            stats: dict[str, Any] = {}
            loss = None if value is None else jnp.asarray(value)
            eigvec, peigvec = state.eigenvector, state.preconditioned_eigenvector
            if S.GRAD_DOT_UPDATE in needs:
                stats[S.GRAD_DOT_UPDATE] = tree_dot(grads, u, numerics.dtype)
            if S.CURVATURE in needs:
                result, _ = curvature(value_fn, params, u, route=ROUTE_NAMES[curvature_code], grads=grads)
                stats[S.CURVATURE] = result.value
                loss = result.loss if loss is None else loss
            if S.LOSS in needs:
                loss = value_fn(params) if loss is None else loss
                stats[S.LOSS] = loss
            if S.GRAD_NORM_SQ in needs:
                stats[S.GRAD_NORM_SQ] = grad_sq
            ok_here = ok_inputs if loss is None else ok_inputs & jnp.isfinite(loss)
            if needs & _SPECTRAL_NEEDS:
                route_name = ROUTE_NAMES[hvp_code]
                if needs & {S.SHARPNESS, S.TOP_EIGENVALUES}:
                    matvec, _ = hessian_operator(value_fn, params, route=route_name, grads=grads, ops=ops)
                    found_vec, found = _spectral(law, matvec, eigvec, ops, preconditioned=False)
                    eigvec = tree_select(ok_here, found_vec, eigvec)  # a bad step keeps the warm start
                    stats.update(found)
                if needs & _PRECONDITIONED_NEEDS:
                    matvec, _ = hessian_operator(value_fn, params, route=route_name, grads=grads, precond=precond,
                                                 ops=ops)
                    found_vec, found = _spectral(law, matvec, peigvec, ops, preconditioned=True)
                    peigvec = tree_select(ok_here, found_vec, peigvec)
                    stats.update(found)
            if S.TRIAL_LOSS in needs:
                stats[S.TRIAL_LOSS] = lambda eta: value_fn(jax.tree.map(
                    lambda w, d: w + jnp.asarray(eta).astype(jnp.result_type(w)) * d.astype(jnp.result_type(w)),
                    params, u))
            if S.GRAD_PREV_UPDATE_COSINE in needs:
                stats[S.GRAD_PREV_UPDATE_COSINE] = _cosine(grads, state.previous_update, grad_sq, numerics)
            out = law.update(state.law_state, stats, numerics=numerics)
            skipped_through = state.skipped + (~ok_here).astype(jnp.int32)  # skips up to this probe, this one too
            fell_back = ok_here & (out.diagnostics["fallback"] > 0) if needs else jnp.asarray(False)
            if warn == "jit":  # raised here, on probe steps only, so that a hold step carries no host callback
                unreported = skipped_through - state.reported_skips
                lax.cond((unreported > 0) | fell_back,
                         lambda: jax.debug.callback(_warn, state.count, unreported, fell_back), lambda: None)
            loss_out = nan if loss is None else numerics.scalar(loss)
            return out, loss_out, jnp.asarray(loss is not None), eigvec, peigvec, skipped_through, fell_back

        def hold(_: Any) -> tuple[LawOutput, Any, Any, Any, Any, Any, Any]:
            out = law.hold(state.law_state, numerics=numerics)
            loss = nan if value is None else numerics.scalar(value)
            return (out, loss, jnp.asarray(value is not None), state.eigenvector, state.preconditioned_eigenvector,
                    state.reported_skips, jnp.asarray(False))

        if probe_every == 1:
            out, loss, loss_known, eigvec, peigvec, reported, fell_back = probe(None)
        else:
            out, loss, loss_known, eigvec, peigvec, reported, fell_back = lax.cond(
                state.count % probe_every == 0, probe, hold, None)
        ok = ok_inputs & (~loss_known | jnp.isfinite(loss))
        lr = out.lr

        # -- sharpness tracking -----------------------------------------------------------------
        sharp, psharp, iterations = nan, nan, nan
        if sharpness_every is not None:
            def measure(carry: tuple[Any, Any]) -> tuple[Any, Any, Any, Any, Any]:
                v, pv = carry
                matvec, _ = hessian_operator(value_fn, params, route=ROUTE_NAMES[hvp_code], grads=grads, ops=ops)
                top = top_eigenvalue(matvec, v, tol=sharpness_tol, max_iters=sharpness_iters, ops=ops)
                v = tree_select(ok, top.eigenvector, v)
                used = numerics.scalar(top.iterations)
                if pv is None:
                    return top.eigenvalue, nan, used, v, pv
                pmatvec, _ = hessian_operator(value_fn, params, route=ROUTE_NAMES[hvp_code], grads=grads,
                                              precond=precond, ops=ops)
                ptop = top_eigenvalue(pmatvec, pv, tol=sharpness_tol, max_iters=sharpness_iters, ops=ops)
                return top.eigenvalue, ptop.eigenvalue, used, v, tree_select(ok, ptop.eigenvector, pv)

            def skip(carry: tuple[Any, Any]) -> tuple[Any, Any, Any, Any, Any]:
                return nan, nan, nan, carry[0], carry[1]

            if sharpness_every == 1:
                sharp, psharp, iterations, eigvec, peigvec = measure((eigvec, peigvec))
            else:
                sharp, psharp, iterations, eigvec, peigvec = lax.cond(state.count % sharpness_every == 0, measure,
                                                                      skip, (eigvec, peigvec))
            sharp, psharp = numerics.scalar(sharp), numerics.scalar(psharp)

        # -- apply what the law decided ----------------------------------------------------------
        if decides:
            names = knobs.resolve_names(base_state, decides)
            base_state = knobs.write(base_state, {names[k]: out.hyperparams[k] for k in decides if names[k]})
        new_updates = jax.tree.map(lambda d: jnp.where(ok, jnp.asarray(lr).astype(d.dtype) * d, 0).astype(d.dtype), u)

        # -- diagnostics: one vector, so that keeping or replacing them is one select -------------
        diag = {k: numerics.scalar(v) for k, v in out.diagnostics.items()}
        diag.update(loss=loss, grad_norm=grad_sq ** 0.5, update_norm=update_sq ** 0.5, skipped=numerics.scalar(0.0),
                    route_code=numerics.scalar(curvature_code), hvp_route_code=numerics.scalar(hvp_code))
        for key in ("numerator", "denominator"):
            diag[key] = numerics.scalar(out.diagnostics.get(key, nan))
        law_sharpness = numerics.scalar(out.diagnostics.get("sharpness", out.diagnostics.get("lambda_1", nan)))
        diag["sharpness"] = jnp.where(jnp.isnan(sharp), law_sharpness, sharp)
        diag["lr_sharpness"] = numerics.scalar(lr) * diag["sharpness"]
        diag["preconditioned_sharpness"] = psharp
        diag["power_iterations"] = numerics.scalar(iterations)
        diag.update({name: numerics.scalar(out.hyperparams[name]) for name in decides})
        measured = jnp.stack([diag[k] for k in keys])
        kept = state.diagnostics.values.at[keys.index("skipped")].set(1.0)

        # -- a step with non-finite input leaves everything as it was ----------------------------------
        new_state = TuneState(
            base_state=tree_select(ok, base_state, state.base_state),
            law_state=tree_select(ok, out.state, state.law_state),
            count=state.count + ok.astype(jnp.int32),
            skipped=state.skipped + (~ok).astype(jnp.int32),
            fallbacks=state.fallbacks + (ok & fell_back).astype(jnp.int32),
            reported_skips=reported,
            eigenvector=eigvec,  # already guarded where it was measured
            preconditioned_eigenvector=peigvec,
            previous_update=tree_select(ok, u, state.previous_update) if needs_previous else None,
            diagnostics=Diagnostics(keys, jnp.where(ok, measured, kept), warn),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _cosine(grads: PyTree, previous: PyTree, grad_sq: jax.Array, numerics: Numerics) -> jax.Array:
    """cos(g_t, u_{t-1}); 0 when either vector is zero (the first step)."""
    dot = tree_dot(grads, previous, numerics.dtype)
    norms = grad_sq ** 0.5 * tree_dot(previous, previous, numerics.dtype) ** 0.5
    return jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), numerics.scalar(0.0))


def _spectral(law: Law, matvec: Callable[[PyTree], PyTree], v0: PyTree, ops: TreeOps, *, preconditioned: bool
              ) -> tuple[PyTree, dict[str, Any]]:
    """The eigenvalue statistics ``law`` needs on ``matvec`` and the new warm-start vector."""
    sharp_key = S.PRECONDITIONED_SHARPNESS if preconditioned else S.SHARPNESS
    top_key = S.PRECONDITIONED_TOP_EIGENVALUES if preconditioned else S.TOP_EIGENVALUES
    stats: dict[str, Any] = {}
    if sharp_key in law.needs:
        result = top_eigenvalue(matvec, v0, tol=float(getattr(law, "power_tol", 1e-3)),
                                max_iters=int(getattr(law, "power_iters", 20)), ops=ops)
        stats[sharp_key] = result.eigenvalue
        v0 = result.eigenvector
    if top_key in law.needs:
        result = top_eigenvalues(matvec, v0, int(getattr(law, "num_eigenvalues", 1)),
                                 num_steps=getattr(law, "lanczos_steps", None), ops=ops)
        stats[top_key] = result.eigenvalues
        v0 = result.eigenvectors[0]
    return v0, stats


def _synthetic_state(base: optax.GradientTransformation) -> Any:
    """``base.init`` of a small float32 vector, or None when the base needs the real parameter structure
    (``optax.masked``, ``optax.multi_transform``, ...); then the checks of :func:`_init_law` run at ``init``."""
    try:
        return base.init(jnp.zeros((4,), jnp.float32))
    except Exception:  # noqa: BLE001 - any failure means "checked at init instead"
        return None


def _init_law(law: Law, base_state: Any, numerics: Numerics) -> Any:
    """The law's initial state; for a law that decides hyperparameters, seeded with the base's values."""
    decides = tuple(law.decides)
    if not decides:
        return law.init(None, numerics=numerics)
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
            continue
        if knobs.is_scheduled(base_state, key):
            raise ValueError(f"{owner}: the base's {key} is a schedule; the law sets {name} itself, pass a number")
        values[name] = knobs.read(base_state, key)
    try:
        concrete = {k: float(v) for k, v in values.items()}
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
        concrete = None
    if concrete is not None:
        return law.init(None, hyperparams=concrete, numerics=numerics)
    state = law.init(None, numerics=numerics)  # traced init: validation was done at construction
    return state._replace(**{k: jnp.array(v, dtype=numerics.dtype, copy=True) for k, v in values.items()})


def find_tune_state(state: Any) -> TuneState:
    """The :class:`TuneState` in an optax state: ``state`` itself, or the one inside a chain or wrapper
    (``optax.chain`` tuples, ``optax.named_chain`` dicts, ``optax.apply_if_finite`` / ``inject_hyperparams``
    NamedTuples). Raises ValueError when there is none or more than one."""
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
        raise ValueError(f"diagnostics: expected one TuneState (the state of a tune(...) transformation) in the "
                         f"optimizer state, found {len(found)}")
    return found[0]


def diagnostics(state: Any) -> dict[str, float | int | str]:
    """The last step's diagnostics as host values.

    ``state`` is the state of a :func:`tune` transformation, or any optax state that holds exactly one
    (see :func:`find_tune_state`).

    Keys: ``lr`` (the rate applied to the last step), ``probed``, ``fallback`` and the law's own
    measurements (CDAT: ``numerator``, ``denominator`` and their EMAs; DCAO: ``lambda_1``, ``lambda_2``,
    ``gap``), the other hyperparameters the law decides (DCAO: ``momentum``, ``weight_decay``),
    ``loss`` (when known: the ``value`` argument or computed by the oracle), ``grad_norm`` and
    ``update_norm`` (of ``u``, the update for lr = 1; every step), ``sharpness``, ``lr_sharpness``
    (lr * sharpness, 2 at the edge), ``preconditioned_sharpness``, ``power_iterations`` (Hessian-vector
    products the last ``sharpness_every`` estimate of lambda_max(H) used), ``skipped`` (1 when the last step was
    skipped; the other values are then the previous step's), ``route`` / ``hvp_route`` (the oracles
    used, ``none`` when not needed), ``step`` (steps taken), ``skipped_steps`` and ``fallback_steps``
    (cumulative counts of skipped steps and of probe steps where the law kept its last learning rate). NaN
    marks a value not measured on the last step.

    For a transformation built with ``warn=True`` (the default) this is where the warnings are raised: a
    RuntimeWarning when the last step was skipped, or else when the law fell back on it, with the cumulative
    counts in the message (:func:`warn_bad_steps`). ``warn="jit"`` (warned inside ``jit`` already) and
    ``warn=False`` read silently.
    """
    state = find_tune_state(state)
    values = np.asarray(jax.device_get(state.diagnostics.values), dtype=np.float64)
    host = dict(zip(state.diagnostics.keys, values.tolist(), strict=True))
    out: dict[str, float | int | str] = {k: float(v) for k, v in host.items() if not k.endswith("_code")}
    out["route"] = ROUTE_NAMES[int(host["route_code"])]
    out["hvp_route"] = ROUTE_NAMES[int(host["hvp_route_code"])]
    out["step"] = int(jax.device_get(state.count))
    out["skipped_steps"] = int(jax.device_get(state.skipped))
    out["fallback_steps"] = int(jax.device_get(state.fallbacks))
    if state.diagnostics.warn is True:
        warn_bad_steps(out, stacklevel=2)
    return out
