r"""The diagonal preconditioner P of an adaptive optax optimizer (Adam, RMSProp), read from its state.

For Adam (``optax.scale_by_adam``, non-Nesterov) the update for learning rate 1 is

.. math::

    u_t = -\frac{\hat m_t}{\sqrt{\hat\nu_t + \epsilon_{\rm root}} + \epsilon}
        = -P_t^{-1} m_t, \qquad
    P_t = (1 - \beta_1^t)\,\big(\sqrt{\nu_t / (1 - \beta_2^t) + \epsilon_{\rm root}} + \epsilon\big),

so P includes the first-moment bias correction and the step is exactly ``lr * P^{-1} m``. For
RMSProp (``optax.scale_by_rms``) :math:`u_t = -P_t^{-1} g_t` with :math:`P_t = \sqrt{\hat\nu_t + \epsilon}`
(``eps_in_sqrt=True``, optax's default) or :math:`\sqrt{\hat\nu_t} + \epsilon`. The preconditioned
Hessian :math:`P^{-1/2} H P^{-1/2}` has the spectrum of :math:`P^{-1} H`; its top eigenvalue defines the
adaptive edge of stability (Cohen et al. 2022; CDAT paper appendix B.1).

``b1``, ``b2``, ``eps`` (``decay`` and ``eps`` for RMSProp) live in the optimizer's closure, not its
state. When the base is built with ``optax.inject_hyperparams`` they are read from the state at
every step (so a DCAO-adapted ``b1`` is honoured); otherwise they come from the spec object, whose
defaults are optax's. :func:`identify` checks the spec against the optimizer once on a synthetic
parameter vector (``P * (-u) == m`` after one step) and refuses a base it does not match.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any

_INJECT_STATES = tuple(
    cls for cls in (getattr(optax, "InjectStatefulHyperparamsState", None),
                    getattr(optax, "InjectHyperparamsState", None))
    if cls is not None
)
_RMS_STATES = (optax.ScaleByRmsState, getattr(optax, "ScaleByRmsWithCountState", optax.ScaleByRmsState))


def walk_states(node: Any, hyperparams: dict[str, Any] | None = None) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Every sub-state of an optax state with the injected hyperparameters that enclose it."""
    hyperparams = {} if hyperparams is None else hyperparams
    yield node, hyperparams
    if _INJECT_STATES and isinstance(node, _INJECT_STATES):
        yield from walk_states(node.inner_state, {**hyperparams, **node.hyperparams})
        return
    if isinstance(node, dict):
        for child in node.values():
            yield from walk_states(child, hyperparams)
    elif isinstance(node, list | tuple):
        for child in node:
            yield from walk_states(child, hyperparams)


def _power(base: Any, count: Any, dtype: Any) -> jax.Array:
    return jnp.asarray(base, dtype) ** jnp.asarray(count).astype(dtype)


class AdamPreconditioner(NamedTuple):
    """P of ``optax.scale_by_adam`` (Adam, AdamW, ...): ``(1 - b1^t) (sqrt(nu_hat + eps_root) + eps)``.

    Values injected through ``optax.inject_hyperparams`` (``b1``, ``b2``, ``eps``, ``eps_root``)
    override the fields at every step.
    """

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 0.0

    kind = "adam"

    def matches(self, state: Any) -> bool:
        return isinstance(state, optax.ScaleByAdamState)

    def __call__(self, state: Any, hyperparams: dict[str, Any] | None = None) -> PyTree:
        hp = {**self._asdict(), **{k: v for k, v in (hyperparams or {}).items() if k in self._fields}}

        def leaf(nu: jax.Array) -> jax.Array:
            dtype = jnp.result_type(nu)
            nu_hat = nu / (1.0 - _power(hp["b2"], state.count, dtype))
            denom = jnp.sqrt(nu_hat + jnp.asarray(hp["eps_root"], dtype)) + jnp.asarray(hp["eps"], dtype)
            return (1.0 - _power(hp["b1"], state.count, dtype)) * denom

        return jax.tree.map(leaf, state.nu)

    def first_moment(self, state: Any, grads: PyTree) -> PyTree:
        return state.mu


class RmsPreconditioner(NamedTuple):
    """P of ``optax.scale_by_rms`` (RMSProp): ``sqrt(nu_hat + eps)`` or ``sqrt(nu_hat) + eps``.

    ``nu_hat`` is bias-corrected when the state counts steps (``bias_correction=True``). Values
    injected through ``optax.inject_hyperparams`` (``decay``, ``eps``) override the fields.
    """

    decay: float = 0.9
    eps: float = 1e-8
    eps_in_sqrt: bool = True

    kind = "rms"

    def matches(self, state: Any) -> bool:
        return isinstance(state, _RMS_STATES)

    def __call__(self, state: Any, hyperparams: dict[str, Any] | None = None) -> PyTree:
        hp = {**self._asdict(), **{k: v for k, v in (hyperparams or {}).items() if k in ("decay", "eps")}}
        count = state.count if "count" in state._fields else None

        def leaf(nu: jax.Array) -> jax.Array:
            dtype = jnp.result_type(nu)
            nu_hat = nu if count is None else nu / (1.0 - _power(hp["decay"], count, dtype))
            eps = jnp.asarray(hp["eps"], dtype)
            return jnp.sqrt(nu_hat + eps) if self.eps_in_sqrt else jnp.sqrt(nu_hat) + eps

        return jax.tree.map(leaf, state.nu)

    def first_moment(self, state: Any, grads: PyTree) -> PyTree:
        return grads


Spec = AdamPreconditioner | RmsPreconditioner
CANDIDATES: tuple[Spec, ...] = (AdamPreconditioner(), RmsPreconditioner(), RmsPreconditioner(eps_in_sqrt=False))


def find_preconditioner(base_state: Any, spec: Spec) -> PyTree:
    """P from ``base_state`` (the state *after* the step, so that ``u = -P^{-1} m``) for ``spec``.

    Raises ValueError when the state holds no, or more than one, sub-state ``spec`` applies to.
    """
    found = [(s, hp) for s, hp in walk_states(base_state) if spec.matches(s)]
    if len(found) != 1:
        raise ValueError(f"preconditioner: expected one {spec.kind} state in the base optimizer's state, "
                         f"found {len(found)}")
    state, hyperparams = found[0]
    return spec(state, hyperparams)


def has_adaptive_state(base_state: Any) -> bool:
    """Whether the state holds an Adam or RMSProp second moment."""
    return any(spec.matches(s) for s, _ in walk_states(base_state) for spec in CANDIDATES[:2])


def _synthetic() -> tuple[jax.Array, jax.Array]:
    magnitudes = jnp.logspace(-9.0, 0.0, 28, dtype=jnp.float32)
    signs = jnp.where(jnp.arange(28) % 2 == 0, 1.0, -1.0).astype(jnp.float32)
    return jnp.zeros((28,), jnp.float32), magnitudes * signs


def identify(
    base: optax.GradientTransformation, explicit: Spec | Callable[..., PyTree] | None = None
) -> tuple[Spec | Callable[..., PyTree] | None, str]:
    """Find the preconditioner spec of ``base`` and check it on one synthetic step.

    With parameters 0 (so decoupled weight decay adds nothing) and gradients spanning 1e-9..1 in
    magnitude, one step of ``base`` gives ``u`` and the new state; a spec matches when
    ``P * (-u) == m`` (Adam: ``m = mu``; RMSProp: ``m = g``) to 1e-3. Returns ``(spec, reason)``:
    ``spec`` is None when the base is not adaptive or no candidate matches, and ``reason`` says why.
    An ``explicit`` spec or callable is returned unchecked.
    """
    if explicit is not None:
        return explicit, "given"
    params, grads = _synthetic()
    try:
        state = base.init(params)
        updates, new_state = base.update(grads, state, params)
    except Exception as exc:  # noqa: BLE001 - a base that needs the real parameter structure
        return None, f"the base optimizer could not be run on a synthetic parameter vector ({exc!r})"
    if not has_adaptive_state(new_state):
        return None, "the base optimizer has no Adam / RMSProp state (no preconditioner)"
    for spec in CANDIDATES:
        try:
            precond = find_preconditioner(new_state, spec)
        except ValueError:
            continue
        sub = next(s for s, _ in walk_states(new_state) if spec.matches(s))
        moment = spec.first_moment(sub, grads)
        if bool(jnp.allclose(precond * (-updates), moment, rtol=1e-3, atol=0.0)):
            return spec, "identified"
    return None, ("the base optimizer's step is not -P^{-1} m for optax's default b1/b2/eps (build it with "
                  "optax.inject_hyperparams or pass preconditioner=AdamPreconditioner(...)/RmsPreconditioner(...))")
