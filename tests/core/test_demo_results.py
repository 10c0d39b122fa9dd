"""The demo's backend-neutral parts: method names, summary figures, best constant, CSV, claim checks, progress bar."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from eos_core import CDAT, Armijo, Constant
from eos_core.demo import claims
from eos_core.demo.data import standardise
from eos_core.demo.methods import DEFAULT_GRID, Method, parse_grid, parse_methods
from eos_core.demo.models import ModelSpec, init_params, num_params
from eos_core.demo.progress import ProgressBar
from eos_core.demo.results import (
    Trajectory,
    best_constant,
    format_table,
    read_trajectories_csv,
    write_summary_csv,
    write_trajectories_csv,
)


def run(method: Method, loss, lr, sharpness=None, *, stopped: bool = False, planned: int | None = None) -> Trajectory:
    loss = np.asarray(loss, float)
    n = loss.size
    lr = np.broadcast_to(np.asarray(lr, float), (n,)).copy()
    sharpness = np.full(n, np.nan) if sharpness is None else np.asarray(sharpness, float)
    return Trajectory(method, np.arange(n), loss, lr, sharpness, lr * sharpness, 1.0, planned or n, stopped)


def test_methods_expand_the_grid_and_name_the_laws():
    methods = parse_methods("gd,armijo,cdat1,cdat2,cdat=2.0625")
    assert [m.label for m in methods] == [*(f"GD lr={v:g}" for v in DEFAULT_GRID), "Armijo", "CDAT(scale=1)",
                                          "CDAT(scale=2)", "CDAT(scale=2.0625)"]
    assert methods[0].law() == Constant(0.25)
    assert methods[len(DEFAULT_GRID)].law() == Armijo()
    assert methods[-1].law() == CDAT(scale=2.0625)
    assert all(Method.from_label(m.label) == m for m in methods)
    assert parse_methods("cdat2, cdat=2") == [Method("cdat", 2.0)]  # duplicates dropped
    assert parse_grid("1,0.5,1") == (0.5, 1.0)


@pytest.mark.parametrize("text", ["", "sgd", "cdat=x", "cdat=-1", "cdat=inf"])
def test_bad_method_names_raise_value_error_naming_the_option(text):
    with pytest.raises(ValueError, match="--methods"):
        parse_methods(text)


@pytest.mark.parametrize("text", ["", "a", "0", "-1", "nan", "inf"])
def test_bad_grids_raise_value_error_naming_the_option(text):
    with pytest.raises(ValueError, match="--lr-grid"):
        parse_grid(text)


def test_standardise_leaves_constant_features_at_zero():
    x = np.array([[1.0, 5.0, 0.0], [3.0, 5.0, 2.0], [5.0, 5.0, 4.0]])
    z = standardise(x)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-15)
    np.testing.assert_allclose(z.std(0), [1.0, 0.0, 1.0])


def test_initial_weights_follow_torch_default_bounds_and_are_seeded():
    spec = ModelSpec(arch="mlp", width=16)
    params = init_params(spec, 64, 10, seed=0)
    assert [p.shape for p in params] == [(16, 64), (16,), (16, 16), (16,), (10, 16), (10,)]
    for weight, fan_in in zip(params[::2], (64, 16, 16), strict=True):
        assert np.abs(weight).max() <= 1 / np.sqrt(fan_in)
        assert np.abs(weight).max() > 0.9 / np.sqrt(fan_in)  # uniform over the whole interval
    assert all(np.array_equal(a, b) for a, b in zip(params, init_params(spec, 64, 10, seed=0), strict=True))
    assert not np.array_equal(params[0], init_params(spec, 64, 10, seed=1)[0])
    cnn = init_params(ModelSpec(arch="cnn", width=4), 64, 10, seed=0, image_shape=(8, 8))
    assert [p.shape for p in cnn] == [(4, 1, 3, 3), (4,), (4, 4, 3, 3), (4,), (10, 16), (10,)]
    assert num_params(cnn) == 36 + 4 + 144 + 4 + 160 + 10
    with pytest.raises(ValueError, match="image"):
        init_params(ModelSpec(arch="cnn"), 40, 10, seed=0)
    with pytest.raises(ValueError, match="arch"):
        ModelSpec(arch="resnet")


def test_summary_figures_best_constant_and_divergence():
    steps = 20
    decay = np.exp(-0.1 * np.arange(steps))
    runs = [
        run(Method("gd", 0.5), decay, 0.5),
        run(Method("gd", 1.0), 0.5 * decay, 1.0),  # the best constant
        run(Method("gd", 2.0), [1.0, 5.0, np.inf], 2.0, stopped=True, planned=steps),  # blew up
        run(Method("gd", 4.0), np.full(steps, 1.0), 4.0),  # no progress: diverged too
        run(Method("cdat", 2.0), 0.1 * decay, np.linspace(1, 2, steps), np.full(steps, 1.0)),
    ]
    assert [r.diverged for r in runs] == [False, False, True, True, False]
    assert best_constant(runs) is runs[1]
    assert runs[1].final_loss == pytest.approx(np.mean(0.5 * decay[-5:]))
    assert math.isinf(runs[2].final_loss)
    assert runs[4].final_lr == 2.0
    # second half of the steps only
    assert runs[4].median_lr_sharpness == pytest.approx(np.median(np.linspace(1, 2, steps)[10:]))
    table = format_table(runs)
    lines = table.splitlines()
    assert lines[0].split("  ")[0].strip() == "method" and "median lr*sharpness" in lines[0]
    assert "GD lr=1  (best constant)" in table
    assert "diverged at step 2" in lines[4] and "diverged" in lines[5]
    assert best_constant(runs[2:4]) is None


def test_trajectories_csv_round_trip(tmp_path):
    steps = 12
    sharp = np.where(np.arange(steps) % 5 == 0, 3.0, np.nan)
    runs = [run(Method("gd", 0.5), np.linspace(1, 0.5, steps), 0.5, sharp),
            run(Method("cdat", 2.0625), np.linspace(1, 0.2, steps), np.linspace(0.1, 1, steps), sharp),
            run(Method("gd", 8.0), [1.0, 1e9], 8.0, stopped=True, planned=steps)]
    path = write_trajectories_csv(runs, tmp_path / "t.csv")
    header = path.read_text().splitlines()[0]
    assert header == "method,step,loss,lr,sharpness,lr_sharpness"
    back = read_trajectories_csv(path)
    assert [r.method for r in back] == [r.method for r in runs]
    for a, b in zip(runs, back, strict=True):
        for name in ("step", "loss", "lr", "sharpness", "lr_sharpness"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))  # NaN <-> empty cell, exact floats
    assert back[2].stopped and back[2].diverged and not back[0].stopped
    summary = write_summary_csv(runs, tmp_path / "s.csv").read_text().splitlines()
    assert summary[0].split(",")[:4] == ["method", "final_train_loss", "final_lr", "median_lr_sharpness"]
    assert summary[1].endswith(",0,1")  # GD lr=0.5: not diverged, the best constant


def edge_run(eta: float, steps: int = 200, ratio: float = 1.0, start: float = 0.3) -> Trajectory:
    """Constant lr: sharpness rises from start * 2/eta to ratio * 2/eta by mid-run, then stays."""
    t = np.arange(steps)
    sharp = (2.0 / eta) * np.minimum(start + (ratio - start) * t / (steps / 2), ratio)
    sharp[t % 5 != 0] = np.nan
    return run(Method("gd", eta), np.exp(-t / (100 * eta)) + 0.01 / eta, eta, sharp)


def test_b1_passes_at_the_edge_and_fails_away_from_it():
    verdict = claims.check_b1([edge_run(0.5), edge_run(1.0, ratio=1.05)])
    assert verdict.passed, verdict.report()
    assert verdict.figures["lr=1 median sharpness / (2/lr)"] == pytest.approx(1.05)
    assert not claims.check_b1([edge_run(0.5), edge_run(1.0, ratio=1.3)]).passed
    never = claims.check_b1([edge_run(0.5, ratio=0.5)])  # never reaches the edge
    assert not never.passed and "did not reach" in never.report()
    unmeasured = claims.check_b1([run(Method("gd", 0.5), [1.0, 0.5], 0.5)])  # no sharpness: not "above the edge"
    assert "no lambda_max was measured" in unmeasured.report() and "above the edge" not in unmeasured.report()


def test_a_run_that_recorded_no_step_counts_as_diverged_instead_of_crashing():
    empty = run(Method("cdat", 2.0), [], 0.1)
    assert empty.diverged and math.isinf(empty.final_loss)
    assert not run(Method("cdat", 2.0), [1.0, 0.5, 0.4], 0.1).diverged
    assert run(Method("cdat", 2.0), [1.0, math.nan], 0.1).diverged


def greedy_run(kind: str, steps: int = 200, fall: float = 20.0, growth: float = 1.5, loss_factor: float = 2.0):
    t = np.arange(steps)
    lr = np.exp(-np.log(fall) * t / (steps - 1))
    sharp = np.where(t % 5 == 0, 2.0 / lr[0] * np.linspace(1, growth * 2, steps), np.nan)
    method = Method("armijo") if kind == "armijo" else Method("cdat", 1.0 if kind == "greedy" else 2.0)
    return run(method, loss_factor * np.exp(-t / 100), lr, sharp)


def test_b2_and_b3_figures():
    best = run(Method("gd", 0.5), np.exp(-np.arange(200) / 100), 0.5)
    passing = [best, greedy_run("armijo"), greedy_run("greedy")]
    assert claims.check_b2(passing).passed
    assert claims.lr_fall(passing[1]) == pytest.approx(20.0, rel=0.2)
    assert not claims.check_b2([best, greedy_run("armijo", fall=3.0), greedy_run("greedy")]).passed
    assert not claims.check_b2([best, greedy_run("armijo", loss_factor=0.9), greedy_run("greedy")]).passed

    t = np.arange(200)
    lr = np.minimum(0.5 + t / 20, 2.0)  # a warm-up from 0.5 to 2
    on_edge = run(Method("cdat", 2.0), 0.5 * np.exp(-t / 100), lr, np.where(t % 5 == 0, 2.0 / lr, np.nan))
    verdict = claims.check_b3([best, on_edge])
    assert verdict.passed, verdict.report()
    assert verdict.figures["CDAT(scale=2) warm-up"] == pytest.approx(4.0)
    worse = run(Method("cdat", 2.0), 2.0 * np.exp(-t / 100), lr, np.where(t % 5 == 0, 2.0 / lr, np.nan))
    assert not claims.check_b3([best, worse]).passed
    assert not claims.check_b3([on_edge]).passed  # no constant lr to compare with


def test_progress_bar_redraws_on_a_terminal_and_writes_one_line_elsewhere():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    log = io.StringIO()
    bar = ProgressBar("CDAT(scale=2)", 10, position="[1/2]", stream=log)
    for i in range(1, 11):
        bar.update(i, f"loss {1 / i:.3g}")
    bar.close("done")
    assert log.getvalue().count("\n") == 1 and "\r" not in log.getvalue()
    assert "[1/2] CDAT(scale=2)" in log.getvalue() and "10/10" in log.getvalue() and "done" in log.getvalue()

    terminal = Terminal()
    bar = ProgressBar("GD", 4, stream=terminal)
    bar.update(4, "x")
    bar.close()
    assert terminal.getvalue().count("\r") == 2 and "|" + "#" * 24 + "|" in terminal.getvalue()

    silent = io.StringIO()
    bar = ProgressBar("GD", 4, stream=silent, enabled=False)
    bar.update(2)
    bar.close()
    assert silent.getvalue() == ""
