r"""The full-batch claims B1-B3 (Cohen et al. 2021; CDAT paper Fig. 1, 3, 5, 6) as checks on a set of demo runs.

Each check returns a [`Verdict`][eos_core.demo.claims.Verdict]: PASS/FAIL, the figures it rests on, and one line per
run. The thresholds below are this module's reading of the claims' words; they are stated here so the figures in
`benchmarks/README.md` can be checked against them.

* **B1** (Cohen et al. 2021), constant lr eta: *progressive sharpening, then lambda_max within 10% of 2/eta*. Per grid
  lr that does not diverge and starts below the edge (lambda_0 < 2/eta): sharpening = lambda_max rises to at least
  0.9 * 2/eta ([`EDGE_REACHED`][eos_core.demo.claims.EDGE_REACHED]); at the edge = the median of lambda_max over the
  second half lies within 10% of 2/eta ([`B1_TOLERANCE`][eos_core.demo.claims.B1_TOLERANCE]). PASS when at least one
  lr reaches the edge and every lr that reaches it stays within 10%; a small lr that has not reached 2/eta within the
  run's steps is listed, not counted against the claim.
* **B2** (CDAT paper Fig. 1, 3): Armijo and CDAT(scale=1) *undershoot the edge*: the lr falls by at least
  [`B2_LR_FALL`][eos_core.demo.claims.B2_LR_FALL] (10x, one order of magnitude) from its early peak (first 10% of
  steps) to its end (geometric mean of the last 10 steps: the greedy rule alternates between two values); the
  sharpness keeps rising ([`sharpness_growth`][eos_core.demo.claims.sharpness_growth], the ratio of its medians over
  the last and the first fifth of the second half, >= [`B2_STILL_RISING`][eos_core.demo.claims.B2_STILL_RISING]); the
  final train loss is worse than the best constant lr of the grid.
* **B3** (CDAT paper Fig. 5, 6): CDAT scale 2 and 2.0625: final train loss <= the best constant lr's; the lr rises
  early like a warm-up (its peak over the first quarter of the steps is at least
  [`B3_WARMUP`][eos_core.demo.claims.B3_WARMUP] x its first value); the sharpness does not run away
  ([`sharpness_growth`][eos_core.demo.claims.sharpness_growth] <=
  [`B3_NO_RUNAWAY`][eos_core.demo.claims.B3_NO_RUNAWAY]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from eos_core.demo.results import Trajectory, best_constant

#: B1: a constant-lr run has reached the edge once lambda_max >= this fraction of 2/lr.
EDGE_REACHED = 0.9
#: B1: largest relative distance |median lambda_max / (2/lr) - 1| over the second half still "at the edge".
B1_TOLERANCE = 0.10
#: B2: smallest fall of the lr, early peak / geometric mean of the last 10 values, that counts as undershooting.
B2_LR_FALL = 10.0
#: B2: smallest [`sharpness_growth`][eos_core.demo.claims.sharpness_growth] that counts as "still rising".
B2_STILL_RISING = 1.1
#: B3: smallest [`warmup_factor`][eos_core.demo.claims.warmup_factor] that counts as a warm-up.
B3_WARMUP = 1.1
#: B3: largest [`sharpness_growth`][eos_core.demo.claims.sharpness_growth] that counts as "does not run away".
B3_NO_RUNAWAY = 1.25


@dataclass
class Verdict:
    """The outcome of one claim's check.

    Attributes:
        claim: the claim's name and its statement in words, e.g. `"B1 constant lr: ..."`.
        passed: True when the runs satisfy the claim (the PASS/FAIL of the module's description).
        lines: one human-readable line per run (or per reason a run was excluded or the check could not run).
        figures: the numbers the verdict rests on, keyed by `"<run label> <figure>"`, e.g.
            `"Armijo lr fall"` or `"lr=0.5 median sharpness / (2/lr)"`.
    """

    claim: str
    passed: bool
    lines: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    def report(self) -> str:
        """The verdict as plain text.

        Returns:
            `"<claim>: PASS"` or `"<claim>: FAIL"`, followed by [`lines`][eos_core.demo.claims.Verdict.lines], one per
            line and indented by two spaces.
        """
        head = f"{self.claim}: {'PASS' if self.passed else 'FAIL'}"
        return "\n".join([head, *("  " + line for line in self.lines)])


def _window(run: Trajectory, values: np.ndarray, start: float, stop: float) -> np.ndarray:
    """Finite entries of `values` over the steps [start, stop) x planned steps."""
    n = run.planned_steps
    keep = (run.step >= int(start * n)) & (run.step < max(int(stop * n), int(start * n) + 1))
    out = values[keep]
    return out[np.isfinite(out)]


def sharpness_growth(run: Trajectory) -> float:
    """Growth of lambda_max over the second half of the steps.

    Among the finite sharpness measurements of the second half of the planned steps, the median of the last fifth
    over the median of the first fifth (at least one measurement each):
    `median(lambda[-k:]) / median(lambda[:k])` with `k = max(1, m // 5)` for `m` measurements.

    Args:
        run: the run; its `sharpness` column is read (NaN where not measured).

    Returns:
        The ratio of the two medians (1 when lambda_max is flat, > 1 when it still rises); NaN when fewer than 2
        measurements fall in the second half.
    """
    values = run.second_half(run.sharpness)
    if values.size < 2:
        return math.nan
    k = max(1, values.size // 5)
    return float(np.median(values[-k:]) / np.median(values[:k]))


def lr_fall(run: Trajectory) -> float:
    """How far the lr fell: its early peak over its final level.

    `max(lr over the first 10% of the planned steps) / exp(mean(log lr over the last 10 positive values))`; the
    geometric mean averages out a greedy rule that alternates between two values (claim B2).

    Args:
        run: the run; its `lr` column is read.

    Returns:
        The ratio (10 means the lr fell one order of magnitude); NaN when the first 10% of the steps hold no finite lr
        or the run has no finite positive lr.
    """
    early = _window(run, run.lr, 0.0, 0.1)
    late = run.lr[np.isfinite(run.lr) & (run.lr > 0)][-10:]
    if not early.size or not late.size:
        return math.nan
    return float(early.max() / np.exp(np.mean(np.log(late))))


def warmup_factor(run: Trajectory) -> float:
    """How much the lr rose early, like a warm-up (claim B3).

    Args:
        run: the run; its `lr` column is read.

    Returns:
        The peak finite lr over the first quarter of the planned steps divided by the lr of step 0 (1 when the lr
        never rose above its first value); NaN when that window holds no finite lr or the first lr is not > 0.
    """
    early = _window(run, run.lr, 0.0, 0.25)
    return float(early.max() / run.lr[0]) if early.size and run.lr[0] > 0 else math.nan


def check_b1(runs: Sequence[Trajectory]) -> Verdict:
    """Check claim B1 (Cohen et al. 2021): at a constant lr eta, lambda_max rises to 2/eta and stays there.

    For each non-diverged GD run that starts below the edge (first measured lambda_max < 2/eta): the run reaches
    the edge when its lambda_max attains [`EDGE_REACHED`][eos_core.demo.claims.EDGE_REACHED] x 2/eta; it is at the
    edge when the median lambda_max over the second half of the steps lies within
    [`B1_TOLERANCE`][eos_core.demo.claims.B1_TOLERANCE] of 2/eta. Diverged runs, runs that start above the edge and
    runs that do not reach it within their steps are listed and not counted.

    Args:
        runs: the demo's runs; only the GD ones (`method.kind == "gd"`) are checked.

    Returns:
        The verdict: passed when at least one lr reaches the edge and every lr that reaches it stays within the
        tolerance; `figures` holds `median lambda_max / (2/lr)` per counted lr.
    """
    verdict = Verdict("B1 constant lr: progressive sharpening, then lambda_max within 10% of 2/lr", False)
    reached_any, all_within = False, True
    for run in (r for r in runs if r.method.kind == "gd"):
        eta = run.method.value
        edge = 2.0 / eta
        if run.diverged:
            verdict.lines.append(f"lr={eta:g}: diverged (excluded)")
            continue
        sharp = run.sharpness[np.isfinite(run.sharpness)]
        if not sharp.size:
            verdict.lines.append(f"lr={eta:g}: no lambda_max was measured (excluded)")
            continue
        start = float(sharp[0])
        if not start < edge:
            verdict.lines.append(f"lr={eta:g}: starts above the edge (lambda_0 = {start:.3g} >= 2/lr = {edge:.3g}; "
                                 "excluded)")
            continue
        peak = float(sharp.max())
        if peak < EDGE_REACHED * edge:
            verdict.lines.append(f"lr={eta:g}: lambda_max rose {start:.3g} -> {peak:.3g} but did not reach "
                                 f"0.9 * 2/lr = {EDGE_REACHED * edge:.3g} in {run.planned_steps} steps (not counted)")
            continue
        reached_any = True
        first = int(run.step[np.isfinite(run.sharpness)][np.argmax(sharp >= EDGE_REACHED * edge)])
        median = run.median_sharpness
        ratio = median / edge
        within = abs(ratio - 1.0) <= B1_TOLERANCE
        all_within &= within
        verdict.figures[f"lr={eta:g} median sharpness / (2/lr)"] = ratio
        verdict.lines.append(f"lr={eta:g}: lambda_max {start:.3g} -> 0.9*2/lr at step {first}; median over the "
                             f"second half {median:.3g} = {ratio:.3f} x 2/lr ({'within' if within else 'outside'} "
                             f"10%)  [median lr*lambda = {run.median_lr_sharpness:.3f}]")
    verdict.passed = reached_any and all_within
    if not reached_any:
        verdict.lines.append("no constant lr reached the edge")
    return verdict


def check_b2(runs: Sequence[Trajectory]) -> Verdict:
    """Check claim B2 (CDAT paper Fig. 1, 3): Armijo and CDAT(scale=1) undershoot the edge.

    Each Armijo and CDAT(scale=1) run must satisfy all three:
    [`lr_fall`][eos_core.demo.claims.lr_fall] >= [`B2_LR_FALL`][eos_core.demo.claims.B2_LR_FALL],
    [`sharpness_growth`][eos_core.demo.claims.sharpness_growth] >=
    [`B2_STILL_RISING`][eos_core.demo.claims.B2_STILL_RISING], and a final train loss above that of the best
    constant lr ([`best_constant`][eos_core.demo.results.best_constant]).

    Args:
        runs: the demo's runs: the GD runs of the grid and the Armijo / CDAT(scale=1) runs to check.

    Returns:
        The verdict: passed when every checked run satisfies the three conditions; failed, with a line saying so,
        when there is no non-diverged constant lr or no Armijo / CDAT(scale=1) run. `figures` holds each run's lr
        fall, sharpness growth and final loss / best constant's.
    """
    verdict = Verdict("B2 Armijo and CDAT(scale=1): lr falls, sharpness keeps rising, loss worse than best constant",
                      False)
    best = best_constant(runs)
    subjects = [r for r in runs if r.method.kind == "armijo" or (r.method.kind == "cdat" and r.method.value == 1.0)]
    if best is None or not subjects:
        verdict.lines.append("needs a non-diverged constant lr and Armijo / CDAT(scale=1) runs")
        return verdict
    verdict.lines.append(f"best constant: lr={best.method.value:g}, final loss {best.final_loss:.4g}")
    passed = True
    for run in subjects:
        fall, growth = lr_fall(run), sharpness_growth(run)
        worse = run.final_loss > best.final_loss
        ok = fall >= B2_LR_FALL and growth >= B2_STILL_RISING and worse
        passed &= ok
        verdict.figures[f"{run.label} lr fall"] = fall
        verdict.figures[f"{run.label} sharpness growth"] = growth
        verdict.figures[f"{run.label} loss / best constant"] = run.final_loss / best.final_loss
        verdict.lines.append(
            f"{run.label}: lr falls {fall:.3g}x (needs >= {B2_LR_FALL:g}) to {run.final_lr:.3g}; sharpness "
            f"{run.median_sharpness:.3g} (median, second half), growth {growth:.3f}x over the second half "
            f"(needs >= {B2_STILL_RISING:g}); final loss {run.final_loss:.4g} = "
            f"{run.final_loss / best.final_loss:.3f} x best constant (needs > 1)  [{'ok' if ok else 'FAILS'}]")
    verdict.passed = passed
    return verdict


def check_b3(runs: Sequence[Trajectory]) -> Verdict:
    """Check claim B3 (CDAT paper Fig. 5, 6): CDAT on the edge (scale >= 2) matches the best constant lr.

    Each CDAT run with scale >= 2 must not diverge and must satisfy all three: final train loss <= the best constant
    lr's ([`best_constant`][eos_core.demo.results.best_constant]),
    [`warmup_factor`][eos_core.demo.claims.warmup_factor] >= [`B3_WARMUP`][eos_core.demo.claims.B3_WARMUP], and
    [`sharpness_growth`][eos_core.demo.claims.sharpness_growth] <=
    [`B3_NO_RUNAWAY`][eos_core.demo.claims.B3_NO_RUNAWAY].

    Args:
        runs: the demo's runs: the GD runs of the grid and the CDAT(scale >= 2) runs to check.

    Returns:
        The verdict: passed when every checked run satisfies the conditions; failed, with a line saying so, when
        there is no non-diverged constant lr or no CDAT run with scale >= 2. `figures` holds each run's final loss /
        best constant's, warm-up factor and sharpness growth.
    """
    verdict = Verdict("B3 CDAT scale 2 / 2.0625: loss <= best constant, warm-up, sharpness does not run away", False)
    best = best_constant(runs)
    subjects = [r for r in runs if r.method.kind == "cdat" and r.method.value >= 2.0]
    if best is None or not subjects:
        verdict.lines.append("needs a non-diverged constant lr and CDAT(scale>=2) runs")
        return verdict
    verdict.lines.append(f"best constant: lr={best.method.value:g}, final loss {best.final_loss:.4g}")
    passed = True
    for run in subjects:
        ratio = run.final_loss / best.final_loss
        warm, growth = warmup_factor(run), sharpness_growth(run)
        ok = (not run.diverged) and ratio <= 1.0 and warm >= B3_WARMUP and growth <= B3_NO_RUNAWAY
        passed &= ok
        verdict.figures[f"{run.label} loss / best constant"] = ratio
        verdict.figures[f"{run.label} warm-up"] = warm
        verdict.figures[f"{run.label} sharpness growth"] = growth
        verdict.lines.append(
            f"{run.label}: final loss {run.final_loss:.4g} = {ratio:.3f} x best constant (needs <= 1); lr "
            f"{run.lr[0]:.3g} at step 0, peak {warm:.3g}x in the first quarter (needs >= {B3_WARMUP:g}), "
            f"{run.final_lr:.3g} at the end; sharpness growth over the second half {growth:.3f}x (needs <= "
            f"{B3_NO_RUNAWAY:g}); median lr*lambda {run.median_lr_sharpness:.3f}  [{'ok' if ok else 'FAILS'}]")
    verdict.passed = passed
    return verdict


def check_all(runs: Sequence[Trajectory]) -> list[Verdict]:
    """Check the three claims on one set of runs.

    Args:
        runs: the demo's runs (GD over the lr grid, Armijo, CDAT).

    Returns:
        The verdicts of [`check_b1`][eos_core.demo.claims.check_b1],
        [`check_b2`][eos_core.demo.claims.check_b2] and [`check_b3`][eos_core.demo.claims.check_b3], in that order.
    """
    return [check_b1(runs), check_b2(runs), check_b3(runs)]
