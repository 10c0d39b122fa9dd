"""Tracking error of the sharpness monitor against lambda_max computed to convergence (PyTorch, monitoring only).

Each run (``mlp-gd``: full batch, SGD at the edge; ``chargpt-adam`` and ``cnn-adam``: mini-batch Adam; see
``_monitor_common.py``) trains with ``CurvatureTuner(optimizer, None, monitor_budget=0.05)`` and, every
``--every`` steps, computes before the step, at the same weights, the exact lambda_max the monitor estimates
(ARPACK on float64 double-backward products, relative tolerance 1e-6; ``--reference-dtype float32``: 1e-5),
from step ``--skip`` on (the steady state):

* ``sharpness`` against lambda_max(H) on the step's own batch (the Hessian the monitor's product of that step
  would use);
* for Adam also ``preconditioned_sharpness`` against lambda_max(P^{-1/2} H P^{-1/2}) with the optimizer's P as it
  stands before the step (the one the monitor uses);
* on mini-batch runs, with ``--large-every``, both against a fixed larger batch (``--large-batches`` training
  batches together, a proxy for the training loss), since the monitor's products are taken on a different batch
  at each tick and so follow neither batch exactly.

The value compared is what the tuner reports after the step (the latest estimate, ``sharpness_age`` steps
old), so staleness counts as error. Reported: the median, 90th percentile and max of the relative error
``|tracked - exact| / exact`` and the median signed error, the median age, k and the number of products.

    python benchmarks/monitor_tracking.py --runs mlp-gd                 # full batch (~3 min on 1 core)
    python benchmarks/monitor_tracking.py --runs chargpt-adam --every 20 --large-every 100 --large-batches 4 \
        --reference-dtype float32                                      # mini-batch (~20 min on 1 loaded core)
    python benchmarks/monitor_tracking.py --runs mlp-gd --steps 30 --skip 10 --every 5 --quick  # smoke run
    python benchmarks/monitor_tracking.py --runs mlp-gd --restarts 2,3,4 --spacing 100  # cycle lengths (~2 min)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch
from _monitor_common import (
    DEFAULT_LR,
    DEFAULT_STEPS,
    RUNS,
    ExactTop,
    closure_for,
    make_setup,
    monitored,
    restart_step_clock,
)

TARGET = 0.05


def _summary(errors: list[float]) -> dict[str, float]:
    finite = [e for e in errors if math.isfinite(e)]
    if not finite:
        return {"n": 0, "median": math.nan, "p90": math.nan, "max": math.nan}
    return {"n": len(finite), "median": statistics.median(finite), "p90": float(np.percentile(finite, 90)),
            "max": max(finite)}


def track(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run: the monitor's values and the exact ones every ``--every`` steps."""
    lr = args.lr if args.lr is not None else DEFAULT_LR[name]
    steps = args.steps if args.steps is not None else DEFAULT_STEPS[name]
    setup = make_setup(name, lr, seed=args.seed, steps=steps, quick=args.quick)
    tuner = monitored(setup, args.budget)
    dtype = torch.float64 if args.reference_dtype == "float64" else torch.float32
    exact = ExactTop(setup, tol=1e-6 if dtype == torch.float64 else 1e-5, dtype=dtype)
    preconditioned = isinstance(setup.optimizer, torch.optim.Adam)
    large = None
    if not setup.full_batch and args.large_every:
        parts = [setup.batch(steps + i) for i in range(args.large_batches)]  # batches the run never trains on
        large = tuple(torch.cat([p[i] for p in parts]) for i in range(2))
    records: list[dict[str, float]] = []
    start = time.perf_counter()
    reference_seconds = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            batch = setup.batch(step)
            record: dict[str, float] = {}
            if step >= args.skip and (step - args.skip) % args.every == 0:
                before = time.perf_counter()
                record["exact"] = exact(batch, key="h")
                if preconditioned:
                    record["exact_pre"] = exact(batch, preconditioned=True, key="p")
                if large is not None and (step - args.skip) % args.large_every == 0:
                    record["large"] = exact(large, key="large_h")
                    if preconditioned:
                        record["large_pre"] = exact(large, preconditioned=True, key="large_p")
                reference_seconds += time.perf_counter() - before
                restart_step_clock(tuner)
            tuner.step(closure_for(setup, batch))
            d = tuner.diagnostics
            if record:
                record.update(step=step, tracked=d["sharpness"], tracked_pre=d["preconditioned_sharpness"],
                              age=d["sharpness_age"], residual=d["sharpness_residual"], every=d["monitor_every"],
                              loss=d["loss"])
                records.append(record)
            if not math.isfinite(d["loss"]):
                break
    products = [int(t.products) for t in tuner.monitor.trackers if t is not None]
    result: dict[str, Any] = {"run": name, "lr": lr, "steps": steps, "budget": args.budget, "seed": args.seed,
                              "skip": args.skip, "every": args.every, "products": products,
                              "reference_dtype": args.reference_dtype,
                              "monitor_exact": bool(tuner.monitor.exact),
                              "wall_s": time.perf_counter() - start, "reference_s": reference_seconds,
                              "records": records}
    steady = [r for r in records if r["step"] >= args.skip]
    comparisons = [("sharpness", "tracked", "exact")]
    if preconditioned:
        comparisons.append(("preconditioned_sharpness", "tracked_pre", "exact_pre"))
    if large is not None:
        comparisons.append(("sharpness vs large batch", "tracked", "large"))
        if preconditioned:
            comparisons.append(("preconditioned_sharpness vs large batch", "tracked_pre", "large_pre"))
    result["summary"] = {}
    for label, tracked_key, exact_key in comparisons:
        errors = [abs(r[tracked_key] - r[exact_key]) / abs(r[exact_key]) for r in steady
                  if exact_key in r and math.isfinite(r.get(exact_key, math.nan)) and r[exact_key] != 0]
        summary = _summary(errors)
        signed = [(r[tracked_key] - r[exact_key]) / abs(r[exact_key]) for r in steady
                  if exact_key in r and math.isfinite(r.get(exact_key, math.nan)) and r[exact_key] != 0
                  and math.isfinite(r[tracked_key])]
        summary["signed_median"] = statistics.median(signed) if signed else math.nan
        values = [r[exact_key] for r in steady if math.isfinite(r.get(exact_key, math.nan))]
        summary["exact_median"] = statistics.median(values) if values else math.nan
        result["summary"][label] = summary
    ages = [r["age"] for r in steady if math.isfinite(r["age"])]
    every = [r["every"] for r in steady if math.isfinite(r["every"])]
    result["median_age"] = statistics.median(ages) if ages else math.nan
    result["median_k"] = statistics.median(every) if every else math.nan
    return result


def compare_restarts(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Trackers with cycles of each length in ``--restarts``, given the same products every ``--spacing`` steps.

    No tuner: the run trains with its optimizer alone (a monitor measuring only leaves it untouched), and at every
    ``--spacing``-th step each tracker (`eos_core.spectral.tracking`, numpy) applies the same exact float64 Hessian of
    the step's batch at the current weights ``--per-tick`` times (default once), after a cold start as the monitor's
    (`eos_core.monitor.continues_tick`: to its tolerance, then to the end of the cycle). Their latest
    readings are compared with the references of `track` (H only). With ``--fixed-batches N`` on a mini-batch run the
    products and the references are taken on one fixed batch of N training batches the run never trains on (how a
    fixed monitoring batch would be tracked). This isolates the cycle length from the budget, whose spacing moves
    with the machine's load; the trackers make no stale reading's cycle (`eos_core.monitor.is_stale`), which the
    monitor makes and charges to its budget.

    Returns:
        The run's settings, every reference with each tracker's reading, and a summary per cycle length.
    """
    from eos_core import monitor as rules
    from eos_core.spectral.tracking import tracker_init, tracker_step

    lr = args.lr if args.lr is not None else DEFAULT_LR[name]
    steps = args.steps if args.steps is not None else DEFAULT_STEPS[name]
    setup = make_setup(name, lr, seed=args.seed, steps=steps, quick=args.quick)
    dtype = torch.float64 if args.reference_dtype == "float64" else torch.float32
    exact = ExactTop(setup, tol=1e-6 if dtype == torch.float64 else 1e-5, dtype=dtype)
    trackers: dict[int, Any] = dict.fromkeys(args.restarts)
    records: list[dict[str, float]] = []
    fixed = None
    if args.fixed_batches and not setup.full_batch:
        parts = [setup.batch(steps + i) for i in range(args.fixed_batches)]  # batches the run never trains on
        fixed = tuple(torch.cat([p[i] for p in parts]) for i in range(2))
    start = time.perf_counter()
    for step in range(steps):
        batch = setup.batch(step)
        seen = fixed if fixed is not None else batch
        if step % args.spacing == 0:
            matvec, n = exact.operator(seen)
            for m, state in trackers.items():
                if state is None:
                    state = tracker_step(tracker_init(np.random.default_rng(args.seed).standard_normal(n),
                                                      restart=m), matvec)
                    made = 1
                    while rules.continues_tick(np, made, int(state.position), state.residual, state.eigenvalue, m,
                                               cold=True, stale=False):
                        state, made = tracker_step(state, matvec), made + 1
                else:
                    for _ in range(args.per_tick):
                        state = tracker_step(state, matvec)
                trackers[m] = state
        if step >= args.skip and (step - args.skip) % args.every == 0:
            record = {"step": step, "exact": exact(seen, key="h")}
            record.update({f"restart_{m}": float(state.eigenvalue) for m, state in trackers.items()})
            records.append(record)
        loss = setup.optimizer.step(closure_for(setup, batch))
        if not math.isfinite(float(loss.detach())):
            break
    summary = {}
    for m in args.restarts:
        pairs = [(r[f"restart_{m}"], r["exact"]) for r in records if math.isfinite(r["exact"]) and r["exact"] != 0]
        summary[m] = _summary([abs(t - e) / abs(e) for t, e in pairs])
        signed = [(t - e) / abs(e) for t, e in pairs if math.isfinite(t)]
        summary[m]["signed_median"] = statistics.median(signed) if signed else math.nan
        summary[m]["products"] = int(trackers[m].products) if trackers[m] is not None else 0
    return {"run": name, "lr": lr, "steps": steps, "seed": args.seed, "skip": args.skip, "every": args.every,
            "spacing": args.spacing, "per_tick": args.per_tick, "fixed_batches": args.fixed_batches,
            "restarts": list(args.restarts), "wall_s": time.perf_counter() - start,
            "records": records, "summary": summary}


def report_restarts(result: dict[str, Any]) -> None:
    """Print a restart comparison's summary."""
    where = (f"a fixed batch of {result['fixed_batches']} training batches" if result["fixed_batches"]
             else "the step's batch")
    print(f"{result['run']} lr={result['lr']:g} {result['steps']} steps, seed {result['seed']}: {result['per_tick']} "
          f"product(s) every {result['spacing']} steps per tracker, on {where}; {result['wall_s']:.0f} s", flush=True)
    for m, s in result["summary"].items():
        print(f"  restart {m}: median rel. error {s['median']:.3f}, p90 {s['p90']:.3f}, max {s['max']:.3f}, signed "
              f"median {s['signed_median']:+.3f} over {s['n']} references from step {result['skip']} "
              f"({s['products']} products)", flush=True)


def report(result: dict[str, Any]) -> None:
    """Print a run's summary."""
    print(f"{result['run']} lr={result['lr']:g} {result['steps']} steps, monitor_budget={result['budget']}: "
          f"k={result['median_k']:.0f} (median), median age {result['median_age']:.0f} steps, products "
          f"{result['products']}, {'exact' if result['monitor_exact'] else 'fd'} products at the end; "
          f"{result['wall_s']:.0f} s ({result['reference_s']:.0f} s of references)", flush=True)
    for label, s in result["summary"].items():
        flag = "ok" if s["median"] <= TARGET else "over"
        print(f"  {label:42s} median rel. error {s['median']:.3f} ({flag} vs {TARGET}), p90 {s['p90']:.3f}, "
              f"max {s['max']:.3f}, signed median {s['signed_median']:+.3f} over {s['n']} references from step "
              f"{result['skip']} (exact median {s['exact_median']:.4g})", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="mlp-gd,chargpt-adam", help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--budget", type=float, default=0.05, help="monitor_budget")
    parser.add_argument("--lr", type=float, default=None, help="the runs' lr (default: each run's best constant)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the benchmark's)")
    parser.add_argument("--every", type=int, default=10, help="steps between exact references")
    parser.add_argument("--skip", type=int, default=300,
                        help="steady state starts at this step (the first reference)")
    parser.add_argument("--reference-dtype", choices=("float64", "float32"), default="float64",
                        help="the references' products (float32: about twice as fast, tolerance 1e-5)")
    parser.add_argument("--large-every", type=int, default=50,
                        help="mini-batch runs: steps between references on the larger batch (0: none)")
    parser.add_argument("--large-batches", type=int, default=8, help="training batches in the larger batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the mini-batch suite's smoke-test sizes")
    parser.add_argument("--json", help="write the results (every reference) to this JSON file")
    parser.add_argument("--restarts", default=None,
                        help="compare trackers with cycles of these lengths (e.g. 2,3,4) at a fixed spacing instead "
                             "of the monitor (see compare_restarts)")
    parser.add_argument("--spacing", type=int, default=100, help="--restarts: steps between two products")
    parser.add_argument("--fixed-batches", type=int, default=0,
                        help="--restarts on a mini-batch run: the trackers' products and the references on a fixed "
                             "batch of this many training batches the run never trains on (0: the step's batch)")
    parser.add_argument("--per-tick", type=int, default=1,
                        help="--restarts: products per tick after the cold start (all on that step's operator)")
    args = parser.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    if set(names) - set(RUNS):
        parser.error(f"--runs takes {', '.join(RUNS)}")
    if args.every < 1 or args.large_every < 0:
        parser.error("--every must be >= 1 and --large-every >= 0")
    if args.large_every and args.large_every % args.every:
        parser.error("--large-every must be a multiple of --every")
    if args.restarts is not None:
        try:
            args.restarts = [int(m) for m in args.restarts.split(",") if m]
        except ValueError:
            parser.error("--restarts takes integers >= 2, e.g. 2,3,4")
        if not args.restarts or min(args.restarts) < 2 or args.spacing < 1 or args.per_tick < 1:
            parser.error("--restarts takes integers >= 2, e.g. 2,3,4, and --spacing and --per-tick must be >= 1")
    if args.fixed_batches < 0:
        parser.error("--fixed-batches must be >= 0")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, device cpu, one thread", flush=True)
    results = []
    for name in names:
        if args.restarts is not None:
            results.append(compare_restarts(name, args))
            report_restarts(results[-1])
        else:
            results.append(track(name, args))
            report(results[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
