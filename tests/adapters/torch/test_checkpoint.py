"""Save and resume: the tuner's state rides in the optimizer's state_dict and resuming is bit-identical."""

import io

import pytest
import torch

from eos_core import CDAT, DCAO, AdaEoS, Armijo, ExactSharpness, HyperGradient, Polyak
from eos_core.adapters.torch import CurvatureTuner


def two_groups(make):
    """A decay group and a no-decay group (biases), as most training scripts build them."""
    def build(params):
        params = list(params)
        return make([{"params": [p for p in params if p.dim() > 1]},
                     {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0, "lr": 0.5 * 1e-3}])
    return build


CONFIGS = {
    "cdat-ema-probe3-sgd": (lambda: CDAT(scale=2.0, ema=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                            {"probe_every": 3, "sharpness_every": 2}),
    "cdat-adam-fd": (lambda: CDAT(scale=1.0, ema=0.5), lambda p: torch.optim.Adam(p, lr=1e-3),
                     {"route": "fd-onesided", "sharpness_every": 3}),
    "adaeos": (lambda: AdaEoS(gamma=0.5), lambda p: torch.optim.SGD(p, lr=0.05), {}),
    "adaeos-preconditioned-rmsprop": (lambda: AdaEoS(gamma=0.3, preconditioned=True),
                                      lambda p: torch.optim.RMSprop(p, lr=1e-3), {"probe_every": 2}),
    "exact-sharpness-warm-start": (lambda: ExactSharpness(power_iters=3), lambda p: torch.optim.SGD(p, lr=0.05),
                                   {"sharpness_every": 4}),
    "hypergradient": (lambda: HyperGradient(beta=0.1), lambda p: torch.optim.SGD(p, lr=0.05), {"probe_every": 2}),
    "dcao": (lambda: DCAO(num_eigenvalues=2, lanczos_steps=6), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9,
                                                                                         weight_decay=1e-3),
             {"probe_every": 2}),
    "dcao-adamw-two-groups": (lambda: DCAO(num_eigenvalues=2, lanczos_steps=6),
                              two_groups(lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.05)), {}),
    "armijo": (lambda: Armijo(), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5), {}),
    "polyak-adam": (lambda: Polyak(lr_max=0.5), lambda p: torch.optim.Adam(p, lr=1e-3), {"sharpness_every": 5}),
}


def build(config):
    law, make_optimizer, kwargs = CONFIGS[config]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(16, 3))
    optimizer = make_optimizer(model.parameters())
    tuner = CurvatureTuner(optimizer, law(), **kwargs)
    return model, optimizer, tuner


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(n)]


def train(model, optimizer, tuner, data):
    lrs = []
    for x, y in data:
        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        tuner.step(closure)
        lrs.append(tuner.diagnostics["lr"])
    return lrs


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_resume_is_bit_identical(config):
    data = batches(12)
    model, optimizer, tuner = build(config)
    full = train(model, optimizer, tuner, data)
    final = [p.detach().clone() for p in model.parameters()]
    groups = [dict(g, params=None) for g in optimizer.param_groups]

    model, optimizer, tuner = build(config)
    train(model, optimizer, tuner, data[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()},
               buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # torch's default: the tuner state is plain data

    model, optimizer, tuner = build(config)  # a fresh process would start like this
    model.load_state_dict(checkpoint["model"])
    tuner.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
    resumed = train(model, optimizer, tuner, data[5:])
    assert resumed == full[5:]  # bit-identical learning rates
    for a, b in zip(model.parameters(), final, strict=True):
        assert torch.equal(a.detach(), b)
    assert [dict(g, params=None) for g in optimizer.param_groups] == groups  # DCAO's momentum / weight decay


def test_loading_a_checkpoint_of_another_law_fails_clearly():
    model, optimizer, tuner = build("adaeos")
    train(model, optimizer, tuner, batches(1))
    state = optimizer.state_dict()
    other_model, other_optimizer, _ = build("hypergradient")
    with pytest.raises(ValueError, match="saved with law AdaEoS"):
        other_optimizer.load_state_dict(state)
