"""Save and resume: the tuner's state rides in the optimizer's state_dict and resuming is bit-identical."""

import io
import math

import numpy as np
import pytest
import torch

from eos_core import CDAT, DCAO, AdaEoS, Armijo, ExactSharpness, HyperGradient, Polyak, WarmupCosine
from eos_core.adapters.torch import STATE_KEY, STATE_VERSION, CurvatureTuner


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
    "warmup-cosine-probe2": (lambda: WarmupCosine(peak_lr=0.1, total_steps=12), lambda p: torch.optim.SGD(p, lr=0.1),
                             {"probe_every": 2, "sharpness_every": 3}),
}
#: batches whose step is skipped (NaN loss) and batches whose probes see NaN (the law falls back), of 12
SKIPPED, POISONED_PROBES = (2, 7), (3, 9)


def build(config):
    law, make_optimizer, kwargs = CONFIGS[config]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(16, 3))
    optimizer = make_optimizer(model.parameters())
    tuner = CurvatureTuner(optimizer, law(), warn=False, **kwargs)
    return model, optimizer, tuner


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(n)]


def train(model, optimizer, tuner, data, first=0):
    """Train on ``data`` (batches ``first``, ``first + 1``, ...): the applied lrs and the diagnostics."""
    lrs, history = [], []
    for index, (x, y) in enumerate(data, start=first):
        calls = [0]

        def closure(x=x, y=y, index=index, calls=calls):
            calls[0] += 1
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if index in SKIPPED or (index in POISONED_PROBES and calls[0] > 1):
                loss = loss * float("nan")
            loss.backward()
            return loss

        tuner.step(closure)
        lrs.append(tuner.diagnostics["lr"])
        history.append(dict(tuner.diagnostics))
    return lrs, history


def comparable(history):
    """Diagnostics with NaN made comparable (NaN != NaN)."""
    return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in history]


def checkpoint(model, optimizer):
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()},
               buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # torch's default: the tuner state is plain data


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_resume_is_bit_identical(config):
    """Learning rates, parameters, param groups, diagnostics and counters (steps, calls, skipped and fallback
    steps) of a resumed run equal the uninterrupted run's, with skipped steps and law fallbacks on both sides
    of the checkpoint."""
    data = batches(12)
    model, optimizer, tuner = build(config)
    full, full_history = train(model, optimizer, tuner, data)
    final = [p.detach().clone() for p in model.parameters()]
    groups = [dict(g, params=None) for g in optimizer.param_groups]
    final_state = tuner.state_dict()[STATE_KEY]

    model, optimizer, tuner = build(config)
    train(model, optimizer, tuner, data[:5])
    saved = checkpoint(model, optimizer)
    assert saved["optimizer"][STATE_KEY]["skipped_steps"] == 1 and saved["optimizer"][STATE_KEY]["calls"] == 5

    model, optimizer, tuner = build(config)  # a fresh process would start like this
    model.load_state_dict(saved["model"])
    tuner.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    assert comparable([tuner.diagnostics]) == comparable([full_history[4]])  # the last values travel too
    resumed, resumed_history = train(model, optimizer, tuner, data[5:], first=5)
    assert resumed == full[5:]  # bit-identical learning rates
    assert comparable(resumed_history) == comparable(full_history[5:])
    for a, b in zip(model.parameters(), final, strict=True):
        assert torch.equal(a.detach(), b)
    assert [dict(g, params=None) for g in optimizer.param_groups] == groups  # DCAO's momentum / weight decay
    state = tuner.state_dict()[STATE_KEY]
    for key in ("step", "calls", "skipped_steps", "fallback_steps", "law_state"):
        assert state[key] == final_state[key], key
    assert state["calls"] == 12 and state["step"] == 10 and state["skipped_steps"] == 2


@pytest.mark.parametrize("config", ["adaeos", "warmup-cosine-probe2"])
def test_integer_counters_of_the_law_state_stay_integers(config):
    """AdaEoSState.count and ScheduleState.count are integers: saved as int, restored in the law's dtype."""
    model, optimizer, tuner = build(config)
    train(model, optimizer, tuner, batches(3))
    saved = checkpoint(model, optimizer)["optimizer"]
    assert saved[STATE_KEY]["version"] == STATE_VERSION == 2
    assert type(saved[STATE_KEY]["law_state"]["count"]) is int
    model, optimizer, fresh = build(config)
    dtypes = {name: np.asarray(value).dtype for name, value in fresh.law_state._asdict().items()}
    fresh.load_state_dict(saved)
    assert {name: np.asarray(value).dtype for name, value in fresh.law_state._asdict().items()} == dtypes
    assert np.asarray(fresh.law_state.count).dtype.kind == "i"
    assert int(fresh.law_state.count) == int(tuner.law_state.count)


def version_1(state):
    """The tuner state as the first release wrote it: law state as floats, no counters besides the step
    count (which then included skipped steps), no diagnostics."""
    old = {k: v for k, v in state.items() if k not in ("calls", "skipped_steps", "fallback_steps", "diagnostics")}
    old["version"] = 1
    old["law_state"] = {k: float(v) for k, v in state["law_state"].items()}
    return old


@pytest.mark.parametrize("config", ["adaeos", "warmup-cosine-probe2", "dcao"])
def test_a_version_1_state_still_loads(config):
    data = batches(8)
    model, optimizer, tuner = build(config)
    train(model, optimizer, tuner, data[:2])  # no skipped step yet: version 1 counted every call as a step
    saved = checkpoint(model, optimizer)
    expected, _ = train(model, optimizer, tuner, data[2:], first=2)

    model, optimizer, tuner = build(config)
    model.load_state_dict(saved["model"])
    tuner.load_state_dict(dict(saved["optimizer"], **{STATE_KEY: version_1(saved["optimizer"][STATE_KEY])}))
    torch.set_rng_state(saved["rng"])
    resumed, _ = train(model, optimizer, tuner, data[2:], first=2)
    # batch 2 is skipped: it reports the previous step's values, which a version 1 state did not keep (the
    # resumed tuner reports the law's current lr there instead); from batch 3 on everything is the same
    assert resumed[1:] == expected[1:]
    assert tuner.calls == 8 and tuner.diagnostics["skipped_steps"] == 2


def test_the_keras_torch_backend_state_loads():
    """The Keras torch backend restores the tuner from Keras variables with load_tuner_state and exactly these
    keys (version 1, law state as floats, route possibly None)."""
    model, optimizer, tuner = build("adaeos")
    train(model, optimizer, tuner, batches(2))
    state = tuner.state_dict()[STATE_KEY]
    _, _, fresh = build("adaeos")
    fresh.load_tuner_state({
        "version": 1, "law": "AdaEoS", "law_state": {k: float(v) for k, v in state["law_state"].items()},
        "step": 2, "route": None, "reference_lr": 0.05, "eigenvector": state["eigenvector"],
        "preconditioned_eigenvector": None, "previous_update": None,
    })
    assert fresh.law_state.count.dtype == np.int64 and int(fresh.law_state.count) == 2
    assert fresh.route == "auto" and fresh.state_dict()[STATE_KEY]["step"] == 2
    assert all(torch.equal(a, b) for a, b in zip(fresh._eigenvector, state["eigenvector"], strict=True))


@pytest.mark.parametrize("change,match", [
    ({"version": 3}, "version 3, newer than this eos_core reads"),
    ({"version": "2"}, "invalid version"),
    ({"law_state": None}, "no law state"),
    ({"law_state": {"lr": 0.1}}, "lacks"),
    ({"eigenvector": [torch.zeros(3)]}, "eigenvector shaped"),
])
def test_a_state_this_release_cannot_read_fails_clearly_and_changes_nothing(change, match):
    model, optimizer, tuner = build("adaeos")
    train(model, optimizer, tuner, batches(2))
    state = dict(tuner.state_dict()[STATE_KEY], **change)
    before = tuner.state_dict()[STATE_KEY]
    with pytest.raises(ValueError, match=match):
        tuner.load_tuner_state(state)
    after = tuner.state_dict()[STATE_KEY]
    assert after["law_state"] == before["law_state"] and after["step"] == before["step"]
    for key in ("version", "law", "law_state", "step", "reference_lr"):
        incomplete = {k: v for k, v in before.items() if k != key}
        with pytest.raises(ValueError, match=f"lacks \\['{key}'\\]"):
            tuner.load_tuner_state(incomplete)


def test_loading_a_checkpoint_of_another_law_fails_clearly():
    model, optimizer, tuner = build("adaeos")
    train(model, optimizer, tuner, batches(1))
    state = optimizer.state_dict()
    other_model, other_optimizer, _ = build("hypergradient")
    with pytest.raises(ValueError, match="saved with law AdaEoS"):
        other_optimizer.load_state_dict(state)
