"""Cost of curvature-aware tuning in PyTorch: tuned step / plain step, peak memory, route accuracy.

For each model (an MLP, a ResNet-18-style CNN with GroupNorm, GPT-2 built from a config) and each
curvature route, this times the tuned step (`CurvatureTuner` + `CDAT(scale=2)`) against the plain
step of the same optimizer in the same process, for `probe_every` in {1, 10}, measures the peak
memory of both, compares each route's u^T H u with the exact double-backward value at the same
point, and measures the cost of sharpness tracking (warm-started power iteration every
`--track-every` steps) as a fraction of training time. Ratios are the figures that matter; the targets
(`TARGETS`): tuned / plain <= 2.1 probing every step, <= 1.12 every 10 steps, memory <= 1.3x,
tracking <= 5% of training time. CPU figures are for regressions; absolute times only count on a GPU.

`--monitor` measures the sharpness monitor instead (`CurvatureTuner(optimizer, None, monitor_budget=0.05)`,
monitoring only) with plain SGD and Adam on every model: the time per step of the monitored run over a plain step
(`optimizer.step`, no tuner) in the same process, in alternating blocks of whole monitoring periods (plain, tuner
without monitor, monitored; the order rotates between repeats), the median over the repeats of each repeat's ratio,
for the wall time and for the process's CPU time (robust to other jobs on a shared CPU); the target is 1.05. The
interval between two blocks is not a training step: the monitor's step clock is restarted at each block (see
`measure_monitor`). Before each monitored block, lambda_max (and for Adam the preconditioned lambda_max) is
computed to convergence at the run's weights and compared with the monitor's reading after the block's first step:
the tracking error of the row (`--no-monitor-reference` skips it).

Peak memory of a configuration = the highest memory in use during one (probe) step after warm-up,
minus the memory in use before its model was built: parameters, gradients, optimizer state and the
step's transients. On a GPU it comes from `torch.cuda.max_memory_allocated`; on CPU (Linux, glibc)
from the process's resident-set high-water mark (`VmHWM` in /proc/self/status, reset through
/proc/self/clear_refs) over a step during which blocks above 128 kB are served by mmap and returned on
free (`mallopt(M_MMAP_THRESHOLD)`; `malloc_trim` before each reading), so the resident set follows
the tensors in use; every code path runs once first (`prime`) so that library pages faulted in by
a first call are not charged to a configuration. CPU figures agree with a count of the tensors alive
to within allocator slack (small models: a few MiB). Elsewhere, or with `--no-cpu-memory`, CPU
memory is not reported.

Model sizes (`--size`): `small` (default, CPU-sized): MLP 784-256-256-10 on a batch of 512, ResNet-18 width 16 on
32 images of 3x32x32, GPT-2 with 2 layers, width 128, 4 heads, vocabulary 512 on 4 sequences of 128 tokens; `paper`
(GPU): MLP 784-1024-1024-10 on 4096, ResNet-18 width 64 on 256 images, GPT-2 124M (`transformers`' default
`GPT2Config`) on 8 sequences of 512 tokens; `tiny`: smoke tests. Inputs and labels are random (fixed seed).

    python benchmarks/torch_overhead.py                     # small models on CPU, fp32 (5-10 minutes)
    python benchmarks/torch_overhead.py --track-every 100 --json torch_cpu.json        # + tracking cost
    python benchmarks/torch_overhead.py --device cuda --size paper --dtypes fp32,bf16 --track-every 100 \
        --json torch_gpu.json                                                          # paper sizes, GPU
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

#: the curvature routes measured by default (`--routes`)
ROUTES = ("auto", "double-backward", "jvp-jvp", "jvp-grad", "fd-central", "fd-onesided")
#: the cost targets: tuned / plain time per step probing every step and every 10 steps, tuned / plain peak memory,
#: extra time of sharpness tracking (a fraction), and monitored / plain time per step
TARGETS = {"every_step": 2.1, "every_10": 1.12, "memory": 1.3, "tracking": 0.05, "monitor": 1.05}
#: the bases of the monitor's overhead rows (`--monitor`): plain SGD and Adam, whatever the model's own optimizer
MONITOR_BASES: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
}


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
class BasicBlock(torch.nn.Module):
    """ResNet basic block with GroupNorm (8 groups): two 3x3 convolutions and a skip connection.

    The skip is a 1x1 convolution + GroupNorm when the stride or the width changes, else the identity.

    Args:
        cin: input channels.
        cout: output channels (divisible by 8).
        stride: stride of the first convolution (and of the skip's).
    """

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
        """Apply the block: `relu(norm2(conv2(relu(norm1(conv1(x))))) + skip(x))`.

        Args:
            x: (N, cin, H, W) inputs.

        Returns:
            (N, cout, H / stride, W / stride) outputs.
        """
        y = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(y)) + self.skip(x))


class ResNet18(torch.nn.Module):
    """ResNet-18 for 32x32 inputs with GroupNorm (BatchNorm has no per-sample Hessian semantics).

    A 3x3 stem, four stages of two basic blocks (widths `width` x 1, 2, 4, 8; stride 2 from the second stage on),
    global average pooling and a linear head.

    Args:
        width: channels of the stem and the first stage (divisible by 8).
        classes: number of classes.
    """

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
        """Classify the images.

        Args:
            x: (N, 3, H, W) images (32x32 in this benchmark).

        Returns:
            (N, classes) logits.
        """
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))


@dataclass
class Workload:
    """One benchmark model with its fixed batch, loss and optimizer.

    Attributes:
        name: the row label, with the sizes (e.g. `"MLP 784-256-256-10 (512)"`).
        model: the model at its initial weights (copied for every configuration).
        loss: `model -> scalar loss` on the workload's fixed batch (cross-entropy; GPT-2: its language-model loss).
        optimizer: `parameters -> optimizer`, the model's base optimizer (MLP: SGD lr 0.1; ResNet: SGD lr 0.1,
            momentum 0.9; GPT-2: AdamW lr 1e-4).
    """

    name: str
    model: torch.nn.Module
    loss: Callable[[torch.nn.Module], torch.Tensor]
    optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def workloads(names: list[str], size: str, device: torch.device) -> list[Workload]:
    """Build the benchmark's models and their fixed random batches (seed 0).

    Args:
        names: which models: any of `"mlp"`, `"cnn"`, `"gpt2"`.
        size: `"small"`, `"paper"` or `"tiny"` (see the module docstring for the sizes).
        device: where the batches live (the models are moved there by the caller).

    Returns:
        One workload per requested model, in the order mlp, cnn, gpt2; gpt2 is left out, with a message on stderr,
        when `transformers` is not installed.
    """
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
    """One route and `probe_every` on one model and dtype (the default measurement).

    Attributes:
        model: the workload's name.
        dtype: `"fp32"` or `"bf16"` (autocast).
        route: the configured curvature route.
        probe_every: the tuner's `probe_every`.
        time_ratio: tuned / plain time per step: medians with `probe_every=1`, means otherwise (the tuned run
            timed over at least two probe cycles); NaN when the route fails on this model.
        memory_ratio: tuned / plain peak memory of a step (measured with `probe_every=1` only); None when not
            measured.
        curvature_rel_error: |d - d_exact| / |d_exact| of the route's u^T H u (`curvature_error`); None when the
            route cannot run.
        curvature_scaled_error: |d - d_exact| / (||u|| ||H u||); None when the route cannot run.
        resolved_route: the route the tuner used (what `"auto"` resolved to).
        note: why the row has no timing (`"fails: ..."`), else empty.
    """

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
    """The monitor's overhead on one model and base (`--monitor`)."""

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
    cpu_ratio: float  #: `ratio` for the process's CPU time (robust to other jobs on a shared CPU)
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
    """Everything one invocation measured (written by `--json`).

    Attributes:
        device: the device, with the GPU's name on CUDA.
        torch: torch's version.
        rows: the route rows.
        plain_ms: median plain step in milliseconds, by `"<model> <dtype>"`.
        tracking: extra time of sharpness tracking as a fraction of training time, by `"<model> <dtype>"`
            (`--track-every`).
        monitor: the monitor rows (`--monitor`).
    """

    device: str
    torch: str
    rows: list[Row] = field(default_factory=list)
    plain_ms: dict[str, float] = field(default_factory=dict)
    tracking: dict[str, float] = field(default_factory=dict)
    monitor: list[MonitorRow] = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU.

    Args:
        device: the device the steps run on.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Time a training step, each one on its own, after untimed warm-up steps.

    Args:
        step: takes one training step.
        device: the device (synchronised around each timed step).
        warmup: untimed steps first.
        steps: timed steps.

    Returns:
        The wall time of each timed step, in seconds.
    """
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
    """Build one training step: `(tuner or optimizer).step(closure)`, the closure computing the loss and gradient.

    Args:
        work: the workload (its loss).
        model: the model being trained.
        optimizer: its optimizer.
        dtype: `"bf16"` runs the forward pass under bf16 autocast; anything else in full precision.
        device: the device (the autocast's device type).
        tuner: the tuner wrapping `optimizer`, or None for the plain step.

    Returns:
        A function of no argument that takes one step.
    """
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
    """Bytes in use now and the peak since `reset`.

    CUDA allocator statistics on a GPU; the resident set (current and high-water mark) of this process on Linux
    CPUs with glibc; `available` is False elsewhere, or on CPU with `cpu=False`. On CPU the constructor sets glibc's
    `M_MMAP_THRESHOLD` to `HEAP_THRESHOLD` (turning its adaptive threshold off).

    Args:
        device: the device whose memory is measured.
        cpu: measure on CPU (False leaves glibc's allocator settings alone and reports nothing).
    """

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
        """Memory in use now, after a garbage collection (and on CPU `malloc_trim`).

        Returns:
            Bytes: allocated by CUDA's caching allocator on a GPU, the resident set (`VmRSS`) on CPU (0 when it
            cannot be read).
        """
        self._settle()
        if self.device.type == "cuda":
            return float(torch.cuda.memory_allocated(self.device))
        return float(self._status("VmRSS") or 0)

    def reset(self) -> None:
        """Start measuring a peak.

        On CPU, blocks above 128 kB are then served by mmap and returned on free, so the resident set follows the
        tensors in use instead of the heap's history; the high-water mark is reset through `/proc/self/clear_refs`.
        """
        if self.device.type != "cuda":
            self._mmap_threshold(self.MEASURE_THRESHOLD)
        self._settle()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> float:
        """The peak since `reset` (and, on CPU, back to the allocator settings of the timed steps).

        Returns:
            Bytes: CUDA's `max_memory_allocated` on a GPU, the resident set's high-water mark (`VmHWM`) on CPU
            (0 when it cannot be read).
        """
        if self.device.type == "cuda":
            synchronize(self.device)
            return float(torch.cuda.max_memory_allocated(self.device))
        value = float(self._status("VmHWM") or 0)
        self._mmap_threshold(self.HEAP_THRESHOLD)
        return value


def peak_memory(step: Callable[[], None], meter: MemoryMeter, before: float) -> float | None:
    """Peak memory of one step above `before` (the memory in use before the configuration's model existed).

    Args:
        step: takes one training step (run once here).
        meter: the memory meter.
        before: bytes in use before the configuration's model was built (`MemoryMeter.current`).

    Returns:
        The step's peak minus `before`, in bytes (at least 0); None when the meter is not available.
    """
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
    the gradient-descent one, u = -g.

    Args:
        work: the workload (its loss).
        point: the model at the point of measurement (copied, not changed).
        route: the curvature route to check.
        dtype: `"bf16"` evaluates the loss under bf16 autocast.
        device: the device.
        reference: a cache shared by the routes of one point: the exact value (`"exact"`, u^T H u by double
            backward) and `"scale"` (||u|| ||H u||) are computed on the first call and stored there.

    Returns:
        `(|d - d_exact| / |d_exact|, |d - d_exact| / (||u|| ||H u||))`: the second is the error on the scale of the
        curvature along u (|u^T H u| <= ||u|| ||H u||), which stays meaningful when u^T H u itself nearly cancels.
        None when the route raises on this model.
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
    """Run every code path once on a throwaway copy, before any memory is measured.

    One-off allocations of a first call (library pages faulted into the resident set on CPU, cuBLAS/cuDNN
    workspaces on a GPU) are then not charged to whichever configuration happens to run first. Two plain steps,
    then two tuned steps (`CDAT(scale=2)`) per route; a route that fails is ignored here.

    Args:
        work: the workload.
        base: the model at its initial weights (copied).
        dtype: `"fp32"` or `"bf16"`.
        device: the device.
        route_names: the routes to run.
    """
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
    """Measure one workload: the plain step, then every route and `probe_every`, per dtype; print and record rows.

    Per dtype: time the plain step (`--warmup`, `--steps`) and its peak memory; at the weights it reached, check
    each route's curvature against double backward; then, per route and `probe_every`, time the tuned step
    (`CDAT(scale=2)`, at least two probe cycles) and, with `probe_every=1`, its peak memory. With `--track-every`,
    also `measure_tracking`.

    Args:
        work: the workload.
        args: the parsed command line (`routes`, `probe_every`, `dtypes`, `steps`, `warmup`, `track_every`,
            `cpu_memory`).
        device: the device.
        report: receives the rows, the plain step times and the tracking costs.
    """
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

    Steady state: the first measurement (a cold start from a random vector, up to `sharpness_iters`
    iterations) happens in the untimed warm-up; the timed `2 m` steps hold two warm-started ones. The plain
    optimizer and the tracking tuner (`CurvatureTuner(optimizer, None, sharpness_every=m)`) each run once.

    Args:
        work: the workload.
        base: the model at its initial weights (copied).
        dtype: `"fp32"` or `"bf16"`.
        device: the device.
        args: the parsed command line (`track_every` = m, `warmup`).

    Returns:
        (tracked time / plain time) - 1 over the `2 m` timed steps, e.g. 0.03 for 3% more training time.
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
    """Time per step of monitoring only (`CurvatureTuner(opt, None, monitor_budget=b)`) over a plain step.

    Three runs from the same weights (plain optimizer, tuner without monitor, monitored tuner) are warmed up
    past the monitor's cold start and first checks (`--monitor-warmup` periods of k steps), then timed in
    alternating blocks of whole periods (`block` = k times enough periods to last `--monitor-block` steps),
    the order rotating between `--monitor-repeats` repeats; each repeat gives a ratio (monitored block time /
    plain block time, taken minutes apart at most), and the row reports their median, for the wall time and for
    the process's CPU time. On a CPU shared with other jobs the wall time mostly measures the scheduler; the CPU
    time of a single-threaded run (`OMP_NUM_THREADS=1`) is what the step costs on an idle core (on a GPU only
    the wall time means something). The monitor measures the training step as the interval between two optimizer
    steps: the gap between two of its blocks (the other runs' blocks) is not a training step, so its step clock
    restarts at each block (`_last_start`: without it, the interval holding the other blocks enters its EMA of the
    step time, its cost estimate drops and it ticks more often than in training: 44% more products on the MLP with
    blocks of 150 steps between pauses of two blocks).

    Unless `--no-monitor-reference` is given, before each timed monitored block lambda_max (and for Adam the
    preconditioned lambda_max) is computed to convergence (`exact_references`) and compared with the monitor's
    reading after the block's first step.

    Args:
        work: the workload (its loss; the model's own optimizer is not used).
        base: the model at its initial weights (copied for each run).
        device: the device.
        args: the parsed command line (`monitor` = the budget, `monitor_bases`, `monitor_block`,
            `monitor_repeats`, `monitor_warmup`, `warmup`, `reference`).

    Returns:
        One row per base optimizer of `--monitor-bases` (plain SGD, Adam).
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
    """The top eigenvalues at the tuner's current weights, to convergence: the references of the tracking error.

    ARPACK to a relative 1e-5 on float32 double-backward products (the workload's data is float32;
    `_monitor_common.ExactTop`). Restarts the monitor's step clock afterwards (this was not a training step).

    Args:
        tuner: the monitored tuner (its model and optimizer).
        work: the workload (its loss).

    Returns:
        `[lambda_max(H), lambda_max(P^{-1/2} H P^{-1/2})]`, the second with Adam's preconditioner P; NaN when the
        optimizer is not an Adam.
    """
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
    """Run the benchmark from the command line (`--help` lists the options); print the rows, optionally a JSON.

    Invalid options (unknown route, dtype, model or base, a GPU asked for where there is none, a non-integer
    `--probe-every`) print the usage and exit with status 2 (`argparse`'s `parser.error`).

    Args:
        argv: the arguments, without the program name (None: `sys.argv[1:]`).

    Returns:
        0.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=("small", "paper", "tiny"), default="small",
                        help="small: CPU-sized models; paper: the CDAT paper's model sizes (GPU); tiny: smoke tests")
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
