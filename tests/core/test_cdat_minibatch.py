"""CDAT's mini-batch options: the unbiased previous-update numerator and the horizon decay."""

import math

import numpy as np
import pytest

from eos_core import CDAT
from eos_core import stats as S
from eos_core.laws.cdat import CDATState, decay_factor


def previous(grad_dot: float, curvature: float, lr: float) -> dict:
    return {S.GRAD_DOT_PREVIOUS_UPDATE: grad_dot, S.PREVIOUS_UPDATE_CURVATURE: curvature, S.PREVIOUS_LR: lr}


def test_the_previous_update_numerator_is_unbiased_where_the_same_batch_one_is_not():
    """On F(w) = w^T A w / 2 with batch gradients A w + xi (independent noise), E[n_t] of the previous-update
    numerator is the expected loss's descent -grad F(w_{t-1}) . u_{t-1}; the same-batch numerator of SGD
    (u_t = -g_t) is |grad F|^2 + E|xi|^2, biased by the noise."""
    rng = np.random.default_rng(0)
    dim, noise, trials = 6, 0.7, 40_000
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    a = (q * np.linspace(0.5, 4.0, dim)) @ q.T
    w_prev = rng.standard_normal(dim)
    u_prev = -(a @ w_prev + noise * rng.standard_normal(dim))  # the previous SGD update (its own batch)
    lr_prev = 0.1
    w = w_prev + lr_prev * u_prev
    law = CDAT(scale=1.0, numerator="previous-update")
    numerators, same = [], []
    for _ in range(trials):
        g = a @ w + noise * rng.standard_normal(dim)  # a batch the previous update did not see
        out = law.update(law.init(1.0), previous(float(g @ u_prev), float(u_prev @ a @ u_prev), lr_prev))
        numerators.append(float(out.diagnostics["numerator"]))
        same.append(float(g @ g))  # -g.u with u = -g
    want = -float((a @ w_prev) @ u_prev)
    spread = noise * np.linalg.norm(u_prev) / math.sqrt(trials)
    assert abs(np.mean(numerators) - want) < 4 * spread
    true_descent = float(np.sum((a @ w) ** 2))
    assert np.mean(same) - true_descent == pytest.approx(dim * noise**2, rel=0.05)  # the bias E|xi|^2


def test_the_previous_update_rate_is_the_scaled_ratio_of_signed_emas():
    law = CDAT(scale=2.0, ema=0.5, numerator="previous-update")
    state = law.init(0.3)
    first = law.update(state, previous(-1.0, 4.0, 0.5))  # n = 1 + 0.5 * 4 = 3, d = 4
    assert float(first.lr) == pytest.approx(2.0 * 3.0 / 4.0)
    second = law.update(first.state, previous(5.0, 2.0, 0.1))  # n = -5 + 0.2 = -4.8: the signed EMA goes negative
    n_ema, d_ema = 0.5 * 3.0 * 0.5 + 0.5 * -4.8, 0.5 * 4.0 * 0.5 + 0.5 * 2.0  # from 0: EMAs 1.5 / 2 then
    assert float(second.state.numerator_ema) == pytest.approx(n_ema)
    assert float(second.state.denominator_ema) == pytest.approx(d_ema)
    assert float(second.lr) == 0.0  # max(n~, 0) = 0: no step along a direction that does not descend


def test_without_a_previous_update_the_rate_stays_at_its_start_and_it_is_not_a_fallback():
    law = CDAT(numerator="previous-update")
    out = law.update(law.init(0.02), previous(math.nan, math.nan, math.nan))
    assert float(out.lr) == 0.02 and float(out.diagnostics["fallback"]) == 0.0
    assert float(out.state.numerator_ema) == 0.0


@pytest.mark.parametrize("bad", [previous(math.nan, 1.0, 0.1), previous(1.0, math.inf, 0.1)])
def test_non_finite_previous_update_statistics_keep_the_last_rate(bad):
    law = CDAT(numerator="previous-update")
    out = law.update(law.init(0.02), bad)
    assert float(out.lr) == 0.02 and float(out.diagnostics["fallback"]) == 1.0


@pytest.mark.parametrize("decay,shape", [("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
                                         ("linear", lambda p: 1 - p)])
def test_the_decay_multiplies_the_rate_at_every_step_probed_or_held(decay, shape):
    horizon = 8
    law = CDAT(scale=1.0, decay=decay, horizon=horizon)
    state = law.init(0.5)
    lrs = []
    for t in range(10):
        out = law.update(state, {S.GRAD_DOT_UPDATE: -2.0, S.CURVATURE: 4.0}) if t % 3 == 0 else law.hold(state)
        state = out.state
        lrs.append(float(out.lr))
        assert float(out.diagnostics["decay"]) == pytest.approx(shape(min(t / horizon, 1.0)))
    expected = [0.5 * shape(min(t / horizon, 1.0)) for t in range(10)]  # rule rate 1 * 2 / 4 = 0.5 from step 0
    np.testing.assert_allclose(lrs, expected, atol=1e-15)
    assert int(state.count) == 10


def test_a_decay_needs_a_horizon_and_with_horizon_supplies_it():
    law = CDAT(decay="cosine")
    assert law.needs_horizon
    with pytest.raises(ValueError, match="horizon"):
        law.init(0.1)
    fixed = law.with_horizon(100)
    assert fixed.horizon == 100 and not fixed.needs_horizon and fixed.with_horizon(5) is fixed
    assert CDAT().with_horizon(7) == CDAT()


def test_settings_are_checked():
    for bad in (dict(numerator="next"), dict(decay="exp"), dict(horizon=0), dict(horizon=2.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CDAT(**bad)


def test_state_round_trips_and_an_older_state_without_a_count_loads():
    law = CDAT(ema=0.9, numerator="previous-update", decay="linear", horizon=50)
    state = law.init(0.1)
    for _ in range(3):
        state = law.update(state, previous(-1.0, 2.0, 0.1)).state
    host = law.state_to_host(state)
    back = law.state_from_host(law.init(0.1), host)
    assert all(np.array_equal(a, b) for a, b in zip(state, back, strict=True))
    older = {k: v for k, v in host.items() if k != "count"}
    assert int(law.state_from_host(law.init(0.1), older).count) == 0


def test_the_classic_rule_is_unchanged():
    law = CDAT(scale=2.0)
    assert repr(law) == "CDAT(scale=2.0, ema=0.0, eps=0.0, lr_min=0.0, lr_max=inf, lr_init=None)"
    out = law.update(law.init(0.1), {S.GRAD_DOT_UPDATE: -4.0, S.CURVATURE: 2.0})
    assert float(out.lr) == 4.0 and "decay" not in out.diagnostics
    assert isinstance(out.state, CDATState) and int(out.state.count) == 1
    assert float(decay_factor(None, 5, 10)) == 1.0


def test_a_previous_step_at_lr_0_is_a_measurement_so_the_rate_can_leave_0():
    """lr 0 (the signed EMA went negative) must not be absorbing: w_t = w_{t-1}, so n = -g_t . u_{t-1}."""
    law = CDAT(scale=1.0, numerator="previous-update")
    out = law.update(law.init(0.0), previous(-2.0, 4.0, 0.0))
    assert float(out.lr) == 0.5 and float(out.diagnostics["fallback"]) == 0.0


def test_the_minibatch_preset_is_the_previous_update_rule_and_takes_overrides():
    law = CDAT.minibatch()
    assert law.get_config() == CDAT(scale=2.0, ema=0.99, numerator="previous-update").get_config()
    assert law.needs == {S.GRAD_DOT_PREVIOUS_UPDATE, S.PREVIOUS_UPDATE_CURVATURE, S.PREVIOUS_LR}
    decayed = CDAT.minibatch(decay="cosine", lr_min=1e-5)
    assert decayed.needs_horizon and decayed.lr_min == 1e-5 and decayed.numerator == "previous-update"
    assert decayed.with_horizon(100).horizon == 100
    with pytest.raises(ValueError, match="scale"):
        CDAT.minibatch(scale=-1.0)
