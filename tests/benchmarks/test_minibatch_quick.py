"""Smoke test of the mini-batch suite (benchmarks/minibatch): ``--quick`` runs every method on every task.

Asserts that every method ran and wrote its results (not the figures): one JSON per (task, method) with the
fields the report reads, a full lr trajectory and validation curve, and a table row per method. A method whose
optional package (the ``bench`` extra: prodigyopt, dadaptation, schedulefree, dog-optimizer) is missing is
skipped with the reason; mnist1d is needed by the ``mlp`` task. Also checks that a run is deterministic given
the seed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
if not (ROOT / "benchmarks" / "minibatch" / "run.py").is_file():
    pytest.skip("benchmarks/minibatch is not in this tree", allow_module_level=True)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.minibatch.methods import all_methods  # noqa: E402

TASKS = ("chargpt", "cnn", "mlp")
METHODS = all_methods()
#: what each task needs beyond torch and scikit-learn
TASK_PACKAGES = {"mlp": "mnist1d"}
REQUIRED = ("final_val_loss", "final_train_loss", "wall_time_s", "time_per_step_s", "time_ratio",
            "plain_adamw_time_per_step_s", "lr", "val_curve", "train_loss", "seed", "settings", "steps")


def _run(out: Path, tasks: list[str], methods: list[str], seed: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "benchmarks.minibatch.run", "--task", *tasks, "--seeds", str(seed), "--quick",
           "--methods", *methods, "--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """One ``--quick --methods all`` run per available task; returns (results folder, task -> skip reason)."""
    out = tmp_path_factory.mktemp("minibatch")
    skipped = {t: f"package {p} not installed" for t, p in TASK_PACKAGES.items() if importlib.util.find_spec(p) is None}
    tasks = [t for t in TASKS if t not in skipped]
    proc = _run(out, tasks, ["all"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, skipped


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("task", TASKS)
def test_every_method_runs_and_writes_results(quick_suite: tuple[Path, dict[str, str]], task: str,
                                              method: str) -> None:
    out, skipped_tasks = quick_suite
    if task in skipped_tasks:
        pytest.skip(f"task {task}: {skipped_tasks[task]}")
    path = out / task / method / "seed0.json"
    assert path.is_file(), f"{method} wrote no results for {task}"
    result = json.loads(path.read_text())
    spec = METHODS[method]
    if result["status"] == "skipped":
        assert spec.missing(), f"{method} was skipped although its packages import: {result.get('reason')}"
        pytest.skip(f"{method}: {result['reason']}")
    assert not spec.missing()
    assert result["status"] in ("ok", "diverged"), result.get("error")
    assert result["task"] == task and result["method"] == method and result["seed"] == 0
    for key in REQUIRED:
        assert key in result, f"{method} on {task}: no {key!r} in its JSON"
    if result["status"] == "ok":
        steps = result["steps"]
        assert result["steps_done"] == steps
        assert result["lr"]["step"][0] == 0 and result["lr"]["step"][-1] == steps - 1
        assert all(math.isfinite(v) and v >= 0 for v in result["lr"]["value"])
        assert result["val_curve"]["step"][0] == 0 and result["val_curve"]["step"][-1] == steps
        assert result["final_val_loss"] == result["val_curve"]["value"][-1]
        assert math.isfinite(result["final_val_loss"]) and math.isfinite(result["final_train_loss"])
        assert result["time_per_step_s"] > 0 and result["plain_adamw_time_per_step_s"] > 0
    table = (out / task / "table.md").read_text()
    assert f"| {method} |" in table or f"| **{method}** |" in table, f"{method} missing from {task}'s table"


def test_a_run_is_deterministic_given_the_seed(tmp_path: Path) -> None:
    methods = ["adamw-cos-3e-3", "cdat-s1-e0.9-cos", "proto-lag-s1-e0.9-cos-p5"]
    runs = []
    for name in ("a", "b"):
        proc = _run(tmp_path / name, ["cnn"], methods, seed=1)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs.append({m: json.loads((tmp_path / name / "cnn" / m / "seed1.json").read_text()) for m in methods})
    for m in methods:
        a, b = runs[0][m], runs[1][m]
        assert a["final_val_loss"] == b["final_val_loss"] and a["lr"] == b["lr"] and a["train_loss"] == b["train_loss"]
    # and the seed matters: another seed gives another run
    proc = _run(tmp_path / "c", ["cnn"], methods[:1], seed=0)
    assert proc.returncode == 0
    other = json.loads((tmp_path / "c" / "cnn" / methods[0] / "seed0.json").read_text())
    assert other["train_loss"] != runs[0][methods[0]]["train_loss"]


def test_a_seed_that_only_observers_ran_is_not_a_missing_column():
    from benchmarks.minibatch.report import summarize

    def run(method: str, family: str, seed: int, val: float) -> dict:
        return {"method": method, "family": family, "seed": seed, "status": "ok", "final_val_loss": val,
                "final_train_loss": val, "time_ratio": 1.0}

    results = [run("cos-1e-3", "cosine", 0, 2.0), run("cdat", "cdat", 0, 2.2), run("observe-adam", "observe", 1, 3.0)]
    summary = summarize(results)
    assert summary["seeds"] == [0]
    assert {row["method"]: row["mean_ratio"] for row in summary["rows"]} == {"cos-1e-3": 1.0, "cdat": 1.1}
