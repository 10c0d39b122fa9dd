"""Sharded training: FSDP2 (``fully_shard``, DTensor parameters) with 2 gloo processes on CPU.

Two spawns for the whole module: one trains every configuration (saving checkpoints), one restarts from the
checkpoints. What is checked against a single process on the union batch:

* at the same state (the sharded run's full state loaded into a fresh single-process model, optimizer and
  tuner), one step gives the sharded step's lr: this isolates the tuner's sums over shards from the
  trajectory. float64: 1e-10 relative for central differences and the spectral estimates; 1e-8 for one-sided
  differences, whose quotient ``(g(w + h u) - g(w)).u / h`` turns the last-bit difference between a
  gradient reduce-scattered from two half batches and one computed on the union batch (1e-16) into ~5e-10 at
  h ~ 1e-8 (measured; the same holds for any two ways of summing the batch). float32: 1e-5.
* over 20 steps the trajectories drift apart from that per-step difference as training amplifies it (measured:
  central differences ~1e-9 after 20 steps from 1e-12 at the first, one-sided ~1e-7 with CDAT's EMA); the
  test bounds the drift with a margin over the measurement, and the parameters after gathering.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torch.distributed.fsdp")
from eos_core.adapters.torch.sharding import MIN_TORCH_SHARDED, torch_version  # noqa: E402

if torch_version() < MIN_TORCH_SHARDED or not torch.distributed.is_available():
    pytest.skip(f"FSDP2 tuning needs torch >= {MIN_TORCH_SHARDED}", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

HERE = Path(__file__).resolve().parent
#: name -> (law configuration, dtype, mesh shape, snapshot steps, trajectory tolerance on lr, per-step tolerance)
RUNS = {
    "cdat": ("cdat", "float64", [2], [4, 7, 13], 1e-5, 1e-8),
    "cdat-central": ("cdat-central", "float64", [2], [4, 12], 1e-7, 1e-10),
    "exact-sharpness": ("exact-sharpness", "float64", [2], [5, 15], 1e-10, 1e-10),
    "dcao": ("dcao", "float64", [2], [6, 14], 1e-10, 1e-10),
    "cdat-float32": ("cdat-central", "float32", [2], [4, 9], None, 1e-5),
    "cdat-with-model": ("cdat", "float64", [2], [6], 1e-5, 1e-8),
    "hsdp-1x2": ("exact-sharpness", "float64", [1, 2], [5], 1e-10, 1e-10),
    "hsdp-2x1": ("exact-sharpness", "float64", [2, 1], [5], 1e-10, 1e-10),
    "cdat-steady": ("cdat-steady", "float64", [2], [], None, None),
}
#: The run saved at step 10 and resumed in fresh processes. Not "cdat": its exact measurements every 4 steps
#: (sharpness_every) take 30 forwards of the fake clock, so its step times vary, and a resumed monitor cannot time
#: the interval that spans the checkpoint (`Monitor.start_step`): its measured step time then differs from the
#: uninterrupted run's, and since a stale reading's cycle (eos_core.monitor.is_stale) is charged, so can its ticks.
CHECKPOINTED = "cdat-steady"


@pytest.fixture(scope="module")
def workers():
    """The worker module, importable by name here and in the spawned ranks (they inherit ``sys.path``)."""
    sys.path.insert(0, str(HERE))
    import fsdp_worker

    yield fsdp_worker
    sys.path.remove(str(HERE))
    sys.modules.pop("fsdp_worker", None)


@pytest.fixture(scope="module")
def runs(workers, tmp_path_factory):
    """Train every configuration on 2 ranks, then restart from the checkpoints in fresh processes."""
    out = tmp_path_factory.mktemp("fsdp")
    specs = [{"name": name, "law": law, "dtype": dtype, "mesh": mesh, "snapshots": snapshots,
              "checkpoint": name == CHECKPOINTED, "start_check": name == "dcao", "with_model": "model" in name}
             for name, (law, dtype, mesh, snapshots, *_) in RUNS.items()]
    mp.spawn(workers.train_worker, args=(str(out / "init"), str(out), specs), nprocs=2, join=True)
    resume = [dict(spec, resume=kind) for spec in specs if spec["checkpoint"] for kind in ("dcp", "full")]
    mp.spawn(workers.resume_worker, args=(str(out / "init-resume"), str(out), resume), nprocs=2, join=True)
    return out


def result(out, name, rank):
    return json.loads((out / f"{name}-rank{rank}.json").read_text())


def relative(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-300)


def test_every_rank_applies_the_same_lr_on_its_shards(runs):
    assert result(runs, "cdat-with-model", 0)["history"] == result(runs, "cdat", 0)["history"]
    for name in RUNS:
        ranks = [result(runs, name, r) for r in range(2)]
        assert ranks[0]["history"] == ranks[1]["history"], name  # every diagnostic, bit for bit
        assert ranks[0]["params"] == ranks[1]["params"], name
        assert ranks[0]["sharded"] and ranks[0]["calls"] == 20, name
    routes = {h["route"] for h in result(runs, "cdat", 0)["history"]}
    assert routes == {"fd-onesided"}  # "auto" under FSDP
    lrs = [h["lr"] for h in result(runs, "cdat", 0)["history"]]
    assert len(set(lrs)) == len(lrs)  # the law does decide every step


@pytest.mark.parametrize("name", sorted(RUNS))
def test_sharded_equals_a_single_process_on_the_union_batch(runs, workers, name):
    law, dtype_name, _, snapshots, trajectory, per_step = RUNS[name]
    dtype = getattr(torch, dtype_name)
    sharded = result(runs, name, 0)
    for step in snapshots:  # the same state: one step each
        one = workers.one_step_from(law, dtype, runs / f"{name}-at{step}.pt")
        assert one["calls"] == step  # the tuner's state came with the optimizer's
        want = sharded["history"][step]
        assert relative(one["lr"], want["lr"]) <= per_step, (step, one["lr"], want["lr"])
        assert one["step"] == want["step"] == step and one["route"] == want["route"]
        if not np.isnan(want["sharpness"]):
            assert relative(one["sharpness"], want["sharpness"]) <= max(per_step, 1e-9)
    if trajectory is None:
        return
    history, params, *_ = workers.single_process(law, dtype)
    assert relative([h["lr"] for h in sharded["history"]], [h["lr"] for h in history]).max() <= trajectory
    tracked = [(a["sharpness"], b["sharpness"]) for a, b in zip(sharded["history"], history, strict=True)
               if not np.isnan(b["sharpness"])]
    if tracked:
        assert relative(*zip(*tracked, strict=True)).max() <= max(trajectory, 1e-9)
    for key, value in params.items():
        np.testing.assert_allclose(sharded["params"][key], value, rtol=0, atol=100 * trajectory)


def test_spectral_start_vectors_are_the_shards_of_random_start(runs):
    """DCAO's 6-step Lanczos depends on its start vector: the per-step equality above holds only because every
    rank starts from its shard of random_start(seed); here directly, on the worker's record."""
    records = [json.loads((runs / f"dcao-start-rank{rank}.json").read_text()) for rank in range(2)]
    assert all(record["equal"] for record in records)
    assert [record["head_shard"] for record in records] == [[2, 16], [1, 16]]  # 3 rows: uneven shards


@pytest.mark.parametrize("kind", ["dcp", "full"])
def test_resume_from_a_checkpoint_in_fresh_processes_is_bit_identical(runs, kind):
    full = result(runs, CHECKPOINTED, 0)
    for rank in range(2):
        resumed = json.loads((runs / f"{CHECKPOINTED}-{kind}-rank{rank}.json").read_text())
        assert resumed["calls"] == 10 and resumed["step"] == 9  # restored, and DCP's state init was not a step
        assert resumed["history"] == full["history"][10:]  # steps 11-20: every diagnostic, bit for bit
        assert resumed["params"] == full["params"]


def test_torch_distributed_checkpoint_keeps_the_tuner_state_where_it_is_written(runs):
    """get_optimizer_state_dict drops a top-level key; the first param group's keys and the per-parameter
    state are kept (torch/distributed/checkpoint/state_dict.py, _get_optim_state_dict)."""
    layout = json.loads((runs / f"{CHECKPOINTED}-layout.json").read_text())
    assert layout["top"] == ["param_groups", "state"]
    assert "eos_core" in layout["group"] and "eos_core_monitor_basis_0" in layout["state"]  # the monitor's vectors


def test_an_exact_route_is_refused_on_sharded_parameters(runs):
    record = json.loads((runs / "dcao-start-rank0.json").read_text())
    assert "cannot run on sharded (FSDP2 / DTensor) parameters" in record["refused"]


def test_the_sharpness_monitor_runs_on_sharded_parameters(runs):
    """The "cdat" run monitors the sharpness (one-sided finite differences through FSDP's backward; every rank takes
    the same ticks): between the exact measurements of sharpness_every=4 the monitor's estimate is reported, with
    its age, and it agrees with the single process's (the comparison above covers its values)."""
    history = result(runs, "cdat", 0)["history"]
    assert all(h["edge"] == pytest.approx(3.8) and h["unstable"] == 0.0 for h in history)
    assert all(h["sharpness_age"] == 0.0 for h in history[::4])  # exact measurements
    ticks = [h["step"] for h in history if h["sharpness_age"] == 0.0 and h["step"] % 4]
    assert ticks and all(np.isfinite(h["sharpness"]) for h in history)
    # a product is one forward pass of the fake clock; a step at least two (CDAT's probe), more with sharpness_every
    assert all(1 <= h["monitor_every"] <= 8 for h in history)
