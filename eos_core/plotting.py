r"""The edge-of-stability figure (SPEC section 6; CDAT paper Fig. 1, 3, 5): loss, lr, sharpness, lr * sharpness.

:func:`plot_edge_of_stability` draws the four panels from any tuner's diagnostics history:

1. the training loss;
2. the learning rate :math:`\eta_t`;
3. the sharpness :math:`\lambda_{\max}(H_t)` with :math:`2/\eta_t` dashed in the same colour (GD on a
   quadratic diverges along the top eigenvector once :math:`\lambda_{\max} > 2/\eta`);
4. :math:`\eta_t \lambda_{\max}(H_t)` with the edge of stability, the line at 2.

Accepted histories (one run, or a mapping ``name -> history`` for several runs in one figure):

* a list of diagnostics dicts, one per step (``tuner.diagnostics`` of the PyTorch adapter,
  ``eos_core.adapters.jax.diagnostics(state)``, Hugging Face ``trainer.state.log_history``; the
  ``TrainerState`` itself works too);
* a dict of lists / arrays (Keras ``History.history``; a Keras ``History`` object works too);
* a pandas ``DataFrame``;
* a CSV path (Lightning's ``CSVLogger`` ``metrics.csv``, the demo's ``trajectories.csv``). A CSV or
  DataFrame with a text column ``method`` or ``run`` holds several runs and is split on it.

Column names are looked up as ``eos/<name>``, ``eos_<name>`` then ``<name>`` for ``loss``, ``lr``,
``sharpness`` and ``lr_sharpness`` (the names the callbacks log), the loss also as ``train_loss``,
``train/loss`` or ``training_loss``; ``keys={"loss": "my_loss"}`` overrides any of them. Rows that
share a ``step`` (Lightning writes one row per logging call, Hugging Face one entry per log event)
are merged. NaN or an empty cell means "not measured on that step" (sharpness is tracked every m
steps): each curve is drawn through its measured points. ``lr_sharpness`` missing is computed as
``lr * sharpness``.

Needs matplotlib (``pip install 'eos-core[plot]'``), imported only when a figure is drawn.
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
#: Column names tried for each quantity, in order, after the ``eos/`` and ``eos_`` prefixed names.
_EXTRA_NAMES = {"loss": ("train_loss", "train/loss", "training_loss", "train_loss_step")}
_STEP_NAMES = ("step", "global_step", "eos/step", "iteration")
_RUN_COLUMNS = ("method", "run")

History = Any


def _candidates(quantity: str) -> tuple[str, ...]:
    return (f"eos/{quantity}", f"eos_{quantity}", quantity, *_EXTRA_NAMES.get(quantity, ()))


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


def _raw_columns(history: History) -> dict[str, list[Any]]:
    """Any accepted single-run format -> ``{column name: list of values}``."""
    if isinstance(history, str | os.PathLike):
        return _read_csv(Path(history))
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
                     "diagnostics dicts, a dict of lists, a pandas DataFrame, a CSV path, a Keras History or a "
                     "Hugging Face TrainerState")


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
    """One run's history as float arrays ``step, loss, lr, sharpness, lr_sharpness`` (NaN = not measured).

    Raises:
        ValueError: the format is not recognised, or none of the four quantities is present (the
            message lists the columns found).
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
                         f"(tried eos/<name>, eos_<name>, <name>); columns found: {sorted(columns)[:20]}")
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
    """A table with a text column ``method`` / ``run`` -> one table per run, in order of appearance."""
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
    """One or several runs -> ``{run name: read_history(...)}`` (a single run is named ``""``)."""
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
    if isinstance(history, str | os.PathLike) or hasattr(history, "columns"):
        split = _split_runs(_raw_columns(history))
        if split is not None:
            return {name: _from_columns(table, keys) for name, table in split.items()}
    return {"": read_history(history, keys=keys)}


def _plot_series(ax: Any, x: np.ndarray, y: np.ndarray, **style: Any) -> Any:
    mask = np.isfinite(y)
    if not mask.any():
        return None
    if mask.sum() < 60:
        style.setdefault("marker", ".")
        style.setdefault("markersize", 4)
    style.setdefault("linewidth", 1.1)
    (line,) = ax.plot(x[mask], y[mask], **style)
    return line


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
    r"""Draw loss, lr, sharpness (with ``edge / lr`` dashed) and lr * sharpness (with the line at ``edge``).

    Args:
        history: one run's history or a mapping ``name -> history`` (see the module docstring for the formats).
        path: when given, the figure is also saved there (format from the extension, e.g. ``.png``, ``.pdf``).
        title: the figure's title.
        edge: the stability threshold of :math:`\eta \lambda_{\max}` (2 for GD; SPEC section 6).
        keys: column names to use instead of the defaults, e.g. ``{"loss": "train_loss_step"}``.
        figsize, dpi: figure size in inches and the resolution used when saving.

    Returns:
        The ``matplotlib.figure.Figure`` (four axes: loss, lr, sharpness, lr * sharpness). It is not
        registered with pyplot; display it in a notebook by leaving it as a cell's value.

    Raises:
        ImportError: matplotlib is missing (``pip install 'eos-core[plot]'``).
        ValueError: the history cannot be read (the message says why).
    """
    if not (edge > 0 and math.isfinite(edge)):
        raise ValueError(f"plot_edge_of_stability: edge must be > 0 and finite, got {edge!r}")
    runs = read_runs(history, keys=keys)
    figure_module = require("matplotlib.figure", extra="plot", feature="eos_core.plotting.plot_edge_of_stability")
    figure = figure_module.Figure(figsize=figsize, dpi=dpi, layout="constrained")
    axes = figure.subplots(2, 2, sharex=True)
    ax_loss, ax_lr, ax_sharp, ax_edge = axes.ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for index, ((name, data), color) in enumerate(zip(runs.items(), colors, strict=True)):
        step = data["step"]
        # earlier runs on top: a run whose lr alternates between two values (the greedy rule) draws a band
        style = {"color": color, "label": name or None, "zorder": 2.0 + (len(runs) - index) / (len(runs) + 1)}
        _plot_series(ax_loss, step, data["loss"], **style)
        _plot_series(ax_lr, step, data["lr"], **style)
        _plot_series(ax_sharp, step, data["sharpness"], **style)
        with np.errstate(divide="ignore", invalid="ignore"):
            threshold = np.where(data["lr"] > 0, edge / data["lr"], np.nan)
        _plot_series(ax_sharp, step, threshold, **{**style, "label": None}, linestyle="--", linewidth=0.8, alpha=0.6,
                     marker="")
        _plot_series(ax_edge, step, data["lr_sharpness"], **style)
    ax_edge.axhline(edge, color="black", linestyle=":", linewidth=1.2, label=f"edge of stability ({edge:g})")

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
        top = float(np.quantile(products, 0.99))
        ax_edge.set_ylim(min(0.0, float(products.min()) * 1.05), max(1.25 * edge, min(1.05 * top, 3.0 * edge)))
    else:
        ax_edge.text(0.5, 0.5, "sharpness not logged", transform=ax_edge.transAxes, ha="center", va="center",
                     color="gray")
    ax_loss.set_title("train loss")
    ax_lr.set_title("learning rate")
    ax_sharp.set_title(f"sharpness $\\lambda_{{\\max}}$ (dashed: {edge:g}/lr)")
    ax_edge.set_title("lr $\\times$ sharpness")
    for ax in (ax_sharp, ax_edge):
        ax.set_xlabel("step")
    for ax in axes.ravel():
        ax.grid(True, alpha=0.3)
    if any(runs):  # one legend for the runs, below the panels
        lines = require("matplotlib.lines", extra="plot", feature="eos_core.plotting.plot_edge_of_stability")
        handles = [lines.Line2D([], [], color=color, label=name) for name, color in zip(runs, colors, strict=True)]
        figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize="small")
    edge_handle = ax_edge.get_lines()[-1]
    ax_edge.legend([edge_handle], [edge_handle.get_label()], fontsize="small", loc="upper right")
    if title:
        figure.suptitle(title)
    if path is not None:
        figure.savefig(path, dpi=dpi)
    return figure
