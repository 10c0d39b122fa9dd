"""strategy="ddp" with 2 CPU processes (gloo): every rank applies the same learning rate.

Lightning's DDP launcher starts the other rank by re-running the script, so the training runs in a small
script written to tmp_path; each rank writes what it saw to its own file.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SCRIPT = """
import gc, json, sys, warnings
sys.path.insert(0, {helpers!r})
import torch.distributed as dist
warnings.simplefilter("ignore")
import lightning.pytorch as pl
from lightning_helpers import DigitsMLP, Recorder, digits, loader, measured
from eos_core import CDAT
from eos_core.integrations.lightning import EdgeOfStabilityCallback

if __name__ == "__main__":
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.5), sharpness_every=2, sharpness_iters=30, sharpness_tol=1e-6)
    recorder = Recorder(eos)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[eos, recorder], default_root_dir={out!r})
    model = DigitsMLP(optimizer="momentum", lr=0.01)
    trainer.fit(model, loader(digits(256), batch_size=32))  # each rank: 16 of the 32 samples of a step
    record = {{"lr": recorder.lrs(), "loss": [s["loss"] for s in recorder.steps],
               "sharpness": [measured(s, "sharpness") for s in recorder.steps], "world": trainer.world_size,
               "params": recorder.params[-1].tolist()}}
    with open({out!r} + f"/rank{{trainer.global_rank}}.json", "w") as f:
        json.dump(record, f)
    # Lightning leaves a gloo group to the interpreter's exit, where it can abort a rank ("terminate called
    # without an active exception"): free the trainer (and its DDP reducer), meet, then destroy the group.
    del trainer, model, eos, recorder
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
"""


def test_two_ddp_processes_apply_the_same_lr(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT.format(helpers=str(HERE), out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("LOCAL_RANK", None)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    # rank 1 is a child of rank 0 whose exit status Lightning does not report: its stderr is in ours
    assert "terminate called" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert len(ranks[0]["lr"]) == 6
    assert ranks[0]["lr"] == ranks[1]["lr"]  # exactly the same lr on every rank
    assert ranks[0]["sharpness"] == ranks[1]["sharpness"] and ranks[0]["sharpness"][0] is not None
    assert ranks[0]["params"] == ranks[1]["params"]  # so the replicas stay identical
    assert ranks[0]["loss"] != ranks[1]["loss"]  # although each rank measured on its own shard
    assert len(set(ranks[0]["lr"])) > 1
