"""The diagnostics vocabulary on PyTorch (eos_core.diagnostics), the step schedule, the settings and their
deprecated names, the spectral start vectors, and one power iteration per operator and step."""

import math
import warnings
from unittest import mock

import numpy as np
import pytest
import torch

from eos_core import CDAT, DCAO, AdaEoS, Armijo, Constant, ExactSharpness, HyperGradient, Polyak, WarmupCosine
from eos_core import diagnostics as diag
from eos_core.adapters.torch import CurvatureTuner, spectral_estimates  # the estimators the tuner calls
from eos_core.settings import TunerSettings
from eos_core.spectral import random_start

#: name -> (law factory, optimizer factory)
LAWS = {
    "none": (lambda: None, lambda p: torch.optim.SGD(p, lr=0.1)),
    "none-adam": (lambda: None, lambda p: torch.optim.Adam(p, lr=1e-2)),
    "cdat": (lambda: CDAT(scale=2.0, ema=0.5), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5)),
    "dcao": (lambda: DCAO(num_eigenvalues=2), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, weight_decay=1e-3)),
    "dcao-preconditioned": (lambda: DCAO(preconditioned=True), lambda p: torch.optim.Adam(p, lr=1e-2)),
    "adaeos": (lambda: AdaEoS(gamma=0.5), lambda p: torch.optim.SGD(p, lr=0.1)),
    "adaeos-preconditioned": (lambda: AdaEoS(preconditioned=True), lambda p: torch.optim.Adam(p, lr=1e-2)),
    "exact-sharpness": (lambda: ExactSharpness(), lambda p: torch.optim.SGD(p, lr=0.1)),
    "exact-sharpness-preconditioned": (lambda: ExactSharpness(preconditioned=True),
                                       lambda p: torch.optim.RMSprop(p, lr=1e-2)),
    "armijo": (lambda: Armijo(), lambda p: torch.optim.SGD(p, lr=0.1)),
    "polyak": (lambda: Polyak(), lambda p: torch.optim.SGD(p, lr=0.1)),
    "hypergradient": (lambda: HyperGradient(beta=0.01), lambda p: torch.optim.SGD(p, lr=0.1)),
    "constant": (lambda: Constant(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "warmup-cosine": (lambda: WarmupCosine(peak_lr=0.2, total_steps=8), lambda p: torch.optim.SGD(p, lr=0.1)),
}


def problem(dtype=torch.float64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g, dtype=dtype)
    y = torch.randn(32, 2, generator=g, dtype=dtype)
    return model, x, y


def closure_for(model, optimizer, x, y, poison=None, calls=None):
    """The torch-convention closure; ``poison(calls)`` True makes that evaluation NaN."""
    counter = calls if calls is not None else [0]

    def closure():
        counter[0] += 1
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if poison is not None and poison(counter[0]):
            loss = loss * float("nan")
        loss.backward()
        return loss

    return closure


def is_nan(value):
    return isinstance(value, float) and math.isnan(value)


def check_types(diagnostics):
    for key, value in diagnostics.items():
        if key in diag.INTEGER_KEYS:
            assert type(value) is int, key
        elif key in diag.STRING_KEYS:
            assert isinstance(value, str), key
        else:
            assert type(value) is float, key


@pytest.mark.parametrize("name", sorted(LAWS))
def test_the_keys_are_exactly_those_of_the_registry_after_every_step(name):
    """Probe steps, hold steps, tracked and untracked steps, a skipped step: always keys_for(law), in its order."""
    law_factory, make_optimizer = LAWS[name]
    law = law_factory()
    model, x, y = problem()
    optimizer = make_optimizer(model.parameters())
    tuner = CurvatureTuner(optimizer, law, probe_every=2, sharpness_every=3, warn=False)
    keys = diag.keys_for(law)
    call = [0]
    closure = closure_for(model, optimizer, x, y, poison=lambda _: call[0] == 4)
    for call[0] in range(7):
        tuner.step(closure)
        assert tuple(tuner.diagnostics) == keys, (call[0], set(tuner.diagnostics) ^ set(keys))
        check_types(tuner.diagnostics)
        assert math.isfinite(tuner.diagnostics["lr"])
        # measuring only (law=None), |g| is read on the steps that measure (sharpness_every=3), NaN in between
        measured = law is not None or tuner.diagnostics["step"] % 3 == 0
        if not tuner.diagnostics["skipped"]:  # a skipped step repeats the previous step's values
            assert math.isfinite(tuner.diagnostics["grad_norm"]) == measured
    assert tuner.calls == 7 and tuner.diagnostics["step"] == 5 and tuner.diagnostics["skipped_steps"] == 1


def run(law, optimizer_factory, steps, **options):
    model, x, y = problem()
    optimizer = optimizer_factory(model.parameters())
    tuner = CurvatureTuner(optimizer, law, **options)
    closure = closure_for(model, optimizer, x, y)
    rows = []
    for _ in range(steps):
        tuner.step(closure)
        rows.append(dict(tuner.diagnostics))
    return rows, tuner


@pytest.mark.parametrize("name", ["none", "cdat", "adaeos", "exact-sharpness", "dcao", "none-adam",
                                  "adaeos-preconditioned"])
@pytest.mark.parametrize("lr_mode", ["override", "multiply"])
def test_lr_sharpness_is_the_applied_lr_times_the_sharpness(name, lr_mode):
    """lr_sharpness = applied lr x sharpness on every step where a sharpness was measured (tracked, or the law's
    own: ExactSharpness, AdaEoS, DCAO's lambda_1), NaN elsewhere; the same for the preconditioned pair."""
    law_factory, make_optimizer = LAWS[name]
    law = law_factory()

    def optimizer_with_schedule(params):
        optimizer = make_optimizer(params)
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
        return optimizer

    rows, tuner = run(law, optimizer_with_schedule, 5, sharpness_every=2, lr_mode=lr_mode)
    measured = 0
    for step, row in enumerate(rows):
        for plain, product in (("sharpness", "lr_sharpness"), ("preconditioned_sharpness",
                                                               "preconditioned_lr_sharpness")):
            if is_nan(row[plain]):
                assert is_nan(row[product])
                continue
            measured += 1
            assert row[product] == pytest.approx(row["lr"] * row[plain], rel=1e-15)
        if step % 2 == 0:  # tracked
            assert not is_nan(row["sharpness"]) and not is_nan(row["power_iterations"]) and 0 <= row["alignment"] <= 1
        elif law is None or name.startswith("cdat"):
            assert is_nan(row["sharpness"]) and is_nan(row["alignment"]) and is_nan(row["power_iterations"])
    assert measured >= 3
    if law is not None and lr_mode == "override":
        assert all(row["law_lr"] == row["lr"] for row in rows)


def test_lr_and_law_lr_under_multiply():
    rows, _ = run(Constant(0.2), lambda p: torch.optim.SGD(p, lr=1.0), 1, lr_mode="multiply",
                  reference_lr=2.0)
    assert rows[0]["law_lr"] == 0.2 and rows[0]["lr"] == pytest.approx(0.1)  # factor lr(t) / lr_0 = 1 / 2


def test_a_law_that_measures_the_sharpness_reports_it_on_its_probes():
    """ExactSharpness without tracking: sharpness is its own estimate, NaN on steps between probes."""
    rows, _ = run(ExactSharpness(power_iters=200, power_tol=1e-10), lambda p: torch.optim.SGD(p, lr=0.1), 4,
                  probe_every=2)
    assert [is_nan(r["sharpness"]) for r in rows] == [False, True, False, True]
    assert [r["probed"] for r in rows] == [1.0, 0.0, 1.0, 0.0]
    assert rows[0]["lr"] == pytest.approx(2.0 / rows[0]["sharpness"], rel=1e-12)  # sigma / lambda_max (eq. 16)
    dcao, _ = run(DCAO(num_eigenvalues=2), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5), 2)
    for row in dcao:
        assert row["sharpness"] == row["lambda_1"] and row["lr_lambda_1"] != row["lr_sharpness"]


def test_the_step_and_probe_schedule_skip_over_a_skipped_step():
    """A skipped step (the 4th optimizer call) neither advances the step index nor the probe_every /
    sharpness_every schedules: they follow the index of the steps taken."""
    model, x, y = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tuner = CurvatureTuner(optimizer, CDAT(scale=2.0), probe_every=2, sharpness_every=3, warn=False)
    poisoned = {"call": 3}
    calls = [0]

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss = loss * float("nan") if calls[0] == poisoned["call"] else loss
        loss.backward()
        return loss

    rows = []
    for calls[0] in range(9):
        tuner.step(closure)
        rows.append(dict(tuner.diagnostics))
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 3, 4, 5, 6, 7]
    assert [r["skipped"] for r in rows] == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    real = [r for r in rows if r["skipped"] == 0.0]
    assert [r["probed"] for r in real] == [1.0 if r["step"] % 2 == 0 else 0.0 for r in real]
    assert [not is_nan(r["alignment"]) for r in real] == [r["step"] % 3 == 0 for r in real]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert tuner.calls == 9


def test_fallback_steps_count_the_probes_where_the_law_kept_its_lr():
    model, x, y = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tuner = CurvatureTuner(optimizer, CDAT(scale=2.0), warn=False)
    calls = [0]
    bad_steps = {1, 2}
    step = [0]

    def closure():
        calls[0] += 1
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if step[0] in bad_steps and calls[0] > 1:  # the probe sees NaN, the step's own gradient does not
            loss = loss * float("nan")
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warn=False: no RuntimeWarning
        for step[0] in range(4):
            calls[0] = 0
            tuner.step(closure)
            assert tuner.diagnostics["fallback"] == (1.0 if step[0] in bad_steps else 0.0)
            assert tuner.diagnostics["fallback_steps"] == len([s for s in bad_steps if s <= step[0]])
    assert tuner.diagnostics["skipped_steps"] == 0 and tuner.calls == 4


@pytest.mark.parametrize("warn", [True, "jit"])
def test_warn_true_or_jit_warns_on_bad_steps(warn):
    model, x, y = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tuner = CurvatureTuner(optimizer, CDAT(scale=2.0), warn=warn)
    with pytest.warns(RuntimeWarning, match=r"eos_core: step 0 skipped.*1 step\(s\) skipped so far"):
        tuner.step(closure_for(model, optimizer, x, y, poison=lambda n: True))


# -- settings -----------------------------------------------------------------------------------------------
def test_deprecated_option_names_warn_and_still_work():
    params = [torch.nn.Parameter(torch.ones(2))]
    with pytest.warns(DeprecationWarning, match="power_iters= is deprecated, use sharpness_iters="):
        tuner = CurvatureTuner(torch.optim.SGD(params, lr=0.1), None, sharpness_every=1, power_iters=7)
    assert tuner.settings.sharpness_iters == 7
    tuner.detach()
    with pytest.warns(DeprecationWarning, match="power_tol="):
        tuner = CurvatureTuner(torch.optim.SGD(params, lr=0.1), None, power_tol=1e-5)
    assert tuner.settings.sharpness_tol == 1e-5
    tuner.detach()
    with pytest.warns(DeprecationWarning, match="initial_lr="):
        tuner = CurvatureTuner(torch.optim.SGD(params, lr=0.1), Constant(0.1), initial_lr=0.5)
    assert tuner.settings.reference_lr == 0.5
    tuner.detach()
    with pytest.raises(ValueError, match="sharpness_iters"):
        CurvatureTuner(torch.optim.SGD(params, lr=0.1), None, power_iters=3, sharpness_iters=3)


def test_the_deprecated_lanczos_steps_option_applies_only_to_a_dcao_law_that_leaves_it_unset():
    used = []
    original = spectral_estimates.lanczos

    def spy(matvec, start, k, *, num_steps, ops):
        used.append(num_steps)
        return original(matvec, start, k, num_steps=num_steps, ops=ops)

    for law, expected in ((DCAO(num_eigenvalues=2), 7), (DCAO(num_eigenvalues=2, lanczos_steps=5), 5)):
        model, x, y = problem()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        with pytest.warns(DeprecationWarning, match=r"lanczos_steps= is deprecated: set it on the law, DCAO"):
            tuner = CurvatureTuner(optimizer, law, lanczos_steps=7)
        used.clear()
        with mock.patch.object(spectral_estimates, "lanczos", spy):
            tuner.step(closure_for(model, optimizer, x, y))
        assert used == [expected]
    model, x, y = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    tuner = CurvatureTuner(optimizer, DCAO(num_eigenvalues=2))
    used.clear()
    with mock.patch.object(spectral_estimates, "lanczos", spy):
        tuner.step(closure_for(model, optimizer, x, y))
    assert used == [20]  # the law's request: eos_core.request.LANCZOS_STEPS


def test_settings_object_and_options_together():
    params = [torch.nn.Parameter(torch.ones(2))]
    settings = TunerSettings(probe_every=3, sharpness_iters=9)
    tuner = CurvatureTuner(torch.optim.SGD(params, lr=0.1), CDAT(), settings=settings, sharpness_every=4)
    assert (tuner.probe_every, tuner.sharpness_every, tuner.settings.sharpness_iters) == (3, 4, 9)
    tuner.detach()
    with pytest.warns(DeprecationWarning):
        tuner = CurvatureTuner(torch.optim.SGD(params, lr=0.1), CDAT(), settings=settings, power_iters=5)
    assert tuner.settings.sharpness_iters == 5
    tuner.detach()
    with pytest.raises(ValueError, match="settings"):
        CurvatureTuner(torch.optim.SGD(params, lr=0.1), CDAT(), settings={"probe_every": 2})


def test_schedule_attributes_are_settable_and_validated():
    model, x, y = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tuner = CurvatureTuner(optimizer, CDAT(scale=2.0))
    tuner.probe_every = 2
    tuner.sharpness_every = 1
    tuner.clipped_gradients = True
    assert tuner.settings.probe_every == 2 and tuner.settings.clipped_gradients
    for _ in range(2):
        tuner.step(closure_for(model, optimizer, x, y))
    assert tuner.diagnostics["probed"] == 0.0 and not is_nan(tuner.diagnostics["sharpness"])
    with pytest.raises(ValueError, match="probe_every"):
        tuner.probe_every = 0
    with pytest.raises(ValueError, match="clipped_gradients"):
        tuner.clipped_gradients = "yes"


# -- spectral start vectors ------------------------------------------------------------------------------------
def rayleigh_quotient_of_the_start(quadratic, make_closure, seed, optimizer="sgd"):
    """One power-iteration product: the tracked sharpness is v0^T H v0 of the start vector v0."""
    w, loss, _, _ = quadratic
    w.data = w.data.clone()
    opt = torch.optim.SGD([w], lr=1e-3) if optimizer == "sgd" else torch.optim.Adam([w], lr=1e-3)
    tuner = CurvatureTuner(opt, None, sharpness_every=1, sharpness_iters=1, sharpness_tol=0.0, seed=seed)
    tuner.step(make_closure(opt, loss))
    tuner.detach()
    return tuner.diagnostics, opt


@pytest.mark.parametrize("seed", [0, 5])
def test_the_seed_sets_the_start_vector_of_power_iteration(quadratic, make_closure, seed):
    """The start is eos_core.spectral.random_start(shapes, seed) (the same in every framework) for H, and
    random_start(shapes, seed + 1) for the preconditioned Hessian."""
    _, _, a, _ = quadratic
    first, _ = rayleigh_quotient_of_the_start(quadratic, make_closure, seed)
    again, _ = rayleigh_quotient_of_the_start(quadratic, make_closure, seed)
    other, _ = rayleigh_quotient_of_the_start(quadratic, make_closure, seed + 1)
    v0 = torch.from_numpy(random_start([(12,)], seed)[0])
    assert first["sharpness"] == pytest.approx(float(v0 @ a @ v0), rel=1e-12)
    assert again["sharpness"] == first["sharpness"] and other["sharpness"] != first["sharpness"]
    adam, opt = rayleigh_quotient_of_the_start(quadratic, make_closure, seed, optimizer="adam")
    state = opt.state[opt.param_groups[0]["params"][0]]
    scaling = ((state["exp_avg_sq"] / (1 - 0.999)).sqrt() + 1e-8) * (1 - 0.9)
    v1 = torch.from_numpy(random_start([(12,)], seed + 1)[0])
    preconditioned = scaling.rsqrt()[:, None] * a * scaling.rsqrt()[None, :]
    assert adam["preconditioned_sharpness"] == pytest.approx(float(v1 @ preconditioned @ v1), rel=1e-10)


def lanczos_starts(law, make_optimizer, steps, **options):
    """The start vector and the top Ritz vector of every Lanczos run, and the tuner."""
    runs = []
    original = spectral_estimates.lanczos

    def spy(matvec, start, k, *, num_steps, ops):
        result = original(matvec, start, k, num_steps=num_steps, ops=ops)
        runs.append(([t.clone() for t in start], [t.clone() for t in result.eigenvectors[0]]))
        return result

    model, x, y = problem()
    optimizer = make_optimizer(model.parameters())
    tuner = CurvatureTuner(optimizer, law, seed=3, **options)
    closure = closure_for(model, optimizer, x, y)
    eigenvectors = []
    with mock.patch.object(spectral_estimates, "lanczos", spy):
        for _ in range(steps):
            tuner.step(closure)
            vector = tuner.spectral.eigenvector
            eigenvectors.append(None if vector is None else [t.clone() for t in vector])
    return runs, eigenvectors, [tuple(p.shape) for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_lanczos_starts_from_the_warm_start_of_its_operator():
    """Lanczos starts from random_start(seed) (seed + 1 for the preconditioned Hessian) and then from the
    operator's warm start: its own last top Ritz vector, or tracking's eigenvector (tracking itself continues
    from the Ritz vector of the same step)."""
    sgd = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5)  # noqa: E731
    runs, _, shapes = lanczos_starts(DCAO(num_eigenvalues=2), sgd, 2)
    for got, want in zip(runs[0][0], random_start(shapes, 3), strict=True):
        np.testing.assert_array_equal(got.numpy(), want)
    assert same(runs[1][0], runs[0][1])
    runs, eigenvectors, _ = lanczos_starts(DCAO(num_eigenvalues=2), sgd, 2, sharpness_every=1)
    assert same(runs[1][0], eigenvectors[0]) and not same(eigenvectors[0], runs[0][1])  # tracking moved it
    runs, _, shapes = lanczos_starts(DCAO(preconditioned=True), lambda p: torch.optim.Adam(p, lr=1e-2), 1)
    for got, want in zip(runs[0][0], random_start(shapes, 4), strict=True):
        np.testing.assert_array_equal(got.numpy(), want)


# -- one power iteration per operator and step ---------------------------------------------------------------
def spectral_run(law, sharpness_iters, sharpness_tol, steps=3):
    """Closure evaluations per step (the step's own + one per Hessian operator built) and the start / end
    vectors of every power iteration."""
    runs = []
    original = spectral_estimates.power_iteration

    def spy(matvec, start, *, tol, max_iters, ops):
        result = original(matvec, start, tol=tol, max_iters=max_iters, ops=ops)
        runs.append(([t.clone() for t in start], [t.clone() for t in result.eigenvector], int(result.iterations)))
        return result

    model, x, y = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tuner = CurvatureTuner(optimizer, law, sharpness_every=1, sharpness_iters=sharpness_iters,
                           sharpness_tol=sharpness_tol)
    calls = [0]
    closure = closure_for(model, optimizer, x, y, calls=calls)
    rows = []
    with mock.patch.object(spectral_estimates, "power_iteration", spy):
        for _ in range(steps):
            calls[0] = 0
            tuner.step(closure)
            rows.append((calls[0], dict(tuner.diagnostics)))
    return rows, runs


def test_tracking_reuses_the_laws_estimate_when_the_law_is_as_strict():
    """ExactSharpness (power_iters 50 >= 20, power_tol 1e-6 <= 1e-3) and tracking on the same step: one power
    iteration, whose estimate and product count both report."""
    rows, runs = spectral_run(ExactSharpness(power_iters=50, power_tol=1e-6), 20, 1e-3)
    assert len(runs) == 3  # one per step, not two
    for (calls, row), (_, _, iterations) in zip(rows, runs, strict=True):
        assert calls == 2  # the step's own evaluation and one Hessian operator
        assert row["power_iterations"] == iterations
        assert row["lr"] == pytest.approx(2.0 / row["sharpness"], rel=1e-12)  # the same estimate as the law's


@pytest.mark.parametrize("law,iters,tol", [
    (lambda: AdaEoS(gamma=0.5), 20, 1e-3),  # power_tol = 0: exactly 2 products, not a converged estimate
    (lambda: ExactSharpness(power_iters=10, power_tol=1e-6), 20, 1e-3),  # fewer products than tracking's
    (lambda: ExactSharpness(power_iters=50, power_tol=1e-2), 20, 1e-3),  # a looser tolerance
])
def test_tracking_continues_warm_from_the_laws_vector_otherwise(law, iters, tol):
    rows, runs = spectral_run(law(), iters, tol)
    assert len(runs) == 6  # the law's, then tracking's
    for index in range(3):
        (_, law_end, _), (tracking_start, _, tracking_iterations) = runs[2 * index], runs[2 * index + 1]
        for a, b in zip(tracking_start, law_end, strict=True):
            assert torch.equal(a, b)
        assert rows[index][1]["power_iterations"] == tracking_iterations
    assert all(calls == 3 for calls, _ in rows)


def test_measuring_only_applies_the_optimizers_own_lr_even_at_zero():
    """law=None leaves the lr to the optimizer: a warm-up scheduler at 0 means no step, also on a tracked step
    (where the tuner steps with a positive lr to read u off and then applies the group's own lr)."""
    model, x, y = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 2))
    tuner = CurvatureTuner(optimizer, None, sharpness_every=1)
    closure = closure_for(model, optimizer, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    tuner.step(closure)
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), before, strict=True))
    assert tuner.diagnostics["lr"] == 0.0 and tuner.diagnostics["lr_sharpness"] == 0.0
    assert tuner.diagnostics["update_norm"] > 0 and math.isfinite(tuner.diagnostics["sharpness"])
    scheduler.step()
    tuner.step(closure)
    assert tuner.diagnostics["lr"] == pytest.approx(0.05)
    assert any(not torch.equal(p.detach(), w) for p, w in zip(model.parameters(), before, strict=True))


def test_bad_step_warnings_point_at_the_callers_step_line():
    model, x, y = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tuner = CurvatureTuner(optimizer, CDAT(scale=2.0))
    closure = closure_for(model, optimizer, x, y, poison=lambda n: True)
    with pytest.warns(RuntimeWarning, match="skipped") as through_the_tuner:
        tuner.step(closure)
    with pytest.warns(RuntimeWarning, match="skipped") as through_the_optimizer:
        optimizer.step(closure)
    assert through_the_tuner[0].filename == through_the_optimizer[0].filename == __file__


@pytest.mark.parametrize("law", [Constant(0.05), CDAT(scale=2.0), None])
def test_grad_norm_and_update_norm_on_every_step(law):
    """Plain SGD: u = -g, so |u| = |g| on every step, probed or not (|u| is read off the move on a direct step).

    Measuring only (law=None) the tuner neither reads the gradient nor copies w on a step that measures nothing:
    |g| and |u| come with the measurements (here sharpness_every=2), NaN in between; the loss on every step.
    """
    model, x, y = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    tuner = CurvatureTuner(optimizer, law, probe_every=2, sharpness_every=None if law is not None else 2)
    closure = closure_for(model, optimizer, x, y)
    for step in range(4):
        loss = torch.nn.functional.mse_loss(model(x), y)
        g = torch.autograd.grad(loss, list(model.parameters()))
        norm = float(torch.sqrt(sum((t * t).sum() for t in g)))
        tuner.step(closure)
        assert tuner.diagnostics["loss"] == pytest.approx(float(loss), rel=1e-15)
        if law is None and step % 2:
            assert math.isnan(tuner.diagnostics["grad_norm"]) and math.isnan(tuner.diagnostics["update_norm"])
            continue
        assert tuner.diagnostics["grad_norm"] == pytest.approx(norm, rel=1e-12)
        assert tuner.diagnostics["update_norm"] == pytest.approx(norm, rel=1e-9)


