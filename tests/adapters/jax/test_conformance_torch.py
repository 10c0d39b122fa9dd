"""Cross-framework conformance: the same MLP and weights, full-batch GD + CDAT(scale=2) in PyTorch and JAX
(float64) give learning-rate trajectories that agree to 1e-4 relative over 50 steps; and DCAO's momentum and
weight decay, applied to torch's SGD(momentum, weight_decay) and to optax's inject_hyperparams state, follow the
same sequences in both frameworks (same rule, same one-step delay before they act, same default Lanczos steps)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

from eos_core.adapters.jax import diagnostics, tune  # noqa: E402
from eos_core.adapters.torch import CurvatureTuner  # noqa: E402  (a broken torch adapter fails here, not skips)
from eos_core.laws import CDAT, DCAO  # noqa: E402


def _problem():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((48, 4))
    y = np.tanh(x @ rng.standard_normal((4, 3))) @ rng.standard_normal((3, 2))
    w0, b0 = rng.standard_normal((4, 16)) / 2.0, 0.1 * rng.standard_normal(16)
    w1, b1 = rng.standard_normal((16, 2)) / 4.0, np.zeros(2)
    return x, y, (w0, b0, w1, b1)


def _torch_model(w0, b0, w1, b1):
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    with torch.no_grad():
        for layer, (w, b) in zip((model[0], model[2]), ((w0, b0), (w1, b1)), strict=True):
            layer.weight.copy_(torch.from_numpy(w.T.copy()))
            layer.bias.copy_(torch.from_numpy(b.copy()))
    return model


def test_torch_and_jax_lr_trajectories_agree(x64):
    steps = 50
    x, y, (w0, b0, w1, b1) = _problem()

    # JAX: optax.sgd(1.0) + CDAT(scale=2), u^T H u by forward-over-forward
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def loss(p):
        return 0.5 * jnp.mean(jnp.sum((jnp.tanh(xj @ p["w0"] + p["b0"]) @ p["w1"] + p["b1"] - yj) ** 2, axis=-1))

    params = {"w0": jnp.asarray(w0), "b0": jnp.asarray(b0), "w1": jnp.asarray(w1), "b1": jnp.asarray(b1)}
    opt = tune(optax.sgd(1.0), CDAT(scale=2.0), route="jvp-jvp")
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        grads = jax.grad(loss)(p)
        updates, s = opt.update(grads, s, p, value_fn=loss)
        return optax.apply_updates(p, updates), s

    jax_lrs = []
    for _ in range(steps):
        params, state = step(params, state)
        jax_lrs.append(float(state.diagnostics["lr"]))

    # PyTorch: torch.optim.SGD(lr=1) + CDAT(scale=2), u^T H u by double backward
    model = _torch_model(w0, b0, w1, b1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    tuner = CurvatureTuner(sgd, CDAT(scale=2.0), route="double-backward")

    def closure():
        sgd.zero_grad()
        value = 0.5 * ((model(xt) - yt) ** 2).sum(-1).mean()
        value.backward()
        return value

    torch_lrs = []
    for _ in range(steps):
        tuner.step(closure)
        torch_lrs.append(float(tuner.diagnostics["lr"]))

    assert len(set(jax_lrs)) > steps // 2  # a trajectory that moves, not a constant
    np.testing.assert_allclose(torch_lrs, jax_lrs, rtol=1e-4)


def test_dcao_momentum_and_weight_decay_agree_across_frameworks(x64):
    steps = 12
    x, y, (w0, b0, w1, b1) = _problem()

    def law():
        return DCAO(target=1.5, lr_init=0.5, momentum_sensitivity=0.3, weight_decay_sensitivity=0.3,
                    momentum_bounds=(0.0, 0.95), weight_decay_bounds=(0.0, 0.1))  # Lanczos: the default 20 steps

    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def loss(p):  # torch's parameter order and layout, so that both start Lanczos from the same random_start
        w0t, b0_, w1t, b1_ = p
        return 0.5 * jnp.mean(jnp.sum((jnp.tanh(xj @ w0t.T + b0_) @ w1t.T + b1_ - yj) ** 2, axis=-1))

    def sgd_with_decay(learning_rate, momentum, weight_decay):  # torch.optim.SGD's coupled weight decay
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))

    base = optax.inject_hyperparams(sgd_with_decay)(learning_rate=1.0, momentum=0.5, weight_decay=1e-2)
    opt = tune(base, law(), probe_every=2)
    params = [jnp.asarray(w0.T), jnp.asarray(b0), jnp.asarray(w1.T), jnp.asarray(b1)]
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        updates, s = opt.update(jax.grad(loss)(p), s, p, value_fn=loss)
        return optax.apply_updates(p, updates), s

    jax_rows = []
    for _ in range(steps):
        params, state = step(params, state)
        jax_rows.append(diagnostics(state))

    model = _torch_model(w0, b0, w1, b1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5, weight_decay=1e-2)
    tuner = CurvatureTuner(sgd, law(), probe_every=2, route="double-backward")

    def closure():
        sgd.zero_grad()
        value = 0.5 * ((model(xt) - yt) ** 2).sum(-1).mean()
        value.backward()
        return value

    torch_rows = []
    for _ in range(steps):
        tuner.step(closure)
        torch_rows.append(dict(tuner.diagnostics))

    for key in ("lr", "momentum", "weight_decay"):
        got, expected = [r[key] for r in jax_rows], [float(r[key]) for r in torch_rows]
        assert len(set(expected)) > 3, key  # the law moved it
        np.testing.assert_allclose(got, expected, rtol=1e-9, err_msg=key)
    # the parameters too: both bases really used those momenta and weight decays
    final = [np.asarray(p) for p in params]
    torch_final = [p.detach().numpy() for p in model.parameters()]
    for a, b in zip(final, torch_final, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
