"""Curvature oracles, pytree vector ops and spectral estimators against explicit Hessians (jax.hessian, eigh)."""

from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from eos_core import routes  # noqa: E402
from eos_core.adapters.jax import (  # noqa: E402
    AdamPreconditioner,
    RmsPreconditioner,
    TreeOps,
    curvature,
    find_preconditioner,
    finite_difference_step,
    hessian_operator,
    hvp,
    resolve_curvature_route,
    resolve_hvp_route,
    top_eigenvalue,
    top_eigenvalues,
)
from eos_core.adapters.jax.oracles import HVP_ROUTES  # noqa: E402
from eos_core.adapters.jax.preconditioner import identify  # noqa: E402

MODELS = ("mlp", "convnet", "attention")


def _direction(params, seed):
    w, unravel = ravel_pytree(params)
    return unravel(jnp.asarray(np.random.default_rng(seed).standard_normal(w.shape), w.dtype))


def _all_routes(loss, params, u, grads):
    """u^T H u and H u by every route, in one jitted program."""
    values = {r: curvature(loss, params, u, route=r, grads=grads)[0]
              for r in (*routes.EXACT, *routes.FINITE_DIFFERENCES)}
    products = {r: hvp(loss, params, u, route=r, grads=grads)[0].product for r in HVP_ROUTES}
    return values, products


@pytest.mark.parametrize("model", MODELS)
def test_every_route_matches_the_explicit_hessian_in_float64(x64, models, model):
    params, loss = getattr(models, model)()
    _, _, _, g, h = models.explicit(loss, params)
    u = _direction(params, 3)
    u_flat = np.asarray(ravel_pytree(u)[0])
    values, products = jax.jit(functools.partial(_all_routes, loss))(params, u, jax.grad(loss)(params))
    expected, expected_hu = float(u_flat @ h @ u_flat), np.asarray(h) @ u_flat
    for route, result in values.items():
        tol = 1e-8 if route in routes.EXACT else 1e-6
        assert abs(float(result.value) - expected) <= tol * abs(expected), (route, float(result.value), expected)
        if route in routes.EXACT:  # exact routes compute f(w) on the way
            assert float(result.loss) == pytest.approx(float(loss(params)), rel=1e-12)
        else:
            assert result.loss is None
    for route, product in products.items():
        tol = 1e-8 if route in routes.EXACT else 1e-6
        got = np.asarray(ravel_pytree(product)[0])
        assert np.linalg.norm(got - expected_hu) <= tol * np.linalg.norm(expected_hu), route
    for route in routes.ALL:
        used = resolve_curvature_route(loss, params, u, route)
        assert used == (routes.JVP_JVP if route == routes.AUTO else route)


# Finite differences with the core's step rule (h ||u|| = eps^(1/3) or eps^(1/2) times max(||w||, 1)) in
# float32, against the exact float64 value: within 1e-3 (u^T H u) on these models. The vector H u is within
# 1e-3 for central and 1e-2 for one-sided differences (O(h) truncation, h ~ 3.5e-4 ||w||, worst coordinates).
@pytest.mark.parametrize("model", MODELS)
def test_finite_differences_in_float32(x64, models, model):
    params64, loss64 = getattr(models, model)()
    _, _, _, _, h = models.explicit(loss64, params64)
    u64 = jax.tree.map(lambda x: -x, jax.grad(loss64)(params64))  # a gradient-descent direction
    u_flat = np.asarray(ravel_pytree(u64)[0])
    expected, expected_hu = float(u_flat @ h @ u_flat), np.asarray(h) @ u_flat
    params, loss = getattr(models, model)(dtype=jnp.float32)
    u = jax.tree.map(lambda x: x.astype(jnp.float32), u64)

    @jax.jit
    def run(p, d):
        grads = jax.grad(loss)(p)
        return ({r: curvature(loss, p, d, route=r, grads=grads)[0].value for r in routes.FINITE_DIFFERENCES},
                {r: hvp(loss, p, d, route=r, grads=grads)[0].product for r in routes.FINITE_DIFFERENCES})

    values, products = run(params, u)
    for route in routes.FINITE_DIFFERENCES:
        assert values[route].dtype == jnp.float32
        assert abs(float(values[route]) - expected) <= 1e-3 * abs(expected), (route, float(values[route]), expected)
        got = np.asarray(ravel_pytree(products[route])[0], np.float64)
        tol = 1e-3 if route == routes.FD_CENTRAL else 1e-2
        assert np.linalg.norm(got - expected_hu) <= tol * np.linalg.norm(expected_hu), route


def test_finite_difference_step_matches_core_rule(x64, models):
    params, _ = models.mlp()
    u = _direction(params, 5)
    w, flat_u = np.asarray(ravel_pytree(params)[0]), np.asarray(ravel_pytree(u)[0])
    u_norm = float(np.linalg.norm(flat_u))
    # the parameter scale along u (Dennis-Schnabel), the same rule as the PyTorch adapter's
    w_norm = routes.parameter_scale_along(float(np.abs(w) @ np.abs(flat_u)), u_norm)
    for central in (True, False):
        expected = routes.finite_difference_step(w_norm, u_norm, float(jnp.finfo(jnp.float64).eps), central=central)
        got = jax.jit(functools.partial(finite_difference_step, central=central))(params, u)
        assert float(got) == pytest.approx(expected, rel=1e-12)
    zero = jax.tree.map(jnp.zeros_like, u)
    assert float(finite_difference_step(params, zero, central=True)) == 0.0
    # the lowest precision leaf sets eps
    mixed = {**params, "w0": params["w0"].astype(jnp.float32)}
    expected32 = routes.finite_difference_step(w_norm, u_norm, float(jnp.finfo(jnp.float32).eps), central=False)
    assert float(finite_difference_step(mixed, u, central=False)) == pytest.approx(expected32, rel=1e-5)


@jax.custom_vjp
def _softplus(x):
    return jnp.logaddexp(x, 0.0)


def _softplus_fwd(x):
    return _softplus(x), x


def _softplus_bwd(x, cotangent):
    return (cotangent * jax.nn.sigmoid(x),)


_softplus.defvjp(_softplus_fwd, _softplus_bwd)


@jax.custom_vjp
def _opaque_softplus(x):
    return jnp.logaddexp(x, 0.0)


def _opaque_bwd(x, cotangent):
    sig = jax.pure_callback(lambda a: (1.0 / (1.0 + np.exp(-np.asarray(a)))).astype(np.asarray(a).dtype),
                            jax.ShapeDtypeStruct(x.shape, x.dtype), x)
    return (cotangent * sig,)


_opaque_softplus.defvjp(lambda x: (_opaque_softplus(x), x), _opaque_bwd)


@pytest.mark.parametrize("activation,expected_route,tol", [
    (jnp.tanh, routes.JVP_JVP, 1e-10),
    (_softplus, routes.DOUBLE_BACKWARD, 1e-10),  # custom_vjp: no forward mode
    (_opaque_softplus, routes.FD_ONESIDED, 1e-5),  # backward is a host callback: not differentiable again
])
def test_auto_route_falls_back_at_trace_time(x64, activation, expected_route, tol):
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
    params = {"w": jax.random.normal(jax.random.PRNGKey(1), (3, 4)),
              "v": jax.random.normal(jax.random.PRNGKey(2), (4,))}

    def loss(p):
        return jnp.mean(activation(x @ p["w"]) @ p["v"]) ** 2

    def reference(p):  # the same function without custom derivatives
        return jnp.mean(jnp.logaddexp(x @ p["w"], 0.0) @ p["v"]) ** 2 if activation is not jnp.tanh else loss(p)

    u = jax.tree.map(jnp.ones_like, params)
    result, exact = jax.jit(
        lambda p, d: (curvature(loss, p, d)[0], curvature(reference, p, d, route=routes.JVP_JVP)[0]))(params, u)
    assert resolve_curvature_route(loss, params, u) == expected_route
    assert abs(float(result.value) - float(exact.value)) <= tol * abs(float(exact.value))
    expected_hvp = routes.JVP_GRAD if expected_route == routes.JVP_JVP else expected_route
    assert resolve_hvp_route(loss, params) == expected_hvp


def test_explicit_route_that_cannot_trace_raises(x64):
    def loss(w):
        return jnp.sum(_softplus(w))

    with pytest.raises(TypeError):
        curvature(loss, jnp.ones(3), jnp.ones(3), route=routes.JVP_JVP)
    with pytest.raises(ValueError, match="unknown route"):
        curvature(loss, jnp.ones(3), jnp.ones(3), route="newton")


# -- pytree vector ops and the core's estimators -------------------------------------------------
def test_tree_ops_against_flat_numpy(x64, models):
    params, _ = models.attention()
    ops = TreeOps()
    a, b = _direction(params, 1), _direction(params, 2)
    fa, fb = np.asarray(ravel_pytree(a)[0]), np.asarray(ravel_pytree(b)[0])
    assert float(ops.dot(a, b)) == pytest.approx(fa @ fb, rel=1e-12)
    assert float(ops.norm(a)) == pytest.approx(np.linalg.norm(fa), rel=1e-12)
    np.testing.assert_allclose(ravel_pytree(ops.axpy(0.5, a, b))[0], 0.5 * fa + fb, rtol=1e-12)
    np.testing.assert_allclose(ravel_pytree(ops.multiply(a, b))[0], fa * fb, rtol=1e-12)
    assert ops.size(a) == fa.size
    basis = ops.basis_zeros(a, 3)
    basis = ops.basis_set(basis, 0, a)
    basis = ops.basis_set(basis, 2, b)
    np.testing.assert_allclose(ops.basis_coeffs(basis, a), [fa @ fa, 0.0, fb @ fa], rtol=1e-12)
    np.testing.assert_allclose(ravel_pytree(ops.basis_combine(basis, jnp.array([1.0, 5.0, -2.0])))[0],
                               fa - 2 * fb, rtol=1e-12)
    r1, r2 = ops.random_like(a, 7), ops.random_like(a, 7)
    np.testing.assert_array_equal(ravel_pytree(r1)[0], ravel_pytree(r2)[0])
    assert not np.allclose(ravel_pytree(ops.random_like(a, 8))[0], ravel_pytree(r1)[0])
    # bf16 leaves accumulate in float32
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), a)
    assert ops.dot(half, half).dtype == jnp.float64
    assert TreeOps().dot(half, half) > 0


@pytest.mark.parametrize("model", MODELS)
def test_power_iteration_and_lanczos_on_pytrees_match_eigh(x64, models, model):
    params, loss = getattr(models, model)()
    _, _, _, _, h = models.explicit(loss, params)
    eig = np.linalg.eigh(np.asarray(h))[0]
    dominant = eig[np.argmax(np.abs(eig))]

    @jax.jit
    def estimates(p):
        matvec, _ = hessian_operator(loss, p)
        v0 = _direction(p, 11)
        top = top_eigenvalue(matvec, v0, tol=0.0, max_iters=2000)
        lan = top_eigenvalues(matvec, v0, 3)
        return top.eigenvalue, lan.eigenvalues

    top, three = estimates(params)
    assert float(top) == pytest.approx(dominant, rel=1e-6)
    np.testing.assert_allclose(three, eig[::-1][:3], rtol=1e-8, atol=1e-10 * abs(eig).max())


def test_preconditioned_spectrum_matches_explicit(x64, models):
    params, loss = models.mlp()
    _, _, _, _, h = models.explicit(loss, params)
    opt = optax.adam(1.0, b1=0.8, b2=0.95)

    @jax.jit
    def three_steps(p):  # a few steps so that nu and the bias corrections are not trivial
        state = opt.init(p)
        for seed in range(3):
            grads = jax.grad(loss)(jax.tree.map(lambda x, s=seed: x + 0.1 * s, p))
            u, state = opt.update(grads, state, p)
        return u, state, find_preconditioner(state, AdamPreconditioner(b1=0.8, b2=0.95))

    u, state, precond = three_steps(params)
    # the step is exactly -P^{-1} m
    np.testing.assert_allclose(ravel_pytree(u)[0], -ravel_pytree(state[0].mu)[0] / ravel_pytree(precond)[0],
                               rtol=1e-12)
    p = np.asarray(ravel_pytree(precond)[0])
    explicit_matrix = h / np.sqrt(np.outer(p, p))
    eig = np.linalg.eigh(explicit_matrix)[0]

    @jax.jit
    def spectra(p, pre, v1, v2):  # one program for both estimators
        matvec, _ = hessian_operator(loss, p, precond=pre)
        return top_eigenvalues(matvec, v1, 2).eigenvalues, top_eigenvalue(matvec, v2, tol=0.0, max_iters=3000)

    lan, top = spectra(params, precond, _direction(params, 1), _direction(params, 2))
    np.testing.assert_allclose(lan, eig[::-1][:2], rtol=1e-8)
    assert float(top.eigenvalue) == pytest.approx(eig[np.argmax(np.abs(eig))], rel=1e-6)


@pytest.mark.parametrize("make,spec", [
    (lambda: optax.adam(1.0), AdamPreconditioner()),
    (lambda: optax.adamw(1.0, weight_decay=0.1), AdamPreconditioner()),
    (lambda: optax.rmsprop(1.0), RmsPreconditioner()),
    pytest.param(lambda: optax.rmsprop(1.0, eps_in_sqrt=False), RmsPreconditioner(eps_in_sqrt=False),
                 marks=pytest.mark.skipif("eps_in_sqrt" not in inspect.signature(optax.rmsprop).parameters,
                                          reason="optax < 0.2.4 has no eps_in_sqrt option (eps is outside the sqrt)")),
    (lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1.0, b1=0.5, eps=1e-4),
     AdamPreconditioner(b1=0.5, eps=1e-4)),
    # hyperparameters hidden in the optimizer's closure are fitted from the synthetic step
    (lambda: optax.adam(1.0, eps=1e-4), AdamPreconditioner(eps=1e-4)),
    (lambda: optax.adamw(1.0, b1=0.8, b2=0.95, eps=1.0, weight_decay=0.1), AdamPreconditioner(b1=0.8, b2=0.95,
                                                                                              eps=1.0)),
    (lambda: optax.rmsprop(1.0, decay=0.95, eps=1e-6), RmsPreconditioner(decay=0.95, eps=1e-6)),
])
def test_identify_finds_the_preconditioner(make, spec):
    found, reason = identify(make())
    assert found == spec, reason


def test_identify_with_the_base_learning_rate_for_law_none():
    """tune(base, None): the base's update carries its own learning rate (even 0 on a warm-up's first step)."""
    assert identify(optax.adam(1e-3))[0] is None  # a law's base must have learning rate 1
    assert identify(optax.adam(1e-3, b2=0.95), scaled=True)[0] == AdamPreconditioner(b2=0.95)
    warm = optax.inject_hyperparams(optax.adam)(learning_rate=optax.linear_schedule(0.0, 1e-3, 10), eps=1e-6)
    assert identify(warm, scaled=True)[0] == AdamPreconditioner(eps=1e-6)


def test_identify_refuses_a_base_it_cannot_match():
    found, reason = identify(optax.adam(1.0, eps_root=1e-4))  # P has another form
    assert found is None and "inject_hyperparams" in reason
    assert identify(optax.adam(1.0, nesterov=True))[0] is None  # u is not -P^{-1} m
    assert identify(optax.sgd(1.0))[0] is None
    injected = optax.inject_hyperparams(optax.adam)(learning_rate=1.0, b1=0.5, b2=0.9, eps=1e-4)
    params = jnp.linspace(-1.0, 1.0, 5)
    state = injected.init(params)
    u, state = injected.update(jnp.array([1e-5, -0.3, 2.0, 1e-3, 0.7]), state, params)
    precond = find_preconditioner(state, AdamPreconditioner())  # injected values override the defaults
    np.testing.assert_allclose(u, -state.inner_state[0].mu / precond, rtol=1e-5)
