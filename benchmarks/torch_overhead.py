"""Cost of curvature-aware tuning in PyTorch: tuned step / plain step, peak memory, route accuracy.

For each model (an MLP, a ResNet-18-style CNN with GroupNorm, GPT-2 built from a config) and each
curvature route, this times the tuned step (``CurvatureTuner`` + ``CDAT(scale=2)``) against the plain
step of the same optimizer in the same process, for ``probe_every`` in {1, 10}, measures the peak
memory of both, compares each route's u^T H u with the exact double-backward value at the same
point, and measures the cost of sharpness tracking (warm-started power iteration every
``--track-every`` steps) as a fraction of training time. Ratios are the figures that matter (SPEC
section 9): tuned / plain <= 2.1 probing every step, <= 1.12 every 10 steps, memory <= 1.3x,
tracking <= 5% of training time. CPU figures are for regressions; absolute times only count on a GPU.

``--monitor`` measures the sharpness monitor instead (``CurvatureTuner(optimizer, None, monitor_budget=0.05)``,
monitoring only) with plain SGD and Adam on every model: the time per step of the monitored run over a plain step
(``optimizer.step``, no tuner) in the same process, in alternating blocks of whole monitoring periods (plain, tuner
without monitor, monitored; the order rotates between repeats), the median over the repeats of each repeat's ratio,
for the wall time and for the process's CPU time (robust to other jobs on a shared CPU); the target is 1.05. The
interval between two blocks is not a training step: the monitor's step clock is restarted at each block (see
:func:`measure_monitor`). Before each monitored block, lambda_max (and for Adam the preconditioned lambda_max) is
computed to convergence at the run's weights and compared with the monitor's reading after the block's first step:
the tracking error of the row (``--no-monitor-reference`` skips it).

Peak memory of a configuration = the highest memory in use during one (probe) step after warm-up,
minus the memory in use before its model was built: parameters, gradients, optimizer state and the
step's transients. On a GPU it comes from ``torch.cuda.max_memory_allocated``; on CPU (Linux, glibc)
from the process's resident-set high-water mark (``VmHWM`` in /proc/self/status, reset through
/proc/self/clear_refs) over a step during which blocks above 128 kB are served by mmap and returned on
free (``mallopt(M_MMAP_THRESHOLD)``; ``malloc_trim`` before each reading), so the resident set follows
the tensors in use; every code path runs once first (:func:`prime`) so that library pages faulted in by
a first call are not charged to a configuration. CPU figures agree with a count of the tensors alive
to within allocator slack (small models: a few MiB). Elsewhere, or with ``--no-cpu-memory``, CPU
memory is not reported.

    python benchmarks/torch_overhead.py                     # small models on CPU, fp32 (5-10 minutes)
    python benchmarks/torch_overhead.py --track-every 100 --json torch_cpu.json        # + tracking cost
    python benchmarks/torch_overhead.py --device cuda --size paper --dtypes fp32,bf16 --track-every 100 \
        --json torch_gpu.json                                                          # SPEC sizes, GPU
    python benchmarks/torch_overhead.py --models mlp --steps 2 --warmup 1              # smoke run
    python benchmarks/torch_overhead.py --monitor 0.05 --json torch_monitor.json       # monitor overhead (CPU)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from eos_core import CDAT
from eos_core.adapters.torch import CurvatureTuner, Objective, Oracle
from eos_core.adapters.torch import vector_ops as vec

ROUTES = ("auto", "double-backward", "jvp-jvp", "jvp-grad", "fd-central", "fd-onesided")
TARGETS = {"every_step": 2.1, "every_10": 1.12, "memory": 1.3, "tracking": 0.05, "monitor": 1.05}
#: the bases of the monitor's overhead rows (``--monitor``): plain SGD and Adam, whatever the model's own optimizer
MONITOR_BASES: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
}


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
class BasicBlock(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = torch.nn.GroupNorm(8, cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = torch.nn.GroupNorm(8, cout)
        self.skip = torch.nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            torch.nn.GroupNorm(8, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(y)) + self.skip(x))


class ResNet18(torch.nn.Module):
    """ResNet-18 for 32x32 inputs with GroupNorm (BatchNorm has no per-sample Hessian semantics)."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, 1, 1, bias=False), torch.nn.GroupNorm(8, width),
                                        torch.nn.ReLU())
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))


@dataclass
class Workload:
    name: str
    model: torch.nn.Module
    loss: Callable[[torch.nn.Module], torch.Tensor]
    optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def workloads(names: list[str], size: str, device: torch.device) -> list[Workload]:
    paper, tiny = size == "paper", size == "tiny"
    out = []
    g = torch.Generator(device="cpu").manual_seed(0)
    if "mlp" in names:
        batch, hidden = (4096, 1024) if paper else (16, 8) if tiny else (512, 256)
        x = torch.randn(batch, 784, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        model = torch.nn.Sequential(torch.nn.Linear(784, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                    torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
        out.append(Workload(f"MLP 784-{hidden}-{hidden}-10 ({batch})", model,
                            lambda m, x=x, y=y: torch.nn.functional.cross_entropy(m(x), y),
                            lambda p: torch.optim.SGD(p, lr=0.1)))
    if "cnn" in names:
        batch, width = (256, 64) if paper else (2, 8) if tiny else (32, 16)
        x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        out.append(Workload(f"ResNet-18 GroupNorm w{width} ({batch}x3x32x32)", ResNet18(width),
                            lambda m, x=x, y=y: torch.nn.functional.cross_entropy(m(x), y),
                            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)))
    if "gpt2" in names:
        try:
            import transformers
        except ImportError:
            print("gpt2 skipped: transformers is not installed", file=sys.stderr)
        else:
            if paper:
                config = transformers.GPT2Config(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
                batch, length = 8, 512
            elif tiny:
                config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                                                 attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                                 bos_token_id=0, eos_token_id=0)
                batch, length = 2, 8
            else:
                config = transformers.GPT2Config(vocab_size=512, n_positions=128, n_embd=128, n_layer=2, n_head=4,
                                                 attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                                 bos_token_id=0, eos_token_id=0)
                batch, length = 4, 128
            config._attn_implementation = "sdpa"
            ids = torch.randint(0, config.vocab_size, (batch, length), generator=g).to(device)
            model = transformers.GPT2LMHeadModel(config)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            out.append(Workload(f"GPT-2 {params:.3g}M SDPA ({batch}x{length})", model,
                                lambda m, ids=ids: m(input_ids=ids, labels=ids).loss,
                                lambda p: torch.optim.AdamW(p, lr=1e-4)))
    return out


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    model: str
    dtype: str
    route: str
    probe_every: int
    time_ratio: float
    memory_ratio: float | None
    curvature_rel_error: float | None
    curvature_scaled_error: float | None = None
    resolved_route: str = ""
    note: str = ""


@dataclass
class MonitorRow:
    """The monitor's overhead on one model and base (``--monitor``)."""

    model: str
    base: str
    budget: float
    every: int  #: the monitor's spacing k (steps between ticks) after warm-up
    exact: bool  #: the monitor's products are exact (finite differences disagreed at the check)
    cost: float  #: one product in plain training steps, as the monitor measured it
    block: int  #: steps per timed block (a multiple of k)
    repeats: int
    plain_ms: float  #: median plain step
    ratio: float  #: median over the repeats of (monitored block wall time / plain block wall time)
    ratio_spread: tuple[float, float]  #: min and max of the repeats' ratios
    tuner_ratio: float  #: the same for the tuner without the monitor (its fixed per-step cost)
    cpu_ratio: float  #: ``ratio`` for the process's CPU time (robust to other jobs on a shared CPU)
    cpu_ratio_spread: tuple[float, float]
    cpu_tuner_ratio: float
    plain_cpu_ms: float  #: median plain step, CPU time
    products_per_step: float  #: Hessian-vector products per timed step (checks and both operators included)
    final_loss: float
    #: median |tracked - exact| / exact of sharpness at the start of each timed monitored block (NaN: not measured)
    tracking_error: float = math.nan
    #: the same for preconditioned_sharpness (Adam)
    preconditioned_tracking_error: float = math.nan
    #: (step, exact, tracked, age) at each reference, then the preconditioned (exact, tracked) for Adam
    references: list[list[float]] = field(default_factory=list)


@dataclass
class Report:
    device: str
    torch: str
    rows: list[Row] = field(default_factory=list)
    plain_ms: dict[str, float] = field(default_factory=dict)
    tracking: dict[str, float] = field(default_factory=dict)
    monitor: list[MonitorRow] = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def make_step(work: Workload, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dtype: str,
              device: torch.device, tuner: CurvatureTuner | None) -> Callable[[], None]:
    autocast = dtype == "bf16"

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = work.loss(model)
        loss.backward()
        return loss

    def step() -> None:
        (tuner or optimizer).step(closure)

    return step


class MemoryMeter:
    """Bytes in use now and the peak since :meth:`reset`: CUDA allocator statistics on a GPU, the resident
    set (current and high-water mark) of this process on Linux CPUs; ``available`` is False elsewhere."""

    def __init__(self, device: torch.device, *, cpu: bool = True) -> None:
        self.device = device
        self._libc = None
        if device.type == "cuda":
            self.available = True
            return
        if not cpu:
            self.available = False
            return
        try:
            import ctypes

            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._libc = ctypes.CDLL("libc.so.6")
            self.available = self._status("VmHWM") is not None and self._mmap_threshold(self.HEAP_THRESHOLD)
        except (OSError, AttributeError):
            self.available = False

    #: glibc's M_MMAP_THRESHOLD while a step's memory is measured / otherwise (setting it turns glibc's
    #: adaptive threshold off; 32 MiB is the adaptive threshold's ceiling, so timed steps reuse heap
    #: blocks the way they do by default instead of paying page faults for every large tensor)
    MEASURE_THRESHOLD, HEAP_THRESHOLD = 128 * 1024, 32 * 1024 * 1024

    def _mmap_threshold(self, size: int) -> bool:
        return self._libc is not None and bool(self._libc.mallopt(-3, size))  # -3: M_MMAP_THRESHOLD

    @staticmethod
    def _status(field: str) -> int | None:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return None

    def _settle(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            synchronize(self.device)
        elif self._libc is not None:
            self._libc.malloc_trim(0)  # give freed memory back, so the resident set is what is in use

    def current(self) -> float:
        self._settle()
        if self.device.type == "cuda":
            return float(torch.cuda.memory_allocated(self.device))
        return float(self._status("VmRSS") or 0)

    def reset(self) -> None:
        """Start measuring a peak. On CPU, blocks above 128 kB are then served by mmap and returned on free,
        so the resident set follows the tensors in use instead of the heap's history."""
        if self.device.type != "cuda":
            self._mmap_threshold(self.MEASURE_THRESHOLD)
        self._settle()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> float:
        """The peak since :meth:`reset` (and, on CPU, back to the allocator settings of the timed steps)."""
        if self.device.type == "cuda":
            synchronize(self.device)
            return float(torch.cuda.max_memory_allocated(self.device))
        value = float(self._status("VmHWM") or 0)
        self._mmap_threshold(self.HEAP_THRESHOLD)
        return value


def peak_memory(step: Callable[[], None], meter: MemoryMeter, before: float) -> float | None:
    """Peak memory of one step above ``before`` (the memory in use before the configuration's model existed)."""
    if not meter.available:
        return None
    meter.reset()
    step()
    return max(meter.peak() - before, 0.0)


def curvature_error(work: Workload, point: torch.nn.Module, route: str, dtype: str, device: torch.device,
                    reference: dict[str, float]) -> tuple[float, float] | None:
    """Error of the route's u^T H u against exact double backward (math SDPA kernel) at the same point.

    The point is the model after the plain run's steps (not the initialisation, where the curvature
    along the gradient of a transformer is close to 0 and relative errors say little), the direction
    the gradient-descent one, u = -g. Returns ``(|d - d_exact| / |d_exact|, |d - d_exact| / (||u|| ||H u||))``:
    the second is the error on the scale of the curvature along u (|u^T H u| <= ||u|| ||H u||), which stays
    meaningful when u^T H u itself nearly cancels.
    """
    model = copy.deepcopy(point)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = dtype == "bf16"

    def loss_fn() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return work.loss(model)

    objective = Objective(loss_fn, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads = [t.detach() for t in torch.autograd.grad(objective.loss(), params)]
        u = [-g for g in grads]
        if "exact" not in reference:
            objective.math_sdpa = True
            with Oracle("double-backward").hessian_operator(objective, params) as hessian:
                hu = hessian(u)
            objective.math_sdpa = False
            reference["exact"] = vec.dot(u, hu)
            reference["scale"] = vec.norm(u) * vec.norm(hu)
        try:
            value = Oracle(route, module=model).curvature(objective, params, u, grad_dot_u=vec.dot(grads, u))
        except Exception:  # noqa: BLE001 - a route that cannot run on this model is reported as such
            return None
    error = abs(value - reference["exact"])
    return error / abs(reference["exact"]), error / reference["scale"]


def prime(work: Workload, base: torch.nn.Module, dtype: str, device: torch.device, route_names: list[str]) -> None:
    """Run every code path once on a throwaway copy, so that one-off allocations of a first call (library
    pages faulted into the resident set on CPU, cuBLAS/cuDNN workspaces on a GPU) are not charged to
    whichever configuration happens to run first."""
    for route in (None, *route_names):
        model = copy.deepcopy(base)
        optimizer = work.optimizer(list(model.parameters()))
        tuner = None if route is None else CurvatureTuner(optimizer, CDAT(scale=2.0), route=route, model=model)
        step = make_step(work, model, optimizer, dtype, device, tuner)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                step()
                step()
            except Exception:  # noqa: BLE001, S110 - a route that cannot run here is reported by the measurement
                pass
        if tuner is not None:
            tuner.detach()


def run_model(work: Workload, args: argparse.Namespace, device: torch.device, report: Report) -> None:
    meter = MemoryMeter(device, cpu=args.cpu_memory)
    for dtype in args.dtypes:
        torch.manual_seed(0)
        base = copy.deepcopy(work.model).to(device)
        label = f"{work.name} {dtype}"

        if meter.available:
            prime(work, base, dtype, device, args.routes)
        before = meter.current()
        model = copy.deepcopy(base)
        optimizer = work.optimizer(list(model.parameters()))
        plain = make_step(work, model, optimizer, dtype, device, None)
        plain_times = timed_steps(plain, device, args.warmup, args.steps)
        plain_median = statistics.median(plain_times)
        plain_mean = statistics.fmean(plain_times)
        plain_memory = peak_memory(plain, meter, before)
        trained = copy.deepcopy(model)  # the point where route accuracy is measured
        del model, optimizer, plain
        report.plain_ms[label] = plain_median * 1e3
        print(f"\n{label}: plain step {plain_median * 1e3:.1f} ms"
              + (f", peak {plain_memory / 2**20:.0f} MiB" if plain_memory else ""), flush=True)
        reference: dict[str, float] = {}
        for route in args.routes:
            errors = curvature_error(work, trained, route, dtype, device, reference)
            error, scaled_error = errors if errors is not None else (None, None)
            for probe_every in args.probe_every:
                model = optimizer = tuner = tuned = None  # free the previous configuration before measuring
                before = meter.current()
                model = copy.deepcopy(base)
                optimizer = work.optimizer(list(model.parameters()))
                tuner = CurvatureTuner(optimizer, CDAT(scale=2.0), route=route, probe_every=probe_every,
                                       model=model)
                tuned = make_step(work, model, optimizer, dtype, device, tuner)
                note = ""
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        times = timed_steps(tuned, device, args.warmup, max(args.steps, 2 * probe_every))
                        memory = peak_memory(tuned, meter, before) if probe_every == 1 else None
                except Exception as exc:  # noqa: BLE001 - report routes that cannot run here
                    note = f"fails: {str(exc).splitlines()[0][:80]}"
                    row = Row(work.name, dtype, route, probe_every, math.nan, None, error, scaled_error, note=note)
                    report.rows.append(row)
                    print(f"  {route:16s} probe_every={probe_every:<3d} {note}", flush=True)
                    continue
                finally:
                    tuner.detach()
                # every step: median vs median; amortised: mean over whole probe cycles vs mean
                ratio = (statistics.median(times) / plain_median if probe_every == 1
                         else statistics.fmean(times) / plain_mean)
                memory_ratio = memory / plain_memory if memory and plain_memory else None
                row = Row(work.name, dtype, route, probe_every, ratio, memory_ratio, error, scaled_error, tuner.route,
                          note)
                report.rows.append(row)
                target = TARGETS["every_step"] if probe_every == 1 else TARGETS["every_10"]
                flag = "ok" if ratio <= target else "over"
                print(f"  {route:16s} probe_every={probe_every:<3d} time x{ratio:5.2f} ({flag} vs {target})"
                      + (f"  memory x{memory_ratio:4.2f}" if memory_ratio else "")
                      + (f"  |d - d_exact|/|d_exact| {error:.1e} (/(|u||Hu|) {scaled_error:.1e})"
                         if error is not None else "")
                      + f"  [{tuner.route}]", flush=True)
        if args.track_every:
            report.tracking[label] = measure_tracking(work, base, dtype, device, args)


def measure_tracking(work: Workload, base: torch.nn.Module, dtype: str, device: torch.device,
                     args: argparse.Namespace) -> float:
    """Extra time of sharpness tracking every m steps (warm-started power iteration), as a fraction.

    Steady state: the first measurement (a cold start from a random vector, up to ``sharpness_iters``
    iterations) happens in the untimed warm-up; the timed ``2 m`` steps hold two warm-started ones.
    """
    m = args.track_every
    results = {}
    iterations: list[float] = []
    for tracked in (False, True):
        model = copy.deepcopy(base)
        optimizer = work.optimizer(list(model.parameters()))
        tuner = CurvatureTuner(optimizer, None, sharpness_every=m, model=model) if tracked else None
        step = make_step(work, model, optimizer, dtype, device, tuner)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(args.warmup + m):  # includes the cold-started measurement at step 0
                step()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(2 * m):  # two warm-started measurements
                step()
                if tuner is not None and math.isfinite(tuner.diagnostics["power_iterations"]):  # NaN: not tracked
                    iterations.append(tuner.diagnostics["power_iterations"])
            synchronize(device)
            results[tracked] = time.perf_counter() - start
        if tuner is not None:
            tuner.detach()
    fraction = results[True] / results[False] - 1.0
    print(f"  sharpness tracking every {m} steps: +{100 * fraction:.1f}% of training time "
          f"({'ok' if fraction <= TARGETS['tracking'] else 'over'} vs {100 * TARGETS['tracking']:.0f}%), "
          f"warm-started power iterations per measurement: {', '.join(f'{i:.0f}' for i in iterations)}", flush=True)
    return fraction


def measure_monitor(work: Workload, base: torch.nn.Module, device: torch.device, args: argparse.Namespace
                    ) -> list[MonitorRow]:
    """Time per step of monitoring only (``CurvatureTuner(opt, None, monitor_budget=b)``) over a plain step.

    Three runs from the same weights (plain optimizer, tuner without monitor, monitored tuner) are warmed up
    past the monitor's cold start and first checks (``--monitor-warmup`` periods of k steps), then timed in
    alternating blocks of whole periods (``block`` = k times enough periods to last ``--monitor-block`` steps),
    the order rotating between ``--monitor-repeats`` repeats; each repeat gives a ratio (monitored block time /
    plain block time, taken minutes apart at most), and the row reports their median, for the wall time and for
    the process's CPU time. On a CPU shared with other jobs the wall time mostly measures the scheduler; the CPU
    time of a single-threaded run (``OMP_NUM_THREADS=1``) is what the step costs on an idle core (on a GPU only
    the wall time means something). The monitor measures the training step as the interval between two optimizer
    steps: the gap between two of its blocks (the other runs' blocks) is not a training step, so its step clock
    restarts at each block (``_last_start``: without it, the interval holding the other blocks enters its EMA of the
    step time, its cost estimate drops and it ticks more often than in training: 44% more products on the MLP with
    blocks of 150 steps between pauses of two blocks).
    """
    rows = []
    budget = args.monitor
    for base_name in args.monitor_bases:
        runs: dict[str, tuple[Callable[[], None], CurvatureTuner | None]] = {}
        for variant in ("plain", "tuner", "monitor"):
            torch.manual_seed(0)
            model = copy.deepcopy(base)
            optimizer = MONITOR_BASES[base_name](list(model.parameters()))
            tuner = None
            if variant == "tuner":
                tuner = CurvatureTuner(optimizer, None, model=model)
            elif variant == "monitor":
                tuner = CurvatureTuner(optimizer, None, monitor_budget=budget, model=model)
            runs[variant] = (make_step(work, model, optimizer, "fp32", device, tuner), tuner)
        monitored = runs["monitor"][1]
        losses: list[float] = []

        readings: list[tuple[float, float, float]] = []

        def run_block(variant: str, steps: int, runs: dict = runs, readings: list = readings) -> tuple[float, float]:
            step, tuner = runs[variant]
            if tuner is not None and tuner.monitor is not None:
                tuner.monitor._last_start = None  # the other runs' blocks are not a training step
            synchronize(device)
            start, cpu = time.perf_counter(), time.process_time()
            for i in range(steps):
                step()
                if i == 0 and variant == "monitor":
                    d = tuner.diagnostics
                    readings.append((d["sharpness"], d["sharpness_age"], d["preconditioned_sharpness"]))
            synchronize(device)
            return time.perf_counter() - start, time.process_time() - cpu

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for variant in runs:
                run_block(variant, args.warmup)
            while True:  # past the cold start, the first checks and k's settling
                run_block("monitor", 1)
                every = int(monitored.diagnostics["monitor_every"])
                if monitored.calls >= args.warmup + args.monitor_warmup * every:
                    break
            every = int(monitored.diagnostics["monitor_every"])
            block = every * max(1, math.ceil(args.monitor_block / every))
            walls: dict[str, list[float]] = {variant: [] for variant in runs}
            cpus: dict[str, list[float]] = {variant: [] for variant in runs}
            products_before = sum(int(t.products) for t in monitored.monitor.trackers if t is not None)
            variants = list(runs)
            references: list[list[float]] = []
            for repeat in range(args.monitor_repeats):
                for variant in variants[repeat % 3:] + variants[: repeat % 3]:
                    reference = exact_references(monitored, work) if variant == "monitor" and args.reference else None
                    wall, cpu = run_block(variant, block)
                    walls[variant].append(wall)
                    cpus[variant].append(cpu)
                    if reference is not None:  # the reading after the block's first step, at the reference's point
                        references.append([monitored.calls - block, *reference])
                losses.append(float(monitored.diagnostics.get("loss", math.nan)))
            products = sum(int(t.products) for t in monitored.monitor.trackers if t is not None) - products_before

        def median_ratio(times: dict[str, list[float]], variant: str) -> tuple[float, list[float]]:
            ratios = [a / b for a, b in zip(times[variant], times["plain"], strict=True)]
            return statistics.median(ratios), ratios

        if references:  # readings[-len(references):] are the first steps of the timed monitored blocks
            for reference, (tracked, age, tracked_pre) in zip(references, readings[-len(references):], strict=True):
                reference[2:2] = [tracked, age]
                reference.append(tracked_pre)
        errors = [abs(r[2] - r[1]) / abs(r[1]) for r in references if r[1]]
        pre_errors = [abs(r[5] - r[4]) / abs(r[4]) for r in references if math.isfinite(r[4]) and r[4]]
        ratio, ratios = median_ratio(walls, "monitor")
        cpu_ratio, cpu_ratios = median_ratio(cpus, "monitor")
        cost = monitored.monitor.budget.cost
        row = MonitorRow(model=work.name, base=base_name, budget=budget, every=every,
                         exact=bool(monitored.monitor.exact), cost=math.nan if cost is None else cost, block=block,
                         repeats=args.monitor_repeats, plain_ms=statistics.median(walls["plain"]) / block * 1e3,
                         ratio=ratio, ratio_spread=(min(ratios), max(ratios)),
                         tuner_ratio=median_ratio(walls, "tuner")[0], cpu_ratio=cpu_ratio,
                         cpu_ratio_spread=(min(cpu_ratios), max(cpu_ratios)),
                         cpu_tuner_ratio=median_ratio(cpus, "tuner")[0],
                         plain_cpu_ms=statistics.median(cpus["plain"]) / block * 1e3,
                         products_per_step=products / (block * args.monitor_repeats), final_loss=losses[-1],
                         tracking_error=statistics.median(errors) if errors else math.nan,
                         preconditioned_tracking_error=statistics.median(pre_errors) if pre_errors else math.nan,
                         references=references)
        rows.append(row)
        target = TARGETS["monitor"]
        print(f"  monitor_budget={budget} {base_name:4s}: CPU time x{row.cpu_ratio:.3f} "
              f"({'ok' if row.cpu_ratio <= target else 'over'} vs {target}; repeats {row.cpu_ratio_spread[0]:.3f}-"
              f"{row.cpu_ratio_spread[1]:.3f}; tuner alone x{row.cpu_tuner_ratio:.3f}), wall time x{row.ratio:.3f} "
              f"(repeats {row.ratio_spread[0]:.3f}-{row.ratio_spread[1]:.3f}; tuner alone x{row.tuner_ratio:.3f}); "
              f"k={every}, {'exact' if row.exact else 'fd'} products of {row.cost:.2f} steps, "
              f"{row.products_per_step:.4f} products/step, blocks of {block} x {args.monitor_repeats}, plain "
              f"{row.plain_ms:.2f} ms ({row.plain_cpu_ms:.2f} ms CPU)", flush=True)
        if references:
            print(f"    tracking error (median over {len(references)} references, steps {references[0][0]:.0f}-"
                  f"{references[-1][0]:.0f}): sharpness {row.tracking_error:.3f}"
                  + (f", preconditioned {row.preconditioned_tracking_error:.3f}" if pre_errors else "")
                  + f"; exact / tracked: {', '.join(f'{r[1]:.4g}/{r[2]:.4g}' for r in references)}", flush=True)
        for _, tuner in runs.values():
            if tuner is not None:
                tuner.detach()
    return rows


def exact_references(tuner: CurvatureTuner, work: Workload) -> list[float]:
    """``[lambda_max(H), lambda_max(P^{-1/2} H P^{-1/2})]`` at the tuner's current weights, to convergence (the
    second NaN without a preconditioner): ARPACK to a relative 1e-5 on float32 double-backward products (the workload's
    data is float32; ``_monitor_common.ExactTop``)."""
    from _monitor_common import ExactTop, Setup

    setup = Setup(work.name, tuner.model, tuner.optimizer, lambda _: None, lambda m, _: work.loss(m), True)
    exact = ExactTop(setup, tol=1e-5, dtype=torch.float32)
    plain = exact(None)
    preconditioned = (exact(None, preconditioned=True, key="p")
                      if isinstance(tuner.optimizer, torch.optim.Adam) else math.nan)
    if tuner.monitor is not None:
        tuner.monitor._last_start = None  # this was not a training step
    return [plain, preconditioned]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=("small", "paper", "tiny"), default="small",
                        help="small: CPU-sized models; paper: the SPEC section 4 sizes (GPU); tiny: smoke tests")
    parser.add_argument("--models", default="mlp,cnn,gpt2", help="comma-separated subset of mlp,cnn,gpt2")
    parser.add_argument("--routes", default=",".join(ROUTES), help="comma-separated routes")
    parser.add_argument("--probe-every", default="1,10", help="comma-separated probe_every values")
    parser.add_argument("--dtypes", default="fp32", help="comma-separated fp32,bf16 (bf16 = autocast)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--track-every", type=int, default=0, help="also measure sharpness tracking every m steps")
    parser.add_argument("--monitor", type=float, nargs="?", const=0.05, default=None, metavar="BUDGET",
                        help="measure the sharpness monitor's overhead at this monitor_budget (default 0.05) "
                             "instead of the routes")
    parser.add_argument("--monitor-bases", default="sgd,adam", help="comma-separated subset of sgd,adam")
    parser.add_argument("--monitor-block", type=int, default=300,
                        help="steps per timed block (rounded up to whole monitoring periods)")
    parser.add_argument("--monitor-repeats", type=int, default=7, help="timed blocks per run")
    parser.add_argument("--monitor-warmup", type=int, default=3, help="monitoring periods of warm-up")
    parser.add_argument("--no-monitor-reference", dest="reference", action="store_false",
                        help="skip the tracking error (lambda_max to convergence before each monitored block)")
    parser.add_argument("--no-cpu-memory", dest="cpu_memory", action="store_false",
                        help="on CPU, do not measure memory (leaves glibc's allocator settings alone)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no GPU is available")
        args.routes = [r for r in args.routes.split(",") if r]
        unknown = set(args.routes) - set(ROUTES)
        if unknown:
            parser.error(f"unknown route(s): {', '.join(sorted(unknown))}")
        args.probe_every = [int(v) for v in args.probe_every.split(",")]
        args.dtypes = args.dtypes.split(",")
        if set(args.dtypes) - {"fp32", "bf16"}:
            parser.error("--dtypes takes fp32 and/or bf16")
        args.monitor_bases = [b for b in args.monitor_bases.split(",") if b]
        if set(args.monitor_bases) - set(MONITOR_BASES):
            parser.error("--monitor-bases takes sgd and/or adam")
        names = args.models.split(",")
        if set(names) - {"mlp", "cnn", "gpt2"}:
            parser.error("--models takes mlp, cnn and/or gpt2")
    except ValueError as error:
        parser.error(str(error))
    report = Report(device=str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
                    torch=torch.__version__)
    print(f"device {report.device}, torch {report.torch}; targets: every step <= {TARGETS['every_step']}x, "
          f"every 10 <= {TARGETS['every_10']}x, memory <= {TARGETS['memory']}x")
    for work in workloads(names, args.size, device):
        if args.monitor is not None:
            print(f"\n{work.name}", flush=True)
            torch.manual_seed(0)
            report.monitor.extend(measure_monitor(work, copy.deepcopy(work.model).to(device), device, args))
        else:
            run_model(work, args, device, report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(report), f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
