r"""The diagonal preconditioner P of an adaptive optax optimizer (Adam, RMSProp), read from its state.

For Adam (`optax.scale_by_adam`, non-Nesterov) the update for learning rate 1 is

$$
u_t = -\frac{\hat m_t}{\sqrt{\hat\nu_t + \epsilon_{\rm root}} + \epsilon}
    = -P_t^{-1} m_t, \qquad
P_t = (1 - \beta_1^t)\,\big(\sqrt{\nu_t / (1 - \beta_2^t) + \epsilon_{\rm root}} + \epsilon\big),
$$

so $P$ includes the first-moment bias correction and the step is exactly $\eta P^{-1} m$. For
RMSProp (`optax.scale_by_rms`) $u_t = -P_t^{-1} g_t$ with $P_t = \sqrt{\hat\nu_t + \epsilon}$
(`eps_in_sqrt=True`, optax's default) or $\sqrt{\hat\nu_t} + \epsilon$. The preconditioned
Hessian $P^{-1/2} H P^{-1/2}$ has the spectrum of $P^{-1} H$; its top eigenvalue defines the
adaptive edge of stability (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"; CDAT paper,
Roulet et al. 2024, appendix B.1).

`b1`, `b2`, `eps` (`decay` and `eps` for RMSProp) live in the optimizer's closure, not its
state. When the base is built with `optax.inject_hyperparams` they are read from the state at
every step (so a DCAO-adapted `b1` is honoured); otherwise they come from the spec object.
`identify` builds it from the optimizer on a synthetic parameter vector: the closure's values are
fitted from the state and the update of one step (`optax.adam(1.0, b2=0.95)` is recognised), and the
spec must then reproduce the step ($P \odot (-u) = \eta\, m$ on every entry); a base it does not match is
refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

_INJECT_STATES = tuple(
    cls for cls in (getattr(optax, "InjectStatefulHyperparamsState", None),
                    getattr(optax, "InjectHyperparamsState", None))
    if cls is not None
)
_RMS_STATES = (optax.ScaleByRmsState, getattr(optax, "ScaleByRmsWithCountState", optax.ScaleByRmsState))


def walk_states(node: Any, hyperparams: dict[str, Any] | None = None) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Walk an optax state depth-first: every sub-state with the injected hyperparameters that enclose it.

    Args:
        node: an optax state (chains are tuples, `optax.named_chain` dicts, wrappers NamedTuples).
        hyperparams: the hyperparameters injected around `node` (None: none).

    Yields:
        `(sub_state, hyperparams)` for `node` itself and every state nested in it, `hyperparams` merging the
        `hyperparams` of every `optax.inject_hyperparams` state on the way (inner ones win).
    """
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
    r"""$P$ of `optax.scale_by_adam` (Adam, AdamW, ...), read from its state.

    $P_t = (1 - \beta_1^t) (\sqrt{\hat\nu_t + \epsilon_{\rm root}} + \epsilon)$ with
    $\hat\nu_t = \nu_t / (1 - \beta_2^t)$. Called on the `ScaleByAdamState` (`spec(state, hyperparams)`), it returns $P$
    as a pytree like the parameters. Values injected through `optax.inject_hyperparams` (`b1`, `b2`, `eps`, `eps_root`)
    override the fields at every step.

    Attributes:
        b1: $\beta_1$, the first moment's decay (only in the bias correction $1 - \beta_1^t$).
        b2: $\beta_2$, the second moment's decay ($\hat\nu_t = \nu_t / (1 - \beta_2^t)$).
        eps: $\epsilon$, added outside the square root.
        eps_root: $\epsilon_{\rm root}$, added inside the square root.
    """

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 0.0

    kind = "adam"

    def matches(self, state: Any) -> bool:
        """Whether `state` is the state this spec reads (an `optax.ScaleByAdamState`)."""
        return isinstance(state, optax.ScaleByAdamState)

    def __call__(self, state: Any, hyperparams: dict[str, Any] | None = None) -> PyTree:
        r"""$P_t$ from an Adam state.

        Args:
            state: the `optax.ScaleByAdamState` after the step (`count` $= t$, `nu` $= \nu_t$).
            hyperparams: injected values of `b1`, `b2`, `eps`, `eps_root` (they override the fields).

        Returns:
            $P_t$, a pytree like `state.nu` (each leaf in its dtype).
        """
        hp = {**self._asdict(), **{k: v for k, v in (hyperparams or {}).items() if k in self._fields}}

        def leaf(nu: jax.Array) -> jax.Array:
            dtype = jnp.result_type(nu)
            nu_hat = nu / (1.0 - _power(hp["b2"], state.count, dtype))
            denom = jnp.sqrt(nu_hat + jnp.asarray(hp["eps_root"], dtype)) + jnp.asarray(hp["eps"], dtype)
            return (1.0 - _power(hp["b1"], state.count, dtype)) * denom

        return jax.tree.map(leaf, state.nu)

    def first_moment(self, state: Any, grads: PyTree) -> PyTree:
        """The moment $m$ the update divides by $P$: Adam's first moment `state.mu` (`grads` is not used)."""
        return state.mu


class RmsPreconditioner(NamedTuple):
    r"""$P$ of `optax.scale_by_rms` (RMSProp): $\sqrt{\hat\nu_t + \epsilon}$ or $\sqrt{\hat\nu_t} + \epsilon$.

    $\hat\nu_t = \nu_t / (1 - \text{decay}^t)$ is bias-corrected when the state counts steps
    (`bias_correction=True`), else $\nu_t$. Values injected through `optax.inject_hyperparams` (`decay`, `eps`)
    override the fields.

    Attributes:
        decay: the second moment's decay.
        eps: $\epsilon$.
        eps_in_sqrt: $\epsilon$ inside the square root (optax's default) or outside it.
    """

    decay: float = 0.9
    eps: float = 1e-8
    eps_in_sqrt: bool = True

    kind = "rms"

    def matches(self, state: Any) -> bool:
        """Whether `state` is the state this spec reads (`optax.ScaleByRmsState`, with or without a count)."""
        return isinstance(state, _RMS_STATES)

    def __call__(self, state: Any, hyperparams: dict[str, Any] | None = None) -> PyTree:
        r"""$P_t$ from an RMSProp state.

        Args:
            state: the `optax.ScaleByRmsState` after the step (its `count`, when it has one, bias-corrects $\nu$).
            hyperparams: injected values of `decay` and `eps` (they override the fields).

        Returns:
            $P_t$, a pytree like `state.nu` (each leaf in its dtype).
        """
        hp = {**self._asdict(), **{k: v for k, v in (hyperparams or {}).items() if k in ("decay", "eps")}}
        count = state.count if "count" in state._fields else None

        def leaf(nu: jax.Array) -> jax.Array:
            dtype = jnp.result_type(nu)
            nu_hat = nu if count is None else nu / (1.0 - _power(hp["decay"], count, dtype))
            eps = jnp.asarray(hp["eps"], dtype)
            return jnp.sqrt(nu_hat + eps) if self.eps_in_sqrt else jnp.sqrt(nu_hat) + eps

        return jax.tree.map(leaf, state.nu)

    def first_moment(self, state: Any, grads: PyTree) -> PyTree:
        """The vector the update divides by $P$: the gradient `grads` itself (RMSProp keeps no first moment)."""
        return grads


Spec = AdamPreconditioner | RmsPreconditioner
CANDIDATES: tuple[Spec, ...] = (AdamPreconditioner(), RmsPreconditioner(), RmsPreconditioner(eps_in_sqrt=False))


def find_preconditioner(base_state: Any, spec: Spec) -> PyTree:
    """The preconditioner $P$ of a base optimizer's state.

    Args:
        base_state: the base optimizer's state *after* the step, so that $u = -P^{-1} m$ for that step.
        spec: an [`AdamPreconditioner`][eos_core.adapters.jax.AdamPreconditioner] or
            [`RmsPreconditioner`][eos_core.adapters.jax.RmsPreconditioner]; injected hyperparameters enclosing the
            sub-state override its fields.

    Returns:
        $P$, a pytree like the parameters with positive entries.

    Raises:
        ValueError: `base_state` holds no sub-state `spec` applies to, or more than one.
    """
    found = [(s, hp) for s, hp in walk_states(base_state) if spec.matches(s)]
    if len(found) != 1:
        raise ValueError(f"preconditioner: expected one {spec.kind} state in the base optimizer's state, "
                         f"found {len(found)}")
    state, hyperparams = found[0]
    return spec(state, hyperparams)


def has_adaptive_state(base_state: Any) -> bool:
    """Whether an optax state holds an Adam or RMSProp second moment.

    Args:
        base_state: the base optimizer's state.

    Returns:
        True when some sub-state is an `optax.ScaleByAdamState` or `optax.ScaleByRmsState`.
    """
    return any(spec.matches(s) for s, _ in walk_states(base_state) for spec in CANDIDATES[:2])


def _synthetic() -> tuple[jax.Array, jax.Array]:
    magnitudes = jnp.logspace(-9.0, 0.0, 28, dtype=jnp.float32)
    signs = jnp.where(jnp.arange(28) % 2 == 0, 1.0, -1.0).astype(jnp.float32)
    return jnp.zeros((28,), jnp.float32), magnitudes * signs


#: Synthetic steps `identify` may take until the base's update is nonzero everywhere (a learning-rate
#: warm-up that starts at 0, for `tune(base, None)` whose base carries its own learning rate).
SYNTHETIC_STEPS = 8
#: Relative precision of a moment's decay read from the float32 state (b1, b2, decay) and of an `eps` fitted from
#: the update (a difference of float32 ratios)
_EXACT, _FITTED = 1e-7, 1e-5


def _snap(value: Any, rtol: float) -> float:
    """The decimal with the fewest significant digits within `rtol` of `value`.

    0.9 for the float32 nearest 0.9: the synthetic step runs in float32, so a fitted hyperparameter is exact to
    about that precision and most likely the literal the user wrote.

    Returns:
        That decimal as a float; `value` itself when no rounding to 1-17 significant digits is within `rtol`.
    """
    value = float(value)
    for digits in range(1, 18):
        rounded = float(f"{value:.{digits - 1}e}")
        if abs(rounded - value) <= rtol * abs(value):
            return rounded
    return value


def _flat(tree: PyTree) -> np.ndarray:
    return np.concatenate([np.asarray(leaf, np.float64).reshape(-1) for leaf in jax.tree.leaves(tree)])


def _fit(spec: Spec, first: Any, last: Any, grads: jax.Array, updates: jax.Array, *, scaled: bool
         ) -> tuple[Spec, float] | None:
    r"""`spec` with the hyperparameters of the base fitted from the synthetic run, and the learning rate.

    With the same gradient `g` at every synthetic step from a zero state, the first step leaves
    `mu = (1 - b1) g` and `nu = (1 - b2) g^2` (RMSProp: `nu = (1 - decay) g^2`), which give `b1` and `b2`
    (`decay`) on the largest entry. `eps` enters only the update: with `r_i = m_i / (-u_i) = P_i(eps) / lr`
    and `P` affine in `eps` (Adam, RMSProp with `eps` outside the root; `P^2` affine for `eps` inside
    it), the largest and the smallest entries give `eps` (with `lr = 1`, or `lr` too when `scaled`). Values
    injected with `optax.inject_hyperparams` are read instead of fitted. Whether the fitted `spec` is the base's
    preconditioner is for the caller to check, on every entry.

    Returns:
        `(spec, lr)`, or None when `last` holds no state `spec` applies to or the fit is degenerate.
    """
    found = [(s, hp) for s, hp in walk_states(last) if spec.matches(s)]
    before = [s for s, _ in walk_states(first) if spec.matches(s)]
    if len(found) != 1 or len(before) != 1:
        return None
    sub, hyperparams = found[0]
    g = _flat(grads)
    top, bottom = int(np.argmax(np.abs(g))), int(np.argmin(np.abs(g)))
    values: dict[str, float] = {}
    moments = (("b1", "mu", 1), ("b2", "nu", 2)) if isinstance(spec, AdamPreconditioner) else (("decay", "nu", 2),)
    for name, field, power in moments:
        if name in hyperparams:
            values[name] = _snap(np.asarray(hyperparams[name]), _EXACT)
        else:
            moment = _flat(getattr(before[0], field))[top]
            values[name] = _snap(1.0 - moment / g[top] ** power, _EXACT)
    spec = spec._replace(**values)
    moment = _flat(spec.first_moment(sub, grads))
    ratio = moment / -_flat(updates)  # r_i = P_i / lr
    square = isinstance(spec, RmsPreconditioner) and spec.eps_in_sqrt
    q0 = _flat(find_preconditioner(last, spec._replace(eps=0.0)))
    q1 = _flat(find_preconditioner(last, spec._replace(eps=1.0)))
    t = ratio
    if square:
        q0, q1, t = q0 * q0, q1 * q1, ratio * ratio
    dq = q1 - q0  # q(eps) = q0 + eps dq; t = q(eps) / s with s = lr (lr^2 for P^2)
    with np.errstate(all="ignore"):
        if "eps" in hyperparams:
            eps = float(np.asarray(hyperparams["eps"]))
            s = (q0[top] + eps * dq[top]) / t[top] if scaled else 1.0
        elif scaled:  # t_top s - eps dq_top = q0_top, t_bottom s - eps dq_bottom = q0_bottom
            system = np.array([[t[top], -dq[top]], [t[bottom], -dq[bottom]]])
            if not np.all(np.isfinite(system)) or abs(np.linalg.det(system)) == 0.0:
                return None
            s, eps = np.linalg.solve(system, np.array([q0[top], q0[bottom]]))
        else:
            s, eps = 1.0, (t[bottom] - q0[bottom]) / dq[bottom]
    if not (np.isfinite(s) and s > 0 and np.isfinite(eps)):
        return None
    lr = float(np.sqrt(s)) if square else float(s)
    return spec._replace(eps=_snap(max(float(eps), 0.0), _FITTED)), lr


def identify(
    base: optax.GradientTransformation, explicit: Spec | Callable[..., PyTree] | None = None, *,
    scaled: bool = False,
) -> tuple[Spec | Callable[..., PyTree] | None, str]:
    r"""Find the preconditioner spec of `base` and check it on a synthetic step.

    With parameters 0 (so decoupled weight decay adds nothing) and gradients spanning 1e-9..1 in magnitude,
    `base` is stepped (at most `SYNTHETIC_STEPS` times, until its update is nonzero everywhere). For each
    candidate (Adam, RMSProp with `eps` inside and outside the root) the hyperparameters hidden in the optimizer's
    closure (`b1`, `b2`, `eps`; `decay`, `eps`) are fitted from the state and the update (`_fit`;
    injected ones are read), and the candidate matches when $P \odot (-u) = \eta\, m$ (Adam: $m$ = `mu`;
    RMSProp: $m = g$) on every entry to a relative 1e-3, with $\eta = 1$ (the contract of a base with learning
    rate 1) or, when `scaled`, the fitted learning rate of the base (`tune(base, None)`, whose base carries its
    own).

    Args:
        base: the base optimizer.
        explicit: a spec or a callable `base_state -> P`, returned unchecked.
        scaled: the base's update includes its own learning rate.

    Returns:
        `(spec, reason)`: `spec` is `explicit` when given, else the matching candidate with the fitted
        hyperparameters, or None when the base cannot run on a synthetic vector, is not adaptive or matches no
        candidate; `reason` says which (`"given"`, `"identified"`, or why not).
    """
    if explicit is not None:
        return explicit, "given"
    params, grads = _synthetic()
    try:
        state = base.init(params)
        first = None
        for _ in range(SYNTHETIC_STEPS):
            updates, state = base.update(grads, state, params)
            first = state if first is None else first
            if bool(jnp.all(updates != 0)):
                break
    except Exception as exc:  # noqa: BLE001 - a base that needs the real parameter structure
        return None, f"the base optimizer could not be run on a synthetic parameter vector ({exc!r})"
    if not has_adaptive_state(state):
        return None, "the base optimizer has no Adam / RMSProp state (no preconditioner)"
    for candidate in CANDIDATES:
        fitted = _fit(candidate, first, state, grads, updates, scaled=scaled)
        if fitted is None:
            continue
        spec, lr = fitted
        precond = find_preconditioner(state, spec)
        sub = next(s for s, _ in walk_states(state) if spec.matches(s))
        moment = spec.first_moment(sub, grads)
        if bool(jnp.allclose(precond * (-updates), lr * moment, rtol=1e-3, atol=0.0)):
            return spec, "identified"
    return None, ("the base optimizer's step is not -P^{-1} m for Adam's or RMSProp's P (build it with "
                  "optax.inject_hyperparams or pass preconditioner=AdamPreconditioner(...)/RmsPreconditioner(...))")
