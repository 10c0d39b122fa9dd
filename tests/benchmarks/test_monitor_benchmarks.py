"""Smoke tests of the sharpness monitor's benchmarks: each mode runs a few steps and writes what the README reads.

``torch_overhead.py --monitor`` and ``jax_overhead.py --monitor`` (tiny models, one repeat), ``monitor_tracking.py``
and ``monitor_warning.py`` (the full-batch tanh MLP on 200 digits, a few dozen steps). No timing is asserted: the
tests check that every row is there with its bookkeeping right (blocks of whole monitoring periods, references taken
at the steps asked for, a run that blows up classified as diverged) and the loss-spike rule the warning benchmark
is judged by.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("scipy")
pytest.importorskip("sklearn")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if not (BENCHMARKS / "monitor_tracking.py").is_file():
    pytest.skip("the monitor benchmarks are not in this tree", allow_module_level=True)
for path in (str(BENCHMARKS), str(BENCHMARKS.parent)):
    if path not in sys.path:
        sys.path.insert(0, path)

import _monitor_common  # noqa: E402
import monitor_tracking  # noqa: E402
import monitor_warning  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_loss_spike_is_the_first_loss_above_twice_the_running_minimum():
    spike = _monitor_common.loss_spike
    assert spike([1.0, 0.8, 1.5, 1.59]) is None  # below 2 x 0.8
    assert spike([1.0, 0.5, 0.9, 1.01, 5.0]) == 3  # 1.01 > 2 x 0.5, the first such step
    assert spike([1.0, 0.9, math.nan]) == 2
    assert spike([math.inf]) == 0
    assert spike([3.0, 7.0]) == 1  # the first step is compared with nothing


def test_divergence_onset_is_the_start_of_the_excursion_that_does_not_recover():
    onset = _monitor_common.divergence_onset
    assert onset([5.0, 9.0, 15.0, 4.0, 3.0, 3.2, 7.0, 8.0, 9.0]) == 6  # the early transient spike is not it
    assert onset([5.0, 53.0, 51.0]) == 1
    assert onset([1.0, 3.0, 1.0]) is None  # recovered
    assert onset([1.0, 0.9, math.nan, math.nan]) == 2


def test_torch_overhead_monitor_mode(tmp_path, capsys):
    import torch_overhead

    out = tmp_path / "torch.json"
    assert torch_overhead.main(["--size", "tiny", "--models", "mlp", "--monitor", "--monitor-block", "1",
                                "--monitor-repeats", "2", "--monitor-warmup", "1", "--warmup", "1",
                                "--no-cpu-memory", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["monitor"]
    assert [r["base"] for r in rows] == ["sgd", "adam"]
    for row in rows:
        assert row["budget"] == 0.05 and row["repeats"] == 2
        assert row["every"] >= 1 and row["block"] % row["every"] == 0  # whole monitoring periods per block
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0 and math.isfinite(row["tuner_ratio"])
        assert row["ratio_spread"][0] <= row["ratio"] <= row["ratio_spread"][1]
        assert row["cpu_ratio_spread"][0] <= row["cpu_ratio"] <= row["cpu_ratio_spread"][1]
        assert row["plain_cpu_ms"] > 0 and math.isfinite(row["cpu_tuner_ratio"])
        assert row["products_per_step"] >= 0 and math.isfinite(row["final_loss"])
    assert "monitor_budget=0.05 adam" in capsys.readouterr().out


def test_jax_overhead_monitor_mode(tmp_path, capsys):
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    import jax_overhead

    out = tmp_path / "jax.json"
    assert jax_overhead.main(["--size", "tiny", "--models", "mlp", "--monitor", "--monitor-bases", "sgd",
                              "--monitor-block", "1", "--monitor-repeats", "2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["base"] == "sgd" and row["budget"] == 0.05 and row["repeats"] == 2
    assert row["every"] >= 1 and row["block"] % row["every"] == 0
    assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"] and row["ratio"] > 0
    assert row["cpu_ratio_min"] <= row["cpu_ratio"] <= row["cpu_ratio_max"] and row["plain_cpu_ms"] > 0
    assert math.isfinite(row["sharpness"]) and math.isfinite(row["final_loss"])
    assert "products/step" in capsys.readouterr().out


def test_monitor_tracking_compares_with_the_exact_value(tmp_path):
    out = tmp_path / "tracking.json"
    assert monitor_tracking.main(["--runs", "mlp-gd", "--quick", "--steps", "25", "--skip", "5", "--every", "5",
                                  "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    assert [r["step"] for r in result["records"]] == [5, 10, 15, 20]
    for record in result["records"]:
        assert record["exact"] > 0 and math.isfinite(record["tracked"]) and record["age"] >= 0
    summary = result["summary"]["sharpness"]
    assert summary["n"] == 4
    errors = [abs(r["tracked"] - r["exact"]) / r["exact"] for r in result["records"]]
    assert summary["median"] == pytest.approx(statistics.median(errors))


def test_the_restart_comparison_feeds_every_tracker_the_same_products(tmp_path):
    out = tmp_path / "restarts.json"
    assert monitor_tracking.main(["--runs", "mlp-gd", "--quick", "--steps", "30", "--skip", "10", "--every", "5",
                                  "--restarts", "2,3", "--spacing", "4", "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    assert [r["step"] for r in result["records"]] == [10, 15, 20, 25]
    summary = result["summary"]
    # the cold start as the monitor's: at least `restart` products, to the residual tolerance, then to the end of
    # its cycle (at most COLD_PRODUCTS + restart - 1); then one per tick
    ticks = len(range(0, 30, 4))
    for m in ("2", "3"):
        assert ticks - 1 + int(m) <= summary[m]["products"] <= ticks - 1 + 16 + int(m) - 1
        assert (summary[m]["products"] - (ticks - 1)) % int(m) == 0  # the cold start ended its cycle
        assert summary[m]["n"] == 4
        errors = [abs(r[f"restart_{m}"] - r["exact"]) / r["exact"] for r in result["records"]]
        assert summary[m]["median"] == pytest.approx(statistics.median(errors))
    assert any(r["restart_2"] != r["restart_3"] for r in result["records"])
    with pytest.raises(SystemExit):
        monitor_tracking.main(["--runs", "mlp-gd", "--restarts", "1,3"])


def test_exact_top_matches_a_dense_eigendecomposition():
    setup = _monitor_common.make_setup("mlp-gd", 0.5, quick=True)
    setup.model = torch.nn.Sequential(torch.nn.Linear(64, 3), torch.nn.Tanh(), torch.nn.Linear(3, 10))
    setup.optimizer = torch.optim.Adam(setup.model.parameters(), lr=1e-2)
    batch = setup.batch(0)
    setup.optimizer.zero_grad()
    setup.loss(setup.model, batch).backward()
    setup.optimizer.step()  # P exists now
    model = setup.model.double()
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(vector):
        chunks, i = [], 0
        for p in params:
            chunks.append(vector[i:i + p.numel()].reshape(p.shape))
            i += p.numel()
        x, y = (t.double() for t in batch)
        h = torch.tanh(x @ chunks[0].T + chunks[1])
        return 0.5 * (h @ chunks[2].T + chunks[3] - y).square().sum(dim=1).mean()

    hessian = torch.autograd.functional.hessian(loss_of, flat)
    setup.model.float()
    exact = _monitor_common.ExactTop(setup)
    assert exact(batch) == pytest.approx(float(torch.linalg.eigvalsh(hessian)[-1]), rel=1e-6)
    found = _monitor_common.opt_info.preconditioner(setup.optimizer, [list(setup.model.parameters())], [1.0])
    scale = torch.cat([p.double().reshape(-1) for p in found]).rsqrt()
    expected = float(torch.linalg.eigvalsh(scale[:, None] * hessian * scale[None, :])[-1])
    assert exact(batch, preconditioned=True, key="p") == pytest.approx(expected, rel=1e-6)


def test_monitor_warning_classifies_runs(tmp_path):
    out = tmp_path / "warning.json"
    assert monitor_warning.main(["--case", "mlp-gd=0.05,3", "--quick", "--steps", "30", "--json", str(out)]) == 0
    runs = {r["lr"]: r for r in json.loads(out.read_text())["runs"]}
    assert not runs[0.05]["diverged"] and runs[0.05]["spike"] is None and runs[0.05]["steps"] == 30
    blown = runs[3.0]
    assert blown["diverged"] and blown["spike"] is not None and blown["steps"] < 30  # stopped once blown up
    assert blown["lead"] is None or blown["lead"] == blown["spike"] - blown["warning"]
    assert blown["onset"] is not None and blown["onset"] <= blown["steps"] - 1
    summary = json.loads(out.read_text())["summary"]["mlp-gd"]
    assert summary["diverging"] == 1 and summary["stable"] == 1
