r"""The edge-of-stability figure of the CDAT paper (Fig. 1, 3, 5): loss, lr, sharpness, lr * sharpness.

[`plot_edge_of_stability`][eos_core.plotting.plot_edge_of_stability] draws four panels from any tuner's diagnostics
history:

1. the training loss;
2. the learning rate $\eta_t$;
3. the sharpness $\lambda_{\max}(H_t)$ with $2/\eta_t$ dotted in the same colour (gradient descent on a
   quadratic diverges along the top eigenvector once $\lambda_{\max} > 2/\eta$, Cohen et al. 2021);
4. $\eta_t \lambda_{\max}(H_t)$ with the edge of stability, the line at 2.

Accepted histories (one run, or a mapping `name -> history` for several runs in one figure):

* a list of diagnostics dicts, one per step (`tuner.diagnostics` of the PyTorch adapter,
  `eos_core.adapters.jax.diagnostics(state)`, Hugging Face `trainer.state.log_history`; the
  `TrainerState` itself works too);
* a dict of lists / arrays (Keras `History.history`; a Keras `History` object works too);
* a pandas `DataFrame`;
* a CSV path (Lightning's `CSVLogger` `metrics.csv`, the demo's `trajectories.csv`). A CSV or
  DataFrame with a text column `method` or `run` holds several runs and is split on it;
* a TensorBoard log directory or event file (Lightning's `TensorBoardLogger`, the Hugging Face
  `Trainer`'s `runs/`): every folder below it that holds `events.out.tfevents.*` files is one run,
  named by its path relative to the directory. Reading them needs the `tensorboard` package
  (`pip install 'eos-core[tensorboard]'`).

Column (or TensorBoard tag) names are looked up as `eos/<name>`, `train/eos/<name>` (the Hugging Face
`Trainer`'s TensorBoard tags), `eos_<name>` then `<name>` for `loss`, `lr`, `sharpness` and
`lr_sharpness` (the names the callbacks log), the loss also as `train_loss`, `train/loss` or
`training_loss`, the lr also as `learning_rate` or `train/learning_rate`; `keys={"loss": "my_loss"}`
overrides any of them. Rows that share a `step` (Lightning writes one row per logging call, Hugging
Face one entry per log event) are merged. NaN or an empty cell means "not measured on that step"
(sharpness is tracked every m steps): each curve is drawn through its measured points. `lr_sharpness`
missing is computed as `lr * sharpness`.

How the figure stays readable:

* runs differ by colour (the Okabe-Ito palette, safe for colour-blind readers), line style and marker,
  so they stay apart in greyscale print;
* a series that alternates from one step to the next (the greedy rule `CDAT(scale=1)` flips its lr
  every step) is drawn faint step by step, with the geometric mean of each two consecutive values on
  top, so that its band does not hide the other runs;
* the $2/\eta$ lines are dotted, thin, in their run's colour and labelled;
* values of $\eta\lambda_{\max}$ above the panel's upper limit are marked by triangles on the top
  edge and counted in the panel.

Needs matplotlib (`pip install 'eos-core[plot]'`), imported only when a figure is drawn.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eos_core._optional import require

QUANTITIES = ("loss", "lr", "sharpness", "lr_sharpness")
#: Column names tried for each quantity, in order, after the `eos/`, `train/eos/` and `eos_` prefixed names.
_EXTRA_NAMES = {
    "loss": ("train_loss", "train/loss", "training_loss", "train_loss_step"),
    "lr": ("learning_rate", "train/learning_rate"),
}
_STEP_NAMES = ("step", "global_step", "eos/step", "iteration")
_RUN_COLUMNS = ("method", "run")
#: The name TensorBoard gives its event files.
EVENT_FILE_PATTERN = "events.out.tfevents.*"

#: Okabe & Ito (2008) colour-blind-safe palette, ordered so that neighbours also differ in grey.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
#: Line styles of the runs (dotted is kept for the 2/lr thresholds).
LINESTYLES: tuple[Any, ...] = ("-", "--", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)), (0, (3, 1)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
#: A series alternates when at least this fraction of its consecutive changes flip sign ...
OSCILLATION_FLIPS = 0.6
#: ... and the median change is at least this large (in log scale: 5%).
OSCILLATION_AMPLITUDE = math.log(1.05)

History = Any


def _candidates(quantity: str) -> tuple[str, ...]:
    return (f"eos/{quantity}", f"train/eos/{quantity}", f"eos_{quantity}", quantity,
            *_EXTRA_NAMES.get(quantity, ()))


def _number(value: Any) -> float:
    if value is None or isinstance(value, str | bytes) and not str(value).strip():
        return math.nan
    try:
        out = float(value)  # numbers, 0-d arrays, numeric strings
    except (TypeError, ValueError):
        return math.nan
    return out


def _is_column(value: Any) -> bool:
    """A sequence of numbers (list, tuple, 1-d array, pandas Series)."""
    if isinstance(value, np.ndarray):
        return value.ndim == 1
    if hasattr(value, "to_numpy") and not hasattr(value, "columns"):
        return True
    if isinstance(value, list | tuple):
        return all(v is None or isinstance(v, int | float | np.number) and not isinstance(v, bool)
                   for v in value[:16])
    return False


def _is_history(value: Any) -> bool:
    """Something one run's history can be read from."""
    return (isinstance(value, str | os.PathLike | Mapping) or hasattr(value, "columns")
            or hasattr(value, "log_history") or isinstance(getattr(value, "history", None), Mapping)
            or isinstance(value, Sequence) and bool(value) and all(isinstance(v, Mapping) for v in value))


def _records_to_columns(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    return {name: [record.get(name) for record in records] for name in names}


def _read_csv(path: Path) -> dict[str, list[Any]]:
    if not path.is_file():
        raise ValueError(f"plot_edge_of_stability: no CSV file at {str(path)!r}")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"plot_edge_of_stability: {str(path)!r} has no rows")
    return _records_to_columns(rows)


def _is_event_file(path: Path) -> bool:
    return path.is_file() and path.match(EVENT_FILE_PATTERN)


def tensorboard_runs(path: str | os.PathLike) -> dict[str, Path]:
    """The TensorBoard runs under a log directory: the folders that hold event files.

    Args:
        path: a log directory (searched recursively) or one `events.out.tfevents.*` file.

    Returns:
        `{run name: folder}`, the name being the folder's path relative to `path` (`""` for `path`
        itself, or for a single event file), in sorted order. Empty when there is no event file.
    """
    root = Path(path)
    if _is_event_file(root):
        return {"": root}
    if not root.is_dir():
        return {}
    folders = sorted({event.parent for event in root.rglob(EVENT_FILE_PATTERN) if event.is_file()})
    return {"" if folder == root else folder.relative_to(root).as_posix(): folder for folder in folders}


def read_tensorboard(path: str | os.PathLike) -> dict[str, list[Any]]:
    """One TensorBoard run's scalars as columns `{"step": [...], tag: [...]}`, one row per logged step.

    Scalars written as `simple_value` (PyTorch's `SummaryWriter`, Lightning, the Hugging Face `Trainer`)
    and as scalar tensors (TensorFlow 2 summaries) are read; of several values of one tag at one step the
    last one written wins. Needs the `tensorboard` package.

    Args:
        path: a run folder (its event files are read together) or one event file.

    Returns:
        `{"step": steps, tag: values}` with NaN where a tag was not logged at a step.

    Raises:
        ImportError: the `tensorboard` package is not installed (the message names `eos-core[tensorboard]`).
        ValueError: `path` holds no scalar.
    """
    accumulator_module = require("tensorboard.backend.event_processing.event_accumulator", extra="tensorboard",
                                 feature="reading TensorBoard logs (eos_core.plotting)")
    accumulator = accumulator_module.EventAccumulator(
        str(path), size_guidance={accumulator_module.SCALARS: 0, accumulator_module.TENSORS: 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    by_step: dict[int, dict[str, float]] = {}
    for tag in tags.get("scalars", []):
        for event in accumulator.Scalars(tag):
            by_step.setdefault(int(event.step), {})[tag] = float(event.value)
    if tags.get("tensors"):
        tensor_util = require("tensorboard.util.tensor_util", extra="tensorboard",
                              feature="reading TensorBoard logs (eos_core.plotting)")
        for tag in tags["tensors"]:
            for event in accumulator.Tensors(tag):
                value = np.asarray(tensor_util.make_ndarray(event.tensor_proto))
                if value.size == 1 and value.dtype.kind in "fiu":
                    by_step.setdefault(int(event.step), {})[tag] = float(value.reshape(()))
    if not by_step:
        raise ValueError(f"plot_edge_of_stability: the TensorBoard log {str(path)!r} holds no scalar")
    steps = sorted(by_step)
    names = sorted({tag for values in by_step.values() for tag in values})
    columns: dict[str, list[Any]] = {"step": [float(s) for s in steps]}
    for name in names:
        if name == "step":
            continue
        columns[name] = [by_step[s].get(name, math.nan) for s in steps]
    return columns


def _raw_columns(history: History) -> dict[str, list[Any]]:
    """Any accepted single-run format -> `{column name: list of values}`."""
    if isinstance(history, str | os.PathLike):
        path = Path(history)
        runs = tensorboard_runs(path)
        if len(runs) == 1:
            return read_tensorboard(next(iter(runs.values())))
        if len(runs) > 1:
            raise ValueError(f"plot_edge_of_stability: {str(path)!r} holds {len(runs)} TensorBoard runs "
                             f"({', '.join(list(runs)[:4])}); read_runs() or plot_edge_of_stability() read them all")
        if path.is_dir():
            raise ValueError(f"plot_edge_of_stability: the folder {str(path)!r} holds no TensorBoard event file "
                             f"({EVENT_FILE_PATTERN})")
        return _read_csv(path)
    if hasattr(history, "log_history"):  # transformers.TrainerState
        return _raw_columns(list(history.log_history))
    state = getattr(history, "state", None)
    if state is not None and hasattr(state, "log_history"):  # transformers.Trainer
        return _raw_columns(list(state.log_history))
    if isinstance(getattr(history, "history", None), Mapping):  # keras.callbacks.History
        return _raw_columns(dict(history.history))
    if hasattr(history, "columns") and hasattr(history, "to_dict"):  # pandas.DataFrame
        return {str(k): list(v) for k, v in history.to_dict(orient="list").items()}
    if isinstance(history, Mapping):
        bad = [k for k, v in history.items() if not _is_column(v)]
        if bad:
            raise ValueError(f"plot_edge_of_stability: a dict history maps names to lists of numbers; "
                             f"{bad[:3]} are not")
        return {str(k): list(np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v, dtype=object))
                for k, v in history.items()}
    if isinstance(history, Sequence) and not isinstance(history, str | bytes):
        if not history:
            raise ValueError("plot_edge_of_stability: the history is empty")
        if not all(isinstance(r, Mapping) for r in history):
            raise ValueError("plot_edge_of_stability: a list history must hold one diagnostics dict per step")
        return _records_to_columns(history)
    raise ValueError(f"plot_edge_of_stability: cannot read a history from {type(history).__name__}; pass a list of "
                     "diagnostics dicts, a dict of lists, a pandas DataFrame, a CSV path, a TensorBoard log "
                     "directory, a Keras History or a Hugging Face TrainerState")


def _find(columns: Mapping[str, list[Any]], names: Sequence[str]) -> str | None:
    for name in names:
        if name in columns and any(math.isfinite(_number(v)) for v in columns[name]):
            return name
    return None


def _merge_by_step(step: np.ndarray, values: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One row per step: the last measured value of each quantity among the rows of that step."""
    order, index = np.unique(step, return_index=True)
    if order.size == step.size:
        sort = np.argsort(step, kind="stable")
        return step[sort], {k: v[sort] for k, v in values.items()}
    merged = {k: np.full(order.size, np.nan) for k in values}
    position = np.searchsorted(order, step)
    for k, v in values.items():
        for row, slot in enumerate(position):
            if math.isfinite(v[row]):
                merged[k][slot] = v[row]
    return order, merged


def read_history(history: History, *, keys: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """One run's history as float arrays `step, loss, lr, sharpness, lr_sharpness` (NaN = not measured).

    Args:
        history: one run in any format of the module docstring.
        keys: column names to use instead of the defaults, e.g. `{"loss": "train_loss_step"}`.

    Returns:
        `{"step", "loss", "lr", "sharpness", "lr_sharpness"}` float64 arrays of one length, sorted by step.

    Raises:
        ValueError: the format is not recognised, or none of the four quantities is present (the
            message lists the columns found).
        ImportError: a TensorBoard log is given and the `tensorboard` package is missing.
    """
    return _from_columns(_raw_columns(history), keys)


def _from_columns(columns: Mapping[str, list[Any]], keys: Mapping[str, str] | None) -> dict[str, np.ndarray]:
    keys = dict(keys or {})
    unknown = set(keys) - {*QUANTITIES, "step"}
    if unknown:
        raise ValueError(f"plot_edge_of_stability: keys may rename {', '.join(('step', *QUANTITIES))}; "
                         f"got {sorted(unknown)}")
    found: dict[str, np.ndarray] = {}
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"plot_edge_of_stability: the history's columns have different lengths {sorted(lengths)}; "
                         "give one value per step in every column (NaN where not measured)")
    length = lengths.pop() if lengths else 0
    for quantity in QUANTITIES:
        if quantity in keys and keys[quantity] not in columns:
            raise ValueError(f"plot_edge_of_stability: keys[{quantity!r}] = {keys[quantity]!r} is not a column; "
                             f"columns: {sorted(columns)}")
        name = keys.get(quantity) or _find(columns, _candidates(quantity))
        found[quantity] = (np.array([_number(v) for v in columns[name]], dtype=np.float64) if name
                           else np.full(length, np.nan))
    if not any(np.isfinite(v).any() for v in found.values()):
        raise ValueError("plot_edge_of_stability: the history has none of loss, lr, sharpness, lr_sharpness "
                         f"(tried eos/<name>, train/eos/<name>, eos_<name>, <name>); columns found: "
                         f"{sorted(columns)[:20]}")
    step_name = keys.get("step") or _find(columns, _STEP_NAMES)
    step = (np.array([_number(v) for v in columns[step_name]], dtype=np.float64) if step_name
            else np.arange(length, dtype=np.float64))
    keep = np.isfinite(step)
    step, found = step[keep], {k: v[keep] for k, v in found.items()}
    step, found = _merge_by_step(step, found)
    lr, sharpness, edge = found["lr"], found["sharpness"], found["lr_sharpness"]
    found["lr_sharpness"] = np.where(np.isnan(edge), lr * sharpness, edge)
    with np.errstate(divide="ignore", invalid="ignore"):
        found["sharpness"] = np.where(np.isnan(sharpness) & (lr != 0), edge / lr, sharpness)
    return {"step": step, **found}


def _split_runs(columns: dict[str, list[Any]]) -> dict[str, dict[str, list[Any]]] | None:
    """A table with a text column `method` / `run` -> one table per run, in order of appearance."""
    for name in _RUN_COLUMNS:
        values = columns.get(name)
        if values is None or all(math.isfinite(_number(v)) for v in values if v not in (None, "")):
            continue
        runs: dict[str, dict[str, list[Any]]] = {}
        for i, run in enumerate(values):
            table = runs.setdefault(str(run), {k: [] for k in columns if k != name})
            for k in table:
                table[k].append(columns[k][i])
        return runs
    return None


def read_runs(history: History, *, keys: Mapping[str, str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """One or several runs -> `{run name: read_history(...)}` (a single run is named `""`).

    Args:
        history: one run, a mapping `name -> history`, a table with a `method` / `run` column, or a TensorBoard log
            directory (one run per folder holding event files).
        keys: column names to use instead of the defaults (see [`read_history`][eos_core.plotting.read_history]).

    Returns:
        `{run name: {"step", "loss", "lr", "sharpness", "lr_sharpness"}}` in the order given (TensorBoard runs
        sorted by folder).

    Raises:
        ValueError: a run cannot be read (the message says which and why).
        ImportError: a TensorBoard log is given and the `tensorboard` package is missing.
    """
    if isinstance(history, Mapping) and history and not all(_is_column(v) for v in history.values()):
        bad = [k for k, v in history.items() if not _is_history(v) or _is_column(v)]
        if bad:
            raise ValueError(f"plot_edge_of_stability: a mapping of runs maps names to histories; {bad[:3]} "
                             "are not (a single run's dict must map names to lists of numbers)")
        runs: dict[str, dict[str, np.ndarray]] = {}
        for name, run in history.items():
            for sub, data in read_runs(run, keys=keys).items():
                runs[f"{name} {sub}".strip() if sub else str(name)] = data
        return runs
    if isinstance(history, str | os.PathLike):
        events = tensorboard_runs(history)
        if len(events) > 1:
            return {name: _from_columns(read_tensorboard(folder), keys) for name, folder in events.items()}
    if isinstance(history, str | os.PathLike) or hasattr(history, "columns"):
        split = _split_runs(_raw_columns(history))
        if split is not None:
            return {name: _from_columns(table, keys) for name, table in split.items()}
    return {"": read_history(history, keys=keys)}


# -- drawing ------------------------------------------------------------------------------------------------------


def alternates(values: np.ndarray) -> bool:
    """True when a series flips up and down from one measured value to the next (a period-2 oscillation).

    The greedy rule `CDAT(scale=1)` alternates its lr between two levels every step; drawn step by step
    such a series becomes a solid band that hides the other runs.

    Args:
        values: one series, NaN where not measured.

    Returns:
        Whether at least [`OSCILLATION_FLIPS`][eos_core.plotting.OSCILLATION_FLIPS] of the consecutive changes of the
        measured values flip sign and their median size is at least 5% (in log scale for a positive series, relative
        to the median magnitude otherwise).
    """
    finite = values[np.isfinite(values)]
    if finite.size < 8:
        return False
    if (finite > 0).all():
        change = np.diff(np.log(finite))
        size = float(np.median(np.abs(change)))
    else:
        change = np.diff(finite)
        scale = float(np.median(np.abs(finite)))
        size = float(np.median(np.abs(change))) / scale if scale > 0 else 0.0
    signs = np.sign(change)
    flips = float(np.mean(signs[1:] * signs[:-1] < 0))
    return flips >= OSCILLATION_FLIPS and size >= OSCILLATION_AMPLITUDE


def pair_mean(step: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean of each two consecutive measured values, at the midpoint of their steps.

    Geometric for a positive series (the mean of lr and of 2/lr then agree: 2 / mean(lr) = mean(2/lr)),
    arithmetic otherwise.

    Args:
        step: the steps.
        values: the series, NaN where not measured.

    Returns:
        `(midpoints, means)`, one shorter than the measured points.
    """
    keep = np.isfinite(values)
    x, y = step[keep], values[keep]
    if y.size < 2:
        return x[:0], y[:0]
    middle = 0.5 * (x[1:] + x[:-1])
    if (y > 0).all():
        return middle, np.sqrt(y[1:] * y[:-1])
    return middle, 0.5 * (y[1:] + y[:-1])


def _run_style(index: int) -> dict[str, Any]:
    return {"color": PALETTE[index % len(PALETTE)], "linestyle": LINESTYLES[index % len(LINESTYLES)],
            "marker": MARKERS[index % len(MARKERS)]}


def _markers(points: int, index: int, runs: int, marker: str) -> dict[str, Any]:
    """Marker settings: every point of a short series, about 10 per long series, offset per run."""
    style: dict[str, Any] = {"marker": marker, "markersize": 4.5, "markerfacecolor": "white", "markeredgewidth": 1.1}
    if points >= 60:
        every = points // 10
        style["markevery"] = ((index * every) // max(runs, 1), every)
    return style


def _draw(ax: Any, step: np.ndarray, values: np.ndarray, style: Mapping[str, Any], index: int, runs: int) -> bool:
    """One run's series on one panel; returns whether it alternates (then drawn faint, with its 2-step mean)."""
    mask = np.isfinite(values)
    if not mask.any():
        return False
    x, y = step[mask], values[mask]
    line = {"color": style["color"], "linestyle": style["linestyle"], "linewidth": 1.4,
            "zorder": 2.0 + (runs - index) / (runs + 1)}
    smooth = alternates(y)
    if smooth:
        ax.plot(x, y, color=style["color"], linewidth=0.6, alpha=0.28, zorder=1.0)
        x, y = pair_mean(x, y)
    if x.size:
        ax.plot(x, y, **line, **_markers(x.size, index, runs, style["marker"]))
    return smooth


def _thresholds(ax: Any, step: np.ndarray, lr: np.ndarray, edge: float, style: Mapping[str, Any]) -> None:
    """`edge / lr` dotted in the run's colour (the mean of two steps when the lr alternates), labelled."""
    with np.errstate(divide="ignore", invalid="ignore"):
        threshold = np.where(lr > 0, edge / lr, np.nan)
    mask = np.isfinite(threshold)
    if not mask.any():
        return
    x, y = step[mask], threshold[mask]
    if alternates(y):
        ax.plot(x, y, color=style["color"], linewidth=0.5, alpha=0.15, zorder=1.0)
        x, y = pair_mean(x, y)
    if not x.size:
        return
    ax.plot(x, y, color=style["color"], linestyle=":", linewidth=1.3, alpha=0.95, zorder=1.5)
    ax.annotate(f"{edge:g}/lr", xy=(x[-1], y[-1]), xytext=(3, 0), textcoords="offset points", color=style["color"],
                fontsize="x-small", va="center", ha="left", annotation_clip=True)


def _mark_clipped(ax: Any, runs: Mapping[str, Mapping[str, np.ndarray]], styles: Sequence[Mapping[str, Any]],
                  top: float) -> int:
    """Triangles on the top edge where `lr * sharpness` exceeds the panel; returns how many values did."""
    blended = require("matplotlib.transforms", extra="plot", feature="eos_core.plotting.plot_edge_of_stability")
    transform = blended.blended_transform_factory(ax.transData, ax.transAxes)
    count, highest = 0, -math.inf
    for data, style in zip(runs.values(), styles, strict=True):
        values = data["lr_sharpness"]
        above = np.isfinite(values) & (values > top)
        if above.any():
            count += int(above.sum())
            highest = max(highest, float(values[above].max()))
            ax.scatter(data["step"][above], np.full(int(above.sum()), 0.985), transform=transform, marker="^",
                       s=18, color=style["color"], clip_on=False, zorder=4, linewidths=0)
    if count:
        ax.text(0.01, 0.97, f"\u25b2 {count} value{'s' if count > 1 else ''} above {top:.3g} (max {highest:.3g})",
                transform=ax.transAxes, ha="left", va="top", fontsize="x-small",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.0})
    return count


def plot_edge_of_stability(
    history: History,
    *,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    edge: float = 2.0,
    keys: Mapping[str, str] | None = None,
    figsize: tuple[float, float] = (11.0, 7.5),
    dpi: int = 120,
) -> Any:
    r"""Draw loss, lr, sharpness (with `edge / lr` dotted) and lr * sharpness (with the line at `edge`).

    Args:
        history: one run's history or a mapping `name -> history` (see the module docstring for the formats,
            TensorBoard log directories included).
        path: when given, the figure is also saved there (format from the extension, e.g. `.png`, `.pdf`).
        title: the figure's title.
        edge: the stability threshold of $\eta \lambda_{\max}$: 2 for gradient descent (a quadratic with
            curvature $\lambda$ diverges under a step $\eta > 2/\lambda$; CDAT paper section 2.2).
        keys: column names to use instead of the defaults, e.g. `{"loss": "train_loss_step"}`.
        figsize: figure size in inches.
        dpi: the resolution used when saving.

    Returns:
        The `matplotlib.figure.Figure` (four axes: loss, lr, sharpness, lr * sharpness). It is not
        registered with pyplot; display it in a notebook by leaving it as a cell's value.

    Raises:
        ImportError: matplotlib is missing (`pip install 'eos-core[plot]'`), or a TensorBoard log is
            given and `tensorboard` is missing (`pip install 'eos-core[tensorboard]'`).
        ValueError: the history cannot be read (the message says why), or `edge` is not positive.

    Examples:
        >>> import numpy as np
        >>> from eos_core.plotting import plot_edge_of_stability
        >>> steps = np.arange(50)
        >>> lr = np.where(steps % 2 == 0, 0.2, 0.4)  # an lr that flips every step, like CDAT(scale=1)
        >>> history = {"loss": np.exp(-steps / 20), "lr": lr, "sharpness": 2.2 / lr}
        >>> figure = plot_edge_of_stability({"greedy": history}, title="one run")
        >>> [ax.get_title() for ax in figure.axes]
        ['train loss', 'learning rate', 'sharpness $\\lambda_{\\max}$ (dotted: 2/lr)', 'lr $\\times$ sharpness']
    """
    if not (edge > 0 and math.isfinite(edge)):
        raise ValueError(f"plot_edge_of_stability: edge must be > 0 and finite, got {edge!r}")
    runs = read_runs(history, keys=keys)
    figure_module = require("matplotlib.figure", extra="plot", feature="eos_core.plotting.plot_edge_of_stability")
    lines = require("matplotlib.lines", extra="plot", feature="eos_core.plotting.plot_edge_of_stability")
    figure = figure_module.Figure(figsize=figsize, dpi=dpi, layout="constrained")
    axes = figure.subplots(2, 2, sharex=True)
    ax_loss, ax_lr, ax_sharp, ax_edge = axes.ravel()
    styles = [_run_style(i) for i in range(len(runs))]
    smoothed = False
    for index, (data, style) in enumerate(zip(runs.values(), styles, strict=True)):
        step = data["step"]
        for ax, key in ((ax_loss, "loss"), (ax_lr, "lr"), (ax_sharp, "sharpness"), (ax_edge, "lr_sharpness")):
            smoothed |= _draw(ax, step, data[key], style, index, len(runs))
        _thresholds(ax_sharp, step, data["lr"], edge, style)
    ax_edge.axhline(edge, color="black", linestyle=(0, (6, 3)), linewidth=1.3, zorder=1.8,
                    label=f"edge of stability ({edge:g})")

    def finite(key: str) -> np.ndarray:
        values = [d[key][np.isfinite(d[key])] for d in runs.values()]
        return np.concatenate(values) if values else np.array([])

    for ax, key in ((ax_loss, "loss"), (ax_lr, "lr"), (ax_sharp, "sharpness")):
        values = finite(key)
        if values.size and (values > 0).all():
            ax.set_yscale("log")
        if not values.size:
            ax.text(0.5, 0.5, f"{key} not logged", transform=ax.transAxes, ha="center", va="center", color="gray")
    sharp = finite("sharpness")
    if sharp.size:  # keep 2/lr of a vanishing lr from squashing the measured sharpness
        low, high = float(sharp.min()), float(sharp.max())
        if ax_sharp.get_yscale() == "log":
            ax_sharp.set_ylim(low / 3.0, high * 3.0)
        else:
            pad = 0.1 * max(high - low, abs(high), 1e-12)
            ax_sharp.set_ylim(low - pad, high + pad)
    products = finite("lr_sharpness")
    if products.size:
        highest = float(products.max())
        if highest <= 3.0 * edge:  # everything fits: nothing is clipped
            top = max(1.25 * edge, 1.05 * highest)
        else:  # early spikes would squash the panel: cut at the 99th percentile, and mark what is above
            top = max(1.25 * edge, min(1.05 * float(np.quantile(products, 0.99)), 3.0 * edge))
        ax_edge.set_ylim(min(0.0, float(products.min()) * 1.05), top)
        _mark_clipped(ax_edge, runs, styles, top)
    else:
        ax_edge.text(0.5, 0.5, "sharpness not logged", transform=ax_edge.transAxes, ha="center", va="center",
                     color="gray")
    ax_loss.set_title("train loss")
    ax_lr.set_title("learning rate")
    ax_sharp.set_title(f"sharpness $\\lambda_{{\\max}}$ (dotted: {edge:g}/lr)")
    ax_edge.set_title("lr $\\times$ sharpness")
    for ax in (ax_sharp, ax_edge):
        ax.set_xlabel("step")
    for ax in axes.ravel():
        ax.grid(True, alpha=0.3)
    handles = [lines.Line2D([], [], color=s["color"], linestyle=s["linestyle"], marker=s["marker"],
                            markerfacecolor="white", linewidth=1.4, label=name)
               for name, s in zip(runs, styles, strict=True) if name]
    if smoothed:
        handles += [lines.Line2D([], [], color="gray", linewidth=0.6, alpha=0.4, label="alternating series: each step"),
                    lines.Line2D([], [], color="gray", linewidth=1.4, label="... and mean of 2 consecutive steps")]
    if handles:  # one legend for the runs, below the panels
        figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize="small")
    threshold_handle = lines.Line2D([], [], color="gray", linestyle=":", linewidth=1.3,
                                    label=f"{edge:g}/lr, in its run's colour")
    ax_sharp.legend(handles=[threshold_handle], fontsize="x-small", loc="lower right")
    edge_handle = next(line for line in ax_edge.get_lines() if line.get_label().startswith("edge of stability"))
    ax_edge.legend([edge_handle], [edge_handle.get_label()], fontsize="small", loc="upper right")
    if title:
        figure.suptitle(title)
    if path is not None:
        figure.savefig(path, dpi=dpi)
    return figure
