"""The suite's tasks: a character-level GPT, a small CNN and an MLP, all on data that exists offline.

Every task is deterministic given the seed: the seed draws the initial weights and the sequence of
training batches (and their augmentation); the validation set is fixed and the same for every seed.
Each method of a seed therefore sees exactly the same batches in the same order, so the per-seed
ratios compare methods on identical data.

* `chargpt`: a 2-layer, width-64, 4-head GPT with tied embeddings and context 64 (about 120k
  parameters) on ~1.8 MB of the running Python's own standard-library `*.py` source (byte vocabulary),
  batch 32, 1000 steps; validation loss (nats per byte) on 50 fixed held-out batches.
* `cnn`: a 3-convolution ReLU network (width 16, 8,410 parameters) on scikit-learn's 8x8 digits with a
  fixed 1000 / 797 train / validation split, batch 32, 1500 steps (48 epochs). Augmentation: random shifts
  of up to 2 pixels each way and Gaussian pixel noise (std 0.75 of the standardised pixels, fresh for every
  batch). The validation set is the 797 held-out images plus 3 fixed shifted copies of each (3188 images)
  with fixed noise of the same std, so its loss measures the task the augmentation trains for. Clean digits
  are solved to a validation loss of ~0.01-0.06 within a few epochs, where the final loss is decided by a
  handful of images and moves by 20% between neighbouring peak lrs and seeds; with the noise the best
  schedule ends near 0.45 and neighbouring configurations differ by a few percent.
* `mlp`: MLP 40-256-256-10 ReLU on MNIST-1D (`mnist1d.data.make_dataset` with the package's default
  arguments but `num_samples=20000`: 16000 / 4000 split, so the MLP does not overfit within the run;
  inputs standardised per feature with the training statistics), batch 32, 1500 steps (3 epochs).
"""

from __future__ import annotations

import functools
import hashlib
import math
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: (inputs, integer targets) of one mini-batch
Batch = tuple[torch.Tensor, torch.Tensor]

#: size of the chargpt corpus in bytes (training + validation text)
CORPUS_BYTES = 1_800_000
#: every VAL_EVERY-th selected stdlib file goes to the validation text
VAL_EVERY = 10
#: steps of a `--quick` run (smoke test)
QUICK_STEPS = 20
#: fixed seed of the validation batches and of the cnn train / validation split (independent of the run seed)
DATA_SEED = 1234


@dataclass
class Task:
    """One benchmark task.

    Attributes:
        name: task name on the command line.
        steps: training steps of a run.
        batch_size: training mini-batch size.
        make_model: `seed -> nn.Module` (float32, initial weights drawn from `torch.manual_seed(seed)`).
        sampler: `(seed, steps) -> (step -> batch)`, the training batches of a run.
        loss: `(model, batch) -> scalar loss tensor` (mean over the batch).
        val_batches: the fixed validation batches.
        quick: a smoke-test size (`--quick`): `QUICK_STEPS` steps and less validation data (chargpt: also batch
            4 and context 16).
        info: what the task is, for the JSON and the report.
    """

    name: str
    steps: int
    batch_size: int
    make_model: Callable[[int], nn.Module]
    sampler: Callable[[int, int], Callable[[int], Batch]]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    val_batches: list[Batch]
    quick: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def validation_loss(self, model: nn.Module) -> float:
        """Mean loss over the fixed validation batches (the model in eval mode, then restored)."""
        was_training = model.training
        model.eval()
        batches = self.val_batches
        total = sum(float(self.loss(model, b)) * len(b[1]) for b in batches)
        count = sum(len(b[1]) for b in batches)
        model.train(was_training)
        return total / count


def cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss of every task: cross-entropy of the model's logits, averaged over the batch (and positions).

    Args:
        model: maps the inputs to logits, the classes on the last axis.
        batch: (inputs, integer targets); for chargpt both are (batch, context) and every position counts.

    Returns:
        The mean cross-entropy in nats, a scalar tensor (differentiable).
    """
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# ------------------------------------------------------------------------------------------------
# chargpt
# ------------------------------------------------------------------------------------------------
def stdlib_files() -> list[Path]:
    """List the running Python's own standard-library source files.

    Returns:
        The `*.py` files under `sysconfig.get_paths()["stdlib"]`, sorted by relative path, without those under a
        `site-packages`, `dist-packages`, `test`, `tests`, `idle_test`, `lib2to3` or `__pycache__` folder.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "lib2to3", "__pycache__"}
    return sorted((p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)),
                  key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=1)
def stdlib_corpus(size: int = CORPUS_BYTES) -> tuple[bytes, bytes, dict[str, Any]]:
    """The chargpt corpus: about `size` bytes of the standard library's source (cached).

    Every k-th file of `stdlib_files()` with k = max(1, total bytes // `size`), so that the selection is a little
    over `size`; split by file (every `VAL_EVERY`-th selected file is validation text, each file followed by a
    newline); the validation text cut to at most `size // VAL_EVERY` bytes and the training text to the rest of
    `size`. The corpus depends on the Python version; the description's digest identifies it.

    Args:
        size: the corpus size in bytes (training + validation).

    Returns:
        (train bytes, validation bytes, description): the description holds the file count, the stride k, both
        parts' sizes, the first 16 hex digits of a sha256 of both parts and the stdlib's path.
    """
    files = stdlib_files()
    total = sum(p.stat().st_size for p in files)
    stride = max(1, total // size)
    chosen = files[::stride]
    train, val = bytearray(), bytearray()
    for i, path in enumerate(chosen):
        (val if i % VAL_EVERY == VAL_EVERY - 1 else train).extend(path.read_bytes() + b"\n")
    n_val = min(len(val), size // VAL_EVERY)
    n_train = min(len(train), size - n_val)
    train_b, val_b = bytes(train[:n_train]), bytes(val[:n_val])
    digest = hashlib.sha256(train_b + b"\0" + val_b).hexdigest()[:16]
    info = {"files": len(chosen), "stride": stride, "train_bytes": len(train_b), "val_bytes": len(val_b),
            "sha256_16": digest, "stdlib": sysconfig.get_paths()["stdlib"]}
    return train_b, val_b, info


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention written out (softmax of masked scores): twice differentiable.

    Args:
        width: the embedding width (divisible by `heads`).
        heads: the number of attention heads.
        context: the longest sequence (the size of the causal mask).
    """

    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.register_buffer("mask", torch.tril(torch.ones(context, context, dtype=torch.bool)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend each position to itself and the positions before it.

        Args:
            x: (batch, t, width) inputs, t <= `context`.

        Returns:
            (batch, t, width) outputs, after the output projection.
        """
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // self.heads))
        scores = scores.masked_fill(~self.mask[:t, :t], float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: `x + attn(ln1(x))`, then `x + out(gelu(fc(ln2(x))))` (MLP width 4x).

    Args:
        width: the embedding width.
        heads: the number of attention heads.
        context: the longest sequence.
    """

    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, context)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: (batch, t, width) inputs.

        Returns:
            (batch, t, width) outputs.
        """
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    """GPT with tied input / output embeddings.

    GPT-2 initialisation: matrices and the learned positional embedding N(0, 0.02), the residual projections
    (attention `proj`, MLP `out`) N(0, 0.02 / sqrt(2 layers)), biases 0; no dropout.

    Args:
        vocab: vocabulary size (256: bytes).
        width: embedding width.
        layers: number of transformer blocks.
        heads: attention heads per block.
        context: the longest sequence (learned positional embeddings).
    """

    def __init__(self, vocab: int = 256, width: int = 64, layers: int = 2, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads, context) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        nn.init.normal_(self.pos, 0.0, 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Predict the next token at every position.

        Args:
            idx: (batch, t) token ids, t <= `context`.

        Returns:
            (batch, t, vocab) logits (the final LayerNorm's output times the embedding matrix, transposed).
        """
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.embed.weight.t()


def _windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> Batch:
    idx = starts[:, None] + torch.arange(context + 1)[None, :]
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def chargpt_task(steps: int = 1000, batch_size: int = 32, context: int = 64, val_batches: int = 50,
                 quick: bool = False) -> Task:
    """The `chargpt` task: a byte-level `CharGPT` on the standard-library corpus (`stdlib_corpus`).

    Training batches are random windows of the training text (the sampler's generator seeded with 10000 + seed);
    the validation batches are `val_batches` fixed random windows of the validation text (`DATA_SEED`).

    Args:
        steps: training steps.
        batch_size: windows per batch.
        context: window length in bytes (the model's context).
        val_batches: number of validation batches.
        quick: smoke-test size: `QUICK_STEPS` steps, batch 4, context 16, 2 validation batches.

    Returns:
        The task (loss: next-byte cross-entropy in nats per byte).
    """
    if quick:
        steps, batch_size, context, val_batches = QUICK_STEPS, 4, 16, 2
    train_b, val_b, info = stdlib_corpus()
    train = torch.frombuffer(bytearray(train_b), dtype=torch.uint8)
    val = torch.frombuffer(bytearray(val_b), dtype=torch.uint8)
    g = torch.Generator().manual_seed(DATA_SEED)
    val_starts = torch.randint(len(val) - context - 1, (val_batches, batch_size), generator=g)
    fixed = [_windows(val, s, context) for s in val_starts]

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return CharGPT(context=context)

    def sampler(seed: int, n_steps: int) -> Callable[[int], Batch]:
        gen = torch.Generator().manual_seed(10_000 + seed)
        starts = torch.randint(len(train) - context - 1, (n_steps, batch_size), generator=gen)
        return lambda t: _windows(train, starts[t], context)

    info = {**info, "model": "GPT 2 layers, width 64, 4 heads, context 64, tied embeddings, byte vocabulary",
            "batch_size": batch_size, "val_batches": val_batches}
    return Task("chargpt", steps, batch_size, make_model, sampler, cross_entropy, fixed, quick, info)


# ------------------------------------------------------------------------------------------------
# cnn
# ------------------------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """The `cnn` task's network for (N, 1, 8, 8) images.

    conv3x3(width) - ReLU - conv3x3(width) - ReLU - maxpool 2 - conv3x3(2 width) - ReLU - maxpool 2 -
    linear(10); 8,410 parameters at width 16.

    Args:
        width: channels of the first two convolutions (the third has twice as many).
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify the images.

        Args:
            x: (N, 1, 8, 8) images.

        Returns:
            (N, 10) logits.
        """
        return self.head(self.features(x).flatten(1))


@functools.lru_cache(maxsize=4)
def digits_split(n_val: int = 797) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split scikit-learn's 8x8 digits into fixed training and validation images (cached).

    A fixed permutation (`DATA_SEED`) puts `n_val` images in the validation set and the rest in the training set.
    Pixels are scaled to [0, 1], then standardised with one mean and one standard deviation over all training
    pixels.

    Args:
        n_val: the number of validation images (of 1797).

    Returns:
        (training images, training labels, validation images, validation labels): images (N, 1, 8, 8) float32,
        labels (N,) int64.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(DATA_SEED).permutation(len(y))
    x, y = x[perm].astype(np.float32) / 16.0, y[perm]
    x_tr, x_va = x[n_val:], x[:n_val]
    mean, std = x_tr.mean(), x_tr.std()

    def as_images(a: np.ndarray) -> torch.Tensor:
        return torch.tensor((a - mean) / std).reshape(-1, 1, 8, 8)

    return as_images(x_tr), torch.tensor(y[n_val:]), as_images(x_va), torch.tensor(y[:n_val])


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels in each direction, filling with the background value.

    Args:
        x: (N, 1, H, W) images.
        gen: the generator that draws the shifts (uniform over -max_shift..max_shift, independently per image
            and axis).
        max_shift: the largest shift in pixels.

    Returns:
        (N, 1, H, W) shifted images; uncovered pixels take the smallest value of `x` (the background).
    """
    b, _, h, w = x.shape
    background = float(x.min())
    padded = F.pad(x, (max_shift,) * 4, value=background)
    dy, dx = torch.randint(2 * max_shift + 1, (2, b), generator=gen)
    rows = dy[:, None] + torch.arange(h)[None, :]
    cols = dx[:, None] + torch.arange(w)[None, :]
    return padded[torch.arange(b)[:, None, None], 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def cnn_task(steps: int = 1500, batch_size: int = 32, n_val: int = 797, max_shift: int = 2, width: int = 16,
             val_copies: int = 3, noise: float = 0.75, quick: bool = False) -> Task:
    """The `cnn` task: a `DigitsCNN` on augmented 8x8 digits (see the module docstring).

    Training batches go through the training images epoch by epoch (a fresh permutation per epoch, seeded with
    20000 + seed); each batch gets random shifts and Gaussian pixel noise, drawn in step order (30000 + seed) so
    that batch t is the same for every method. The validation set (fixed, `DATA_SEED`) is the held-out images plus
    `val_copies` shifted copies of each, all with fixed noise of the same std, in batches of 400.

    Args:
        steps: training steps.
        batch_size: images per batch.
        n_val: held-out images (`digits_split`).
        max_shift: largest random shift in pixels.
        width: the network's width (`DigitsCNN`).
        val_copies: shifted copies of each validation image added to the validation set.
        noise: std of the Gaussian pixel noise, in units of the standardised pixels (0: none).
        quick: smoke-test size: `QUICK_STEPS` steps, no shifted copies, 64 validation images.

    Returns:
        The task (loss: cross-entropy in nats).
    """
    if quick:
        steps, val_copies = QUICK_STEPS, 0
    x_tr, y_tr, x_va, y_va = digits_split(n_val)

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return DigitsCNN(width)

    def sampler(seed: int, n_steps: int) -> Callable[[int], Batch]:
        gen = torch.Generator().manual_seed(20_000 + seed)
        order = _epoch_order(len(y_tr), n_steps * batch_size, gen)
        shifts = torch.Generator().manual_seed(30_000 + seed)
        batches: dict[int, Batch] = {}

        def batch(t: int) -> Batch:
            # augmentation drawn in step order, so batch t is the same whichever method asks for it
            while len(batches) <= t:
                k = len(batches)
                idx = order[k * batch_size:(k + 1) * batch_size]
                x = random_shift(x_tr[idx], shifts, max_shift)
                if noise:
                    x = x + noise * torch.randn(x.shape, generator=shifts)
                batches[k] = (x, y_tr[idx])
            return batches[t]

        return batch

    if val_copies:
        g = torch.Generator().manual_seed(DATA_SEED)
        x_va = torch.cat([x_va, *(random_shift(x_va, g, max_shift) for _ in range(val_copies))])
        y_va = y_va.repeat(val_copies + 1)
    if noise:
        x_va = x_va + noise * torch.randn(x_va.shape, generator=torch.Generator().manual_seed(DATA_SEED + 1))
    fixed = [(x_va[i:i + 400], y_va[i:i + 400]) for i in range(0, len(y_va), 400)]
    info = {"model": f"conv3x3({width})-ReLU-conv3x3({width})-ReLU-maxpool-conv3x3({2 * width})-ReLU-maxpool-"
                     "linear(10)", "train": len(y_tr), "val": len(y_va),
            "augmentation": f"random shifts of up to {max_shift} pixels, Gaussian pixel noise std {noise}",
            "batch_size": batch_size}
    return Task("cnn", steps, batch_size, make_model, sampler, cross_entropy, _quick_val(fixed) if quick else fixed,
                quick, info)


def _quick_val(batches: list[Batch], size: int = 64) -> list[Batch]:
    return [(batches[0][0][:size], batches[0][1][:size])]


def _epoch_order(n: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of `count` samples drawn epoch by epoch.

    Args:
        n: the number of samples.
        count: the number of indices to draw.
        gen: the generator of the permutations.

    Returns:
        (count,) indices in [0, n): concatenated fresh permutations of `n`, one per epoch, cut to `count`.
    """
    epochs = math.ceil(count / n)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(epochs)])[:count]


# ------------------------------------------------------------------------------------------------
# mlp
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def mnist1d_split(num_samples: int = 20_000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST-1D from the package's default arguments but `num_samples` (generated offline, cached).

    Numpy's global random state, which `make_dataset` reseeds, is restored afterwards. Inputs are standardised
    per feature with the training mean and std (+1e-8).

    Args:
        num_samples: total number of sequences; the package's default split puts 80% in the training set.

    Returns:
        (training inputs, training labels, validation inputs, validation labels): inputs (N, 40) float32, labels
        (N,) int64.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    state = np.random.get_state()  # noqa: NPY002 (make_dataset seeds numpy's global generator)
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)  # noqa: NPY002
    x_tr, x_va = data["x"].astype(np.float32), data["x_test"].astype(np.float32)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0) + 1e-8
    return (torch.tensor((x_tr - mean) / std), torch.tensor(data["y"]).long(),
            torch.tensor((x_va - mean) / std), torch.tensor(data["y_test"]).long())


def mlp_task(steps: int = 1500, batch_size: int = 32, width: int = 256, num_samples: int = 20_000,
             quick: bool = False) -> Task:
    """The `mlp` task: an MLP 40-width-width-10 with ReLU on MNIST-1D (`mnist1d_split`).

    Training batches go through the training set epoch by epoch (a fresh permutation per epoch, seeded with
    40000 + seed); the validation set is MNIST-1D's test split, in batches of 1000.

    Args:
        steps: training steps.
        batch_size: sequences per batch.
        width: hidden units of both hidden layers.
        num_samples: MNIST-1D sequences generated (training + validation).
        quick: smoke-test size: `QUICK_STEPS` steps, 64 validation sequences.

    Returns:
        The task (loss: cross-entropy in nats).
    """
    if quick:
        steps = QUICK_STEPS
    x_tr, y_tr, x_va, y_va = mnist1d_split(num_samples)

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(x_tr.shape[1], width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, 10))

    def sampler(seed: int, n_steps: int) -> Callable[[int], Batch]:
        gen = torch.Generator().manual_seed(40_000 + seed)
        order = _epoch_order(len(y_tr), n_steps * batch_size, gen)
        return lambda t: (x_tr[order[t * batch_size:(t + 1) * batch_size]],
                          y_tr[order[t * batch_size:(t + 1) * batch_size]])

    fixed = [(x_va[i:i + 1000], y_va[i:i + 1000]) for i in range(0, len(y_va), 1000)]
    info = {"model": f"MLP {x_tr.shape[1]}-{width}-{width}-10 ReLU", "train": len(y_tr), "val": len(y_va),
            "batch_size": batch_size}
    return Task("mlp", steps, batch_size, make_model, sampler, cross_entropy, _quick_val(fixed) if quick else fixed,
                quick, info)


#: the tasks by name, each a factory `(quick=False) -> Task`
TASKS: dict[str, Callable[..., Task]] = {"chargpt": chargpt_task, "cnn": cnn_task, "mlp": mlp_task}


def get_task(name: str, quick: bool = False) -> Task:
    """Build a task by name.

    Args:
        name: one of `TASKS` (`chargpt`, `cnn`, `mlp`).
        quick: build it at its smoke-test size.

    Returns:
        The task with its default settings.

    Raises:
        ValueError: unknown name.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name](quick=quick)
