"""Tables and figures from the runs' JSON files.

Per task: `table.md` (every method, sorted by the mean over seeds of the ratio of its final validation loss to
that seed's best AdamW warm-up + cosine of the grid), `summary.json` (the same figures, machine-readable) and
`<task>.png` (validation loss every 5% of training and lr against steps, log scale, for the anchor, the best
constant Adam, every peer and the best other methods).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

#: the families the suite compares against (tuned schedules and learning-rate-free peers)
BASELINE_FAMILIES = ("cosine", "constant", "peer")


def load_results(out: Path, task: str) -> list[dict[str, Any]]:
    """Read every run's JSON of one task.

    Args:
        out: the results folder.
        task: the task's name.

    Returns:
        The parsed `out/<task>/*/seed*.json` files, sorted by path (method, then seed); empty when there are none.
    """
    return [json.loads(p.read_text()) for p in sorted((out / task).glob("*/seed*.json"))]


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed anchors (best warm-up + cosine) and per-method ratios.

    The anchor of a seed is the AdamW warm-up + cosine run (family `cosine`) with the lowest final validation loss
    among those with status `ok`; a run's ratio is its final validation loss / its seed's anchor's (inf for a
    run that did not finish with a finite loss). Observer runs (family `observe`) are left out.

    Args:
        results: the runs' JSON dicts (`load_results`).

    Returns:
        `{"seeds": [...], "anchors": {seed: (method, val)}, "rows": [row, ...]}`; a row has `method`,
        `family`, `val` / `ratio` / `train` / `time_ratio` per seed, `mean_ratio`, `mean_val`,
        `mean_time_ratio`, `status` per seed; rows sorted by `mean_ratio` (missing or failed runs last).
        `mean_ratio` is inf unless every seed has a ratio; `reason` per seed holds a skipped run's reason.
    """
    by_method: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    results = [r for r in results if r["family"] != "observe"]
    seeds = sorted({r["seed"] for r in results})  # after dropping observers: a seed only they ran is not a column
    for r in results:
        by_method[r["method"]][r["seed"]] = r
    anchors: dict[int, tuple[str, float]] = {}
    for seed in seeds:
        cos = [(r["final_val_loss"], r["method"]) for r in results
               if r["seed"] == seed and r["family"] == "cosine" and r["status"] == "ok"]
        if cos:
            val, name = min(cos)
            anchors[seed] = (name, val)
    rows = []
    for method, runs in by_method.items():
        any_run = next(iter(runs.values()))
        row: dict[str, Any] = {"method": method, "family": any_run["family"], "val": {}, "ratio": {}, "train": {},
                               "time_ratio": {}, "status": {}, "reason": {}}
        for seed in seeds:
            r = runs.get(seed)
            if r is None:
                row["status"][seed] = "missing"
                continue
            row["status"][seed] = r["status"]
            if r["status"] == "skipped":
                row["reason"][seed] = r.get("reason", "")
                continue
            val = r.get("final_val_loss", math.inf)
            row["val"][seed] = val
            row["train"][seed] = r.get("final_train_loss", math.inf)
            row["time_ratio"][seed] = r.get("time_ratio", math.nan)
            if seed in anchors and math.isfinite(val):
                row["ratio"][seed] = val / anchors[seed][1]
            elif seed in anchors:
                row["ratio"][seed] = math.inf
        complete = len(row["ratio"]) == len(seeds) and seeds
        row["mean_ratio"] = float(np.mean([row["ratio"][s] for s in seeds])) if complete else math.inf
        vals = list(row["val"].values())
        row["mean_val"] = float(np.mean(vals)) if vals else math.inf
        times = [t for t in row["time_ratio"].values() if math.isfinite(t)]
        row["mean_time_ratio"] = float(np.mean(times)) if times else math.nan
        rows.append(row)
    rows.sort(key=lambda row: (not math.isfinite(row["mean_ratio"]), row["mean_ratio"], row["mean_val"]))
    return {"seeds": seeds, "anchors": anchors, "rows": rows}


def _f(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def markdown_table(task: str, summary: dict[str, Any]) -> str:
    """The task's table: one row per method, sorted by the mean ratio to the best warm-up + cosine.

    Args:
        task: the task's name (the table's heading).
        summary: the task's summary (`summarize`).

    Returns:
        Markdown: a `### <task>` heading, a line naming each seed's anchor, and a table with, per method, the final
        validation loss and the ratio per seed (or `diverged` / `error` / `missing`), the mean ratio, the mean
        final training loss and the mean time per step / plain AdamW's. Anchors are in bold; a method skipped on
        every seed gets one cell with the reason.
    """
    seeds = summary["seeds"]
    anchors = summary["anchors"]
    lines = [f"### {task}", ""]
    anchor_text = ", ".join(f"seed {s}: {anchors[s][0]} ({anchors[s][1]:.4f})" for s in seeds if s in anchors)
    lines.append(f"Anchor (best AdamW warm-up + cosine of the grid, per seed): {anchor_text or 'none'}.")
    lines.append("")
    head = ["#", "method", *[f"val s{s}" for s in seeds], *[f"ratio s{s}" for s in seeds], "mean ratio",
            "train loss (mean)", "time/step vs AdamW"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for i, row in enumerate(summary["rows"], 1):
        status = {s: row["status"].get(s) for s in seeds}
        if all(v == "skipped" for v in status.values()):
            reason = next(iter(row["reason"].values()), "")
            lines.append(f"| {i} | {row['method']} | skipped: {reason} |" + " |" * (len(head) - 3))
            continue
        vals = []
        for s in seeds:
            v = row["val"].get(s)
            text = _f(v) if v is not None else status[s]
            if status[s] == "diverged":
                text = "diverged"
            elif status[s] == "error":
                text = "error"
            vals.append(text)
        ratios = [_f(row["ratio"].get(s, math.nan)) for s in seeds]
        trains = [t for t in row["train"].values() if math.isfinite(t)]
        train = _f(float(np.mean(trains))) if trains and len(trains) == len(row["train"]) else "-"
        name = f"**{row['method']}**" if row["family"] in BASELINE_FAMILIES and row["family"] != "constant" \
            and row["method"] in {a[0] for a in anchors.values()} else row["method"]
        lines.append(f"| {i} | {name} | " + " | ".join(vals) + " | " + " | ".join(ratios) +
                     f" | {_f(row['mean_ratio'])} | {train} | {_f(row['mean_time_ratio'], 2)} |")
    return "\n".join(lines) + "\n"


def _pick_for_plot(summary: dict[str, Any], extra: list[str] | None, top: int = 6) -> list[str]:
    rows = summary["rows"]
    chosen: list[str] = []

    def add(name: str) -> None:
        if name not in chosen:
            chosen.append(name)

    for family in ("cosine", "constant"):
        best = [r for r in rows if r["family"] == family and math.isfinite(r["mean_ratio"])]
        if best:
            add(best[0]["method"])
    for r in rows:
        if r["family"] == "peer" and r["val"]:
            add(r["method"])
    others = [r for r in rows if r["family"] not in BASELINE_FAMILIES and math.isfinite(r["mean_ratio"])]
    for r in others[:top]:
        add(r["method"])
    for name in extra or []:
        if any(r["method"] == name for r in rows):
            add(name)
    return chosen


def plot_task(task: str, results: list[dict[str, Any]], summary: dict[str, Any], path: Path,
              extra: list[str] | None = None) -> Path | None:
    """Draw the task's figure: validation loss and lr (log scale) against steps, on the first seed.

    The methods drawn are the best warm-up + cosine and the best constant Adam, every peer, the 6 best other
    methods, and `extra`; only runs with status `ok` or `diverged` are drawn.

    Args:
        task: the task's name (in the titles).
        results: the runs' JSON dicts.
        summary: the task's summary (`summarize`).
        path: the PNG to write (its folder is created).
        extra: more method names to draw (names absent from the results are ignored).

    Returns:
        `path`, or None when matplotlib is not installed (nothing is drawn).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    seed = summary["seeds"][0] if summary["seeds"] else 0
    runs = {r["method"]: r for r in results if r["seed"] == seed and r["status"] in ("ok", "diverged")}
    names = [n for n in _pick_for_plot(summary, extra) if n in runs]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        r = runs[name]
        style = {"cosine": "-", "constant": ":", "peer": "--"}.get(r["family"], "-")
        width = 2.2 if r["family"] in ("proto", "law") else 1.3
        color = cmap(i % 20)
        curve = r["val_curve"]
        axes[0].plot(curve["step"], curve["value"], style, color=color, lw=width, label=name)
        lr = np.asarray(r["lr"]["value"], dtype=float)
        steps = np.asarray(r["lr"]["step"])
        keep = lr > 0
        label = name + (" (SGD units)" if name in ("dog", "ldog") else "")
        axes[1].plot(steps[keep], lr[keep], style, color=color, lw=width, label=label)
    anchor = summary["anchors"].get(seed)
    axes[0].set(xlabel="step", ylabel="validation loss", title=f"{task}, seed {seed}: validation loss")
    if anchor:
        axes[0].axhline(anchor[1], color="k", lw=0.6, alpha=0.5)
        finals = [runs[n]["val_curve"]["value"][-1] for n in names if runs[n]["val_curve"]["value"]]
        finite = [v for v in finals if math.isfinite(v)]
        if finite:
            axes[0].set_ylim(min(finite) * 0.97, max(min(max(finite), anchor[1] * 2.0), anchor[1] * 1.3))
    axes[1].set(xlabel="step", ylabel="lr", yscale="log", title="learning rate applied")
    if names:
        axes[0].legend(fontsize=7)
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def numerator_bias(results: list[dict[str, Any]]) -> str:
    """Tabulate the bias of the mini-batch numerators, measured on this task.

    Per quarter of the run: the mean -g_t.u_{t-1} (uncorrected, a gradient the update did not see) and the
    corrected lag numerator n_t, each over the mean same-batch -g_t.u_t, from the `proto-lag-*` runs with status
    `ok`, no decay, the `fd` route and a probe every step (see `benchmarks.minibatch.prototypes` for the
    numerators).

    Args:
        results: the runs' JSON dicts.

    Returns:
        A Markdown table, one row per such run and seed (sorted); the empty string when there is none.
    """
    rows = []
    for r in results:
        q = r.get("extra", {}).get("quarters")
        if not q or r["status"] != "ok" or not r["method"].startswith("proto-lag-") or "-p" in r["method"][9:]:
            continue
        if r["settings"]["prototype"]["decay"] is not None or r["settings"]["prototype"]["route"] != "fd":
            continue
        raw = [a / b if b else math.nan for a, b in zip(q["n_raw"], q["n_same"], strict=True)]
        cor = [a / b if b else math.nan for a, b in zip(q["n"], q["n_same"], strict=True)]
        rows.append(f"| {r['method']} | {r['seed']} | " + " / ".join(_f(x, 2) for x in raw) + " | " +
                    " / ".join(_f(x, 2) for x in cor) + " |")
    if not rows:
        return ""
    head = ("| run | seed | uncorrected -g_t.u_{t-1} / same-batch -g_t.u_t, quarters 1-4 | "
            "corrected n_t / same-batch, quarters 1-4 |\n|---|---|---|---|\n")
    return head + "\n".join(sorted(rows)) + "\n"


def observed(results: list[dict[str, Any]]) -> str:
    """Tabulate where the fixed schedules observed with passive probes sit relative to the greedy lr n~/d~.

    Args:
        results: the runs' JSON dicts; the observer runs (family `observe`, status `ok`) are used.

    Returns:
        A Markdown table, one row per observer run and seed: its final validation loss, per quarter the median of
        applied lr / greedy lr with the lag (unbiased) pair, the median lag greedy lr, and the same ratio with the
        same-batch pair; the empty string when there is no observer run.
    """
    rows = []
    for r in sorted(results, key=lambda r: (r["method"], r["seed"])):
        x = r.get("extra", {})
        if r["family"] != "observe" or r["status"] != "ok" or "rho_lag" not in x:
            continue
        rows.append(f"| {r['method']} | {r['seed']} | {_f(r['final_val_loss'])} | "
                    + " / ".join(_f(v, 2) for v in x["rho_lag"]) + " | "
                    + " / ".join(f"{v:.2g}" for v in x["greedy_lr_lag"]) + " | "
                    + " / ".join(_f(v, 3) for v in x["rho_same"]) + " |")
    if not rows:
        return ""
    head = ("| schedule | seed | val | lr / lag greedy lr, quarters 1-4 | lag greedy lr n~/d~ | "
            "lr / same-batch greedy lr |\n|---|---|---|---|---|---|\n")
    return head + "\n".join(rows) + "\n"


def cross_task(out: Path, tasks: list[str]) -> str:
    """Compare the methods across tasks, and write the comparison to `out/summary.md`.

    Args:
        out: the results folder.
        tasks: the tasks' names (folders under `out`).

    Returns:
        A Markdown table of every method run on all `tasks`: its mean ratio per task, its worst one, and its mean
        time ratio per task, sorted by the worst task's mean ratio, then by the mean over tasks (the goal is a
        configuration <= 1.00 on every task).
    """
    summaries = {t: summarize(load_results(out, t)) for t in tasks}
    rows: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for t, summary in summaries.items():
        for row in summary["rows"]:
            rows[row["method"]][t] = row
    complete = {m: r for m, r in rows.items() if len(r) == len(tasks)}
    order = sorted(complete, key=lambda m: (max(complete[m][t]["mean_ratio"] for t in tasks),
                                            float(np.mean([complete[m][t]["mean_ratio"] for t in tasks]))))
    head = ["method", *[f"{t} ratio" for t in tasks], "worst", *[f"{t} time" for t in tasks]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in order:
        r = complete[m]
        ratios = [r[t]["mean_ratio"] for t in tasks]
        lines.append(f"| {m} | " + " | ".join(_f(x, 3) for x in ratios) + f" | {_f(max(ratios), 3)} | "
                     + " | ".join(_f(r[t]["mean_time_ratio"], 2) for t in tasks) + " |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def write_report(out: Path, task: str, plot_extra: list[str] | None = None) -> dict[str, Any]:
    """Rebuild a task's report from all the runs' JSON files in its folder.

    Writes into `out/<task>/`: `table.md` (`markdown_table`, followed by `numerator_bias` and `observed` when
    they have rows), `summary.json` (the summary, seeds as string keys) and `<task>.png` (`plot_task`, when
    matplotlib is installed).

    Args:
        out: the results folder.
        task: the task's name.
        plot_extra: more method names to draw in the figure.

    Returns:
        The task's summary (`summarize`).
    """
    results = load_results(out, task)
    summary = summarize(results)
    folder = out / task
    folder.mkdir(parents=True, exist_ok=True)
    bias = numerator_bias(results)
    table = markdown_table(task, summary)
    if bias:
        table += "\nNumerator bias (means per quarter of the run):\n\n" + bias
    seen = observed(results)
    if seen:
        table += "\nFixed schedules seen through the rules' statistics (passive probes every 5 steps):\n\n" + seen
    (folder / "table.md").write_text(table)
    serializable = {**summary, "anchors": {str(k): v for k, v in summary["anchors"].items()},
                    "rows": [{**r, **{key: {str(s): v for s, v in r[key].items()}
                                      for key in ("val", "ratio", "train", "time_ratio", "status", "reason")}}
                             for r in summary["rows"]]}
    (folder / "summary.json").write_text(json.dumps(serializable, indent=1, default=float))
    plot_task(task, results, summary, folder / f"{task}.png", plot_extra)
    return summary
