"""CDAT (eq. 8): hand-computed values, the greedy and on-edge properties on quadratics, EMA algebra."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eos_core import CDAT, stats


def step(law, state, gu, uhu):
    return law.update(state, {stats.GRAD_DOT_UPDATE: gu, stats.CURVATURE: uhu})


def test_hand_computed_values():
    law = CDAT(scale=2.0, eps=0.5)
    out = step(law, law.init(), gu=-3.0, uhu=-4.0)  # n = 3, d = |-4| + 0.5 = 4.5
    assert float(out.lr) == pytest.approx(2.0 * 3.0 / 4.5)
    assert float(out.diagnostics["numerator"]) == 3.0
    assert float(out.diagnostics["denominator"]) == 4.5
    assert float(out.diagnostics["fallback"]) == 0.0
    assert float(out.diagnostics["probed"]) == 1.0


def test_ema_ratio_matches_weighted_sums_and_needs_no_bias_correction():
    beta = 0.9
    law = CDAT(scale=1.5, ema=beta)
    rng = np.random.default_rng(0)
    ns, ds = rng.uniform(0.1, 2.0, 12), rng.uniform(0.1, 5.0, 12)
    state = law.init()
    for t, (n, d) in enumerate(zip(ns, ds, strict=True)):
        out = step(law, state, gu=-n, uhu=d)
        state = out.state
        weights = (1 - beta) * beta ** np.arange(t, -1, -1)  # weight of measurement s after t+1 updates
        expected = 1.5 * (weights @ ns[: t + 1]) / (weights @ ds[: t + 1])
        assert float(out.lr) == pytest.approx(expected, rel=1e-12)
        # the EMA itself carries the (1 - beta^{t+1}) bias; the ratio does not
        assert float(state.numerator_ema) == pytest.approx(weights @ ns[: t + 1], rel=1e-12)
        corrected = (weights @ ns[: t + 1]) / (weights @ ds[: t + 1])
        assert float(out.lr) == pytest.approx(1.5 * corrected, rel=1e-12)


def random_quadratic(seed, n):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, n))
    a = m @ m.T + 0.05 * np.eye(n)
    b = rng.standard_normal(n)
    w = rng.standard_normal(n) * 3
    return a, b, w


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 30))
def test_scale_one_is_the_exact_minimiser_along_u(seed, n):
    a, b, w = random_quadratic(seed, n)
    g = a @ w - b
    u = -g
    law = CDAT(scale=1.0)
    lr = float(step(law, law.init(), g @ u, u @ a @ u).lr)
    # d/d(eta) f(w + eta u) = g(w + eta u) . u vanishes at the minimiser
    slope = (a @ (w + lr * u) - b) @ u
    assert abs(slope) <= 1e-9 * abs(g @ u)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 30))
def test_scale_two_is_on_edge_f_unchanged(seed, n):
    a, b, w = random_quadratic(seed, n)

    def f(x):
        return 0.5 * x @ a @ x - b @ x

    g = a @ w - b
    u = -g
    law = CDAT(scale=2.0)
    lr = float(step(law, law.init(), g @ u, u @ a @ u).lr)
    assert lr > 0
    # eq. 7: the largest step whose quadratic model does not increase f (exact for a quadratic)
    assert abs(f(w + lr * u) - f(w)) <= 1e-9 * max(abs(f(w)), abs(lr * g @ u))


def test_numerator_zero_gives_lr_min_as_in_the_paper():
    law = CDAT(scale=2.0, lr_min=0.01)
    out = step(law, law.init(lr=0.3), gu=+1.0, uhu=2.0)  # ascent direction: n = max(-1, 0) = 0
    assert float(out.lr) == 0.01
    assert float(out.diagnostics["fallback"]) == 0.0


def test_zero_denominator_keeps_last_lr():
    law = CDAT(scale=2.0)
    out = step(law, law.init(lr=0.3), gu=-1.0, uhu=0.0)
    assert float(out.lr) == 0.3
    assert float(out.diagnostics["fallback"]) == 1.0


@pytest.mark.parametrize("gu,uhu", [(math.nan, 1.0), (-1.0, math.inf), (-math.inf, 1.0), (-1.0, math.nan)])
def test_non_finite_statistics_keep_last_lr_and_emas(gu, uhu):
    law = CDAT(scale=2.0, ema=0.9)
    state = step(law, law.init(lr=0.1), gu=-1.0, uhu=4.0).state
    good_lr = float(state.lr)
    out = step(law, state, gu=gu, uhu=uhu)
    assert float(out.lr) == good_lr
    assert float(out.state.numerator_ema) == float(state.numerator_ema)
    assert float(out.state.denominator_ema) == float(state.denominator_ema)
    assert float(out.diagnostics["fallback"]) == 1.0
    assert math.isnan(float(out.diagnostics["numerator"]))


def test_overflowing_ratio_with_unbounded_lr_keeps_last_lr():
    law = CDAT(scale=2.0)
    with np.errstate(all="ignore"):
        out = step(law, law.init(lr=0.1), gu=-1e300, uhu=1e-300)
    assert float(out.lr) == 0.1 and float(out.diagnostics["fallback"]) == 1.0


def test_lr_bounds_clip():
    law = CDAT(scale=2.0, lr_min=0.5, lr_max=1.0)
    assert float(step(law, law.init(), gu=-100.0, uhu=1.0).lr) == 1.0
    assert float(step(law, law.init(), gu=-1e-6, uhu=1.0).lr) == 0.5


def test_hold_reuses_lr_and_reports_nothing_measured():
    law = CDAT(scale=2.0)
    state = step(law, law.init(), gu=-2.0, uhu=1.0).state
    held = law.hold(state)
    assert float(held.lr) == float(state.lr)
    assert held.state == state._replace(count=state.count + 1)  # only the step count moves
    assert float(held.diagnostics["probed"]) == 0.0
    assert math.isnan(float(held.diagnostics["numerator"]))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"scale": 0.0}, "scale"),
        ({"scale": -1.0}, "scale"),
        ({"ema": 1.0}, "ema"),
        ({"ema": -0.1}, "ema"),
        ({"eps": -1e-3}, "eps"),
        ({"lr_min": 2.0, "lr_max": 1.0}, "lr_min"),
        ({"lr_max": 0.0}, "lr_max"),
        ({"sigma": 2.0}, "sigma"),
        ({"scale": float("nan")}, "scale"),
    ],
)
def test_invalid_settings_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CDAT(**kwargs)


def test_repr_and_equality():
    assert CDAT(scale=2.0, ema=0.9) == CDAT(2.0, ema=0.9)
    assert CDAT(scale=2.0) != CDAT(scale=1.0)
    assert "ema=0.9" in repr(CDAT(ema=0.9))
