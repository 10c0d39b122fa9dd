"""Every law through the PyTorch adapter equals the core law fed independently computed statistics.

The reference re-implements the training loop on a flat float64 parameter vector with the explicit
Hessian (torch.autograd.functional.hessian) and exact eigenvalues (torch.linalg.eigvalsh), and
feeds the core law itself; the tuner must produce the same learning rates (and, for DCAO, the same
momentum and weight decay, written into the optimizer).
"""

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from eos_core import CDAT, DCAO, AdaEoS, Armijo, Constant, ExactSharpness, HyperGradient, Polyak, WarmupCosine, stats
from eos_core.adapters.torch import CurvatureTuner

STEPS = 8


def problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (24,), generator=g)
    return model, x, y


def flat_loss(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def f(w):
        tensors = {n: c.reshape(s) for n, c, s in zip(names, torch.split(w, sizes), shapes, strict=True)}
        return torch.nn.functional.cross_entropy(functional_call(model, tensors, (x,)), y)

    return f


def reference(law, lr0, momentum=0.0, weight_decay=0.0):
    """Plain loop on a flat vector: SGD direction u = -(momentum buffer of g + wd w), exact statistics."""
    model, x, y = problem()
    f = flat_loss(model, x, y)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    state = law.init(lr0, hyperparams={"momentum": momentum, "weight_decay": weight_decay})
    buffer, previous_u, out = None, None, []
    for _ in range(STEPS):
        mu = float(getattr(state, "momentum", momentum))
        wd = float(getattr(state, "weight_decay", weight_decay))
        wv = w.clone().requires_grad_(True)
        loss = f(wv)
        g = torch.autograd.grad(loss, wv)[0].detach()
        h = torch.autograd.functional.hessian(f, w)
        d = g + wd * w
        buffer = d.clone() if buffer is None else mu * buffer + d
        u = -buffer
        eig = torch.linalg.eigvalsh(h)
        values = {
            stats.GRAD_DOT_UPDATE: float(g @ u),
            stats.CURVATURE: float(u @ h @ u),
            stats.LOSS: float(loss),
            stats.GRAD_NORM_SQ: float(g @ g),
            stats.SHARPNESS: float(eig[-1]),
            stats.TOP_EIGENVALUES: eig.flip(0)[: getattr(law, "num_eigenvalues", 1)].numpy(),
            stats.TRIAL_LOSS: lambda eta, w=w, u=u: float(f(w + float(eta) * u)),
            stats.GRAD_PREV_UPDATE_COSINE: 0.0 if previous_u is None
            else float(g @ previous_u / (g.norm() * previous_u.norm())),
        }
        result = law.update(state, {k: values[k] for k in law.needs})
        state = result.state
        out.append((float(result.lr), {k: float(v) for k, v in result.hyperparams.items()}, float(loss)))
        w = w + float(result.lr) * u
        previous_u = u
    return out


def tuned(law, lr0, momentum=0.0, weight_decay=0.0, **kwargs):
    model, x, y = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr0, momentum=momentum, weight_decay=weight_decay)
    tuner = CurvatureTuner(optimizer, law, **kwargs)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    out = []
    for _ in range(STEPS):
        tuner.step(closure)
        group = optimizer.param_groups[0]
        out.append((tuner.diagnostics["lr"], {"momentum": group["momentum"], "weight_decay": group["weight_decay"]},
                    tuner.diagnostics.get("loss")))
    return out


LAWS = {
    "cdat": (lambda: CDAT(scale=2.0, ema=0.5), 0.1, 0.0, 0.0, {}),
    "cdat-greedy-momentum": (lambda: CDAT(scale=1.0), 0.1, 0.9, 1e-3, {}),
    "exact-sharpness": (lambda: ExactSharpness(scale=2.0, power_iters=2000, power_tol=1e-13), 0.1, 0.0, 0.0,
                        {}),
    "adaeos": (lambda: AdaEoS(gamma=0.5, power_iters=500), 0.05, 0.0, 0.0, {}),
    "dcao": (lambda: DCAO(target=1.5, num_eigenvalues=2, lanczos_steps=37, momentum_sensitivity=0.3,
                          weight_decay_sensitivity=0.5, momentum_bounds=(0.5, 0.95), lr_factor_bounds=(0.5, 2.0)),
             0.5, 0.9, 1e-2, {}),
    "armijo": (lambda: Armijo(c=1e-4, c_plus=4.0, c_minus=0.8), 0.1, 0.0, 0.0, {}),
    "polyak": (lambda: Polyak(f_star=0.0, lr_max=5.0), 0.1, 0.0, 0.0, {}),
    "hypergradient": (lambda: HyperGradient(beta=0.2), 0.5, 0.0, 0.0, {}),
    "constant": (lambda: Constant(0.3), 0.1, 0.0, 0.0, {}),
    "warmup-cosine": (lambda: WarmupCosine(peak_lr=1.0, total_steps=STEPS, warmup_steps=3), 0.1, 0.0, 0.0, {}),
}


@pytest.mark.parametrize("name", sorted(LAWS))
def test_lr_sequence_equals_the_core_law_on_exact_statistics(name):
    factory, lr0, momentum, weight_decay, kwargs = LAWS[name]
    expected = reference(factory(), lr0, momentum, weight_decay)
    got = tuned(factory(), lr0, momentum, weight_decay, **kwargs)
    rel = 1e-6 if name in ("exact-sharpness", "adaeos", "dcao") else 1e-9
    for step, ((lr_ref, hyper_ref, _), (lr, hyper, _)) in enumerate(zip(expected, got, strict=True)):
        assert lr == pytest.approx(lr_ref, rel=rel, abs=1e-12), f"step {step}"
        for key, value in hyper_ref.items():  # DCAO's decisions reach the optimizer
            assert hyper[key] == pytest.approx(value, rel=rel), f"step {step} {key}"
    losses = [loss for _, _, loss in expected]
    if name != "warmup-cosine":  # lr 0 at the first step of the warm-up
        assert losses[-1] < losses[0], f"{name} does not train"


def test_armijo_accepted_steps_satisfy_the_condition():
    model, x, y = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    law = Armijo(c=0.3, c_minus=0.5)
    tuner = CurvatureTuner(optimizer, law)

    def loss_now():
        return float(torch.nn.functional.cross_entropy(model(x), y))

    for _ in range(10):
        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        before = loss_now()
        tuner.step(closure)
        g_dot_u = -tuner.diagnostics["grad_norm"] ** 2  # u = -g for plain SGD
        lr = tuner.diagnostics["lr"]
        assert tuner.diagnostics["accepted"] == 1.0
        assert loss_now() <= before + 0.3 * lr * g_dot_u + 1e-12


def test_polyak_on_an_interpolating_problem():
    torch.manual_seed(0)
    x = torch.randn(20, 40, dtype=torch.float64)
    y = x @ torch.randn(40, 1, dtype=torch.float64)  # more parameters than data: f* = 0 is reachable
    model = torch.nn.Linear(40, 1, bias=False).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tuner = CurvatureTuner(optimizer, Polyak(f_star=0.0, lr_max=100.0))

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    first = None
    for _ in range(300):
        loss = float(tuner.step(closure))
        first = loss if first is None else first
    assert loss < 1e-8 * first


def test_adaeos_keeps_lr_times_sharpness_at_its_target_on_a_quadratic(quadratic, make_closure):
    w, loss, a, _ = quadratic
    optimizer = torch.optim.SGD([w], lr=1e-3)
    tuner = CurvatureTuner(optimizer, AdaEoS(target=2.0, gamma=0.5))
    closure = make_closure(optimizer, loss)
    top = float(torch.linalg.eigvalsh(a)[-1])
    products = []
    for _ in range(60):
        tuner.step(closure)
        products.append(tuner.diagnostics["lr"] * top)
    assert np.median(products[-20:]) == pytest.approx(2.0, rel=0.05)


def test_dcao_clips_hold_and_decisions_reach_adam(quadratic, make_closure):
    w, loss, _, _ = quadratic
    optimizer = torch.optim.Adam([w], lr=0.5, betas=(0.9, 0.999), weight_decay=0.01)
    law = DCAO(target=1.0, momentum_bounds=(0.8, 0.95), weight_decay_bounds=(0.0, 0.05), num_eigenvalues=1,
               lanczos_steps=12, momentum_sensitivity=1.0, weight_decay_sensitivity=1.0)
    tuner = CurvatureTuner(optimizer, law)
    closure = make_closure(optimizer, loss)
    previous = 0.5
    for _ in range(6):
        tuner.step(closure)
        lr = tuner.diagnostics["lr"]
        assert 0.8 * previous * (1 - 1e-12) <= lr <= 1.1 * previous * (1 + 1e-12)
        previous = lr
        beta1, beta2 = optimizer.param_groups[0]["betas"]
        assert 0.8 <= beta1 <= 0.95 and beta2 == 0.999
        assert 0.0 <= optimizer.param_groups[0]["weight_decay"] <= 0.05
        assert beta1 == pytest.approx(tuner.diagnostics["momentum"])
    assert math.isfinite(tuner.diagnostics["lambda_1"])


def test_dcao_refuses_an_optimizer_without_momentum():
    with pytest.raises(ValueError, match="momentum"):
        CurvatureTuner(torch.optim.Adagrad([torch.nn.Parameter(torch.ones(2))], lr=0.1), DCAO())
