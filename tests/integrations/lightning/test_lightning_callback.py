"""EdgeOfStabilityCallback in a real Lightning Trainer on scikit-learn digits (CPU, no downloads)."""

import csv
import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning_helpers import DigitsMLP, Recorder, digits, full_loss, loader, measured, same_diagnostics, trainer

from eos_core import CDAT, Constant, Polyak
from eos_core.adapters.torch import CurvatureTuner
from eos_core.integrations.lightning import EdgeOfStabilityCallback

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(does not have many workers|LeafSpec|litlogger|GPU available|TPU available|smaller than the logging "
    "interval).*")

FULL_BATCH = 512


def fit(tmp_path, eos, *, model=None, max_steps=12, batch_size=FULL_BATCH, ckpt_path=None, data=None, before=(),
        after=(), **trainer_kwargs):
    """Fit with the callbacks ``[*before, eos, recorder, *after]``."""
    model = model if model is not None else DigitsMLP()
    recorder = Recorder(eos)
    data = data if data is not None else digits()
    run = trainer(tmp_path, [*before, eos, recorder, *after], max_steps=max_steps, **trainer_kwargs)
    run.fit(model, loader(data, batch_size), ckpt_path=ckpt_path)
    return run, model, recorder


def test_loss_falls_and_every_logger_gets_the_diagnostics(tmp_path):
    data = digits()
    model = DigitsMLP()
    before = full_loss(model, data)
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0), sharpness_every=3, fd_above=None)  # auto stays exact
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    run, model, recorder = fit(tmp_path, eos, model=model, logger=loggers)

    assert full_loss(model, data) < 0.5 * before
    assert all(s["route"] == "double-backward" and s["skipped"] == 0 for s in recorder.steps)
    assert recorder.lrs()[0] != pytest.approx(0.05)  # the law's lr, not the optimizer's

    # CSV: one row per step with the tuner's values. sharpness on every step: measured exactly on the tracked steps
    # 0, 3, 6, 9 (no monitor residual there), the sharpness monitor's latest estimate (on by default) in between
    with open(loggers[0].experiment.metrics_file_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("eos/lr")]
    assert [int(r["step"]) for r in rows] == list(range(12))
    assert [float(r["eos/lr"]) for r in rows] == pytest.approx(recorder.lrs(), rel=1e-6)
    assert all(r.get("eos/sharpness") for r in rows)
    tracked = [i for i, r in enumerate(rows) if not r.get("eos/sharpness_residual")]
    assert tracked == [0, 3, 6, 9]
    for i, row in enumerate(rows):
        assert float(row["eos/lr_sharpness"]) == pytest.approx(
            recorder.steps[i]["lr"] * recorder.steps[i]["sharpness"], rel=1e-5)
        assert float(row["eos/unstable"]) == 0.0 and float(row["eos/edge"]) == 2.0  # SGD: lr * lambda_max < 2
    assert {"eos/numerator", "eos/denominator", "eos/grad_norm", "eos/loss"} <= set(rows[0])

    # TensorBoard event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(loggers[1].log_dir)
    events.Reload()
    assert {"eos/lr", "eos/sharpness", "eos/lr_sharpness", "eos/denominator"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("eos/lr")] == pytest.approx(recorder.lrs(), rel=1e-6)

    # progress bar: the applied lr and the monitor's warning
    assert "eos/lr" in run.progress_bar_metrics and run.progress_bar_metrics["eos/unstable"] == 0.0


def test_loggers_writing_every_few_steps_get_the_measurements_in_between(tmp_path):
    # Lightning writes at steps 3, 7, 11 (log_every_n_steps=4); the step 5 loss is NaN (skipped) and sharpness is
    # tracked every 3 steps (0, 3, 6, 9; 0, 3, 7, 10 when the tuner's step index leaves the skipped step out): each
    # write carries the latest measurement since the previous one
    model = DigitsMLP()
    model.poison_batches = {5}
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0), sharpness_every=3)
    with pytest.warns(RuntimeWarning, match="step 5 skipped"):
        _, _, recorder = fit(tmp_path, eos, model=model, logger=CSVLogger(tmp_path), log_every_n_steps=4)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f) if r.get("eos/lr")}
    assert sorted(rows) == [3, 7, 11]
    # per write, the last sharpness measured in the steps since the previous write (each window has one)
    sharpness = [[measured(s, "sharpness") for s in recorder.steps[start:end]] for start, end in ((0, 4), (4, 8),
                                                                                                  (8, 12))]
    latest = [[v for v in window if v is not None][-1] for window in sharpness]
    assert [float(rows[t]["eos/sharpness"]) for t in (3, 7, 11)] == pytest.approx(latest, rel=1e-6)
    assert [float(rows[t]["eos/lr"]) for t in (3, 7, 11)] == pytest.approx(
        [recorder.steps[t]["lr"] for t in (3, 7, 11)], rel=1e-6)
    assert [float(rows[t]["eos/skipped"]) for t in (3, 7, 11)] == [0.0, 1.0, 0.0]  # steps skipped since the last


def test_probes_do_not_count_in_the_users_logged_metrics(tmp_path):
    eos = EdgeOfStabilityCallback(CDAT(scale=1.0, ema=0.9), sharpness_every=2)
    run, model, recorder = fit(tmp_path, eos, max_steps=8, batch_size=128)  # 4 batches per epoch
    assert model.training_step_calls > 8  # the probes did re-run training_step
    assert float(run.logged_metrics["batches_seen"]) == 4.0  # but their self.log calls were discarded
    last_epoch = [s["loss"] for s in recorder.steps[4:]]
    assert float(run.logged_metrics["train_loss_epoch"]) == pytest.approx(np.mean(last_epoch), rel=1e-5)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_from_a_checkpoint_continues_the_lr_trajectory(tmp_path, accumulate):
    def make():
        # EMA and probe_every=2: the lr depends on the tuner's state, not only on the current weights; the sharpness
        # monitor at a budget that makes it tick in the resumed part too (every 3 steps: two operators for Adam)
        return EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9), probe_every=2, sharpness_every=3,
                                       monitor_budget=1.0)

    def adam():
        return DigitsMLP(optimizer="adam", lr=1e-3)

    # With accumulation: 2 micro-batches of 128 per step, 2 steps per epoch, the checkpoint at the end of epoch 2
    # (the resumed fit must probe both micro-batches of its first step, though Lightning restores global_step
    # late). These fits stop by max_epochs: Lightning 2.6 resumes an end-of-epoch checkpoint under max_steps
    # with one extra batch of the finished epoch, which would shift the accumulation windows.
    if accumulate == 1:
        setup, stop, until, total = dict(batch_size=FULL_BATCH), 5, dict(max_steps=5), dict(max_steps=12)
    else:
        setup = dict(batch_size=128, accumulate_grad_batches=2, max_steps=-1)
        stop, until, total = 4, dict(max_epochs=2), dict(max_epochs=6)
    _, _, straight = fit(tmp_path / "a", make(), model=adam(), **total, **setup)
    first, _, first_recorder = fit(tmp_path / "b", make(), model=adam(), **until, **setup)
    path = tmp_path / "k.ckpt"
    first.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["optimizer_states"][0]["eos_core"]["step"] == stop
    _, _, resumed = fit(tmp_path / "c", make(), model=adam(), ckpt_path=path, **total, **setup)
    assert len(resumed.steps) == len(straight.steps) - stop

    assert resumed.lrs() == straight.lrs()[stop:]  # bit-identical
    np.testing.assert_array_equal(resumed.params[-1], straight.params[-1])
    # every diagnostic, the sharpness monitor's included (its trackers, credit and warning were resumed), and the
    # monitor ticked in the resumed part
    assert all(same_diagnostics(a, b) for a, b in zip(resumed.steps, straight.steps[stop:], strict=True))
    ticks = [recorder.eos.tuner.monitor.ticks for recorder in (first_recorder, resumed, straight)]
    assert ticks[0] < ticks[1] == ticks[2]

    # the same resume without the tuner's state (a plain optimizer checkpoint: none of its three copies, the
    # top-level key, the first param group's and the per-parameter entries) does not continue it
    checkpoint = torch.load(path, weights_only=True)
    optimizer_state = checkpoint["optimizer_states"][0]
    del optimizer_state["eos_core"]
    del optimizer_state["param_groups"][0]["eos_core"]
    for entry in optimizer_state["state"].values():
        for name in [n for n in entry if n.startswith("eos_core")]:
            del entry[name]
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    _, _, restarted = fit(tmp_path / "d", make(), model=adam(), ckpt_path=tmp_path / "plain.ckpt", **total, **setup)
    assert restarted.lrs() != straight.lrs()[stop:]


def test_gradient_accumulation_probes_the_accumulated_objective(tmp_path):
    # 2 micro-batches of 64 (accumulate_grad_batches=2) are one batch of 128: same gradient, same curvature
    law = dict(scale=1.0, ema=0.5)  # plain SGD at the greedy rule: float rounding is not amplified
    _, _, big = fit(tmp_path / "big", EdgeOfStabilityCallback(CDAT(**law), sharpness_every=2, fd_above=None),
                    model=DigitsMLP(lr=0.01), max_steps=6, batch_size=128)
    _, _, accumulated = fit(tmp_path / "acc", EdgeOfStabilityCallback(CDAT(**law), sharpness_every=2, fd_above=None),
                            model=DigitsMLP(lr=0.01), max_steps=6, batch_size=64,
                            accumulate_grad_batches=2)
    assert len(accumulated.steps) == 6
    for a, b in zip(accumulated.steps, big.steps, strict=True):
        assert a["denominator"] == pytest.approx(b["denominator"], rel=1e-4)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-4)
        if measured(b, "sharpness") is not None:
            assert a["sharpness"] == pytest.approx(b["sharpness"], rel=1e-3)
    np.testing.assert_allclose(accumulated.params[-1], big.params[-1], rtol=1e-3, atol=1e-4)


def test_accumulation_logs_the_loss_of_the_whole_step(tmp_path):
    eos = EdgeOfStabilityCallback(CDAT(scale=1.0))
    run, _, recorder = fit(tmp_path, eos, max_steps=2, batch_size=64, accumulate_grad_batches=2,
                           logger=CSVLogger(tmp_path))
    with open(run.logger.experiment.metrics_file_path) as f:
        logged = [float(r["eos/loss"]) for r in csv.DictReader(f) if r.get("eos/loss")]
    x, y = digits().tensors
    model = DigitsMLP()
    with torch.no_grad():  # the first step's objective: mean of the two micro-batch losses at the initial weights
        expected = float(torch.nn.functional.cross_entropy(model(x[:128]), y[:128]))
        last = float(torch.nn.functional.cross_entropy(model(x[64:128]), y[64:128]))
    assert logged[0] == pytest.approx(expected, rel=1e-5)
    # what Lightning's closure hands the tuner is only the last micro-batch's loss, divided by 2
    assert recorder.steps[0]["loss"] == pytest.approx(last / 2, rel=1e-5)


def test_gradient_clipping_bounds_the_gradient_the_tuner_sees(tmp_path):
    _, _, plain = fit(tmp_path / "plain", EdgeOfStabilityCallback(CDAT(scale=2.0)), max_steps=4)
    assert max(s["grad_norm"] for s in plain.steps) > 0.1
    _, model, clipped = fit(tmp_path / "clip", EdgeOfStabilityCallback(CDAT(scale=2.0)), max_steps=4,
                            gradient_clip_val=0.1, gradient_clip_algorithm="norm")
    assert all(s["grad_norm"] <= 0.1 * (1 + 1e-5) for s in clipped.steps)
    assert all(math.isfinite(s["lr"]) and s["lr"] > 0 for s in clipped.steps)
    # the update is the clipped gradient times the law's lr: the first step moved by lr * 0.1
    first_move = np.linalg.norm(clipped.params[0] - plain_initial_params())
    assert first_move == pytest.approx(clipped.steps[0]["lr"] * clipped.steps[0]["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_finite_differences_do_not_reuse_a_clipped_gradient(tmp_path, algorithm):
    # the clipped gradient is not the objective's: one-sided finite differences must evaluate g(w) again
    # (float64, so they agree with double backward to ~1e-7)
    runs = {}
    for route in ("double-backward", "fd-onesided"):
        eos = EdgeOfStabilityCallback(CDAT(scale=2.0), sharpness_every=2, route=route)
        _, _, runs[route] = fit(tmp_path / route, eos, model=DigitsMLP().double(), data=digits(dtype=torch.float64),
                                max_steps=3, gradient_clip_val=0.05, gradient_clip_algorithm=algorithm)
    for a, b in zip(runs["fd-onesided"].steps, runs["double-backward"].steps, strict=True):
        assert a["denominator"] == pytest.approx(b["denominator"], rel=1e-5)
        assert measured(a, "sharpness", 0.0) == pytest.approx(measured(b, "sharpness", 0.0), rel=1e-5)


def test_bf16_mixed_precision_measures_the_same_curvature(tmp_path):
    # precision="bf16-mixed": training_step runs under CPU autocast, and so do the probes (the precision
    # plugin's train_step_context); the curvature agrees with the float32 run's to bf16 accuracy
    class Spy(DigitsMLP):
        """Records whether each forward pass of a probe ran under bf16 autocast."""

        def forward(self, x):
            if eos.probing:
                try:
                    under_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
                except TypeError:  # torch < 2.4: the device-less names
                    under_bf16 = torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.bfloat16
                probes.append(under_bf16)
            return super().forward(x)

    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        probes: list[bool] = []
        eos = EdgeOfStabilityCallback(CDAT(scale=2.0), sharpness_every=2)
        _, _, runs[precision] = fit(tmp_path / precision, eos, model=Spy(), max_steps=4, precision=precision)
    assert probes and all(probes)
    full, mixed = runs["32-true"].steps, runs["bf16-mixed"].steps
    assert all(s["skipped"] == 0 and math.isfinite(s["lr"]) for s in mixed)
    assert mixed[0]["denominator"] == pytest.approx(full[0]["denominator"], rel=0.05)
    assert mixed[0]["sharpness"] == pytest.approx(full[0]["sharpness"], rel=0.05)


def plain_initial_params():
    return torch.cat([p.detach().reshape(-1) for p in DigitsMLP().parameters()]).numpy()


@pytest.mark.parametrize("scheduler", ["linear", "warmup"])
def test_override_ignores_the_lightning_scheduler_and_multiply_applies_its_shape(tmp_path, scheduler):
    # LinearLR(start 1, end 0.1, 8 iterations), or a warm-up from 0 (factor t / 2 for 2 steps, then 1)
    factors = [1.0 - 0.9 * t / 8 if scheduler == "linear" else min(t / 2, 1.0) for t in range(6)]
    _, _, override = fit(tmp_path / "o", EdgeOfStabilityCallback(Constant(0.2)), max_steps=6,
                         model=DigitsMLP(scheduler=scheduler))
    _, _, multiply = fit(tmp_path / "m", EdgeOfStabilityCallback(Constant(0.2), lr_mode="multiply"), max_steps=6,
                         model=DigitsMLP(scheduler=scheduler))
    assert override.lrs() == pytest.approx([0.2] * 6)
    assert multiply.lrs() == pytest.approx([0.2 * f for f in factors], rel=1e-6)
    # the logged lr is the one the SGD steps applied (a scheduler at 0 must not zero an override step)
    assert override.applied_lrs() == pytest.approx(override.lrs(), rel=1e-4)
    assert multiply.applied_lrs() == pytest.approx(multiply.lrs(), rel=1e-4, abs=1e-7)


def test_the_logged_lr_is_the_applied_lr_under_clipping_and_accumulation(tmp_path):
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9), sharpness_every=2)
    _, _, recorder = fit(tmp_path, eos, max_steps=6, batch_size=128, accumulate_grad_batches=2,
                         gradient_clip_val=0.5, model=DigitsMLP(scheduler="warmup"))
    lrs = recorder.lrs()
    assert len(set(lrs)) == 6  # the law's lr, a new one at every step
    assert recorder.applied_lrs() == pytest.approx(lrs, rel=1e-4)


def test_probes_leave_the_batch_norm_statistics_alone(tmp_path):
    # every training forward pass updates BatchNorm's running statistics; probes (power iteration: dozens of
    # evaluations) must not, or evaluation-mode predictions would drift with the probe count
    def run(eos, name):
        model = DigitsMLP(batch_norm=True)
        fit(tmp_path / name, eos, model=model, max_steps=4, batch_size=128, accumulate_grad_batches=2)
        return model.net[1]

    # (the monitor off: the test of the monitor's evaluations is test_monitoring_only_leaves_the_batch_norm_...)
    norm = run(EdgeOfStabilityCallback(Constant(0.05), sharpness_every=1, sharpness_iters=10, monitor_budget=None),
               "probed")
    assert int(norm.num_batches_tracked) == 8  # 4 steps of 2 micro-batches
    plain = run(EdgeOfStabilityCallback(None, monitor_budget=None), "plain")  # same lr (0.05), no probes
    torch.testing.assert_close(norm.running_mean, plain.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.running_var, plain.running_var, rtol=1e-5, atol=1e-6)


def test_nonfinite_loss_skips_the_step_without_touching_the_weights(tmp_path):
    model = DigitsMLP()
    model.poison_batches = {3}
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0))
    with pytest.warns(RuntimeWarning, match="step 3 skipped"):
        run, model, recorder = fit(tmp_path, eos, model=model, max_steps=6, logger=CSVLogger(tmp_path))
    np.testing.assert_array_equal(recorder.params[3], recorder.params[2])  # step 3 changed nothing
    assert recorder.steps[3]["skipped"] == 1.0
    assert not np.array_equal(recorder.params[4], recorder.params[3])  # training went on
    assert all(np.isfinite(p).all() for p in recorder.params)
    with open(run.logger.experiment.metrics_file_path) as f:
        skipped = {int(r["step"]): float(r["eos/skipped"]) for r in csv.DictReader(f) if r.get("eos/skipped")}
    assert skipped == {0: 0.0, 1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0, 5: 0.0}  # every step logged once, the skipped one too


def test_a_skipped_step_repeats_the_step_index_and_every_step_is_logged_once(tmp_path):
    # the callback tells that the optimizer stepped by tuner.calls: the step after a skipped one reports the same
    # step index, and must be logged as well
    model = DigitsMLP()
    model.poison_batches = {3}
    with pytest.warns(RuntimeWarning, match="step 3 skipped"):
        run, _, recorder = fit(tmp_path, EdgeOfStabilityCallback(CDAT(scale=2.0)), model=model, max_steps=6,
                               logger=CSVLogger(tmp_path))
    assert [s["step"] for s in recorder.steps] == [0, 1, 2, 3, 3, 4]
    assert [s["skipped_steps"] for s in recorder.steps] == [0, 0, 0, 1, 1, 1]
    with open(run.logger.experiment.metrics_file_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("eos/lr")]
    assert [int(r["step"]) for r in rows] == list(range(6))
    assert [float(r["eos/lr"]) for r in rows] == pytest.approx(recorder.lrs(), rel=1e-6)


def test_nonfinite_curvature_keeps_the_last_good_lr(tmp_path):
    def objective(pl_module, batch, batch_idx):  # NaN only when the probes evaluate it, at step 3
        x, y = batch
        loss = torch.nn.functional.cross_entropy(pl_module(x), y)
        return loss * float("nan") if pl_module.global_step == 3 else loss

    eos = EdgeOfStabilityCallback(CDAT(scale=2.0), loss_fn=objective)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _, _, recorder = fit(tmp_path, eos, max_steps=6)
    lrs = recorder.lrs()
    assert lrs[3] == lrs[2] and recorder.steps[3]["fallback"] == 1.0
    assert lrs[4] != lrs[3]  # measured again afterwards
    assert all(np.isfinite(p).all() for p in recorder.params)
    assert not np.array_equal(recorder.params[3], recorder.params[2])  # the step was taken with the last lr


def test_manual_optimization_fails_with_instructions(tmp_path):
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0))
    with pytest.raises(ValueError, match="automatic optimization.*CurvatureTuner"):
        fit(tmp_path, eos, model=DigitsMLP(manual=True), max_steps=2)


def test_unsupported_optimizer_fails_with_instructions(tmp_path):
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0))
    with pytest.raises(ValueError, match="EdgeOfStabilityCallback.*linear in the learning rate.*configure_optimizers"):
        fit(tmp_path, eos, model=DigitsMLP(optimizer="rprop"), max_steps=2)


def test_a_second_tuner_on_the_same_optimizer_fails(tmp_path):
    class Tuned(DigitsMLP):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            self.own_tuner = CurvatureTuner(optimizer, CDAT())
            return optimizer

    with pytest.raises(ValueError, match="already has a CurvatureTuner.*one EdgeOfStabilityCallback"):
        fit(tmp_path, EdgeOfStabilityCallback(CDAT(scale=2.0)), model=Tuned(), max_steps=2)

    with pytest.raises(ValueError, match="already has a CurvatureTuner"):
        model = DigitsMLP()
        run = trainer(tmp_path, [EdgeOfStabilityCallback(CDAT()), EdgeOfStabilityCallback(CDAT())], max_steps=2)
        run.fit(model, loader(digits(), FULL_BATCH))


def test_a_law_that_needs_the_loss_refuses_accumulation(tmp_path):
    # Lightning's closure hands the tuner only the last micro-batch's loss: Polyak would use a wrong f(w)
    with pytest.raises(ValueError, match="Polyak needs the step's loss.*accumulate_grad_batches"):
        fit(tmp_path, EdgeOfStabilityCallback(Polyak()), max_steps=2, batch_size=64, accumulate_grad_batches=2)
    _, _, recorder = fit(tmp_path, EdgeOfStabilityCallback(Polyak(lr_max=10.0)), max_steps=2)  # fine without
    assert recorder.steps[0]["lr"] == pytest.approx(recorder.steps[0]["loss"] / recorder.steps[0]["grad_norm"] ** 2)


@pytest.mark.parametrize("kwargs,name", [({"probe_every": 0}, "probe_every"), ({"route": "magic"}, "route"),
                                          ({"lr_mode": "add"}, "lr_mode"), ({"sharpness_every": -1}, "sharpness_every"),
                                          ({"sharpness_iters": 0}, "sharpness_iters"),
                                          ({"sharpness_tol": -1.0}, "sharpness_tol"), ({"seed": 1.5}, "seed"),
                                          ({"warn": "jit"}, "warn='jit'"), ({"power_itters": 3}, "power_itters"),
                                          ({"model": None}, "model is set by the callback"),
                                          ({"grad_scaler": None}, "grad_scaler is set by the callback"),
                                          ({"reference_lr": 0.1}, "reference_lr is set by the callback"),
                                          ({"initial_lr": 0.1}, "initial_lr is set by the callback")])
def test_invalid_settings_fail_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EdgeOfStabilityCallback(CDAT(), **kwargs)
    with pytest.raises(ValueError, match="law"):
        EdgeOfStabilityCallback("cdat")


def test_old_option_names_work_with_a_deprecation_warning_pointing_at_the_caller():
    with pytest.warns(DeprecationWarning, match="power_(iters|tol)= is deprecated, use sharpness_") as caught:
        eos = EdgeOfStabilityCallback(CDAT(), power_iters=7, power_tol=1e-5)
    assert [str(w.message).split(":")[1].split("=")[0].strip() for w in caught] == ["power_iters", "power_tol"]
    assert {w.filename for w in caught} == {__file__}
    assert (eos.settings.sharpness_iters, eos.settings.sharpness_tol) == (7, 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names do not warn
        eos = EdgeOfStabilityCallback(CDAT(), sharpness_iters=7, sharpness_tol=1e-5, seed=3, warn=False)
    assert (eos.settings.sharpness_iters, eos.settings.seed, eos.settings.warn) == (7, 3, False)
    with pytest.raises(ValueError, match="sharpness_iters= only"):
        EdgeOfStabilityCallback(CDAT(), power_iters=7, sharpness_iters=7)


def test_callback_without_law_only_measures(tmp_path):
    eos = EdgeOfStabilityCallback(None, sharpness_every=2, monitor_budget=None)
    _, _, recorder = fit(tmp_path, eos, max_steps=4)
    assert recorder.lrs() == pytest.approx([0.05] * 4)  # the optimizer's own lr
    assert measured(recorder.steps[0], "sharpness") and measured(recorder.steps[2], "sharpness")
    assert measured(recorder.steps[1], "sharpness") is None
    assert recorder.steps[2]["lr_sharpness"] == pytest.approx(0.05 * recorder.steps[2]["sharpness"])


# ---------------------------------------------------------------------------------------------------------------
# the random state the probes replay
# ---------------------------------------------------------------------------------------------------------------
class DrawsAtBatchStart(pl.Callback):
    """A callback listed after the tuner's that draws random numbers (and runs the model, dropout included)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.rand(7)
        with torch.no_grad():
            pl_module(batch[0][:3])


def real_step_curvature(model_init, window, k):
    """|u^T H u| and the gradient of the step's objective sum_i loss_i / k, each micro-batch evaluated from the
    random state its training_step started from (the real step's dropout masks), u = -g (plain SGD)."""
    model = DigitsMLP(dropout=0.3).double()
    torch.nn.utils.vector_to_parameters(torch.tensor(model_init), model.parameters())
    model.train()
    params = list(model.parameters())
    total = 0.0
    with torch.random.fork_rng():
        for (x, y), state in window:
            torch.set_rng_state(state)
            total = total + torch.nn.functional.cross_entropy(model(x), y) / k
    grads = torch.autograd.grad(total, params, create_graph=True)
    u = [-g.detach() for g in grads]
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, u, strict=True)), params)
    curvature = sum(float((v * h).sum()) for v, h in zip(u, hvp, strict=True))
    return abs(curvature), torch.cat([g.detach().reshape(-1) for g in grads]).numpy()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_probes_replay_the_random_state_training_step_started_from(tmp_path, accumulate):
    # The callback listed after the tuner's and the module's own on_train_batch_start draw random numbers after
    # the tuner's on_train_batch_start: the probe must still see the real step's dropout masks (float64, exact
    # Hessian-vector products, so u^T H u agrees with an independent computation to rounding).
    class Noisy(DigitsMLP):
        def __init__(self):
            super().__init__(dropout=0.3)
            self.double()
            self.starts = []  # (batch, random state) at the start of every real (not probing) training_step

        def on_train_batch_start(self, batch, batch_idx):
            torch.randn(3)

        def training_step(self, batch, batch_idx):
            if not eos.probing:
                self.starts.append((batch, torch.get_rng_state()))
            return super().training_step(batch, batch_idx)

    eos = EdgeOfStabilityCallback(CDAT(scale=2.0), route="double-backward")
    model = Noisy()
    _, _, recorder = fit(tmp_path, eos, model=model, max_steps=3, batch_size=128 // accumulate,
                         data=digits(dtype=torch.float64), accumulate_grad_batches=accumulate,
                         after=[DrawsAtBatchStart()])
    assert len(recorder.steps) == 3 and len(model.starts) == 3 * accumulate
    before = [recorder.initial, *recorder.params[:-1]]
    for t, step in enumerate(recorder.steps):
        window = model.starts[t * accumulate:(t + 1) * accumulate]
        curvature, gradient = real_step_curvature(before[t], window, accumulate)
        np.testing.assert_allclose(gradient, recorder.grads[t], rtol=1e-10, atol=1e-14)  # the real step's masks
        assert step["denominator"] == pytest.approx(curvature, rel=1e-6)
    # the capture hooks are gone after fit
    assert all(not module._forward_pre_hooks for module in model.modules())


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("scaler", [False, True], ids=["closure-step", "grad-scaler"])
def test_every_probe_evaluation_starts_training_step_from_the_real_steps_random_state(tmp_path, accumulate, scaler):
    # With a GradScaler (16-mixed) Lightning's precision plugin runs the closure before scaler.step(optimizer), so
    # the tuner gets no closure; the state comes from the first module call inside training_step. (A GradScaler on
    # the CPU, float16 autocast: the same code path as CUDA's 16-mixed.)
    from lightning.pytorch.plugins import MixedPrecision

    eos = EdgeOfStabilityCallback(CDAT(scale=2.0), route="double-backward")
    real, probes = {}, {}

    class Noisy(DigitsMLP):
        def on_train_batch_start(self, batch, batch_idx):
            torch.randn(3)

        def training_step(self, batch, batch_idx):
            key, state = (self.global_step, batch_idx), torch.get_rng_state()
            if eos.probing:
                probes.setdefault(key, []).append(state)
            else:
                real[key] = state
            return super().training_step(batch, batch_idx)

    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=16.0))] if scaler else []
    run, _, _ = fit(tmp_path, eos, model=Noisy(dropout=0.3), max_steps=3, batch_size=64, plugins=plugins,
                    accumulate_grad_batches=accumulate, after=[DrawsAtBatchStart()])
    assert (getattr(run.precision_plugin, "scaler", None) is not None) == scaler
    assert sorted(probes) == sorted(real) and len(real) == 3 * accumulate
    for key, states in probes.items():
        assert all(torch.equal(state, real[key]) for state in states), key


# ---------------------------------------------------------------------------------------------------------------
# LearningRateMonitor
# ---------------------------------------------------------------------------------------------------------------
class GroupLr(pl.Callback):
    """Records the optimizer's group lr at the end of every batch (after the scheduler stepped)."""

    def __init__(self):
        self.lrs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def csv_rows(tmp_path, key):
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


@pytest.mark.parametrize("monitor_first", [True, False], ids=["monitor-before", "monitor-after"])
def test_learning_rate_monitor_shows_the_applied_lr_in_override_mode(tmp_path, monitor_first):
    # LearningRateMonitor logs the groups' lr when step t starts, before the law decides step t's lr: in override
    # mode it shows the lr the previous step applied (eos/lr one step later), not LinearLR's ignored lr
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9))
    monitor, group = LearningRateMonitor(logging_interval="step"), GroupLr()
    run, _, recorder = fit(tmp_path, eos, model=DigitsMLP(scheduler="linear"), max_steps=8, logger=CSVLogger(tmp_path),
                           before=[monitor] if monitor_first else [],
                           after=[group] if monitor_first else [group, monitor])
    shown, applied = csv_rows(tmp_path, "lr-SGD"), csv_rows(tmp_path, "eos/lr")
    assert sorted(shown) == sorted(applied) == list(range(8))
    assert shown[0] == pytest.approx(0.05)  # before the first step: the law's initial lr (the optimizer's)
    assert [shown[t] for t in range(1, 8)] == pytest.approx(recorder.lrs()[:7], rel=1e-12)
    assert [applied[t] for t in range(8)] == pytest.approx(recorder.lrs(), rel=1e-6)  # (logged in float32)
    # the scheduler itself ran on its own values (LinearLR multiplies the group's current lr at each step)
    assert group.lrs == pytest.approx([0.05 * (1 - 0.9 * min(t + 1, 8) / 8) for t in range(8)], rel=1e-12)
    assert run.lr_scheduler_configs[0].scheduler.get_last_lr() == pytest.approx([0.05 * 0.1])
    assert monitor.lrs["lr-SGD"] == pytest.approx([shown[t] for t in range(8)], rel=1e-12)
    # the helpers that bracket the monitor are gone after fit, the user's callbacks are as they were
    assert [type(cb) for cb in run.callbacks if not type(cb).__module__.startswith("lightning.")] == [
        EdgeOfStabilityCallback, Recorder, GroupLr]


def test_learning_rate_monitor_shows_the_schedulers_lr_in_multiply_mode(tmp_path):
    # multiply: the scheduler's lr is a factor of the applied lr; the monitor shows it, eos/lr the product
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9), lr_mode="multiply")
    _, _, recorder = fit(tmp_path, eos, model=DigitsMLP(scheduler="linear"), max_steps=8,
                         logger=CSVLogger(tmp_path), after=[LearningRateMonitor(logging_interval="step")])
    shown = csv_rows(tmp_path, "lr-SGD")
    factors = [1 - 0.9 * t / 8 for t in range(8)]
    assert [shown[t] for t in range(8)] == pytest.approx([0.05 * f for f in factors], rel=1e-12)
    assert recorder.lrs() == pytest.approx([s["law_lr"] * f for s, f in zip(recorder.steps, factors, strict=True)])


# ---------------------------------------------------------------------------------------------------------------
# the sharpness monitor (monitor_budget, on by default) and the horizon of a decaying law
# ---------------------------------------------------------------------------------------------------------------
class ParamsAfterFit(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        self.params = torch.cat([p.detach().reshape(-1).clone() for p in pl_module.parameters()])


def test_monitoring_only_by_default_leaves_the_run_untouched(tmp_path):
    """law=None with the default budget: the user's optimizer and scheduler steps, bit for bit those of a run without
    the callback (dropout masks included), and the monitor's estimates in the logs."""
    def run(callbacks, name):
        model = DigitsMLP(optimizer="momentum", scheduler="linear", dropout=0.2)
        after = ParamsAfterFit()
        fitted = trainer(tmp_path / name, [*callbacks, after], max_steps=8)
        fitted.fit(model, loader(digits(), 128))
        return fitted, after.params

    _, alone = run([], "alone")
    eos = EdgeOfStabilityCallback(None)
    assert eos.settings.monitor_budget == 0.05
    recorder = Recorder(eos)
    monitored, params = run([eos, recorder], "monitored")
    assert torch.equal(params, alone)
    steps = recorder.steps
    assert recorder.lrs() == pytest.approx([0.05 * (1.0 - 0.9 * t / 8) for t in range(8)])  # LinearLR's, untouched
    assert all(math.isfinite(s["sharpness"]) and s["lr_sharpness"] == s["lr"] * s["sharpness"] for s in steps)
    assert [s["sharpness_age"] for s in steps] == list(range(8))  # the cold start at step 0; k = 25 steps after it
    assert {s["monitor_every"] for s in steps} == {25.0} and {s["edge"] for s in steps} == {3.8}  # momentum 0.9
    assert {s["unstable"] for s in steps} == {0.0} and monitored.progress_bar_metrics["eos/unstable"] == 0.0


def test_monitoring_only_leaves_the_batch_norm_statistics_alone(tmp_path):
    def run(callbacks, name):
        model = DigitsMLP(batch_norm=True)
        trainer(tmp_path / name, callbacks, max_steps=4).fit(model, loader(digits(), 128))
        return model.net[1]

    alone, monitored = run([], "alone"), run([EdgeOfStabilityCallback(None)], "monitored")
    assert int(monitored.num_batches_tracked) == int(alone.num_batches_tracked) == 4
    assert torch.equal(monitored.running_mean, alone.running_mean)


def test_a_too_large_learning_rate_raises_the_warning_and_shows_unstable(tmp_path):
    """lr * lambda_max = 22 at the start (edge 2): the monitor's cold start converges on the first step's Hessian
    beyond the warning threshold, so it warns at once, and eos/unstable = 1 reaches the loggers and the progress
    bar."""
    logger = CSVLogger(tmp_path, name="csv")
    eos = EdgeOfStabilityCallback(None)
    with pytest.warns(RuntimeWarning, match="edge of stability 2 by more than 60% .3 consecutive measurements, "
                      "or one of this step.s Hessian alone.:"):
        run, _, recorder = fit(tmp_path, eos, model=DigitsMLP(lr=30.0), max_steps=6, logger=logger)
    flags = [s["unstable"] for s in recorder.steps]
    assert flags == [1.0] * 6
    assert recorder.steps[0]["lr_sharpness"] > 3.2
    with open(logger.experiment.metrics_file_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("eos/unstable")]
    assert [float(r["eos/unstable"]) for r in rows] == flags
    assert run.progress_bar_metrics["eos/unstable"] == 1.0
    # the same run with the monitor off: no warning, nothing logged
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, quiet = fit(tmp_path / "off", EdgeOfStabilityCallback(None, monitor_budget=None),
                          model=DigitsMLP(lr=30.0), max_steps=6)
    assert not [w for w in caught if "edge of stability" in str(w.message)]
    assert all(math.isnan(s["unstable"]) and math.isnan(s["sharpness"]) for s in quiet.steps)


def test_a_decaying_law_gets_the_horizon_of_the_fit_under_accumulation_and_resume(tmp_path):
    """CDAT(decay="cosine") without horizon: the callback fills in trainer.estimated_stepping_batches (4 epochs of 4
    micro-batches, 2 per step: 8 optimizer steps), the applied lr is the rule's lr times s(t / 8), and a resumed fit
    continues the same decay."""
    law = CDAT(scale=2.0, ema=0.9, decay="cosine")
    setup = dict(batch_size=128, accumulate_grad_batches=2, max_steps=-1, max_epochs=4)
    eos = EdgeOfStabilityCallback(law, monitor_budget=None)
    saving = ModelCheckpoint(dirpath=tmp_path / "saved", save_top_k=-1, every_n_epochs=1)
    _, _, straight = fit(tmp_path / "a", eos, after=[saving], enable_checkpointing=True, **setup)
    assert eos.tuner.law == CDAT(scale=2.0, ema=0.9, decay="cosine", horizon=8) and law.horizon is None
    decays = [s["decay"] for s in straight.steps]
    assert decays == pytest.approx([0.5 * (1.0 + math.cos(math.pi * t / 8)) for t in range(8)], rel=1e-12)
    assert decays[0] == 1.0 and decays[-1] < 0.04
    for s in straight.steps:
        assert s["lr"] == pytest.approx(2.0 * s["numerator_ema"] / s["denominator_ema"] * s["decay"], rel=1e-9)

    # resumed from the end of epoch 2 (step 4) of that run: the same horizon, the decay goes on from step 4
    resumed_eos = EdgeOfStabilityCallback(law, monitor_budget=None)
    _, _, resumed = fit(tmp_path / "c", resumed_eos, ckpt_path=tmp_path / "saved" / "epoch=1-step=4.ckpt", **setup)
    assert resumed_eos.tuner.law.horizon == 8
    assert [s["decay"] for s in resumed.steps] == decays[4:]
    assert resumed.lrs() == straight.lrs()[4:]


def test_a_decaying_law_without_a_known_horizon_asks_for_it(tmp_path):
    class Stream(torch.utils.data.IterableDataset):  # no length: Lightning cannot count the steps of an epoch
        def __iter__(self):
            x, y = digits().tensors
            for i in range(0, len(x), 128):
                yield x[i:i + 128], y[i:i + 128]

    run = trainer(tmp_path, [EdgeOfStabilityCallback(CDAT(decay="cosine"))], max_steps=-1, max_epochs=1)
    with pytest.raises(ValueError, match="EdgeOfStabilityCallback: CDAT.*number of optimizer steps.*horizon="):
        run.fit(DigitsMLP(), torch.utils.data.DataLoader(Stream(), batch_size=None))
    # given, it is used as it is
    eos = EdgeOfStabilityCallback(CDAT(decay="linear", horizon=3), monitor_budget=None)
    trainer(tmp_path / "given", [eos], max_steps=-1, max_epochs=1).fit(
        DigitsMLP(), torch.utils.data.DataLoader(Stream(), batch_size=None))
    assert eos.tuner.law.horizon == 3


def test_a_log_written_every_few_steps_shows_a_warning_raised_in_between():
    """Loggers write every log_every_n_steps steps; eos/unstable in a write is the largest since the previous one, so
    an episode that began and ended between two writes still shows (the other values are the latest)."""
    from eos_core.integrations._common import UnwrittenDiagnostics

    unwritten = UnwrittenDiagnostics()
    for unstable, lr in ((0.0, 0.1), (1.0, 0.2), (0.0, 0.3), (math.nan, 0.4)):
        unwritten.add({"unstable": unstable, "lr": lr, "skipped": 0.0})
    assert unwritten.values == {"unstable": 1.0, "lr": 0.4, "skipped": 0.0}
    unwritten.clear()
    unwritten.add({"unstable": 0.0, "lr": 0.5})
    assert unwritten.values == {"unstable": 0.0, "lr": 0.5}
