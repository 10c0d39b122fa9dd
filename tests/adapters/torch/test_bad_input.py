"""Bad input never corrupts parameters (SPEC section 10)."""

import math
import warnings

import pytest
import torch

from eos_core import CDAT
from eos_core.adapters.torch import CurvatureTuner


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
        tuner = CurvatureTuner(optimizer, None, sharpness_every=1, power_iters=200, power_tol=1e-10)  # only measures
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
