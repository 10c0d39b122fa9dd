"""The training both sides of tests/adapters/torch/test_distributed.py run: a spawned rank and the single process.

A module of its own, imported by its plain name from this folder (the test puts the folder on
``sys.path``), so that ``torch.multiprocessing.spawn`` can pickle :func:`worker` by reference and the
child processes can import it, whatever pytest's import mode and however pytest was started.
"""

import gc
import json
import math
import os
import warnings

import torch
import torch.distributed as dist

from eos_core import CDAT, AdaEoS
from eos_core.adapters.torch import CurvatureTuner

STEPS = 6


def data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)


def build(law):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    return model, optimizer


def run(model, optimizer, tuner, x, y):
    out = []
    for _ in range(STEPS):
        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        tuner.step(closure)
        out.append({k: tuner.diagnostics[k] for k in ("lr", "sharpness") if k in tuner.diagnostics})
    return out


LAWS = {"cdat": lambda: CDAT(scale=2.0), "adaeos": lambda: AdaEoS(gamma=0.5, lr_init=0.05)}


def train_shard(rank, law_name, route):
    x, y = data()
    shard = slice(rank * 16, (rank + 1) * 16)
    model, optimizer = build(law_name)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    tuner = CurvatureTuner(optimizer, LAWS[law_name](), route=route, model=ddp, sharpness_every=2,
                           sharpness_iters=50, sharpness_tol=1e-9)
    return run(ddp, optimizer, tuner, x[shard], y[shard])


def train_measuring_with_a_nan_on_one_rank(rank):
    """Monitoring only (law=None, the sharpness monitor on): rank 1's loss is NaN at step 3, so the all-reduced
    gradient is NaN on both ranks; the history of `skipped` and the parameters after the run."""
    x, y = data()
    shard = slice(rank * 16, (rank + 1) * 16)
    model, optimizer = build(None)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    tuner = CurvatureTuner(optimizer, None, model=ddp, monitor_budget=0.05)
    out = []
    for step in range(STEPS):
        def closure(step=step):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(ddp(x[shard]), y[shard])
            if step == 3 and rank == 1:
                loss = loss * math.nan
            loss.backward()
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped step's RuntimeWarning
            tuner.step(closure)
        out.append({"skipped": tuner.diagnostics["skipped"]})
    out.append({"params": [p.detach().flatten().tolist() for p in model.parameters()]})
    return out


def close_process_group(finished):
    """Tear gloo down while every rank is alive and idle.

    Destroying the group while the other rank is still in a collective, or leaving it (or a DDP reducer
    that holds it) to the interpreter's exit, can kill a rank with SIGABRT ("terminate called without an
    active exception"). So: free the DDP objects first (reference cycles), meet at a barrier when this
    rank finished (after an error the other rank may never arrive), then destroy the group.
    """
    gc.collect()
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def worker(rank, world, init_file, out_dir, law_name, route):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    finished = False
    try:
        # the DDP model and the tuner die with the function's frame
        history = (train_measuring_with_a_nan_on_one_rank(rank) if law_name == "measuring-nan"
                   else train_shard(rank, law_name, route))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(history, f)
        finished = True
    finally:
        close_process_group(finished)
