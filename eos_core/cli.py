"""The `eos-core` command line (also `python -m eos_core`).

* `eos-core demo`: full-batch training on scikit-learn's digits with GD at the best constant lr of a 2^i grid, the
  Armijo line search, CDAT(scale=1) and CDAT(scale=2); prints a summary table and writes the edge-of-stability figure
  and the trajectories ([`eos_core.demo`][]).
* `eos-core plot HISTORY...`: the same figure from logged histories: a CSV such as Lightning's `metrics.csv` or the
  demo's `trajectories.csv`, or a TensorBoard log directory (`runs/`, `lightning_logs/`).

Frameworks are imported only by the command that needs them. A bad argument or a missing package
is a usage error (exit code 2) with a one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eos_core import __version__

DEMO_DESCRIPTION = """\
Train a small network full batch on scikit-learn's digits and compare, through eos_core's tuners:
gradient descent at the best constant learning rate of a 2^i grid, the Armijo line search,
CDAT(scale=1) (the greedy rule) and CDAT(scale=2) (the on-edge rule). Prints a summary table and
writes the 4-panel edge-of-stability figure (PNG) and the trajectories (CSV) into --out.
"""

PLOT_DESCRIPTION = """\
Draw loss, lr, sharpness (with 2/lr) and lr*sharpness (with the line at 2) from logged histories:
Lightning's CSVLogger metrics.csv, the demo's trajectories.csv, any CSV with the columns loss, lr,
sharpness, lr_sharpness (optionally prefixed eos/), or a TensorBoard log directory such as Lightning's
lightning_logs/ or the Hugging Face Trainer's runs/ (one run per folder that holds event files; reading
them needs: pip install 'eos-core[tensorboard]').
"""

DEMO_EPILOG = """\
examples:
  eos-core demo                          # about a minute on a laptop CPU
  eos-core demo --backend jax            # the same through the JAX/Optax adapter
  eos-core demo --methods cdat2,cdat=2.0625 --steps 500
  eos-core demo --quick --out /tmp/eos   # a few seconds: a smoke test
"""


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`, else a usage error saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a parser that raises ValueError with a message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).split(": ", 1)[-1]) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _grid(text: str) -> tuple[float, ...]:
    from eos_core.demo.methods import parse_grid

    return _checked(parse_grid)(text)


def _methods(text: str) -> str:
    from eos_core.demo.methods import parse_methods

    _checked(parse_methods)(text)  # validated now, expanded with the grid later
    return text


def build_parser() -> argparse.ArgumentParser:
    """The `eos-core` argument parser, with its `demo` and `plot` commands.

    Returns:
        The parser; each command's namespace carries its `handler` and `subparser`.
    """
    from eos_core.demo.methods import DEFAULT_GRID, DEFAULT_METHODS

    parser = argparse.ArgumentParser(
        prog="eos-core",
        description="eos_core: curvature-aware learning-rate tuners and edge-of-stability diagnostics.",
    )
    parser.add_argument("--version", action="version", version=f"eos-core {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser("demo", help="train on digits: constant lr vs Armijo vs CDAT, with the EoS figure",
                               description=DEMO_DESCRIPTION, epilog=DEMO_EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--backend", choices=("torch", "jax"), default="torch",
                      help="framework adapter to train with (default: torch)")
    demo.add_argument("--dataset", choices=("digits", "mnist1d"), default="digits",
                      help="digits ships with scikit-learn; mnist1d needs `pip install mnist1d` (default: digits)")
    demo.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                      help="MLP with two tanh hidden layers, or a small CNN on the 8x8 digits (default: mlp)")
    demo.add_argument("--width", type=_positive_int, default=64,
                      help="hidden units of the MLP / channels of the CNN (default: 64)")
    demo.add_argument("--loss", choices=("auto", "mse", "ce"), default="auto",
                      help="squared error or cross-entropy; auto = mse on digits, ce on mnist1d (default: auto)")
    demo.add_argument("--steps", type=_positive_int, default=None,
                      help="full-batch steps per method (default: 600; 40 with --quick)")
    demo.add_argument("--quick", action="store_true",
                      help="a tiny run for smoke tests: 40 steps on 400 examples (unless --steps / --samples)")
    demo.add_argument("--samples", type=_positive_int, default=None,
                      help="train on the first N examples only (default: all)")
    demo.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the initial weights (default: 0)")
    demo.add_argument("--sharpness-every", type=_positive_int, default=5, metavar="K",
                      help="track the sharpness every K steps by warm-started power iteration (default: 5)")
    demo.add_argument("--methods", type=_methods, default=DEFAULT_METHODS,
                      help=f"comma-separated from gd, armijo, cdat1, cdat2, cdat=SCALE (default: {DEFAULT_METHODS})")
    demo.add_argument("--lr-grid", type=_grid, default=DEFAULT_GRID, metavar="LRS",
                      help="constant learning rates tried by gd (default: "
                           f"{','.join(f'{v:g}' for v in DEFAULT_GRID)})")
    demo.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="(default: float32)")
    demo.add_argument("--out", type=Path, default=Path("eos-demo"),
                      help="folder for the figure and the CSV files (default: ./eos-demo)")
    demo.add_argument("--threads", type=_non_negative_int, default=1,
                      help="torch intra-op threads (torch backend); the networks are tiny, so 1 is fastest and "
                           "does not contend with other work; 0 = torch's default (default: 1)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    demo.set_defaults(handler=_demo, subparser=demo)

    plot = commands.add_parser("plot", help="draw the edge-of-stability figure from logs (CSV, TensorBoard)",
                               description=PLOT_DESCRIPTION,
                               epilog="examples:\n  eos-core plot eos-demo/trajectories.csv\n"
                                      "  eos-core plot runs/ --out eos.png\n"
                                      "  eos-core plot logs/lightning_logs/version_0/metrics.csv --title mine\n",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    plot.add_argument("history", type=Path, nargs="+",
                      help="CSV files or TensorBoard log directories (several: one run, or one group of runs, each)")
    plot.add_argument("--out", type=Path, default=Path("edge_of_stability.png"),
                      help="image to write (default: edge_of_stability.png)")
    plot.add_argument("--title", default=None, help="figure title")
    plot.set_defaults(handler=_plot, subparser=plot)
    return parser


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from eos_core.demo.data import MissingDependency
    from eos_core.demo.methods import parse_methods
    from eos_core.demo.models import ModelSpec
    from eos_core.demo.runner import DemoConfig, run_demo

    loss = args.loss if args.loss != "auto" else ("ce" if args.dataset == "mnist1d" else "mse")
    steps = args.steps if args.steps is not None else (40 if args.quick else 600)
    samples = args.samples if args.samples is not None else (400 if args.quick else None)
    if args.model == "cnn" and args.dataset != "digits":
        parser.error("--model cnn needs the 8x8 images of --dataset digits")
    try:
        config = DemoConfig(backend=args.backend, dataset=args.dataset,
                            model=ModelSpec(arch=args.model, width=args.width, loss=loss), steps=steps,
                            seed=args.seed, sharpness_every=args.sharpness_every,
                            methods=parse_methods(args.methods, args.lr_grid), grid=args.lr_grid,
                            num_samples=samples, dtype=args.dtype, out=args.out, progress=not args.no_progress,
                            threads=args.threads or None)
        if config.out.exists() and not config.out.is_dir():
            parser.error(f"--out {config.out}: exists and is not a folder")
        run_demo(config)
    except MissingDependency as error:
        parser.error(str(error))
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:
        parser.error(f"--out {args.out}: {error.strerror or error}")
    return 0


def _plot(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from eos_core.plotting import plot_edge_of_stability

    histories: Any = args.history[0] if len(args.history) == 1 else {p.stem: p for p in args.history}
    try:
        plot_edge_of_stability(histories, path=args.out, title=args.title)
    except ImportError as error:
        parser.error(str(error))
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:
        parser.error(f"--out {args.out}: {error.strerror or error}")
    print(f"Wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `eos-core` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args, args.subparser))
    except KeyboardInterrupt:
        print("eos-core: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
