"""Curvature oracles: u^T H u and H v by every route of `eos_core.routes`, with the "auto" fallback chain.

Routes (names from [`eos_core.routes`][]; costs of one probe as multiples of a training step on an H100, from the
README's table of the curvature routes):

* `double-backward` (reverse-over-reverse): H u = grad(grad f . u). Exact; the cheapest exact
  route in PyTorch (2.5-6.6x a training step).
* `jvp-jvp` (forward-over-forward, the paper's route) and `jvp-grad` (forward-over-reverse):
  exact, through `torch.func`; they need the model (`model=`) to call it functionally and cost
  3.4-11x a step in PyTorch. PyTorch's forward-over-forward derivatives of `layer_norm` and
  `batch_norm` are wrong (torch 2.13: the second directional derivative through them is off by
  tens of percent), so the first `jvp-jvp` measurement is cross-checked against forward-over-
  reverse and the route refuses to run ([`RouteUnavailable`][eos_core.adapters.torch.RouteUnavailable]) when they
  disagree. H v itself is always computed forward-over-reverse.
* `fd-central`: `(g(w + h u) - g(w - h u)) / 2h`, two extra gradients.
* `fd-onesided`: `(g(w + h u) - g(w)) / h` reusing the step's own gradient g(w): one extra
  gradient, the cheapest route everywhere (1.07-1.11x a step on GPT-2 124M, 1.84x on an MLP, 3.31x on a
  ResNet-18).

`auto` tries `double-backward`; when an operator cannot be differentiated twice (flash or
memory-efficient SDPA kernels, cuDNN RNNs, ops marked `once_differentiable`, ...) it retries with the
math SDPA kernel, then falls back to `fd-onesided`. The first route that works is kept for the rest of
training and reported in the diagnostics (`double-backward`, `double-backward+sdpa-math` or
`fd-onesided`); the fallback is announced once with a warning. An exact route asked for by name also
retries with the math SDPA kernel (same route, the one attention kernel that supports it) before raising
`RouteUnavailable`.

Only an error that means "this route cannot differentiate this model" moves to the next route
(`is_route_unavailable`: `RouteUnavailable`, raised by this module's own checks, and
PyTorch's "derivative / forward AD not implemented" errors). Every other error, an error raised by the
user's closure or loss function and `torch.OutOfMemoryError` included, propagates unchanged.

On every model (at least `fd_above` parameters, 1 by default; None turns it off) `auto` also measures
the 1st, 10th, 100th, ... exact probe by one-sided finite differences and, as soon as both agree to
`fd_tolerance` (1%), keeps finite differences from then on (checking again later matters: at
initialisation u^T H u along -g nearly cancels on a transformer, and the two disagree there while
they agree to 0.6% twenty steps later): one extra gradient instead of 2.5-6.6 training steps, and
about 1.2x memory instead of 1.4-2.3x (benchmarks/torch_overhead.py). Where they disagree (ReLU kinks, which
finite differences see and autograd's Hessian does not; bf16 rounding; dropout not replayed) it stays
exact. `oracle.verification` holds the two values that decided.

With sharded parameters (FSDP2, `eos_core.adapters.torch.sharding`) only the finite-difference routes
run: their gradients come from backward passes through FSDP's hooks, which all-gather the parameters and
reduce-scatter the gradient; `auto` is `fd-onesided` there and an exact route asked for by name is
refused when the oracle is built.

Finite-difference steps follow [`finite_difference_step`][eos_core.routes.finite_difference_step] with the
parameter scale measured along the direction, `sum_i |w_i| |u_i| / ||u||`
([`parameter_scale_along`][eos_core.routes.parameter_scale_along], Dennis and Schnabel's rule) instead of `||w||`:
the perturbation `h u` has norm `eps^(1/2) max(scale, 1)` (one-sided; `eps^(1/3)` central), `eps` the dtype's
machine epsilon. Along a transformer's gradient `||w||` is dominated by unit LayerNorm gains and grows with the
model, and the step it gives is far into the nonlinear range (one-sided error 8% on a 0.5M GPT-2
at initialisation, 1.5% with the weighted scale; both are below 1e-3 on the test MLP, CNN and
attention block).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch

from eos_core import routes
from eos_core.adapters.torch import vector_ops as vec
from eos_core.adapters.torch.distributed import Reducer
from eos_core.adapters.torch.objective import Objective, shifted
from eos_core.adapters.torch.sharding import ParameterSpace
from eos_core.routes import finite_difference_step
from eos_core.settings import FD_ABOVE  # `auto` considers finite differences from this many parameters

#: torch.OutOfMemoryError (torch >= 2.5; torch.cuda.OutOfMemoryError before, the same class since)
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

SDPA_MATH = "+sdpa-math"
Vector = list[torch.Tensor]


class RouteUnavailable(RuntimeError):
    """A curvature route cannot differentiate this model (raised by the oracle's own checks).

    Raised when the gradient goes through an operation marked `once_differentiable` (double backward
    would silently drop its second-order terms), when `jvp-jvp` disagrees with forward-over-reverse
    (PyTorch's forward-over-forward derivatives are wrong for some kernels), and, for a route asked for
    by name, when every kernel variant of the route failed that way. `route="auto"` moves on to its
    next route on this error; it never does on any other.
    """


#: Fragments of PyTorch's own messages for an operation a route cannot differentiate (lower case).
_UNAVAILABLE_MESSAGES = (
    "is not implemented",  # "derivative for aten::_scaled_dot_product_flash_attention_..._backward is not ..."
    "trying to use forward ad with",  # NotImplementedError: an op without a forward-mode formula
    "implement the jvp function",  # a custom autograd.Function without jvp, under forward mode
    "must override the setup_context staticmethod",  # a custom autograd.Function under torch.func
    "once_differentiable",  # "trying to differentiate twice a function that was marked with @once_differentiable"
)


def is_route_unavailable(error: BaseException) -> bool:
    """Whether `error` means "this route cannot differentiate this model" (so `auto` may try another).

    Args:
        error: an exception raised while computing a curvature product.

    Returns:
        True for [`RouteUnavailable`][eos_core.adapters.torch.RouteUnavailable] and for PyTorch's `RuntimeError` /
        `NotImplementedError` saying that a derivative or a forward-mode formula is not implemented for an
        operation (or that it was marked `once_differentiable`). False for everything else:
        `torch.OutOfMemoryError`, and any other error the user's closure raises.
    """
    if isinstance(error, RouteUnavailable):
        return True
    if isinstance(error, OUT_OF_MEMORY) or not isinstance(error, RuntimeError | NotImplementedError):
        return False
    message = str(error).lower()
    return any(fragment in message for fragment in _UNAVAILABLE_MESSAGES)


def _is_power_of_ten(n: int) -> bool:
    """1, 10, 100, ...: the exact probes at which `auto` checks finite differences (False for n < 1)."""
    if n < 1:
        return False
    while n % 10 == 0:
        n //= 10
    return n == 1


def _zeros_for_none(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> Vector:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def check_twice_differentiable(grads: Sequence[torch.Tensor | None]) -> None:
    """Check that the gradient's graph does not go through an op marked `once_differentiable`.

    Such an op returns its gradient through a `DelayedError` node with no inputs, so a second
    backward pass does not fail: it silently drops every term behind that op. Walking the graph
    once per route resolution turns that into an error the `auto` chain can fall back on.

    Args:
        grads: the gradient, computed with `create_graph=True` (None entries are skipped).

    Raises:
        RouteUnavailable: the graph holds an `Error` or `DelayedError` node.
    """
    seen: set[int] = set()
    stack = [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ in ("Error", "DelayedError"):
            raise RouteUnavailable("the gradient goes through an operation marked once_differentiable: "
                                   "double backward would silently drop its second-order terms")
        stack.extend(next_node for next_node, _ in node.next_functions)


def gradient(objective: Objective, params: Sequence[torch.Tensor]) -> Vector:
    """The gradient of the objective at the current parameters, by `torch.autograd.grad`.

    It never touches `.grad`. Under data parallelism it is this rank's own gradient (not averaged).

    Args:
        objective: the loss on the current batch.
        params: the parameters to differentiate with respect to.

    Returns:
        One detached tensor per parameter, divided by the objective's loss scale; zeros for a parameter the loss
        does not depend on.

    Raises:
        TypeError: as [`Objective.loss`][eos_core.adapters.torch.Objective.loss].
        ValueError: as [`Objective.loss`][eos_core.adapters.torch.Objective.loss].
    """
    loss = objective.loss()
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    out = _zeros_for_none(grads, params)
    if objective.scale != 1.0:
        out = list(torch._foreach_div(out, objective.scale))
    return [g.detach() for g in out]


class _FunctionalLoss(torch.nn.Module):
    """Lets `torch.func.functional_call` swap the model's parameters while the objective runs."""

    def __init__(self, module: torch.nn.Module, objective: Objective) -> None:
        super().__init__()
        self.module = module
        self._objective = objective

    def forward(self) -> torch.Tensor:
        return self._objective._call() * self._objective.scale


def _functional(objective: Objective, params: Sequence[torch.Tensor], module: torch.nn.Module | None
                ) -> Callable[..., torch.Tensor]:
    if module is None:
        raise ValueError("routes 'jvp-jvp' and 'jvp-grad' need the model: pass model=... to the tuner")
    names = {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError("routes 'jvp-jvp' and 'jvp-grad' need every optimised parameter to belong to `model`")
    keys = ["module." + names[id(p)] for p in params]
    wrapper = _FunctionalLoss(module, objective)

    def f(*tensors: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(wrapper, dict(zip(keys, tensors, strict=True)), ())

    return f


class Oracle:
    """Computes u^T H u and H v by one route (or resolves `auto` on first use and keeps the result).

    Args:
        route: a name from [`eos_core.routes.ALL`][eos_core.routes.ALL].
        module: the model, for the `jvp-*` routes.
        fd_eps: machine epsilon for finite-difference steps; default: the lowest precision the loss
            is computed in, the parameters' dtype or, under autocast, the bf16/fp16 of its results
            (noted while the objective runs; when nothing has run yet, the first finite difference
            evaluates the loss once without a gradient to find out).
        reducer: averages per-rank measurements under data parallelism (default: `space`'s).
        fd_above: `route="auto"` checks one-sided finite differences against the exact route only on models with
            at least this many parameters (default 1: every model; None: never).
        fd_tolerance: the relative agreement, `|fd - exact| <= fd_tolerance |exact|`, at which `auto` switches to
            one-sided finite differences (default 1e-2).
        space: the parameters' [`ParameterSpace`][eos_core.adapters.torch.ParameterSpace] (default: whole
            parameters, averaged by `reducer`). With sharded (FSDP2) parameters only the finite-difference
            routes run (`auto` is `fd-onesided`): gradients come from backward passes through FSDP's hooks.

    Raises:
        ValueError: an unknown route; a `jvp-*` route without `module`; an exact route on sharded parameters.
    """

    def __init__(self, route: str = routes.AUTO, *, module: torch.nn.Module | None = None,
                 fd_eps: float | None = None, reducer: Reducer | None = None,
                 fd_above: int | None = FD_ABOVE, fd_tolerance: float = 1e-2,
                 space: ParameterSpace | None = None) -> None:
        self.route = routes.validate_route(route, owner="CurvatureTuner")
        if route in (routes.JVP_JVP, routes.JVP_GRAD) and module is None:
            raise ValueError(f"route {route!r} needs the model to call it functionally: pass model=... to the tuner")
        self.space = space if space is not None else ParameterSpace((), None if reducer is None else reducer.group)
        if self.space.sharded and route in routes.EXACT:
            raise ValueError(
                f"CurvatureTuner: route {route!r} cannot run on sharded (FSDP2 / DTensor) parameters: it "
                "differentiates the gradient, and FSDP's gradient reduce-scatter is not differentiable; use "
                "route='fd-onesided' (one extra gradient per probe), 'fd-central' (two) or 'auto' (fd-onesided)"
            )
        self.module = module
        self.fd_eps = fd_eps
        self.reducer = reducer or self.space.reducer
        self.fd_above = fd_above
        self.fd_tolerance = float(fd_tolerance)
        self.resolved: str | None = None
        #: (exact value, finite-difference value) of the check that let `auto` switch to fd-onesided
        self.verification: tuple[float, float] | None = None
        #: exact probes measured by `auto` on a large model (checks run at 1, 10, 100, ...); checkpointed
        self.exact_probes = 0
        #: the bf16/fp16 epsilon the objective was last seen computing in (0: fp32 or better; None: unknown)
        self._low_precision_eps: float | None = None

    def restore_route(self, route: str | None) -> None:
        """Keep `route` (a checkpoint's resolved route) for the rest of training.

        A route this oracle cannot run is not kept: an exact route saved by an unsharded run, resumed on sharded
        parameters, resolves again. None (nothing resolved when the checkpoint was saved) changes nothing.

        Args:
            route: the resolved route, with its `+sdpa-math` suffix if any, or None.
        """
        if route is None:
            return
        if self.space.sharded and route.removesuffix(SDPA_MATH) not in (routes.FD_ONESIDED, routes.FD_CENTRAL):
            return
        self.resolved = route

    # -- helpers -------------------------------------------------------------------------------
    def _check_graph(self, grads: Sequence[torch.Tensor | None]) -> None:
        if self.resolved is None:  # once, while the route is being chosen
            check_twice_differentiable(grads)

    def _eps(self, params: Sequence[torch.Tensor], objective: Objective | None = None) -> float:
        """The machine epsilon finite-difference steps are sized for (see `fd_eps`)."""
        if self.fd_eps is not None:
            return float(self.fd_eps)
        eps = max(torch.finfo(p.dtype).eps for p in params if p.is_floating_point())
        if objective is not None:
            observed = objective.low_precision_eps
            if observed is None:
                observed = self._low_precision_eps
            if observed is None:  # nothing has run under this oracle yet: one forward pass to find out
                objective.value()
                observed = objective.low_precision_eps
            self._low_precision_eps = observed
            eps = max(eps, observed or 0.0)
        return eps

    def _candidates(self) -> list[str]:
        if self.resolved is not None:
            return [self.resolved]
        if self.route == routes.AUTO and self.space.sharded:  # only finite differences run through FSDP
            return [routes.FD_ONESIDED]
        if self.route == routes.AUTO:
            return [routes.DOUBLE_BACKWARD, routes.DOUBLE_BACKWARD + SDPA_MATH, routes.FD_ONESIDED]
        if self.route in routes.EXACT:  # the same route, with the one attention kernel that supports it
            return [self.route, self.route + SDPA_MATH]
        return [self.route]

    def _run(self, objective: Objective, attempt: Callable[[str], object]) -> object:
        """Run `attempt(route)` with the resolved route, or resolve the route by trying the candidates.

        While resolving, a candidate that raises an error of `is_route_unavailable` gives way to the
        next one; any other error propagates unchanged (the user's own errors, out of memory).

        Returns:
            What `attempt` returns for the first candidate that works (the route is then resolved to it).

        Raises:
            RouteUnavailable: when no candidate can differentiate the model.
        """
        errors: list[str] = []
        last: BaseException | None = None
        for candidate in self._candidates():
            objective.math_sdpa = candidate.endswith(SDPA_MATH)
            try:
                result = attempt(candidate.removesuffix(SDPA_MATH))
            except Exception as error:
                if self.resolved is not None or not is_route_unavailable(error):
                    raise
                errors.append(f"{candidate}: {str(error).splitlines()[0][:300]}")
                last = error
                continue
            finally:
                objective.math_sdpa = False
            if self.resolved is None:
                self._resolve(candidate, errors)
            return result
        raise RouteUnavailable(f"curvature route {self.route!r} does not work for this model: "
                               + "; ".join(errors)) from last

    def _resolve(self, candidate: str, errors: list[str]) -> None:
        """Keep `candidate` for the rest of training; say so when `auto` had to fall back."""
        self.resolved = candidate
        if errors and self.route == routes.AUTO:
            warnings.warn("eos_core curvature route 'auto' fell back to '" + candidate + "' (" + "; ".join(errors)
                          + ")", RuntimeWarning, stacklevel=5)

    # -- u^T H u --------------------------------------------------------------------------------
    def curvature(self, objective: Objective, params: Sequence[torch.Tensor], u: Sequence[torch.Tensor], *,
                  grad_dot_u: float | None = None, norms: tuple[float, float] | None = None) -> float:
        """The curvature `u^T H u` of the objective at the current parameters, by the oracle's route.

        The first call resolves `auto` (and may warn once that it fell back). On `auto` with an exact route, the
        1st, 10th, 100th, ... exact measurement is also made by one-sided finite differences, and the oracle
        switches to them when the two agree to `fd_tolerance`.

        Args:
            objective: the loss on the current batch.
            params: the parameters `w` (local tensors).
            u: the direction, shaped like `params`.
            grad_dot_u: `g(w) . u` of the step's own (already averaged) gradient; `fd-onesided` reuses it instead
                of computing a second gradient (None: compute `g(w)` again, e.g. when the gradient was clipped).
            norms: `(parameter scale along u, ||u||)` when the caller has them (as `ParameterSpace.scale_along`;
                they set the finite-difference step); None: computed here.

        Returns:
            `u^T H u` as a Python float, averaged over data-parallel ranks; 0 when the finite-difference step is
            0 (a zero or non-finite direction).

        Raises:
            RouteUnavailable: while the route is being resolved, no candidate (`auto`'s chain, or the route asked
                for with and without the math SDPA kernel) can differentiate the model.
        """
        params, u = list(params), list(u)

        def attempt(route: str) -> float:
            if route == routes.DOUBLE_BACKWARD:
                return self.space.mean_measured([self._uhu_double_backward(objective, params, u)])[0]
            if route == routes.JVP_JVP:
                return self.space.mean_measured([self._uhu_jvp_jvp(objective, params, u)])[0]
            if route == routes.JVP_GRAD:
                hu = self._hvp_jvp_grad(objective, params, u)
                return self.space.mean_measured([vec.dot(hu, u)])[0]
            return self._uhu_finite_differences(objective, params, u, route, grad_dot_u, norms)

        value = float(self._run(objective, attempt))
        if self.route == routes.AUTO and self._worth_finite_differences(params):
            self.exact_probes += 1
            if _is_power_of_ten(self.exact_probes):
                self._upgrade_to_finite_differences(objective, params, u, grad_dot_u, value, norms)
        return value

    def _worth_finite_differences(self, params: Sequence[torch.Tensor]) -> bool:
        return (self.fd_above is not None and not self.space.sharded and self.resolved is not None
                and self.resolved != routes.FD_ONESIDED
                and sum(p.numel() for p in params) >= self.fd_above)

    def _upgrade_to_finite_differences(self, objective: Objective, params: Vector, u: Vector,
                                       grad_dot_u: float | None, exact: float,
                                       norms: tuple[float, float] | None) -> None:
        """Keep the one-extra-gradient route when it agrees with the exact value."""
        try:
            approximate = self._uhu_finite_differences(objective, params, u, routes.FD_ONESIDED, grad_dot_u,
                                                       norms)
        except Exception as error:
            if is_route_unavailable(error):  # stay exact; the user's errors and out of memory propagate
                return
            raise
        if math.isfinite(approximate) and abs(approximate - exact) <= self.fd_tolerance * abs(exact):
            self.resolved = routes.FD_ONESIDED
            self.verification = (exact, approximate)

    def _uhu_double_backward(self, objective: Objective, params: Vector, u: Vector) -> float:
        loss = objective.loss()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        self._check_graph(grads)
        terms = [(g * d).sum() for g, d in zip(grads, u, strict=True) if g is not None and g.requires_grad]
        if not terms:
            return 0.0
        hu = torch.autograd.grad(torch.stack(terms).sum(), params, allow_unused=True)
        return vec.dot(_zeros_for_none(hu, params), u) / objective.scale

    def _uhu_jvp_jvp(self, objective: Objective, params: Vector, u: Vector) -> float:
        f = _functional(objective, params, self.module)
        primals = tuple(p.detach() for p in params)
        tangents = tuple(d.detach() for d in u)

        def first_derivative(*ps: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(f, ps, tangents)[1]

        second = objective.call(lambda: torch.func.jvp(first_derivative, primals, tangents)[1])
        value = float(second.detach().to(torch.float64)) / objective.scale
        if self.resolved is None:  # once: PyTorch's forward-over-forward is wrong for some kernels
            reference = vec.dot(self._hvp_jvp_grad(objective, params, u), u)
            eps = max(torch.finfo(p.dtype).eps for p in params)
            if abs(value - reference) > max(1e-5, 1e3 * eps) * max(abs(reference), 1e-30):
                raise RouteUnavailable(
                    f"route 'jvp-jvp' disagrees with forward-over-reverse on this model ({value:.6g} vs "
                    f"{reference:.6g}): PyTorch's forward-over-forward derivatives are wrong for some kernels "
                    "(layer_norm and batch_norm in torch 2.13); use route='jvp-grad' or 'double-backward'"
                )
        return value

    def _hvp_jvp_grad(self, objective: Objective, params: Vector, v: Vector) -> Vector:
        f = _functional(objective, params, self.module)
        grad_f = torch.func.grad(f, argnums=tuple(range(len(params))))
        primals = tuple(p.detach() for p in params)
        tangents = tuple(d.detach() for d in v)
        hv = objective.call(lambda: torch.func.jvp(grad_f, primals, tangents)[1])
        return [h.detach() / objective.scale for h in hv]

    def _uhu_finite_differences(self, objective: Objective, params: Vector, u: Vector, route: str,
                                grad_dot_u: float | None, norms: tuple[float, float] | None = None) -> float:
        central = route == routes.FD_CENTRAL
        space = self.space
        param_scale, direction_norm = norms if norms is not None else space.scale_along(params, u)
        h = finite_difference_step(param_scale, direction_norm, self._eps(params, objective), central=central)
        if h == 0.0:
            return 0.0
        with shifted(params, u, h):
            plus = space.dot(self.gradient(objective, params), u)
        if central:
            with shifted(params, u, -h):
                minus = space.dot(self.gradient(objective, params), u)
            plus, minus = space.mean_measured([plus, minus])
            return (plus - minus) / (2.0 * h)
        if grad_dot_u is None:
            base = space.dot(self.gradient(objective, params), u)
            plus, base = space.mean_measured([plus, base])
        else:
            plus, base = space.mean_measured([plus])[0], grad_dot_u
        return (plus - base) / h

    def gradient(self, objective: Objective, params: Sequence[torch.Tensor]) -> Vector:
        """The objective's gradient at the current parameters, as the finite-difference routes need it.

        Args:
            objective: the loss on the current batch.
            params: the parameters (local tensors).

        Returns:
            One tensor per parameter: for sharded parameters the local shards of the data-parallel mean gradient,
            through FSDP's backward (`Objective.backward_gradient`); else this rank's own gradient by
            `torch.autograd.grad` ([`gradient`][eos_core.adapters.torch.gradient]).
        """
        if self.space.sharded:
            return objective.backward_gradient()
        return gradient(objective, params)

    # -- H v ------------------------------------------------------------------------------------
    def hessian_operator(self, objective: Objective, params: Sequence[torch.Tensor], *,
                         base_grad: Sequence[torch.Tensor] | None = None) -> HessianOperator:
        """A linear operator `v -> H v` at the current parameters, for power iteration and Lanczos.

        Args:
            objective: the loss on the current batch.
            params: the parameters `w` (local tensors).
            base_grad: `g(w)`, already averaged over data-parallel ranks, for one-sided finite differences to
                reuse (None: each product computes it again).

        Returns:
            The operator; use it as a context manager, or call its `release`, to free the double-backward graph.
        """
        return HessianOperator(self, objective, list(params), None if base_grad is None else list(base_grad))


class HessianOperator:
    """The Hessian-vector product `v -> H v` at fixed parameters, by the oracle's route.

    Double backward builds the gradient graph once and reuses it for every product; call `release` (or use the
    operator as a context manager) to free it. Calling the operator on a vector (local tensors shaped like the
    parameters) returns `H v`, averaged over data-parallel ranks; `products` counts the calls.

    Args:
        oracle: the oracle whose route (resolved on the first product when `auto`) computes the products.
        objective: the loss on the current batch.
        params: the parameters `w` (local tensors).
        base_grad: `g(w)` for one-sided finite differences (None: computed for each product).
    """

    def __init__(self, oracle: Oracle, objective: Objective, params: Vector, base_grad: Vector | None) -> None:
        self.oracle = oracle
        self.objective = objective
        self.params = params
        self.base_grad = base_grad
        self._graph: tuple[torch.Tensor, ...] | None = None
        self._graph_key = False
        self.products = 0

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Free the double-backward graph (the next product builds it again)."""
        self._graph = None

    def __call__(self, v: Vector) -> Vector:
        """The product `H v`.

        Args:
            v: a vector of local tensors shaped like the parameters.

        Returns:
            `H v` (divided by the objective's loss scale), averaged over data-parallel ranks; zeros when the
            finite-difference step is 0.

        Raises:
            RouteUnavailable: while the route is being resolved, no candidate (`auto`'s chain, or the route asked
                for with and without the math SDPA kernel) can differentiate the model.
        """
        self.products += 1
        return self.oracle._run(self.objective, lambda route: self._apply(route, list(v)))  # type: ignore[return-value]

    def _apply(self, route: str, v: Vector) -> Vector:
        oracle, objective, params = self.oracle, self.objective, self.params
        space = oracle.space
        if route == routes.DOUBLE_BACKWARD:
            return space.mean_measured_tensors(self._double_backward(v))
        if route == routes.JVP_GRAD or route == routes.JVP_JVP:  # H v itself is forward-over-reverse
            return space.mean_measured_tensors(oracle._hvp_jvp_grad(objective, params, v))
        central = route == routes.FD_CENTRAL
        h = finite_difference_step(*space.scale_along(params, v), oracle._eps(params, objective), central=central)
        if h == 0.0:
            return [torch.zeros_like(p) for p in params]
        with shifted(params, v, h):
            plus = space.mean_measured_tensors(oracle.gradient(objective, params))
        if central:
            with shifted(params, v, -h):
                minus = space.mean_measured_tensors(oracle.gradient(objective, params))
            return list(torch._foreach_div(torch._foreach_sub(plus, minus), 2.0 * h))
        base = self.base_grad
        if base is None:
            base = space.mean_measured_tensors(oracle.gradient(objective, params))
        return list(torch._foreach_div(torch._foreach_sub(plus, list(base)), h))

    def _double_backward(self, v: Vector) -> Vector:
        objective, params = self.objective, self.params
        key = objective.math_sdpa
        try:
            if self._graph is None or self._graph_key != key:
                self._graph_key = key
                loss = objective.loss()
                self._graph = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                self.oracle._check_graph(self._graph)
            pairs = [(g, d) for g, d in zip(self._graph, v, strict=True) if g is not None and g.requires_grad]
            if not pairs:
                return [torch.zeros_like(p) for p in params]
            hv = torch.autograd.grad([g for g, _ in pairs], params, grad_outputs=[d for _, d in pairs],
                                     retain_graph=True, allow_unused=True)
        except Exception:
            self._graph = None
            raise
        return [h.detach() / objective.scale for h in _zeros_for_none(hv, params)]
