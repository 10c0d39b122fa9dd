"""Bad input never corrupts parameters: skipped steps, law fallbacks, errors raised while probing."""

import math
import warnings

import pytest
import torch

from eos_core import CDAT
from eos_core.adapters.torch import CurvatureTuner
from eos_core.adapters.torch.oracles import OUT_OF_MEMORY


def same_values(a, b):
    """Two diagnostics dicts are equal, NaN equal to NaN."""
    def key(value):
        return "nan" if isinstance(value, float) and math.isnan(value) else value

    return a.keys() == b.keys() and all(key(a[k]) == key(b[k]) for k in a)


def make(law=None, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tuner = CurvatureTuner(optimizer, law or CDAT(scale=2.0, ema=0.9), **kwargs)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    return model, optimizer, tuner, x, y


@pytest.mark.parametrize("poison", ["loss-nan", "loss-inf", "grad-inf", "grad-nan"])
def test_non_finite_loss_or_gradient_skips_the_step(poison):
    model, optimizer, tuner, x, y = make()
    state = {"poison": False}

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if state["poison"] and poison == "loss-nan":
            loss = loss * float("nan")
        if state["poison"] and poison == "loss-inf":
            loss = loss + float("inf")
        loss.backward()
        if state["poison"] and poison == "grad-inf":
            next(model.parameters()).grad[0, 0] = float("inf")
        if state["poison"] and poison == "grad-nan":
            list(model.parameters())[-1].grad[0] = float("nan")
        return loss

    for _ in range(3):
        tuner.step(closure)
    good_lr = tuner.diagnostics["lr"]
    params = [p.detach().clone() for p in model.parameters()]
    adam_state = {k: v.clone() for k, v in optimizer.state[next(model.parameters())].items()}
    state["poison"] = True
    with pytest.warns(RuntimeWarning, match="skipped"):
        tuner.step(closure)
    assert tuner.diagnostics["skipped"] == 1.0
    for p, saved in zip(model.parameters(), params, strict=True):
        assert torch.equal(p.detach(), saved)  # untouched
    for k, v in optimizer.state[next(model.parameters())].items():
        assert torch.equal(v, adam_state[k])  # the optimizer state did not move either
    state["poison"] = False
    tuner.step(closure)  # training continues
    assert tuner.diagnostics["skipped"] == 0.0 and math.isfinite(tuner.diagnostics["lr"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert good_lr > 0


@pytest.mark.parametrize("route", ["fd-onesided", "double-backward"])
def test_non_finite_curvature_keeps_the_last_good_lr(route):
    model, optimizer, tuner, x, y = make(law=CDAT(scale=2.0), route=route)
    state = {"probe_calls": 0, "poison": False}

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        state["probe_calls"] += 1
        if state["poison"] and state["probe_calls"] > 1:  # the step's own evaluation is fine, probes are not
            loss = loss * float("nan")
        loss.backward()
        return loss

    tuner.step(closure)
    good_lr = tuner.diagnostics["lr"]
    state.update(poison=True, probe_calls=0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite curvature"):
        tuner.step(closure)
    assert tuner.diagnostics["lr"] == good_lr
    assert tuner.diagnostics["fallback"] == 1.0
    assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nothing_to_skip_when_disabled():
    model, optimizer, tuner, x, y = make(skip_nonfinite=False)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuner.step(closure)
    assert tuner.diagnostics["skipped"] == 0.0


def test_a_non_finite_sharpness_does_not_poison_the_warm_start():
    """A NaN Hessian-vector product on one tracking step gives a NaN sharpness for that step only: the
    next power iteration restarts and measures the same value as a run that never saw the NaN."""
    histories = []
    for poisoned_step in (None, 2):
        model, _, other, x, y = make()
        other.detach()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        tuner = CurvatureTuner(optimizer, None, sharpness_every=1, sharpness_iters=200, sharpness_tol=1e-10)  # measures
        state = {"calls": 0, "poison": False}

        def closure(model=model, optimizer=optimizer, state=state, x=x, y=y):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            state["calls"] += 1
            if state["poison"] and state["calls"] > 1:  # only the probes see NaN
                loss = loss * float("nan")
            loss.backward()
            return loss

        sharpness = []
        for step in range(5):
            state.update(calls=0, poison=step == poisoned_step)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                tuner.step(closure)
            sharpness.append(tuner.diagnostics["sharpness"])
            assert all(torch.isfinite(p).all() for p in model.parameters())
        histories.append(sharpness)
    clean, poisoned = histories
    assert math.isnan(poisoned[2])
    assert poisoned[3:] == pytest.approx(clean[3:], rel=1e-6)


def test_a_non_finite_update_from_a_finite_gradient_leaves_the_parameters():
    # Adam with eps=0: a weight whose gradient is exactly 0 (its input feature is always 0) gets 0/0 = NaN
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    tuner = CurvatureTuner(torch.optim.Adam(model.parameters(), lr=1e-2, eps=0.0), CDAT(scale=2.0))
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    x[:, 2] = 0.0

    def closure():
        tuner.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="update is not finite"):
        tuner.step(closure)
    assert tuner.diagnostics["skipped"] == 1.0
    for p, saved in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), saved)


@pytest.mark.parametrize("error", [ValueError("labels out of range"),
                                   OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 2.00 GiB")])
def test_an_error_in_a_probe_propagates_unchanged_and_the_step_is_completed(error):
    """The user's closure fails while the curvature route is being resolved (a bad batch, out of memory): the
    error reaches the caller unchanged (not "wrong values on this model", not a silent switch to finite
    differences), and the parameters are not left half-updated: the step is taken with the law's last good lr
    (here the initial 0.1), as plain SGD would take it, and is reported and counted."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tuner = CurvatureTuner(optimizer, CDAT(scale=2.0), fd_above=None)  # auto resolves to double backward
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] > 1:  # the step's own evaluation works, the probe's does not
            raise error
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.mse_loss(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no "auto fell back" warning
        with pytest.raises(type(error)) as raised:
            tuner.step(closure)
    assert raised.value is error
    assert calls[0] == 2  # no second route was tried
    for p, w, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), w - 0.1 * g, rtol=1e-12, atol=1e-15)
    assert tuner.route == "auto" and tuner.calls == 1
    assert tuner.diagnostics["step"] == 0 and tuner.diagnostics["lr"] == 0.1
    assert tuner.diagnostics["probed"] == 0.0 and math.isnan(tuner.diagnostics["numerator"])
    calls[0] = -10  # the next steps work again: the route resolves, the law probes
    tuner.step(closure)
    assert tuner.route == "double-backward" and tuner.diagnostics["step"] == 1 and tuner.diagnostics["probed"] == 1.0


def test_skipped_steps_report_the_previous_values_and_are_counted():
    """A skipped step does not advance the step index; it reports the previous step's values with skipped = 1,
    the index the next real step will have and the cumulative count; warn=False keeps it quiet."""
    model, optimizer, tuner, x, y = make(warn=False)
    poison = {"on": False}

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss = loss * float("nan") if poison["on"] else loss
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        poison["on"] = True
        tuner.step(closure)  # a first step can be skipped too: nothing measured yet
        first = dict(tuner.diagnostics)
        poison["on"] = False
        tuner.step(closure)
        good = dict(tuner.diagnostics)
        poison["on"] = True
        tuner.step(closure)
        skipped = dict(tuner.diagnostics)
    assert first["skipped"] == 1.0 and first["step"] == 0 and first["skipped_steps"] == 1
    assert first["lr"] == pytest.approx(1e-2) and math.isnan(first["loss"]) and first["probed"] == 0.0
    assert good["step"] == 0 and good["skipped"] == 0.0 and good["skipped_steps"] == 1
    assert skipped["step"] == 1 and skipped["skipped"] == 1.0 and skipped["skipped_steps"] == 2
    changed = ("step", "skipped", "skipped_steps")
    assert same_values({k: v for k, v in skipped.items() if k not in changed},
                       {k: v for k, v in good.items() if k not in changed})
    assert tuner.calls == 3
    assert tuner.state_dict()["eos_core"]["step"] == 1


def test_non_finite_hessian_products_make_dcao_fall_back():
    """NaN Hessian-vector products give NaN eigenvalues (Lanczos' tridiagonal eigensolver cannot run on them):
    DCAO keeps its lr, momentum and weight decay and says so, instead of stopping training with LinAlgError."""
    from eos_core import DCAO

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.5)
    tuner = CurvatureTuner(optimizer, DCAO(num_eigenvalues=2, lanczos_steps=6))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    calls = [0]

    def closure():
        calls[0] += 1
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss = loss * float("nan") if calls[0] > 1 else loss  # the probes see NaN
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="non-finite top_eigenvalues"):
        tuner.step(closure)
    assert tuner.diagnostics["fallback"] == 1.0 and tuner.diagnostics["fallback_steps"] == 1
    assert tuner.diagnostics["lr"] == pytest.approx(1e-2) and tuner.diagnostics["momentum"] == 0.5
    assert math.isnan(tuner.diagnostics["lambda_1"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_model_that_holds_none_of_the_optimizers_parameters_is_refused():
    """DeepSpeed ZeRO's inner optimizer steps flat fp32 partitions of the parameters: with the model given, the tuner
    tells (measured with deepspeed 0.19.8, ZeRO-1/2 on CPU: ranks otherwise apply different learning rates)."""
    model = torch.nn.Linear(3, 2)
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    with pytest.raises(ValueError, match="holds none of the optimizer's parameters"):
        CurvatureTuner(torch.optim.SGD([flat], lr=0.1), CDAT(), model=model)
    CurvatureTuner(torch.optim.SGD(model.parameters(), lr=0.1), CDAT(), model=model).detach()
