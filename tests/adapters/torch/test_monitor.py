"""The PyTorch tuner's sharpness monitor (monitor_budget): tracking, products, budget, early warning, checkpoints."""

import copy
import io
import math
import re
import warnings

import numpy as np
import pytest
import scipy.linalg as sl
import torch

from eos_core import CDAT
from eos_core import monitor as rules
from eos_core.adapters.torch import STATE_KEY, CurvatureTuner
from eos_core.adapters.torch import monitor as monitor_module


class Clock:
    """A fake ``time`` for the monitor: every forward pass of a model built by :func:`timed` costs one second, so the
    measured step and product times (and the products' schedule) are deterministic."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(monitor_module, "time", fake)
    return fake


class Timed(torch.nn.Module):
    def __init__(self, inner, clock):
        super().__init__()
        self.inner = inner
        self.clock = clock

    def forward(self, x):
        if self.clock is not None:
            self.clock.now += 1.0
        return self.inner(x)


def mlp(activation=torch.nn.Tanh, dtype=torch.float64, seed=0, clock=None, width=16):
    torch.manual_seed(seed)
    inner = torch.nn.Sequential(torch.nn.Linear(6, width), activation(), torch.nn.Linear(width, width), activation(),
                                torch.nn.Linear(width, 1)).to(dtype)
    return Timed(inner, clock)


def data(dtype=torch.float64, n=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g).to(dtype), torch.randn(n, 1, generator=g).to(dtype)


def closure_for(model, optimizer, x, y):
    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def top_eigenvalue(model, x, y):
    params = list(model.parameters())
    loss = torch.nn.functional.mse_loss(model.inner(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    rows = []
    for g in (g.reshape(-1) for g in grads):
        for i in range(g.numel()):
            rows.append(torch.cat([h.reshape(-1) for h in torch.autograd.grad(g[i], params, retain_graph=True)]))
    return float(np.linalg.eigvalsh(torch.stack(rows).detach().numpy())[-1])


# -- the product -------------------------------------------------------------------------------------------------
def test_finite_differences_agree_with_the_exact_product_on_a_smooth_model_and_converge_from_cold():
    x, y = data()
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    tuner = CurvatureTuner(optimizer, None, model=model, monitor_budget=0.05)
    tuner.step(closure_for(model, optimizer, x, y))
    difference, size = tuner.monitor.check  # the first tick compares the two products
    assert difference <= 1e-5 * size  # float64: the one-sided difference's error is ~eps^(1/2)
    found = tuner.diagnostics
    assert found["monitor_exact"] == 0.0 and found["sharpness_age"] == 0.0
    # the cold start converged (the step moved w: compare with lambda_max at the w of the tick)
    model_before = mlp()
    top = top_eigenvalue(model_before, x, y)
    assert found["sharpness"] == pytest.approx(top, rel=2e-2)
    assert found["sharpness_residual"] <= rules.COLD_TOLERANCE


def test_relu_networks_keep_the_exact_product():
    x, y = data(torch.float32, n=512)
    model = mlp(torch.nn.ReLU, torch.float32, width=128)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    tuner = CurvatureTuner(optimizer, None, model=model, monitor_budget=0.05)
    tuner.step(closure_for(model, optimizer, x, y))
    difference, size = tuner.monitor.check
    assert difference > rules.CHECK_TOLERANCE * size  # the finite difference crosses kinks
    assert tuner.diagnostics["monitor_exact"] == 1.0


def test_the_monitor_leaves_the_training_untouched():
    """Finite differences move the parameters and put them back bit for bit; the same run with and without the
    monitor ends with the same parameters and the same law diagnostics."""
    x, y = data(torch.float32)
    runs = []
    for budget in (None, 1.0):
        model = mlp(torch.nn.Tanh, torch.float32)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        tuner = CurvatureTuner(optimizer, CDAT(scale=2.0, ema=0.9), model=model, monitor_budget=budget)
        for _ in range(12):
            tuner.step(closure_for(model, optimizer, x, y))
        runs.append(([p.detach().clone() for p in model.parameters()], tuner.diagnostics["lr"]))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0], strict=True))
    assert runs[0][1] == runs[1][1]


def test_monitoring_adam_leaves_the_training_untouched_and_both_step_paths_agree_on_the_first_quotient():
    """With law=None the monitor measures Adam's first step along its update (the parameters go back to w and
    forward again by copies): the run equals plain Adam bit for bit. With sharpness_every the first step is
    instrumented (the update read off at w) and the quotient is the same."""
    x, y = data(torch.float32)
    runs, quotients = [], []
    for options in (None, {}, {"sharpness_every": 5}):
        model = mlp(torch.nn.Tanh, torch.float32)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.3)  # first step: 0.3 per weight, beyond most weights
        tuner = None if options is None else CurvatureTuner(optimizer, None, model=model, monitor_budget=1.0,
                                                            **options)
        closure = closure_for(model, optimizer, x, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in range(8):
                (tuner or optimizer).step(closure)
                if tuner is not None and t == 0:
                    quotients.append(tuner.diagnostics["update_quotient"])
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert math.isfinite(quotients[0]) and quotients[1] == pytest.approx(quotients[0], rel=1e-4)


# -- tracking ------------------------------------------------------------------------------------------------------
class MovingQuadratic(torch.nn.Module):
    """f(w) = 1/2 (w - c)^T H(t) (w - c): H rotates slowly and its top eigenvalues rescale (lambda_max known)."""

    def __init__(self, n=24, speed=0.002, clock=None):
        super().__init__()
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n))
        self.a = (a - a.T) / 2.0 / np.linalg.norm(a - a.T, 2) * 2.0
        self.q0, _ = np.linalg.qr(rng.standard_normal((n, n)))
        self.base = np.concatenate([[10.0, 7.0], np.linspace(-6.0, 5.0, n - 2)])
        self.speed = speed
        self.w = torch.nn.Parameter(torch.tensor(rng.standard_normal(n)))
        self.t = 0
        self.clock = clock

    def hessian(self, t):
        q = sl.expm(self.speed * t * self.a) @ self.q0
        lam = self.base.copy()
        lam[:2] *= 1.0 + 0.2 * np.sin(t / 150.0)
        return (q * lam) @ q.T, lam[0]

    def forward(self):
        if self.clock is not None:
            self.clock.now += 1.0
        h = torch.tensor(self.hessian(self.t)[0])
        return 0.5 * self.w @ h @ self.w


def test_tracks_a_rotating_and_rescaling_quadratic_at_the_default_budget(clock):
    model = MovingQuadratic(clock=clock)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    tuner = CurvatureTuner(optimizer, None, model=model, monitor_budget=0.05)
    errors, ages = [], []
    for t in range(1200):
        model.t = t

        def closure():
            optimizer.zero_grad()
            loss = model()
            loss.backward()
            return loss

        tuner.step(closure)
        found = tuner.diagnostics
        ages.append(found["sharpness_age"])
        if t >= 300:
            errors.append(abs(found["sharpness"] - model.hessian(t)[1]) / model.hessian(t)[1])
    # one product (one forward) per 23 steps (one forward each): 90% of the budget 0.05 (monitor.RESERVE)
    assert tuner.diagnostics["monitor_every"] == 23
    # ages 0..22 between ticks; the first tick (charged by the cost model, 1.1 steps per product, before a step was
    # timed) and the 10th (a check: both products) are followed by longer waits
    assert max(ages) <= 48 and sum(age > 22 for age in ages) <= 50
    assert np.median(errors) < 0.03 and max(errors) < 0.1


class SwitchingQuadratic(torch.nn.Module):
    """f(w) = 1/2 w^T H w with H = `before` until step `switch`, then `after`, whose top eigenvector is a random
    direction (lambda_max 20, the rest in [-3, 5]): the tracker's vector is stale after the switch."""

    def __init__(self, switch, n=24, clock=None, second=5.0):
        super().__init__()
        rng = np.random.default_rng(3)
        self.before = np.diag(np.concatenate([[10.0], np.linspace(-3.0, second, n - 1)]))
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        self.after = (q * np.concatenate([[20.0], np.linspace(-3.0, 5.0, n - 1)])) @ q.T
        self.w = torch.nn.Parameter(torch.tensor(rng.standard_normal(n)))
        self.switch, self.t, self.clock = switch, 0, clock

    def forward(self):
        if self.clock is not None:
            self.clock.now += 1.0
        return 0.5 * self.w @ torch.tensor(self.before if self.t < self.switch else self.after) @ self.w


def monitored_quadratic(model):
    """SGD at a negligible lr on `model` with the monitor at the default budget, and the step's closure."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    tuner = CurvatureTuner(optimizer, None, model=model, monitor_budget=0.05)

    def closure():
        optimizer.zero_grad()
        loss = model()
        loss.backward()
        return loss

    return tuner, closure


def test_a_stale_reading_runs_a_whole_cycle_on_the_steps_operator(clock):
    """After the Hessian jumps, the tick's one product leaves a large residual (rules.is_stale): the tracker completes
    a cycle of products on the new Hessian, charged, and reads a Ritz value of it alone (conclusive) near its
    lambda_max. The Rayleigh quotient of the old vector would read about 1 instead of 20."""
    model = SwitchingQuadratic(switch=100, clock=clock)
    tuner, closure = monitored_quadratic(model)
    ticks = []  # (step, products made, conclusive, reading, relative residual, position)
    for t in range(300):
        model.t = t
        before = 0 if tuner.monitor is None or tuner.monitor.trackers[0] is None else int(
            tuner.monitor.trackers[0].products)
        tuner.step(closure)
        state, found = tuner.monitor.trackers[0], tuner.diagnostics
        if found["sharpness_age"] == 0.0:
            ticks.append((t, int(state.products) - before, tuner.monitor.conclusive[0], found["sharpness"],
                          found["sharpness_residual"] / abs(found["sharpness"]), int(state.position)))
    warm_before = [tick for tick in ticks if 0 < tick[0] < 100]
    assert warm_before and all(made == 1 and residual <= rules.STALE_RESIDUAL
                               for _, made, _, _, residual, _ in warm_before)  # converged: one product a tick
    assert all(abs(reading - 10.0) < 1e-2 for _, _, _, reading, _, _ in warm_before)
    step, made, alone, reading, _, position = next(tick for tick in ticks if tick[0] >= 100)
    # its products complete a cycle made on the new Hessian alone (the tick's own product started it here)
    assert made == rules.TRACKER_RESTART and position == 0 and alone
    assert abs(reading - 20.0) / 20.0 < 0.1 and reading <= 20.0 + 1e-9  # a Ritz value of the new Hessian
    later = [tick for tick in ticks if tick[0] > step]
    assert later and all(abs(r - 20.0) / 20.0 < 0.1 for _, _, _, r, _, _ in later)
    # the cycle was charged: the next tick came after about three ticks' worth of credit (its products), not one
    assert later[0][0] - step >= 2 * tuner.diagnostics["monitor_every"]


def test_a_cold_start_ends_its_cycle_so_the_next_tick_reads_its_own_hessian(clock):
    """The cold start ends at a cycle boundary (rules.continues_tick): the next tick's product is the Rayleigh quotient
    of the converged vector on that step's Hessian, whose residual is exact, so a Hessian that jumped in between
    (Adam's first steps) is found stale and measured. A cold start ending mid-cycle left the next tick a Ritz value
    of a matrix mixing both Hessians, which kept reading the old lambda_max (10) with a small residual."""
    model = SwitchingQuadratic(switch=1, clock=clock, second=8.0)  # a slow cold start: COLD_PRODUCTS, mid-cycle
    tuner, closure = monitored_quadratic(model)
    readings = []  # (step, reading, conclusive) at each tick
    for t in range(200):
        model.t = t
        tuner.step(closure)
        if tuner.diagnostics["sharpness_age"] == 0.0:
            readings.append((t, tuner.diagnostics["sharpness"], tuner.monitor.conclusive[0]))
        if t == 0:
            cold = tuner.monitor.trackers[0]
            assert int(cold.products) > rules.COLD_PRODUCTS and int(cold.position) == 0
            assert abs(readings[0][1] - 10.0) < 1e-2
    step, reading, alone = readings[1]
    assert step > 1 and alone and abs(reading - 20.0) / 20.0 < 0.1 and reading <= 20.0 + 1e-9


# -- the budget ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_the_budget_spaces_the_products(clock, kind):
    """A product (one forward and backward) costs what a step costs: at budget 0.05, of which products get 90% (the
    rest is kept back for what cannot be timed), one tick every 23 steps with one operator, every 45 with two (Adam:
    H and P^-1/2 H P^-1/2)."""
    x, y = data()
    model = mlp(clock=clock)
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.01) if kind == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=1e-3))
    tuner = CurvatureTuner(optimizer, None, model=model, monitor_budget=0.05)
    closure = closure_for(model, optimizer, x, y)
    # (Adam's first step is also watched along the update, one product outside the budget like the cold start:
    # test_an_adaptive_optimizers_first_step_is_watched_along_the_update)
    tuner.step(closure)
    if kind == "adam":  # the preconditioned tracker starts cold on step GRACE_STEPS (rules.cold_start_due)
        assert tuner.monitor.trackers[1] is None
        for _ in range(rules.GRACE_STEPS):
            tuner.step(closure)
        made = int(tuner.monitor.trackers[1].products)
        assert rules.TRACKER_RESTART <= made <= rules.COLD_PRODUCTS + rules.TRACKER_RESTART - 1  # ends its cycle
    cold = sum(int(s.products) for s in tuner.monitor.trackers if s is not None)
    start = clock.now
    steps = 800
    for _ in range(steps):
        tuner.step(closure)
    operators = 1 if kind == "sgd" else 2
    k = math.ceil(operators / (0.05 * (1 - rules.RESERVE)))
    assert k == (23 if kind == "sgd" else 45)
    assert tuner.diagnostics["monitor_every"] == k
    # every product after the cold starts is charged, a stale reading's whole cycle (rules.is_stale) included: one
    # per operator every k steps on average; the first tick is charged at the cost model (1.1 steps per product)
    # and the 10th computes both products
    made = sum(int(s.products) for s in tuner.monitor.trackers if s is not None) - cold
    assert operators * (steps // k - 3) <= made <= operators * (steps // k + 1)
    # the time the monitor took (one forward per product, the checks' exact products included) / training time
    monitoring = clock.now - start - steps
    assert monitoring / steps <= 0.05 * 1.1


def test_a_preconditioned_tracker_that_cannot_start_on_its_step_waits_for_the_budget(clock):
    """No optimizer state to precondition with on step GRACE_STEPS (here: none until step 40): the preconditioned
    tracker starts at the next tick the budget pays for. Its cold start was due on every step before, so the
    Hessian's tracker ticked on every step from step 10 until the state appeared."""

    class LateState(CurvatureTuner):
        def _preconditioner(self, pending):
            found = super()._preconditioner(pending)
            return [torch.full_like(t, math.inf) for t in found] if self.monitor.step < 40 else found

    x, y = data()
    model = mlp(clock=clock)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tuner = LateState(optimizer, None, model=model, monitor_budget=0.05)
    closure = closure_for(model, optimizer, x, y)
    ticks = []
    for step in range(200):
        before = clock.now
        tuner.step(closure)
        if clock.now - before > 1:  # one forward per step, one per product
            ticks.append(step)
    assert ticks[0] == 0 and ticks[1] == rules.GRACE_STEPS  # the cold start; P due but not startable: H alone
    assert len([t for t in ticks if t < 40]) == 2  # 20+ before the fix
    assert tuner.monitor.trackers[1] is not None and int(tuner.monitor.trackers[1].products) >= rules.TRACKER_RESTART
    assert len(ticks) <= 2 + math.ceil(200 / 45)


def test_the_monitor_needs_the_loss():
    x, y = data()
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    tuner = CurvatureTuner(optimizer, None, model=model, monitor_budget=0.05)
    with pytest.warns(RuntimeWarning, match="needs the loss on the batch"):
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    assert math.isnan(tuner.diagnostics["sharpness"]) and math.isnan(tuner.diagnostics["unstable"])


# -- the early warning -------------------------------------------------------------------------------------------
LAMBDAS = torch.tensor([1.0, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=torch.float64)


class Quadratic(torch.nn.Module):
    def __init__(self, clock, start=1e-3):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((6,), start, dtype=torch.float64))
        self.clock = clock

    def forward(self):
        self.clock.now += 1.0
        return 0.5 * (LAMBDAS * self.w * self.w).sum()


OPTIMIZERS = {
    "gd": (lambda p, lr: torch.optim.SGD(p, lr=lr), rules.heavy_ball_edge()),
    "heavy-ball": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), rules.heavy_ball_edge(0.9)),
    "dampened": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, dampening=0.5), rules.heavy_ball_edge(0.9, 0.5)),
    "nesterov": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True), rules.nesterov_edge(0.9)),
    # eps = 1 >> sqrt(v): P ~ eps after the warm-up, the preconditioned sharpness is lambda / eps
    "adam": (lambda p, lr: torch.optim.Adam(p, lr=lr, eps=1.0), rules.adam_edge(0.9)),
}


def train_quadratic(clock, kind, factor, steps=150, warm=None):
    make, edge = OPTIMIZERS[kind]
    model = Quadratic(clock)
    optimizer = make(model.parameters(), 1e-3)
    tuner = CurvatureTuner(optimizer, None, model=model, monitor_budget=0.05)
    warm = (100 if kind == "adam" else 0) if warm is None else warm  # Adam's bias corrections settle first
    losses, flags, fired = [], [], []
    for t in range(warm + steps):
        if t == warm:
            for group in optimizer.param_groups:
                group["lr"] = factor * edge  # lambda_max = 1 (times 1 / eps = 1 for Adam)

        def closure():
            optimizer.zero_grad()
            loss = model()
            loss.backward()
            return loss

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = float(tuner.step(closure))
        fired += [t - warm for w in caught if "edge of stability" in str(w.message)]
        if t >= warm:
            losses.append(loss)
            flags.append(tuner.diagnostics["unstable"])
        if not math.isfinite(loss) or loss > 1e6:
            break
    return tuner, np.array(losses), flags, fired


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_the_warning_fires_above_the_edge_before_the_loss_blows_up(clock, kind):
    # the lr jumps to 1.8 x the edge (above the threshold, margin 0.6) after 100 steps, when the tracker is warm
    tuner, losses, flags, fired = train_quadratic(clock, kind, factor=1.8, warm=100)
    assert tuner.diagnostics["edge"] == pytest.approx(OPTIMIZERS[kind][1])
    assert len(fired) == 1  # once per episode
    # above the threshold the monitor measures at every step: the warning comes at the patience-th measurement, or
    # earlier at a converged one (a tick that starts a cycle reads the Rayleigh quotient of the step's operator)
    assert 1 <= fired[0] <= rules.PATIENCE and flags[fired[0]] == 1.0
    spike = int(np.argmax(losses > 1e6 * losses[0]))  # the loss blows up afterwards
    assert losses.max() > 1e6 * losses[0] and fired[0] < spike


@pytest.mark.parametrize("kind", sorted(set(OPTIMIZERS) - {"adam"}))
def test_a_converged_reading_above_the_threshold_warns_at_once(clock, kind):
    # above the threshold from the first step: the cold start converges on the step's Hessian (lr x lambda_max
    # itself), which needs no patience
    tuner, losses, flags, fired = train_quadratic(clock, kind, factor=1.8)
    assert fired == [0] and flags[0] == 1.0
    assert losses.max() > 1e6 * losses[0]
    # at 1.3 x the edge the same converged reading stays below the threshold
    tuner, losses, flags, fired = train_quadratic(clock, kind, factor=1.3, steps=20)
    assert fired == [] and flags[0] == 0.0


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_the_warning_stays_silent_below_the_edge(clock, kind):
    tuner, losses, flags, fired = train_quadratic(clock, kind, factor=0.9)
    assert fired == [] and set(flags) == {0.0}
    assert losses[-1] < losses[0]


def quotient_in(message):
    return float(re.search(r"\(-g'u\) = ([-+0-9.e]+)", message).group(1))


@pytest.mark.parametrize("lr, warns", [(5e-3, True), (2e-3, False)])
def test_an_adaptive_optimizers_first_step_is_watched_along_the_update(clock, monkeypatch, lr, warns):
    """Adam's first step is lr sign(g) (eps small): on the quadratic it moves every coordinate by lr, so
    q = lr u'Hu / (-g'u) = D'AD / (-g'D) = lr sum(lambda) / sum(lambda w) = 1000 lr at w = 1e-3: 5 at lr 5e-3 (above
    2 x 1.6, warned at step 0, before the loss spikes at step 1), 2 at lr 2e-3 (silent). The quotient is measured on
    Adam's first step only, and never for SGD."""
    model = Quadratic(clock)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-12)
    tuner = CurvatureTuner(optimizer, None, model=model, monitor_budget=0.05)
    calls = []
    along = tuner.monitor.along_update
    monkeypatch.setattr(tuner.monitor, "along_update", lambda **kw: calls.append(tuner.diagnostics.get("step"))
                        or along(**kw))

    def closure():
        optimizer.zero_grad()
        loss = model()
        loss.backward()
        return loss

    w0 = model.w.detach().clone()
    g0 = LAMBDAS * w0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [float(tuner.step(closure))]
    d = model.w.detach() - w0
    expected = float((d * LAMBDAS * d).sum() / -(g0 * d).sum())  # the explicit quotient of the step taken
    assert expected == pytest.approx(1000 * lr, rel=1e-6)
    assert tuner.diagnostics["update_quotient"] == pytest.approx(expected, rel=1e-6)
    fired = [str(w.message) for w in caught if "along the update" in str(w.message)]
    if warns:
        assert len(fired) == 1 and "step 0" in fired[0] and "edge of stability" in fired[0]
        assert quotient_in(fired[0]) == pytest.approx(expected, rel=1e-3)
        assert tuner.diagnostics["unstable"] == 1.0
    else:
        assert fired == [] and tuner.diagnostics["unstable"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(12):
            losses.append(float(tuner.step(closure)))
    if warns:
        assert losses[1] > 10 * losses[0]  # the spike the warning of step 0 foresaw
    assert len(calls) == rules.UPDATE_STEPS == 1 and math.isnan(tuner.diagnostics["update_quotient"])

    sgd_model = Quadratic(clock)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=3.0)  # lr lambda_max = 3 > 2: the cold start warns instead
    sgd_tuner = CurvatureTuner(sgd, None, model=sgd_model, monitor_budget=0.05)
    monkeypatch.setattr(sgd_tuner.monitor, "along_update", lambda **kw: pytest.fail("measured for SGD"))

    def sgd_closure():
        sgd.zero_grad()
        loss = sgd_model()
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(rules.GRACE_STEPS):
            sgd_tuner.step(sgd_closure)


# -- checkpoints ------------------------------------------------------------------------------------------------------
def serialised(value):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def history(tuner):
    found = dict(tuner.diagnostics)
    return {k: v for k, v in found.items() if not (isinstance(v, float) and math.isnan(v))}


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_resume_continues_the_monitor_bit_identically(clock, kind):
    x, y = data(torch.float32)

    def build():
        model = mlp(torch.nn.Tanh, torch.float32, clock=clock)
        optimizer = (torch.optim.SGD(model.parameters(), lr=0.05) if kind == "sgd"
                     else torch.optim.Adam(model.parameters(), lr=1e-2))
        return model, optimizer, CurvatureTuner(optimizer, CDAT(scale=2.0), model=model, monitor_budget=0.2)

    def run(model, optimizer, tuner, steps):
        out = []
        for _ in range(steps):
            tuner.step(closure_for(model, optimizer, x, y))
            out.append(history(tuner))
        return out

    model, optimizer, tuner = build()
    full = run(model, optimizer, tuner, 40)
    model, optimizer, tuner = build()
    run(model, optimizer, tuner, 17)
    saved = serialised({"model": model.state_dict(), "optim": optimizer.state_dict()})
    assert saved["optim"][STATE_KEY]["monitor"]["trackers"][0]["products"] > 0
    model, optimizer, tuner = build()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optim"])
    resumed = run(model, optimizer, tuner, 23)
    assert resumed == full[17:]
    assert any(step["sharpness_age"] == 0 for step in resumed)


@pytest.mark.skipif(tuple(int(n) for n in torch.__version__.split(".")[:2]) < (2, 7),
                    reason="the layout is checked against torch.distributed.checkpoint.state_dict of torch >= 2.7")
def test_resume_through_torch_distributed_checkpoint_state_dicts(clock):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    x, y = data(torch.float32)

    def build():
        model = mlp(torch.nn.Tanh, torch.float32, clock=clock)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, optimizer, CurvatureTuner(optimizer, None, model=model, monitor_budget=0.3)

    model, optimizer, tuner = build()
    get_optimizer_state_dict(model, optimizer)
    for _ in range(30):
        tuner.step(closure_for(model, optimizer, x, y))
    reference = copy.deepcopy(tuner.monitor.trackers)
    saved = serialised({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)})
    assert STATE_KEY not in saved["optim"]  # only the first group's header and the per-parameter entries remain
    model, optimizer, tuner = build()
    model.load_state_dict(saved["model"])
    set_optimizer_state_dict(model, optimizer, saved["optim"])
    for mine, theirs in zip(tuner.monitor.trackers, reference, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(mine.basis, theirs.basis, strict=True))
        assert np.array_equal(mine.alpha, theirs.alpha) and float(mine.eigenvalue) == float(theirs.eigenvalue)


def test_a_checkpoint_without_monitor_starts_it_afresh_and_one_with_it_loads_into_a_tuner_without():
    x, y = data(torch.float32)
    model = mlp(torch.nn.Tanh, torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    tuner = CurvatureTuner(optimizer, None, model=model, monitor_budget=0.5)
    for _ in range(5):
        tuner.step(closure_for(model, optimizer, x, y))
    saved = serialised(optimizer.state_dict())
    other = mlp(torch.nn.Tanh, torch.float32)
    plain = torch.optim.SGD(other.parameters(), lr=0.05)
    quiet = CurvatureTuner(plain, None, model=other)
    plain.load_state_dict(saved)
    assert quiet.monitor is None
    tuner.detach()
    fresh = CurvatureTuner(torch.optim.SGD(model.parameters(), lr=0.05), None, model=model, monitor_budget=0.5)
    fresh.optimizer.load_state_dict(serialised(quiet.state_dict()))
    assert fresh.monitor.trackers == [None, None]


def as_version_4(state):
    """`optimizer.state_dict()` of a monitored tuner as version 4 wrote it: two Lanczos vectors per tracker."""
    import json

    old = copy.deepcopy(state)
    drop = [f"{prefix}monitor_basis_{i}" for prefix in ("", "preconditioned_")
            for i in range(2, rules.TRACKER_RESTART)]
    top = old[STATE_KEY]
    top["version"] = 4
    for entry in top["monitor"]["trackers"]:
        if entry is not None:
            entry.update(alpha=entry["alpha"][:2], beta=entry["beta"][:2], position=min(entry["position"], 1))
    for name in drop:
        top.pop(name, None)
    header = json.loads(old["param_groups"][0][STATE_KEY])
    header.update(version=4, monitor=top["monitor"], vectors=[v for v in header["vectors"] if v not in drop])
    old["param_groups"][0][STATE_KEY] = json.dumps(header)
    for entry in old["state"].values():
        for name in drop:
            entry.pop(f"{STATE_KEY}_{name}", None)
    return old


def test_a_version_4_checkpoint_with_two_lanczos_vectors_resumes_from_its_eigenvector(clock):
    x, y = data(torch.float32)

    def build():
        model = mlp(torch.nn.Tanh, torch.float32, clock=clock)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        return model, optimizer, CurvatureTuner(optimizer, None, model=model, monitor_budget=0.5)

    model, optimizer, tuner = build()
    for _ in range(12):
        tuner.step(closure_for(model, optimizer, x, y))
    assert rules.TRACKER_RESTART == 3 and tuner.monitor.trackers[0].alpha.shape == (3,)
    saved = serialised({"model": model.state_dict(), "optim": as_version_4(optimizer.state_dict())})
    assert f"{STATE_KEY}_monitor_basis_2" not in next(iter(saved["optim"]["state"].values()))
    before = tuner.monitor.trackers[0]
    model, optimizer, tuner = build()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optim"])
    state = tuner.monitor.trackers[0]
    assert state.alpha.shape == (3,) and int(state.position) == 0 and not state.alpha.any()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(state.basis, before.basis, strict=True))  # x, unchanged
    assert not any(bool(a[1:].any()) for a in state.basis)
    assert float(state.eigenvalue) == float(before.eigenvalue) and int(state.products) == int(before.products)
    for _ in range(12):
        tuner.step(closure_for(model, optimizer, x, y))
    assert int(tuner.monitor.trackers[0].products) > int(before.products)
    assert math.isfinite(tuner.diagnostics["sharpness"])
