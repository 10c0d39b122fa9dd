"""Shared fixtures for the JAX adapter tests: float64 switch and small models (MLP, conv net, attention).

Weights and data are drawn with numpy (no per-shape JAX compilation) and cast to the requested dtype,
so a float32 and a float64 copy of a model hold the same values. Model builders are cached: every test
gets the same loss object for the same model, so jitted functions compiled for one test are reused.
"""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402


@pytest.fixture
def x64():
    """float64 for the duration of one test."""
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _normal(rng, shape, dtype, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype=dtype)


@functools.cache
def mlp(dtype=jnp.float64, sizes=(4, 6, 3), n=24, seed=0):
    """A tanh MLP with softmax cross-entropy on random data: ``(params, loss(params))``."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"w{i}"] = _normal(rng, (a, b), dtype, 1.0 / np.sqrt(a))
        params[f"b{i}"] = jnp.full((b,), 0.1, dtype)
    x = _normal(rng, (n, sizes[0]), dtype)
    y = jnp.asarray(rng.integers(0, sizes[-1], n), dtype=jnp.int32)  # the same dtype with and without x64
    depth = len(sizes) - 1

    def apply(p, inputs):
        h = inputs
        for i in range(depth):
            h = h @ p[f"w{i}"] + p[f"b{i}"]
            if i < depth - 1:
                h = jnp.tanh(h)
        return h

    def loss(p, inputs=x, labels=y):
        logits = apply(p, inputs)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], 1)[:, 0])

    return params, loss


@functools.cache
def regression(dtype=jnp.float64, sizes=(4, 8, 2), n=32, seed=5):
    """A tanh MLP fitting a teacher network of the same shape (squared error): ``(params, loss(params))``."""
    teacher, _ = mlp(dtype, sizes, n, seed + 100)
    params, _ = mlp(dtype, sizes, n, seed)
    rng = np.random.default_rng(seed + 200)
    x = _normal(rng, (n, sizes[0]), dtype)
    depth = len(sizes) - 1

    def apply(p, inputs):
        h = inputs
        for i in range(depth):
            h = h @ p[f"w{i}"] + p[f"b{i}"]
            if i < depth - 1:
                h = jnp.tanh(h)
        return h

    y = apply(teacher, x)

    def loss(p):
        return 0.5 * jnp.mean(jnp.sum((apply(p, x) - y) ** 2, axis=-1))

    return params, loss


@functools.cache
def convnet(dtype=jnp.float64, seed=1):
    """Conv 3x3 (2 -> 3 channels, NHWC), tanh, global average pool, dense 3 -> 2, squared error."""
    rng = np.random.default_rng(seed)
    params = {
        "kernel": _normal(rng, (3, 3, 2, 3), dtype, 0.25),
        "bias": jnp.full((3,), 0.05, dtype),
        "dense": _normal(rng, (3, 2), dtype),
        "dense_bias": jnp.zeros((2,), dtype),
    }
    x = _normal(rng, (4, 6, 6, 2), dtype)
    y = _normal(rng, (4, 2), dtype)

    def loss(p):
        h = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jnp.tanh(h + p["bias"]).mean(axis=(1, 2))
        return 0.5 * jnp.mean(jnp.sum((h @ p["dense"] + p["dense_bias"] - y) ** 2, axis=-1))

    return params, loss


@functools.cache
def attention(dtype=jnp.float64, seed=2, seq=4, width=6):
    """A single-head self-attention block with a residual and layer norm, mean-pooled, squared error."""
    rng = np.random.default_rng(seed)
    scale = float(1.0 / np.sqrt(width))
    params = {name: _normal(rng, (width, width), dtype, scale) for name in ("q", "k", "v", "o")}
    params["head"] = _normal(rng, (width, 2), dtype, scale)
    x = _normal(rng, (3, seq, width), dtype)
    y = _normal(rng, (3, 2), dtype)

    def loss(p):
        q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
        weights = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) * scale, axis=-1)
        h = x + (weights @ v) @ p["o"]
        h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)
        return 0.5 * jnp.mean(jnp.sum((h.mean(1) @ p["head"] - y) ** 2, axis=-1))

    return params, loss


_EXPLICIT = {}


def explicit(loss, params):
    """``(w, unravel, f_flat, g, H)`` with the Hessian from jax.hessian of the flattened loss (compiled once per
    loss and parameter layout)."""
    w, unravel = ravel_pytree(params)
    key = (loss, jax.tree.structure(params), tuple((x.shape, x.dtype) for x in jax.tree.leaves(params)))
    if key not in _EXPLICIT:
        def f_flat(v):
            return loss(unravel(v))

        _EXPLICIT[key] = f_flat, jax.jit(lambda v: (jax.grad(f_flat)(v), jax.hessian(f_flat)(v)))
    f_flat, derivatives = _EXPLICIT[key]
    grad, hessian = derivatives(w)
    return w, unravel, f_flat, grad, hessian


_STEPS = {}


def make_step(opt, loss, jit=True):
    """One full-batch training step ``(params, state, *args) -> (params, state, loss, updates)``, jitted once
    per optimizer and loss (``args`` are passed to ``loss`` after the parameters)."""
    import optax

    key = (opt, loss, jit)
    if key not in _STEPS:
        def step(p, s, *args):
            def value_fn(q):
                return loss(q, *args)

            value, grads = jax.value_and_grad(value_fn)(p)
            updates, s = opt.update(grads, s, p, value_fn=value_fn)
            return optax.apply_updates(p, updates), s, value, updates

        _STEPS[key] = jax.jit(step) if jit else step
    return _STEPS[key]


def run(opt, loss, params, steps, *, jit=True, state=None, value_fn_args=None):
    """Train ``steps`` full-batch steps. Returns ``(params, state, records)``; record t holds the
    diagnostics after step t, the parameters *before* it, the loss there and the update applied."""
    from eos_core.adapters.jax import diagnostics

    step = make_step(opt, loss, jit)
    state = opt.init(params) if state is None else state
    records = []
    for t in range(steps):
        args = () if value_fn_args is None else value_fn_args(t)
        before = params
        params, state, value, updates = step(params, state, *args)
        records.append({**diagnostics(state), "params": before, "loss": float(value), "updates": updates,
                        "state": state})
    return params, state, records


@pytest.fixture
def models():
    return types.SimpleNamespace(mlp=mlp, regression=regression, convnet=convnet, attention=attention,
                                 explicit=explicit, run=run)
