"""Cost of curvature-aware tuning in PyTorch: tuned step / plain step, peak memory, route accuracy.

For each model (an MLP, a ResNet-18-style CNN with GroupNorm, GPT-2 built from a config) and each
curvature route, this times the tuned step (``CurvatureTuner`` + ``CDAT(scale=2)``) against the plain
step of the same optimizer in the same process, for ``probe_every`` in {1, 10}, measures the peak
memory of both, compares each route's u^T H u with the exact double-backward value at the same
point, and measures the cost of sharpness tracking (warm-started power iteration every
``--track-every`` steps) as a fraction of training time. Ratios are the figures that matter (SPEC
section 9): tuned / plain <= 2.1 probing every step, <= 1.12 every 10 steps, memory <= 1.3x,
tracking <= 5% of training time. CPU figures are for regressions; absolute times only count on a GPU.

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
TARGETS = {"every_step": 2.1, "every_10": 1.12, "memory": 1.3, "tracking": 0.05}


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
    paper = size == "paper"
    out = []
    g = torch.Generator(device="cpu").manual_seed(0)
    if "mlp" in names:
        batch, hidden = (4096, 1024) if paper else (512, 256)
        x = torch.randn(batch, 784, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        model = torch.nn.Sequential(torch.nn.Linear(784, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                    torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
        out.append(Workload(f"MLP 784-{hidden}-{hidden}-10 ({batch})", model,
                            lambda m, x=x, y=y: torch.nn.functional.cross_entropy(m(x), y),
                            lambda p: torch.optim.SGD(p, lr=0.1)))
    if "cnn" in names:
        batch, width = (256, 64) if paper else (32, 16)
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
class Report:
    device: str
    torch: str
    rows: list[Row] = field(default_factory=list)
    plain_ms: dict[str, float] = field(default_factory=dict)
    tracking: dict[str, float] = field(default_factory=dict)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=("small", "paper"), default="small",
                        help="small: CPU-sized models; paper: the SPEC section 4 sizes (GPU)")
    parser.add_argument("--models", default="mlp,cnn,gpt2", help="comma-separated subset of mlp,cnn,gpt2")
    parser.add_argument("--routes", default=",".join(ROUTES), help="comma-separated routes")
    parser.add_argument("--probe-every", default="1,10", help="comma-separated probe_every values")
    parser.add_argument("--dtypes", default="fp32", help="comma-separated fp32,bf16 (bf16 = autocast)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--track-every", type=int, default=0, help="also measure sharpness tracking every m steps")
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
        run_model(work, args, device, report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(report), f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
