"""CurvatureTuner: the on-edge property through the wrapper, optimizer semantics, probes, settings."""

import math
import warnings

import numpy as np
import pytest
import torch

from eos_core import CDAT, Constant, ExactSharpness
from eos_core.adapters.torch import STATE_KEY, CurvatureTuner


def test_on_edge_property_through_the_wrapper(quadratic, make_closure):
    w, loss, _, _ = quadratic
    optimizer = torch.optim.SGD([w], lr=0.1)
    tuner = CurvatureTuner(optimizer, CDAT(scale=2.0), fd_above=None)  # exact u^T H u
    closure = make_closure(optimizer, loss)
    for _ in range(10):
        before = float(loss())
        tuner.step(closure)
        assert float(loss()) == pytest.approx(before, rel=1e-9)  # eq. 7: f(w + eta u) = f(w)
    assert tuner.diagnostics["route"] == "double-backward"


def test_greedy_scale_is_the_exact_line_minimiser(quadratic, make_closure):
    w, loss, a, b = quadratic
    optimizer = torch.optim.SGD([w], lr=0.1)
    tuner = CurvatureTuner(optimizer, CDAT(scale=1.0), fd_above=None)
    closure = make_closure(optimizer, loss)
    for _ in range(3):
        g = (a @ w - b).detach()
        tuner.step(closure)
        slope = float((a @ w - b) @ -g)  # d/d(eta) f(w + eta u) at the chosen eta, u = -g
        assert abs(slope) <= 1e-9 * float(g @ g)


def test_digits_mlp_rides_the_edge(digits):
    x, y = digits
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tuner = CurvatureTuner(optimizer, CDAT(scale=2.0), sharpness_every=1)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    history = []
    for _ in range(120):
        tuner.step(closure)
        history.append(dict(tuner.diagnostics))
    assert history[-1]["loss"] < 0.25 * history[0]["loss"]
    median = float(np.median([h["lr_sharpness"] for h in history[50:]]))
    assert 1.5 <= median <= 2.5, median
    assert all(0.0 <= h["alignment"] <= 1.0 + 1e-9 for h in history)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.01),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.01),
}


def _model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()
    x = torch.randn(32, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    return model, x, y


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_constant_law_reproduces_the_plain_optimizer_even_when_instrumented(name):
    """u is read off the optimizer's own step: with Constant(lr) the tuned run equals the plain run,
    and probing (sharpness tracking) disturbs neither the parameters nor the optimizer state."""
    runs = []
    for tuned in (False, True):
        model, x, y = _model_and_data()
        optimizer = OPTIMIZERS[name](model.parameters())
        lr = optimizer.param_groups[0]["lr"]
        if tuned:
            CurvatureTuner(optimizer, Constant(lr), sharpness_every=2)

        def closure(model=model, optimizer=optimizer, x=x, y=y):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for _ in range(6):
            optimizer.step(closure)
        runs.append([p.detach().clone() for p in model.parameters()])
    for plain, tuned in zip(*runs, strict=True):
        torch.testing.assert_close(tuned, plain, rtol=1e-12, atol=1e-13)


def test_per_group_lr_ratios_are_kept_and_group_settings_restored(make_closure):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 0.2}, {"params": [b], "lr": 0.05}])
    tuner = CurvatureTuner(optimizer, Constant(1.0))

    def loss():
        return (a**2).sum() + (b**2).sum()

    a0, b0 = a.detach().clone(), b.detach().clone()
    tuner.step(make_closure(optimizer, loss))
    # group 0 gets the law's lr (1.0); group 1 keeps its 1/4 ratio
    torch.testing.assert_close(a.detach(), a0 - 1.0 * 2 * a0)
    torch.testing.assert_close(b.detach(), b0 - 0.25 * 2 * b0)
    assert [g["lr"] for g in optimizer.param_groups] == [0.2, 0.05]


def test_probe_every_reuses_the_lr_between_probes(quadratic, make_closure):
    w, loss, _, _ = quadratic
    optimizer = torch.optim.SGD([w], lr=0.1)
    tuner = CurvatureTuner(optimizer, CDAT(scale=2.0), probe_every=3)
    closure = make_closure(optimizer, loss)
    probed, lrs = [], []
    for _ in range(9):
        tuner.step(closure)
        probed.append(tuner.diagnostics["probed"])
        lrs.append(tuner.diagnostics["lr"])
    assert probed == [1.0, 0.0, 0.0] * 3
    assert lrs[0] == lrs[1] == lrs[2] and lrs[3] == lrs[4] == lrs[5] and lrs[3] != lrs[0]


def test_multiply_mode_applies_the_schedulers_shape(quadratic, make_closure):
    w, loss, _, _ = quadratic
    optimizer = torch.optim.SGD([w], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    tuner = CurvatureTuner(optimizer, Constant(0.01), lr_mode="multiply")
    closure = make_closure(optimizer, loss)
    applied = []
    for _ in range(4):
        tuner.step(closure)
        applied.append(tuner.diagnostics["lr"])
        scheduler.step()
    assert applied == pytest.approx([0.01, 0.005, 0.0025, 0.00125])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5**4)  # the scheduler's own value


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_multiply_mode_follows_a_warm_up_created_before_or_after_the_tuner(quadratic, make_closure, scheduler_first):
    """A warm-up scheduler created first sets the group's lr to 0 at attach time; the tuner reads the base
    lr from the group's "initial_lr", so the schedule's factor (not 0 / 0) multiplies the law's lr."""
    w, loss, _, _ = quadratic
    optimizer = torch.optim.SGD([w], lr=0.5)

    def warm_up():
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 4))

    scheduler = warm_up() if scheduler_first else None
    tuner = CurvatureTuner(optimizer, Constant(0.2), lr_mode="multiply")
    scheduler = scheduler or warm_up()
    closure = make_closure(optimizer, loss)
    applied = []
    for _ in range(6):
        tuner.step(closure)
        applied.append(tuner.diagnostics["lr"])
        scheduler.step()
    assert applied == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2])


def test_set_objective_path_and_missing_objective_error(quadratic):
    w, loss, _, _ = quadratic
    optimizer = torch.optim.SGD([w], lr=0.1)
    tuner = CurvatureTuner(optimizer, CDAT(scale=2.0), fd_above=None)  # exact u^T H u
    optimizer.zero_grad()
    loss().backward()
    tuner.set_objective(loss)
    before = float(loss())
    optimizer.step()
    assert float(loss()) == pytest.approx(before, rel=1e-9)
    optimizer.zero_grad()
    loss().backward()
    snapshot = w.detach().clone()
    with pytest.raises(RuntimeError, match="set_objective"):
        optimizer.step()  # the objective was consumed by the previous step
    # the failed probe still finished the step with the last good lr
    assert not torch.equal(w.detach(), snapshot)


def test_law_none_only_measures(quadratic, make_closure):
    w, loss, a, _ = quadratic
    optimizer = torch.optim.SGD([w], lr=0.01)
    tuner = CurvatureTuner(optimizer, None, sharpness_every=1, sharpness_iters=200, sharpness_tol=1e-10)
    tuner.step(make_closure(optimizer, loss))
    top = float(torch.linalg.eigvalsh(a)[-1])
    assert tuner.diagnostics["sharpness"] == pytest.approx(top, rel=1e-6)
    assert tuner.diagnostics["lr_sharpness"] == pytest.approx(0.01 * top, rel=1e-6)
    assert tuner.diagnostics["lr"] == 0.01


def test_preconditioned_sharpness_for_adam(quadratic, make_closure):
    w, loss, a, _ = quadratic
    optimizer = torch.optim.Adam([w], lr=0.01)
    tuner = CurvatureTuner(optimizer, None, sharpness_every=1, sharpness_iters=500, sharpness_tol=1e-12)
    tuner.step(make_closure(optimizer, loss))
    state = optimizer.state[w]
    p = (state["exp_avg_sq"] / (1 - 0.999)).sqrt() + 1e-8
    p = p * (1 - 0.9)
    explicit = torch.diag(p**-0.5) @ a @ torch.diag(p**-0.5)
    assert tuner.diagnostics["preconditioned_sharpness"] == pytest.approx(
        float(torch.linalg.eigvalsh(explicit)[-1]), rel=1e-6)


def test_exact_sharpness_law_through_the_wrapper(quadratic, make_closure):
    w, loss, a, _ = quadratic
    optimizer = torch.optim.SGD([w], lr=0.01)
    tuner = CurvatureTuner(optimizer, ExactSharpness(scale=2.0, power_iters=500, power_tol=1e-12))
    tuner.step(make_closure(optimizer, loss))
    assert tuner.diagnostics["lr"] == pytest.approx(2.0 / float(torch.linalg.eigvalsh(a)[-1]), rel=1e-6)


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda p: torch.optim.LBFGS(p), "linear in the learning rate"),
        (lambda p: torch.optim.Rprop(p), "linear in the learning rate"),
        (lambda p: torch.optim.ASGD(p), "linear in the learning rate"),
        (lambda p: torch.optim.SGD(p, lr=0.1, maximize=True), "maximize"),
    ],
)
def test_unsupported_optimizers_are_refused(factory, match):
    with pytest.raises(ValueError, match=match):
        CurvatureTuner(factory([torch.nn.Parameter(torch.ones(2))]), CDAT())


def test_custom_linear_optimizer_can_be_declared():
    class MySGD(torch.optim.SGD):
        pass

    class Custom(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])

    CurvatureTuner(MySGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), CDAT())  # a subclass is accepted
    with pytest.raises(ValueError, match="linear_in_lr=True"):
        CurvatureTuner(Custom([torch.nn.Parameter(torch.ones(2))]), CDAT())
    CurvatureTuner(Custom([torch.nn.Parameter(torch.ones(2))]), CDAT(), linear_in_lr=True)


def test_two_tuners_on_one_optimizer_are_refused_until_detached():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    first = CurvatureTuner(optimizer, CDAT())
    with pytest.raises(ValueError, match="already has a CurvatureTuner"):
        CurvatureTuner(optimizer, CDAT())
    first.detach()
    CurvatureTuner(optimizer, CDAT())


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"probe_every": 0}, "probe_every"),
        ({"probe_every": 1.5}, "probe_every"),
        ({"route": "magic"}, "route"),
        ({"sharpness_every": 0}, "sharpness_every"),
        ({"lr_mode": "add"}, "lr_mode"),
        ({"fd_eps": -1.0}, "fd_eps"),
        ({"sharpness_iters": 0}, "sharpness_iters"),
        ({"sharpness_tol": -1.0}, "sharpness_tol"),
        ({"seed": 1.5}, "seed"),
        ({"warn": "sometimes"}, "warn"),
        ({"lanczos_steps": 0}, "lanczos_steps"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_invalid_settings_raise_value_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CurvatureTuner(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), CDAT(), **kwargs)


def test_law_must_be_a_law():
    with pytest.raises(ValueError, match="law"):
        CurvatureTuner(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), "CDAT")


def test_preconditioned_law_needs_an_adaptive_optimizer():
    with pytest.raises(ValueError, match="preconditioner"):
        CurvatureTuner(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1),
                       ExactSharpness(preconditioned=True))


def test_fd_route_with_dropout_matches_the_exact_route():
    """The tuner replays the step's random state in its probes, so finite differences see the same
    dropout mask as the step's gradient."""
    lrs = {}
    for route in ("double-backward", "fd-onesided"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Dropout(0.3),
                                    torch.nn.Linear(32, 2)).double()
        x = torch.randn(64, 8, dtype=torch.float64)
        y = torch.randint(0, 2, (64,))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        tuner = CurvatureTuner(optimizer, CDAT(scale=2.0), route=route)

        def closure(model=model, optimizer=optimizer, x=x, y=y):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        lrs[route] = []
        for _ in range(5):
            tuner.step(closure)
            lrs[route].append(tuner.diagnostics["lr"])
    np.testing.assert_allclose(lrs["fd-onesided"], lrs["double-backward"], rtol=1e-5)


def test_probes_do_not_change_the_random_stream():
    streams = []
    for law in (None, CDAT(scale=2.0)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        if law is not None:
            CurvatureTuner(optimizer, law, sharpness_every=1)
        x = torch.randn(16, 4)

        def closure(model=model, optimizer=optimizer, x=x):
            optimizer.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            return loss

        optimizer.step(closure)
        streams.append(torch.rand(3))
    torch.testing.assert_close(streams[0], streams[1])


def test_batchnorm_statistics_see_one_update_per_step_when_the_model_is_known():
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    reference = copy.deepcopy(model)
    x = torch.randn(10, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    CurvatureTuner(optimizer, CDAT(), model=model, sharpness_every=1)

    def closure():
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        reference(x)  # exactly one training-mode forward, the step's own
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    assert int(model[1].num_batches_tracked) == 1


def test_state_dict_carries_the_tuner_state(quadratic, make_closure):
    w, loss, _, _ = quadratic
    optimizer = torch.optim.SGD([w], lr=0.1)
    tuner = CurvatureTuner(optimizer, CDAT(ema=0.9))
    tuner.step(make_closure(optimizer, loss))
    state = tuner.state_dict()
    assert state[STATE_KEY]["law"] == "CDAT" and state[STATE_KEY]["step"] == 1 and state[STATE_KEY]["version"] == 5
    assert state[STATE_KEY]["calls"] == 1 and state[STATE_KEY]["skipped_steps"] == 0
    assert math.isclose(state[STATE_KEY]["law_state"]["lr"], tuner.diagnostics["law_lr"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.optim.SGD([w], lr=0.1).load_state_dict(state)  # a plain optimizer ignores the extra key
