"""Cross-framework conformance: the same MLP and weights, full-batch GD + CDAT(scale=2) in PyTorch and JAX
(float64) give learning-rate trajectories that agree to 1e-4 relative over 50 steps."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

from eos_core.adapters.jax import tune  # noqa: E402
from eos_core.laws import CDAT  # noqa: E402


def _curvature_tuner():
    try:
        module = importlib.import_module("eos_core.adapters.torch")
    except ImportError as error:
        pytest.skip(f"eos_core.adapters.torch cannot be imported yet ({error})")
    tuner = getattr(module, "CurvatureTuner", None)
    if tuner is None:
        pytest.skip("eos_core.adapters.torch has no CurvatureTuner yet (the PyTorch adapter is a placeholder)")
    return tuner


def _problem():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((48, 4))
    y = np.tanh(x @ rng.standard_normal((4, 3))) @ rng.standard_normal((3, 2))
    w0, b0 = rng.standard_normal((4, 16)) / 2.0, 0.1 * rng.standard_normal(16)
    w1, b1 = rng.standard_normal((16, 2)) / 4.0, np.zeros(2)
    return x, y, (w0, b0, w1, b1)


def test_torch_and_jax_lr_trajectories_agree(x64):
    curvature_tuner = _curvature_tuner()
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
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    with torch.no_grad():
        for layer, (w, b) in zip((model[0], model[2]), ((w0, b0), (w1, b1)), strict=True):
            layer.weight.copy_(torch.from_numpy(w.T.copy()))
            layer.bias.copy_(torch.from_numpy(b.copy()))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    tuner = curvature_tuner(sgd, CDAT(scale=2.0), route="double-backward")

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
