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


@pytest.mark.parametrize("poison", ["loss-nan", "loss-inf", "grad-inf"])
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


def test_non_finite_curvature_keeps_the_last_good_lr():
    model, optimizer, tuner, x, y = make(law=CDAT(scale=2.0), route="fd-onesided")
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
