"""CDAT's previous-update numerator in ``tune`` (``CDAT(numerator="previous-update")``): the statistics
``g_t . u_{t-1}``, ``u_{t-1}^T H_t u_{t-1}`` and ``previous_lr`` against explicit computations on a mini-batch
quadratic, the first probe, ``probe_every > 1`` and skipped steps, ``jit`` with a cosine decay, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

from eos_core import stats as S  # noqa: E402
from eos_core.adapters.jax import diagnostics, find_tune_state, tune  # noqa: E402
from eos_core.laws import CDAT  # noqa: E402
from eos_core.numerics import NUMPY  # noqa: E402

PREVIOUS = (S.GRAD_DOT_PREVIOUS_UPDATE, S.PREVIOUS_UPDATE_CURVATURE, S.PREVIOUS_LR)
DIM, MOMENTUM = 6, 0.9


class Spy(CDAT):
    """CDAT that records the previous-update statistics it is given (a host callback: works under jit and in the
    probe's lax.cond)."""

    def __init__(self, **settings):
        super().__init__(**settings)
        self.seen = []

    def update(self, state, stats, *, numerics=NUMPY):
        jax.debug.callback(lambda *values: self.seen.append([float(v) for v in values]), *(stats[k] for k in PREVIOUS))
        return super().update(state, stats, numerics=numerics)


def quadratic(steps, seed=0):
    """f_t(w) = 1/2 w^T A w - b_t^T w: a fixed Hessian A and a batch-dependent linear term (gradient noise)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    a = (q * np.linspace(0.5, 4.0, DIM)) @ q.T
    batches = rng.standard_normal((steps, DIM))
    return a, batches, rng.standard_normal(DIM)


def jax_run(law, a, batches, w0, *, nan_at=(), **options):
    """``tune(sgd(1, momentum), law)`` under jit; a NaN gradient on the steps of ``nan_at`` (skipped)."""
    opt = tune(optax.sgd(1.0, momentum=MOMENTUM), law, **options)
    a_ = jnp.asarray(a)

    @jax.jit
    def step(w, state, b, poison):
        def value_fn(p):
            return 0.5 * p @ a_ @ p - b @ p

        grads = jax.grad(value_fn)(w) * poison
        updates, state = opt.update(grads, state, w, value_fn=value_fn)
        return optax.apply_updates(w, updates), state

    w, state = jnp.asarray(w0), opt.init(jnp.asarray(w0))
    found = []
    for t, b in enumerate(batches):
        w, state = step(w, state, jnp.asarray(b), jnp.asarray(math.nan if t in nan_at else 1.0))
        found.append(diagnostics(state))
    return found, state


def numpy_run(law, a, batches, w0, *, probe_every=1, nan_at=()):
    """The same training in numpy with explicitly computed statistics: ``(lrs, stats of each probe)``.

    optax's SGD with momentum: ``buf <- beta buf + g``, ``u = -buf`` (the update for lr 1)."""
    state = law.init(None)
    w, buf = np.asarray(w0, float), np.zeros(DIM)
    previous, previous_lr, count = None, math.nan, 0
    lrs, probes = [], []
    for t, b in enumerate(batches):
        if t in nan_at:  # skipped: nothing changes
            lrs.append(None)
            continue
        g = a @ w - b
        u = -(MOMENTUM * buf + g)
        if count % probe_every == 0:
            stats = {S.GRAD_DOT_PREVIOUS_UPDATE: math.nan if previous is None else g @ previous,
                     S.PREVIOUS_UPDATE_CURVATURE: math.nan if previous is None else previous @ a @ previous,
                     S.PREVIOUS_LR: previous_lr}
            probes.append([stats[k] for k in PREVIOUS])
            out = law.update(state, stats)
        else:
            out = law.hold(state)
        state, lr = out.state, float(out.lr)
        buf = -u
        w = w + lr * u
        previous, previous_lr, count = u, lr, count + 1
        lrs.append(lr)
    return lrs, probes


@pytest.mark.parametrize("route", ["auto", "fd-onesided"])
def test_the_statistics_against_explicit_computations(x64, route):
    """g_t(w_t) . u_{t-1}, u_{t-1}^T A u_{t-1} with the explicit Hessian and the lr applied to u_{t-1}; the first
    probe has no previous update: NaN statistics, the rate stays lr_init and it is not a fallback."""
    a, batches, w0 = quadratic(12)
    settings = dict(scale=1.0, ema=0.5, lr_init=0.05)
    spy = Spy(numerator="previous-update", **settings)
    found, state = jax_run(spy, a, batches, w0, route=route)
    lrs, probes = numpy_run(CDAT(numerator="previous-update", **settings), a, batches, w0)
    rtol = 1e-10 if route == "auto" else 1e-5  # one-sided differences are exact on a quadratic up to rounding
    assert np.all(np.isnan(spy.seen[0])) and np.all(np.isnan(probes[0]))
    np.testing.assert_allclose(spy.seen[1:], probes[1:], rtol=rtol)
    assert found[0]["lr"] == 0.05 and found[0]["fallback"] == 0.0 and found[-1]["fallback_steps"] == 0
    assert math.isnan(found[0]["numerator"]) and found[1]["numerator"] == pytest.approx(
        -probes[1][0] + probes[1][2] * probes[1][1], rel=rtol)
    np.testing.assert_allclose([f["lr"] for f in found], lrs, rtol=rtol)
    assert found[0]["route"] == ("jvp-jvp" if route == "auto" else route)
    assert len(jax.tree.leaves(find_tune_state(state).previous_update)) == 1


def test_the_same_batch_rule_keeps_no_previous_lr():
    opt = tune(optax.sgd(1.0), CDAT())
    assert opt.init(jnp.zeros(3)).previous_lr is None and opt.init(jnp.zeros(3)).previous_update is None
    assert S.CURVATURE not in CDAT(numerator="previous-update").request().needs  # one curvature probe per probe


def test_probe_every_uses_the_update_of_the_step_just_before_the_probe_and_skipped_steps_keep_it(x64):
    """probe_every = 3: at probe step t, u_{t-1} is the update of step t-1 (a step between probes, applied with the
    held lr), not that of the last probe step; a skipped step leaves u_{t-1} and its lr as they were."""
    a, batches, w0 = quadratic(14, seed=1)
    settings = dict(scale=1.0, ema=0.9, lr_init=0.05)
    nan_at = (3,)  # batch 3 is skipped: the probe of count 3 comes at batch 4, after the update of batch 2
    spy = Spy(numerator="previous-update", **settings)
    with pytest.warns(RuntimeWarning, match="step 3 was skipped"):
        found, _ = jax_run(spy, a, batches, w0, probe_every=3, nan_at=nan_at)
    lrs, probes = numpy_run(CDAT(numerator="previous-update", **settings), a, batches, w0, probe_every=3,
                            nan_at=nan_at)
    # batch 3 was probed too (count 3) with its NaN gradient, and the step discarded
    assert len(spy.seen) == 6 and math.isnan(spy.seen[1][0])
    seen = [spy.seen[0], *spy.seen[2:]]
    assert len(probes) == 5  # counts 0, 3, 6, 9, 12 of the 13 steps taken
    np.testing.assert_allclose(seen[1:], probes[1:], rtol=1e-10)
    assert found[3]["skipped"] == 1.0 and found[-1]["skipped_steps"] == 1
    np.testing.assert_allclose([f["lr"] for t, f in enumerate(found) if t not in nan_at],
                               [lr for lr in lrs if lr is not None], rtol=1e-10)
    # previous_lr of the probe of count 6 (batch 7) is the held lr of batch 6, not that probe's new rate
    assert seen[2][2] == found[6]["lr"] != found[7]["lr"]


def test_cosine_decay_under_jit_and_resume(x64):
    """decay="cosine", horizon=T: the applied lr (decay included) is the previous_lr of the next probe; the state
    (u_{t-1} and its lr) resumes bit-identically from a saved copy."""
    steps = 16
    a, batches, w0 = quadratic(steps, seed=2)
    settings = dict(scale=1.0, ema=0.9, lr_init=0.05, decay="cosine", horizon=steps)
    found, _ = jax_run(CDAT(numerator="previous-update", **settings), a, batches, w0)
    lrs, probes = numpy_run(CDAT(numerator="previous-update", **settings), a, batches, w0)
    np.testing.assert_allclose([f["lr"] for f in found], lrs, rtol=1e-10)
    assert all(p[2] == pytest.approx(lr, rel=1e-12) for p, lr in zip(probes[1:], lrs[:-1], strict=True))
    assert found[-1]["decay"] < 0.05 and found[1]["decay"] > 0.95

    law = CDAT(numerator="previous-update", **settings)
    opt = tune(optax.sgd(1.0, momentum=MOMENTUM), law)
    a_ = jnp.asarray(a)

    @jax.jit
    def step(w, state, b):
        def value_fn(p):
            return 0.5 * p @ a_ @ p - b @ p

        updates, state = opt.update(jax.grad(value_fn)(w), state, w, value_fn=value_fn)
        return optax.apply_updates(w, updates), state

    w, state = jnp.asarray(w0), opt.init(jnp.asarray(w0))
    for b in batches[:5]:
        w, state = step(w, state, jnp.asarray(b))
    saved = jax.device_get((w, state))
    first = []
    for b in batches[5:]:
        w, state = step(w, state, jnp.asarray(b))
        first.append(diagnostics(state)["lr"])
    w, state = jax.device_put(saved)
    again = []
    for b in batches[5:]:
        w, state = step(w, state, jnp.asarray(b))
        again.append(diagnostics(state)["lr"])
    assert first == again
