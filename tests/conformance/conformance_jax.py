"""The conformance case on the JAX adapter (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from conformance_case import LR, MOMENTUM, OPTIONS, STEPS, comparable, make_law, problem

from eos_core.adapters.jax import diagnostics, tune


def run(name: str) -> list[dict]:
    jax.config.update("jax_enable_x64", True)
    x, y, weights = problem()
    x, y = jnp.asarray(x), jnp.asarray(y)
    params = [jnp.asarray(w) for w in weights]

    def loss(p):
        w1, b1, w2, b2 = p
        return jnp.mean((jnp.tanh(x @ w1 + b1) @ w2 + b2 - y) ** 2)

    base = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0, momentum=MOMENTUM)
    law = make_law(name)
    if name == "dcao":  # torch SGD has a weight decay setting (0) for DCAO to write; optax needs it injected
        def sgd_with_decay(learning_rate, momentum, weight_decay):
            return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))

        base = optax.inject_hyperparams(sgd_with_decay)(learning_rate=1.0, momentum=MOMENTUM, weight_decay=0.0)
    opt = tune(base, law, reference_lr=LR, **OPTIONS)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = opt.update(grads, s, p, value_fn=loss, value=value)
        return optax.apply_updates(p, updates), s

    rows = []
    for _ in range(STEPS):
        params, state = step(params, state)
        rows.append(diagnostics(state))
    return comparable(rows)
