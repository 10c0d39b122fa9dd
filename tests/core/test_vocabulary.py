"""One vocabulary for every adapter: the statistics request, the diagnostics registry, the settings object,
the traceable finite-difference step, integer counters and the defects fixed in the core laws."""

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from eos_core import CDAT, DCAO, AdaEoS, Armijo, Constant, ExactSharpness, HyperGradient, Polyak, WarmupCosine, routes
from eos_core import diagnostics as D
from eos_core import request as R
from eos_core import stats as S
from eos_core.numerics import NUMPY
from eos_core.settings import TunerSettings

ALL_LAWS = [
    CDAT(), CDAT(scale=1.0, ema=0.9), DCAO(), DCAO(preconditioned=True, num_eigenvalues=3, lanczos_steps=7),
    AdaEoS(lr_init=0.1), AdaEoS(preconditioned=True, lr_init=0.1), Armijo(), Polyak(), HyperGradient(lr_init=0.1),
    ExactSharpness(), ExactSharpness(preconditioned=True), Constant(0.1), WarmupCosine(1.0, 10),
]


# -- the request -------------------------------------------------------------------------------------------
def test_request_carries_the_law_settings_and_the_defaults_live_in_one_place():
    assert CDAT().request() == R.StatsRequest(needs=frozenset({S.GRAD_DOT_UPDATE, S.CURVATURE}))
    exact = ExactSharpness(power_iters=7, power_tol=1e-4).request()
    assert (exact.power_iters, exact.power_tol) == (7, 1e-4)
    assert ExactSharpness().request().power_iters == R.POWER_ITERS
    assert ExactSharpness().request().power_tol == R.POWER_TOL
    ada = AdaEoS(lr_init=1.0, power_iters=1).request()
    assert (ada.power_iters, ada.power_tol) == (1, 0.0)
    dcao = DCAO(num_eigenvalues=3).request()
    assert (dcao.num_eigenvalues, dcao.lanczos_steps) == (3, R.LANCZOS_STEPS)
    assert DCAO(num_eigenvalues=3, lanczos_steps=5).request().lanczos_steps == 5
    assert DCAO(num_eigenvalues=30).request().lanczos_steps == 30  # at least k
    assert dcao.lanczos_steps_for(4) == 4 and dcao.lanczos_steps_for(1) == 1 and dcao.lanczos_steps_for(10**6) == 20


def test_request_says_what_the_adapter_must_do():
    assert CDAT().request().curvature and CDAT().request().objective and not CDAT().request().spectral
    assert not Polyak().request().objective
    assert Armijo().request().objective
    assert DCAO(preconditioned=True).request().preconditioned
    assert not DCAO().request().preconditioned and DCAO().request().hessian_eigenvector
    assert HyperGradient(lr_init=0.1).request().previous_update
    with pytest.raises(ValueError, match="unknown statistics"):
        R.StatsRequest.build({"not_a_statistic"})
    with pytest.raises(ValueError, match="power_iters"):
        R.StatsRequest.build({S.SHARPNESS}, power_iters=0)


# -- the diagnostics registry --------------------------------------------------------------------------------
@pytest.mark.parametrize("law", ALL_LAWS, ids=repr)
def test_every_law_reports_only_registered_names(law):
    keys = D.keys_for(law)
    assert set(D.STEP_KEYS) <= set(keys) and set(D.TRACKING_KEYS) <= set(keys)
    held = law.hold(law.init(0.1)).diagnostics
    assert set(held) <= set(keys)
    assert len(keys) == len(set(keys))


def test_no_law_reports_its_own_lr_sharpness():
    """lr_sharpness is the applied lr times the tracked lambda_max; law-internal products have their own names."""
    for law in ALL_LAWS:
        assert "lr_sharpness" not in law.measurements
    assert "lr_smoothed_sharpness" in AdaEoS(lr_init=1.0).measurements
    assert "lr_lambda_1" in DCAO().measurements


def test_a_preconditioned_law_reports_the_preconditioned_sharpness_under_that_name():
    law = ExactSharpness(preconditioned=True)
    out = law.update(law.init(0.1), {S.PRECONDITIONED_SHARPNESS: 4.0})
    assert float(out.diagnostics["preconditioned_sharpness"]) == 4.0 and "sharpness" not in out.diagnostics
    assert D.law_sharpness(law, out.diagnostics)[1] == 4.0 and math.isnan(D.law_sharpness(law, out.diagnostics)[0])
    dcao = DCAO(preconditioned=True)
    out = dcao.update(dcao.init(0.1), {S.PRECONDITIONED_TOP_EIGENVALUES: np.array([5.0, 1.0])})
    assert D.law_sharpness(dcao, out.diagnostics)[1] == 5.0
    plain = DCAO()
    out = plain.update(plain.init(0.1), {S.TOP_EIGENVALUES: np.array([5.0, 1.0])})
    assert D.law_sharpness(plain, out.diagnostics)[0] == 5.0


def test_derived_sharpness_prefers_tracking_and_multiplies_the_applied_lr():
    nan = math.nan
    got = D.derive_sharpness(np, 0.5, nan, nan, 3.0, nan)
    assert got["sharpness"] == 3.0 and got["lr_sharpness"] == 1.5 and math.isnan(got["preconditioned_lr_sharpness"])
    got = D.derive_sharpness(np, 0.5, 4.0, 10.0, 3.0, 7.0)
    assert got["sharpness"] == 4.0 and got["lr_sharpness"] == 2.0 and got["preconditioned_lr_sharpness"] == 5.0


def test_readme_diagnostics_table_lists_the_registry():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### What the diagnostics mean", 1)[1].split("\n\n", 3)
    table = next(block for block in section if block.lstrip().startswith("| name"))
    names = re.findall(r"^\| `([a-z_0-9]+)`", table, flags=re.M)
    assert sorted(names) == sorted(e.name for e in D.REGISTRY)


# -- settings -------------------------------------------------------------------------------------------------
def test_settings_check_every_option_and_name_it():
    bad = [dict(probe_every=0), dict(route="nope"), dict(sharpness_every=0), dict(sharpness_iters=0),
           dict(sharpness_tol=-1.0), dict(lr_mode="add"), dict(warn="loud"), dict(skip_nonfinite="yes"),
           dict(seed=1.5), dict(fd_eps=0.0), dict(reference_lr=-1.0), dict(fd_above=0), dict(clipped_gradients=1),
           dict(linear_in_lr="true")]
    for options in bad:
        (name,) = options
        with pytest.raises(ValueError, match=name):
            TunerSettings.from_options("Owner", options)
    with pytest.raises(ValueError, match="unknown option"):
        TunerSettings.from_options("Owner", {"sharpness_evry": 3})


def test_settings_old_names_warn_and_keep_working():
    with pytest.warns(DeprecationWarning, match="power_iters= is deprecated, use sharpness_iters="):
        settings = TunerSettings.from_options("Owner", {"power_iters": 7, "power_tol": 0.0})
    assert settings.sharpness_iters == 7 and settings.sharpness_tol == 0.0
    with pytest.raises(ValueError, match="sharpness_iters= only"):
        TunerSettings.from_options("Owner", {"power_iters": 7, "sharpness_iters": 3})


def test_settings_refuse_what_the_adapter_cannot_do_but_accept_defaults():
    with pytest.raises(ValueError, match="does not support the option.*lr_mode"):
        TunerSettings.from_options("tune", {"lr_mode": "multiply"}, supported={"probe_every", "route"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        settings = TunerSettings.from_options("tune", {"lr_mode": "override"}, supported={"probe_every"})
    assert settings.lr_mode == "override"
    with pytest.raises(ValueError, match="route"):
        TunerSettings.from_options("Keras", {"route": "jvp-jvp"}, supported_routes=(routes.AUTO, routes.FD_ONESIDED))


# -- the finite-difference step, traceable --------------------------------------------------------------------
@pytest.mark.parametrize("central", [False, True])
def test_fd_step_with_an_array_namespace_equals_the_float_version(central):
    rng = np.random.default_rng(0)
    for _ in range(20):
        scale, norm = float(rng.uniform(0, 5)), float(rng.uniform(1e-3, 10))
        want = routes.finite_difference_step(scale, norm, 2.0**-23, central=central)
        got = routes.finite_difference_step(np.float64(scale), np.float64(norm), 2.0**-23, central=central, xp=np)
        assert float(got) == pytest.approx(want, rel=1e-15)
    for scale, norm in [(1.0, 0.0), (math.nan, 1.0), (1.0, math.inf)]:
        assert float(routes.finite_difference_step(np.float64(scale), np.float64(norm), 1e-16, central=central,
                                                   xp=np)) == 0.0
    assert float(routes.parameter_scale_along(np.float64(3.0), np.float64(0.0), xp=np)) == 0.0
    assert float(routes.parameter_scale_along(np.float64(3.0), np.float64(2.0), xp=np)) == 1.5


# -- counters stay exact -------------------------------------------------------------------------------------
def test_counters_keep_counting_past_float32_precision():
    float32 = NUMPY._replace(dtype=np.float32, int_dtype=np.int32)
    law = WarmupCosine(peak_lr=1.0, total_steps=10)
    state = law.init(numerics=float32)._replace(count=float32.counter(2**24))
    state = law.hold(state, numerics=float32).state
    assert int(state.count) == 2**24 + 1
    ada = AdaEoS(lr_init=0.1)
    state = ada.init(numerics=float32)._replace(count=float32.counter(2**24))
    state = ada.update(state, {S.SHARPNESS: 1.0}, numerics=float32).state
    assert int(state.count) == 2**24 + 1


@pytest.mark.parametrize("law", ALL_LAWS, ids=repr)
def test_law_state_round_trips_through_host_values_with_its_dtypes(law):
    state = law.init(0.1)
    host = law.state_to_host(state)
    back = law.state_from_host(state, host)
    for a, b in zip(state, back, strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b)


# -- Armijo from a zero learning rate ----------------------------------------------------------------------------
def test_armijo_from_a_zero_rate_searches_from_lr_max_instead_of_accepting_zero_forever():
    law = Armijo(lr_max=1.0)
    state = law.init(0.0)  # a warm-up scheduler at its first step hands the law lr 0

    def quadratic(lr):  # f(w + lr u) for f = w^2 / 2 at w = 1, u = -g = -1
        return 0.5 * (1.0 - lr) ** 2

    stats = {S.LOSS: 0.5, S.GRAD_DOT_UPDATE: -1.0, S.TRIAL_LOSS: quadratic}
    out = law.update(state, stats)
    assert float(out.lr) > 0.5
    # and a state that somehow holds 0 restarts at lr_max too
    out = law.update(state._replace(lr=np.float64(0.0)), stats)
    assert float(out.lr) > 0.5
