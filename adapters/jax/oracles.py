r"""Curvature oracles in JAX: $u^\top H u$ and $H v$ by every route of [`eos_core.routes`][].

`value_fn(params)` is the loss on the current batch; `H` its Hessian at `params`. Routes (names
from [`eos_core.routes`][]):

* `jvp-jvp` (forward-over-forward, the CDAT paper's route, appendix C.3):
  $u^\top H u = \partial(\partial f(\cdot)[u])(w)[u]$, two nested `jax.jvp`. The cheapest
  exact route in JAX (1.2-2.1x a training step, see [`eos_core.routes`][]) and the lowest in memory; it gives
  the scalar only, not $Hu$.
* `jvp-grad` (forward-over-reverse): $Hu = \partial(\nabla f)(w)[u]$.
* `double-backward` (reverse-over-reverse): $Hu = \nabla_w (\nabla f(w)^\top u)$.
* `fd-central`: $Hu \approx (\nabla f(w + hu) - \nabla f(w - hu)) / 2h$, two extra gradients.
* `fd-onesided`: $Hu \approx (\nabla f(w + hu) - g) / h$ reusing the step's gradient `g`,
  one extra gradient. `g` must be the gradient of `value_fn` at `params`.

The step $h$ is computed by the core's [`eos_core.routes.finite_difference_step`][] and
[`eos_core.routes.parameter_scale_along`][], traced with `xp=jax.numpy` (the PyTorch adapter calls the
same functions): $\|h u\| = \epsilon^{1/2} \max(s, 1)$ (one-sided) or $\epsilon^{1/3} \max(s, 1)$ (central), with
$s = \sum_i |w_i| |u_i| / \|u\|$ the parameter scale along $u$ and $\epsilon$ the machine epsilon of the
lowest-precision leaf, or `fd_eps` when given.

`auto` is resolved **at trace time**: each candidate route is traced abstractly (`jax.make_jaxpr`, no FLOPs) and
the first one that traces to an evaluable program is used. A `jax.custom_vjp` function has no forward mode, so
`jvp-jvp` and `jvp-grad` fail on it and `double-backward` is used; an operation that cannot be differentiated twice
at all (e.g. a `custom_vjp` whose backward pass is a `pure_callback`) ends in one-sided finite differences, which
need first derivatives only and reuse the step's gradient (one extra gradient, the cheapest route everywhere, and
the PyTorch adapter's last resort too).

Accuracy of the finite-difference routes with the core's step rule, relative to an exact route, on
the small MLP / conv net / attention block of the tests (float32): one-sided within 1e-3 on all
three; central within 1e-4 on the MLP and conv net but 5e-3 on the attention block, whose softmax and
layer norm make the O(h^2) truncation at `h ||u|| = eps^{1/3} ||w||` dominate. In float64 both are
within 1e-6.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from eos_core import routes
from eos_core.adapters.jax.tree_ops import (
    accumulation_dtype,
    tree_axpy,
    tree_dot,
    tree_norm,
)

PyTree = Any
ValueFn = Callable[[PyTree], jax.Array]

CURVATURE_AUTO_CHAIN: tuple[str, ...] = (routes.JVP_JVP, routes.JVP_GRAD, routes.DOUBLE_BACKWARD, routes.FD_ONESIDED)
"""Routes `auto` tries for u^T H u, in order (cheapest exact route in JAX first)."""

HVP_AUTO_CHAIN: tuple[str, ...] = (routes.JVP_GRAD, routes.DOUBLE_BACKWARD, routes.FD_ONESIDED)
"""Routes `auto` tries for H v (spectral estimates), in order."""

HVP_ROUTES: tuple[str, ...] = (routes.JVP_GRAD, routes.DOUBLE_BACKWARD, *routes.FINITE_DIFFERENCES)
"""Routes that give the vector H v (`jvp-jvp` gives the scalar u^T H u only)."""


class CurvatureResult(NamedTuple):
    r"""What [`curvature`][eos_core.adapters.jax.curvature] measured: $u^\top H u$, and the loss when it came free."""

    value: jax.Array  #: u^T H u (a 0-d array, at least float32)
    loss: jax.Array | None  #: f(w), when the route computed it on the way (None otherwise)


class HvpResult(NamedTuple):
    """What [`hvp`][eos_core.adapters.jax.hvp] measured: $H v$, and the loss when it came free."""

    product: PyTree  #: H v, shaped like the parameters
    loss: jax.Array | None  #: f(w), when the route computed it on the way


def _like(tangent: PyTree, params: PyTree) -> PyTree:
    """`tangent` with each leaf cast to the dtype of the matching parameter (jvp needs equal dtypes)."""
    return jax.tree.map(lambda t, p: jnp.asarray(t).astype(jnp.result_type(p)), tangent, params)


def lowest_precision_eps(params: PyTree) -> float:
    """Machine epsilon of the lowest-precision floating leaf of `params`.

    Args:
        params: a pytree of arrays (concrete or traced: only dtypes are read).

    Returns:
        The largest `finfo(dtype).eps` over the floating leaves (bfloat16: 2**-7, float16: 2**-10, float32:
        2**-23, float64: 2**-52); float32's when no leaf is floating.
    """
    eps = [float(jnp.finfo(jnp.result_type(p)).eps) for p in jax.tree.leaves(params)
           if jnp.issubdtype(jnp.result_type(p), jnp.floating)]
    return max(eps) if eps else float(jnp.finfo(jnp.float32).eps)


def finite_difference_step(params: PyTree, direction: PyTree, *, central: bool, eps: float | None = None
                           ) -> jax.Array:
    r"""The step $h = r \max(s, 1) / \|u\|$ of [`eos_core.routes.finite_difference_step`][], traced.

    $s = \sum_i |w_i| |u_i| / \|u\|$ is the parameter scale along $u$
    ([`eos_core.routes.parameter_scale_along`][]; Dennis and Schnabel, Numerical Methods for Unconstrained
    Optimization, section 5.6) and $r = \epsilon^{1/2}$ (one-sided) or $\epsilon^{1/3}$ (central); both core
    functions are called with `xp=jax.numpy` on the traced reductions, so the rule is the PyTorch adapter's.

    Args:
        params: the parameters $w$.
        direction: the direction $u$ (a pytree like `params`).
        central: central (True) or one-sided (False) differences.
        eps: machine epsilon the step is sized for (the `fd_eps` option); None: that of the
            lowest-precision leaf of `params` (`lowest_precision_eps`).

    Returns:
        $h$ as a 0-d array of at least float32; 0 when $u = 0$ or a reduction is not finite.
    """
    eps = lowest_precision_eps(params) if eps is None else float(eps)
    u_norm = tree_norm(direction)
    weighted = tree_dot(jax.tree.map(jnp.abs, params), jax.tree.map(jnp.abs, direction))
    acc = jnp.result_type(weighted, u_norm)
    scale = routes.parameter_scale_along(weighted, u_norm, xp=jnp)
    return jnp.asarray(routes.finite_difference_step(scale, u_norm, eps, central=central, xp=jnp)).astype(acc)


def _grad(value_fn: ValueFn, params: PyTree) -> PyTree:
    return jax.grad(value_fn)(params)


def _fd_gradient_difference(
    value_fn: ValueFn, params: PyTree, direction: PyTree, grads: PyTree | None, *, central: bool,
    eps: float | None = None,
) -> PyTree:
    """(g(w + h d) - g(w - h d)) / 2h, or (g(w + h d) - g) / h, leafwise in at least float32."""
    h = finite_difference_step(params, direction, central=central, eps=eps)
    plus = _grad(value_fn, tree_axpy(h, direction, params))
    if central:
        minus = _grad(value_fn, tree_axpy(-h, direction, params))
        denom = 2.0 * h
    else:
        minus = _grad(value_fn, params) if grads is None else grads
        denom = h
    safe = jnp.where(denom > 0, denom, 1.0)

    def diff(a: jax.Array, b: jax.Array, p: jax.Array) -> jax.Array:
        acc = accumulation_dtype(jnp.result_type(a, b))
        out = (a.astype(acc) - b.astype(acc)) / safe.astype(acc)
        return jnp.where(denom > 0, out, 0.0).astype(jnp.result_type(p))

    return jax.tree.map(diff, plus, minus, params)


# -- H v -------------------------------------------------------------------------------------------
def _hvp_jvp_grad(value_fn: ValueFn, params: PyTree, v: PyTree, grads: PyTree | None,
                  eps: float | None = None) -> HvpResult:
    (loss, _), (_, product) = jax.jvp(jax.value_and_grad(value_fn), (params,), (_like(v, params),))
    return HvpResult(product, loss)


def _hvp_double_backward(value_fn: ValueFn, params: PyTree, v: PyTree, grads: PyTree | None,
                         eps: float | None = None) -> HvpResult:
    v = _like(v, params)

    def grad_dot_v(w: PyTree) -> tuple[jax.Array, jax.Array]:
        loss, g = jax.value_and_grad(value_fn)(w)
        return tree_dot(g, v), loss

    product, loss = jax.grad(grad_dot_v, has_aux=True)(params)
    return HvpResult(product, loss)


def _hvp_fd(central: bool) -> Callable[..., HvpResult]:
    def impl(value_fn: ValueFn, params: PyTree, v: PyTree, grads: PyTree | None,
             eps: float | None = None) -> HvpResult:
        product = _fd_gradient_difference(value_fn, params, _like(v, params), grads, central=central, eps=eps)
        return HvpResult(product, None)

    return impl


_HVP = {
    routes.JVP_GRAD: _hvp_jvp_grad,
    routes.DOUBLE_BACKWARD: _hvp_double_backward,
    routes.FD_CENTRAL: _hvp_fd(True),
    routes.FD_ONESIDED: _hvp_fd(False),
}


# -- u^T H u ---------------------------------------------------------------------------------------
def _curvature_jvp_jvp(value_fn: ValueFn, params: PyTree, u: PyTree, grads: PyTree | None,
                       eps: float | None = None) -> CurvatureResult:
    u = _like(u, params)

    def first(w: PyTree) -> tuple[jax.Array, jax.Array]:
        loss, directional = jax.jvp(value_fn, (w,), (u,))
        return directional, loss

    _, second, loss = jax.jvp(first, (params,), (u,), has_aux=True)
    return CurvatureResult(second.astype(accumulation_dtype(second.dtype)), loss)


def _curvature_from_hvp(route: str) -> Callable[..., CurvatureResult]:
    def impl(value_fn: ValueFn, params: PyTree, u: PyTree, grads: PyTree | None,
             eps: float | None = None) -> CurvatureResult:
        product, loss = _HVP[route](value_fn, params, u, grads, eps)
        return CurvatureResult(tree_dot(_like(u, params), product), loss)

    return impl


_CURVATURE = {
    routes.JVP_JVP: _curvature_jvp_jvp,
    **{route: _curvature_from_hvp(route) for route in HVP_ROUTES},
}


#: Primitives that trace but cannot be evaluated or lowered: `custom_lin` is what forward-mode
#: differentiation of a `jax.custom_vjp` function leaves behind (it can only be transposed).
_UNEVALUABLE = frozenset({"custom_lin"})


def _primitives(jaxpr: Any, found: set[str]) -> set[str]:
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else (param,):
                if hasattr(sub, "eqns"):
                    _primitives(sub, found)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    _primitives(sub.jaxpr, found)
    return found


def traces(fn: Callable[..., Any], *args: Any) -> None:
    """Trace `fn(*args)` abstractly (`jax.make_jaxpr`, no FLOPs) and check that JAX could evaluate it.

    How `auto` tells whether a route can be used: any exception of the trace propagates.

    Args:
        fn: the computation (a route's oracle applied to a loss).
        *args: its arguments (concrete or abstract arrays).

    Raises:
        TypeError: the traced program holds a primitive JAX can trace but not evaluate (`custom_lin`, what
            forward-mode differentiation of a `jax.custom_vjp` function leaves).
    """
    closed = jax.make_jaxpr(fn)(*args)
    bad = _primitives(closed.jaxpr, set()) & _UNEVALUABLE
    if bad:
        raise TypeError(f"the computation contains {sorted(bad)}: forward-mode differentiation of a custom_vjp "
                        "function, which JAX cannot evaluate")


def _first_route_that_traces(chain: tuple[str, ...], attempt: Callable[[str], Any]) -> str:
    error: Exception | None = None
    for route in chain:
        try:
            attempt(route)
        except Exception as exc:  # noqa: BLE001 - any trace-time failure means "this route cannot be used"
            error = exc
            continue
        return route
    assert error is not None
    raise error


def resolve_curvature_route(value_fn: ValueFn, params: PyTree, u: PyTree, route: str = routes.AUTO) -> str:
    """The route [`curvature`][eos_core.adapters.jax.curvature] uses for `value_fn` at `params` along `u`.

    Resolved at trace time: for `auto` each route of
    [`CURVATURE_AUTO_CHAIN`][eos_core.adapters.jax.CURVATURE_AUTO_CHAIN] is traced abstractly (`traces`, no FLOPs)
    and the first whose computation traces to an evaluable program is taken.

    Args:
        value_fn: the loss on the batch as a function of the parameters.
        params: the point $w$.
        u: the direction (a pytree like `params`).
        route: a route name of [`eos_core.routes`][].

    Returns:
        `route` itself, or for `auto` the first route of the chain that traces.

    Raises:
        ValueError: `route` is not a route name.
        Exception: with `auto`, the last route's trace error when no route traces.
    """
    routes.validate_route(route, owner="curvature")
    if route != routes.AUTO:
        return route
    return _first_route_that_traces(
        CURVATURE_AUTO_CHAIN, lambda r: traces(lambda p, d: _CURVATURE[r](value_fn, p, d, None), params, u)
    )


def resolve_hvp_route(value_fn: ValueFn, params: PyTree, route: str = routes.AUTO) -> str:
    r"""The route [`hvp`][eos_core.adapters.jax.hvp] uses for `value_fn` at `params`.

    Args:
        value_fn: the loss on the batch as a function of the parameters.
        params: the point $w$.
        route: a route name of [`eos_core.routes`][]; `jvp-jvp` gives $u^\top H u$ only, not $H v$, and is
            resolved as `auto`.

    Returns:
        `route` itself when it gives $H v$ (`jvp-grad`, `double-backward`, `fd-central`, `fd-onesided`), else the
        first route of [`HVP_AUTO_CHAIN`][eos_core.adapters.jax.HVP_AUTO_CHAIN] that traces (see
        [`resolve_curvature_route`][eos_core.adapters.jax.resolve_curvature_route]).

    Raises:
        ValueError: `route` is not a route name.
        Exception: with `auto` or `jvp-jvp`, the last route's trace error when no route traces.
    """
    routes.validate_route(route, owner="hvp")
    if route in HVP_ROUTES:
        return route
    return _first_route_that_traces(
        HVP_AUTO_CHAIN, lambda r: traces(lambda p: _HVP[r](value_fn, p, p, None), params)
    )


def curvature(
    value_fn: ValueFn, params: PyTree, u: PyTree, *, route: str = routes.AUTO, grads: PyTree | None = None,
    fd_eps: float | None = None,
) -> tuple[CurvatureResult, str]:
    r"""The second directional derivative $u^\top H u$ of `value_fn` at `params` along `u`.

    This is the CDAT denominator before its absolute value: $d_t = |u_t^\top H_t u_t| + \varepsilon$ (CDAT paper,
    Roulet et al. 2024, eq. 8).

    Args:
        value_fn: the loss on the batch as a function of the parameters.
        params: the point $w$.
        u: the direction (a pytree like `params`).
        route: a route of [`eos_core.routes`][] (`auto`: the first of
            [`CURVATURE_AUTO_CHAIN`][eos_core.adapters.jax.CURVATURE_AUTO_CHAIN] that traces).
        grads: the step's gradient $\nabla f(w)$, reused by `fd-onesided` (computed when not given).
        fd_eps: machine epsilon the finite-difference step is sized for (None: the lowest-precision leaf's).

    Returns:
        `(CurvatureResult(value, loss), route_used)`: `value` is $u^\top H u$ as a 0-d array of at least float32;
        `loss` is $f(w)$ when the route computed it anyway (every route but finite differences), else None.

    Raises:
        ValueError: `route` is not a route name.

    Examples:
        On $f(w) = \sum_i w_i^2$, whose Hessian is $2I$:

        >>> import jax.numpy as jnp
        >>> from eos_core.adapters.jax import curvature
        >>> def f(w):
        ...     return jnp.sum(w ** 2)
        >>> result, route = curvature(f, jnp.ones(3), jnp.array([1.0, 0.0, 2.0]))
        >>> float(result.value), route  # u^T (2 I) u = 2 * 5
        (10.0, 'jvp-jvp')
    """
    used = resolve_curvature_route(value_fn, params, u, route)
    return _CURVATURE[used](value_fn, params, u, grads, fd_eps), used


def hvp(
    value_fn: ValueFn, params: PyTree, v: PyTree, *, route: str = routes.AUTO, grads: PyTree | None = None,
    fd_eps: float | None = None,
) -> tuple[HvpResult, str]:
    r"""The Hessian-vector product $H v$ of `value_fn` at `params` (a pytree like `params`).

    Args:
        value_fn: the loss on the batch as a function of the parameters.
        params: the point $w$.
        v: the vector (a pytree like `params`).
        route: `jvp-grad`, `double-backward`, `fd-central`, `fd-onesided` (reusing `grads`); `auto` and `jvp-jvp`
            resolve through [`HVP_AUTO_CHAIN`][eos_core.adapters.jax.HVP_AUTO_CHAIN].
        grads: the step's gradient $\nabla f(w)$, reused by `fd-onesided` (computed when not given).
        fd_eps: machine epsilon the finite-difference step is sized for (None: the lowest-precision leaf's).

    Returns:
        `(HvpResult(product, loss), route_used)`: `product` is $H v$, a pytree like `params` with the parameters'
        dtypes; `loss` is $f(w)$ when the route computed it (`jvp-grad`, `double-backward`), else None.

    Raises:
        ValueError: `route` is not a route name.

    Examples:
        >>> import jax.numpy as jnp
        >>> from eos_core.adapters.jax import hvp
        >>> def f(w):
        ...     return jnp.sum(w ** 3)  # H = diag(6 w)
        >>> result, route = hvp(f, jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
        >>> result.product.tolist(), route
        ([6.0, 12.0], 'jvp-grad')
    """
    used = resolve_hvp_route(value_fn, params, route)
    return _HVP[used](value_fn, params, v, grads, fd_eps), used
