"""Shared body of `reproduce_mlp.py` and `reproduce_cnn.py`: claims B1-B3, full batch.

The claims (Cohen et al. 2021; CDAT paper, Fig. 1, 3, 5, 6) and their thresholds are those of
`eos_core.demo.claims`. Runs, through the demo's backends (`eos_core.demo`, same networks and initial weights on torch
and JAX): GD at every constant lr of a 2^i grid, the Armijo line search, CDAT(scale=1),
CDAT(scale=2) and CDAT(scale=2.0625), tracking lambda_max by warm-started power iteration; prints
the summary table, then a PASS/FAIL verdict per claim with the figures behind it
(`eos_core.demo.claims` states the thresholds), and writes into `--out`:

* `edge_of_stability.png`: best constant lr, Armijo, CDAT 1 / 2 / 2.0625 (loss, lr, sharpness with 2/lr,
  lr * sharpness with the line at 2);
* `constant_lrs.png`: every grid lr (B1: each sharpness settles at its own 2/lr);
* `trajectories.csv`, `summary.csv`, `verdicts.txt`.

`--from-csv PATH` re-evaluates the verdicts of a saved `trajectories.csv` without training.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eos_core.demo.claims import check_all
from eos_core.demo.methods import parse_grid, parse_methods
from eos_core.demo.models import ModelSpec
from eos_core.demo.results import format_table, read_trajectories_csv
from eos_core.demo.runner import DemoConfig, run_demo

#: The default `--methods`: GD over the grid, Armijo, CDAT(scale=1), CDAT(scale=2) and CDAT(scale=2.0625).
METHODS = "gd,armijo,cdat1,cdat2,cdat=2.0625"


@dataclass(frozen=True)
class Defaults:
    """One script's defaults (`reproduce_mlp.py` or `reproduce_cnn.py`); the command line overrides all but `arch`.

    Attributes:
        arch: `"mlp"` or `"cnn"` (`eos_core.demo.models.ModelSpec.arch`).
        width: hidden units of the MLP, or channels of the CNN (`--width`).
        steps: full-batch steps per method (`--steps`).
        samples: keep the first that many digits; None or 0 for all 1797 (`--samples`).
        grid: the constant learning rates, comma-separated, e.g. `"0.125,0.25,0.5,1,2"` (`--lr-grid`).
        sharpness_every: lambda_max is measured every this many steps (`--sharpness-every`).
        out: folder for the figures, the CSV files and `verdicts.txt` (`--out`).
    """

    arch: str
    width: int
    steps: int
    samples: int | None
    grid: str
    sharpness_every: int
    out: str


def parse_args(defaults: Defaults, argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    """Parse the command line of a reproduce script.

    An invalid `--lr-grid` or `--methods`, or `--steps`, `--sharpness-every` or `--width` < 1, or `--samples` < 0,
    prints the usage and the error and exits with status 2 (`argparse`'s `parser.error`).

    Args:
        defaults: the script's defaults.
        argv: the arguments, without the program name (None: `sys.argv[1:]`).
        description: the help text shown above the options (the script's docstring).

    Returns:
        The options, plus `grid` (the parsed `--lr-grid`, a sorted tuple of floats) and `method_list` (the parsed
        `--methods`, a list of `eos_core.demo.methods.Method`).

    Raises:
        SystemExit: any invalid option (status 2, from `argparse`), including the `ValueError` of the checks above,
            which is caught here and passed to `parser.error`; `--help` exits with status 0.
    """  # noqa: DOC501 (the ValueError raised in the body is caught there and becomes the SystemExit above)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("torch", "jax"), default="torch")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--samples", type=int, default=defaults.samples,
                        help="first N digits (default: %(default)s; 0 = all 1797)")
    parser.add_argument("--lr-grid", default=defaults.grid)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--sharpness-every", type=int, default=defaults.sharpness_every)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--out", type=Path, default=Path(defaults.out))
    parser.add_argument("--from-csv", type=Path, default=None, help="evaluate a saved trajectories.csv, no training")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a claim fails")
    args = parser.parse_args(argv)
    try:
        args.grid = parse_grid(args.lr_grid)
        args.method_list = parse_methods(args.methods, args.grid)
        if args.steps < 1 or args.sharpness_every < 1 or args.width < 1 or (args.samples or 0) < 0:
            raise ValueError("--steps, --sharpness-every and --width must be >= 1, --samples >= 0")
    except ValueError as error:
        parser.error(str(error))
    return args


def main(defaults: Defaults, argv: Sequence[str] | None = None, *, description: str = "") -> int:
    """Train (or read `--from-csv`), print the table and the verdicts of claims B1-B3, write the files.

    Without `--from-csv`: runs `eos_core.demo.runner.run_demo` on the digits dataset with the squared-error loss
    (which prints the table and writes `edge_of_stability.png`, `trajectories.csv` and `summary.csv` into `--out`),
    draws `constant_lrs.png` from the GD runs that were not stopped, and writes `verdicts.txt`. With `--from-csv`:
    reads the runs back, prints their table, and writes nothing.

    Args:
        defaults: the script's defaults.
        argv: the arguments, without the program name (None: `sys.argv[1:]`).
        description: the help text (the script's docstring).

    Returns:
        The exit status: 1 when `--strict` is given and a claim fails, else 0.
    """
    args = parse_args(defaults, argv, description)
    if args.from_csv is not None:
        runs = read_trajectories_csv(args.from_csv)
        print(format_table(runs))
    else:
        config = DemoConfig(backend=args.backend, dataset="digits",
                            model=ModelSpec(arch=defaults.arch, width=args.width, loss="mse"), steps=args.steps,
                            seed=args.seed, sharpness_every=args.sharpness_every, methods=args.method_list,
                            grid=args.grid, num_samples=args.samples or None, dtype=args.dtype, out=args.out,
                            progress=not args.no_progress)
        result = run_demo(config)
        runs = result.runs
        grid_runs = {r.label: r.as_history() for r in runs if r.method.kind == "gd" and not r.stopped}
        if grid_runs:
            from eos_core.plotting import plot_edge_of_stability

            path = args.out / "constant_lrs.png"
            plot_edge_of_stability(grid_runs, path=path, title="B1: GD at each constant lr of the grid "
                                   "(dashed: 2/lr)")
            print(f"  constant lrs {path}")
    verdicts = check_all(runs)
    text = "\n".join(v.report() for v in verdicts)
    print("\n" + text)
    if args.from_csv is None:
        (args.out / "verdicts.txt").write_text(text + "\n")
    return 1 if args.strict and not all(v.passed for v in verdicts) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run reproduce_mlp.py or reproduce_cnn.py")
