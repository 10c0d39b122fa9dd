"""Shared pieces of the Hugging Face Trainer callback tests: tiny models from configs, synthetic token data."""

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import TrainerCallback, TrainingArguments

TESTS = Path(__file__).resolve().parents[2]  # tests/: the scripts the tests write import this module without conftest
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from diagnostics_checks import measured, same_diagnostics  # noqa: E402, F401

#: `TrainingArguments.train_sampling_strategy` exists in recent releases only (not in 4.48, the lowest admitted)
HAS_SAMPLING_STRATEGY = "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}


def launch_env() -> dict:
    """The environment of a test's training subprocesses (one process, or ranks under torchrun): this one, offline,
    one thread, without a parent's distributed variables, and without ACCELERATE_* (transformers 4.48 writes
    ACCELERATE_MIXED_PRECISION into os.environ during a bf16 test: the ranks would train under bf16 autocast)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env

class Trainer(transformers.Trainer):
    """The Trainer, drawing the training batches in order on every release (sequential sampling).

    Recent releases take `train_sampling_strategy="sequential"` (see `arguments`); older ones get a
    SequentialSampler here, which accelerate splits across data-parallel ranks the same way.
    """

    def _get_train_sampler(self, *args, **kwargs):
        if HAS_SAMPLING_STRATEGY:
            return super()._get_train_sampler(*args, **kwargs)
        return torch.utils.data.SequentialSampler(self.train_dataset)

VOCAB, LENGTH = 64, 16


class TokenData(torch.utils.data.Dataset):
    """Sequences that count up modulo the vocabulary from a random start: learnable next-token structure."""

    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.ids = (start + torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    config._attn_implementation = "sdpa"  # the CPU flash kernel: not twice differentiable
    return transformers.GPT2LMHeadModel(config)


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    config._attn_implementation = "sdpa"
    return transformers.BertForMaskedLM(config)


class MeanLossModel(torch.nn.Module):
    """A plain module (no **kwargs in forward): the Trainer divides its loss by the accumulation steps."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.out = torch.nn.Linear(16, VOCAB)

    def forward(self, input_ids, labels=None):
        logits = self.out(torch.tanh(self.embed(input_ids)))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return {"loss": loss, "logits": logits}


class StepRecorder(TrainerCallback):
    """Records the tuner's diagnostics, the scheduler's lr and the parameters at every optimizer step."""

    def __init__(self, eos):
        self.eos = eos
        self.steps: list[dict] = []
        self.scheduler_lrs: list[float] = []
        self.params: list[np.ndarray] = []
        self.grads: list[np.ndarray] = []  # the (clipped, accumulated) gradient each step used
        self.initial: np.ndarray | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = flat(model)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.scheduler_lrs.append(float(optimizer.param_groups[0]["lr"]))

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append(dict(self.eos.tuner.diagnostics))
        self.params.append(flat(model))
        self.grads.append(flat_tensors(p.grad if p.grad is not None else torch.zeros_like(p)
                                       for p in model.parameters()))

    def lrs(self) -> list[float]:
        return [s["lr"] for s in self.steps]

    def applied_lrs(self) -> list[float]:
        """The lr each SGD step (no momentum, no weight decay) applied: w' - w = -lr g, so lr = -(w' - w).g / g.g."""
        before = [self.initial, *self.params[:-1]]
        return [float(-np.dot(after - start, g) / np.dot(g, g))
                for start, after, g in zip(before, self.params, self.grads, strict=True)]


def flat_tensors(tensors) -> np.ndarray:
    """The tensors as one float64 vector (sharded DTensors gathered whole: a collective, on every rank)."""
    whole = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors]
    return torch.cat([t.detach().reshape(-1) for t in whole]).numpy().astype(np.float64)


def flat(model: torch.nn.Module) -> np.ndarray:
    return flat_tensors(model.parameters())


def arguments(tmp_path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=8, logging_steps=1,
                   report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-3,
                   lr_scheduler_type="constant", seed=0, dataloader_num_workers=0)
    if HAS_SAMPLING_STRATEGY:
        options["train_sampling_strategy"] = "sequential"
    options.update(overrides)
    return TrainingArguments(**options)


def train(tmp_path, model, eos, *, data=None, resume=None, optimizers=(None, None), **overrides):
    recorder = StepRecorder(eos)
    trainer = Trainer(model=model, args=arguments(tmp_path, **overrides), train_dataset=data or TokenData(),
                      callbacks=[eos, recorder], optimizers=optimizers)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


class LinearRegression(torch.nn.Module):
    """A least-squares fit of the sequences' mean token from their tokens: a quadratic loss, its Hessian the same at
    every point (lambda_max about 11 on TokenData), so gradient descent above lr = 2 / lambda_max diverges."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(LENGTH, 1)

    def forward(self, input_ids, labels=None):
        x = input_ids.float() / VOCAB
        prediction = self.linear(x).squeeze(-1)
        loss = torch.nn.functional.mse_loss(prediction, labels.float().mean(-1) / VOCAB)
        return {"loss": loss, "logits": prediction}
