"""The demo's PyTorch backend: full-batch training through `eos_core.adapters.torch.CurvatureTuner`.

Each run wraps `torch.optim.SGD` (so u = -g) in a `CurvatureTuner` driven by the run's law, with `sharpness_every`
tracking lambda_max by warm-started power iteration. The network is built from the numpy initial weights of
[`eos_core.demo.models`][].
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch

from eos_core.adapters.torch import CurvatureTuner
from eos_core.demo.data import Dataset
from eos_core.demo.methods import Method
from eos_core.demo.models import ModelSpec, init_params
from eos_core.demo.results import Trajectory, blew_up

Progress = Callable[[int, str], None]
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_model(spec: ModelSpec, data: Dataset, *, seed: int, dtype: str = "float32") -> torch.nn.Module:
    """The network of `spec` with the initial weights of [`eos_core.demo.models.init_params`][]."""
    arrays = init_params(spec, data.num_features, data.num_classes, seed=seed, image_shape=data.image_shape)
    if spec.arch == "mlp":
        layers: list[torch.nn.Module] = [
            torch.nn.Linear(data.num_features, spec.width), torch.nn.Tanh(),
            torch.nn.Linear(spec.width, spec.width), torch.nn.Tanh(),
            torch.nn.Linear(spec.width, data.num_classes),
        ]
    else:
        height, width = data.image_shape  # type: ignore[misc]
        channels = spec.width
        layers = [
            torch.nn.Unflatten(1, (1, height, width)),
            torch.nn.Conv2d(1, channels, 3, padding=1), torch.nn.Tanh(), torch.nn.AvgPool2d(2),
            torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.Tanh(), torch.nn.AvgPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(channels * (height // 4) * (width // 4), data.num_classes),
        ]
    model = torch.nn.Sequential(*layers).to(_DTYPES[dtype])
    with torch.no_grad():
        for parameter, array in zip(model.parameters(), arrays, strict=True):
            parameter.copy_(torch.from_numpy(array))
    return model


def loss_function(spec: ModelSpec, data: Dataset, dtype: str = "float32") -> Callable[[torch.Tensor], torch.Tensor]:
    """`logits -> loss` on the full batch: 0.5 * mean ||logits - onehot||^2 (mse) or cross-entropy (ce)."""
    if spec.loss == "mse":
        targets = torch.from_numpy(data.one_hot()).to(_DTYPES[dtype])
        return lambda logits: 0.5 * (logits - targets).square().sum(dim=1).mean()
    labels = torch.from_numpy(data.y)
    return lambda logits: torch.nn.functional.cross_entropy(logits, labels)


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """`torch.set_num_threads(threads)` for the duration of a run (None: leave torch's setting)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train(method: Method, data: Dataset, spec: ModelSpec, *, steps: int, seed: int = 0, sharpness_every: int = 5,
          dtype: str = "float32", progress: Progress | None = None, threads: int | None = 1) -> Trajectory:
    """Train full batch for `steps` steps (fewer when the loss blows up) and record the diagnostics.

    `threads`: torch intra-op threads during the run. The demo's networks are tiny, so one thread is
    as fast as several and immune to oversubscription (with 2 threads on a 2-core machine that has
    other work, a run can take 10x longer); None keeps torch's own setting.

    Args:
        method: the learning-rate rule.
        data: the dataset.
        spec: the architecture.
        steps: full-batch steps.
        seed: seed of the initial weights.
        sharpness_every: tracking period of lambda_max.
        dtype: `"float32"` or `"float64"`.
        progress: called with `(step, info)` after each step.
        threads: torch intra-op threads (None: torch's setting).

    Returns:
        The run's [`Trajectory`][eos_core.demo.results.Trajectory].
    """
    with intra_op_threads(threads):
        return _train(method, data, spec, steps=steps, seed=seed, sharpness_every=sharpness_every, dtype=dtype,
                      progress=progress)


def _train(method: Method, data: Dataset, spec: ModelSpec, *, steps: int, seed: int, sharpness_every: int,
           dtype: str, progress: Progress | None) -> Trajectory:
    model = build_model(spec, data, seed=seed, dtype=dtype)
    inputs = torch.from_numpy(data.x).to(_DTYPES[dtype])
    loss_of = loss_function(spec, data, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the law decides the lr (override mode)
    tuner = CurvatureTuner(optimizer, method.law(), sharpness_every=sharpness_every, model=model)

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model(inputs))
        loss.backward()
        return loss

    records: list[dict[str, float]] = []
    stopped = False
    start = time.perf_counter()
    with warnings.catch_warnings():
        # A diverging run makes the tuner warn about non-finite values; the demo reports the divergence itself.
        warnings.simplefilter("ignore", RuntimeWarning)
        for step in range(steps):
            tuner.step(closure)
            diagnostics = tuner.diagnostics
            record = {key: float(diagnostics.get(key, np.nan)) for key in ("loss", "lr", "sharpness", "lr_sharpness")}
            records.append(record)
            if progress is not None:
                progress(step + 1, f"loss {record['loss']:.4g}  lr {record['lr']:.3g}")
            if blew_up(record["loss"], records[0]["loss"]):
                stopped = True
                break
    wall = time.perf_counter() - start
    return Trajectory.from_records(method, records, wall_s=wall, planned_steps=steps, stopped=stopped,
                                   extra={"route": tuner.route, "backend": "torch"})
