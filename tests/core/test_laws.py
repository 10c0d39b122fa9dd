"""The other laws against hand-computed values and their properties; shared guarantees of every law."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eos_core import (
    CDAT,
    DCAO,
    AdaEoS,
    Armijo,
    Constant,
    ExactSharpness,
    HyperGradient,
    Polyak,
    WarmupCosine,
    stats,
)


# --- ExactSharpness (eq. 16) ------------------------------------------------------------------
def test_exact_sharpness_is_scale_over_lambda():
    law = ExactSharpness(scale=3.0)
    out = law.update(law.init(lr=0.1), {stats.SHARPNESS: 12.0})
    assert float(out.lr) == pytest.approx(0.25)
    assert law.needs == {stats.SHARPNESS}
    assert ExactSharpness(preconditioned=True).needs == {stats.PRECONDITIONED_SHARPNESS}


@pytest.mark.parametrize("lam", [0.0, -3.0, math.nan, math.inf])
def test_exact_sharpness_unusable_eigenvalue_keeps_lr(lam):
    law = ExactSharpness()
    out = law.update(law.init(lr=0.1), {stats.SHARPNESS: lam})
    assert float(out.lr) == 0.1 and float(out.diagnostics["fallback"]) == 1.0


# --- AdaEoS ------------------------------------------------------------------------------------
def test_adaeos_hand_computed_step():
    law = AdaEoS(target=2.0, gamma=0.5, max_change=10.0)
    out = law.update(law.init(lr=0.1), {stats.SHARPNESS: 5.0})  # lr * lambda = 0.5 -> factor (2/0.5)^0.5 = 2
    assert float(out.lr) == pytest.approx(0.2)


def test_adaeos_fixed_point_and_convergence_on_a_quadratic():
    lam = 40.0  # a quadratic: the sharpness does not depend on w
    law = AdaEoS(target=2.0, gamma=0.3)
    state = law.init(lr=1e-4)
    assert float(law.update(law.init(lr=0.05), {stats.SHARPNESS: lam}).lr) == pytest.approx(0.05)
    for _ in range(60):
        state = law.update(state, {stats.SHARPNESS: lam}).state
    assert float(state.lr) * lam == pytest.approx(2.0, rel=1e-6)


@settings(max_examples=100, deadline=None)
@given(lr=st.floats(1e-6, 10.0), lam=st.floats(1e-6, 1e6), max_change=st.floats(1.0, 5.0),
       gamma=st.floats(0.01, 1.0))
def test_adaeos_change_is_clipped(lr, lam, max_change, gamma):
    law = AdaEoS(gamma=gamma, max_change=max_change)
    out = law.update(law.init(lr=lr), {stats.SHARPNESS: lam})
    ratio = float(out.lr) / lr
    assert 1.0 / max_change * (1 - 1e-12) <= ratio <= max_change * (1 + 1e-12)


def test_adaeos_sharpness_ema_is_bias_corrected():
    law = AdaEoS(sharpness_ema=0.9)
    out = law.update(law.init(lr=0.1), {stats.SHARPNESS: 7.0})
    assert float(out.diagnostics["smoothed_sharpness"]) == pytest.approx(7.0)


def test_adaeos_needs_a_positive_initial_lr():
    with pytest.raises(ValueError, match="initial learning rate"):
        AdaEoS().init()
    with pytest.raises(ValueError, match="must be > 0"):
        AdaEoS().init(lr=0.0)


# --- DCAO --------------------------------------------------------------------------------------
def test_dcao_hand_computed_step():
    law = DCAO(target=1.5, lr_factor_bounds=(0.5, 2.0), momentum_sensitivity=0.1, weight_decay_sensitivity=0.2)
    state = law.init(lr=0.1, hyperparams={"momentum": 0.9, "weight_decay": 0.01})
    out = law.update(state, {stats.TOP_EIGENVALUES: np.array([20.0, 5.0])})
    r = 0.1 * 20.0  # = 2
    assert float(out.lr) == pytest.approx(0.1 * 1.5 / r)
    assert float(out.hyperparams["momentum"]) == pytest.approx(0.9 * (1 - 0.1 * (r - 1.5)))
    assert float(out.hyperparams["weight_decay"]) == pytest.approx(0.01 * (1 + 0.2 * (r - 1.5)))
    assert float(out.diagnostics["gap"]) == 15.0
    assert float(out.diagnostics["lambda_2"]) == 5.0


@settings(max_examples=150, deadline=None)
@given(lr=st.floats(1e-5, 5.0), lam1=st.floats(-10.0, 1e5), momentum=st.floats(0.0, 0.99),
       wd=st.floats(0.0, 0.5), target=st.floats(0.5, 2.0), sens=st.floats(0.0, 5.0))
def test_dcao_clips_hold(lr, lam1, momentum, wd, target, sens):
    law = DCAO(target=target, momentum_sensitivity=sens, weight_decay_sensitivity=sens,
               momentum_bounds=(0.1, 0.95), weight_decay_bounds=(0.0, 0.2), num_eigenvalues=1)
    state = law.init(lr=lr, hyperparams={"momentum": momentum, "weight_decay": wd})
    out = law.update(state, {stats.TOP_EIGENVALUES: np.array([lam1])})
    assert 0.8 * (1 - 1e-12) <= float(out.lr) / lr <= 1.1 * (1 + 1e-12)
    assert 0.1 <= float(out.hyperparams["momentum"]) <= 0.95
    assert 0.0 <= float(out.hyperparams["weight_decay"]) <= 0.2


def test_dcao_non_finite_eigenvalues_keep_everything():
    law = DCAO()
    state = law.init(lr=0.1, hyperparams={"momentum": 0.9, "weight_decay": 0.01})
    out = law.update(state, {stats.TOP_EIGENVALUES: np.array([math.nan, 1.0])})
    assert out.state == state and float(out.diagnostics["fallback"]) == 1.0


# --- Armijo (eq. 1, appendix C.3) ----------------------------------------------------------------
def test_armijo_takes_largest_trial_step_satisfying_condition():
    # f(w + eta u) along a descent direction of a 1-D quartic, checked against brute force
    def f(eta):
        return (1.0 - eta) ** 4 + 0.1

    loss, gu = f(0.0), -4.0  # derivative of f at 0
    law = Armijo(c=0.5, c_plus=math.inf, c_minus=0.8, lr_max=4.0, max_tries=200)
    out = law.update(law.init(), {stats.LOSS: loss, stats.GRAD_DOT_UPDATE: gu, stats.TRIAL_LOSS: f})
    trials = [4.0 * 0.8**k for k in range(200)]
    ok = [eta for eta in trials if f(eta) <= loss + 0.5 * eta * gu]
    assert float(out.lr) == pytest.approx(ok[0], rel=1e-12)
    assert float(out.diagnostics["accepted"]) == 1.0
    assert float(out.diagnostics["trials"]) == trials.index(ok[0]) + 1


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 20), c=st.sampled_from([0.0, 1e-4, 0.5]),
       c_minus=st.sampled_from([0.5, 0.8, 0.9]))
def test_armijo_on_quadratics(seed, n, c, c_minus):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, n))
    a = m @ m.T + 0.1 * np.eye(n)
    w = rng.standard_normal(n)
    g = a @ w
    u = -g

    def f(x):
        return 0.5 * x @ a @ x

    law = Armijo(c=c, c_minus=c_minus, c_plus=math.inf, lr_max=1.0, max_tries=500)
    trial = lambda eta: f(w + eta * u)  # noqa: E731
    out = law.update(law.init(), {stats.LOSS: f(w), stats.GRAD_DOT_UPDATE: g @ u, stats.TRIAL_LOSS: trial})
    lr = float(out.lr)
    assert trial(lr) <= f(w) + c * lr * (g @ u)
    if lr < 1.0:  # the previous (larger) trial failed the condition
        bigger = lr / c_minus
        assert trial(bigger) > f(w) + c * bigger * (g @ u)


def test_armijo_start_and_failed_search():
    law = Armijo(c=0.5, c_plus=2.0, c_minus=0.5, max_tries=3, lr_max=1.0)
    state = law.init(lr=0.1)
    assert float(law.initial_guess(state)) == 0.2
    calls = []

    def never(eta):
        calls.append(eta)
        return math.inf

    out = law.update(law.init(), {stats.LOSS: 1.0, stats.GRAD_DOT_UPDATE: -1.0, stats.TRIAL_LOSS: never})
    assert calls == [1.0, 0.5, 0.25]
    assert float(out.lr) == 0.25 and float(out.diagnostics["accepted"]) == 0.0


def test_armijo_non_finite_loss_evaluates_nothing():
    law = Armijo()
    out = law.update(law.init(lr=0.3), {stats.LOSS: math.nan, stats.GRAD_DOT_UPDATE: -1.0,
                                         stats.TRIAL_LOSS: lambda eta: pytest.fail("no trial expected")})
    assert float(out.lr) == 0.3 and float(out.diagnostics["fallback"]) == 1.0


# --- Polyak (eq. 14) -----------------------------------------------------------------------------
def test_polyak_values():
    law = Polyak(f_star=0.5, lr_max=10.0)
    assert float(law.update(law.init(), {stats.LOSS: 2.5, stats.GRAD_NORM_SQ: 4.0}).lr) == pytest.approx(0.5)
    assert float(law.update(law.init(), {stats.LOSS: 100.0, stats.GRAD_NORM_SQ: 1.0}).lr) == 10.0
    assert float(law.update(law.init(), {stats.LOSS: 0.1, stats.GRAD_NORM_SQ: 1.0}).lr) == 0.0
    zero_grad = law.update(law.init(lr=0.2), {stats.LOSS: 1.0, stats.GRAD_NORM_SQ: 0.0})
    assert float(zero_grad.lr) == 0.2 and float(zero_grad.diagnostics["fallback"]) == 1.0


def test_polyak_interpolating_least_squares_converges():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 5))
    y = x @ rng.standard_normal(5)  # interpolable: f* = 0
    w = np.zeros(5)
    law = Polyak(f_star=0.0, lr_max=100.0)
    state = law.init()
    for _ in range(300):
        r = x @ w - y
        loss, g = 0.5 * np.mean(r**2), x.T @ r / len(y)
        out = law.update(state, {stats.LOSS: loss, stats.GRAD_NORM_SQ: g @ g})
        state = out.state
        w = w - float(out.lr) * g
    assert 0.5 * np.mean((x @ w - y) ** 2) < 1e-8


# --- HyperGradient (eq. 15) ----------------------------------------------------------------------
def test_hypergradient_values():
    law = HyperGradient(beta=0.1)
    state = law.init(lr=1.0)
    assert float(law.update(state, {stats.GRAD_PREV_UPDATE_COSINE: -0.5}).lr) == pytest.approx(1.05)
    assert float(law.update(state, {stats.GRAD_PREV_UPDATE_COSINE: 1.0}).lr) == pytest.approx(0.9)
    assert float(law.update(state, {stats.GRAD_PREV_UPDATE_COSINE: 0.0}).lr) == 1.0


# --- schedules -----------------------------------------------------------------------------------
def test_warmup_cosine_shape():
    law = WarmupCosine(peak_lr=1.0, total_steps=100, warmup_steps=10)
    state = law.init()
    lrs = []
    for _ in range(101):
        out = law.update(state, {})
        lrs.append(float(out.lr))
        state = out.state
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5) and lrs[100] == pytest.approx(0.0, abs=1e-12)
    linear = WarmupCosine(peak_lr=2.0, total_steps=20, warmup_steps=0, decay="linear")
    assert float(linear.lr_at(10.0)) == pytest.approx(1.0)
    flat = WarmupCosine(peak_lr=2.0, total_steps=20, warmup_steps=4, decay="constant")
    assert float(flat.lr_at(15.0)) == 2.0


def test_schedules_advance_on_hold_too():
    law = WarmupCosine(peak_lr=1.0, total_steps=10, warmup_steps=10)
    state = law.init()
    for _ in range(3):
        state = law.hold(state).state
    assert float(law.update(state, {}).lr) == pytest.approx(0.3)
    assert float(Constant(0.3).update(Constant(0.3).init(), {}).lr) == 0.3


# --- shared guarantees ---------------------------------------------------------------------------
LAWS = [
    CDAT(ema=0.9), ExactSharpness(), AdaEoS(), DCAO(), Armijo(), Polyak(), HyperGradient(),
    Constant(0.1), WarmupCosine(peak_lr=1.0, total_steps=10),
]


def statistics(law, value):
    out = {
        stats.GRAD_DOT_UPDATE: value, stats.CURVATURE: value, stats.LOSS: value, stats.GRAD_NORM_SQ: value,
        stats.SHARPNESS: value, stats.PRECONDITIONED_SHARPNESS: value, stats.GRAD_PREV_UPDATE_COSINE: value,
        stats.TOP_EIGENVALUES: np.array([value, value]),
        stats.PRECONDITIONED_TOP_EIGENVALUES: np.array([value, value]),
        stats.TRIAL_LOSS: lambda eta: value,
    }
    return {k: out[k] for k in law.needs}


@pytest.mark.parametrize("law", LAWS, ids=lambda law: type(law).__name__)
def test_needs_are_known_statistics_and_hold_matches_update_structure(law):
    assert law.needs <= stats.ALL
    state = law.init(lr=0.1, hyperparams={"momentum": 0.9, "weight_decay": 0.01})
    updated = law.update(state, statistics(law, 1.0))
    held = law.hold(state)
    assert set(updated.diagnostics) == set(held.diagnostics)
    assert set(updated.hyperparams) == set(held.hyperparams) == set(law.decides)
    assert type(updated.state) is type(held.state)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0, 1.0, 1e-300, 1e300]),
                       min_size=1, max_size=6))
@pytest.mark.parametrize("law", LAWS, ids=lambda law: type(law).__name__)
def test_lr_is_always_finite_and_non_negative(law, values):
    state = law.init(lr=0.1, hyperparams={"momentum": 0.9, "weight_decay": 0.01})
    with np.errstate(all="ignore"):
        for value in values:
            out = law.update(state, statistics(law, value))
            assert math.isfinite(float(out.lr)) and float(out.lr) >= 0.0
            state = out.state


@pytest.mark.parametrize(
    "factory,name",
    [
        (lambda: ExactSharpness(scale=0), "scale"),
        (lambda: AdaEoS(gamma=0.0), "gamma"),
        (lambda: AdaEoS(gamma=1.5), "gamma"),
        (lambda: AdaEoS(max_change=0.5), "max_change"),
        (lambda: DCAO(lr_factor_bounds=(1.1, 0.8)), "lr_factor_bounds"),
        (lambda: DCAO(momentum_bounds=(0.0, 1.0)), "momentum_bounds"),
        (lambda: DCAO(num_eigenvalues=0), "num_eigenvalues"),
        (lambda: Armijo(c_minus=1.0), "c_minus"),
        (lambda: Armijo(c_plus=0.5), "c_plus"),
        (lambda: Armijo(max_tries=0), "max_tries"),
        (lambda: Polyak(lr_max=-1.0), "lr_max"),
        (lambda: HyperGradient(beta=1.0), "beta"),
        (lambda: Constant(-0.1), "lr"),
        (lambda: WarmupCosine(peak_lr=1.0, total_steps=10, decay="step"), "decay"),
        (lambda: WarmupCosine(peak_lr=1.0, total_steps=10, warmup_steps=20), "warmup_steps"),
        (lambda: Polyak(fstar=0.0), "fstar"),
    ],
)
def test_invalid_settings(factory, name):
    with pytest.raises(ValueError, match=name):
        factory()
