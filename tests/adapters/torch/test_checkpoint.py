"""Save and resume: the tuner's state rides in the optimizer's state_dict and resuming is bit-identical."""

import io

import pytest
import torch

from eos_core import CDAT, DCAO, AdaEoS, HyperGradient
from eos_core.adapters.torch import CurvatureTuner

CONFIGS = {
    "cdat-ema-probe3-sgd": (lambda: CDAT(scale=2.0, ema=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                            {"probe_every": 3, "sharpness_every": 2}),
    "cdat-adam-fd": (lambda: CDAT(scale=1.0, ema=0.5), lambda p: torch.optim.Adam(p, lr=1e-3),
                     {"route": "fd-onesided", "sharpness_every": 3}),
    "adaeos": (lambda: AdaEoS(gamma=0.5), lambda p: torch.optim.SGD(p, lr=0.05), {}),
    "hypergradient": (lambda: HyperGradient(beta=0.1), lambda p: torch.optim.SGD(p, lr=0.05), {}),
    "dcao": (lambda: DCAO(num_eigenvalues=2, lanczos_steps=6), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9,
                                                                                         weight_decay=1e-3),
             {"probe_every": 2}),
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

    model, optimizer, tuner = build(config)
    train(model, optimizer, tuner, data[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()},
               buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)

    model, optimizer, tuner = build(config)  # a fresh process would start like this
    model.load_state_dict(checkpoint["model"])
    tuner.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
    resumed = train(model, optimizer, tuner, data[5:])
    assert resumed == full[5:]  # bit-identical learning rates
    for a, b in zip(model.parameters(), final, strict=True):
        assert torch.equal(a.detach(), b)


def test_loading_a_checkpoint_of_another_law_fails_clearly():
    model, optimizer, tuner = build("adaeos")
    train(model, optimizer, tuner, batches(1))
    state = optimizer.state_dict()
    other_model, other_optimizer, _ = build("hypergradient")
    with pytest.raises(ValueError, match="saved with law AdaEoS"):
        other_optimizer.load_state_dict(state)
