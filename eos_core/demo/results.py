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
    """Whether a run has left the basin and should be stopped.

    Args:
        loss: the current train loss.
        initial: the run's initial train loss (a non-finite one disables the ratio test).

    Returns:
        True when `loss` is non-finite, or when `loss > BLOW_UP * max(initial, 1e-12)`
        ([`BLOW_UP`][eos_core.demo.results.BLOW_UP]); False otherwise.
    """
    return not math.isfinite(loss) or (math.isfinite(initial) and loss > BLOW_UP * max(initial, 1e-12))


@dataclass
class Trajectory:
    """One run: per-step arrays (NaN where not measured) and its wall time.

    Attributes:
        method: the run's learning-rate rule.
        step: (n,) step indices 0..n-1 of the recorded steps, int64.
        loss: (n,) full-batch train loss at each step.
        lr: (n,) learning rate applied at each step.
        sharpness: (n,) lambda_max of the loss Hessian, NaN at the steps where it was not measured.
        lr_sharpness: (n,) lr x lambda_max (2 is the edge of stability), NaN where the sharpness was not measured.
        wall_s: training time of the run in seconds (0 for runs read back from CSV).
        planned_steps: the number of steps the run was asked for; n < planned_steps when it was stopped early.
        stopped: training stopped early because the loss blew up
            ([`blew_up`][eos_core.demo.results.blew_up]).
        extra: free-form annotations, e.g. the curvature route used.
    """

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
        """Build a trajectory from one record per step.

        Args:
            method: the run's learning-rate rule.
            records: one mapping per recorded step, in order, with the keys `loss`, `lr`, `sharpness` and
                `lr_sharpness`; a missing key reads as NaN (not measured). Steps are numbered 0, 1, ... in order.
            wall_s: training time of the run in seconds.
            planned_steps: the number of steps the run was asked for.
            stopped: whether training stopped early because the loss blew up.
            extra: free-form annotations (copied); None for none.

        Returns:
            The trajectory, its columns as float64 arrays.
        """
        def column(key: str) -> np.ndarray:
            return np.array([float(r.get(key, math.nan)) for r in records], dtype=np.float64)

        return cls(method, np.arange(len(records), dtype=np.int64), column("loss"), column("lr"),
                   column("sharpness"), column("lr_sharpness"), wall_s, planned_steps, stopped, dict(extra or {}))

    @property
    def label(self) -> str:
        """The run's name, [`Method.label`][eos_core.demo.methods.Method.label], e.g. `"CDAT(scale=2)"`."""
        return self.method.label

    @property
    def final_loss(self) -> float:
        """The final train loss: the mean of the last 5 finite recorded losses.

        GD at the edge of stability oscillates, so a single last value would be noisy.

        Returns:
            The mean; `inf` when the run was stopped early or recorded no finite loss.
        """
        finite = self.loss[np.isfinite(self.loss)]
        if self.stopped or finite.size == 0:
            return math.inf
        return float(np.mean(finite[-5:]))

    @property
    def diverged(self) -> bool:
        """Whether the run counts as diverged.

        Returns:
            True when training was stopped because the loss blew up, or when the final train loss is not below the
            loss at step 0 (including a non-finite final or initial loss, and a run with no recorded step).
        """
        return self.stopped or len(self.loss) == 0 or not self.final_loss < self.loss[0]

    @property
    def final_lr(self) -> float:
        """The learning rate of the last recorded step.

        Returns:
            The lr; NaN when no step was recorded.
        """
        return float(self.lr[-1]) if self.lr.size else math.nan

    def second_half(self, values: np.ndarray) -> np.ndarray:
        """Select the second half of a per-step column.

        Args:
            values: a (n,) per-step column of this run, e.g. `self.sharpness`.

        Returns:
            The finite entries of `values` at the steps >= `planned_steps // 2`, in step order.
        """
        keep = self.step >= self.planned_steps // 2
        out = values[keep]
        return out[np.isfinite(out)]

    @property
    def median_lr_sharpness(self) -> float:
        """The median of lr x lambda_max over the second half of the planned steps (2 is the edge of stability).

        Returns:
            The median over the steps where the sharpness was measured; NaN when none was in the second half.
        """
        values = self.second_half(self.lr_sharpness)
        return float(np.median(values)) if values.size else math.nan

    @property
    def median_sharpness(self) -> float:
        """The median of lambda_max over the second half of the planned steps.

        Returns:
            The median over the steps where the sharpness was measured; NaN when none was in the second half.
        """
        values = self.second_half(self.sharpness)
        return float(np.median(values)) if values.size else math.nan

    def as_history(self) -> dict[str, np.ndarray]:
        """The run as the history [`eos_core.plotting.plot_edge_of_stability`][] reads.

        Returns:
            A mapping from each name of [`COLUMNS`][eos_core.demo.results.COLUMNS] to this run's (n,) array (the
            arrays themselves, not copies).
        """
        return {name: getattr(self, name) for name in COLUMNS}


def best_constant(runs: Iterable[Trajectory]) -> Trajectory | None:
    """The best constant learning rate: the baseline of claims B2 and B3.

    Args:
        runs: the demo's runs; only the GD ones (`method.kind == "gd"`) are candidates.

    Returns:
        The GD run with the lowest [`final_loss`][eos_core.demo.results.Trajectory.final_loss] among those that did
        not diverge (the first one on a tie); None when there is no non-diverged GD run.
    """
    candidates = [r for r in runs if r.method.kind == "gd" and not r.diverged]
    return min(candidates, key=lambda r: r.final_loss) if candidates else None


def _format(value: float, digits: int = 4) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}"


def summary_rows(runs: Sequence[Trajectory]) -> list[dict[str, str]]:
    """The rows of the summary table, formatted as text.

    Args:
        runs: the demo's runs, in the table's order.

    Returns:
        One dict per run with the keys `method` (its label, followed by `"  (best constant)"` for the best constant
        lr), `final train loss` (`"diverged"` or `"diverged at step N"` for a diverged run), `final lr`,
        `median lr*sharpness (2nd half)` (`"-"` when not finite) and `wall time` (e.g. `"3.2s"`).
    """
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
    """The summary table as aligned plain text.

    Args:
        runs: the demo's runs, in the table's order.

    Returns:
        A header line, a line of dashes and one line per run
        ([`summary_rows`][eos_core.demo.results.summary_rows]), joined by newlines; the method column is
        left-aligned, the others right-aligned.
    """
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
    """Write every run's per-step arrays to a CSV file in long format.

    The header is `method, step, loss, lr, sharpness, lr_sharpness`; one row per run and step, the method as its
    label, numbers written with `repr` (full precision) and a non-finite value as an empty cell (not measured).
    [`read_trajectories_csv`][eos_core.demo.results.read_trajectories_csv] reads it back.

    Args:
        runs: the runs to write.
        path: the file to write (overwritten).

    Returns:
        `path`, as a `Path`.
    """
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
    """Read back the runs written by [`write_trajectories_csv`][eos_core.demo.results.write_trajectories_csv].

    Wall times are not stored there and read as 0. The planned number of steps is taken as the longest run's; a
    shorter run is one that blew up, and is marked `stopped`. An empty cell reads as NaN.

    Args:
        path: the CSV file.

    Returns:
        One [`Trajectory`][eos_core.demo.results.Trajectory] per method label, in the order of their first row.

    Raises:
        ValueError: a `method` cell is not a demo method label (from
            [`Method.from_label`][eos_core.demo.methods.Method.from_label]), or a number cell does not parse.
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


#: The columns of the summary CSV written by [`write_summary_csv`][eos_core.demo.results.write_summary_csv].
SUMMARY_COLUMNS = ("method", "final_train_loss", "final_lr", "median_lr_sharpness", "median_sharpness",
                   "wall_s", "diverged", "best_constant")


def write_summary_csv(runs: Sequence[Trajectory], path: str | Path) -> Path:
    """Write one row per run with its summary figures, unformatted, to a CSV file.

    The columns are [`SUMMARY_COLUMNS`][eos_core.demo.results.SUMMARY_COLUMNS]: the method's label, the final train
    loss, final lr, median lr x sharpness and median sharpness over the second half (written with `repr`: `inf` or
    `nan` when not available), the wall time in seconds, and `diverged` and `best_constant` as 0 / 1.

    Args:
        runs: the runs to write.
        path: the file to write (overwritten).

    Returns:
        `path`, as a `Path`.
    """
    path = Path(path)
    best = best_constant(runs)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SUMMARY_COLUMNS)
        for run in runs:
            writer.writerow((run.label, repr(run.final_loss), repr(run.final_lr), repr(run.median_lr_sharpness),
                             repr(run.median_sharpness), f"{run.wall_s:.3f}", int(run.diverged), int(run is best)))
    return path
