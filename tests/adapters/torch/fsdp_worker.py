"""What tests/adapters/torch/test_fsdp.py runs on each of 2 gloo ranks (FSDP2) and in the single process.

A module of its own, imported by its plain name from this folder (the test puts the folder on ``sys.path``),
so that ``torch.multiprocessing.spawn`` can pickle :func:`train_worker` / :func:`resume_worker` by reference.

Every run trains a small pre-LN transformer (2 blocks, SDPA attention) for :data:`STEPS` steps on a fixed
batch of 16 sequences; rank r of 2 trains on sequences ``8r .. 8r + 7`` (the union batch is the single
process's). A run records, per step, the applied lr, the tracked sharpness and the loss, and the parameters
at the end (gathered whole from the shards).

The "cdat" run also monitors the sharpness (``monitor_budget``). Its schedule follows measured times, so the
monitor here reads a fake clock that advances one second per forward pass of the model: every rank and the single
process then tick on the same steps.
"""

import gc
import json
import os

import numpy as np
import torch
import torch.distributed as dist

from eos_core import CDAT, DCAO, ExactSharpness
from eos_core.adapters.torch import CurvatureTuner
from eos_core.adapters.torch import monitor as monitor_module

STEPS = 20
CHECKPOINT_AT = 10
WORLD = 2
RECORDED = ("lr", "sharpness", "loss", "step", "route", "sharpness_age", "sharpness_residual", "edge", "unstable",
            "monitor_every")


class Clock:
    """The monitor's fake ``time``: one second per forward pass of a :class:`TinyTransformer`."""

    now = 0.0

    def perf_counter(self):
        return Clock.now


monitor_module.time = Clock()


class Block(torch.nn.Module):
    def __init__(self, width=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.norm2 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width,
                                                                                                            width))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(torch.nn.Module):
    """5 input features per token, 2 blocks of width 16 (uneven shard sizes over 2 ranks: 3 classes, ...)."""

    def __init__(self, features=5, width=16, classes=3, depth=2):
        super().__init__()
        self.embed = torch.nn.Linear(features, width)
        self.blocks = torch.nn.ModuleList([Block(width) for _ in range(depth)])
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x):
        Clock.now += 1.0
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


def data(dtype):
    g = torch.Generator().manual_seed(7)
    return torch.randn(16, 6, 5, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)


LAWS = {
    # CDAT with an EMA, one-sided finite differences ("auto" under FSDP), lambda_max tracked by power iteration
    "cdat": (lambda: CDAT(scale=2.0, ema=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
             {"route": "auto", "sharpness_every": 4, "sharpness_iters": 30, "sharpness_tol": 1e-12,
              "monitor_budget": 0.25}),
    # the same without sharpness_every: every step takes the same forwards, so the monitor's measured step time is
    # the same before and after a checkpoint (its resume test: the interval that spans the checkpoint is not timed)
    "cdat-steady": (lambda: CDAT(scale=2.0, ema=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                    {"route": "auto", "monitor_budget": 0.25}),
    # CDAT on central differences (two extra gradients per probe)
    "cdat-central": (lambda: CDAT(scale=1.0), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                     {"route": "fd-central", "sharpness_every": 4, "sharpness_iters": 30, "sharpness_tol": 1e-12}),
    # lambda_max by power iteration on central-difference Hessian-vector products, AdamW
    "exact-sharpness": (lambda: ExactSharpness(scale=1.0, power_iters=6, power_tol=1e-12),
                        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01), {"route": "fd-central"}),
    # the top 2 eigenvalues by Lanczos; DCAO decides momentum and weight decay
    "dcao": (lambda: DCAO(num_eigenvalues=2, lanczos_steps=6),
             lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3), {"route": "fd-central"}),
}


#: the route a sharded run takes for each configured route
SHARDED_ROUTE = {"auto": "fd-onesided", "fd-onesided": "fd-onesided", "fd-central": "fd-central"}


def build(law_name, dtype, mesh=None, with_model=False, **overrides):
    """The model (FSDP2-sharded over ``mesh`` when given: each block, then the root), optimizer and tuner (given
    the model when ``with_model``: its FSDP modules are then resharded after an evaluation without gradient)."""
    from torch.distributed.fsdp import fully_shard

    law, make_optimizer, options = LAWS[law_name]
    torch.manual_seed(0)
    model = TinyTransformer().to(dtype)
    if mesh is not None:
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = make_optimizer(model.parameters())
    tuner = CurvatureTuner(optimizer, law(), model=model if with_model else None, **{**options, **overrides})
    if tuner.monitor is not None and mesh is None:
        tuner.monitor.exact_available = False  # as on sharded parameters: no checks against the exact product
    return model, optimizer, tuner


def train(model, optimizer, tuner, x, y, steps, first=0, before=None):
    """Steps ``first .. steps - 1``; ``before(step)`` runs before each."""
    history = []
    for step in range(first, steps):
        if before is not None:
            before(step)

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        tuner.step(closure)
        history.append({k: tuner.diagnostics[k] for k in RECORDED})
    return history


def one_step_from(law_name, dtype, path):
    """Load a full state dict saved by a sharded run into a fresh single-process model, optimizer and tuner (the
    optimizer state dict keyed by parameter names, as torch.distributed.checkpoint writes it), and take one step
    on the union batch: its diagnostics."""
    saved = torch.load(path, weights_only=True)
    x, y = data(dtype)
    model, optimizer, tuner = build(law_name, dtype, route=SHARDED_ROUTE[LAWS[law_name][2]["route"]])
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optim"])
    calls = tuner.calls
    history = train(model, optimizer, tuner, x, y, 1)
    return {"calls": calls, **history[0]}


def whole_parameters(model):
    """The parameters gathered whole (a collective under FSDP), as lists."""
    out = {}
    for name, p in model.named_parameters():
        value = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = value.detach().to(torch.float64).reshape(-1).tolist()
    return out


def single_process(law_name, dtype, steps=STEPS):
    """The reference: one process, whole parameters, the union batch, the route the sharded run resolves to."""
    x, y = data(dtype)
    model, optimizer, tuner = build(law_name, dtype, route=SHARDED_ROUTE[LAWS[law_name][2]["route"]])
    history = train(model, optimizer, tuner, x, y, steps)
    return history, whole_parameters(model), model, optimizer, tuner


def _dump(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


def close_process_group(finished):
    """As tests/adapters/torch/distributed_worker.py: free the FSDP objects, meet, then destroy the group."""
    gc.collect()
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def _mesh(shape):
    from torch.distributed.device_mesh import init_device_mesh

    if len(shape) == 1:
        return init_device_mesh("cpu", shape)
    return init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))


def _shard_batch(dtype, rank):
    x, y = data(dtype)
    return x[8 * rank:8 * (rank + 1)], y[8 * rank:8 * (rank + 1)]


def _full_state(model, optimizer):
    """The whole model and optimizer state (torch.distributed.checkpoint, full state dicts, on rank 0's CPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": get_model_state_dict(model, options=options),
            "optim": get_optimizer_state_dict(model, optimizer, options=options)}


def _checkpoint(model, optimizer, out_dir, name):
    """A sharded checkpoint (torch.distributed.checkpoint) and a full one (rank 0, torch.save)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sharded = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(sharded, checkpoint_id=os.path.join(out_dir, f"{name}-dcp"))
    full = _full_state(model, optimizer)
    if dist.get_rank() == 0:
        torch.save(full, os.path.join(out_dir, f"{name}-full.pt"))
        _dump(os.path.join(out_dir, f"{name}-layout.json"),
              {"top": sorted(map(str, full["optim"])), "group": sorted(full["optim"]["param_groups"][0]),
               "state": sorted(next(iter(full["optim"]["state"].values())))})
    dist.barrier()


def _check_start_and_routes(model, tuner, path):
    """Record whether this rank's shards of the spectral start vector, gathered, are random_start(seed) exactly,
    this rank's shard shape of the head's weight, and the error an exact route raises on sharded parameters."""
    from eos_core.spectral import random_start

    space = tuner.space
    seed = tuner.settings.seed
    start = space.random_start(seed, space.local())
    whole = [t.full_tensor() for t in space.saved(start)]
    expected = random_start([tuple(p.shape) for p in space.params], seed)
    equal = all(np.array_equal(w.to(torch.float64).numpy(), e) for w, e in zip(whole, expected, strict=True))
    names = [n for n, p in model.named_parameters() if any(p is q for q in space.params)]
    head = space.local()[names.index("head.weight")]
    try:
        CurvatureTuner(torch.optim.SGD(model.parameters(), lr=0.1), CDAT(), route="double-backward")
        refused = ""
    except ValueError as error:
        refused = str(error)
    _dump(path, {"equal": bool(equal), "head_shard": list(head.shape), "refused": refused})


def train_worker(rank, init_file, out_dir, runs):
    """Each run (a dict: name, law, dtype, mesh shape, checkpoint, snapshots): train STEPS steps on this rank's
    half of the batch; save a checkpoint before step CHECKPOINT_AT and the full state before each snapshot step."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    finished = False
    try:
        for run in runs:
            name, dtype = run["name"], getattr(torch, run["dtype"])
            x, y = _shard_batch(dtype, rank)
            model, optimizer, tuner = build(run["law"], dtype, _mesh(tuple(run["mesh"])),
                                            with_model=run.get("with_model", False))
            if run.get("start_check"):
                _check_start_and_routes(model, tuner, os.path.join(out_dir, f"{name}-start-rank{rank}.json"))

            def before(step, model=model, optimizer=optimizer, run=run):
                if run.get("checkpoint") and step == CHECKPOINT_AT:
                    _checkpoint(model, optimizer, out_dir, run["name"])
                if step in run.get("snapshots", ()):
                    full = _full_state(model, optimizer)
                    if rank == 0:
                        torch.save(full, os.path.join(out_dir, f"{run['name']}-at{step}.pt"))

            history = train(model, optimizer, tuner, x, y, STEPS, before=before)
            _dump(os.path.join(out_dir, f"{name}-rank{rank}.json"),
                  {"history": history, "params": whole_parameters(model), "sharded": tuner.sharded,
                   "calls": tuner.calls})
            del model, optimizer, tuner, before
        finished = True
    finally:
        close_process_group(finished)


def resume_worker(rank, init_file, out_dir, runs):
    """Fresh processes: build, load the checkpoint saved before CHECKPOINT_AT (``run["resume"]``: "dcp", sharded,
    or "full"), train to STEPS."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    finished = False
    try:
        for run in runs:
            name, kind, dtype = run["name"], run["resume"], getattr(torch, run["dtype"])
            x, y = _shard_batch(dtype, rank)
            model, optimizer, tuner = build(run["law"], dtype, _mesh(tuple(run["mesh"])))
            if kind == "dcp":
                state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
                dcp.load(state, checkpoint_id=os.path.join(out_dir, f"{name}-dcp"))
                set_model_state_dict(model, state["model"])
                set_optimizer_state_dict(model, optimizer, state["optim"])
            else:
                full = torch.load(os.path.join(out_dir, f"{name}-full.pt"), weights_only=True)
                options = StateDictOptions(full_state_dict=True)
                set_model_state_dict(model, full["model"], options=options)
                set_optimizer_state_dict(model, optimizer, full["optim"], options=options)
            resumed = {"calls": tuner.calls, "step": tuner.diagnostics.get("step")}
            history = train(model, optimizer, tuner, x, y, STEPS, first=CHECKPOINT_AT)
            resumed.update(history=history, params=whole_parameters(model))
            _dump(os.path.join(out_dir, f"{name}-{kind}-rank{rank}.json"), resumed)
            del model, optimizer, tuner
        finished = True
    finally:
        close_process_group(finished)
