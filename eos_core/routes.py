"""Curvature routes: the ways an adapter measures u^T H u and H v, and the finite-difference step rule.

Route names are shared by every adapter, so a diagnostics `route` entry means the same thing in
PyTorch, JAX and Keras. Measured costs (multiples of one training step on an H100):
forward-over-forward is 4-11x in PyTorch but 1.2-2.1x in JAX; one extra gradient (one-sided finite
differences, reusing the step's gradient) costs 1.0-1.2x a step on GPT-2 and the JAX MLP, but 1.84x on the
PyTorch MLP and 3.31x on a ResNet-18.
"""

from __future__ import annotations

import math
from typing import Any

AUTO = "auto"
"""Let the adapter pick per model and dtype, falling back when an op cannot be differentiated twice."""

JVP_JVP = "jvp-jvp"
"""Forward-over-forward: d^2/dt^2 f(w + t u) by two nested Jacobian-vector products (the paper's route)."""

JVP_GRAD = "jvp-grad"
"""Forward-over-reverse: H u = jvp of the gradient along u."""

DOUBLE_BACKWARD = "double-backward"
"""Reverse-over-reverse: H u = grad of (grad f . u) (PyHessian's route)."""

FD_CENTRAL = "fd-central"
"""Central differences of gradients: H u ~ (g(w + h u) - g(w - h u)) / 2h, two extra gradients."""

FD_ONESIDED = "fd-onesided"
"""One-sided differences reusing the step's own gradient: H u ~ (g(w + h u) - g(w)) / h, one extra gradient."""

EXACT = (JVP_JVP, JVP_GRAD, DOUBLE_BACKWARD)
FINITE_DIFFERENCES = (FD_CENTRAL, FD_ONESIDED)
ALL = (AUTO, *EXACT, *FINITE_DIFFERENCES)


def validate_route(route: str, *, owner: str, supported: tuple[str, ...] = ALL) -> str:
    """Return `route` or raise ValueError naming the setting and the routes `owner` supports."""
    if route not in supported:
        raise ValueError(f"{owner}: unknown route {route!r}; choose one of {', '.join(supported)}")
    return route


def parameter_scale_along(abs_param_dot_abs_direction: Any, direction_norm: Any, *, xp: Any = None) -> Any:
    """`sum_i |w_i| |u_i| / ||u||`: the size of the parameters where `u` points.

    Dennis and Schnabel's `typx^T |u|` rule (Numerical Methods for Unconstrained Optimization, section
    5.6). It equals `||w||` when `|u|` is proportional to `|w|` and is much smaller when `u`
    concentrates on small weights, where a step sized by the whole vector's norm (on a transformer,
    dominated by the normalisation layers' unit gains) would reach far into the nonlinear range.

    Args:
        abs_param_dot_abs_direction: `sum_i |w_i| |u_i|`, reduced by the adapter.
        direction_norm: `||u||`.
        xp: array namespace (`numpy`, `jax.numpy`) for array inputs, traced ones included; None for
            Python floats.

    Returns:
        The scale (0 when `u = 0`).
    """
    if xp is None:
        return abs_param_dot_abs_direction / direction_norm if direction_norm > 0 else 0.0
    positive = direction_norm > 0
    return xp.where(positive, abs_param_dot_abs_direction / xp.where(positive, direction_norm, 1.0), 0.0)


def finite_difference_step(param_scale: Any, direction_norm: Any, eps: float, *, central: bool,
                           xp: Any = None) -> Any:
    """Step `h` for differencing gradients along a direction `u`.

    The perturbation `h u` is given the norm `eps**(1/2) * max(s, 1)` (one-sided) or `eps**(1/3) * max(s, 1)`
    (central), where `s` is the parameter scale along `u`
    ([`parameter_scale_along`][eos_core.routes.parameter_scale_along]), so that, coordinate by coordinate, it sits at
    the square (cube) root of the working precision relative to the parameters: the classical balance between
    truncation error (O(h) one-sided, O(h^2) central) and cancellation error (O(eps / h)). `eps` is the machine
    epsilon of the lowest precision the gradient is computed in (the autocast dtype under mixed precision). Every
    adapter uses this function (the JAX adapter passes `xp=jax.numpy` and traced reductions), so the `fd-*` routes
    agree across frameworks.

    Args:
        param_scale: `s`, from [`parameter_scale_along`][eos_core.routes.parameter_scale_along].
        direction_norm: `||u||`.
        eps: machine epsilon (a Python float).
        central: central (True) or one-sided (False) differences.
        xp: array namespace for array inputs (traced ones included); None for Python floats.

    Returns:
        `h`; 0 when the direction is zero or an input is not finite: there is nothing to difference.
    """
    root = eps ** (1.0 / 3.0) if central else math.sqrt(eps)
    if xp is None:
        if not (math.isfinite(param_scale) and math.isfinite(direction_norm) and direction_norm > 0):
            return 0.0
        return root * max(param_scale, 1.0) / direction_norm
    ok = xp.isfinite(param_scale) & xp.isfinite(direction_norm) & (direction_norm > 0)
    safe_norm = xp.where(ok, direction_norm, 1.0)
    return xp.where(ok, root * xp.maximum(xp.where(ok, param_scale, 1.0), 1.0) / safe_norm, 0.0)
