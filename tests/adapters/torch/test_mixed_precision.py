"""Mixed precision: bf16 autocast, and a GradScaler whose skipped steps the tuner skips too."""

import math

import pytest
import torch

from eos_core import CDAT
from eos_core.adapters.torch import CurvatureTuner


def test_bf16_autocast_measures_curvature_in_high_precision():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    lrs = {}
    for autocast in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        tuner = CurvatureTuner(optimizer, CDAT(scale=2.0), sharpness_every=1)

        def closure(model=model, optimizer=optimizer, autocast=autocast):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        lrs[autocast] = []
        for _ in range(3):
            tuner.step(closure)
            lrs[autocast].append(tuner.diagnostics["lr"])
        measured = ("lr", "loss", "grad_norm", "update_norm", "numerator", "denominator", "sharpness", "lr_sharpness",
                    "alignment", "power_iterations")
        assert all(math.isfinite(tuner.diagnostics[k]) for k in measured), tuner.diagnostics
        assert math.isnan(tuner.diagnostics["preconditioned_sharpness"])  # SGD has no preconditioner
    # bf16 compute perturbs the curvature by its rounding (~1e-2), not more
    assert lrs[True] == pytest.approx(lrs[False], rel=5e-2)


def test_grad_scaler_skipped_steps_are_skipped_by_the_tuner():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    tuner = CurvatureTuner(optimizer, CDAT(scale=2.0), grad_scaler=scaler)

    def loss_fn():
        return torch.nn.functional.mse_loss(model(x), y)

    def train_step(poison=False):
        optimizer.zero_grad()
        scaler.scale(loss_fn()).backward()
        if poison:
            next(model.parameters()).grad.fill_(float("inf"))
        tuner.set_objective(loss_fn)
        scaler.step(optimizer)
        scaler.update()

    train_step()
    assert tuner.diagnostics["step"] == 0
    scaled_lr = tuner.diagnostics["lr"]
    before = [p.detach().clone() for p in model.parameters()]
    train_step(poison=True)  # the scaler finds infs and does not call optimizer.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True))
    assert tuner.diagnostics["step"] == 0  # no tuner step either
    train_step()
    assert tuner.diagnostics["step"] == 1

    # the numerator uses unscaled gradients: same lr as an unscaled run from the same point
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    ref_tuner = CurvatureTuner(ref_optimizer, CDAT(scale=2.0))

    def closure():
        ref_optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(reference(x), y)
        loss.backward()
        return loss

    ref_tuner.step(closure)
    assert scaled_lr == pytest.approx(ref_tuner.diagnostics["lr"], rel=1e-5)


def test_finite_differences_under_autocast_use_the_autocast_precision():
    """Under bf16 autocast the gradient is only bf16-precise: the oracle notices the bf16 results while the
    loss runs and sizes finite-difference steps for bf16 (as if fd_eps were bf16's epsilon), which keeps
    the one-sided curvature close to the exact route's; fp32-sized steps would drown in rounding."""
    torch.manual_seed(0)
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    lrs = {}
    for name, route, fd_eps in (("exact", "double-backward", None), ("detected", "fd-onesided", None),
                                ("given", "fd-onesided", torch.finfo(torch.bfloat16).eps)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        tuner = CurvatureTuner(optimizer, CDAT(scale=2.0), route=route, fd_eps=fd_eps)

        def closure(model=model, optimizer=optimizer):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        lrs[name] = []
        for _ in range(3):
            tuner.step(closure)
            lrs[name].append(tuner.diagnostics["lr"])
    assert lrs["detected"] == lrs["given"]  # the same steps as with fd_eps = bf16's epsilon
    assert lrs["detected"] == pytest.approx(lrs["exact"], rel=0.1)
