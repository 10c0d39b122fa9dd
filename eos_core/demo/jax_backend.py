"""The demo's JAX backend: full-batch training through the optax transformation `eos_core.adapters.jax.tune`.

Each run is `tune(optax.sgd(1.0), law, sharpness_every=...)` (u = -g), one jitted step per iteration; the network is
the one of [`eos_core.demo.models`][] with the same numpy initial weights as the torch backend (dense layers
`x @ W.T + b`, convolutions in NCHW / OIHW layout).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax

from eos_core.adapters.jax import diagnostics, tune
from eos_core.demo.data import Dataset
from eos_core.demo.methods import Method
from eos_core.demo.models import ModelSpec, init_params
from eos_core.demo.results import Trajectory, blew_up

Progress = Callable[[int, str], None]


@contextlib.contextmanager
def precision(dtype: str) -> Iterator[Any]:
    """float64 needs `jax_enable_x64` for the duration of the run; yields the jnp dtype."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", dtype == "float64")
    try:
        yield jnp.float64 if dtype == "float64" else jnp.float32
    finally:
        jax.config.update("jax_enable_x64", previous)


def apply(spec: ModelSpec, params: list[jax.Array], x: jax.Array, image_shape: tuple[int, int] | None) -> jax.Array:
    """The network's logits (the same function as the torch backend's `nn.Sequential`)."""
    if spec.arch == "mlp":
        w0, b0, w1, b1, w2, b2 = params
        h = jnp.tanh(x @ w0.T + b0)
        h = jnp.tanh(h @ w1.T + b1)
        return h @ w2.T + b2
    k0, c0, k1, c1, w, b = params
    height, width = image_shape  # type: ignore[misc]
    h = x.reshape(x.shape[0], 1, height, width)
    for kernel, bias in ((k0, c0), (k1, c1)):
        h = jax.lax.conv_general_dilated(h, kernel, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        h = jnp.tanh(h + bias[None, :, None, None])
        n, c, rows, cols = h.shape
        h = h.reshape(n, c, rows // 2, 2, cols // 2, 2).mean(axis=(3, 5))  # 2x2 average pool
    return h.reshape(h.shape[0], -1) @ w.T + b


def make_loss(spec: ModelSpec, data: Dataset, dtype: Any) -> Callable[[list[jax.Array]], jax.Array]:
    """`params -> full-batch loss`: 0.5 * mean ||logits - onehot||^2 (mse) or cross-entropy (ce)."""
    x = jnp.asarray(data.x, dtype)
    targets = jnp.asarray(data.one_hot(), dtype)
    labels = jnp.asarray(data.y)

    def loss(params: list[jax.Array]) -> jax.Array:
        logits = apply(spec, params, x, data.image_shape)
        if spec.loss == "mse":
            return 0.5 * jnp.mean(jnp.sum((logits - targets) ** 2, axis=1))
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    return loss


def train(method: Method, data: Dataset, spec: ModelSpec, *, steps: int, seed: int = 0, sharpness_every: int = 5,
          dtype: str = "float32", progress: Progress | None = None) -> Trajectory:
    """Train full batch for `steps` steps (fewer when the loss blows up) and record the diagnostics."""
    with precision(dtype) as jdtype:
        params = [jnp.asarray(a, jdtype) for a in
                  init_params(spec, data.num_features, data.num_classes, seed=seed, image_shape=data.image_shape)]
        loss = make_loss(spec, data, jdtype)
        optimizer = tune(optax.sgd(1.0), method.law(), sharpness_every=sharpness_every, warn=False)
        state = optimizer.init(params)

        @jax.jit
        def step(params: list[jax.Array], state: Any) -> tuple[list[jax.Array], Any]:
            value, grads = jax.value_and_grad(loss)(params)
            updates, state = optimizer.update(grads, state, params, value_fn=loss, value=value)
            return optax.apply_updates(params, updates), state

        records: list[dict[str, float]] = []
        stopped = False
        route = "none"
        start = time.perf_counter()
        for i in range(steps):
            params, state = step(params, state)
            diag = diagnostics(state)
            route = str(diag["route"])
            record = {key: float(diag[key]) for key in ("loss", "lr", "sharpness", "lr_sharpness")}
            if diag["skipped"] > 0:  # tune skipped a non-finite step and kept the previous diagnostics
                record = {key: float("nan") for key in record}
            records.append(record)
            if progress is not None:
                progress(i + 1, f"loss {record['loss']:.4g}  lr {record['lr']:.3g}")
            if blew_up(record["loss"], records[0]["loss"]):
                stopped = True
                break
        wall = time.perf_counter() - start
    return Trajectory.from_records(method, records, wall_s=wall, planned_steps=steps, stopped=stopped,
                                   extra={"route": route, "backend": "jax"})
