"""The edge-of-stability figure from every history format the trainers produce (numpy + matplotlib only)."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import numpy as np
import pytest

from eos_core.plotting import read_history, read_runs

matplotlib = pytest.importorskip("matplotlib")

from eos_core.plotting import plot_edge_of_stability  # noqa: E402

STEPS = 30
EVERY = 3  # sharpness measured every 3 steps, NaN (or absent) in between


def trajectory(scale: float = 1.0) -> dict[str, np.ndarray]:
    step = np.arange(STEPS)
    lr = scale * (0.5 + 0.01 * step)
    sharpness = np.where(step % EVERY == 0, 2.0 / lr * (1 + 0.05 * np.sin(step)), np.nan)
    return {"step": step, "loss": np.exp(-0.1 * step), "lr": lr, "sharpness": sharpness,
            "lr_sharpness": lr * sharpness}


def torch_diagnostics(t: dict[str, np.ndarray]) -> list[dict]:
    """What ``tuner.diagnostics`` holds after each step: tracked keys only on tracking steps, a route name."""
    records = []
    for i in range(STEPS):
        record = {"step": i, "lr": t["lr"][i], "loss": t["loss"][i], "route": "double-backward", "skipped": 0.0}
        if i % EVERY == 0:
            record.update(sharpness=t["sharpness"][i], lr_sharpness=t["lr_sharpness"][i])
        records.append(record)
    return records


def prefixed(t: dict[str, np.ndarray], prefix: str = "eos/") -> dict[str, list[float]]:
    return {prefix + k: list(map(float, v)) for k, v in t.items() if k != "step"}


def edge_lines(figure, edge: float = 2.0) -> list:
    ax = figure.axes[3]
    return [line for line in ax.get_lines() if np.allclose(np.asarray(line.get_ydata(), float), edge)]


def plotted(ax) -> list[np.ndarray]:
    return [np.asarray(line.get_ydata(), float) for line in ax.get_lines()]


def check_figure(figure, runs: int = 1) -> None:
    assert len(figure.axes) == 4
    titles = [ax.get_title() for ax in figure.axes]
    assert titles[0] == "train loss" and titles[1] == "learning rate"
    assert "sharpness" in titles[2] and "2/lr" in titles[2] and "sharpness" in titles[3]
    assert len(edge_lines(figure)) == 1, "the line at 2 in the lr * sharpness panel"
    # every curve is drawn through its measured points only: no NaN reaches matplotlib
    for ax in figure.axes:
        for values in plotted(ax):
            assert np.isfinite(values).all()
    sharp_panel = plotted(figure.axes[2])
    measured = [v for v in sharp_panel if v.size == math.ceil(STEPS / EVERY)]
    assert len(measured) == runs, [v.size for v in sharp_panel]  # sharpness: only the measured steps
    thresholds = [v for v in sharp_panel if v.size == STEPS]
    assert len(thresholds) == runs  # 2/lr on every step


def test_list_of_diagnostics_dicts():
    t = trajectory()
    figure = plot_edge_of_stability(torch_diagnostics(t))
    check_figure(figure)
    loss_line = figure.axes[0].get_lines()[0]
    np.testing.assert_allclose(loss_line.get_ydata(), t["loss"])
    two_over_lr = [v for v in plotted(figure.axes[2]) if v.size == STEPS][0]
    np.testing.assert_allclose(two_over_lr, 2.0 / t["lr"])
    assert figure.axes[0].get_yscale() == "log"


def test_dict_of_lists_and_keras_history_object():
    t = trajectory()
    history = {"loss": list(t["loss"]), **{k: v for k, v in prefixed(t).items() if k != "eos/loss"}}
    check_figure(plot_edge_of_stability(history))

    class History:  # keras.callbacks.History keeps the per-epoch logs in .history
        pass

    keras_history = History()
    keras_history.history = history
    check_figure(plot_edge_of_stability(keras_history))


def test_hugging_face_log_history_merges_entries_of_one_step():
    t = trajectory()
    log_history = []
    for i in range(STEPS):
        entry = {"loss": t["loss"][i] * 1.01, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": i / STEPS,
                 "step": i + 1, "eos/lr": t["lr"][i], "eos/loss": t["loss"][i]}
        if i % EVERY == 0:
            entry.update({"eos/sharpness": t["sharpness"][i], "eos/lr_sharpness": t["lr_sharpness"][i]})
        log_history.append(entry)
        if i % 10 == 9:  # an evaluation entry at the same step
            log_history.append({"eval_loss": 0.3, "epoch": i / STEPS, "step": i + 1})
    log_history.append({"train_runtime": 1.0, "train_loss": 0.2, "epoch": 1.0, "step": STEPS})

    class TrainerState:
        pass

    state = TrainerState()
    state.log_history = log_history
    for source in (log_history, state):
        data = read_history(source)
        np.testing.assert_array_equal(data["step"], np.arange(1, STEPS + 1))
        np.testing.assert_allclose(data["lr"], t["lr"])  # eos/lr, not the scheduler's learning_rate
        np.testing.assert_allclose(data["loss"][:-1], t["loss"][:-1])  # eos/loss first
        check_figure(plot_edge_of_stability(source))


def test_lightning_csv_logger_file(tmp_path):
    """metrics.csv as Lightning's CSVLogger writes it: one row per logging call, empty cells, extra columns."""
    t = trajectory()
    path = tmp_path / "metrics.csv"
    header = ["epoch", "eos/loss", "eos/lr", "eos/lr_sharpness", "eos/route_code", "eos/sharpness", "step",
              "train_loss_epoch", "train_loss_step"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i in range(STEPS):
            measured = i % EVERY == 0
            writer.writerow([0, t["loss"][i], t["lr"][i], t["lr_sharpness"][i] if measured else "", 1,
                             t["sharpness"][i] if measured else "", i, "", t["loss"][i]])
            if i % 10 == 9:
                writer.writerow([0, "", "", "", "", "", i, 0.5, ""])  # the epoch-end row at the same step
    data = read_history(path)
    np.testing.assert_array_equal(data["step"], np.arange(STEPS))
    np.testing.assert_allclose(data["loss"], t["loss"])
    assert np.isnan(data["sharpness"][1]) and np.isfinite(data["sharpness"][0])
    check_figure(plot_edge_of_stability(path))
    check_figure(plot_edge_of_stability(str(path)))


def test_dataframe_and_several_runs_in_one_figure(tmp_path):
    pd = pytest.importorskip("pandas")
    runs = {"constant": trajectory(1.0), "tuned": trajectory(1.5)}
    frames = {name: pd.DataFrame(t) for name, t in runs.items()}
    check_figure(plot_edge_of_stability(frames["tuned"]))
    figure = plot_edge_of_stability(frames)
    check_figure(figure, runs=2)
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["constant", "tuned"]
    # one long table with a run column (the demo's trajectories.csv) is split on it
    long = pd.concat([frame.assign(method=name) for name, frame in frames.items()])
    assert list(read_runs(long)) == ["constant", "tuned"]
    path = tmp_path / "trajectories.csv"
    long.to_csv(path, index=False)
    check_figure(plot_edge_of_stability(path), runs=2)


def test_mapping_of_mixed_formats_and_saving(tmp_path):
    t = trajectory()
    runs = {"torch": torch_diagnostics(t), "keras": prefixed(trajectory(0.8))}
    path = tmp_path / "figure.png"
    figure = plot_edge_of_stability(runs, path=path, title="two runs")
    check_figure(figure, runs=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure._suptitle.get_text() == "two runs"


def test_missing_lr_sharpness_is_computed_and_keys_override():
    t = trajectory()
    history = {"my_loss": t["loss"], "lr": t["lr"], "sharpness": t["sharpness"]}
    data = read_history(history, keys={"loss": "my_loss"})
    np.testing.assert_allclose(data["lr_sharpness"], t["lr"] * t["sharpness"])
    np.testing.assert_allclose(data["loss"], t["loss"])
    check_figure(plot_edge_of_stability(history, keys={"loss": "my_loss"}))


def test_a_history_without_sharpness_still_draws_four_panels():
    history = {"loss": [1.0, 0.5, 0.25], "lr": [0.1, 0.1, 0.1]}
    figure = plot_edge_of_stability(history)
    assert len(figure.axes) == 4 and len(edge_lines(figure)) == 1
    assert any("not logged" in text.get_text() for text in figure.axes[2].texts)


@pytest.mark.parametrize("bad, message", [
    ([], "empty"),
    ([1.0, 2.0], "one diagnostics dict per step"),
    ({"accuracy": [0.1, 0.2]}, "none of loss, lr, sharpness"),
    ({"loss": [1.0], "note": ["a"]}, "lists of numbers"),
    (42, "cannot read a history"),
    ({"loss": [1.0, 0.5], "lr": [0.1]}, "different lengths"),
])
def test_unreadable_histories_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        plot_edge_of_stability(bad)


def test_bad_settings_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="edge"):
        plot_edge_of_stability({"loss": [1.0]}, edge=0.0)
    with pytest.raises(ValueError, match="keys"):
        read_history({"loss": [1.0]}, keys={"loss": "missing"})
    with pytest.raises(ValueError, match="no CSV file"):
        read_history(tmp_path / "nothing.csv")


def test_without_matplotlib_the_error_names_the_plot_extra():
    code = ("import sys\nsys.modules['matplotlib'] = None\nsys.modules['matplotlib.figure'] = None\n"
            "from eos_core.plotting import plot_edge_of_stability\n"
            "try:\n    plot_edge_of_stability({'loss': [1.0, 0.5]})\n"
            "except ImportError as e:\n    print('IMPORTERROR', e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "IMPORTERROR" in result.stdout, result.stdout + result.stderr
    assert "eos-core[plot]" in result.stdout
