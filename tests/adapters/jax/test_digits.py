"""scikit-learn digits, full batch, an MLP trained by GD + CDAT(scale=2): the edge of stability, measured."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
datasets = pytest.importorskip("sklearn.datasets")

import jax.numpy as jnp  # noqa: E402

from eos_core.adapters.jax import tune  # noqa: E402
from eos_core.laws import CDAT  # noqa: E402


def test_cdat_on_digits_trains_at_the_edge_of_stability(models):
    x, y = datasets.load_digits(return_X_y=True)  # ships with scikit-learn: no download
    std = x.std(0)
    x = (x - x.mean(0)) / np.where(std > 0, std, 1.0)  # standardised features (constant pixels stay 0)
    x, targets = jnp.asarray(x, jnp.float32), jax.nn.one_hot(jnp.asarray(y), 10)
    rng = np.random.default_rng(0)
    params = {"w0": jnp.asarray(rng.standard_normal((64, 32)) / 8.0, jnp.float32), "b0": jnp.zeros(32, jnp.float32),
              "w1": jnp.asarray(rng.standard_normal((32, 10)) / np.sqrt(32), jnp.float32),
              "b1": jnp.zeros(10, jnp.float32)}

    def loss(p):
        logits = jnp.tanh(x @ p["w0"] + p["b0"]) @ p["w1"] + p["b1"]
        return 0.5 * jnp.mean(jnp.sum((logits - targets) ** 2, axis=-1))

    _, _, records = models.run(tune(optax.sgd(1.0), CDAT(scale=2.0), sharpness_every=2), loss, params, 150)
    losses = np.array([r["loss"] for r in records])
    edge = np.array([r["lr_sharpness"] for r in records[50:]])
    edge = edge[~np.isnan(edge)]  # measured every 2 steps
    assert edge.size == 50
    assert losses[-1] < 0.1 * losses[0]
    assert 1.5 <= np.median(edge) <= 2.5, np.median(edge)
    # CDAT behaves like a warm-up: the rate rises from its first value
    assert np.median([r["lr"] for r in records[50:]]) > records[0]["lr"]
