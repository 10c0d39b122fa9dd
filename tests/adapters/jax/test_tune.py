"""``tune``: the on-edge property, probing every k steps, jit, resume, bad input, settings, diagnostics."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from eos_core import routes  # noqa: E402
from eos_core.adapters.jax import (  # noqa: E402
    TuneState,
    diagnostics,
    find_tune_state,
    hvp_route,
    tune,
    warn_bad_steps,
)
from eos_core.laws import CDAT, DCAO, Constant, ExactSharpness  # noqa: E402


def quadratic(dim=6, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    a = jnp.asarray((q * np.geomspace(0.1, 10.0, dim)) @ q.T)
    target = jnp.asarray(rng.standard_normal(dim))

    def loss(p):
        w = jnp.concatenate([p["x"], p["y"]]) - target
        return 0.5 * w @ a @ w + 1.0

    params = {"x": jnp.asarray(rng.standard_normal(dim // 2)), "y": jnp.asarray(rng.standard_normal(dim - dim // 2))}
    return params, loss, a


@pytest.mark.parametrize("route", routes.ALL)
def test_cdat_scale_2_keeps_a_quadratic_on_the_edge(x64, models, route):
    params, loss, a = quadratic()
    _, _, records = models.run(tune(optax.sgd(1.0), CDAT(scale=2.0), route=route), loss, params, 12)
    losses = [r["loss"] for r in records]
    # exact routes and central differences (exact on a quadratic up to rounding eps/h, h ~ eps^(1/3)) to 1e-9;
    # one-sided differences carry the rounding error eps/h ~ eps^(1/2) = 1.5e-8 of their step, amplified by the
    # cancellation in g(w + h u) - g(w) (measured up to 1.45e-7 with jax 0.4.30's XLA, 1e-8 with jax 0.10)
    tol = 1e-6 if route == routes.FD_ONESIDED else 1e-9
    for before, after in zip(losses, losses[1:], strict=False):
        assert abs(after - before) <= tol * abs(before)
    # and the rate is the one of eq. 8 with u = -g: 2 |g|^2 / g^T A g
    g = jax.grad(loss)(records[3]["params"])
    g = ravel_pytree(g)[0]
    assert records[3]["lr"] == pytest.approx(float(2 * g @ g / (g @ a @ g)), rel=tol)
    expected_route = {routes.AUTO: routes.JVP_JVP}.get(route, route)
    assert records[-1]["route"] == expected_route


def test_cdat_scale_1_is_the_exact_line_minimiser(x64, models):
    params, loss, _ = quadratic()
    _, _, records = models.run(tune(optax.sgd(1.0), CDAT(scale=1.0)), loss, params, 8)
    for r in records:
        u, lr, start = r["updates"], r["lr"], r["params"]
        direction = jax.tree.map(lambda x, lr=lr: x / lr, u)

        def along(eta, start=start, direction=direction):
            return float(loss(jax.tree.map(lambda w, d: w + eta * d, start, direction)))

        best = along(lr)
        assert best < along(lr * 0.999) and best < along(lr * 1.001)
        # first-order condition: the new gradient is orthogonal to the step
        new_grad = ravel_pytree(jax.grad(loss)(jax.tree.map(jnp.add, start, u)))[0]
        flat = ravel_pytree(direction)[0]
        assert abs(float(new_grad @ flat)) <= 1e-9 * float(flat @ flat)
    assert records[-1]["loss"] < records[0]["loss"]


def test_probe_every_k_probes_at_multiples_of_k_and_holds_in_between(x64, models):
    params, loss = models.mlp()
    k = 3
    _, state, records = models.run(tune(optax.sgd(1.0), CDAT(scale=2.0), probe_every=k), loss, params, 10)
    for t, r in enumerate(records):
        assert r["probed"] == (1.0 if t % k == 0 else 0.0)
        if t % k == 0:  # the rate of eq. 8 at this step, from the explicit Hessian
            w, _, _, g, h = models.explicit(loss, r["params"])
            g = np.asarray(g)
            assert r["lr"] == pytest.approx(2 * (g @ g) / (g @ np.asarray(h) @ g), rel=1e-9)
        else:
            assert r["lr"] == records[t - t % k]["lr"]
            assert math.isnan(r["numerator"])
    assert len({r["lr"] for r in records}) == 4
    assert int(state.count) == 10


def test_jit_and_eager_give_the_same_trajectory(x64, models):
    params, loss = models.mlp()
    opt = tune(optax.sgd(1.0, momentum=0.5), CDAT(scale=2.0, ema=0.5), probe_every=2, sharpness_every=2)
    # two steps: the first probes and measures the sharpness, the second takes the other branch of both conds
    p_jit, _, r_jit = models.run(opt, loss, params, 2, jit=True)
    p_eager, _, r_eager = models.run(opt, loss, params, 2, jit=False)
    assert [r["probed"] for r in r_eager] == [1.0, 0.0]
    np.testing.assert_allclose(ravel_pytree(p_jit)[0], ravel_pytree(p_eager)[0], rtol=1e-12)
    np.testing.assert_allclose([r["lr"] for r in r_jit], [r["lr"] for r in r_eager], rtol=1e-12)
    np.testing.assert_allclose([r["sharpness"] for r in r_jit], [r["sharpness"] for r in r_eager], rtol=1e-10)


def test_resume_from_a_numpy_checkpoint_is_bit_identical(x64, models):
    params, loss = models.mlp()
    opt = tune(optax.adam(1.0), CDAT(scale=2.0, ema=0.9), probe_every=2, sharpness_every=3)
    full_params, full_state, _ = models.run(opt, loss, params, 7)
    mid_params, mid_state, _ = models.run(opt, loss, params, 4)
    saved = jax.tree.map(np.asarray, (mid_params, mid_state))  # what a checkpoint holds
    restored_params, restored_state = jax.tree.map(jnp.asarray, saved)
    assert isinstance(restored_state, TuneState)
    resumed_params, resumed_state, _ = models.run(opt, loss, restored_params, 3, state=restored_state)
    for a, b in zip(jax.tree.leaves((full_params, full_state)), jax.tree.leaves((resumed_params, resumed_state)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("make_base", [lambda: optax.sgd(1.0, momentum=0.9), lambda: optax.adam(1.0)])
def test_non_finite_loss_or_gradient_skips_the_step(x64, models, make_base):
    params, clean_loss = models.mlp()

    def loss(p, poison):
        return clean_loss(p) * jnp.where(poison, jnp.nan, 1.0)

    law = CDAT(scale=2.0) if make_base().init is optax.sgd(1.0).init else CDAT(scale=1.0, lr_max=0.1)
    opt = tune(make_base(), law, sharpness_every=2)
    bad_step = 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final, state, records = models.run(opt, loss, params, 8, value_fn_args=lambda t: (jnp.asarray(t == bad_step),))
        jax.effects_barrier()
    bad = records[bad_step]
    assert math.isnan(bad["loss"])
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(bad["updates"]))
    np.testing.assert_array_equal(ravel_pytree(records[bad_step + 1]["params"])[0], ravel_pytree(bad["params"])[0])
    assert bad["skipped"] == 1.0 and bad["skipped_steps"] == 1
    # the step count did not advance: the skipped step reports the index the next step taken gets
    assert bad["step"] == records[bad_step - 1]["step"] + 1 == records[bad_step + 1]["step"] == bad_step
    assert records[bad_step + 1]["skipped"] == 0.0
    assert int(state.skipped) == 1 and int(state.count) == 7
    assert any("skipped" in str(w.message) for w in caught)
    assert all(np.isfinite(ravel_pytree(final)[0]))
    assert records[-1]["loss"] < records[0]["loss"]


def test_skipped_step_leaves_the_base_and_law_state_unchanged(x64, models):
    params, clean_loss = models.mlp()
    opt = tune(optax.adam(1.0), CDAT(scale=1.0, ema=0.5, lr_max=0.1))
    state = opt.init(params)
    value_fn = clean_loss
    grads = jax.grad(value_fn)(params)
    _, state = opt.update(grads, state, params, value_fn=value_fn)
    nan_grads = jax.tree.map(lambda g: g.at[0].set(jnp.inf), grads)
    updates, after = jax.jit(lambda g, s, p: opt.update(g, s, p, value_fn=value_fn))(nan_grads, state, params)
    with pytest.warns(RuntimeWarning, match="step 1 was skipped"):  # warn=True: raised when the host reads it
        assert diagnostics(after)["skipped"] == 1.0
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(updates))
    for a, b in zip(jax.tree.leaves((state.base_state, state.law_state, state.count)),
                    jax.tree.leaves((after.base_state, after.law_state, after.count)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(after.skipped) == 1


@jax.custom_jvp
def _square_with_nan_curvature(x, poison):
    return 0.5 * x**2


@_square_with_nan_curvature.defjvp
def _square_jvp(primals, tangents):
    x, poison = primals
    dx, _ = tangents
    # first derivative x (exact); its own derivative is NaN where poison is set (sqrt'(0) * 0)
    return 0.5 * x**2, (x + jnp.where(poison, jnp.sqrt(x - x), 0.0)) * dx


def test_non_finite_curvature_keeps_the_last_good_lr(x64, models):
    params = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    scales = jnp.asarray([1.0, 2.0, 3.0])

    def loss(p, poison):
        return jnp.sum(scales * _square_with_nan_curvature(p["w"], poison))

    opt = tune(optax.sgd(1.0), CDAT(scale=1.5), route=routes.JVP_JVP)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, records = models.run(opt, loss, params, 5, value_fn_args=lambda t: (jnp.asarray(t == 2),))
        jax.effects_barrier()
    assert records[2]["fallback"] == 1.0 and records[1]["fallback"] == 0.0
    assert records[2]["lr"] == records[1]["lr"]  # the last good rate ...
    np.testing.assert_allclose(jax.tree.leaves(records[2]["updates"])[0],
                               -records[1]["lr"] * jax.grad(loss)(records[2]["params"], False)["w"], rtol=1e-12)
    assert records[3]["fallback"] == 0.0 and records[3]["lr"] != records[2]["lr"]  # ... then measuring again
    assert any("last learning rate" in str(w.message) for w in caught)
    assert records[-1]["loss"] < records[0]["loss"]


def _poisoned_quadratic():
    """A separable quadratic whose loss is NaN where ``nan_loss`` is set and whose curvature (not its gradient)
    is NaN where ``nan_curvature`` is set."""
    params = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    scales = jnp.asarray([1.0, 2.0, 3.0])

    def loss(p, nan_curvature, nan_loss):
        return jnp.sum(scales * _square_with_nan_curvature(p["w"], nan_curvature)) * jnp.where(nan_loss, jnp.nan, 1.0)

    return params, loss


def _jitted_step(opt, loss):
    def step(p, s, *args):
        def value_fn(q):
            return loss(q, *args)

        grads = jax.grad(value_fn)(p)
        updates, s = opt.update(grads, s, p, value_fn=value_fn)
        return optax.apply_updates(p, updates), s

    return step


def _eos_warnings(caught):
    return [str(w.message) for w in caught if "eos_core" in str(w.message)]


@pytest.mark.parametrize("warn", [True, "jit", False])
def test_only_warn_jit_puts_a_host_callback_into_the_compiled_step(x64, warn):
    params, loss = _poisoned_quadratic()
    # every branch that could hold a callback: probe and hold steps, sharpness tracking on and off
    opt = tune(optax.sgd(1.0), CDAT(scale=1.5), probe_every=2, sharpness_every=2, warn=warn)
    step = _jitted_step(opt, loss)
    args = (params, opt.init(params), jnp.asarray(False), jnp.asarray(False))
    jaxpr = str(jax.make_jaxpr(step)(*args))  # nested jaxprs (cond branches, loops) included
    hlo = jax.jit(step).lower(*args).as_text()
    assert ("debug_callback" in jaxpr) == (warn == "jit")
    assert ("callback" in hlo) == (warn == "jit")


def test_warn_true_raises_on_the_host_from_diagnostics_with_the_counts(x64):
    params, loss = _poisoned_quadratic()
    opt = tune(optax.sgd(1.0), CDAT(scale=1.5), route=routes.JVP_JVP)
    step = jax.jit(_jitted_step(opt, loss))
    bad_curvature, bad_loss = {1, 4}, {2, 3}
    state, p = opt.init(params), params
    messages, found = [], []
    for t in range(6):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p, state = step(p, state, jnp.asarray(t in bad_curvature), jnp.asarray(t in bad_loss))
            jax.effects_barrier()
        assert not _eos_warnings(caught)  # nothing from inside jit ...
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found.append(diagnostics(state))  # ... the host read raises them, pointing at its caller
        assert all(w.filename == __file__ for w in caught)
        messages.append(_eos_warnings(caught))
    assert messages[0] == [] and messages[5] == []
    assert messages[1] == ["eos_core tune: at step 1 the law could not use the statistics (non-finite or degenerate "
                           "curvature) and kept its last learning rate; 1 such step(s) so far"]
    assert messages[2] == ["eos_core tune: step 2 was skipped (non-finite loss, gradient or update); 1 step(s) "
                           "skipped so far; parameters and optimizer state unchanged"]
    assert messages[3] == [messages[2][0].replace("step 2", "step 3").replace("; 1 step(s)", "; 2 step(s)")]
    assert len(messages[4]) == 1 and "at step 4" in messages[4][0] and "2 such step(s) so far" in messages[4][0]
    assert [d["skipped_steps"] for d in found] == [0, 0, 1, 2, 2, 2]
    assert [d["fallback_steps"] for d in found] == [0, 1, 1, 1, 2, 2]  # a skipped step is no fallback
    assert int(state.skipped) == 2 and int(state.fallbacks) == 2 and int(state.count) == 4
    # a reader that remembers the counts it saw reports what happened since then (the Keras callback's way)
    with pytest.warns(RuntimeWarning) as caught:
        warn_bad_steps(found[5], new_skips=2, new_fallbacks=2)
    assert [str(w.message) for w in caught] == [
        "eos_core tune: 2 step(s) up to step 5 were skipped (non-finite loss, gradient or update); 2 step(s) skipped "
        "so far; parameters and optimizer state unchanged",
        "eos_core tune: on 2 probe step(s) up to step 5 the law could not use the statistics (non-finite or "
        "degenerate curvature) and kept its last learning rate; 2 such step(s) so far"]


@pytest.mark.parametrize("warn", ["jit", False])
def test_warn_jit_and_false_read_the_diagnostics_silently_with_the_same_counts(x64, models, warn):
    params, loss = _poisoned_quadratic()
    opt = tune(optax.sgd(1.0), CDAT(scale=1.5), route=routes.JVP_JVP, warn=warn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, state, records = models.run(opt, loss, params, 6, value_fn_args=lambda t: (
            jnp.asarray(t in (1, 4)), jnp.asarray(t in (2, 3))))
        jax.effects_barrier()
    assert [d["skipped_steps"] for d in records] == [0, 0, 1, 2, 2, 2]
    assert [d["fallback_steps"] for d in records] == [0, 1, 1, 1, 2, 2]
    messages = _eos_warnings(caught)
    if warn is False:
        assert messages == []
    else:  # the in-jit messages only (at each probe: every step here), none from diagnostics()
        assert len(messages) == 4 and all(m.startswith("eos_core tune: 1 step(s) with a non-finite") or
                                          "it keeps its last learning rate" in m for m in messages)


def test_warn_jit_reports_skips_between_probes_at_the_next_probe(x64, models):
    params, clean_loss = models.regression()

    def loss(p, poison):
        return clean_loss(p) * jnp.where(poison, jnp.nan, 1.0)

    opt = tune(optax.sgd(1.0), CDAT(scale=1.0), probe_every=3, warn="jit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, state, records = models.run(opt, loss, params, 6, value_fn_args=lambda t: (jnp.asarray(t in (1, 2)),))
        jax.effects_barrier()
    # calls 1 and 2 (holds) are skipped: the count stays at 1 and the next probe is call 5 (count 3), which reports
    # both skips in one warning; a skipped step's diagnostics repeat the previous step's, with skipped = 1
    assert [r["skipped"] for r in records] == [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert [r["probed"] for r in records] == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert int(state.skipped) == 2 and int(state.reported_skips) == 2 and int(state.count) == 4
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("eos_core tune: 2 step(s)")
    # warn=True reports each skipped step when its diagnostics are read, hold steps included
    hosted = tune(optax.sgd(1.0), CDAT(scale=1.0), probe_every=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models.run(hosted, loss, params, 6, value_fn_args=lambda t: (jnp.asarray(t in (1, 2)),))
    assert [m.split(" (")[0] for m in _eos_warnings(caught)] == ["eos_core tune: step 1 was skipped",
                                                                 "eos_core tune: step 2 was skipped"]


def test_invalid_settings_raise_naming_the_setting():
    with pytest.raises(ValueError, match="probe_every"):
        tune(optax.sgd(1.0), CDAT(), probe_every=0)
    with pytest.raises(ValueError, match="probe_every"):
        tune(optax.sgd(1.0), CDAT(), probe_every=1.5)
    with pytest.raises(ValueError, match="route"):
        tune(optax.sgd(1.0), CDAT(), route="newton")
    with pytest.raises(ValueError, match="base"):
        tune(lambda g: g, CDAT())
    with pytest.raises(ValueError, match="law"):
        tune(optax.sgd(1.0), "cdat")
    with pytest.raises(ValueError, match="sharpness_every"):
        tune(optax.sgd(1.0), CDAT(), sharpness_every=0)
    with pytest.raises(ValueError, match="sharpness_iters"):
        tune(optax.sgd(1.0), CDAT(), sharpness_iters=0)
    for bad in ("yes", "host", 1, None):
        with pytest.raises(ValueError, match="warn"):
            tune(optax.sgd(1.0), CDAT(), warn=bad)
    with pytest.raises(ValueError, match="lr"):  # a multiplicative law needs lr_init: the base's rate is 1
        tune(optax.sgd(1.0), DCAO())
    with pytest.raises(ValueError, match="preconditioned"):  # SGD has no preconditioner
        tune(optax.sgd(1.0), ExactSharpness(preconditioned=True))
    with pytest.raises(ValueError, match="scale"):  # the law's own validation
        tune(optax.sgd(1.0), CDAT(scale=-1.0))


def test_update_needs_value_fn_and_params_when_the_law_does(x64, models):
    params, loss = models.mlp()
    opt = tune(optax.sgd(1.0), CDAT())
    state = opt.init(params)
    grads = jax.grad(loss)(params)
    with pytest.raises(ValueError, match="value_fn"):
        opt.update(grads, state, params)
    with pytest.raises(ValueError, match="params"):
        opt.update(grads, state, value_fn=loss)
    constant = tune(optax.sgd(1.0), Constant(0.1))  # no statistics: no value_fn needed
    updates, _ = constant.update(grads, constant.init(params), params)
    np.testing.assert_allclose(ravel_pytree(updates)[0], -0.1 * ravel_pytree(grads)[0], rtol=1e-12)


def test_diagnostics_report_the_edge_quantities(x64, models):
    params, loss = models.mlp()
    _, state, records = models.run(tune(optax.sgd(1.0), CDAT(scale=2.0), sharpness_every=2), loss, params, 4)
    d = diagnostics(state)
    for key in ("lr", "numerator", "denominator", "route", "sharpness", "lr_sharpness",
                "preconditioned_sharpness", "loss", "grad_norm", "update_norm", "skipped_steps", "fallback_steps",
                "step", "alignment", "power_iterations", "law_lr"):
        assert key in d
    assert "hvp_route" not in d  # the H v route is not a registry key: hvp_route(state) tells it
    assert d["route"] == routes.JVP_JVP and hvp_route(state) == routes.JVP_GRAD
    assert d["step"] == 3 and d["skipped_steps"] == 0 and d["fallback_steps"] == 0  # the 4th step has index 3
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert math.isnan(d["sharpness"]) and not math.isnan(records[2]["sharpness"])  # measured at steps 0 and 2
    assert math.isnan(records[2]["preconditioned_sharpness"])  # SGD has no preconditioner
    assert 1 <= records[2]["power_iterations"] <= 20 and math.isnan(records[1]["power_iterations"])
    r = records[2]
    w, _, _, g, h = models.explicit(loss, r["params"])
    eig = np.linalg.eigvalsh(np.asarray(h))
    assert r["sharpness"] == pytest.approx(eig[-1], rel=5e-3)
    assert r["lr_sharpness"] == pytest.approx(r["lr"] * r["sharpness"], rel=1e-12)
    assert r["numerator"] == pytest.approx(float(g @ g), rel=1e-10)
    assert r["lr"] == pytest.approx(2 * r["numerator"] / r["denominator"], rel=1e-12)
    assert r["loss"] == pytest.approx(float(loss(r["params"])), rel=1e-12)  # free with jvp-jvp
    assert r["grad_norm"] == pytest.approx(float(np.linalg.norm(g)), rel=1e-10)


def test_auto_route_of_a_custom_vjp_model_is_reported(x64, models):
    @jax.custom_vjp
    def act(x):
        return jnp.tanh(x)

    # the usual custom_vjp pattern: fwd calls the function itself, so no forward mode at all
    act.defvjp(lambda x: (act(x), x), lambda x, c: (c * (1 - jnp.tanh(x) ** 2),))
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.standard_normal((16, 3))), jnp.asarray(rng.standard_normal(16))
    params = {"w": jnp.asarray(rng.standard_normal((3, 4))), "v": jnp.asarray(rng.standard_normal(4))}

    def loss(p):
        return jnp.mean((act(x @ p["w"]) @ p["v"] - y) ** 2)

    def reference(p):
        return jnp.mean((jnp.tanh(x @ p["w"]) @ p["v"] - y) ** 2)

    _, state, records = models.run(tune(optax.sgd(1.0), CDAT(scale=2.0), sharpness_every=1), loss, params, 3)
    _, _, expected = models.run(tune(optax.sgd(1.0), CDAT(scale=2.0), sharpness_every=1), reference, params, 3)
    assert records[-1]["route"] == routes.DOUBLE_BACKWARD and hvp_route(state) == routes.DOUBLE_BACKWARD
    assert expected[-1]["route"] == routes.JVP_JVP
    np.testing.assert_allclose([r["lr"] for r in records], [r["lr"] for r in expected], rtol=1e-10)
    np.testing.assert_allclose([r["sharpness"] for r in records], [r["sharpness"] for r in expected], rtol=1e-8)


def test_clipping_belongs_inside_base_and_diagnostics_find_a_chained_state(x64, models):
    params, loss = models.mlp()
    _, _, plain = models.run(tune(optax.sgd(1.0), CDAT(scale=2.0)), loss, params, 4)
    clip = 1e-3  # far below the gradient norm: every step is clipped
    inner = tune(optax.chain(optax.clip_by_global_norm(clip), optax.sgd(1.0)), CDAT(scale=2.0))
    _, state, clipped = models.run(optax.chain(inner, optax.identity()), loss, params, 4)  # diagnostics of a chain
    assert find_tune_state(state) is state[0]
    for a, b in zip(plain, clipped, strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-12)  # tune saw the raw gradient ...
        assert b["update_norm"] == pytest.approx(clip, rel=1e-9)  # ... and the clipped direction u
        assert b["lr"] == pytest.approx(a["lr"] * a["grad_norm"] / clip, rel=1e-9)  # the rate scales as 1 / |u| ...
        np.testing.assert_allclose(ravel_pytree(b["updates"])[0], ravel_pytree(a["updates"])[0], rtol=1e-9)  # same step
    with pytest.raises(ValueError, match="TuneState"):
        diagnostics(optax.sgd(1.0).init(params))


def test_the_state_can_be_donated_to_the_jitted_step(x64, models):
    """Every leaf of the state is its own buffer (a step that donates its inputs, as benchmarks/jax_overhead.py
    does, fails on a buffer passed twice), from init and from a jitted init."""
    params, loss = models.mlp()
    opt = tune(optax.adam(1.0), CDAT(scale=1.0, lr_max=0.1), probe_every=2, sharpness_every=2)

    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = opt.update(grads, s, p, value_fn=loss, value=value)
        return optax.apply_updates(p, updates), s

    donating = jax.jit(step, donate_argnums=(0, 1))
    for init in (opt.init, jax.jit(opt.init)):
        p = jax.tree.map(jnp.array, params)
        s = init(p)
        pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((p, s))]
        assert len(set(pointers)) == len(pointers)
        for _ in range(3):
            p, s = donating(p, s)
        assert int(s.count) == 3
