"""Every law through the PyTorch adapter equals the core law fed independently computed statistics.

The reference re-implements the training loop on a flat float64 parameter vector: the base
optimizer's update direction (SGD with momentum and weight decay, Adam, AdamW, RMSprop) and its
diagonal preconditioner are recomputed from their formulas, the statistics come from the explicit
Hessian (torch.autograd.functional.hessian) and exact eigenvalues (torch.linalg.eigvalsh, of
P^{-1/2} H P^{-1/2} for the preconditioned laws), and the core law itself decides. The tuner must
produce the same learning rates, the same momentum and weight decay in the optimizer's param groups
(DCAO), and the same final parameters; and the tuned run must train.
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


def make_optimizer(kind, params, settings):
    return {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
            "rmsprop": torch.optim.RMSprop}[kind](params, **settings)


def initial_hyperparams(kind, settings):
    momentum = settings.get("betas", (0.9, 0.999))[0] if kind in ("adam", "adamw") else settings.get("momentum", 0.0)
    default_wd = 1e-2 if kind == "adamw" else 0.0
    return {"momentum": float(momentum), "weight_decay": float(settings.get("weight_decay", default_wd))}


class Direction:
    """The base optimizer's update u for lr = 1 and its diagonal preconditioner P, from their formulas."""

    def __init__(self, kind, settings):
        self.kind, self.settings, self.state = kind, settings, {}

    def __call__(self, w, g, momentum, weight_decay):
        s, kind = self.state, self.kind
        if kind == "sgd":  # d = g + wd w; buf <- mu buf + d (first: d); u = -buf
            d = g + weight_decay * w
            if momentum == 0:
                return -d, None
            s["buf"] = d.clone() if "buf" not in s else momentum * s["buf"] + d
            return -s["buf"], None
        if kind in ("adam", "adamw"):  # Kingma & Ba with bias corrections; AdamW decays w decoupled
            beta1, beta2 = momentum, self.settings.get("betas", (0.9, 0.999))[1]
            eps = self.settings.get("eps", 1e-8)
            grad = g + weight_decay * w if kind == "adam" else g
            t = s["t"] = s.get("t", 0) + 1
            s["m"] = beta1 * s.get("m", torch.zeros_like(w)) + (1 - beta1) * grad
            s["v"] = beta2 * s.get("v", torch.zeros_like(w)) + (1 - beta2) * grad * grad
            bc1, bc2 = 1 - beta1**t, 1 - beta2**t
            precond = bc1 * ((s["v"] / bc2).sqrt() + eps)  # u = -P^{-1} m
            u = -s["m"] / precond
            return (u - weight_decay * w if kind == "adamw" else u), precond
        # RMSprop: v <- alpha v + (1 - alpha) g^2, P = sqrt(v) + eps, buf <- mu buf + g / P
        alpha, eps = self.settings.get("alpha", 0.99), self.settings.get("eps", 1e-8)
        grad = g + weight_decay * w
        s["v"] = alpha * s.get("v", torch.zeros_like(w)) + (1 - alpha) * grad * grad
        precond = s["v"].sqrt() + eps
        if momentum > 0:
            s["buf"] = momentum * s.get("buf", torch.zeros_like(w)) + grad / precond
            return -s["buf"], precond
        return -grad / precond, precond


def dominant(eigenvalues):
    """The eigenvalue of largest magnitude, with its sign: what power iteration measures (it converges to it).
    Early in an Adam/RMSprop run the preconditioned spectrum is dominated by a negative eigenvalue;
    the laws then keep their lr (fallback)."""
    return float(eigenvalues[torch.argmax(eigenvalues.abs())])


def reference(law, kind, settings, probe_every=1):
    """Plain loop on a flat float64 vector with exact statistics; returns per-step (lr, hyper, loss), final w."""
    model, x, y = problem()
    f = flat_loss(model, x, y)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    hyper = initial_hyperparams(kind, settings)
    state = law.init(settings["lr"], hyperparams=hyper)
    direction = Direction(kind, settings)
    previous_u, out = None, []
    for step in range(STEPS):
        wv = w.clone().requires_grad_(True)
        loss = f(wv)
        g = torch.autograd.grad(loss, wv)[0].detach()
        u, precond = direction(w, g, hyper["momentum"], hyper["weight_decay"])
        if not law.needs:
            result = law.update(state, {})
        elif step % probe_every == 0:
            h = torch.autograd.functional.hessian(f, w)
            eig = torch.linalg.eigvalsh(h)
            k = getattr(law, "num_eigenvalues", 1)
            values = {
                stats.GRAD_DOT_UPDATE: float(g @ u),
                stats.CURVATURE: float(u @ h @ u),
                stats.LOSS: float(loss.detach()),
                stats.GRAD_NORM_SQ: float(g @ g),
                stats.SHARPNESS: dominant(eig),
                stats.TOP_EIGENVALUES: eig.flip(0)[:k].numpy(),
                stats.TRIAL_LOSS: lambda eta, w=w, u=u: float(f(w + float(eta) * u)),
                stats.GRAD_PREV_UPDATE_COSINE: 0.0 if previous_u is None
                else float(g @ previous_u / (g.norm() * previous_u.norm())),
            }
            if precond is not None:
                scaling = precond.rsqrt()
                eig_p = torch.linalg.eigvalsh(scaling[:, None] * h * scaling[None, :])
                values[stats.PRECONDITIONED_SHARPNESS] = dominant(eig_p)
                values[stats.PRECONDITIONED_TOP_EIGENVALUES] = eig_p.flip(0)[:k].numpy()
            result = law.update(state, {key: values[key] for key in law.needs})
        else:
            result = law.hold(state)
        state = result.state
        hyper.update({key: float(v) for key, v in result.hyperparams.items()})
        out.append((float(result.lr), dict(hyper), float(loss.detach())))
        w = w + float(result.lr) * u
        previous_u = u
    return out, w


def tuned(law, kind, settings, probe_every=1):
    model, x, y = problem()
    optimizer = make_optimizer(kind, model.parameters(), settings)
    tuner = CurvatureTuner(optimizer, law, probe_every=probe_every, fd_above=None)  # exact statistics

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    out = []
    for _ in range(STEPS):
        loss = float(tuner.step(closure))
        group = optimizer.param_groups[0]
        momentum = group["betas"][0] if "betas" in group else group.get("momentum", 0.0)
        out.append((tuner.diagnostics["lr"], {"momentum": momentum, "weight_decay": group["weight_decay"]}, loss))
    final_loss = float(torch.nn.functional.cross_entropy(model(x), y))
    return out, torch.cat([p.detach().reshape(-1) for p in model.parameters()]), final_loss


DCAO_SETTINGS = dict(target=1.5, num_eigenvalues=2, lanczos_steps=37, momentum_sensitivity=0.3,
                     weight_decay_sensitivity=0.5, momentum_bounds=(0.5, 0.95), lr_factor_bounds=(0.5, 2.0))

#: name -> (law factory, base optimizer, its settings, probe_every)
LAWS = {
    "cdat": (lambda: CDAT(scale=2.0, ema=0.5), "sgd", {"lr": 0.1}, 1),
    "cdat-greedy-momentum": (lambda: CDAT(scale=1.0), "sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}, 1),
    "cdat-ema-probe3": (lambda: CDAT(scale=2.0, ema=0.9), "sgd", {"lr": 0.1, "momentum": 0.5}, 3),
    "cdat-adam": (lambda: CDAT(scale=2.0, ema=0.9), "adam", {"lr": 0.01}, 1),
    "exact-sharpness": (lambda: ExactSharpness(scale=2.0, power_iters=2000, power_tol=1e-13), "sgd", {"lr": 0.1}, 1),
    "exact-sharpness-preconditioned-adam": (
        lambda: ExactSharpness(scale=2.0, preconditioned=True, power_iters=3000, power_tol=1e-14),
        "adam", {"lr": 0.01}, 1),
    "adaeos": (lambda: AdaEoS(gamma=0.5, power_iters=500), "sgd", {"lr": 0.05}, 1),
    "adaeos-preconditioned-rmsprop": (lambda: AdaEoS(gamma=0.5, preconditioned=True, power_iters=1000),
                                      "rmsprop", {"lr": 0.01}, 2),
    "dcao": (lambda: DCAO(**DCAO_SETTINGS), "sgd", {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-2}, 1),
    "dcao-adamw": (lambda: DCAO(**DCAO_SETTINGS), "adamw", {"lr": 0.05, "weight_decay": 0.05}, 1),
    "dcao-preconditioned-adam": (lambda: DCAO(preconditioned=True, **DCAO_SETTINGS), "adam",
                                 {"lr": 0.05, "betas": (0.9, 0.99), "weight_decay": 1e-2}, 2),
    "dcao-preconditioned-rmsprop-momentum": (lambda: DCAO(preconditioned=True, **DCAO_SETTINGS), "rmsprop",
                                             {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-3}, 1),
    "armijo": (lambda: Armijo(c=1e-4, c_plus=4.0, c_minus=0.8), "sgd", {"lr": 0.1}, 1),
    "armijo-adam": (lambda: Armijo(c=0.1, c_plus=2.0, c_minus=0.5, lr_max=10.0), "adam", {"lr": 0.01}, 1),
    "polyak": (lambda: Polyak(f_star=0.0, lr_max=5.0), "sgd", {"lr": 0.1}, 1),
    "hypergradient": (lambda: HyperGradient(beta=0.2), "sgd", {"lr": 0.5}, 1),
    "hypergradient-probe2": (lambda: HyperGradient(beta=0.2), "sgd", {"lr": 0.5, "momentum": 0.5}, 2),
    "constant": (lambda: Constant(0.3), "sgd", {"lr": 0.1}, 1),
    "warmup-cosine": (lambda: WarmupCosine(peak_lr=1.0, total_steps=STEPS, warmup_steps=3), "sgd", {"lr": 0.1}, 1),
}
SPECTRAL = ("exact-sharpness", "adaeos", "dcao")


@pytest.mark.parametrize("name", sorted(LAWS))
def test_lr_sequence_equals_the_core_law_on_exact_statistics(name):
    factory, kind, settings, probe_every = LAWS[name]
    expected, w_expected = reference(factory(), kind, settings, probe_every)
    got, w_got, final_loss = tuned(factory(), kind, settings, probe_every)
    rel = 1e-6 if name.startswith(SPECTRAL) else 1e-9
    for step, ((lr_ref, hyper_ref, loss_ref), (lr, hyper, loss)) in enumerate(zip(expected, got, strict=True)):
        assert lr == pytest.approx(lr_ref, rel=rel, abs=1e-12), f"step {step}"
        assert loss == pytest.approx(loss_ref, rel=rel), f"step {step}: the tuner did not apply the law's lr"
        for key, value in hyper_ref.items():  # DCAO's decisions reach the optimizer's param groups
            assert hyper[key] == pytest.approx(value, rel=rel, abs=1e-15), f"step {step} {key}"
    torch.testing.assert_close(w_got, w_expected, rtol=rel, atol=1e-12)
    if name.startswith("dcao"):  # the decisions moved away from the optimizer's settings, within bounds
        low, high = DCAO_SETTINGS["momentum_bounds"]
        initial = initial_hyperparams(kind, settings)
        assert all(low <= hyper["momentum"] <= high for _, hyper, _ in got)
        for key in ("momentum", "weight_decay"):
            assert got[-1][1][key] != pytest.approx(initial[key], rel=1e-3), key
    assert final_loss < got[0][2], f"{name} does not train"


def test_only_the_statistics_a_law_declares_are_computed():
    """Laws that need no curvature cost no extra forward pass: the closure runs once per step (the step's
    own), and one-sided finite differences add exactly one gradient evaluation per probe (plus one
    forward pass, once, that tells the oracle whether autocast computes in reduced precision)."""
    cases = [(Constant(0.1), {}, 1, 0), (WarmupCosine(0.1, 10), {}, 1, 0), (Polyak(), {}, 1, 0),
             (HyperGradient(), {}, 1, 0), (CDAT(), {"route": "fd-onesided"}, 2, 1),
             (CDAT(), {"probe_every": 4}, 1.25, 0)]
    for law, kwargs, per_step, once in cases:
        model, x, y = problem()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        tuner = CurvatureTuner(optimizer, law, fd_above=None, **kwargs)  # no finite-difference checks
        calls = [0]

        def closure(model=model, optimizer=optimizer, calls=calls, x=x, y=y):
            calls[0] += 1
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for _ in range(8):
            tuner.step(closure)
        assert calls[0] == 8 * per_step + once, (law, kwargs, calls[0])


def test_dcao_keeps_per_group_weight_decay_and_momentum_proportions():
    """A no-decay group (biases) stays at weight decay 0, even when listed first; other groups keep their
    ratio to the group the law tracks."""
    model, x, y = problem()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    optimizer = torch.optim.SGD([{"params": biases, "weight_decay": 0.0, "momentum": 0.9},
                                 {"params": weights, "weight_decay": 1e-2, "momentum": 0.45}], lr=0.5)
    tuner = CurvatureTuner(optimizer, DCAO(**DCAO_SETTINGS))

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    decided = []
    for _ in range(4):
        tuner.step(closure)
        biases_group, weights_group = optimizer.param_groups
        # weight decay is tracked on the weights (the first group with a non-zero value), momentum on group 0
        assert biases_group["weight_decay"] == 0.0
        assert weights_group["weight_decay"] == pytest.approx(tuner.diagnostics["weight_decay"], rel=1e-12)
        assert biases_group["momentum"] == pytest.approx(tuner.diagnostics["momentum"], rel=1e-12)
        assert weights_group["momentum"] == pytest.approx(0.5 * tuner.diagnostics["momentum"], rel=1e-12)
        decided.append(tuner.diagnostics["weight_decay"])
    assert decided[-1] != 1e-2  # the law did change it


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_armijo_accepted_steps_satisfy_the_condition(kind):
    """f(w_new) <= f(w) + c g.(w_new - w) with g and f computed here, independently of the tuner (with
    w_new = w + lr u this is the Armijo condition f(w + lr u) <= f(w) + c lr g.u)."""
    model, x, y = problem()
    optimizer = make_optimizer(kind, model.parameters(), {"lr": 1.0 if kind == "sgd" else 0.1})
    c = 0.3
    tuner = CurvatureTuner(optimizer, Armijo(c=c, c_minus=0.5, lr_max=10.0))

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    trials = []
    for _ in range(10):
        params = list(model.parameters())
        before = [p.detach().clone() for p in params]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        g = torch.autograd.grad(loss, params)
        tuner.step(closure)
        with torch.no_grad():
            after = float(torch.nn.functional.cross_entropy(model(x), y))
            g_dot_step = float(sum((gi * (p - b)).sum() for gi, p, b in zip(g, params, before, strict=True)))
        assert tuner.diagnostics["accepted"] == 1.0
        assert g_dot_step < 0
        assert after <= float(loss) + c * g_dot_step + 1e-12
        trials.append(tuner.diagnostics["trials"])
    assert max(trials) > 1  # some searches did backtrack


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
    previous, clipped = 0.5, set()
    for _ in range(6):
        tuner.step(closure)
        lr = tuner.diagnostics["lr"]
        assert 0.8 * previous * (1 - 1e-12) <= lr <= 1.1 * previous * (1 + 1e-12)
        if lr / previous in (pytest.approx(0.8, rel=1e-12), pytest.approx(1.1, rel=1e-12)):
            clipped.add("lr")
        previous = lr
        beta1, beta2 = optimizer.param_groups[0]["betas"]
        weight_decay = optimizer.param_groups[0]["weight_decay"]
        assert 0.8 <= beta1 <= 0.95 and beta2 == 0.999
        assert 0.0 <= weight_decay <= 0.05
        clipped |= {"momentum"} if beta1 in (0.8, 0.95) else set()
        clipped |= {"weight_decay"} if weight_decay == 0.05 else set()
        assert beta1 == pytest.approx(tuner.diagnostics["momentum"])
    assert math.isfinite(tuner.diagnostics["lambda_1"])
    assert clipped == {"lr", "momentum", "weight_decay"}  # every clip was exercised


def test_dcao_refuses_an_optimizer_without_momentum():
    with pytest.raises(ValueError, match="momentum"):
        CurvatureTuner(torch.optim.Adagrad([torch.nn.Parameter(torch.ones(2))], lr=0.1), DCAO())
