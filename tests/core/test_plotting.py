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
    assert [text.get_text() for text in figure.legends[0].get_texts()][:2] == ["constant", "tuned"]
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


# -- TensorBoard logs ------------------------------------------------------------------------------------------


def write_events(folder, t: dict[str, np.ndarray], *, prefix: str = "eos/", loss_tag: str = "eos/loss",
                 as_tensors: bool = False) -> None:
    """An event file as Lightning's TensorBoardLogger / the HF Trainer write it (sharpness every EVERY steps)."""
    tensorboard = pytest.importorskip("tensorboard")  # noqa: F841
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    def value(tag: str, x: float):
        if not as_tensors:
            return summary_pb2.Summary.Value(tag=tag, simple_value=float(x))
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[float(x)],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto())
        plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        metadata = summary_pb2.SummaryMetadata(plugin_data=plugin)
        return summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=metadata)

    folder.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(folder))
    for i in range(STEPS):
        values = [value(loss_tag, t["loss"][i]), value(prefix + "lr", t["lr"][i]), value("epoch", 0.0)]
        if i % EVERY == 0:
            values += [value(prefix + "sharpness", t["sharpness"][i]),
                       value(prefix + "lr_sharpness", t["lr_sharpness"][i])]
        writer.add_event(event_pb2.Event(step=i, wall_time=1000.0 + i, summary=summary_pb2.Summary(value=values)))
    writer.close()


def test_tensorboard_log_of_one_run_lightning_layout(tmp_path):
    t = trajectory()
    write_events(tmp_path / "lightning_logs" / "version_0", t)
    for source in (tmp_path / "lightning_logs", tmp_path / "lightning_logs" / "version_0",
                   str(tmp_path / "lightning_logs")):
        data = read_history(source)
        np.testing.assert_array_equal(data["step"], np.arange(STEPS))
        np.testing.assert_allclose(data["loss"], t["loss"], rtol=1e-6)
        np.testing.assert_allclose(data["lr"], t["lr"], rtol=1e-6)
        assert np.isnan(data["sharpness"][1]) and np.isfinite(data["sharpness"][0])
    event_file = next((tmp_path / "lightning_logs" / "version_0").glob("events.out.tfevents.*"))
    np.testing.assert_allclose(read_history(event_file)["lr"], t["lr"], rtol=1e-6)  # one event file works too
    check_figure(plot_edge_of_stability(tmp_path / "lightning_logs"))


def test_tensorboard_directory_with_several_runs_hugging_face_tags(tmp_path):
    runs_dir = tmp_path / "runs"
    # the HF Trainer's TensorBoardCallback prefixes train/ to the logged names
    write_events(runs_dir / "May01_10-00-00_host", trajectory(1.0), prefix="train/eos/", loss_tag="train/loss")
    write_events(runs_dir / "May01_11-00-00_host", trajectory(1.5), prefix="train/eos/", loss_tag="train/loss",
                 as_tensors=True)  # TensorFlow 2 summaries store scalars as tensors
    runs = read_runs(runs_dir)
    assert list(runs) == ["May01_10-00-00_host", "May01_11-00-00_host"]
    np.testing.assert_allclose(runs["May01_11-00-00_host"]["lr"], trajectory(1.5)["lr"], rtol=1e-6)
    np.testing.assert_allclose(runs["May01_10-00-00_host"]["loss"], trajectory(1.0)["loss"], rtol=1e-6)
    figure = plot_edge_of_stability(runs_dir)
    check_figure(figure, runs=2)
    assert [text.get_text() for text in figure.legends[0].get_texts()][:2] == list(runs)
    with pytest.raises(ValueError, match="2 TensorBoard runs"):
        read_history(runs_dir)  # one history cannot hold two runs: say so


def test_plot_command_reads_a_tensorboard_directory(tmp_path, capsys):
    from eos_core.cli import main

    write_events(tmp_path / "runs" / "a", trajectory())
    write_events(tmp_path / "runs" / "b", trajectory(0.5))
    image = tmp_path / "eos.png"
    assert main(["plot", str(tmp_path / "runs"), "--out", str(image)]) == 0
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_without_event_files_is_a_value_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no TensorBoard event file"):
        read_history(tmp_path / "empty")


def test_without_tensorboard_the_error_names_the_extra(tmp_path):
    write_events(tmp_path / "run", trajectory())
    code = ("import sys\nsys.modules['tensorboard'] = None\n"
            "from eos_core.plotting import read_history\n"
            f"try:\n    read_history({str(tmp_path / 'run')!r})\n"
            "except ImportError as e:\n    print('IMPORTERROR', e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "IMPORTERROR" in result.stdout, result.stdout + result.stderr
    assert "eos-core[tensorboard]" in result.stdout


# -- a figure a reader can read ----------------------------------------------------------------------------------


def alternating(steps: int = 80) -> dict[str, np.ndarray]:
    """The greedy rule's signature: an lr that flips between two levels every step, sharpness every 5 steps."""
    step = np.arange(steps)
    lr = np.where(step % 2 == 0, 0.2, 0.5) * np.exp(-step / 200)
    sharpness = np.where(step % 5 == 0, 6.0 + step / 40, np.nan)
    return {"step": step, "loss": np.exp(-step / 30), "lr": lr, "sharpness": sharpness}


def test_an_alternating_series_is_drawn_faint_with_its_two_step_geometric_mean():
    t = alternating()
    steady = {"step": t["step"], "loss": t["loss"] * 1.1, "lr": np.full(80, 0.3), "sharpness": t["sharpness"] * 0.9}
    figure = plot_edge_of_stability({"greedy": t, "constant": steady})
    lr_lines = figure.axes[1].get_lines()
    raw = [line for line in lr_lines if line.get_alpha() is not None and line.get_alpha() < 0.5]
    assert len(raw) == 1, "the alternating lr is drawn faint step by step"
    np.testing.assert_allclose(raw[0].get_ydata(), t["lr"])
    bold = [line for line in lr_lines if line.get_alpha() is None and np.asarray(line.get_ydata()).size == 79]
    assert len(bold) == 1
    np.testing.assert_allclose(bold[0].get_ydata(), np.sqrt(t["lr"][1:] * t["lr"][:-1]))
    np.testing.assert_allclose(bold[0].get_xdata(), np.arange(79) + 0.5)
    # the steady run is drawn as it is, above the faint band
    steady_line = [line for line in lr_lines if np.allclose(np.asarray(line.get_ydata(), float), 0.3)]
    assert len(steady_line) == 1 and steady_line[0].get_zorder() > raw[0].get_zorder()
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert any("mean of 2 consecutive steps" in text for text in legend)
    # its 2/lr threshold is the 2-step mean too: 2 / geometric mean(lr) = geometric mean(2 / lr)
    thresholds = [np.asarray(line.get_ydata(), float) for line in figure.axes[2].get_lines()
                  if line.get_linestyle() == ":"]
    assert any(v.size == 79 and np.allclose(v, 2.0 / np.sqrt(t["lr"][1:] * t["lr"][:-1])) for v in thresholds)


def test_a_non_alternating_series_is_drawn_as_it_is():
    from eos_core.plotting import alternates

    t = trajectory()
    assert not alternates(t["lr"]) and not alternates(np.exp(-np.arange(50.0)))
    assert alternates(alternating()["lr"])
    assert not alternates(np.where(np.arange(50) % 2 == 0, 1.0, 1.01))  # flips of 1%: no band to hide anything
    figure = plot_edge_of_stability(t)
    assert all(line.get_alpha() is None for line in figure.axes[1].get_lines())


def test_threshold_lines_are_labelled_in_their_runs_colour():
    runs = {"a": trajectory(1.0), "b": trajectory(1.5), "c": trajectory(2.0)}
    figure = plot_edge_of_stability(runs)
    sharp = figure.axes[2]
    labels = [text for text in sharp.texts if text.get_text() == "2/lr"]
    assert len(labels) == 3
    run_colours = [line.get_color() for line in figure.legends[0].get_lines()][:3]
    assert sorted(text.get_color() for text in labels) == sorted(run_colours)
    assert any("2/lr" in text.get_text() for text in sharp.get_legend().get_texts())


def test_runs_differ_in_colour_line_style_and_marker():
    runs = {name: trajectory(1.0 + 0.2 * i) for i, name in enumerate("abcdef")}
    figure = plot_edge_of_stability(runs)
    handles = figure.legends[0].get_lines()[:6]  # the runs come first (then the note on alternating series)
    assert len({h.get_color() for h in handles}) == 6
    dashes = {str(h._unscaled_dash_pattern) for h in handles}  # (offset, on-off sequence) of each line style
    assert len(dashes) >= 5
    assert len({h.get_marker() for h in handles}) == 6
    from eos_core.plotting import PALETTE

    assert [h.get_color() for h in handles] == list(PALETTE[:6])


def test_spikes_above_the_lr_sharpness_panel_are_marked():
    t = trajectory()
    spiky = dict(t)
    spiky["lr_sharpness"] = np.where(np.arange(STEPS) % EVERY == 0, 2.0, np.nan)
    spiky["lr_sharpness"][[0, 3]] = [40.0, 25.0]  # early spikes, far above the edge
    figure = plot_edge_of_stability({"spiky": spiky, "calm": t})
    ax = figure.axes[3]
    top = ax.get_ylim()[1]
    assert top < 25.0, "the spikes must not squash the panel"
    marks = [c for c in ax.collections if len(c.get_offsets())]
    assert sum(len(c.get_offsets()) for c in marks) == 2
    np.testing.assert_allclose(sorted(np.asarray(marks[0].get_offsets())[:, 0]), [0.0, 3.0])
    notes = [text.get_text() for text in ax.texts]
    assert any("2 values above" in note and "max 40" in note for note in notes), notes


def test_nothing_is_cut_when_every_value_fits():
    t = trajectory()
    t = dict(t, lr_sharpness=np.where(np.arange(STEPS) % EVERY == 0, 5.5, np.nan))  # high, but below 3 x 2
    ax = plot_edge_of_stability(t).axes[3]
    assert ax.get_ylim()[1] >= 5.5 and not ax.collections and not [x for x in ax.texts if "above" in x.get_text()]
