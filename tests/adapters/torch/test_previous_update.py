"""CDAT's previous-update numerator on the PyTorch tuner: the statistics against an explicit Hessian.

The tuner must hand the law g_t(w_t) . u_{t-1}, u_{t-1}^T H_t u_{t-1} at w_t and the lr applied to u_{t-1}, with
u_{t-1} the update (for lr 1) of the last step taken, on every route and with probes spaced out.
"""

import math

import pytest
import torch

from eos_core import CDAT
from eos_core.adapters.torch import CurvatureTuner


def make_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    batches = [slice(8 * i, 8 * i + 8) for i in range(8)]  # a different mini-batch every step
    return model, x, y, batches


def flat_loss(model, x, y):
    shapes = [p.shape for p in model.parameters()]

    def loss(flat):
        out, i = x, 0
        tensors = []
        for shape in shapes:
            n = math.prod(shape)
            tensors.append(flat[i:i + n].reshape(shape))
            i += n
        w1, b1, w2, b2 = tensors
        out = torch.tanh(x @ w1.T + b1) @ w2.T + b2
        return ((out - y) ** 2).mean()

    return loss


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize(("route", "probe_every", "base", "rtol"), [
    ("double-backward", 1, "sgd", 1e-9),
    ("fd-onesided", 1, "adam", 1e-5),
    ("double-backward", 3, "adam", 1e-9),
])
def test_the_statistics_match_an_explicit_hessian(route, probe_every, base, rtol):
    model, x, y, batches = make_problem()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05) if base == "sgd" else torch.optim.Adam(params, lr=0.01)
    law = CDAT(scale=1.5, numerator="previous-update", lr_min=1e-3)  # u_{t-1} read off the move
    tuner = CurvatureTuner(optimizer, law, route=route, probe_every=probe_every)
    history = []  # (w before the step, applied lr, diagnostics)
    for step, rows in enumerate(batches):
        xb, yb = x[rows], y[rows]

        def closure(xb=xb, yb=yb):
            tuner.zero_grad()
            loss = ((model(xb) - yb) ** 2).mean()
            loss.backward()
            return loss

        before = flat(model)
        tuner.step(closure)
        history.append((before, flat(model), dict(tuner.diagnostics), xb, yb))
        d = tuner.diagnostics
        if step == 0:
            assert d["lr"] == pytest.approx(optimizer.defaults["lr"])  # no previous update: lr_init
            continue
        if step % probe_every:
            continue
        w_prev, w_now, previous = history[-2][0], before, history[-2][2]
        u_prev = (w_now - w_prev) / previous["lr"]  # the last step's update for lr 1
        loss = flat_loss(model, xb, yb)
        w = w_now.clone().requires_grad_(True)
        g = torch.autograd.grad(loss(w), w)[0]
        hessian = torch.autograd.functional.hessian(loss, w_now)
        curvature = float(u_prev @ hessian @ u_prev)
        numerator = -float(g @ u_prev) + previous["lr"] * curvature
        assert d["numerator"] == pytest.approx(numerator, rel=rtol, abs=1e-12)
        assert d["denominator"] == pytest.approx(abs(curvature), rel=rtol)
        assert d["lr"] == pytest.approx(max(1.5 * max(numerator, 0.0) / abs(curvature), 1e-3), rel=rtol)
    assert any(h[2]["lr"] != optimizer.defaults["lr"] for h in history[1:])


def test_it_costs_one_curvature_probe_and_survives_a_checkpoint():
    """The state dict keeps u_{t-1} and its lr: a resumed tuner continues bit for bit."""
    def run(resume_at=None):
        model, x, y, batches = make_problem(1)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        tuner = CurvatureTuner(optimizer, CDAT(scale=1.0, ema=0.9, numerator="previous-update"),
                               route="double-backward")
        lrs = []
        for step, rows in enumerate(batches):
            if step == resume_at:
                saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
                model, _, _, _ = make_problem(2)
                model.load_state_dict(saved["model"])
                optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
                tuner = CurvatureTuner(optimizer, CDAT(scale=1.0, ema=0.9, numerator="previous-update"),
                                       route="double-backward")
                optimizer.load_state_dict(saved["optimizer"])

            def closure(rows=rows, model=model, tuner=tuner):
                tuner.zero_grad()
                loss = ((model(x[rows]) - y[rows]) ** 2).mean()
                loss.backward()
                return loss

            tuner.step(closure)
            lrs.append(tuner.diagnostics["lr"])
        return lrs, flat(model)

    straight, w_straight = run()
    resumed, w_resumed = run(resume_at=4)
    assert resumed == straight
    assert torch.equal(w_resumed, w_straight)
