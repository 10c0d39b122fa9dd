"""``tune`` speaks the core vocabulary: TunerSettings options (old names deprecated, PyTorch-only options refused),
exactly the registry's diagnostics keys, lr_sharpness = applied lr x sharpness, the power-iteration reuse rule
(counted in Hessian-vector products), the shared random start vector, the law's request (Lanczos steps) and int32
counters that count past 2^24."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from eos_core import diagnostics as D  # noqa: E402
from eos_core import routes  # noqa: E402
from eos_core.adapters.jax import (  # noqa: E402
    curvature,
    decode_diagnostics,
    diagnostics,
    finite_difference_step,
    hvp_route,
    jax_numerics,
    tune,
)
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
from eos_core.settings import TunerSettings  # noqa: E402
from eos_core.spectral import random_start  # noqa: E402

LAWS = [
    CDAT(scale=2.0), DCAO(lr_init=0.1), DCAO(preconditioned=True, lr_init=0.1, num_eigenvalues=3, lanczos_steps=7),
    AdaEoS(lr_init=0.1), AdaEoS(preconditioned=True, lr_init=0.1), Armijo(), Polyak(), HyperGradient(lr_init=0.1),
    ExactSharpness(), ExactSharpness(preconditioned=True), Constant(0.1), WarmupCosine(1.0, 10),
]


def _base_for(law):
    """A base the law can drive: injected hyperparameters for DCAO, Adam for a preconditioned law."""
    if isinstance(law, DCAO):
        if law.preconditioned:
            return optax.inject_hyperparams(optax.adam)(learning_rate=1.0, b1=0.9)
        return optax.inject_hyperparams(optax.sgd)(learning_rate=1.0, momentum=0.5)
    return optax.adam(1.0) if law.request().preconditioned else optax.sgd(1.0)


def _counting(loss):
    """``(value_fn, calls)``: ``value_fn`` is ``loss`` and counts its evaluations at run time (one per
    Hessian-vector product on the fd-onesided route, whose product is one gradient at a shifted point)."""
    calls = [0]

    def bump():
        calls[0] += 1

    def value_fn(p):
        jax.debug.callback(bump)
        return loss(p)

    return value_fn, calls


def _counted_run(opt, loss, params, steps):
    """Run ``steps`` jitted steps; returns ``[(Hessian-vector products, diagnostics)]`` per step. The step's own
    gradient is taken from the uncounted loss, so the count is that of the tuner's evaluations only."""
    value_fn, calls = _counting(loss)

    @jax.jit
    def step(p, s):
        updates, s = opt.update(jax.grad(loss)(p), s, p, value_fn=value_fn)
        return optax.apply_updates(p, updates), s

    state, rows = opt.init(params), []
    for _ in range(steps):
        calls[0] = 0
        params, state = step(params, state)
        jax.effects_barrier()
        rows.append((calls[0], diagnostics(state)))
    return rows


# -- the diagnostics keys and their derivations ------------------------------------------------------------
@pytest.mark.parametrize("sharpness_every", [None, 2])
@pytest.mark.parametrize("law", LAWS, ids=[f"{type(law).__name__}{i}" for i, law in enumerate(LAWS)])
def test_diagnostics_have_exactly_the_registry_keys(x64, models, law, sharpness_every):
    params, loss = models.mlp()
    opt = tune(_base_for(law), law, probe_every=2, sharpness_every=sharpness_every)
    at_init = diagnostics(opt.init(params))
    _, _, records = models.run(opt, loss, params, 3)
    expected = D.keys_for(law)
    assert tuple(at_init) == expected and at_init["step"] == 0
    for t, r in enumerate(records):
        found = {k: v for k, v in r.items() if k in expected}
        assert tuple(found) == expected  # the same keys, in registry order, and nothing else from diagnostics
        assert set(r) - set(expected) <= {"params", "updates", "state"}  # (added by the test's run helper)
        for key in D.INTEGER_KEYS:
            assert type(found[key]) is int, key
        assert isinstance(found["route"], str)
        assert found["step"] == t and found["law_lr"] == found["lr"]
        # lr_sharpness is the applied lr times sharpness, whoever measured it
        for plain, product in (("sharpness", "lr_sharpness"),
                               ("preconditioned_sharpness", "preconditioned_lr_sharpness")):
            assert math.isnan(found[product]) == math.isnan(found[plain])
            if not math.isnan(found[plain]):
                assert found[product] == pytest.approx(found["lr"] * found[plain], rel=1e-12)
        tracked = sharpness_every is not None and t % sharpness_every == 0
        assert math.isnan(found["power_iterations"]) == (not tracked)
        assert math.isnan(found["alignment"]) == (not tracked)
        # sharpness: tracked, else the law's own lambda_max of H on its probe steps (t = 0, 2), else NaN
        law_measures = D.law_sharpness(law, dict.fromkeys(("sharpness", "preconditioned_sharpness", "lambda_1"),
                                                          1.0))[0] == 1.0
        assert math.isnan(found["sharpness"]) == (not (tracked or (law_measures and t % 2 == 0)))


def test_sharpness_is_tracked_lambda_max_and_law_products_keep_their_own_names(x64, models):
    params, loss = models.mlp()
    law = AdaEoS(target=2.0, gamma=0.5, lr_init=0.1)  # its own estimate: 2 power-iteration steps
    opt = tune(optax.sgd(1.0), law, sharpness_every=1, sharpness_iters=500, sharpness_tol=1e-12)
    _, _, records = models.run(opt, loss, params, 4)
    for r in records:
        eig = np.linalg.eigvalsh(np.asarray(models.explicit(loss, r["params"])[4]))
        assert r["sharpness"] == pytest.approx(eig[np.argmax(np.abs(eig))], rel=1e-8)  # tracking's, converged
        assert r["lr_sharpness"] == pytest.approx(r["lr"] * r["sharpness"], rel=1e-12)
        assert r["lr_smoothed_sharpness"] == pytest.approx(r["lr"] * r["smoothed_sharpness"], rel=1e-12)
    # DCAO: lambda_1 is its sharpness; lr_lambda_1 uses the lr before the probe, lr_sharpness the applied one
    dcao = DCAO(lr_init=0.1, num_eigenvalues=2)
    _, _, records = models.run(tune(_base_for(dcao), dcao), loss, params, 3)
    for before, r in zip([0.1] + [r["lr"] for r in records], records, strict=False):
        assert r["sharpness"] == r["lambda_1"]
        assert r["lr_sharpness"] == pytest.approx(r["lr"] * r["lambda_1"], rel=1e-12)
        assert r["lr_lambda_1"] == pytest.approx(before * r["lambda_1"], rel=1e-12)


def test_alignment_is_the_cosine_of_the_update_with_the_top_eigenvector(x64, models):
    params, loss = models.mlp()
    opt = tune(optax.sgd(1.0, momentum=0.5), CDAT(scale=2.0), sharpness_every=1, sharpness_iters=2000,
               sharpness_tol=1e-14)
    _, state, records = models.run(opt, loss, params, 3)
    r = records[-1]
    h = np.asarray(models.explicit(loss, r["params"])[4])
    eig, vectors = np.linalg.eigh(h)
    top = vectors[:, np.argmax(np.abs(eig))]
    u = np.asarray(ravel_pytree(r["updates"])[0])
    assert r["alignment"] == pytest.approx(abs(u @ top) / np.linalg.norm(u), rel=1e-6)
    v = np.asarray(ravel_pytree(state.eigenvector)[0])
    assert r["alignment"] == pytest.approx(abs(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v)), rel=1e-12)


def test_route_is_the_route_in_use_and_hvp_route_is_apart(x64, models):
    params, loss = models.mlp()
    cases = [  # (law, options, route, hvp_route)
        (CDAT(), {"sharpness_every": 1}, routes.JVP_JVP, routes.JVP_GRAD),  # u^T H u forward-over-forward
        (ExactSharpness(), {}, routes.JVP_GRAD, routes.JVP_GRAD),  # no u^T H u: the H v route
        (Constant(0.1), {"sharpness_every": 1, "route": routes.DOUBLE_BACKWARD}, routes.DOUBLE_BACKWARD,
         routes.DOUBLE_BACKWARD),
        (Polyak(), {"route": routes.FD_CENTRAL}, routes.FD_CENTRAL, "none"),  # nothing measured: the setting
        (Polyak(), {}, routes.AUTO, "none"),  # ... "auto", never resolved
    ]
    for law, options, route, hvp in cases:
        opt = tune(optax.sgd(1.0), law, **options)
        assert diagnostics(opt.init(params))["route"] == options.get("route", routes.AUTO)
        _, state, records = models.run(opt, loss, params, 1)
        assert (records[0]["route"], hvp_route(state)) == (route, hvp), law


# -- one power iteration when the law's probe already measured lambda_max --------------------------------------
def test_tracking_reuses_the_laws_estimate_when_it_is_at_least_as_strict(x64, models):
    params, loss = models.mlp()

    def run(law, **options):
        return _counted_run(tune(optax.sgd(1.0), law, route=routes.FD_ONESIDED, **options), loss, params, 4)

    law_only = run(ExactSharpness(power_iters=20, power_tol=1e-3))
    reused = run(ExactSharpness(power_iters=20, power_tol=1e-3), sharpness_every=1)  # same settings
    assert all(n > 0 for n, _ in law_only)
    assert [n for n, _ in reused] == [n for n, _ in law_only]  # no second power iteration ...
    for (n, d), (_, own) in zip(reused, law_only, strict=True):
        assert d["power_iterations"] == n  # ... the law's estimate, its products ...
        assert d["sharpness"] == own["sharpness"] and d["lr"] == own["lr"]  # ... and its value
        assert not math.isnan(d["alignment"])
    # a stricter tolerance than the law's: tracking runs too, continuing from the law's vector (so it needs
    # fewer products than the law's cold start on the first step)
    stricter = run(ExactSharpness(power_iters=20, power_tol=1e-3), sharpness_every=1, sharpness_tol=1e-4)
    first, d = stricter[0]
    assert first == law_only[0][0] + d["power_iterations"] and 1 <= d["power_iterations"] < law_only[0][0]
    assert all(n > d["power_iterations"] >= 1 for n, d in stricter)
    # AdaEoS runs a fixed number of steps (tolerance 0): never reused
    ada = run(AdaEoS(lr_init=0.1, power_iters=2), sharpness_every=1)
    assert all(n == 2 + d["power_iterations"] for n, d in ada)
    # between probes tracking runs alone, from the last vector; on probe steps it reuses the law's estimate
    between = run(ExactSharpness(power_iters=20, power_tol=1e-3), sharpness_every=1, probe_every=2)
    assert [d["probed"] for _, d in between] == [1.0, 0.0, 1.0, 0.0] and between[0][0] == law_only[0][0]
    assert all(n == d["power_iterations"] for n, d in between)


def test_tracking_reuses_the_preconditioned_estimate_of_a_preconditioned_law(x64, models):
    params, loss = models.mlp()
    law = ExactSharpness(preconditioned=True, power_iters=20, power_tol=1e-3)
    law_only = _counted_run(tune(optax.adam(1.0), law, route=routes.FD_ONESIDED), loss, params, 3)
    both = _counted_run(tune(optax.adam(1.0), law, route=routes.FD_ONESIDED, sharpness_every=1), loss, params, 3)
    for (n, d), (own, alone) in zip(both, law_only, strict=True):
        # H is tracked (power_iterations counts those products); the preconditioned estimate is the law's
        assert n == own + d["power_iterations"]
        assert d["preconditioned_sharpness"] == alone["preconditioned_sharpness"]
        assert not math.isnan(d["sharpness"]) and math.isnan(alone["sharpness"])


def test_dcao_lanczos_steps_come_from_the_request(x64, models):
    params, loss = models.mlp()  # 51 parameters: more than the default 20 steps
    assert ravel_pytree(params)[0].size > 20
    for law, steps in ((DCAO(lr_init=0.1), 20), (DCAO(lr_init=0.1, lanczos_steps=7), 7)):
        rows = _counted_run(tune(_base_for(law), law, route=routes.FD_ONESIDED), loss, params, 2)
        assert [n for n, _ in rows] == [steps, steps]


# -- settings ----------------------------------------------------------------------------------------------
def test_deprecated_option_names_warn_and_keep_working(x64, models):
    params, loss = models.mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = tune(optax.sgd(1.0), CDAT(), sharpness_every=1, power_iters=5, power_tol=0.0)
    assert sorted(str(w.message) for w in caught) == [
        "tune: power_iters= is deprecated, use sharpness_iters= (same meaning)",
        "tune: power_tol= is deprecated, use sharpness_tol= (same meaning)"]
    assert {(w.category, w.filename) for w in caught} == {(DeprecationWarning, __file__)}  # the caller of tune
    _, _, records = models.run(opt, loss, params, 1)
    assert records[0]["power_iterations"] == 5.0  # sharpness_iters=5, sharpness_tol=0
    with pytest.warns(DeprecationWarning, match="initial_lr"):
        opt = tune(optax.sgd(1.0), AdaEoS(), initial_lr=0.3)
    assert diagnostics(opt.init(params))["lr"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="sharpness_iters"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tune(optax.sgd(1.0), CDAT(), power_iters=5, sharpness_iters=5)


@pytest.mark.parametrize("option,value", [("lr_mode", "multiply"), ("fd_above", 1000), ("clipped_gradients", True),
                                          ("linear_in_lr", True)])
def test_pytorch_only_options_are_refused_unless_default(option, value):
    with pytest.raises(ValueError, match=f"does not support the option\\(s\\) {option}"):
        tune(optax.sgd(1.0), CDAT(), **{option: value})
    tune(optax.sgd(1.0), CDAT(), **{option: getattr(TunerSettings(), option)})  # the default is fine
    with pytest.raises(ValueError, match="does not support"):
        tune(optax.sgd(1.0), CDAT(), settings=TunerSettings(**{option: value}))
    with pytest.raises(ValueError, match="unknown option"):
        tune(optax.sgd(1.0), CDAT(), sharpness_evry=2)


def test_a_settings_object_and_keywords_combine(x64, models):
    params, loss = models.mlp()
    settings = TunerSettings(probe_every=3, sharpness_every=2)
    _, _, records = models.run(tune(optax.sgd(1.0), CDAT(), settings=settings), loss, params, 4)
    assert [r["probed"] for r in records] == [1.0, 0.0, 0.0, 1.0]
    assert [math.isnan(r["power_iterations"]) for r in records] == [False, True, False, True]
    _, _, records = models.run(tune(optax.sgd(1.0), CDAT(), settings=settings, probe_every=1), loss, params, 2)
    assert [r["probed"] for r in records] == [1.0, 1.0]  # the keyword wins
    with pytest.raises(ValueError, match="TunerSettings"):
        tune(optax.sgd(1.0), CDAT(), settings={"probe_every": 2})


def test_reference_lr_starts_a_law_without_lr_init(x64, models):
    params, _ = models.mlp()
    with pytest.raises(ValueError, match="reference_lr"):
        tune(optax.sgd(1.0), AdaEoS())
    assert diagnostics(tune(optax.sgd(1.0), AdaEoS(), reference_lr=0.2).init(params))["lr"] == pytest.approx(0.2)
    assert diagnostics(tune(optax.sgd(1.0), CDAT(), reference_lr=0.2).init(params))["lr"] == pytest.approx(0.2)
    # the law's own lr_init wins
    assert diagnostics(tune(optax.sgd(1.0), AdaEoS(lr_init=0.5), reference_lr=0.2).init(params))["lr"] == 0.5
    dcao = DCAO()
    state = tune(_base_for(dcao), dcao, reference_lr=0.2).init(params)
    assert float(state.law_state.lr) == pytest.approx(0.2)


def test_fd_eps_sizes_the_finite_difference_step(x64, models):
    params, loss = models.mlp()
    u = jax.tree.map(lambda g: -g, jax.grad(loss)(params))
    w, flat_u = np.asarray(ravel_pytree(params)[0]), np.asarray(ravel_pytree(u)[0])
    norm = float(np.linalg.norm(flat_u))
    scale = routes.parameter_scale_along(float(np.abs(w) @ np.abs(flat_u)), norm)
    for central in (True, False):
        expected = routes.finite_difference_step(scale, norm, 1e-6, central=central)
        assert float(finite_difference_step(params, u, central=central, eps=1e-6)) == pytest.approx(expected,
                                                                                                    rel=1e-12)
    _, _, records = models.run(tune(optax.sgd(1.0), CDAT(), route=routes.FD_ONESIDED, fd_eps=1e-6), loss, params, 1)
    grads = jax.grad(loss)(params)
    coarse = float(curvature(loss, params, u, route=routes.FD_ONESIDED, grads=grads, fd_eps=1e-6)[0].value)
    fine = float(curvature(loss, params, u, route=routes.FD_ONESIDED, grads=grads)[0].value)
    assert records[0]["denominator"] == pytest.approx(abs(coarse), rel=1e-12)
    assert abs(coarse - fine) > 1e-6 * abs(fine)  # the option did change the step


def test_skip_nonfinite_false_applies_a_non_finite_step(x64, models):
    params, clean_loss = models.mlp()

    def loss(p, poison):
        return clean_loss(p) * jnp.where(poison, jnp.nan, 1.0)

    opt = tune(optax.sgd(1.0), CDAT(scale=2.0), skip_nonfinite=False, warn=False)
    _, state, records = models.run(opt, loss, params, 3, value_fn_args=lambda t: (jnp.asarray(t == 1),))
    bad = records[1]
    assert bad["skipped"] == 0.0 and bad["skipped_steps"] == 0 and bad["step"] == 1
    assert bad["fallback"] == 1.0 and bad["fallback_steps"] == 1  # the law kept its lr ...
    assert all(np.isnan(np.asarray(x)).all() for x in jax.tree.leaves(bad["updates"]))  # ... and the step went in
    assert int(state.count) == 3 and int(state.skipped) == 0


# -- start vectors and counters -------------------------------------------------------------------------------
def test_start_vectors_are_the_cores_random_start(x64, models):
    params, _ = models.mlp()
    params = {**params, "w0": params["w0"].astype(jnp.float32)}  # each leaf keeps its dtype
    opt = tune(optax.adam(1.0), CDAT(), sharpness_every=1, seed=7)
    shapes = [x.shape for x in jax.tree.leaves(params)]
    for state in (opt.init(params), jax.jit(opt.init)(params)):
        for vector, seed in ((state.eigenvector, 7), (state.preconditioned_eigenvector, 8)):
            leaves = jax.tree.leaves(vector)
            for got, want, like in zip(leaves, random_start(shapes, seed), jax.tree.leaves(params), strict=True):
                assert got.dtype == like.dtype
                np.testing.assert_array_equal(np.asarray(got), want.astype(like.dtype))
    big = {"w": jnp.zeros((300, 300))}  # 90k entries: as a constant, the program text would hold them all
    hlo = jax.jit(tune(optax.sgd(1.0), ExactSharpness()).init).lower(big).as_text()
    assert len(hlo) < 50_000  # drawn by a host callback at run time, not embedded in the program


@pytest.mark.parametrize("law", [WarmupCosine(peak_lr=1.0, total_steps=100), AdaEoS(lr_init=0.1)],
                         ids=["WarmupCosine", "AdaEoS"])
def test_law_counters_are_integers_that_count_past_2_to_the_24(models, law):
    assert not jax.config.read("jax_enable_x64")  # float32 scalars: a float32 counter would stop at 2^24
    params, loss = models.mlp(dtype=jnp.float32)
    opt = tune(optax.sgd(1.0), law, probe_every=2)
    state = opt.init(params)
    start = 2**24 - 2
    state = state._replace(law_state=state.law_state._replace(count=jnp.asarray(start, jnp.int32)))
    _, state, records = models.run(opt, loss, params, 4, state=state)
    assert state.law_state.count.dtype == jnp.int32
    assert int(state.law_state.count) == start + (4 if isinstance(law, WarmupCosine) else 2)  # AdaEoS: per probe
    if isinstance(law, WarmupCosine):
        assert [r["lr"] for r in records] == [0.0] * 4  # past total_steps: the final lr
    # a checkpoint keeps the dtypes: numpy copies, or the law's host form
    saved = jax.tree.map(np.asarray, state)
    restored = jax.tree.map(jnp.asarray, saved)
    assert restored.law_state.count.dtype == jnp.int32 and restored.count.dtype == jnp.int32
    host = law.state_from_host(state.law_state, law.state_to_host(state.law_state), numerics=jax_numerics())
    assert host.count.dtype == jnp.int32 and int(host.count) == int(state.law_state.count)
    _, resumed, _ = models.run(opt, loss, params, 2, state=restored._replace(law_state=host))
    assert int(resumed.law_state.count) == int(state.law_state.count) + (2 if isinstance(law, WarmupCosine) else 1)
    assert state.diagnostics.values.dtype == jnp.float32  # the diagnostics vector stays float


def test_decode_diagnostics_counts_steps_taken():
    keys = ("lr", "skipped", "route_code", "hvp_route_code")
    taken = decode_diagnostics(keys, [0.1, 0.0, 1.0, 2.0], count=5, skipped_steps=2, fallback_steps=1)
    assert taken == {"step": 4, "lr": 0.1, "skipped": 0.0, "route": routes.JVP_JVP, "skipped_steps": 2,
                     "fallback_steps": 1}
    assert list(taken) == ["step", "lr", "skipped", "route", "skipped_steps", "fallback_steps"]  # registry order
    skipped = decode_diagnostics(keys, [0.1, 1.0, 1.0, 2.0], count=5, skipped_steps=3, fallback_steps=1)
    assert skipped["step"] == 5  # the index the next step taken gets
    assert decode_diagnostics(keys, [0.1, 0.0, 0.0, 0.0], count=0, skipped_steps=0, fallback_steps=0)["step"] == 0
