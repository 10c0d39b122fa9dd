"""Every curvature route against torch.autograd.functional.hessian on small models."""

import copy
import warnings

import pytest
import torch

from eos_core import CDAT, routes
from eos_core.adapters.torch import CurvatureTuner, Objective, Oracle, RouteUnavailable, gradient
from eos_core.adapters.torch import vector_ops as vec
from eos_core.adapters.torch.objective import shifted
from eos_core.adapters.torch.oracles import OUT_OF_MEMORY
from eos_core.routes import finite_difference_step

EXACT = [routes.DOUBLE_BACKWARD, routes.JVP_JVP, routes.JVP_GRAD, routes.AUTO]
FINITE = [routes.FD_CENTRAL, routes.FD_ONESIDED]


def measure(model, inputs, targets, route, direction_seed=1):
    """u^T H u and H u by ``route``; u random (``direction_seed``) or the descent direction -g (None)."""
    params = list(model.parameters())

    def loss_of_output(out):
        return torch.nn.functional.cross_entropy(out, targets)

    objective = Objective(lambda: loss_of_output(model(inputs)), params)
    grads = gradient(objective, params)
    if direction_seed is None:
        u = [-g for g in grads]
    else:
        g = torch.Generator().manual_seed(direction_seed)
        u = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    oracle = Oracle(route, module=model, fd_above=None)  # auto: the exact route, not verified differences
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        curvature = oracle.curvature(objective, params, u, grad_dot_u=vec.dot(grads, u))
        with oracle.hessian_operator(objective, params, base_grad=grads) as hessian:
            hv = hessian(u)
    return curvature, hv, u, loss_of_output, oracle


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention"])
@pytest.mark.parametrize("route", EXACT)
def test_exact_routes_float64(small_problems, explicit_hessian, flat, name, route):
    factory, inputs, targets = small_problems[name]
    torch.manual_seed(0)
    model = factory().double()
    inputs = inputs.double()
    curvature, hv, u, loss_of_output, _ = measure(model, inputs, targets, route)
    h = explicit_hessian(model, loss_of_output, inputs)
    uf = flat(u)
    assert curvature == pytest.approx(float(uf @ h @ uf), rel=1e-8)
    true_hv = h @ uf
    assert float((flat(hv) - true_hv).norm() / true_hv.norm()) < 1e-8


def _float64_finite_difference(model, loss_of_output, inputs, u, h, central, flatten):
    """The finite-difference formula of the route evaluated in float64 with the same step h: it differs from the
    exact H u by the truncation error alone (float64 rounding, ~1e-16 / h, is negligible here)."""
    reference = copy.deepcopy(model).double()
    params = list(reference.parameters())
    objective = Objective(lambda: loss_of_output(reference(inputs.double())), params)
    direction = [d.double() for d in u]
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        base = flatten(gradient(objective, params))
        with shifted(params, direction, h):
            plus = flatten(gradient(objective, params))
        if not central:
            return (plus - base) / h, base
        with shifted(params, direction, -h):
            minus = flatten(gradient(objective, params))
    return (plus - minus) / (2.0 * h), base


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention"])
@pytest.mark.parametrize("route", FINITE)
@pytest.mark.parametrize("direction", ["descent", "random-1", "random-2"])
def test_finite_differences_float32(small_problems, explicit_hessian, flat, name, route, direction):
    """Float32 finite differences against the float64 explicit Hessian at the same point, within the classical
    error bound of a difference quotient: truncation + rounding. The truncation error is the same formula with
    the same step h evaluated in float64; the rounding error of the float32 gradients is measured at w,
    ||dg|| = ||g32(w) - g64(w)||, and enters as 2 ||dg|| / h one-sided ((dg(w + hu) - dg(w)) / h) and
    ||dg|| / h central ((dg(w + hu) - dg(w - hu)) / 2h), assuming the shifted gradients round as much as g(w).
    The measured errors sit at 30-70% of this bound on every case; a wrong step size, scale or sign would be
    orders of magnitude outside it. A fixed relative bound (1e-3) was not justified: the rounding part depends
    on the float32 kernels (thread count, order of reductions) and reached 1.1e-3 on the CNN."""
    factory, inputs, targets = small_problems[name]
    torch.manual_seed(0)
    model = factory()
    seed = None if direction == "descent" else int(direction.split("-")[1])
    curvature, hv, u, loss_of_output, oracle = measure(model, inputs, targets, route, direction_seed=seed)
    central = route == routes.FD_CENTRAL
    h = finite_difference_step(*vec.scale_along(list(model.parameters()), u), oracle._eps(list(model.parameters())),
                               central=central)
    h_reference, g64 = _float64_finite_difference(model, loss_of_output, inputs, u, h, central, flat)
    true_hv = explicit_hessian(copy.deepcopy(model).double(), loss_of_output, inputs.double()) @ flat(u).double()
    uf = flat(u).double()
    grads32 = gradient(Objective(lambda: loss_of_output(model(inputs)), list(model.parameters())),
                       list(model.parameters()))
    rounding = (1.0 if central else 2.0) * float((flat(grads32).double() - g64).norm()) / h
    truncation = float((h_reference - true_hv).norm())
    assert float((flat(hv).double() - true_hv).norm()) <= truncation + rounding
    # u^T H u: the same quotients dotted with u (|dg . u| <= ||dg|| ||u||, Cauchy-Schwarz)
    assert abs(curvature - float(uf @ true_hv)) <= abs(float(uf @ (h_reference - true_hv))) + rounding * float(
        uf.norm())
    # and the step balances the two errors well enough for CDAT: 1e-2 of the scale of the curvature along u
    scale = abs(float(uf @ true_hv)) if seed is None else float(uf.norm() * true_hv.norm())
    assert abs(curvature - float(uf @ true_hv)) <= 1e-2 * scale


def test_auto_falls_back_to_math_sdpa_and_says_so(small_problems):
    factory, inputs, targets = small_problems["attention"]
    torch.manual_seed(0)
    model = factory()
    params = list(model.parameters())
    objective = Objective(lambda: torch.nn.functional.cross_entropy(model(inputs), targets), params)
    oracle = Oracle(routes.AUTO, fd_above=None)
    u = [torch.ones_like(p) for p in params]
    with pytest.warns(RuntimeWarning, match="fell back to 'double-backward\\+sdpa-math'"):
        oracle.curvature(objective, params, u)
    assert oracle.resolved == "double-backward+sdpa-math"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resolved once: no second warning
        oracle.curvature(objective, params, u)


def test_auto_falls_back_to_finite_differences_when_nothing_is_twice_differentiable():
    class OnceDifferentiable(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.pow(3)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 3 * x.pow(2) * grad

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    # f(w) = sum(w^6): the op's backward runs with a gradient that itself needs differentiating
    objective = Objective(lambda: OnceDifferentiable.apply(w).pow(2).sum(), [w])
    oracle = Oracle(routes.AUTO, fd_above=None)
    u = [torch.tensor([1.0, 0.0], dtype=torch.float64)]
    with pytest.warns(RuntimeWarning, match="fd-onesided"):
        value = oracle.curvature(objective, [w], u, grad_dot_u=6.0)
    assert oracle.resolved == routes.FD_ONESIDED
    assert value == pytest.approx(30.0, rel=1e-5)  # d^2/dt^2 (1 + t)^6 at 0


def test_functional_routes_need_the_model():
    for route in (routes.JVP_JVP, routes.JVP_GRAD):
        with pytest.raises(ValueError, match="model="):
            Oracle(route)
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="model="):
        CurvatureTuner(torch.optim.SGD([w], lr=0.1), CDAT(), route=routes.JVP_GRAD)


def test_unknown_route_is_rejected():
    with pytest.raises(ValueError, match="route"):
        Oracle("hutchinson")


def test_objective_from_a_closure_captures_backward_and_keeps_grads():
    model = torch.nn.Linear(3, 1)
    x = torch.randn(5, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def closure():
        optimizer.zero_grad(set_to_none=False)
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    closure()
    before = [p.grad.clone() for p in model.parameters()]
    objective = Objective(closure, list(model.parameters()))
    loss = objective.loss()
    assert loss.requires_grad  # the graph is intact: backward was captured, not run
    for p, g in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.grad, g)  # the step's gradient survived the closure's zero_grad
    assert objective.value() == pytest.approx(float(loss))


def test_objective_replays_dropout_and_leaves_the_rng_stream_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))
    x = torch.randn(8, 4)
    from eos_core.adapters.torch.objective import capture_rng

    params = list(model.parameters())
    rng = capture_rng(params)
    first = model(x).sum().item()
    after_step = torch.get_rng_state()
    objective = Objective(lambda: model(x).sum(), params, rng_state=rng)
    assert objective.value() == pytest.approx(first)  # same dropout mask
    assert objective.value() == pytest.approx(first)
    assert torch.equal(torch.get_rng_state(), after_step)  # probes consume no random numbers


def test_objective_restores_batchnorm_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    x = torch.randn(10, 3)
    before = [b.clone() for b in model.buffers()]
    objective = Objective(lambda: model(x).sum(), list(model.parameters()), module=model)
    with objective.preserving_buffers():
        objective.value()
        torch.autograd.grad(objective.loss(), list(model.parameters()))
        assert not torch.equal(model[1].running_mean, before[0])  # the forward passes did update them
    for b, saved in zip(model.buffers(), before, strict=True):
        assert torch.equal(b, saved)


def test_jvp_jvp_never_returns_a_wrong_value_through_layer_norm(explicit_hessian, flat):
    """PyTorch's forward-over-forward AD is wrong through layer_norm (torch 2.13): the route must either
    agree with the explicit Hessian or refuse with an error naming the alternatives."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 2)).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (10,))
    params = list(model.parameters())

    def loss_of_output(out):
        return torch.nn.functional.cross_entropy(out, y)

    objective = Objective(lambda: loss_of_output(model(x)), params)
    u = [torch.randn_like(p) for p in params]
    h = explicit_hessian(model, loss_of_output, x)
    try:
        value = Oracle(routes.JVP_JVP, module=model).curvature(objective, params, u)
    except RouteUnavailable as error:
        assert "jvp-grad" in str(error) and "double-backward" in str(error)
    else:
        assert value == pytest.approx(float(flat(u) @ h @ flat(u)), rel=1e-8)
    # the route auto never takes forward-over-forward; jvp-grad is right here
    assert Oracle(routes.JVP_GRAD, module=model).curvature(objective, params, u) == pytest.approx(
        float(flat(u) @ h @ flat(u)), rel=1e-8)


def _mlp_objective(activation, width=64, samples=256, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(20, width), activation(), torch.nn.Linear(width, width), activation(),
                                torch.nn.Linear(width, 5))
    x, y = torch.randn(samples, 20), torch.randint(0, 5, (samples,))
    params = list(model.parameters())
    objective = Objective(lambda: torch.nn.functional.cross_entropy(model(x), y), params)
    grads = gradient(objective, params)
    return objective, params, [-g for g in grads], vec.dot(grads, [-g for g in grads])


def test_auto_keeps_verified_finite_differences_on_large_smooth_models():
    objective, params, u, gu = _mlp_objective(torch.nn.GELU)
    exact = Oracle(routes.DOUBLE_BACKWARD).curvature(objective, params, u)
    oracle = Oracle(routes.AUTO, fd_above=1000)  # "large" for the test
    assert oracle.curvature(objective, params, u, grad_dot_u=gu) == exact  # the first probe is exact
    assert oracle.resolved == routes.FD_ONESIDED
    exact_value, fd_value = oracle.verification
    assert abs(fd_value - exact_value) <= 1e-2 * abs(exact_value)
    assert oracle.curvature(objective, params, u, grad_dot_u=gu) == pytest.approx(exact, rel=1e-2)
    default = Oracle(routes.AUTO)  # the default threshold (1 parameter): every model switches
    default.curvature(objective, params, u, grad_dot_u=gu)
    assert default.resolved == routes.FD_ONESIDED
    kept = Oracle(routes.AUTO, fd_above=None)  # None: auto stays exact
    kept.curvature(objective, params, u, grad_dot_u=gu)
    assert kept.resolved == routes.DOUBLE_BACKWARD


def test_auto_stays_exact_where_finite_differences_disagree():
    objective, params, u, gu = _mlp_objective(torch.nn.ReLU, width=64, samples=4096)
    oracle = Oracle(routes.AUTO, fd_above=1000)
    oracle.curvature(objective, params, u, grad_dot_u=gu)
    # ReLU kinks: finite differences see gradient jumps that autograd's Hessian does not
    assert oracle.resolved == routes.DOUBLE_BACKWARD and oracle.verification is None


def test_auto_checks_finite_differences_again_at_the_10th_and_100th_exact_probe(monkeypatch):
    objective, params, u, gu = _mlp_objective(torch.nn.GELU)
    oracle = Oracle(routes.AUTO, fd_above=1000)
    oracle.fd_tolerance = 0.0  # finite differences "disagree" until the test relaxes the tolerance
    checks = []
    original = oracle._uhu_finite_differences

    def counting(*args, **kwargs):
        checks.append(oracle.exact_probes)
        return original(*args, **kwargs)

    monkeypatch.setattr(oracle, "_uhu_finite_differences", counting)
    for _ in range(12):
        oracle.curvature(objective, params, u, grad_dot_u=gu)
    assert checks == [1, 10] and oracle.resolved == routes.DOUBLE_BACKWARD
    oracle.fd_tolerance = 1e-2
    for _ in range(100 - 12):
        oracle.curvature(objective, params, u, grad_dot_u=gu)
    assert checks == [1, 10, 100] and oracle.resolved == routes.FD_ONESIDED  # agreed at the 100th probe
    oracle.curvature(objective, params, u, grad_dot_u=gu)
    assert checks == [1, 10, 100, 100]  # now the route itself: no more exact probes, no more checks


# -- route resolution lets the user's errors through ------------------------------------------------------
def _failing_objective(error, *, after=0):
    """The quadratic 1/2 |w|^2 whose evaluations raise ``error`` from the (after + 1)-th on."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    calls = [0]

    def loss():
        calls[0] += 1
        if calls[0] > after:
            raise error
        return 0.5 * w.pow(2).sum()

    return Objective(loss, [w]), w, calls


@pytest.mark.parametrize("error", [ValueError("bad batch"), RuntimeError("CUDA error: device-side assert"),
                                   OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   TypeError("unsupported operand"), NotImplementedError("my layer")])
@pytest.mark.parametrize("route", [routes.AUTO, routes.DOUBLE_BACKWARD])
def test_route_resolution_lets_the_users_errors_through(error, route):
    """An error of the user's loss function is not "this route cannot differentiate the model": it propagates
    unchanged (the same object), auto does not move on to another route, and nothing is resolved."""
    objective, w, calls = _failing_objective(error)
    oracle = Oracle(route)
    u = [torch.ones(2, dtype=torch.float64)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "fell back" warning either
        with pytest.raises(type(error)) as raised:
            oracle.curvature(objective, [w], u, grad_dot_u=3.0)
        assert raised.value is error
        with pytest.raises(type(error)) as raised:
            with oracle.hessian_operator(objective, [w]) as hessian:
                hessian(u)
        assert raised.value is error
    assert oracle.resolved is None and calls[0] == 2  # one evaluation each: no other route was tried


def test_route_unavailable_moves_auto_on_and_names_every_route_when_none_works():
    """Our own checks raise RouteUnavailable; a route asked for by name raises it (with both kernel variants'
    reasons) when no variant can differentiate the model."""
    class OnceDifferentiable(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.pow(3)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 3 * x.pow(2) * grad

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    objective = Objective(lambda: OnceDifferentiable.apply(w).pow(2).sum(), [w])
    u = [torch.tensor([1.0, 0.0], dtype=torch.float64)]
    with pytest.raises(RouteUnavailable, match="double-backward: .*once_differentiable.*double-backward\\+sdpa-math"):
        Oracle(routes.DOUBLE_BACKWARD).curvature(objective, [w], u)


def test_is_power_of_ten_returns_for_every_count():
    """Called with the exact-probe count; 0 (or a negative count from a hand-edited checkpoint) once looped
    forever (0 % 10 == 0)."""
    import threading

    from eos_core.adapters.torch.oracles import _is_power_of_ten

    answers = {}

    def run():
        for n in (0, -10, 1, 10, 100, 1000, 2, 20, 11, 101):
            answers[n] = _is_power_of_ten(n)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=5.0)
    assert not thread.is_alive(), "_is_power_of_ten did not return"
    assert [n for n, yes in answers.items() if yes] == [1, 10, 100, 1000]
