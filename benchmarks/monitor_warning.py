"""Early warning of the sharpness monitor: how long before a loss spike it fires, and false alarms on stable runs.

Trains each run of ``_monitor_common.py`` (``mlp-gd``: full-batch SGD on the tanh MLP; ``chargpt-adam``: Adam on
the character-level GPT; ``cnn-adam``) at constant learning rates on both sides of the edge, monitoring only
(``CurvatureTuner(optimizer, None, monitor_budget=0.05)``, the default margin and patience; Adam's first step is
also watched along its own update, ``update_quotient``, recorded when measured), and records the
step at which the warning fires (``unstable`` turns 1 and the RuntimeWarning is raised) and the **loss spike**:
the first step whose loss is NaN / inf or more than twice the lowest loss of the steps before. A run
**diverges** when its loss becomes NaN / inf or exceeds ``--blowup`` times its minimum (the run stops there), or
when it ends above twice its minimum (no recovery); for those the warning's lead is ``spike step - warning step``,
and ``onset step - warning step`` for the **divergence onset**, the first step of the excursion above twice the
running minimum that the run does not recover from (after an early transient spike, Adam at a large lr can train for
hundreds of steps before it diverges).
The warning of step t comes with the diagnostics after the step, when the loss of step t is known, so only a
positive lead counts as a warning before the spike. Every other run is *stable*, whether or not it had a transient
spike (gradient descent entering the edge of stability bounces: the best constant lr of ``mlp-gd`` has one at step
~125), and any warning on it is a false alarm.

Default cases: ``mlp-gd`` at lr 0.25, 0.5 (0.5 is the best constant and trains at the edge, lambda_max ~ 2/lr), 1 and
1.5 (above 2 / lambda_max = 0.69 at initialisation; both recover after a catapult) and 1.6, 1.7, 1.8, 2, 3 (diverge
within 1-7 steps); ``chargpt-adam`` at 1e-3, 2e-3, 3e-3 (around the suite's best constant, 2e-3), 5e-3 and 1e-2
(2.5x and 5x) and 2e-2 to 1 (10-500x the best: up to 50x the loss plateaus without a spike in 1000 steps).

    python benchmarks/monitor_warning.py --case mlp-gd=0.25,0.5,1,1.5,1.6,1.7,1.8,2,3 --seeds 0,1,2   # ~5 min
    python benchmarks/monitor_warning.py --case chargpt-adam=1e-3,2e-3,3e-3,5e-3,1e-2,2e-2,4e-2,6e-2,0.1,0.3,1 # 15 min
    python benchmarks/monitor_warning.py --case mlp-gd=0.5,3 --steps 40 --quick   # smoke run
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

import torch
from _monitor_common import DEFAULT_STEPS, RUNS, closure_for, divergence_onset, loss_spike, make_setup, monitored

CASES: dict[str, list[float]] = {"mlp-gd": [0.25, 0.5, 1.0, 1.5, 1.6, 1.7, 1.8, 2.0, 3.0],
                                 "chargpt-adam": [1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 4e-2, 6e-2, 0.1, 0.3, 1.0]}


def run_case(name: str, lr: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run; returns its losses, the monitor's readings and the warning / spike steps."""
    steps = args.steps if args.steps is not None else DEFAULT_STEPS[name]
    setup = make_setup(name, lr, seed=seed, steps=steps, quick=args.quick)
    tuner = monitored(setup, args.budget)
    losses: list[float] = []
    unstable: list[float] = []
    readings: list[tuple[int, float, float]] = []  # (step, watched lr x sharpness, edge) on the steps it was measured
    quotients: list[tuple[int, float]] = []  # (step, update_quotient): an adaptive optimizer's first step
    warned_at: list[int] = []
    spike = None
    start = time.perf_counter()
    for step in range(steps):
        if args.warmup:  # a linear warm-up to `lr` over the first `--warmup` steps, as a scheduler would set it
            for group in setup.optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / args.warmup)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tuner.step(closure_for(setup, setup.batch(step)))
        warned_at += [step for w in caught if "edge of stability" in str(w.message)]
        d = tuner.diagnostics
        losses.append(d["loss"])
        unstable.append(d["unstable"])
        pre = isinstance(setup.optimizer, torch.optim.Adam)
        age = d["preconditioned_sharpness_age" if pre else "sharpness_age"]
        if age == 0:
            readings.append((step, d["preconditioned_lr_sharpness" if pre else "lr_sharpness"], d["edge"]))
        if math.isfinite(d["update_quotient"]):
            quotients.append((step, d["update_quotient"]))
        if spike is None:
            spike = loss_spike(losses)
        if not math.isfinite(losses[-1]) or losses[-1] > args.blowup * min(losses):
            break
    first = next((i for i, u in enumerate(unstable) if u == 1), None)
    finite = [x for x in losses if math.isfinite(x)]
    tail = losses[-max(1, len(losses) // 20):]  # the last 5%
    diverged = (len(finite) < len(losses) or losses[-1] > args.blowup * min(finite)
                or statistics.fmean(tail) > 2.0 * min(finite))
    onsets = sum(1 for i, u in enumerate(unstable) if u == 1 and (i == 0 or unstable[i - 1] != 1))
    onset = divergence_onset(losses) if diverged else None
    return {"run": name, "lr": lr, "seed": seed, "steps": len(losses), "spike": spike, "warning": first,
            "onset_lead": None if onset is None or first is None else onset - first,
            "diverged": diverged,
            "warnings_raised": warned_at, "onsets": onsets,
            "lead": None if not diverged or first is None else spike - first,
            "onset": divergence_onset(losses) if diverged else None,
            "unstable_fraction": sum(1 for u in unstable if u == 1) / len(unstable),
            "readings": readings, "quotients": quotients, "losses": losses, "min_loss": min(finite, default=math.nan),
            "final_loss": losses[-1],
            "edge": tuner.diagnostics["edge"], "products": [int(t.products) for t in tuner.monitor.trackers
                                                            if t is not None],
            "wall_s": time.perf_counter() - start}


def describe(r: dict[str, Any]) -> str:
    """One line per run."""
    before = [v for s, v, _ in r["readings"] if not r["diverged"] or s <= r["spike"]]
    peak = max((v for v in before if math.isfinite(v)), default=math.nan)
    head = f"  {r['run']:12s} lr={r['lr']:<7g} seed {r['seed']}: "
    if not r["diverged"]:
        bounce = "" if r["spike"] is None else f" (transient spike at step {r['spike']})"
        verdict = (f"stable{bounce}, no warning" if r["warning"] is None else
                   f"stable{bounce}, FALSE ALARM at step {r['warning']} ({r['onsets']} onsets, unstable on "
                   f"{100 * r['unstable_fraction']:.1f}% of steps)")
    elif r["warning"] is None:
        verdict = f"spike at step {r['spike']}, NO WARNING"
    elif r["lead"] > 0:
        verdict = f"spike at step {r['spike']}, warning at step {r['warning']}: {r['lead']} steps before"
    elif r["lead"] == 0:
        verdict = f"spike at step {r['spike']}, warning on the same step (not before)"
    else:
        verdict = f"spike at step {r['spike']}, warning at step {r['warning']}: {-r['lead']} steps LATE"
    if r["diverged"] and r["onset"] != r["spike"]:
        verdict += f" (divergence onset at step {r['onset']}" + (
            "" if r["onset_lead"] is None else f", {r['onset_lead']} steps after the warning") + ")"
    quotients = "".join(f", update_quotient {q:.3g} at step {s}" for s, q in r.get("quotients", ()))
    return (head + verdict + f"; max watched lr x sharpness {peak:.3g}{' before the spike' if r['diverged'] else ''} "
            f"(edge {r['edge']:.3g}){quotients}, {len(r['readings'])} measurements, {r['steps']} steps, loss min "
            f"{r['min_loss']:.3g} final {r['final_loss']:.3g}, {r['wall_s']:.0f} s")


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts over the runs: diverging runs warned in time, their leads; stable runs with a false alarm."""
    diverging = [r for r in results if r["diverged"]]
    stable = [r for r in results if not r["diverged"]]
    leads = [r["lead"] for r in diverging if r["lead"] is not None and r["lead"] > 0]
    onset_leads = [r["onset_lead"] for r in diverging if r["onset_lead"] is not None and r["onset_lead"] > 0]
    stable_steps = sum(r["steps"] for r in stable)
    return {"diverging": len(diverging), "warned_before_spike": len(leads),
            "median_lead": statistics.median(leads) if leads else None, "min_lead": min(leads) if leads else None,
            "warned_before_onset": len(onset_leads),
            "median_onset_lead": statistics.median(onset_leads) if onset_leads else None,
            "stable": len(stable), "false_alarm_runs": sum(1 for r in stable if r["warning"] is not None),
            "false_alarm_onsets_per_1000_steps": 1000 * sum(r["onsets"] for r in stable) / max(stable_steps, 1)}


def _case(text: str) -> tuple[str, list[float]]:
    name, _, lrs = text.partition("=")
    if name not in RUNS or not lrs:
        raise argparse.ArgumentTypeError(f"--case takes RUN=LR,LR,... with RUN one of {', '.join(RUNS)}")
    return name, [float(x) for x in lrs.split(",")]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=_case, action="append", default=None,
                        help="RUN=LR,LR,... (repeatable; default: the cases listed above)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--budget", type=float, default=0.05, help="monitor_budget")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the benchmark's)")
    parser.add_argument("--blowup", type=float, default=1e3,
                        help="a loss this many times the run's minimum ends the run as diverged")
    parser.add_argument("--quick", action="store_true", help="the mini-batch suite's smoke-test sizes")
    parser.add_argument("--warmup", type=int, default=0,
                        help="raise the lr linearly from lr / WARMUP to lr over the first WARMUP steps (default 0: "
                             "a constant lr)")
    parser.add_argument("--json", help="write every run (losses, readings) to this JSON file")
    args = parser.parse_args(argv)
    cases = dict(args.case) if args.case else CASES
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, device cpu, one thread; monitor_budget={args.budget}, spike: loss > 2x the "
          "running minimum or not finite", flush=True)
    results = []
    for name, lrs in cases.items():
        for lr in lrs:
            for seed in seeds:
                results.append(run_case(name, lr, seed, args))
                print(describe(results[-1]), flush=True)
    summary = {name: summarise([r for r in results if r["run"] == name]) for name in cases}
    for name, s in summary.items():
        print(f"{name}: {s['warned_before_spike']} of {s['diverging']} diverging runs warned before the spike "
              f"(median lead {s['median_lead']}, min {s['min_lead']} steps), {s['warned_before_onset']} before the "
              f"divergence onset (median lead {s['median_onset_lead']}); {s['false_alarm_runs']} of "
              f"{s['stable']} stable runs with a false alarm ({s['false_alarm_onsets_per_1000_steps']:.2f} onsets "
              "per 1000 steps)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "runs": results}, f, indent=1, default=float)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
