"""Draw the theory figures of the CDAT paper (Fig. 4, 9, 10, 11) and the two reference problems.

Usage:

```python
python benchmarks/theory_figures.py [--out DIR] [--dpi N]
```

Writes PNG files to DIR (default `theory_figures/`) and prints the numbers the tests in
`tests/theory` assert. Every model runs with its defaults from `eos_core.theory` (the paper's
settings, and our documented choices where the paper gives none). Needs matplotlib
(`pip install 'eos-core[plot]'`); runs in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from eos_core import theory

FIGURES = (
    "fig4_constant_vs_fixed_y.png",
    "fig9_cdat_model.png",
    "fig10_p_eq4.png",
    "fig11_p_cdat_model.png",
    "reference_normalized_gd.png",
    "reference_minimalist.png",
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="theory_figures.py",
        description="Draw the edge-of-stability theory figures (CDAT paper Fig. 4, 9, 10, 11 and the "
        "reference problems of Arora et al. and Liu et al.) and print the numbers the tests check.",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("theory_figures"), help="output folder (default: theory_figures/)"
    )
    parser.add_argument(
        "--dpi", type=_positive_int, default=110, help="resolution of the PNGs, dots per inch (default: 110)"
    )
    return parser


def _first_crossing(values: np.ndarray, level: float) -> int:
    above = np.flatnonzero(values >= level)
    return int(above[0]) if above.size else -1


def _run_models() -> dict[str, Any]:
    runs: dict[str, Any] = {
        "constant": theory.simulate_constant_lr(),
        "fixed_y": theory.simulate_fixed_y(),
        "cdat_2": theory.simulate_cdat_model(sigma=2.0),
        "cdat_1.9": theory.simulate_cdat_model(sigma=1.9),
        "ngd": theory.simulate_normalized_gd(),
        "sqrt": theory.simulate_sqrt_loss_gd(),
        "minimalist": theory.simulate_minimalist_gd(),
    }
    return runs


def _summary(runs: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(model, quantity, value) rows: the numbers tests/theory asserts."""
    rows: list[tuple[str, str, str]] = []

    def add(model: str, quantity: str, value: str) -> None:
        rows.append((model, quantity, value))

    c = runs["constant"]
    n = len(c.sharpness) - 1
    edge = 2.0 / c.eta[0]
    cross = _first_crossing(c.sharpness, edge)
    model = "eq4 constant lr"
    add(model, "mean lambda over the last 20% / (2/eta)", f"{c.sharpness[int(0.8 * n) :].mean() / edge:.4f}")
    add(model, "lambda_0 -> first step at the edge", f"{c.sharpness[0]:.2f} -> step {cross}")
    y = c.y[cross:]
    add(model, "y after the crossing: min / mean / max", f"{y.min():+.3f} / {y.mean():+.3f} / {y.max():+.3f}")

    f = runs["fixed_y"]
    model = "eq4 fixed y (eq. 6)"
    add(model, "y (all steps)", f"{f.y.min():+.4f} .. {f.y.max():+.4f}")
    add(model, "lambda_T / lambda_0", f"{f.sharpness[-1] / f.sharpness[0]:.2f}")
    add(model, "eta_T / eta_0", f"{f.eta[-1] / f.eta[0]:.4f}")

    for key, model in (("cdat_2", "CDAT model sigma=2"), ("cdat_1.9", "CDAT model sigma=1.9")):
        r = runs[key]
        half = len(r.y) // 2
        lam = r.sharpness
        add(model, "mean |y| over the second half", f"{np.abs(r.y[half:]).mean():.2e}")
        y = r.y[half:]
        add(model, "y over the second half: min .. max", f"{y.min():+.2e} .. {y.max():+.2e}")
        add(model, "lambda: start / mid / end", f"{lam[0]:.2f} / {lam[half]:.2f} / {lam[-1]:.2f}")
        add(model, "p at the end (a/b = 0.5)", f"{r.p[-1]:.3e}")

    for key, model in (("ngd", "normalized GD"), ("sqrt", "GD on sqrt(L)")):
        r = runs[key]
        e2 = theory.two_step_edge(r.lr_times_sharpness)[10:]
        q = np.quantile(e2, [0.0, 0.05, 0.5, 0.95, 1.0])
        add(model, "two-step edge from step 10: min/5%/50%/95%/max", " / ".join(f"{v:.3f}" for v in q))
        lim = r.limit_sharpness
        add(model, "limit sharpness start -> end (minimum 2)", f"{lim[0]:.3f} -> {lim[-1]:.4f}")
        add(model, "loss: start / max from step 10", f"{r.loss[0]:.3f} / {r.loss[10:].max():.2e}")

    m = runs["minimalist"]
    model = "minimalist (Liu et al.)"
    n = len(m.sharpness) - 1
    cross = _first_crossing(m.sharpness, 40.0)
    after = m.sharpness[cross:]
    add(model, "sharpness start -> first step >= 2/eta", f"{m.sharpness[0]:.2f} -> step {cross}")
    add(model, "sharpness after the crossing: median / max", f"{np.median(after):.2f} / {after.max():.2f}")
    add(model, "max sharpness over the last 5% (bound 42)", f"{m.sharpness[int(0.95 * n) :].max():.3f}")
    add(model, "final sharpness", f"{m.sharpness[-1]:.3f}")
    add(model, "loss: start -> end", f"{m.loss[0]:.2e} -> {m.loss[-1]:.2e}")
    slope = _log_loss_slope(m.loss, cross, 15_000)
    add(model, "log-loss slope, crossing to step 15000 (paper: -4.0e-4)", f"{slope:.3e}")
    return rows


def _log_loss_slope(loss: np.ndarray, start: int, stop: int, window: int = 500) -> float:
    """Slope per step of log(median loss over windows of `window` steps), from `start` to `stop`."""
    starts = np.arange(start, min(stop, len(loss)) - window + 1, window)
    medians = np.array([np.median(loss[i : i + window]) for i in starts])
    return float(np.polyfit(starts + window / 2, np.log(medians), 1)[0])


def _draw(runs: dict[str, Any], out: Path, dpi: int, plt) -> list[Path]:
    paths = []

    def save(fig, name, left=0.07):
        path = out / name
        # fixed margins: tight_layout would measure every tick label and double the run time
        fig.subplots_adjust(left=left, right=0.98, bottom=0.14, top=0.82, wspace=0.28)
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        paths.append(path)

    blue, orange = "tab:blue", "tab:orange"
    c, f = runs["constant"], runs["fixed_y"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for r, color, label in ((c, blue, "constant eta = 1"), (f, orange, "eta = 1.9 / lambda (eq. 6)")):
        t = np.arange(len(r.eta))
        axes[0].plot(t, r.eta, color=color, label=label)
        axes[1].plot(t, r.sharpness, color=color, label=label)
        axes[2].plot(t, r.y, color=color, label=label)
    axes[1].axhline(2.0, color=blue, ls=":", lw=1, label="2 / eta (constant)")
    axes[2].axhline(0.0, color="k", ls=":", lw=1)
    axes[0].set(yscale="log", title="learning rate", xlabel="step")
    axes[1].set(yscale="log", title="sharpness lambda", xlabel="step")
    axes[2].set(title="y = eta lambda - 2", xlabel="step")
    axes[1].legend(fontsize=8)
    fig.suptitle(
        "Eq. 4: constant lr (a=3e-2, b=3e-1) vs fixed-y tuner (a=1, b=0.5), x_0=0.3, lambda_0=1.9"
        "  [CDAT paper Fig. 4]",
        fontsize=10,
    )
    save(fig, FIGURES[0])

    s2, s19 = runs["cdat_2"], runs["cdat_1.9"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for r, color, label in ((s19, blue, "sigma = 1.9"), (s2, orange, "sigma = 2")):
        t = np.arange(len(r.eta))
        axes[0].plot(t, r.eta, color=color, label=label)
        axes[1].plot(t, r.sharpness, color=color, label=label)
        axes[2].plot(t, r.y, color=color, label=label)
    axes[2].axhline(0.0, color="k", ls=":", lw=1)
    axes[0].set(title="learning rate", xlabel="step")
    axes[1].set(title="sharpness lambda", xlabel="step")
    axes[2].set(title="y = eta lambda - 2 (y_0 = -1.1 off scale)", xlabel="step", ylim=(-0.03, 0.01))
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "Eq. 9/10: CDAT model (a=5e-2, b=1e-1, nu=0.1, lambda_0=18, eta_0=0.05, p_0=g_0=4)"
        "  [CDAT paper Fig. 9]",
        fontsize=10,
    )
    save(fig, FIGURES[1])

    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for r, color, label in ((c, blue, "constant eta = 1"), (f, orange, "eta = 1.9 / lambda (eq. 6)")):
        ax.plot(np.arange(len(r.p)), r.p, color=color, label=label)
    ax.axhline(3e-2 / 3e-1, color=blue, ls=":", lw=1, label="a / b (constant lr)")
    ax.set(yscale="log", title="p = x^2, eq. 4  [CDAT paper Fig. 10]", xlabel="step")
    ax.legend(fontsize=8)
    save(fig, FIGURES[2], left=0.14)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r, color, label in ((s19, blue, "sigma = 1.9"), (s2, orange, "sigma = 2")):
        t = np.arange(len(r.p))
        axes[0].plot(t, r.p, color=color, label=label)
        with np.errstate(divide="ignore", invalid="ignore"):
            axes[1].plot(t, r.p / r.g, color=color, label=label)
    axes[0].axhline(5e-2 / 1e-1, color=orange, ls=":", lw=1, label="a / b")
    axes[0].set(yscale="log", title="p (top direction)", xlabel="step")
    axes[1].set(yscale="log", title="p / g (top vs orthogonal)", xlabel="step")
    axes[0].legend(fontsize=8)
    fig.suptitle("CDAT model: projections  [CDAT paper Fig. 11]", fontsize=10)
    save(fig, FIGURES[3])

    ngd, sq = runs["ngd"], runs["sqrt"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for r, color, label in ((ngd, blue, "normalized GD"), (sq, orange, "GD on sqrt(L)")):
        t = np.arange(len(r.loss))
        axes[0].plot(t, r.loss, color=color, lw=0.6, label=label)
        axes[1].plot(t, r.sharpness, color=color, lw=0.4, alpha=0.35)
        axes[1].plot(t, r.limit_sharpness, color=color, label=f"{label}: at Phi(w)")
        axes[2].plot(t[:-1], theory.two_step_edge(r.lr_times_sharpness), color=color, lw=0.6, label=label)
    axes[1].axhline(2.0, color="k", ls=":", lw=1, label="min over the manifold")
    axes[2].axhline(2.0, color="k", ls=":", lw=1)
    axes[0].set(yscale="log", title="loss 1/2 (uv - 1)^2", xlabel="step")
    axes[1].set(title="sharpness (faint: at w_t)", xlabel="step")
    axes[2].set(title="two-step edge of eta_t lambda_t", xlabel="step", ylim=(1.5, 2.5))
    axes[1].legend(fontsize=8)
    fig.suptitle("Arora, Li, Panigrahi: eta = 0.05 from w_0 = (3, 0.1)", fontsize=10)
    save(fig, FIGURES[4])

    m = runs["minimalist"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    t = np.arange(len(m.loss))
    axes[0].plot(t, m.loss, lw=0.6)
    axes[0].set(yscale="log", title="population loss", xlabel="step")
    axes[1].plot(t, m.sharpness, lw=0.8)
    axes[1].axhline(40.0, color="k", ls=":", lw=1, label="2 / eta")
    axes[1].axhline(42.0, color="tab:red", ls="--", lw=1, label="(2 + 0.1) / eta")
    axes[1].set(title="sharpness", xlabel="step")
    axes[1].legend(fontsize=8)
    axes[2].plot(t, np.abs(m.w[:, 0]), lw=0.6, label="|w_1| (irrelevant)")
    axes[2].plot(t, np.abs(m.w[:, 1]), lw=0.8, label="|w_2| (relevant)")
    axes[2].plot(t, np.abs(m.v), lw=0.8, label="|v|")
    axes[2].set(yscale="log", title="weights", xlabel="step")
    axes[2].legend(fontsize=8)
    fig.suptitle(
        "Liu, Zhang, Du, Zhao: f(x) = v w.x, var(x_1) = 100 (irrelevant), var(x_2) = 0.01"
        " (relevant, y = 0.4 x_2), corr 0.1, eta = 1/20",
        fontsize=10,
    )
    save(fig, FIGURES[5])
    return paths


def main(argv: list[str] | None = None) -> int:
    """Draw every figure into `--out` and print the numbers the tests check.

    Args:
        argv: the command-line arguments (default: `sys.argv[1:]`).

    Returns:
        The exit code (0).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("theory_figures.py needs matplotlib: pip install 'eos-core[plot]'", file=sys.stderr)
        return 1

    runs = _run_models()
    args.out.mkdir(parents=True, exist_ok=True)
    paths = _draw(runs, args.out, args.dpi, plt)

    rows = _summary(runs)
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    print(f"{'model':<{width[0]}}  {'quantity':<{width[1]}}  value")
    for model, quantity, value in rows:
        print(f"{model:<{width[0]}}  {quantity:<{width[1]}}  {value}")
    print()
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
