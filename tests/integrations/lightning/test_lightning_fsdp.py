"""FSDP2 through Lightning's ModelParallelStrategy, 2 CPU processes (gloo): unchanged user code, the callback as for
DDP. The LightningModule applies ``fully_shard`` in ``configure_model`` (what the strategy asks); the strategy
builds its device mesh with ``init_device_mesh("cpu", ...)`` and saves the optimizer through
``torch.distributed.checkpoint`` (sharded by default, whole with ``save_distributed_checkpoint=False``).

Lightning's launcher starts the other rank by re-running the script, so the training runs in a script written to
tmp_path; each rank writes what it saw to its own file. ``FSDPStrategy`` (``strategy="fsdp"``) is FSDP1 and needs
a GPU in Lightning 2.6 (``accelerator_connector``: "The strategy `fsdp` requires a GPU accelerator"): only its
refusal by the callback is tested here.
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from eos_core import CDAT
from eos_core.adapters.torch.sharding import MIN_TORCH_SHARDED, torch_version
from eos_core.integrations.lightning import EdgeOfStabilityCallback

HERE = Path(__file__).resolve().parent

SCRIPT = """
import gc, json, sys, warnings
sys.path.insert(0, {helpers!r})
import torch.distributed as dist
warnings.simplefilter("ignore")
import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_helpers import Recorder, ShardedDigitsMLP, digits, loader, measured
from eos_core import CDAT
from eos_core.integrations.lightning import EdgeOfStabilityCallback


class Logged(pl.Callback):
    \"\"\"What the callback logged as eos/lr at each step, on this rank (placed after the callback).\"\"\"

    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(trainer.callback_metrics["eos/lr"]))


def fit(epochs, ckpt_path=None, save=None, distributed=True):
    # one batch per epoch and rank (32 of the 64 samples), so that a resumed fit sees the batches the
    # uninterrupted one saw; stopping by max_epochs (Lightning resumes an end-of-epoch checkpoint under max_steps
    # with one more batch)
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.5), sharpness_every=2, sharpness_iters=30,
                                  sharpness_tol=1e-6)
    recorder, logged = Recorder(eos), Logged()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                     save_distributed_checkpoint=distributed)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=epochs, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[eos, recorder, logged], default_root_dir={out!r})
    model = ShardedDigitsMLP(optimizer="sgd", lr=0.01)
    trainer.fit(model, loader(digits(64), batch_size=32), ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    record = {{"lr": recorder.lrs(), "applied": recorder.applied_lrs() if ckpt_path is None else None,
              "logged": logged.values, "sharpness": [measured(s, "sharpness") for s in recorder.steps],
              "residual": [measured(s, "sharpness_residual") for s in recorder.steps],
              "route": eos.tuner.route, "sharded": eos.tuner.sharded, "world": trainer.world_size,
              "calls": eos.tuner.calls, "params": recorder.params[-1].tolist()}}
    del trainer, model, eos, recorder, logged
    gc.collect()
    return record


if __name__ == "__main__":
    runs = {{"straight": fit(6)}}
    for kind, distributed in (("sharded", True), ("full", False)):
        path = {out!r} + "/" + kind + ".ckpt"
        runs[kind + "-first"] = fit(3, save=path, distributed=distributed)
        runs[kind + "-resumed"] = fit(6, ckpt_path=path, distributed=distributed)
    with open({out!r} + f"/rank{{dist.get_rank()}}.json", "w") as f:
        json.dump(runs, f)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.skipif(torch_version() < MIN_TORCH_SHARDED, reason=f"FSDP2 tuning needs torch >= {MIN_TORCH_SHARDED}")
def test_model_parallel_strategy_with_fsdp2_tunes_logs_and_resumes(tmp_path):
    script = tmp_path / "train_fsdp.py"
    script.write_text(SCRIPT.format(helpers=str(HERE), out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("LOCAL_RANK", None)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "terminate called" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank: the same lr, logged values, sharpness and parameters
    straight = ranks[0]["straight"]
    assert straight["world"] == 2 and straight["sharded"] and straight["route"] == "fd-onesided"
    assert len(straight["lr"]) == 6 and len(set(straight["lr"])) == 6
    # the lr the SGD step applied, read off the gathered parameters and gradient: the lr the tuner reports
    assert straight["applied"] == pytest.approx(straight["lr"], rel=1e-5)
    assert straight["logged"] == pytest.approx(straight["lr"], rel=1e-7)  # logged as a float32 tensor
    # sharpness on every step: tracked exactly on steps 0, 2, 4 (no monitor residual), the sharpness monitor's
    # estimate (on by default; finite differences through the shards) in between
    assert all(value is not None for value in straight["sharpness"])
    assert [r is None for r in straight["residual"]] == [True, False] * 3
    for kind in ("sharded", "full"):  # a distributed checkpoint folder, and one file assembled on rank 0
        assert ranks[0][f"{kind}-first"]["lr"] == straight["lr"][:3]
        resumed = ranks[0][f"{kind}-resumed"]
        assert resumed["calls"] == 6  # 3 restored, 3 taken
        assert resumed["lr"] == straight["lr"][3:]  # bit-identical
        assert resumed["params"] == straight["params"]
        # the monitor's state came back too: its estimates on the untracked steps are the uninterrupted run's
        assert resumed["sharpness"][0::2] == straight["sharpness"][3::2]


def test_fsdp1_and_deepspeed_strategies_are_refused_with_a_way_out():
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    eos = EdgeOfStabilityCallback(CDAT(scale=2.0))
    module = types.SimpleNamespace(automatic_optimization=True)
    with pytest.raises(ValueError, match="FSDPStrategy .* is FSDP1.*ModelParallelStrategy"):
        eos._check(types.SimpleNamespace(strategy=FSDPStrategy(), accumulate_grad_batches=1), module)
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # constructing one needs the deepspeed package
    with pytest.raises(ValueError, match="DeepSpeedStrategy replaces the optimizer"):
        eos._check(types.SimpleNamespace(strategy=deepspeed, accumulate_grad_batches=1), module)

