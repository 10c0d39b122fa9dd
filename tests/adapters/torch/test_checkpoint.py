"""Save and resume: the tuner's state rides in the optimizer's state_dict and resuming is bit-identical."""

import io
import json
import math

import numpy as np
import pytest
import torch

from eos_core import CDAT, DCAO, AdaEoS, Armijo, ExactSharpness, HyperGradient, Polyak, WarmupCosine
from eos_core.adapters.torch import STATE_KEY, STATE_VERSION, CurvatureTuner
from eos_core.adapters.torch.checkpoint import VECTORS


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
    assert saved[STATE_KEY]["version"] == STATE_VERSION == 5
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
    assert all(torch.equal(a, b) for a, b in zip(fresh.spectral.eigenvector, state["eigenvector"], strict=True))


@pytest.mark.parametrize("change,match", [
    ({"version": 6}, "version 6, newer than this eos_core reads"),
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


# -- version 3: the copy that torch.distributed.checkpoint keeps ------------------------------------------------
def serialised(value):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_the_state_is_also_in_the_first_param_group_and_the_per_parameter_state():
    model, optimizer, tuner = build("exact-sharpness-warm-start")
    state = optimizer.state_dict()
    header = json.loads(state["param_groups"][0][STATE_KEY])  # plain JSON: torch.distributed.checkpoint loads it whole
    assert header["vectors"] == [] and header["step"] == 0
    # a fresh tuner writes zeros where its eigenvector will be, so a checkpoint can be loaded into its state dict
    assert all(torch.count_nonzero(entry["eos_core_eigenvector"]) == 0 for entry in state["state"].values())
    assert not any("eos_core_previous_update" in entry for entry in state["state"].values())
    train(model, optimizer, tuner, batches(3))
    state = optimizer.state_dict()
    header = json.loads(state["param_groups"][0][STATE_KEY])
    top = state[STATE_KEY]
    assert header["vectors"] == ["eigenvector"]
    assert {k: v for k, v in top.items() if k not in VECTORS} == {**{k: v for k, v in header.items() if k != "vectors"},
                                                                 "diagnostics": top["diagnostics"]}
    keys = [k for g in state["param_groups"] for k in g["params"]]
    for key, vector in zip(keys, tuner.spectral.eigenvector, strict=True):
        assert state["state"][key]["eos_core_eigenvector"] is top["eigenvector"][keys.index(key)]
        assert torch.equal(state["state"][key]["eos_core_eigenvector"], vector)
    assert not any(str(n).startswith("eos_core") for entry in optimizer.state.values() for n in entry)  # untouched


@pytest.mark.parametrize("config", ["exact-sharpness-warm-start", "hypergradient", "dcao-adamw-two-groups"])
def test_resume_from_the_param_group_copy_alone_is_bit_identical(config):
    """What torch.distributed.checkpoint hands back: no top-level key, the header in the first group, the vectors
    in the per-parameter state."""
    data = batches(12)
    model, optimizer, tuner = build(config)
    full, _ = train(model, optimizer, tuner, data)
    model, optimizer, tuner = build(config)
    train(model, optimizer, tuner, data[:5])
    saved = checkpoint(model, optimizer)
    del saved["optimizer"][STATE_KEY]
    model, optimizer, tuner = build(config)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    assert tuner.calls == 5 and STATE_KEY not in optimizer.param_groups[0]
    assert not any(str(n).startswith("eos_core") for entry in optimizer.state.values() for n in entry)
    resumed, _ = train(model, optimizer, tuner, data[5:], first=5)
    assert resumed == full[5:]


def test_a_tuner_attached_after_the_optimizer_was_loaded_picks_up_its_state():
    """The Hugging Face Trainer loads optimizer.pt before a callback can attach a tuner: torch's load_state_dict
    drops the top-level key but keeps the first group's and the per-parameter entries, which the tuner adopts."""
    data = batches(8)
    model, optimizer, tuner = build("exact-sharpness-warm-start")
    full, _ = train(model, optimizer, tuner, data)
    model, optimizer, tuner = build("exact-sharpness-warm-start")
    train(model, optimizer, tuner, data[:3])
    saved = checkpoint(model, optimizer)
    model, optimizer, tuner = build("exact-sharpness-warm-start")
    tuner.detach()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])  # no tuner attached: the entries stay in the optimizer
    assert STATE_KEY in optimizer.param_groups[0]
    tuner = CurvatureTuner(optimizer, CONFIGS["exact-sharpness-warm-start"][0](), warn=False,
                           **CONFIGS["exact-sharpness-warm-start"][2])
    assert tuner.calls == 3 and STATE_KEY not in optimizer.param_groups[0]
    assert not any(str(n).startswith("eos_core") for entry in optimizer.state.values() for n in entry)
    torch.set_rng_state(saved["rng"])
    resumed, _ = train(model, optimizer, tuner, data[3:], first=3)
    assert resumed == full[3:]


@pytest.mark.skipif(tuple(int(n) for n in torch.__version__.split(".")[:2]) < (2, 7),
                    reason="the layout is checked against torch.distributed.checkpoint.state_dict of torch >= 2.7")
@pytest.mark.parametrize("full_state_dict", [False, True])
def test_torch_distributed_checkpoint_state_dicts_resume_bit_identically(full_state_dict):
    """get_optimizer_state_dict / set_optimizer_state_dict (here without a process group) carry the tuner's state.
    Both call torch.distributed.checkpoint's _init_optim_state first, which steps an optimizer without state with
    zero gradients at lr 0: the tuner must let that step through untouched (AdamW's weight decay would move the
    parameters at the tuner's lr, and the step would count)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=full_state_dict)
    config = "dcao-adamw-two-groups"
    data = batches(10)
    model, optimizer, tuner = build(config)
    before = [p.detach().clone() for p in model.parameters()]
    get_optimizer_state_dict(model, optimizer, options=options)  # a fresh optimizer: DCP's initialising step
    assert tuner.calls == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    full, _ = train(model, optimizer, tuner, data)

    model, optimizer, tuner = build(config)
    get_optimizer_state_dict(model, optimizer, options=options)  # as in the uninterrupted run (AdamW's step count)
    train(model, optimizer, tuner, data[:4])
    saved = serialised({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer,
                                                                                       options=options),
                        "rng": torch.get_rng_state()})
    assert STATE_KEY not in saved["optim"] and STATE_KEY in saved["optim"]["param_groups"][0]
    model, optimizer, tuner = build(config)
    model.load_state_dict(saved["model"])
    set_optimizer_state_dict(model, optimizer, saved["optim"], options=options)
    assert tuner.calls == 4
    torch.set_rng_state(saved["rng"])
    resumed, _ = train(model, optimizer, tuner, data[4:], first=4)
    assert resumed == full[4:]


def test_a_vector_the_resumed_configuration_does_not_keep_is_dropped():
    """Tracking on when saved, off when resumed (with a law that needs no eigenvector): the template of a
    torch.distributed.checkpoint load then has no slot for the eigenvector, which the header still lists."""
    model, optimizer, tuner = build("cdat-adam-fd")
    train(model, optimizer, tuner, batches(3))
    saved = serialised(optimizer.state_dict())
    assert json.loads(saved["param_groups"][0][STATE_KEY])["vectors"] == ["eigenvector", "preconditioned_eigenvector"]
    del saved[STATE_KEY]
    for entry in saved["state"].values():  # what a load into a template without the slots returns
        del entry["eos_core_eigenvector"], entry["eos_core_preconditioned_eigenvector"]
    torch.manual_seed(0)
    fresh_model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                                      torch.nn.Linear(16, 3))
    fresh_optimizer = torch.optim.Adam(fresh_model.parameters(), lr=1e-3)
    fresh = CurvatureTuner(fresh_optimizer, CDAT(scale=1.0, ema=0.5), route="fd-onesided", warn=False)
    fresh_optimizer.load_state_dict(saved)
    assert fresh.calls == 3 and fresh.spectral.eigenvector is None
