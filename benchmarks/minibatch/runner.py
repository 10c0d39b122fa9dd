"""Train one method on one task and seed; time it against plain AdamW in the same process; write its JSON.

Timing: only the training steps are timed (batches are built outside, evaluations excluded). Interleaved
with the run (blocks of 5 steps, the first of each not timed, `calib_steps` in all), the same process
times plain `AdamW` steps (lr 1e-3) on its own copy of the initial model and the same batches;
`time_ratio` = the method's mean time per step / plain AdamW's. On a shared machine the ratio is still
noisy, but slow phases of the machine affect both. Subnormal floats are flushed to zero
(`torch.set_flush_denormal`): without it, a run whose weights or activations drift into subnormal range
(dead ReLU units after a large lr) ran 5-20x slower on this CPU, and the ratio measured the arithmetic of
subnormals, not the method.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.minibatch.methods import PACKAGES, MethodSpec
from benchmarks.minibatch.tasks import Task

#: number of points of the lr / train-loss trajectories kept in the JSON
TRAJECTORY_POINTS = 200
#: validation curve: evaluated every this fraction of the run (and at step 0 and the end)
VAL_EVERY = 0.05
#: a run whose training loss exceeds this multiple of max(its first loss, 1) (or is not finite) has diverged
DIVERGED = 100.0


def subsample(values: list[float], points: int = TRAJECTORY_POINTS) -> dict[str, list[float]]:
    """Thin a per-step series to at most `points` evenly spaced points, first and last step included.

    Args:
        values: the series, one value per step (step i at index i).
        points: the most points kept (default `TRAJECTORY_POINTS`, 200); fewer when indices coincide.

    Returns:
        `{"step": [...], "value": [...]}`: the kept step indices (increasing ints) and their values as floats; both
        empty for an empty series.
    """
    if not values:
        return {"step": [], "value": []}
    idx = np.unique(np.linspace(0, len(values) - 1, min(points, len(values))).astype(int))
    return {"step": [int(i) for i in idx], "value": [float(values[i]) for i in idx]}


class PlainAdamW:
    """Plain `AdamW` (lr 1e-3) on its own copy of the initial model, the timing reference of a run.

    It is stepped now and then during the run, on the run's batches, so that its time per step is measured under the
    same machine load as the method's.

    Args:
        task: the task whose loss is minimised.
        model: the initial model; a deep copy is trained, `model` itself is not touched.
    """

    #: consecutive plain steps per measurement; the first of each block (cold caches after the method's steps)
    #: is not timed
    BLOCK = 5

    def __init__(self, task: Task, model: torch.nn.Module) -> None:
        self.task = task
        self.model = copy.deepcopy(model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.elapsed = 0.0
        self.steps = 0

    def block(self, batch: Any) -> None:
        """`BLOCK` plain steps on `batch`, the last `BLOCK - 1` of them timed."""
        for i in range(self.BLOCK):
            start = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            self.task.loss(self.model, batch).backward()
            self.optimizer.step()
            if i > 0:
                self.elapsed += time.perf_counter() - start
                self.steps += 1

    def per_step(self) -> float:
        """Mean time of a timed plain step.

        Returns:
            Seconds per timed step (the first step of each block excluded); NaN before any block.
        """
        return self.elapsed / self.steps if self.steps else math.nan


def result_path(out: Path, task: str, method: str, seed: int) -> Path:
    """Where one run's JSON is written.

    Args:
        out: the results folder.
        task: the task's name.
        method: the method's name.
        seed: the seed.

    Returns:
        `out/<task>/<method>/seed<seed>.json`.
    """
    return out / task / method / f"seed{seed}.json"


def run_method(task: Task, spec: MethodSpec, seed: int, out: Path, *, calib_steps: int | None = None,
               steps: int | None = None) -> dict[str, Any]:
    """Train `spec` on `task` from seed `seed` and write `out/<task>/<method>/seed<seed>.json`.

    Args:
        task: the task.
        spec: the method.
        seed: initial weights and batch order.
        out: results folder.
        calib_steps: plain AdamW steps timed during the run, evenly spread (default: 4 for a quick task,
            else max(50, steps / 10)).
        steps: override the task's number of steps.

    Returns:
        The result dict written to the JSON. `status` is `ok`, `diverged` (non-finite loss, a loss above
        `DIVERGED` x max(first loss, 1), or non-finite weights at the end), `skipped` (a package is missing;
        `reason` says which) or `error` (an exception, whose traceback is in `error`; the run does not raise).
        Among the other keys: `final_val_loss` (the last validation loss; inf unless `ok`), `final_train_loss`
        (mean training loss over the last 5% of the steps; inf unless `ok`), `time_ratio` (the method's mean time
        per step / plain AdamW's, measured in the same process), `lr` and `train_loss` (subsampled trajectories),
        `val_curve` and `extra` (the trainer's `extra()`). A skipped run holds only the settings and `reason`.
    """
    n_steps = steps if steps is not None else task.steps
    quick = task.quick
    if calib_steps is None:
        calib_steps = 4 if quick else max(50, n_steps // 10)
    base: dict[str, Any] = {
        "task": task.name, "method": spec.name, "family": spec.family, "seed": seed, "steps": n_steps,
        "quick": quick, "settings": spec.settings, "task_info": task.info,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    path = result_path(out, task.name, spec.name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    missing = spec.missing()
    if missing:
        pip = " ".join(PACKAGES.get(m, m) for m in missing)
        result = {**base, "status": "skipped",
                  "reason": f"package {', '.join(missing)} not installed (pip install {pip}, or the 'bench' extra)"}
        path.write_text(json.dumps(result, indent=1))
        return result
    torch.set_flush_denormal(True)  # subnormal floats slow CPU arithmetic 10-100x, and only on some runs
    model = task.make_model(seed)
    batch_fn = task.sampler(seed, n_steps)
    plain = PlainAdamW(task, model)
    calib_every = max(1, n_steps * PlainAdamW.BLOCK // max(1, calib_steps))
    lrs: list[float] = []
    losses: list[float] = []
    val_steps: list[int] = []
    val_losses: list[float] = []
    every = max(1, n_steps // 4) if quick else max(1, round(VAL_EVERY * n_steps))
    status, error = "ok", None
    train_time = 0.0
    wall_start = time.perf_counter()
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = spec.build(model, n_steps)
            for t in range(n_steps):
                if t % every == 0:
                    with trainer.evaluation() as eval_model:
                        val_steps.append(t)
                        val_losses.append(task.validation_loss(eval_model))
                batch = batch_fn(t)

                def loss_fn(batch: Any = batch) -> torch.Tensor:
                    return task.loss(model, batch)

                if t % calib_every == 0:
                    plain.block(batch)
                start = time.perf_counter()
                loss = trainer.step(t, loss_fn)
                train_time += time.perf_counter() - start
                losses.append(loss)
                lrs.append(trainer.lr())
                if not math.isfinite(loss) or loss > DIVERGED * max(losses[0], 1.0):
                    status = "diverged"
                    break
            if status == "ok" and not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                status = "diverged"
            if status == "ok":
                with trainer.evaluation() as eval_model:
                    val_steps.append(n_steps)
                    val_losses.append(task.validation_loss(eval_model))
        extra = trainer.extra()
    except Exception as exc:  # recorded, so one broken method does not stop a sweep
        status, error, extra = "error", "".join(traceback.format_exception(exc))[-4000:], {}
    wall = time.perf_counter() - wall_start
    if plain.steps == 0:
        plain.block(batch_fn(0))
    plain_per_step = plain.per_step()
    done = len(losses)
    per_step = train_time / done if done else math.nan
    tail = max(1, round(0.05 * done))
    final_val = val_losses[-1] if status == "ok" else math.inf
    result = {
        **base, "status": status, "error": error,
        "final_val_loss": final_val,
        "final_train_loss": float(np.mean(losses[-tail:])) if status == "ok" and losses else math.inf,
        "wall_time_s": wall, "train_time_s": train_time, "time_per_step_s": per_step,
        "plain_adamw_time_per_step_s": plain_per_step,
        "time_ratio": per_step / plain_per_step if plain_per_step and math.isfinite(plain_per_step) else math.nan,
        "steps_done": done, "calib_steps": plain.steps,
        "lr": subsample(lrs), "train_loss": subsample(losses),
        "val_curve": {"step": val_steps, "value": val_losses},
        "extra": extra,
        "warnings": {"count": len(caught), "first": [str(w.message) for w in caught[:3]]},
    }
    path.write_text(json.dumps(result, indent=1, default=float))
    return result
