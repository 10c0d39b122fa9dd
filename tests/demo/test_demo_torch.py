"""``eos-core demo`` on the PyTorch backend, and smoke versions of the reproductions (tox env ``torch``)."""

from __future__ import annotations

import csv
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from eos_core.cli import main  # noqa: E402
from eos_core.demo import claims  # noqa: E402
from eos_core.demo import torch_backend as backend  # noqa: E402
from eos_core.demo.data import load_dataset  # noqa: E402
from eos_core.demo.methods import Method  # noqa: E402
from eos_core.demo.models import ModelSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_demo_cli_writes_the_table_figure_and_csv(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--steps", "15", "--samples", "300", "--lr-grid", "0.5,1,16", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    for header in ("method", "final train loss", "final lr", "median lr*sharpness (2nd half)", "wall time"):
        assert header in captured.out
    labels = ["GD lr=0.5", "GD lr=1", "GD lr=16", "Armijo", "CDAT(scale=1)", "CDAT(scale=2)"]
    table = {line.split("  ")[0]: line for line in captured.out.splitlines() if line.startswith(tuple(labels))}
    assert set(table) == set(labels)
    assert "diverged at step" in table["GD lr=16"]
    assert "(best constant)" in captured.out
    for name in ("edge_of_stability.png", "trajectories.csv", "summary.csv"):
        assert str(out / name) in captured.out  # the paths are printed
    assert (out / "edge_of_stability.png").read_bytes()[:8] == PNG
    # the progress bar went to stderr, one line per run when stderr is not a terminal
    assert captured.err.count("\n") == len(labels) and "[6/6] CDAT(scale=2)" in captured.err

    rows = read_csv(out / "trajectories.csv")
    assert list(rows[0]) == ["method", "step", "loss", "lr", "sharpness", "lr_sharpness"]
    by_method: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    assert list(by_method) == labels
    assert all(len(by_method[m]) == 15 for m in labels if m != "GD lr=16")
    assert len(by_method["GD lr=16"]) < 15  # stopped when the loss blew up
    cdat = by_method["CDAT(scale=2)"]
    measured = [r for r in cdat if r["sharpness"]]
    assert [int(r["step"]) for r in measured] == [0, 5, 10]  # --sharpness-every 5; empty cells in between
    for r in measured:
        assert float(r["lr_sharpness"]) == pytest.approx(float(r["lr"]) * float(r["sharpness"]))
    summary = read_csv(out / "summary.csv")
    assert [r["method"] for r in summary] == labels
    assert sum(int(r["best_constant"]) for r in summary) == 1
    assert [r["diverged"] for r in summary if r["method"] == "GD lr=16"] == ["1"]


def test_demo_cli_cnn_and_method_selection(tmp_path, capsys):
    code = main(["demo", "--model", "cnn", "--width", "4", "--steps", "6", "--samples", "64", "--methods",
                 "cdat=2.0625", "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    captured = capsys.readouterr()
    assert "CNN" in captured.out and "CDAT(scale=2.0625)" in captured.out and "GD lr" not in captured.out
    assert captured.err == ""  # --no-progress
    assert {r["method"] for r in read_csv(tmp_path / "trajectories.csv")} == {"CDAT(scale=2.0625)"}


def test_mnist1d_path_uses_the_generated_dataset_and_cross_entropy(tmp_path, capsys, monkeypatch):
    """With the mnist1d package present (a stand-in here: it is not installable offline)."""
    rng = np.random.default_rng(0)

    def make_dataset(args):
        assert args == {"num_samples": 5000}
        return {"x": rng.standard_normal((120, 40)) * 3 + 1, "y": rng.integers(0, 10, 120)}

    package = types.ModuleType("mnist1d")
    package.__spec__ = importlib.machinery.ModuleSpec("mnist1d", None)
    data = types.ModuleType("mnist1d.data")
    data.make_dataset, data.get_dataset_args = make_dataset, lambda: {"num_samples": 5000}
    package.data = data
    monkeypatch.setitem(sys.modules, "mnist1d", package)
    monkeypatch.setitem(sys.modules, "mnist1d.data", data)
    assert main(["demo", "--dataset", "mnist1d", "--steps", "4", "--methods", "cdat2", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mnist1d (120 examples, 40 features)" in out and "cross-entropy" in out
    loaded = load_dataset("mnist1d")
    np.testing.assert_allclose(loaded.x.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(loaded.x.std(0), 1.0)


@pytest.fixture(scope="module")
def smoke_runs():
    """A few dozen full-batch steps of the MLP on all the digits: what must already hold that early."""
    data = load_dataset("digits")
    spec = ModelSpec()
    methods = [Method("gd", 0.5), Method("armijo"), Method("cdat", 1.0), Method("cdat", 2.0)]
    return {m.label: backend.train(m, data, spec, steps=40, sharpness_every=2) for m in methods}


def test_smoke_on_edge_rule_sits_at_the_edge(smoke_runs):
    on_edge = smoke_runs["CDAT(scale=2)"]
    assert not on_edge.diverged and on_edge.final_loss < 0.5 * on_edge.loss[0]
    # lr * lambda_max over the second half: CDAT(scale=2) is on the edge from the first steps
    assert 1.7 <= on_edge.median_lr_sharpness <= 2.7, on_edge.median_lr_sharpness
    np.testing.assert_allclose(on_edge.lr_sharpness, on_edge.lr * on_edge.sharpness)


def test_smoke_greedy_and_line_search_stay_below_the_on_edge_lr(smoke_runs):
    def late_lr(label: str) -> float:
        lr = smoke_runs[label].lr[-10:]
        return float(np.exp(np.mean(np.log(lr))))  # geometric mean: the greedy rule alternates

    assert late_lr("CDAT(scale=1)") < late_lr("CDAT(scale=2)")
    assert late_lr("Armijo") < late_lr("CDAT(scale=2)")
    assert smoke_runs["Armijo"].lr.max() <= 1.0  # Armijo's lr_max (the paper's first guess)
    # the constant lr is constant, and starts below the edge here: lambda_0 < 2 / 0.5
    constant = smoke_runs["GD lr=0.5"]
    assert np.all(constant.lr == 0.5) and constant.sharpness[0] < 4.0


def test_smoke_claim_checks_run_on_short_runs(smoke_runs):
    verdicts = claims.check_all(list(smoke_runs.values()))
    assert [v.claim[:2] for v in verdicts] == ["B1", "B2", "B3"]
    assert all(isinstance(v.passed, bool) and v.lines for v in verdicts)


def load_benchmark(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    if not path.exists():
        pytest.skip("benchmarks/ is not in this tree")
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"_eos_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(path.parent))


@pytest.mark.parametrize("script, argv", [
    ("reproduce_mlp", ["--steps", "20", "--samples", "300"]),
    ("reproduce_cnn", ["--steps", "6", "--samples", "64", "--width", "4", "--lr-grid", "0.5"]),
])
def test_reproduction_scripts_smoke(script, argv, tmp_path, capsys):
    module = load_benchmark(script)
    common = sys.modules.get("_reproduce_common")
    assert common is not None
    code = common.main(module.DEFAULTS, [*argv, "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    for claim in ("B1", "B2", "B3"):
        assert any(line.startswith(claim) and line.rstrip().endswith(("PASS", "FAIL")) for line in out.splitlines())
    for name in ("edge_of_stability.png", "constant_lrs.png", "trajectories.csv", "verdicts.txt"):
        assert (tmp_path / name).exists(), name
    # re-evaluating the saved trajectories gives the same verdicts
    assert common.main(module.DEFAULTS, ["--from-csv", str(tmp_path / "trajectories.csv")]) == 0
    again = capsys.readouterr().out
    verdict_lines = [line for line in out.splitlines() if line[:2] in ("B1", "B2", "B3")]
    assert verdict_lines == [line for line in again.splitlines() if line[:2] in ("B1", "B2", "B3")]
