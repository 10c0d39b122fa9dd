"""Overhead of the JAX / Optax curvature tuner: time and memory of a tuned step vs a plain step.

For an MLP, a small CNN and a GPT-2-like transformer written in plain JAX, this script times one
jitted training step (value_and_grad + optimizer update + apply) of

* the plain base optimizer (`optax.sgd(lr)` or `optax.adam(lr)`), and
* `tune(base(1.0), CDAT(scale=2.0), route=..., probe_every=...)` for every curvature route and
  `probe_every` in {1, 10},
* plus sharpness tracking alone (`tune(base(1.0), Constant(lr), sharpness_every=100)`),

in the same process, with `tune`'s `warn` set by `--warn` (default `true`, the library's default: no
host callback in the step; `jit` measures the in-jit warning callback, which slows every step, probe or
not), and reports the ratios next to the targets (`TIME_TARGET`, `SHARPNESS_TARGET`, `MEMORY_TARGET`: tuned /
plain <= 2.1 probing every step, <= 1.12 every 10 steps, sharpness tracking every 100 steps <= 1.05,
peak memory <= 1.3x). Times are medians over `--repeats` blocks of `block` consecutive steps
(`block` = 10, or 100 for sharpness tracking, so that a block holds the same mix of probe and hold
steps as training), after warm-up, with `block_until_ready`. Memory is XLA's compiled memory
analysis of the step (arguments + outputs + temporaries - aliased), available on CPU and GPU; on a GPU
the device's `memory_stats()` peak is printed too. CPU figures are for regressions only: absolute
times count on a GPU. On CPU the CNN's rows that take a gradient inside `lax.cond` or
a loop (`probe_every=10` with any route but `jvp-jvp`, and the sharpness row) are dominated by an
XLA:CPU slow path for convolution gradients in nested computations (jax-ml/jax#12868, see
`eos_core.adapters.jax.transform`), not by the tuner. The sharpness row also reports how many
warm-started power iterations a measurement took after 100 steps (`power_iterations`).

**Host allocator.** XLA:CPU allocates each step's temporary buffer with `malloc`; glibc serves blocks
above its mmap threshold with fresh `mmap` pages, so every step pays page faults in proportion to the
temporary buffer's size. A tuned step's buffer is larger (its probe branch needs room even when not
taken), which alone made a GPT-like tuned step 40% slower on CPU with the probe branch never taken. The
script therefore re-executes itself once with `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`
raised (plain and tuned steps alike get reused heap pages); `--default-malloc` keeps glibc's defaults.
The raised threshold reaches blocks of up to 64 MiB, the most a worker thread's arena holds: a step whose
temporaries are larger still pays the faults (the monitored GPT step, 67.1 MB before the monitor's check
shared memory between its two products: ~5,100 faults per step).
GPU device memory comes from XLA's own allocator and is unaffected.

**The sharpness monitor** (`--monitor [BUDGET]`, default budget 0.05): for every model and for `optax.sgd` and
`optax.adam` (`--monitor-bases`), the step of `tune(base(lr), None, monitor_budget=0.05, reference_lr=lr)`
(monitoring only, the default cost model of the products: the spacing `k` is chosen in the compiled step, see
`eos_core.adapters.jax.monitor`) and of `tune` without the monitor, against the plain base, in blocks of
whole monitoring periods (at least `--monitor-block` steps) timed in rotating order, `--monitor-repeats` times;
each repeat gives a ratio and the row reports their median (target 1.05) for the process's CPU time (what a step
costs on an idle CPU, robust to other jobs on a shared one) and for the wall time, the spacing `k`, the products
per step, and the CPU ratio of a monitor that never ticks (`idle x`: the compiled step's fixed cost). Before each
monitored block lambda_max is computed to convergence at the run's parameters (ARPACK on jitted Hessian-vector
products) and compared with the `sharpness` the monitor reports after the block's first step: the row's tracking
error (`--no-monitor-reference` skips it).

Model sizes (`--size`, see `SIZES`): `small` (CPU, default), `gpu` (MLP 784-1024-1024-10 on 4096 inputs, a CNN
with 64-128-256 channels on 256 images of 32x32, GPT-2 124M: 12 layers, width 768, context 512, on 8 sequences),
`gpt2-124m` (the GPU-sized GPT, the other models small) and `tiny` (smoke tests). Inputs and labels are random
(`PRNGKey(0)`).

Command lines:

    python benchmarks/jax_overhead.py                      # small CPU sizes, a couple of minutes
    python benchmarks/jax_overhead.py --models gpt --size gpt2-124m --base adam --json out.json  # GPU
    python benchmarks/jax_overhead.py --models gpt --routes jvp-jvp --no-sharpness --warn jit  # the callback's cost
    python benchmarks/jax_overhead.py --monitor --json jax_monitor.json   # the monitor's overhead, SGD and Adam
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

#: glibc settings of the re-executed run (see "Host allocator" above): 4 GiB thresholds keep freed blocks on the heap.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}

if __name__ == "__main__" and "--default-malloc" not in sys.argv and any(k not in os.environ for k in MALLOC_ENV):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from eos_core import routes  # noqa: E402
from eos_core.adapters.jax import diagnostics, find_tune_state, set_monitor_cost, tune  # noqa: E402
from eos_core.laws import CDAT, Constant  # noqa: E402

#: target of tuned / plain time per step, by `probe_every`
TIME_TARGET = {1: 2.1, 10: 1.12}
#: `--warn` choices and the `tune(..., warn=...)` value each one measures.
WARN_MODES: dict[str, bool | str] = {"true": True, "jit": "jit", "false": False}
#: target of tracked / plain time per step with sharpness tracking every 100 steps
SHARPNESS_TARGET = 1.05
#: target of monitored / plain CPU time per step (`--monitor`)
MONITOR_TARGET = 1.05
#: the bases of the monitor's rows and their learning rates
MONITOR_BASES: dict[str, tuple[Callable[[float], optax.GradientTransformation], float]] = {
    "sgd": (optax.sgd, 0.05), "adam": (optax.adam, 1e-3)}
#: target of tuned / plain memory of the compiled step
MEMORY_TARGET = 1.3
#: the curvature routes measured by default (`--routes`)
ROUTES = (routes.JVP_JVP, routes.JVP_GRAD, routes.DOUBLE_BACKWARD, routes.FD_CENTRAL, routes.FD_ONESIDED)

#: the models' keyword arguments (`mlp`, `cnn`, `gpt`) per `--size`
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "small": {
        "mlp": {"sizes": (784, 256, 256, 10), "batch": 512},
        "cnn": {"channels": (16, 32), "image": 16, "batch": 64, "classes": 10},
        "gpt": {"layers": 2, "width": 128, "heads": 4, "context": 64, "vocab": 256, "batch": 8},
    },
    "gpu": {  # GPU-sized models: MLP 784-1024-1024-10, a 3-convolution CNN on 32x32 images, GPT-2 124M
        "mlp": {"sizes": (784, 1024, 1024, 10), "batch": 4096},
        "cnn": {"channels": (64, 128, 256), "image": 32, "batch": 256, "classes": 10},
        "gpt": {"layers": 12, "width": 768, "heads": 12, "context": 512, "vocab": 50257, "batch": 8},
    },
}
SIZES["gpt2-124m"] = {**SIZES["small"], "gpt": SIZES["gpu"]["gpt"]}
SIZES["tiny"] = {  # smoke tests
    "mlp": {"sizes": (16, 8, 8, 4), "batch": 8},
    "cnn": {"channels": (4,), "image": 8, "batch": 4, "classes": 4},
    "gpt": {"layers": 1, "width": 16, "heads": 2, "context": 8, "vocab": 32, "batch": 2},
}


# -- models in plain JAX ------------------------------------------------------------------------------
def mlp(key: jax.Array, sizes: tuple[int, ...], batch: int, dtype: Any) -> tuple[Any, Callable, tuple]:
    """A ReLU MLP with a fixed random batch.

    Weights N(0, 1 / fan_in), biases 0; inputs N(0, 1), labels uniform over the classes.

    Args:
        key: the PRNG key of the weights and the batch.
        sizes: layer widths, input first and number of classes last (e.g. `(784, 256, 256, 10)`).
        batch: batch size.
        dtype: dtype of the parameters and inputs.

    Returns:
        `(params, loss, batch)`: a list of `{"w", "b"}` layers, `loss(params, x, y)` (mean cross-entropy), and
        the batch `(x, y)`.
    """
    keys = jax.random.split(key, len(sizes) + 1)
    params = [{"w": jax.random.normal(k, (a, b), dtype) / math.sqrt(a), "b": jnp.zeros((b,), dtype)}
              for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=False)]
    x = jax.random.normal(keys[-1], (batch, sizes[0]), dtype)
    y = jax.random.randint(keys[-2], (batch,), 0, sizes[-1])

    def loss(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        h = x
        for i, layer in enumerate(p):
            h = h @ layer["w"] + layer["b"]
            if i < len(p) - 1:
                h = jax.nn.relu(h)
        return cross_entropy(h, y)

    return params, loss, (x, y)


def cnn(key: jax.Array, channels: tuple[int, ...], image: int, batch: int, classes: int, dtype: Any
        ) -> tuple[Any, Callable, tuple]:
    """A small CNN with a fixed random batch of NHWC images.

    Per entry of `channels`: a 3x3 convolution (SAME padding), ReLU, 2x2 max pooling; then global average pooling
    and a linear head. Weights N(0, 1 / fan_in), biases 0; images N(0, 1) with 3 channels, labels uniform.

    Args:
        key: the PRNG key of the weights and the batch.
        channels: output channels of each convolution.
        image: image height and width.
        batch: batch size.
        classes: number of classes.
        dtype: dtype of the parameters and images.

    Returns:
        `(params, loss, batch)`: `{"conv": [...], "head": {...}}`, `loss(params, x, y)` (mean cross-entropy), and
        the batch `(x, y)`.
    """
    keys = jax.random.split(key, len(channels) + 3)
    params: dict[str, Any] = {"conv": []}
    c_in = 3
    for k, c_out in zip(keys, channels, strict=False):
        params["conv"].append({"w": jax.random.normal(k, (3, 3, c_in, c_out), dtype) / math.sqrt(9 * c_in),
                               "b": jnp.zeros((c_out,), dtype)})
        c_in = c_out
    params["head"] = {"w": jax.random.normal(keys[-3], (c_in, classes), dtype) / math.sqrt(c_in),
                      "b": jnp.zeros((classes,), dtype)}
    x = jax.random.normal(keys[-2], (batch, image, image, 3), dtype)
    y = jax.random.randint(keys[-1], (batch,), 0, classes)

    def loss(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        h = x
        for layer in p["conv"]:
            h = jax.lax.conv_general_dilated(h, layer["w"], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jax.nn.relu(h + layer["b"])
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        h = h.mean(axis=(1, 2))
        return cross_entropy(h @ p["head"]["w"] + p["head"]["b"], y)

    return params, loss, (x, y)


def gpt(key: jax.Array, layers: int, width: int, heads: int, context: int, vocab: int, batch: int, dtype: Any
        ) -> tuple[Any, Callable, tuple]:
    """GPT-2-like decoder: learned positions, pre-LN blocks, causal softmax attention, 4x GELU MLP, tied head.

    Initialisation: token embeddings and dense layers N(0, 0.02), the residual projections (attention `proj`, MLP
    `out`) N(0, 0.02 / sqrt(2 layers)), positions N(0, 0.01), biases 0, LayerNorm gains 1. Attention logits, the
    LayerNorm statistics and the loss are computed in float32.

    Args:
        key: the PRNG key of the weights and the batch.
        layers: number of blocks.
        width: embedding width (divisible by `heads`).
        heads: attention heads.
        context: sequence length (and the number of learned positions).
        vocab: vocabulary size.
        batch: sequences per batch.
        dtype: dtype of the parameters.

    Returns:
        `(params, loss, batch)`: the parameter tree, `loss(params, tokens)` (mean next-token cross-entropy), and
        the batch `(tokens,)` of random tokens, shape `(batch, context + 1)`.
    """
    keys = iter(jax.random.split(key, 4 * layers + 4))

    def dense(n_in: int, n_out: int, scale: float = 0.02) -> dict[str, jax.Array]:
        return {"w": scale * jax.random.normal(next(keys), (n_in, n_out), dtype), "b": jnp.zeros((n_out,), dtype)}

    def norm() -> dict[str, jax.Array]:
        return {"g": jnp.ones((width,), dtype), "b": jnp.zeros((width,), dtype)}

    residual_scale = 0.02 / math.sqrt(2 * layers)
    params = {
        "wte": 0.02 * jax.random.normal(next(keys), (vocab, width), dtype),
        "wpe": 0.01 * jax.random.normal(next(keys), (context, width), dtype),
        "blocks": [{"ln1": norm(), "attn": dense(width, 3 * width), "proj": dense(width, width, residual_scale),
                    "ln2": norm(), "fc": dense(width, 4 * width), "out": dense(4 * width, width, residual_scale)}
                   for _ in range(layers)],
        "ln_f": norm(),
    }
    tokens = jax.random.randint(next(keys), (batch, context + 1), 0, vocab)
    mask = jnp.tril(jnp.ones((context, context), bool))

    def layer_norm(p: dict[str, jax.Array], h: jax.Array) -> jax.Array:
        h32 = h.astype(jnp.float32)
        mean = h32.mean(-1, keepdims=True)
        var = ((h32 - mean) ** 2).mean(-1, keepdims=True)
        return ((h32 - mean) * jax.lax.rsqrt(var + 1e-5)).astype(h.dtype) * p["g"] + p["b"]

    def attention(p: dict[str, Any], h: jax.Array) -> jax.Array:
        b, t, _ = h.shape
        q, k, v = jnp.split(h @ p["attn"]["w"] + p["attn"]["b"], 3, axis=-1)
        q, k, v = (z.reshape(b, t, heads, width // heads).transpose(0, 2, 1, 3) for z in (q, k, v))
        logits = (q @ k.transpose(0, 1, 3, 2)).astype(jnp.float32) / math.sqrt(width // heads)
        weights = jax.nn.softmax(jnp.where(mask[:t, :t], logits, -1e9), axis=-1).astype(h.dtype)
        out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, t, width)
        return out @ p["proj"]["w"] + p["proj"]["b"]

    def loss(p: Any, tokens: jax.Array) -> jax.Array:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        h = p["wte"][inputs] + p["wpe"][: inputs.shape[1]]
        for block in p["blocks"]:
            h = h + attention(block, layer_norm(block["ln1"], h))
            m = jax.nn.gelu(layer_norm(block["ln2"], h) @ block["fc"]["w"] + block["fc"]["b"])
            h = h + m @ block["out"]["w"] + block["out"]["b"]
        logits = layer_norm(p["ln_f"], h) @ p["wte"].T
        return cross_entropy(logits, targets)

    return params, loss, (tokens,)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy, computed in float32: `mean(logsumexp(logits) - logits[label])`.

    Args:
        logits: `(..., classes)` logits.
        labels: `(...)` integer labels.

    Returns:
        The mean over all positions, a float32 scalar.
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


#: the model builders by `--models` name
BUILDERS = {"mlp": mlp, "cnn": cnn, "gpt": gpt}


# -- measurement ------------------------------------------------------------------------------------
def make_step(opt: optax.GradientTransformation, loss: Callable, tuned: bool) -> Callable:
    """Build the jitted training step: `value_and_grad`, `opt.update`, `optax.apply_updates`.

    Args:
        opt: the optimizer (plain, or wrapped by `tune`).
        loss: `loss(params, *batch)`.
        tuned: pass `value_fn` and `value` to `opt.update`, as a `tune` transformation needs.

    Returns:
        `step(params, state, *batch) -> (params, state, loss value)`, jitted, donating `params` and `state`.
    """
    def step(params: Any, state: Any, *batch: Any) -> tuple[Any, Any, jax.Array]:
        def value_fn(p: Any) -> jax.Array:
            return loss(p, *batch)

        value, grads = jax.value_and_grad(value_fn)(params)
        if tuned:
            updates, state = opt.update(grads, state, params, value_fn=value_fn, value=value)
        else:
            updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    return jax.jit(step, donate_argnums=(0, 1))


def memory_bytes(compiled: Any) -> float:
    """Memory of a compiled step from XLA's memory analysis.

    Args:
        compiled: a compiled JAX program (`jit(...).lower(...).compile()`).

    Returns:
        Arguments + outputs + temporaries - aliased (donated) bytes; NaN when the backend has no memory analysis.
    """
    try:
        m = compiled.memory_analysis()
        return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                     - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend implements it
        return math.nan


class Runner:
    """A compiled step with its own parameters and optimizer state; `block()` times `steps` consecutive steps.

    Args:
        opt: the optimizer.
        loss: `loss(params, *batch)`.
        params: the initial parameters (copied: the step donates its inputs).
        batch: the fixed batch.
        tuned: whether `opt` is a `tune` transformation (`make_step`).
        steps: steps per timed block.
        compiled: another runner's compiled step for the same optimizer and shapes, reused instead of compiling
            again (None: compile).
    """

    def __init__(self, opt: optax.GradientTransformation, loss: Callable, params: Any, batch: tuple, *,
                 tuned: bool, steps: int, compiled: Any = None) -> None:
        self.params = jax.tree.map(jnp.array, params)  # a private copy: the step donates its inputs
        # a copy of every leaf: the step donates the state, and XLA refuses a buffer donated twice (the monitor's
        # initial tracker state shares one zeros array between alpha and beta, one NaN between eigenvalue and residual)
        self.state = jax.tree.map(jnp.array, opt.init(self.params))
        self.batch, self.steps = batch, steps
        # `compiled`: another runner's program for the same optimizer and shapes (no second compilation)
        self.compiled = compiled if compiled is not None else make_step(opt, loss, tuned).lower(
            self.params, self.state, *batch).compile()
        self.memory = memory_bytes(self.compiled)
        self.value = jnp.nan
        self.cpu = math.nan  #: the process's CPU seconds per step of the last block

    def block(self, after_first: Callable[[Any], None] | None = None) -> float:
        """Run `steps` consecutive steps and time them.

        The process's CPU time per step goes to `cpu`; the parameters, state and last loss value are updated.

        Args:
            after_first: called with the optimizer state after the first step (a host read, inside the timing);
                None: nothing.

        Returns:
            Wall-clock seconds per step, up to `block_until_ready` on the results.
        """
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(self.steps):
            self.params, self.state, self.value = self.compiled(self.params, self.state, *self.batch)
            if i == 0 and after_first is not None:
                after_first(self.state)
        jax.block_until_ready((self.params, self.state, self.value))
        self.cpu = (time.process_time() - cpu) / self.steps
        return (time.perf_counter() - start) / self.steps


def compare(tuned: Runner, plain: Runner, *, repeats: int, warmup_blocks: int) -> tuple[float, float]:
    """Time a tuned and a plain runner in alternating blocks (ABAB...), so that both see the same machine load.

    Args:
        tuned: the tuned runner.
        plain: the plain runner.
        repeats: timed blocks of each.
        warmup_blocks: untimed blocks of each first.

    Returns:
        The median seconds per step of the tuned and of the plain runner.
    """
    for _ in range(warmup_blocks):
        tuned.block()
        plain.block()
    tuned_times, plain_times = [], []
    for _ in range(repeats):
        tuned_times.append(tuned.block())
        plain_times.append(plain.block())
    return statistics.median(tuned_times), statistics.median(plain_times)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure every model, route and `probe_every` (and the sharpness-tracking row); print each row.

    The tuned optimizer is `tune(base(1.0), CDAT(scale=2.0, lr_max=10 lr), route=..., probe_every=...)`, timed
    against `base(lr)` in blocks of 10 steps; the sharpness row tracks every 100 steps in blocks of 100 steps.

    Args:
        args: the parsed command line (`models`, `size`, `base`, `lr`, `dtype`, `routes`, `probe_every`,
            `repeats`, `warmup_blocks`, `sharpness`, `sharpness_route`, `warn`).

    Returns:
        One dict per row: model, parameter count, base, dtype, `warn`, route, `probe_every`, tuned and plain ms
        per step, `time_ratio` and its target, `memory_ratio` and its target, both memories in MiB, `time_ok`,
        `memory_ok`, the tuned run's final loss and skipped steps; the sharpness row also has `power_iterations`
        and `sharpness`.
    """
    dtype = jnp.dtype(args.dtype)
    rows: list[dict[str, Any]] = []
    sizes = SIZES[args.size]
    for name in args.models:
        params, loss, batch = BUILDERS[name](jax.random.PRNGKey(0), **sizes[name], dtype=dtype)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        base = {"sgd": optax.sgd, "adam": optax.adam}[args.base]
        lr = args.lr if args.lr is not None else (1e-3 if args.base == "adam" else 0.05)
        plain = Runner(base(lr), loss, params, batch, tuned=False, steps=10)
        print(f"# {name}: {_count(n_params)} parameters, {args.dtype}, plain {args.base} step "
              f"{plain.block() * 1e3:.2f} ms", file=sys.stderr)

        def record(route: str, probe_every: int | str, tuned: Runner, reference: Runner, target: float,
                   name: str = name, n_params: int = n_params) -> None:
            tuned_s, plain_s = compare(tuned, reference, repeats=args.repeats, warmup_blocks=args.warmup_blocks)
            ratio = tuned_s / plain_s
            mem_ratio = tuned.memory / reference.memory
            rows.append({"model": name, "params": n_params, "base": args.base, "dtype": args.dtype, "warn": args.warn,
                         "route": route,
                         "probe_every": probe_every, "tuned_ms": tuned_s * 1e3, "plain_ms": plain_s * 1e3,
                         "time_ratio": ratio, "time_target": target, "memory_ratio": mem_ratio,
                         "memory_target": MEMORY_TARGET, "tuned_memory_mb": tuned.memory / 2**20,
                         "plain_memory_mb": reference.memory / 2**20, "time_ok": ratio <= target,
                         "memory_ok": bool(mem_ratio <= MEMORY_TARGET), "final_loss": float(tuned.value),
                         "skipped_steps": int(getattr(tuned.state, "skipped", 0))})
            print(format_row(rows[-1]), file=sys.stderr)

        for route in args.routes:
            for probe_every in args.probe_every:
                opt = tune(base(1.0), CDAT(scale=2.0, lr_max=lr * 10), route=route, probe_every=probe_every,
                           warn=args.warn)
                record(route, probe_every, Runner(opt, loss, params, batch, tuned=True, steps=10), plain,
                       TIME_TARGET.get(probe_every, math.nan))
        if args.sharpness:
            plain_100 = Runner(base(lr), loss, params, batch, tuned=False, steps=100)
            opt = tune(base(1.0), Constant(lr), sharpness_every=100, route=args.sharpness_route, warn=args.warn)
            tracked = Runner(opt, loss, params, batch, tuned=True, steps=100)
            record(f"sharpness/100 {args.sharpness_route}", "-", tracked, plain_100, SHARPNESS_TARGET)
            # blocks hold 100 steps, so the next step measures: how many warm-started iterations did it take?
            tracked.params, tracked.state, tracked.value = tracked.compiled(tracked.params, tracked.state,
                                                                            *tracked.batch)
            found = diagnostics(tracked.state)
            rows[-1].update(power_iterations=found["power_iterations"], sharpness=found["sharpness"])
            print(f"#   warm-started power iteration after 100 steps: {found['power_iterations']:.0f} Hessian-vector "
                  f"products (of at most 20), sharpness {found['sharpness']:.4g}", file=sys.stderr)
    return rows


def _products(state: Any) -> int:
    """Operator applications of the monitor's trackers so far."""
    monitor = find_tune_state(state).monitor
    trackers = [t for t in (monitor.tracker, monitor.preconditioned) if t is not None]
    return int(sum(int(jax.device_get(t.products)) for t in trackers))


def monitor_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The monitor's overhead: monitored step / plain step, per model and base (see the module docstring).

    The four runners (plain, `tune` without the monitor, `tune` with it, and `tune` with it made idle by
    `set_monitor_cost` after its cold start: what carrying the monitor costs a step that does not tick) start
    from the same parameters; after one warm-up block each (compilation, the monitor's cold start and first check),
    each repeat times one block of each in rotating order. `k` is read from the diagnostics after the first step,
    and the block holds whole periods of `k` steps, so every monitored block holds the same number of ticks.

    Args:
        args: the parsed command line (`models`, `size`, `dtype`, `monitor` = the budget, `monitor_bases`,
            `monitor_block`, `monitor_repeats`, `reference`, `warn`).

    Returns:
        One dict per model and base: median (and min, max) monitored / plain ratios of wall and CPU time, the same
        for `tune` without the monitor and (CPU) for the idle monitor, `k`, whether the products are exact,
        products per step, the memory ratio, the final sharpness readings, and the tracking error with its
        references (`[exact lambda_max, tracked, age]` per monitored block).
    """
    dtype = jnp.dtype(args.dtype)
    rows: list[dict[str, Any]] = []
    sizes = SIZES[args.size]
    budget = args.monitor
    for name in args.models:
        params, loss, batch = BUILDERS[name](jax.random.PRNGKey(0), **sizes[name], dtype=dtype)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        for base_name in args.monitor_bases:
            make, lr = MONITOR_BASES[base_name]
            monitored_opt = tune(make(lr), None, monitor_budget=budget, reference_lr=lr, warn=args.warn)
            monitored = Runner(monitored_opt, loss, params, batch, tuned=True, steps=1)
            monitored.block()  # k is known after the first step
            every = int(diagnostics(monitored.state)["monitor_every"])
            block = every * max(1, math.ceil(args.monitor_block / every))
            monitored.steps = block
            runners = {"plain": Runner(make(lr), loss, params, batch, tuned=False, steps=block),
                       "tune": Runner(tune(make(lr), None, reference_lr=lr, warn=args.warn), loss, params, batch,
                                      tuned=True, steps=block),
                       "monitor": monitored,
                       "idle": Runner(monitored_opt, loss, params, batch, tuned=True, steps=block,
                                      compiled=monitored.compiled)}
            for runner in runners.values():
                runner.block()
            # the monitor in the compiled step, never ticking after its cold start: its fixed cost per step
            runners["idle"].state = set_monitor_cost(runners["idle"].state, fd=1e9, exact=1e9)
            products_before = _products(runners["monitor"].state)
            times: dict[str, list[float]] = {key: [] for key in runners}
            cpus: dict[str, list[float]] = {key: [] for key in runners}
            order = list(runners)
            references: list[list[float]] = []  # [exact lambda_max, tracked, age] at each monitored block's start
            exact = ExactTopJax(loss, batch) if args.reference else None
            for repeat in range(args.monitor_repeats):
                for key in order[repeat % len(order):] + order[: repeat % len(order)]:
                    if key == "monitor" and exact is not None:
                        value = exact(monitored.params)

                        def read(state: Any, value: float = value, references: list = references) -> None:
                            found = diagnostics(state)
                            references.append([value, found["sharpness"], found["sharpness_age"]])

                        times[key].append(runners[key].block(read))
                    else:
                        times[key].append(runners[key].block())
                    cpus[key].append(runners[key].cpu)
            found = diagnostics(runners["monitor"].state)
            products = _products(runners["monitor"].state) - products_before
            ratios = [m / p for m, p in zip(times["monitor"], times["plain"], strict=True)]
            tune_ratios = [t / p for t, p in zip(times["tune"], times["plain"], strict=True)]
            cpu_ratios = [m / p for m, p in zip(cpus["monitor"], cpus["plain"], strict=True)]
            cpu_tune_ratios = [t / p for t, p in zip(cpus["tune"], cpus["plain"], strict=True)]
            cpu_idle_ratios = [t / p for t, p in zip(cpus["idle"], cpus["plain"], strict=True)]
            errors = [abs(tracked - value) / abs(value) for value, tracked, _ in references if value]
            row = {"model": name, "params": n_params, "base": base_name, "lr": lr, "dtype": args.dtype,
                   "budget": budget, "warn": args.warn, "every": int(found["monitor_every"]),
                   "exact": bool(found["monitor_exact"]), "block": block, "repeats": args.monitor_repeats,
                   "plain_ms": statistics.median(times["plain"]) * 1e3,
                   "monitor_ms": statistics.median(times["monitor"]) * 1e3,
                   "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                   "tune_ratio": statistics.median(tune_ratios), "plain_cpu_ms": statistics.median(cpus["plain"]) * 1e3,
                   "cpu_ratio": statistics.median(cpu_ratios), "cpu_ratio_min": min(cpu_ratios),
                   "cpu_ratio_max": max(cpu_ratios), "cpu_tune_ratio": statistics.median(cpu_tune_ratios),
                   "cpu_idle_ratio": statistics.median(cpu_idle_ratios),
                   "products_per_step": products / (block * args.monitor_repeats),
                   "monitor_memory_ratio": runners["monitor"].memory / runners["plain"].memory,
                   "sharpness": found["sharpness"], "preconditioned_sharpness": found["preconditioned_sharpness"],
                   "final_loss": float(runners["monitor"].value), "target": MONITOR_TARGET,
                   "tracking_error": statistics.median(errors) if errors else math.nan, "references": references,
                   "time_ok": statistics.median(cpu_ratios) <= MONITOR_TARGET}
            rows.append(row)
            print(format_monitor_row(row), file=sys.stderr, flush=True)
            if references:
                pairs = ", ".join(f"{v:.4g}/{t:.4g}" for v, t, _ in references)
                print(f"#   tracking error {row['tracking_error']:.3f} (median over {len(references)} monitored "
                      f"blocks; exact / tracked: {pairs})", file=sys.stderr, flush=True)
    return rows


class ExactTopJax:
    """lambda_max of the Hessian of `loss(params, *batch)` to convergence, the reference of the tracking error.

    ARPACK (relative 1e-5) on jitted forward-over-reverse products in the parameters' dtype, warm-started from
    the previous eigenvector.

    Args:
        loss: `loss(params, *batch)`.
        batch: the fixed batch.
    """

    def __init__(self, loss: Callable, batch: tuple) -> None:
        from jax.flatten_util import ravel_pytree

        self.ravel = ravel_pytree

        def hvp(params: Any, v: jax.Array) -> jax.Array:
            flat, unravel = ravel_pytree(params)
            grad = jax.grad(lambda p: loss(p, *batch))
            return ravel_pytree(jax.jvp(grad, (params,), (unravel(v.astype(flat.dtype)),))[1])[0]

        self.hvp = jax.jit(hvp)
        self.previous: np.ndarray | None = None

    def __call__(self, params: Any) -> float:
        """Compute lambda_max at `params` (copied: the runner donates its parameters).

        Args:
            params: the parameters.

        Returns:
            The largest (algebraic) eigenvalue of the Hessian; ARPACK's best estimate when it does not converge
            within 2000 iterations, NaN when it has none.
        """
        from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

        params = jax.tree.map(jnp.array, params)  # a copy: the runner donates its parameters
        n = self.ravel(params)[0].size

        def matvec(v: np.ndarray) -> np.ndarray:
            return np.asarray(self.hvp(params, jnp.asarray(np.ravel(v), jnp.float32)), dtype=np.float64)

        operator = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
        try:
            values, vectors = eigsh(operator, k=1, which="LA", tol=1e-5, v0=self.previous, ncv=min(n, 24),
                                    maxiter=2000)
        except ArpackNoConvergence as error:
            if len(error.eigenvalues) == 0:
                return math.nan
            values, vectors = error.eigenvalues, error.eigenvectors
        self.previous = vectors[:, 0]
        return float(values[0])


#: the header of the monitor's table
MONITOR_HEADER = (f"{'model':6} {'params':>8} {'base':5} {'k':>4} {'product':7} {'plain ms':>9} {'CPU x':>7} "
                  f"{'repeats':>13} {'tune x':>7} {'idle x':>7} {'wall x':>7} {'repeats':>13} {'tune x':>7} "
                  f"{'products/step':>13} {'mem x':>6}")


def format_monitor_row(r: dict[str, Any]) -> str:
    """Format one line of the monitor's table (under `MONITOR_HEADER`).

    Args:
        r: a row of `monitor_rows`.

    Returns:
        The line: CPU time ratios, then wall time ratios, products per step and the memory ratio; flagged when the
        CPU ratio is above the target.
    """
    flag = "" if r["time_ok"] else f"  <-- above {r['target']}"
    return (f"{r['model']:6} {_count(r['params']):>8} {r['base']:5} {r['every']:>4d} "
            f"{'exact' if r['exact'] else 'fd':7} {r['plain_ms']:9.2f} {r['cpu_ratio']:7.3f} "
            f"{r['cpu_ratio_min']:6.3f}-{r['cpu_ratio_max']:6.3f} {r['cpu_tune_ratio']:7.3f} "
            f"{r['cpu_idle_ratio']:7.3f} {r['ratio']:7.3f} "
            f"{r['ratio_min']:6.3f}-{r['ratio_max']:6.3f} {r['tune_ratio']:7.3f} {r['products_per_step']:13.4f} "
            f"{r['monitor_memory_ratio']:6.2f}{flag}")


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


#: the header of the routes' table
HEADER = (f"{'model':6} {'params':>8} {'route':22} {'probe':>5} {'tuned ms':>9} {'plain ms':>9} {'time x':>7} "
          f"{'target':>6} {'mem x':>6} {'target':>6}")


def format_row(r: dict[str, Any]) -> str:
    """Format one line of the routes' table (under `HEADER`).

    Args:
        r: a row of `run`.

    Returns:
        The line, flagged when a target is missed, and marked as not representative when the tuned run skipped
        steps or its loss is not finite.
    """
    flag = "" if r["time_ok"] and r["memory_ok"] else "  <-- above target"
    if r.get("skipped_steps") or not math.isfinite(r.get("final_loss", 0.0)):
        flag += "  (diverged: skipped steps, timing not representative)"
    return (f"{r['model']:6} {_count(r['params']):>8} {r['route']:22} {r['probe_every']!s:>5} {r['tuned_ms']:9.2f} "
            f"{r['plain_ms']:9.2f} {r['time_ratio']:7.2f} {r['time_target']:6.2f} {r['memory_ratio']:6.2f} "
            f"{r['memory_target']:6.2f}{flag}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line (`--help` lists the options); print the table, optionally a JSON.

    Rows are printed to stderr as they are measured and the whole table to stdout at the end. Unknown models or
    monitor bases print the usage and exit with status 2 (`argparse`'s `parser.error`).

    Args:
        argv: the arguments, without the program name (None: `sys.argv[1:]`).

    Returns:
        0.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn,gpt", type=lambda s: s.split(","),
                        help="comma-separated subset of mlp,cnn,gpt")
    parser.add_argument("--size", default="small", choices=sorted(SIZES),
                        help="small (CPU, default), gpu (the CDAT paper's model sizes), "
                             "gpt2-124m (GPT-2 124M, others small), tiny (smoke tests)")
    parser.add_argument("--base", default="sgd", choices=("sgd", "adam"))
    parser.add_argument("--lr", type=float, default=None, help="plain optimizer's learning rate")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--routes", default=",".join(ROUTES), type=lambda s: s.split(","))
    parser.add_argument("--probe-every", default="1,10", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per configuration")
    parser.add_argument("--warmup-blocks", type=int, default=1)
    parser.add_argument("--no-sharpness", dest="sharpness", action="store_false",
                        help="skip the sharpness-tracking row (blocks of 100 steps)")
    parser.add_argument("--sharpness-route", default=routes.AUTO, choices=routes.ALL,
                        help="route of the Hessian-vector products of the sharpness-tracking row")
    parser.add_argument("--warn", default="true", choices=sorted(WARN_MODES),
                        help="tune(..., warn=...): true (the library's default: warnings raised by diagnostics(), "
                             "no host callback in the step), jit (in-jit warnings through jax.debug.callback, "
                             "which slow every step) or false (no warnings)")
    parser.add_argument("--monitor", type=float, nargs="?", const=0.05, default=None, metavar="BUDGET",
                        help="measure the sharpness monitor's overhead at this monitor_budget (default 0.05) "
                             "instead of the routes")
    parser.add_argument("--monitor-bases", default="sgd,adam", type=lambda s: s.split(","),
                        help="comma-separated subset of sgd,adam")
    parser.add_argument("--monitor-block", type=int, default=300,
                        help="steps per timed block (rounded up to whole monitoring periods)")
    parser.add_argument("--monitor-repeats", type=int, default=7, help="timed blocks per configuration")
    parser.add_argument("--no-monitor-reference", dest="reference", action="store_false",
                        help="skip the tracking error (lambda_max to convergence before each monitored block)")
    parser.add_argument("--json", default=None, help="write the rows and the environment to this JSON file")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's malloc thresholds (no re-execution; see 'Host allocator' above)")
    args = parser.parse_args(argv)
    args.warn = WARN_MODES[args.warn]
    unknown = set(args.models) - set(BUILDERS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}")
    if set(args.monitor_bases) - set(MONITOR_BASES):
        parser.error("--monitor-bases takes sgd and/or adam")
    device = jax.devices()[0]
    malloc = "glibc defaults" if args.default_malloc else ", ".join(f"{k}={os.environ.get(k)}" for k in MALLOC_ENV)
    print(f"# jax {jax.__version__}, optax {optax.__version__}, device {device.device_kind} ({device.platform}), "
          f"{platform.processor() or platform.machine()}, malloc: {malloc}", file=sys.stderr)
    if args.monitor is not None:
        print(MONITOR_HEADER, file=sys.stderr)
        rows = monitor_rows(args)
        print(MONITOR_HEADER)
        for row in rows:
            print(format_monitor_row(row))
    else:
        print(HEADER, file=sys.stderr)
        rows = run(args)
        print(HEADER)
        for row in rows:
            print(format_row(row))
    peak = None
    if device.platform == "gpu":
        stats = device.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        if peak is not None:
            print(f"# device peak memory over the whole run: {peak / 2**30:.2f} GiB")
    if args.json:
        payload = {"jax": jax.__version__, "optax": optax.__version__, "device": device.device_kind, "malloc": malloc,
                   "platform": device.platform, "size": args.size, "device_peak_bytes": peak,
                   "targets": {"time_probe_every_1": TIME_TARGET[1], "time_probe_every_10": TIME_TARGET[10],
                               "sharpness_every_100": SHARPNESS_TARGET, "memory": MEMORY_TARGET,
                               "monitor": MONITOR_TARGET},
                   "rows": rows}
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
