"""Data parallel: two gloo processes agree with each other and with one process on the union batch."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent


@pytest.fixture
def workers(monkeypatch):
    """The worker module, importable by name here and in the spawned ranks (they inherit ``sys.path``)."""
    monkeypatch.syspath_prepend(str(HERE))
    import distributed_worker

    yield distributed_worker
    sys.modules.pop("distributed_worker", None)


@pytest.mark.parametrize("law_name,route", [("cdat", "double-backward"), ("cdat", "fd-onesided"),
                                            ("adaeos", "double-backward")])
def test_two_process_ddp_matches_single_process_on_the_union_batch(tmp_path, workers, law_name, route):
    mp.spawn(workers.worker, args=(2, str(tmp_path / "init"), str(tmp_path), law_name, route), nprocs=2,
             join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank used exactly the same learning rate

    x, y = workers.data()
    model, optimizer = workers.build(law_name)
    tuner = workers.CurvatureTuner(optimizer, workers.LAWS[law_name](), route=route, sharpness_every=2,
                                   sharpness_iters=50, sharpness_tol=1e-9)
    single = workers.run(model, optimizer, tuner, x, y)
    tolerance = 1e-9 if route == "double-backward" else 1e-4
    for a, b in zip(ranks[0], single, strict=True):
        assert a["lr"] == pytest.approx(b["lr"], rel=tolerance)
        assert a["sharpness"] == pytest.approx(b["sharpness"], rel=1e-6, nan_ok=True)  # NaN when not tracked


def test_measuring_only_skips_a_step_on_every_rank_when_one_ranks_loss_is_nan(tmp_path, workers):
    """law=None under data parallelism reads the (all-reduced) gradient on every step: a NaN loss on one rank makes
    every rank skip, and the replicas stay equal and finite (a rank that checked its loss alone would step with the
    NaN gradient while the other skipped)."""
    mp.spawn(workers.worker, args=(2, str(tmp_path / "init"), str(tmp_path), "measuring-nan", None), nprocs=2,
             join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for history in ranks:
        assert [h["skipped"] for h in history[:-1]] == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    params = [history[-1]["params"] for history in ranks]
    assert params[0] == params[1]
    assert all(all(map(math.isfinite, p)) for p in params[0])


@pytest.mark.parametrize("backend, like, expected", [
    ("nccl", "cpu", "cuda:3"),  # NCCL takes no CPU tensor: scalars' buffers go to the current GPU
    ("nccl", "cuda:1", "cuda:1"),
    ("gloo", "cuda:1", "cpu"),
    ("gloo", "cpu", "cpu"),
    ("cpu:gloo,cuda:nccl", "cuda:0", "cuda:0"),
    ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
])
def test_collective_buffers_go_where_the_backend_takes_them(monkeypatch, backend, like, expected):
    from eos_core.adapters.torch.distributed import Reducer

    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert Reducer.device_for(torch.device(like), None) == torch.device(expected)
