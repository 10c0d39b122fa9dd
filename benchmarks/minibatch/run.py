"""Command line of the mini-batch suite.

    python -m benchmarks.minibatch.run --task chargpt --seeds 0 1 --out benchmarks/results/minibatch
    python -m benchmarks.minibatch.run --task cnn mlp --seeds 0 1 --methods 'adamw-cos-*' 'proto-lag-*'
    python -m benchmarks.minibatch.run --task all --quick --methods all --out /tmp/mb   # smoke test
    python -m benchmarks.minibatch.run --task chargpt --report-only --out benchmarks/results/minibatch

`--methods` takes names, shell globs, `@suite` (default: baselines, peers, the library's laws and the
recommended prototype), `@research` (every prototype), a family (`@cosine`, `@constant`, `@peer`,
`@law`, `@proto`) or `all`; `--list` prints them. Each run writes `OUT/<task>/<method>/seed<s>.json`;
after the runs every task's `table.md`, `summary.json` and `<task>.png` are rewritten from all the JSON
files in its folder (so separate invocations add up), and `OUT/summary.md` lists every method run on all the
tasks with its mean ratio per task, worst task first. Run it from the repository root, one process at a time
(`OMP_NUM_THREADS=1`); timings are ratios to plain AdamW measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.minibatch import methods as M
from benchmarks.minibatch.report import cross_task, write_report
from benchmarks.minibatch.runner import result_path, run_method
from benchmarks.minibatch.tasks import TASKS, get_task


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the suite's command line (the module docstring is its help text).

    Args:
        argv: the arguments, without the program name (None: `sys.argv[1:]`).

    Returns:
        The options: `task` (task names or `all`), `seeds`, `quick`, `methods` (None: `@suite`), `out`, `steps`,
        `calib_steps`, `threads`, `skip_existing`, `report_only`, `plot` and `list`.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", default=["chargpt"], choices=[*TASKS, "all"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--quick", action="store_true", help="a few dozen steps per method (smoke test)")
    parser.add_argument("--methods", nargs="+", default=None, help="names, globs, @tag or 'all' (default @suite)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/minibatch"))
    parser.add_argument("--steps", type=int, default=None, help="override the task's number of steps")
    parser.add_argument("--calib-steps", type=int, default=None, help="plain AdamW steps timed around each run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--skip-existing", action="store_true", help="keep runs whose JSON already says ok")
    parser.add_argument("--report-only", action="store_true", help="only rebuild tables and figures")
    parser.add_argument("--plot", nargs="*", default=None, help="methods to add to the figure")
    parser.add_argument("--list", action="store_true", help="list the methods and exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected methods on the selected tasks and seeds, then rebuild the reports.

    For each task and seed, each method is trained by `benchmarks.minibatch.runner.run_method` (which writes its
    JSON) and a line with its status, final validation and train loss and time ratio is printed; with
    `--skip-existing`, a run whose JSON already says `ok` with the same `--quick` and `--steps` is kept. Each task's
    table, summary and figure are then rewritten (`benchmarks.minibatch.report.write_report`), and with several
    tasks or `--report-only` the cross-task `summary.md` too. `--list` only prints the selected methods (name,
    family, tags).

    Args:
        argv: the arguments, without the program name (None: `sys.argv[1:]`).

    Returns:
        The exit status: 1 when a run ended with status `error` (an exception inside the method), else 0 (skipped
        and diverged runs do not count).

    Raises:
        ValueError: a `--methods` pattern matches no method (from `benchmarks.minibatch.methods.select`).
    """
    args = parse_args(argv)
    specs = M.select(args.methods)
    if args.list:
        for spec in specs:
            print(f"{spec.name:40s} {spec.family:9s} {','.join(sorted(spec.tags))}")
        return 0
    tasks = list(TASKS) if "all" in args.task else list(dict.fromkeys(args.task))
    torch.set_num_threads(args.threads)
    failures = 0
    for name in tasks:
        task = get_task(name, quick=args.quick)
        if not args.report_only:
            for seed in args.seeds:
                for spec in specs:
                    path = result_path(args.out, name, spec.name, seed)
                    if args.skip_existing and path.exists():
                        old = json.loads(path.read_text())
                        if old.get("status") == "ok" and old.get("quick") == args.quick and \
                                (args.steps is None or old.get("steps") == args.steps):
                            continue
                    start = time.perf_counter()
                    r = run_method(task, spec, seed, args.out, calib_steps=args.calib_steps, steps=args.steps)
                    failures += r["status"] == "error"
                    if r["status"] in ("ok", "diverged"):
                        text = (f"val {r['final_val_loss']:.4f} train {r['final_train_loss']:.4f} "
                                f"time x{r['time_ratio']:.2f}")
                    else:
                        text = (r.get("reason") or (r.get("error") or "").strip().splitlines()[-1:] or [""])[0]
                    print(f"[{name} s{seed}] {spec.name:36s} {r['status']:8s} {text} "
                          f"({time.perf_counter() - start:.0f}s)", flush=True)
        summary = write_report(args.out, name, args.plot)
        print(f"[{name}] report: {args.out / name / 'table.md'} ({len(summary['rows'])} methods)", flush=True)
    if len(tasks) > 1 or args.report_only:
        cross_task(args.out, [t for t in TASKS if (args.out / t).is_dir()])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
