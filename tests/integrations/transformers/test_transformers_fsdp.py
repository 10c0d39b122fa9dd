"""The Trainer with FSDP2 (accelerate's ``fully_shard``), torchrun, 2 CPU processes (gloo): the callback unchanged.

accelerate 1.16 turns FSDP on only for GPU-type distributed runs: ``AcceleratorState.__init__`` sets
``DistributedType.FSDP`` inside ``elif self.distributed_type in [MULTI_GPU, MULTI_MLU, ..., MULTI_NEURON]``, and a
CPU run is ``MULTI_CPU``, so on CPU ``TrainingArguments(fsdp=...)`` is silently ignored (the Trainer runs DDP).
The test therefore takes the layer below: ``CPUFSDPTrainer`` sets, right after the Trainer made its
``Accelerator``, the two things accelerate sets on GPUs (``state.distributed_type = FSDP`` and the FSDP plugin
built from the same ``TrainingArguments``), and then the unmodified Trainer runs accelerate's FSDP2 path on
CPU: ``fsdp2_prepare_model`` shards the model, the optimizer holds DTensors, checkpoints go through
``save_fsdp_optimizer`` / ``load_fsdp_optimizer`` (``torch.distributed.checkpoint``, ``SHARDED_STATE_DICT``;
``FULL_STATE_DICT`` fails in ``save_pretrained``'s tied-weight check on DTensors, on CPU, before the optimizer
is saved).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hf_helpers import launch_env

from eos_core.adapters.torch.sharding import MIN_TORCH_SHARDED, torch_version

HERE = Path(__file__).resolve().parent

SCRIPT = """
import contextlib, gc, io, json, logging, os, sys, warnings
import torch.distributed as dist
warnings.simplefilter("ignore")
logging.disable(logging.WARNING)
sys.path.insert(0, {helpers!r})
from hf_helpers import StepRecorder, TokenData, Trainer, arguments, logged, measured, tiny_gpt2
from eos_core import CDAT
from eos_core.integrations.transformers import EdgeOfStabilityCallback


class CPUFSDPTrainer(Trainer):
    \"\"\"What accelerate does on GPUs, done on CPU (see the test module's docstring).\"\"\"

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None:
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True


def run(out, resume=None):
    # the route "auto" takes under FSDP, for the single process too
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9), probe_every=2, sharpness_every=3, route="fd-onesided")
    recorder = StepRecorder(eos)
    sharded = world > 1
    args = arguments(out, max_steps=4, per_device_train_batch_size=8 // world, max_grad_norm=0.0,
                     save_strategy="steps", save_steps=2, ddp_backend="gloo" if sharded else None,
                     fsdp=["full_shard"] if sharded else "",
                     fsdp_config={{"version": 2, "state_dict_type": "SHARDED_STATE_DICT"}} if sharded else None)
    trainer = CPUFSDPTrainer(model=tiny_gpt2(seed=1 if resume else 0), args=args, train_dataset=TokenData(),
                             callbacks=[eos, recorder])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train(resume_from_checkpoint=resume)
    record = {{"lr": recorder.lrs(), "logged": logged(trainer, "eos/lr"),
              "sharpness": [measured(s, "sharpness") for s in recorder.steps], "route": eos.tuner.route,
              "sharded": eos.tuner.sharded, "calls": eos.tuner.calls, "params": recorder.params[-1][:256].tolist(),
              "files": sorted(os.listdir(out + "/checkpoint-2")) if not resume else None}}
    del trainer, recorder, eos
    gc.collect()
    return record


world = int(os.environ.get("WORLD_SIZE", "1"))
rank = os.environ.get("RANK", "0")
out = {out!r} + f"/world{{world}}"
record = {{"straight": run(out)}}
if world > 1:
    record["resumed"] = run(out + "-resumed", resume=out + "/checkpoint-2")
with open(out + f"-rank{{rank}}.json", "w") as f:
    json.dump(record, f)
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.skipif(torch_version() < MIN_TORCH_SHARDED, reason=f"FSDP2 tuning needs torch >= {MIN_TORCH_SHARDED}")
def test_fsdp2_ranks_tune_alike_log_the_applied_lr_and_resume(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(helpers=str(HERE), out=str(tmp_path)))
    env = launch_env()
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    fsdp = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert fsdp.returncode == 0, fsdp.stderr[-5000:]
    single = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-5000:]

    ranks = [json.loads((tmp_path / f"world2-rank{r}.json").read_text()) for r in range(2)]
    one = json.loads((tmp_path / "world1-rank0.json").read_text())["straight"]
    assert ranks[0] == ranks[1]  # every rank: the same lr, logs, sharpness and (gathered) parameters
    straight = ranks[0]["straight"]
    assert straight["sharded"] and straight["route"] == "fd-onesided" and not one["sharded"]
    assert "optimizer_0" in straight["files"]  # a torch.distributed.checkpoint folder, no optimizer.pt
    assert straight["logged"] == straight["lr"]  # the logged eos/lr is the lr applied, on every rank
    assert straight["lr"][0] == straight["lr"][1] != straight["lr"][2] == straight["lr"][3]  # probe_every=2
    # the first step of a single process on the union batch (same route): float32 finite differences agree to
    # ~1e-6 there (see tests/adapters/torch/test_fsdp.py for the measured float32 drift afterwards)
    assert straight["lr"][0] == pytest.approx(one["lr"][0], rel=1e-4)
    resumed = ranks[0]["resumed"]
    assert resumed["calls"] == 4  # the tuner found its state in the optimizer the Trainer loaded
    assert resumed["lr"] == straight["lr"][2:] and resumed["sharpness"] == straight["sharpness"][2:]
    assert resumed["params"] == straight["params"]


def test_fsdp1_and_deepspeed_arguments_are_refused_and_fsdp2_is_not():
    import types

    from eos_core.integrations.transformers import _check_arguments

    def arguments(**overrides):
        return types.SimpleNamespace(**{"n_gpu": 1, "label_smoothing_factor": 0.0, "deepspeed": None, "fsdp": [],
                                        "fsdp_config": None, **overrides})

    _check_arguments(arguments(fsdp=["full_shard"], fsdp_config={"version": 2}))
    _check_arguments(arguments(fsdp=["full_shard"], fsdp_config={}))  # transformers 5: version 2 by default
    with pytest.raises(ValueError, match="FSDP1"):
        _check_arguments(arguments(fsdp=["full_shard"], fsdp_config={"version": 1}))
    with pytest.raises(ValueError, match="DeepSpeed"):
        _check_arguments(arguments(deepspeed="ds_config.json"))
