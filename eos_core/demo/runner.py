"""Run the demo: every method on one backend, then the summary table, the figure and the CSV files.

The backend module ([`.torch_backend`][eos_core.demo.torch_backend] or [`.jax_backend`][eos_core.demo.jax_backend]) is
imported here, only when asked for, after checking that its packages are installed (a missing one raises
[`MissingDependency`][eos_core.demo.runner.MissingDependency] naming the extra to install).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TextIO

import numpy as np

from eos_core.demo.claims import lr_fall
from eos_core.demo.data import Dataset, MissingDependency, load_dataset
from eos_core.demo.methods import DEFAULT_GRID, DEFAULT_METHODS, Method, parse_methods
from eos_core.demo.models import ModelSpec, init_params, num_params
from eos_core.demo.progress import ProgressBar
from eos_core.demo.results import (
    Trajectory,
    best_constant,
    format_table,
    write_summary_csv,
    write_trajectories_csv,
)

#: The demo's backends: `--backend torch` (the default) or `--backend jax` (through the JAX/Optax adapter).
BACKENDS = ("torch", "jax")
#: File name of the figure in the output folder.
FIGURE_NAME = "edge_of_stability.png"
#: File name of the per-step CSV ([`write_trajectories_csv`][eos_core.demo.results.write_trajectories_csv]).
TRAJECTORIES_NAME = "trajectories.csv"
#: File name of the per-run CSV ([`write_summary_csv`][eos_core.demo.results.write_summary_csv]).
SUMMARY_NAME = "summary.csv"

#: (import name, what to install) for each backend; the demo's figure and dataset need the rest of `[demo]`.
_REQUIREMENTS = {
    "torch": (("torch", "'eos-core[demo]'"), ("sklearn", "'eos-core[demo]'"), ("matplotlib", "'eos-core[demo]'")),
    "jax": (("jax", "'eos-core[jax]'"), ("optax", "'eos-core[jax]'"), ("sklearn", "'eos-core[demo]'"),
            ("matplotlib", "'eos-core[demo]'")),
}


@dataclass
class DemoConfig:
    """What `eos-core demo` runs (the CLI's options).

    Attributes:
        backend: one of [`BACKENDS`][eos_core.demo.runner.BACKENDS].
        dataset: `"digits"` or `"mnist1d"` ([`load_dataset`][eos_core.demo.data.load_dataset]).
        model: the architecture and loss.
        steps: full-batch training steps per method.
        seed: seed of the initial weights (the same for every method).
        sharpness_every: lambda_max is measured every this many steps (NaN in between).
        methods: the runs, in order ([`parse_methods`][eos_core.demo.methods.parse_methods]); the default is
            [`DEFAULT_METHODS`][eos_core.demo.methods.DEFAULT_METHODS] over the default grid.
        grid: the constant learning rates (kept for reference; `methods` already holds the GD runs).
        num_samples: keep the first that many examples (None: the whole dataset).
        dtype: `"float32"` or `"float64"`.
        out: folder for the figure and the CSV files (created when missing).
        progress: draw a progress bar per run on the progress stream.
        figure: draw the figure (needs matplotlib).
        threads: torch intra-op threads during training (torch backend only; None: torch's default).
    """

    backend: str = "torch"
    dataset: str = "digits"
    model: ModelSpec = field(default_factory=ModelSpec)
    steps: int = 600
    seed: int = 0
    sharpness_every: int = 5
    methods: list[Method] = field(default_factory=lambda: parse_methods(DEFAULT_METHODS))
    grid: tuple[float, ...] = DEFAULT_GRID
    num_samples: int | None = None
    dtype: str = "float32"
    out: Path = Path("eos-demo")
    progress: bool = True
    figure: bool = True
    threads: int | None = 1  #: torch intra-op threads (torch backend; None: torch's default)


@dataclass
class DemoResult:
    """What [`run_demo`][eos_core.demo.runner.run_demo] returns.

    Attributes:
        runs: one trajectory per method, in the order of `DemoConfig.methods`.
        best: the best constant lr ([`best_constant`][eos_core.demo.results.best_constant]); None when every GD run
            diverged or none was run.
        files: the files written, by name: `"figure"` (when drawn, listed first), `"trajectories"` and `"summary"`.
        table: the summary table as printed ([`format_table`][eos_core.demo.results.format_table]).
        wall_s: total training time of all runs in seconds (data loading, table and files excluded).
    """

    runs: list[Trajectory]
    best: Trajectory | None
    files: dict[str, Path]
    table: str
    wall_s: float


def check_requirements(backend: str, dataset: str = "digits") -> None:
    """Check that the packages a backend and dataset need are installed, without importing them.

    Args:
        backend: one of [`BACKENDS`][eos_core.demo.runner.BACKENDS].
        dataset: the dataset to be loaded; `"digits"` needs scikit-learn, `"mnist1d"` needs the `mnist1d` package.

    Raises:
        ValueError: `backend` is not one of [`BACKENDS`][eos_core.demo.runner.BACKENDS].
        MissingDependency: a needed package is missing; the message names the `pip install` that provides it
            (`'eos-core[demo]'` for torch, scikit-learn and matplotlib, `'eos-core[jax]'` for jax and optax,
            `mnist1d` for the mnist1d dataset).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if dataset == "mnist1d" and importlib.util.find_spec("mnist1d") is None:
        raise MissingDependency("--dataset mnist1d needs the mnist1d package, which is not installed. "
                                "Install it with: pip install mnist1d (or use the default --dataset digits)")
    for module, install in _REQUIREMENTS[backend]:
        if module == "sklearn" and dataset != "digits":
            continue
        if importlib.util.find_spec(module) is None:
            name = {"sklearn": "scikit-learn"}.get(module, module)
            raise MissingDependency(f"the {backend} backend of the demo needs {name}, which is not installed. "
                                    f"Install it with: pip install {install}")


def load_backend(backend: str) -> ModuleType:
    """Import the demo's backend module, after checking its requirements.

    Args:
        backend: one of [`BACKENDS`][eos_core.demo.runner.BACKENDS].

    Returns:
        The module `eos_core.demo.<backend>_backend` (it provides `train`).

    Raises:
        ValueError: `backend` is not one of [`BACKENDS`][eos_core.demo.runner.BACKENDS].
        MissingDependency: [`check_requirements`][eos_core.demo.runner.check_requirements] (with the digits
            dataset) finds a package missing, or the module fails to import; the message names the extra to
            install.
    """
    check_requirements(backend)
    try:
        return importlib.import_module(f"eos_core.demo.{backend}_backend")
    except ImportError as error:
        install = "'eos-core[jax]'" if backend == "jax" else "'eos-core[demo]'"
        raise MissingDependency(f"the {backend} backend of the demo could not be imported ({error}). "
                                f"Install it with: pip install {install}") from error


def describe(config: DemoConfig, data: Dataset) -> str:
    """Describe the demo's setting in one line, for the printed header and the figure's title.

    Args:
        config: the demo's options.
        data: the loaded dataset.

    Returns:
        The dataset and its size, the architecture and its parameter count, the loss, the number of steps, the
        backend and the dtype, e.g. `"digits (1797 examples, 64 features), MLP 64-64-64-10 tanh (8970 parameters),
        squared error, full batch, 600 steps, torch backend, float32"` for the defaults.
    """
    spec = config.model
    size = num_params(init_params(spec, data.num_features, data.num_classes, seed=0, image_shape=data.image_shape))
    if spec.arch == "mlp":
        arch = f"MLP {data.num_features}-{spec.width}-{spec.width}-{data.num_classes} tanh"
    else:
        arch = f"CNN 2x(conv 3x3 x{spec.width}, tanh, avg pool 2), dense"
    loss = "squared error" if spec.loss == "mse" else "cross-entropy"
    return (f"{data.name} ({data.x.shape[0]} examples, {data.num_features} features), {arch} ({size} parameters), "
            f"{loss}, full batch, {config.steps} steps, {config.backend} backend, {config.dtype}")


def reading(runs: list[Trajectory], best: Trajectory | None) -> list[str]:
    """What the table says, in words: where each method sits relative to the edge and to the best constant.

    Args:
        runs: the demo's runs.
        best: the best constant lr ([`best_constant`][eos_core.demo.results.best_constant]), or None.

    Returns:
        Bullet lines (`"- ..."`) wrapped at 110 characters: one for the best constant lr (its median lr x sharpness)
        and one per non-diverged tuner run (its final loss relative to the best constant's; for CDAT with a scale of
        at least 2 its lr x sharpness and lr path, otherwise how far its lr fell while the sharpness rose).
        Diverged runs and the other GD runs get no line.
    """
    lines = []
    if best is not None and math.isfinite(best.median_lr_sharpness):
        lines.append(f"- GD at lr={best.method.value:g}: median lr*sharpness {best.median_lr_sharpness:.2f} over the "
                     f"second half; a constant lr trains at the edge of stability (2), sharpness ~ 2/lr.")
    for run in runs:
        if run.method.kind == "gd" or run.diverged:
            continue
        compared = f"final loss {run.final_loss / best.final_loss:.2f}x the best constant's" if best else ""
        if run.method.kind == "cdat" and run.method.value >= 2.0:
            edge = " (on the edge)" if 1.8 <= run.median_lr_sharpness <= 2.3 else ""
            lines.append(f"- {run.label}: {compared}, lr*sharpness {run.median_lr_sharpness:.2f}{edge}, lr "
                         f"{run.lr[0]:.3g} -> peak {float(np.nanmax(run.lr)):.3g} -> {run.final_lr:.3g}.")
        else:
            reference = f" vs {best.median_sharpness:.3g} at the best constant" if best else ""
            lines.append(f"- {run.label}: {compared}; its lr fell {lr_fall(run):.1f}x from its early peak while the "
                         f"sharpness rose to {run.median_sharpness:.3g}{reference} (the tuner shrinks its lr "
                         "instead of letting the edge stabilise the sharpness).")
    return [textwrap.fill(line, 110, subsequent_indent="  ") for line in lines]


def run_demo(config: DemoConfig, *, stream: TextIO | None = None, progress_stream: TextIO | None = None) -> DemoResult:
    """Train every method, print the table, write the figure and CSV files into `config.out`.

    Prints a header ([`describe`][eos_core.demo.runner.describe]), the summary table, the best constant lr and
    [`reading`][eos_core.demo.runner.reading], then the list of files written. The figure shows every tuner run
    and the best constant lr (not the other GD runs).

    Args:
        config: the demo's options.
        stream: where the header, table and reading are printed (default: `sys.stdout`).
        progress_stream: where the progress bars are drawn (default: `sys.stderr`).

    Returns:
        The runs, the best constant lr, the files written, the table and the total training time.

    Raises:
        ValueError: unknown backend, or `config.model.arch == "cnn"` with a dataset that has no image shape
            (mnist1d); also from [`load_dataset`][eos_core.demo.data.load_dataset] for an unknown dataset or
            `num_samples` < 10.
        MissingDependency: a package the backend, the dataset or the figure needs is not installed.
    """
    stream = stream if stream is not None else sys.stdout
    progress_stream = progress_stream if progress_stream is not None else sys.stderr
    check_requirements(config.backend, config.dataset)
    backend = load_backend(config.backend)
    data = load_dataset(config.dataset, num_samples=config.num_samples)
    if config.model.arch == "cnn" and data.image_shape is None:
        raise ValueError(f"--model cnn needs an image dataset (digits); {config.dataset} has no image shape")
    config.out.mkdir(parents=True, exist_ok=True)
    stream.write(f"eos-core demo: {describe(config, data)}\n")
    stream.flush()

    start = time.perf_counter()
    runs: list[Trajectory] = []
    for i, method in enumerate(config.methods):
        bar = ProgressBar(method.label, config.steps, position=f"[{i + 1}/{len(config.methods)}]",
                          stream=progress_stream, enabled=config.progress)
        options = {"threads": config.threads} if config.backend == "torch" else {}
        run = backend.train(method, data, config.model, steps=config.steps, seed=config.seed,
                            sharpness_every=config.sharpness_every, dtype=config.dtype, progress=bar.update, **options)
        outcome = "diverged" if run.diverged else f"final loss {run.final_loss:.4g}"
        bar.close(f"{outcome}  lr {run.final_lr:.3g}")
        runs.append(run)
    wall = time.perf_counter() - start

    best = best_constant(runs)
    table = format_table(runs)
    stream.write("\n" + table + "\n\n")
    gd = [r for r in runs if r.method.kind == "gd"]
    if gd:
        grid = ", ".join(f"{r.method.value:g}" for r in gd)
        if best is None:
            stream.write(f"Every constant learning rate of the grid ({grid}) diverged.\n")
        else:
            stream.write(f"Best constant learning rate of the grid ({grid}): {best.method.value:g}; "
                         f"the figure shows it with the other methods.\n")
    for line in reading(runs, best):
        stream.write(line + "\n")
    files = {
        "trajectories": write_trajectories_csv(runs, config.out / TRAJECTORIES_NAME),
        "summary": write_summary_csv(runs, config.out / SUMMARY_NAME),
    }
    if config.figure:
        from eos_core.plotting import plot_edge_of_stability

        shown = {r.label: r.as_history() for r in runs if r.method.kind != "gd" or r is best}
        if shown:
            files["figure"] = config.out / FIGURE_NAME
            plot_edge_of_stability(shown, path=files["figure"],
                                   title=textwrap.fill(f"eos-core demo: {describe(config, data)}", 120))
    files = dict(sorted(files.items(), key=lambda item: item[0] != "figure"))  # the figure first
    stream.write(f"Total training time {wall:.1f}s. Wrote:\n")
    for name, path in files.items():
        stream.write(f"  {name:<13}{path}\n")
    stream.flush()
    return DemoResult(runs=runs, best=best, files=files, table=table, wall_s=wall)
