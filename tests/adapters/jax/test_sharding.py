"""Data parallel: 2 host devices with a batch-sharded input under jit, and under shard_map with a pmean'd loss,
give the single-device learning rates.

The tox env ``jax`` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=2``; run elsewhere (one device),
the test re-runs itself in a subprocess with that flag.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from eos_core.adapters.jax import tune  # noqa: E402

try:
    from jax import shard_map  # jax >= 0.7

    OLD_SHARD_MAP = False
except ImportError:  # pragma: no cover - older jax
    OLD_SHARD_MAP = True
    import functools

    from jax.experimental.shard_map import shard_map as _experimental_shard_map

    # jax < 0.7 has no replication rule for lax.cond (which tune uses): users of those releases pass
    # check_rep=False, as its error message says
    shard_map = functools.partial(_experimental_shard_map, check_rep=False)
from eos_core.laws import CDAT  # noqa: E402

FLAG = "--xla_force_host_platform_device_count=2"


def _data(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 5)), dtype)
    y = jnp.asarray(np.tanh(rng.standard_normal((64, 5)) @ rng.standard_normal((5, 2))), dtype)
    params = {"w0": jnp.asarray(rng.standard_normal((5, 16)) / np.sqrt(5), dtype), "b0": jnp.zeros(16, dtype),
              "w1": jnp.asarray(rng.standard_normal((16, 2)) / 4.0, dtype), "b1": jnp.zeros(2, dtype)}
    return params, x, y


def loss(p, x, y):
    return 0.5 * jnp.mean(jnp.sum((jnp.tanh(x @ p["w0"] + p["b0"]) @ p["w1"] + p["b1"] - y) ** 2, axis=-1))


def test_two_devices_give_the_single_device_lr(x64, models):
    if jax.device_count() < 2:
        if os.environ.get("EOS_SHARDING_CHILD"):
            pytest.fail("the subprocess still sees one device")
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip(),
               "EOS_SHARDING_CHILD": "1", "JAX_PLATFORMS": "cpu"}
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 f"{__file__}::test_two_devices_give_the_single_device_lr"],
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return
    params, x, y = _data(jnp.float64)
    opt = tune(optax.sgd(1.0), CDAT(scale=2.0), sharpness_every=2)
    _, _, single = models.run(opt, loss, params, 8, value_fn_args=lambda t: (x, y))

    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
    assert len(xs.addressable_shards) == 2 and xs.addressable_shards[0].data.shape == (32, 5)
    state = jax.device_put(opt.init(params), replicated)
    final, _, sharded = models.run(opt, loss, jax.device_put(params, replicated), 8, state=state,
                                   value_fn_args=lambda t: (xs, ys))
    assert len(jax.tree.leaves(final)[0].sharding.device_set) == 2
    single_lr, sharded_lr = np.array([r["lr"] for r in single]), np.array([r["lr"] for r in sharded])
    np.testing.assert_allclose(sharded_lr, single_lr, rtol=1e-6)
    np.testing.assert_allclose([r["sharpness"] for r in sharded], [r["sharpness"] for r in single], rtol=1e-6)
    assert len(set(single_lr)) == len(single_lr)  # the rates do change step to step

    # shard_map: each device sees its half of the batch; value_fn returns the global (pmean'd) loss
    if OLD_SHARD_MAP:
        # jax < 0.7 (check_rep=False): the transpose of pmean does not sum over the devices, so reverse mode through
        # the pmean'd value_fn gives the local gradient / 2 (measured with jax 0.4.30). The supported recipe there:
        # the gradient averaged by hand and forward-mode products only (jvp-jvp, no sharpness tracking, whose
        # power iteration differentiates value_fn)
        opt = tune(optax.sgd(1.0), CDAT(scale=2.0), route="jvp-jvp")
        _, _, single = models.run(opt, loss, params, 8, value_fn_args=lambda t: (x, y))
        single_lr = np.array([r["lr"] for r in single])

    def step(p, s, xb, yb):
        def value_fn(q):
            return jax.lax.pmean(loss(q, xb, yb), "data")

        grads = jax.lax.pmean(jax.grad(loss)(p, xb, yb), "data") if OLD_SHARD_MAP else jax.grad(value_fn)(p)
        updates, s = opt.update(grads, s, p, value_fn=value_fn)
        return optax.apply_updates(p, updates), s

    mapped = jax.jit(shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())))
    p, s, mapped_lr = params, opt.init(params), []
    for _ in range(8):
        p, s = mapped(p, s, xs, ys)
        mapped_lr.append(float(s.diagnostics["lr"]))
    np.testing.assert_allclose(mapped_lr, single_lr, rtol=1e-6)
