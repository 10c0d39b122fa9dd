"""The demo's result records (core env: numpy only)."""

from __future__ import annotations

import math

from eos_core.demo.methods import Method
from eos_core.demo.results import Trajectory


def _run(losses: list[float], *, stopped: bool = False) -> Trajectory:
    return Trajectory.from_records(Method("cdat", 2.0), [{"loss": v} for v in losses], wall_s=0.0,
                                   planned_steps=len(losses), stopped=stopped)


def test_a_run_that_recorded_no_step_counts_as_diverged_instead_of_crashing():
    assert _run([]).diverged and math.isinf(_run([]).final_loss)


def test_diverged_compares_the_final_loss_with_the_first():
    assert not _run([1.0, 0.5, 0.4]).diverged
    assert _run([1.0, 1.2, 1.5]).diverged
    assert _run([1.0, 0.5], stopped=True).diverged
    assert _run([1.0, math.nan]).diverged
