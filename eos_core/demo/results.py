"""Trajectories of the demo's runs, their summary figures, the summary table and the CSV files.

Summary figures of a run (the same definitions as the reference figures quoted in `benchmarks/README.md`):

* final train loss: the mean of the last 5 recorded losses (GD at the edge of stability oscillates);
* final lr: the learning rate of the last step;
* median lr * sharpness over the second half of the steps, from the steps where the sharpness was measured (2 is the
  edge of stability);
* diverged: the loss became non-finite or exceeded [`BLOW_UP`][eos_core.demo.results.BLOW_UP] times its initial value
  (training stops there), or the final loss is not below the initial one.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eos_core.demo.methods import Method

#: A run whose loss exceeds this multiple of its initial loss is stopped and counted as diverged.
BLOW_UP = 1e3
#: The per-step columns of the trajectories CSV (after `method`).
COLUMNS = ("step", "loss", "lr", "sharpness", "lr_sharpness")


def blew_up(loss: float, initial: float) -> bool:
    """True when a run has left the basin: non-finite loss, or above BLOW_UP x its initial value."""
    return not math.isfinite(loss) or (math.isfinite(initial) and loss > BLOW_UP * max(initial, 1e-12))


@dataclass
class Trajectory:
    """One run: per-step arrays (NaN where not measured) and its wall time."""

    method: Method
    step: np.ndarray
    loss: np.ndarray
    lr: np.ndarray
    sharpness: np.ndarray
    lr_sharpness: np.ndarray
    wall_s: float
    planned_steps: int
    stopped: bool = False  #: training stopped early because the loss blew up
    extra: dict[str, str] = field(default_factory=dict)  #: e.g. the curvature route used

    @classmethod
    def from_records(cls, method: Method, records: Sequence[Mapping[str, float]], *, wall_s: float,
                     planned_steps: int, stopped: bool, extra: Mapping[str, str] | None = None) -> Trajectory:
        def column(key: str) -> np.ndarray:
            return np.array([float(r.get(key, math.nan)) for r in records], dtype=np.float64)

        return cls(method, np.arange(len(records), dtype=np.int64), column("loss"), column("lr"),
                   column("sharpness"), column("lr_sharpness"), wall_s, planned_steps, stopped, dict(extra or {}))

    @property
    def label(self) -> str:
        return self.method.label

    @property
    def final_loss(self) -> float:
        finite = self.loss[np.isfinite(self.loss)]
        if self.stopped or finite.size == 0:
            return math.inf
        return float(np.mean(finite[-5:]))

    @property
    def diverged(self) -> bool:
        return self.stopped or not self.final_loss < self.loss[0]

    @property
    def final_lr(self) -> float:
        return float(self.lr[-1]) if self.lr.size else math.nan

    def second_half(self, values: np.ndarray) -> np.ndarray:
        """The finite entries of `values` over the second half of the planned steps."""
        keep = self.step >= self.planned_steps // 2
        out = values[keep]
        return out[np.isfinite(out)]

    @property
    def median_lr_sharpness(self) -> float:
        values = self.second_half(self.lr_sharpness)
        return float(np.median(values)) if values.size else math.nan

    @property
    def median_sharpness(self) -> float:
        values = self.second_half(self.sharpness)
        return float(np.median(values)) if values.size else math.nan

    def as_history(self) -> dict[str, np.ndarray]:
        """The columns [`eos_core.plotting.plot_edge_of_stability`][] reads."""
        return {name: getattr(self, name) for name in COLUMNS}


def best_constant(runs: Iterable[Trajectory]) -> Trajectory | None:
    """The GD run with the lowest final train loss among those that did not diverge (None if all did)."""
    candidates = [r for r in runs if r.method.kind == "gd" and not r.diverged]
    return min(candidates, key=lambda r: r.final_loss) if candidates else None


def _format(value: float, digits: int = 4) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}"


def summary_rows(runs: Sequence[Trajectory]) -> list[dict[str, str]]:
    """One row per run, formatted for the table (the best constant lr is marked)."""
    best = best_constant(runs)
    rows = []
    for run in runs:
        if run.diverged:
            where = f" at step {int(run.step[-1])}" if run.stopped else ""
            loss = f"diverged{where}"
        else:
            loss = f"{run.final_loss:.4g}"
        name = run.label + ("  (best constant)" if run is best else "")
        rows.append({"method": name, "final train loss": loss, "final lr": _format(run.final_lr),
                     "median lr*sharpness (2nd half)": _format(run.median_lr_sharpness, 3),
                     "wall time": f"{run.wall_s:.1f}s"})
    return rows


def format_table(runs: Sequence[Trajectory]) -> str:
    """The summary table as aligned plain text."""
    rows = summary_rows(runs)
    headers = list(rows[0]) if rows else ["method"]
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in headers]
    right = [False] + [True] * (len(headers) - 1)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True))

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line([row[h] for h in headers]) for row in rows]
    return "\n".join(out)


def write_trajectories_csv(runs: Sequence[Trajectory], path: str | Path) -> Path:
    """Long format: `method, step, loss, lr, sharpness, lr_sharpness` (empty cell = not measured)."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("method", *COLUMNS))
        for run in runs:
            for i in range(run.step.size):
                cells = [run.label, str(int(run.step[i]))]
                for name in COLUMNS[1:]:
                    value = float(getattr(run, name)[i])
                    cells.append(repr(value) if math.isfinite(value) else "")
                writer.writerow(cells)
    return path


def read_trajectories_csv(path: str | Path) -> list[Trajectory]:
    """Runs written by [`write_trajectories_csv`][eos_core.demo.results.write_trajectories_csv] (wall times are not
    stored there: 0).

    The planned number of steps is taken as the longest run's; a shorter run is one that blew up.
    """
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_method: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    planned = max((len(r) for r in by_method.values()), default=0)
    runs = []
    for label, records in by_method.items():
        numbers = [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items() if k != "method"}
                   for r in records]
        runs.append(Trajectory.from_records(Method.from_label(label), numbers, wall_s=0.0, planned_steps=planned,
                                            stopped=len(records) < planned))
    return runs


SUMMARY_COLUMNS = ("method", "final_train_loss", "final_lr", "median_lr_sharpness", "median_sharpness",
                   "wall_s", "diverged", "best_constant")


def write_summary_csv(runs: Sequence[Trajectory], path: str | Path) -> Path:
    """One row per run with the summary figures (unformatted)."""
    path = Path(path)
    best = best_constant(runs)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SUMMARY_COLUMNS)
        for run in runs:
            writer.writerow((run.label, repr(run.final_loss), repr(run.final_lr), repr(run.median_lr_sharpness),
                             repr(run.median_sharpness), f"{run.wall_s:.3f}", int(run.diverged), int(run is best)))
    return path
