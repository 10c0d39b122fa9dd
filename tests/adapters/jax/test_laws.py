"""Every law end to end through ``tune``: the rates (and DCAO's momentum / weight decay) equal the core law fed
statistics computed independently here (explicit Hessian by jax.hessian of the flattened loss, numpy eigh)."""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from eos_core import diagnostics as D  # noqa: E402
from eos_core import routes  # noqa: E402
from eos_core import stats as S  # noqa: E402
from eos_core.adapters.jax import diagnostics, tune  # noqa: E402
from eos_core.laws import (  # noqa: E402
    CDAT,
    DCAO,
    AdaEoS,
    Armijo,
    Constant,
    ExactSharpness,
    HyperGradient,
    Polyak,
    WarmupCosine,
)
from eos_core.numerics import NUMPY  # noqa: E402


class Reference:
    """f, g and H of a loss at any parameters, through the flattened loss (jitted once)."""

    def __init__(self, loss, params):
        w, self.unravel = ravel_pytree(params)
        self.f = jax.jit(lambda v: loss(self.unravel(v)))
        self._at = jax.jit(lambda v: (loss(self.unravel(v)), jax.grad(lambda x: loss(self.unravel(x)))(v),
                                      jax.hessian(lambda x: loss(self.unravel(x)))(v)))

    def __call__(self, params):
        f, g, h = self._at(ravel_pytree(params)[0])
        return float(f), np.asarray(g), np.asarray(h)


def replay(law, stats_per_step, probes=None, hyperparams=None):
    """Feed the core law (numpy) the statistics of each step; returns the LawOutputs."""
    state = law.init(None, hyperparams=hyperparams, numerics=NUMPY)
    outputs = []
    for t, stats in enumerate(stats_per_step):
        out = law.update(state, stats) if probes is None or probes[t] else law.hold(state)
        outputs.append(out)
        state = out.state
    return outputs


def lrs(records):
    return np.array([r["lr"] for r in records])


def trains(records, factor=1.0):
    return records[-1]["loss"] < factor * records[0]["loss"]


def test_cdat(x64, models):
    params, loss = models.regression()
    ref = Reference(loss, params)
    _, _, records = models.run(tune(optax.sgd(1.0), CDAT(scale=2.0)), loss, params, 10)
    stats = []
    for r in records:
        _, g, h = ref(r["params"])
        stats.append({S.GRAD_DOT_UPDATE: -g @ g, S.CURVATURE: g @ h @ g})
    np.testing.assert_allclose(lrs(records), [float(o.lr) for o in replay(CDAT(scale=2.0), stats)], rtol=1e-9)
    assert trains(records)


def test_cdat_with_ema_on_adam(x64, models):
    params, loss = models.regression()
    ref = Reference(loss, params)
    law = CDAT(scale=1.0, ema=0.5)
    _, _, records = models.run(tune(optax.adam(1.0), law), loss, params, 10)
    adam, adam_state = optax.adam(1.0), None  # an independent Adam gives u
    stats = []
    for r in records:
        _, g, h = ref(r["params"])
        grads = ref.unravel(jnp.asarray(g))
        adam_state = adam.init(grads) if adam_state is None else adam_state
        u, adam_state = adam.update(grads, adam_state)
        u = np.asarray(ravel_pytree(u)[0])
        stats.append({S.GRAD_DOT_UPDATE: g @ u, S.CURVATURE: u @ h @ u})
    np.testing.assert_allclose(lrs(records), [float(o.lr) for o in replay(law, stats)], rtol=1e-9)
    assert trains(records)


def test_exact_sharpness(x64, models):
    params, loss = models.regression()
    ref = Reference(loss, params)
    law = ExactSharpness(scale=2.0, power_iters=500, power_tol=1e-12)
    _, _, records = models.run(tune(optax.sgd(1.0), law), loss, params, 8)
    stats = []
    for r in records:
        eig = np.linalg.eigvalsh(ref(r["params"])[2])
        stats.append({S.SHARPNESS: eig[np.argmax(np.abs(eig))]})
    np.testing.assert_allclose([r["sharpness"] for r in records], [s[S.SHARPNESS] for s in stats], rtol=1e-7)
    np.testing.assert_allclose(lrs(records), [float(o.lr) for o in replay(law, stats)], rtol=1e-7)
    assert trains(records)


def test_exact_sharpness_of_the_preconditioned_hessian_on_adam(x64, models):
    params, loss = models.regression()
    ref = Reference(loss, params)
    law = ExactSharpness(scale=2.0, preconditioned=True, power_iters=1000, power_tol=1e-12)
    _, _, records = models.run(tune(optax.adam(1.0), law), loss, params, 6)
    adam, adam_state = optax.adam(1.0), None
    stats = []
    for t, r in enumerate(records, start=1):
        _, g, h = ref(r["params"])
        grads = ref.unravel(jnp.asarray(g))
        adam_state = adam.init(grads) if adam_state is None else adam_state
        _, adam_state = adam.update(grads, adam_state)
        nu = np.asarray(ravel_pytree(adam_state[0].nu)[0])
        p = (1 - 0.9**t) * (np.sqrt(nu / (1 - 0.999**t)) + 1e-8)  # Adam's P, first-moment correction included
        eig = np.linalg.eigvalsh(h / np.sqrt(np.outer(p, p)))
        stats.append({S.PRECONDITIONED_SHARPNESS: eig[np.argmax(np.abs(eig))]})
    np.testing.assert_allclose(lrs(records), [float(o.lr) for o in replay(law, stats)], rtol=1e-6)
    assert trains(records)


def _power_steps(h, v, iters):
    """Warm-started power iteration as the core runs it: returns (Rayleigh quotient, next warm start)."""
    for _ in range(iters):
        w = h @ v
        value = v @ w
        v = w / np.linalg.norm(w)
    return value, v


def test_adaeos_two_warm_started_power_steps(x64, models):
    params, loss = models.regression()
    ref = Reference(loss, params)
    law = AdaEoS(target=2.0, gamma=0.5, lr_init=0.1)
    assert law.power_iters == 2 and law.power_tol == 0.0
    opt = tune(optax.sgd(1.0), law)
    v = np.asarray(ravel_pytree(opt.init(params).eigenvector)[0])
    _, _, records = models.run(opt, loss, params, 10)
    stats = []
    for r in records:
        value, v = _power_steps(ref(r["params"])[2], v, 2)
        stats.append({S.SHARPNESS: value})
    np.testing.assert_allclose(lrs(records), [float(o.lr) for o in replay(law, stats)], rtol=1e-9)
    assert trains(records)


def test_adaeos_holds_lr_times_sharpness_at_its_target_on_a_quadratic(x64, models):
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    a = jnp.asarray((q * np.geomspace(0.5, 10.0, 8)) @ q.T)

    def loss(p):
        return 0.5 * p["w"] @ a @ p["w"]

    law = AdaEoS(target=1.8, gamma=0.5, lr_init=0.01)
    _, _, records = models.run(tune(optax.sgd(1.0), law), loss, {"w": jnp.asarray(rng.standard_normal(8))}, 40)
    products = lrs(records) * 10.0
    assert products[0] < 0.5  # it starts far from the edge ...
    np.testing.assert_allclose(products[-10:], 1.8, rtol=1e-2)  # ... and settles at the target
    assert trains(records, 1e-3)


def test_dcao_sets_momentum_and_weight_decay_of_the_base(x64, models):
    params, loss = models.regression()
    ref = Reference(loss, params)

    def sgd_with_decay(learning_rate, momentum, weight_decay):
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))

    base = optax.inject_hyperparams(sgd_with_decay)(learning_rate=1.0, momentum=0.5, weight_decay=1e-3)
    law = DCAO(target=1.5, lr_init=0.3, momentum_bounds=(0.0, 0.9), weight_decay_bounds=(0.0, 0.01),
               momentum_sensitivity=0.2, weight_decay_sensitivity=0.2)
    _, _, records = models.run(tune(base, law, probe_every=2), loss, params, 10)
    stats = []
    for r in records:
        eig = np.linalg.eigvalsh(ref(r["params"])[2])[::-1]
        stats.append({S.TOP_EIGENVALUES: eig[:2]})
    probes = [t % 2 == 0 for t in range(len(records))]
    expected = replay(law, stats, probes, hyperparams={"momentum": 0.5, "weight_decay": 1e-3})  # the base's
    np.testing.assert_allclose(lrs(records), [float(o.lr) for o in expected], rtol=1e-8)
    np.testing.assert_allclose([r["momentum"] for r in records], [float(o.hyperparams["momentum"]) for o in expected],
                               rtol=1e-8)
    np.testing.assert_allclose([r["weight_decay"] for r in records],
                               [float(o.hyperparams["weight_decay"]) for o in expected], rtol=1e-8)
    np.testing.assert_allclose([r["lambda_1"] for r in records if r["probed"]], [s[S.TOP_EIGENVALUES][0] for s, p
                               in zip(stats, probes, strict=True) if p], rtol=1e-8)
    # applied: the base optimizer's injected hyperparameters are the law's ...
    for r in records:
        assert float(r["state"].base_state.hyperparams["momentum"]) == pytest.approx(r["momentum"], rel=1e-12)
        assert float(r["state"].base_state.hyperparams["weight_decay"]) == pytest.approx(r["weight_decay"], rel=1e-12)
    # ... and the steps taken are heavy-ball SGD with coupled weight decay under those values, each acting from the
    # step after the one that decided it (this step's u was formed before the law saw this step's curvature)
    trace, momentum, weight_decay = 0.0, 0.5, 1e-3
    for r in records:
        w = np.asarray(ravel_pytree(r["params"])[0])
        trace = momentum * trace + ref(r["params"])[1] + weight_decay * w
        np.testing.assert_allclose(ravel_pytree(r["updates"])[0], -r["lr"] * trace, rtol=1e-9)
        momentum, weight_decay = r["momentum"], r["weight_decay"]
    assert len({r["momentum"] for r in records}) > 2
    # the clips hold
    rates = lrs(records)
    ratios = rates[1:] / rates[:-1]
    assert np.all(ratios >= 0.8 - 1e-12) and np.all(ratios <= 1.1 + 1e-12)
    assert np.any(np.isclose(ratios, 1.1, rtol=1e-12))  # the upper clip was active (r far below the target)
    assert all(0.0 <= r["momentum"] <= 0.9 and 0.0 <= r["weight_decay"] <= 0.01 for r in records)
    assert trains(records)


def test_dcao_refuses_a_base_whose_knobs_it_cannot_set(x64, models):
    params, _ = models.mlp()
    # at construction (checked on a synthetic parameter vector) ...
    with pytest.raises(ValueError, match="inject_hyperparams"):
        tune(optax.sgd(1.0, momentum=0.9), DCAO(lr_init=0.1))
    no_momentum = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)  # momentum=None: there is no knob
    tune(no_momentum, DCAO(lr_init=0.1)).init(params)  # fine: a momentum of 0 stays 0 under DCAO's rule
    with pytest.raises(ValueError, match="momentum"):
        tune(no_momentum, DCAO(lr_init=0.1, momentum_bounds=(0.1, 0.9)))
    scheduled = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0, momentum=optax.constant_schedule(0.9))
    with pytest.raises(ValueError, match="schedule"):
        tune(scheduled, DCAO(lr_init=0.1))
    adam = optax.inject_hyperparams(optax.adam)(learning_rate=1.0, b1=0.8)
    state = tune(adam, DCAO(lr_init=0.1)).init(params)
    assert float(state.law_state.momentum) == pytest.approx(0.8)  # Adam's b1 is the momentum
    # ... or at init, for a base whose init needs the real parameter structure (a mask given as a tree)
    masked = optax.chain(optax.masked(optax.add_decayed_weights(1e-3), {k: k.startswith("w") for k in params}),
                         optax.sgd(1.0, momentum=0.9))
    opt = tune(masked, DCAO(lr_init=0.1))
    with pytest.raises(ValueError, match="inject_hyperparams"):
        opt.init(params)


def test_armijo(x64, models):
    params, loss = models.regression()
    ref = Reference(loss, params)
    law = Armijo(c=0.3, lr_max=50.0, lr_init=1.0)
    _, _, records = models.run(tune(optax.sgd(1.0), law), loss, params, 10)
    stats = []
    for r in records:
        f, g, _ = ref(r["params"])
        w = ravel_pytree(r["params"])[0]
        stats.append({S.LOSS: f, S.GRAD_DOT_UPDATE: -g @ g,
                      S.TRIAL_LOSS: lambda eta, w=w, g=g: float(ref.f(w - eta * jnp.asarray(g)))})
    expected = replay(law, stats)
    np.testing.assert_allclose(lrs(records), [float(o.lr) for o in expected], rtol=1e-12)
    np.testing.assert_array_equal([r["trials"] for r in records], [float(o.diagnostics["trials"]) for o in expected])
    assert any(r["trials"] > 1 for r in records)  # the search did backtrack
    for r, nxt, s in zip(records, records[1:], stats, strict=False):  # every accepted step satisfies its condition
        assert r["accepted"] == 1.0
        assert nxt["loss"] <= s[S.LOSS] + 0.3 * r["lr"] * s[S.GRAD_DOT_UPDATE] + 1e-12
    assert trains(records)


def test_polyak_with_zero_optimum_on_an_interpolating_problem(x64, models):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((8, 20)))
    y = x @ jnp.asarray(rng.standard_normal(20))  # 20 unknowns, 8 equations: the minimum is 0

    def loss(p):
        return 0.5 * jnp.mean((x @ p["w"] - y) ** 2)

    params = {"w": jnp.zeros(20)}
    ref = Reference(loss, params)
    law = Polyak(f_star=0.0, lr_max=100.0)
    _, _, records = models.run(tune(optax.sgd(1.0), law), loss, params, 30)
    stats = []
    for r in records:
        f, g, _ = ref(r["params"])
        stats.append({S.LOSS: f, S.GRAD_NORM_SQ: g @ g})
    np.testing.assert_allclose(lrs(records), [float(o.lr) for o in replay(law, stats)], rtol=1e-10)
    assert records[-1]["loss"] < 1e-3 * records[0]["loss"]


def test_hypergradient(x64, models):
    params, loss = models.regression()
    ref = Reference(loss, params)
    law = HyperGradient(beta=0.2, lr_init=0.5)
    _, _, records = models.run(tune(optax.sgd(1.0), law), loss, params, 10)
    stats, previous = [], None
    for r in records:
        g = ref(r["params"])[1]
        cosine = 0.0 if previous is None else float(g @ -previous / (np.linalg.norm(g) * np.linalg.norm(previous)))
        stats.append({S.GRAD_PREV_UPDATE_COSINE: cosine})
        previous = g
    np.testing.assert_allclose([r["cosine"] for r in records], [s[S.GRAD_PREV_UPDATE_COSINE] for s in stats],
                               rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(lrs(records), [float(o.lr) for o in replay(law, stats)], rtol=1e-10)
    assert len(set(lrs(records))) > 5
    assert trains(records)


@pytest.mark.parametrize("law,probe_every", [(Constant(0.5), 1),
                                              (WarmupCosine(peak_lr=1.0, total_steps=10, warmup_steps=3), 3)])
def test_schedules_need_no_statistics(x64, models, law, probe_every):
    params, loss = models.regression()
    _, state, records = models.run(tune(optax.sgd(1.0), law, probe_every=probe_every), loss, params, 10)
    expected = [float(law.lr_at(t)) for t in range(10)]  # hold steps advance the schedule as probes do
    np.testing.assert_allclose(lrs(records), expected, rtol=1e-12)
    ref = Reference(loss, params)
    for r in records:  # the step applied is -lr * g
        np.testing.assert_allclose(ravel_pytree(r["updates"])[0], -r["lr"] * ref(r["params"])[1], rtol=1e-12)
    assert [r["probed"] for r in records] == [float(t % probe_every == 0) for t in range(10)]
    assert trains(records)
    assert "numerator" not in state.diagnostics  # the keys of the registry for this law only
    found = diagnostics(state)
    assert tuple(found) == D.keys_for(law) and found["route"] == routes.AUTO  # never resolved: nothing to measure
    assert math.isnan(found["sharpness"]) and math.isnan(found["lr_sharpness"])
