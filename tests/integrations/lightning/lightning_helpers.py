"""Shared pieces of the Lightning callback tests (also imported by the DDP script the tests write)."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

TESTS = Path(__file__).resolve().parents[2]  # tests/: the scripts the tests write import this module without conftest
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from diagnostics_checks import measured, same_diagnostics  # noqa: E402, F401


def digits(n: int = 512, dtype: torch.dtype = torch.float32) -> TensorDataset:
    """scikit-learn's 8x8 digits (ships with the package), standardised per pixel."""
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    return TensorDataset(torch.tensor(x[:n], dtype=dtype), torch.tensor(y[:n]))


def loader(dataset: TensorDataset, batch_size: int = 64) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


class DigitsMLP(pl.LightningModule):
    """A plain LightningModule the callback must not need to know about (logs its loss like users do)."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, hidden: int = 32, scheduler: str | None = None,
                 dropout: float = 0.0, manual: bool = False, batch_norm: bool = False):
        super().__init__()
        torch.manual_seed(0)
        norm = torch.nn.BatchNorm1d(hidden) if batch_norm else torch.nn.Identity()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, hidden), norm, torch.nn.Tanh(), torch.nn.Dropout(dropout),
                                       torch.nn.Linear(hidden, 10))
        self.optimizer_name, self.lr, self.scheduler = optimizer, lr, scheduler
        self.automatic_optimization = not manual
        self.poison_batches: set[int] = set()  # global steps whose training_step loss is made NaN
        self.training_step_calls = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.training_step_calls += 1
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        if self.global_step in self.poison_batches:
            loss = loss * float("nan")
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        # counts the batches of the epoch: probes re-run training_step, and must not count
        self.log("batches_seen", 1.0, on_step=False, on_epoch=True, reduce_fx="sum")
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        elif self.optimizer_name == "momentum":
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        elif self.optimizer_name == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        elif self.optimizer_name == "rprop":
            optimizer = torch.optim.Rprop(self.parameters(), lr=self.lr)
        else:
            raise ValueError(self.optimizer_name)
        if self.scheduler == "linear":
            scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=8)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if self.scheduler == "warmup":  # factor t / 2 for 2 steps, from 0, then 1
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(t / 2, 1.0))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        return optimizer


class ShardedDigitsMLP(DigitsMLP):
    """DigitsMLP sharded with FSDP2 in configure_model, as ModelParallelStrategy asks (each layer, then the net)."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def full_loss(model: torch.nn.Module, dataset: TensorDataset) -> float:
    x, y = dataset.tensors
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


class Recorder(pl.Callback):
    """Records the tuner's diagnostics, the parameters and the gradient of every optimizer step."""

    def __init__(self, eos):
        self.eos = eos
        self.steps: list[dict] = []
        self.params: list[np.ndarray] = []
        self.grads: list[np.ndarray] = []  # the (clipped, accumulated) gradient the step used
        self.initial: np.ndarray | None = None
        self._seen = None

    def on_train_start(self, trainer, pl_module):
        self._seen = trainer.global_step
        self.initial = flat(pl_module.parameters())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._seen:
            self._seen = trainer.global_step
            self.steps.append(dict(self.eos.tuner.diagnostics))
            self.params.append(flat(pl_module.parameters()))
            self.grads.append(flat(p.grad if p.grad is not None else torch.zeros_like(p)
                                   for p in pl_module.parameters()))

    def lrs(self) -> list[float]:
        return [s["lr"] for s in self.steps]

    def applied_lrs(self) -> list[float]:
        """The lr each SGD step (no momentum, no weight decay) applied: w' - w = -lr g, so lr = -(w' - w).g / g.g."""
        before = [self.initial, *self.params[:-1]]
        return [float(-np.dot(after - start, g) / np.dot(g, g))
                for start, after, g in zip(before, self.params, self.grads, strict=True)]


def flat(tensors) -> np.ndarray:
    """The tensors as one float64 vector (sharded DTensors gathered whole: a collective, on every rank)."""
    whole = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors]
    return torch.cat([t.detach().reshape(-1) for t in whole]).numpy().astype(np.float64)


def trainer(tmp_path, callbacks, *, max_steps: int = 16, logger=None, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=logger if logger is not None else False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   log_every_n_steps=1, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


