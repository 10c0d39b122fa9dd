"""EdgeOfStabilityCallback in a real transformers.Trainer on tiny GPT-2 / BERT built from configs (CPU, offline)."""

import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_helpers import (
    LinearRegression,
    MeanLossModel,
    StepRecorder,
    TokenData,
    Trainer,
    arguments,
    flat,
    logged,
    measured,
    same_diagnostics,
    tiny_bert,
    tiny_gpt2,
    train,
)
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import DefaultFlowCallback, TrainerCallback

from eos_core import CDAT, Constant
from eos_core.adapters.torch import CurvatureTuner
from eos_core.integrations.transformers import EdgeOfStabilityCallback

pytestmark = pytest.mark.filterwarnings("ignore:.*(fell back|SDPA|sdpa).*")


def tensorboard_scalars(output_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = [p for p in (output_dir / "runs").iterdir() if p.is_dir()]
    events = EventAccumulator(str(run))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


class LogSpy(TrainerCallback):
    """Stands for a reporting callback (TensorBoard, W&B, ...): records the logs it is shown."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_bert], ids=["gpt2", "bert"])
def test_sdpa_model_trains_and_the_diagnostics_reach_the_logs(tmp_path, build):
    # lr_max: at a random init u^T H u can be tiny (BERT's first step would otherwise take lr ~ 1 with Adam)
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9, lr_max=0.05), sharpness_every=3, fd_above=None)
    spy = LogSpy()
    recorder = StepRecorder(eos)
    # the spy comes before the callback, as the Trainer puts its reporting integrations before user callbacks
    trainer = Trainer(model=build(), args=arguments(tmp_path, max_steps=10), train_dataset=TokenData(),
                      callbacks=[spy, eos, recorder])
    trainer.train()

    # the flash SDPA kernel cannot be differentiated twice: the auto route fell back to the math kernel
    assert eos.tuner.route == "double-backward+sdpa-math"
    losses = logged(trainer, "loss")
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2
    assert all(s["skipped"] == 0 and math.isfinite(s["lr"]) and s["lr"] > 0 for s in recorder.steps)

    # trainer.state.log_history: one training log per step with the tuner's values
    history = [e for e in trainer.state.log_history if "learning_rate" in e]
    assert [e["step"] for e in history] == list(range(1, 11))
    assert [e["eos/lr"] for e in history] == recorder.lrs()
    assert [e["eos/denominator"] for e in history] == [s["denominator"] for s in recorder.steps]
    # sharpness in every log: measured exactly on the tracked steps 0, 3, 6, 9 (no monitor residual there), the
    # sharpness monitor's latest estimate (on by default) in between
    assert all("eos/sharpness" in e and "eos/unstable" in e for e in history)
    assert [i for i, e in enumerate(history) if "eos/sharpness_residual" not in e] == [0, 3, 6, 9]
    assert history[0]["eos/route"] == "double-backward+sdpa-math" and "eos/route" not in history[1]
    # override mode: the Trainer's own learning_rate log is the applied lr, not the ignored scheduler's 1e-3
    assert [e["learning_rate"] for e in history] == recorder.lrs()

    # a callback registered before it saw the values too: the callback moved itself ahead in the list
    spied = [e for e in spy.seen if "learning_rate" in e]
    assert [e["eos/lr"] for e in spied] == recorder.lrs()
    assert [e["learning_rate"] for e in spied] == recorder.lrs()
    assert [type(cb) for cb in trainer.callback_handler.callbacks][:3] == [DefaultFlowCallback,
                                                                          EdgeOfStabilityCallback, LogSpy]


def test_logs_every_few_steps_carry_the_measurements_in_between(tmp_path):
    # the Trainer logs after steps 4, 8, 12 (logging_steps=4); the tuner tracks sharpness at its steps 0, 3, 6, 9
    # (global steps 1, 4, 7, 10): each log carries the latest measurement since the previous one (the monitor off:
    # it would report an estimate at every step)
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9), sharpness_every=3, monitor_budget=None)
    trainer, recorder = train(tmp_path, tiny_gpt2(), eos, max_steps=12, logging_steps=4)
    history = [e for e in trainer.state.log_history if "learning_rate" in e]
    assert [e["step"] for e in history] == [4, 8, 12]
    assert [e["eos/sharpness"] for e in history] == [recorder.steps[i]["sharpness"] for i in (3, 6, 9)]
    assert [e["eos/lr"] for e in history] == [recorder.steps[i]["lr"] for i in (3, 7, 11)]
    assert [e["eos/skipped"] for e in history] == [0.0, 0.0, 0.0]


def test_diagnostics_reach_the_trainers_tensorboard_callback(tmp_path):
    pytest.importorskip("tensorboard")
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9), sharpness_every=3)
    trainer, recorder = train(tmp_path, tiny_gpt2(), eos, max_steps=7, report_to=["tensorboard"])
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("EdgeOfStabilityCallback") < names.index("TensorBoardCallback")
    scalars = tensorboard_scalars(tmp_path, "train/eos/lr")
    assert [step for step, _ in scalars] == list(range(1, 8))
    assert [value for _, value in scalars] == pytest.approx(recorder.lrs(), rel=1e-6)
    sharpness = tensorboard_scalars(tmp_path, "train/eos/lr_sharpness")  # every step: the monitor's estimate between
    assert [step for step, _ in sharpness] == list(range(1, 8))
    assert [v for _, v in sharpness] == pytest.approx([s["lr_sharpness"] for s in recorder.steps])
    unstable = tensorboard_scalars(tmp_path, "train/eos/unstable")
    assert [v for _, v in unstable] == [s["unstable"] for s in recorder.steps]


def test_a_callback_added_after_construction_still_reaches_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0))
    trainer = Trainer(model=tiny_gpt2(), args=arguments(tmp_path, max_steps=3, report_to=["tensorboard"]),
                      train_dataset=TokenData())
    trainer.add_callback(eos)  # on_init_end has passed: it moves itself in on_train_begin
    recorder = StepRecorder(eos)
    trainer.add_callback(recorder)
    trainer.train()
    classes = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert classes[:3] == [DefaultFlowCallback, EdgeOfStabilityCallback, TensorBoardCallback]
    assert [v for _, v in tensorboard_scalars(tmp_path, "train/eos/lr")] == pytest.approx(recorder.lrs(), rel=1e-6)


@pytest.mark.parametrize("build", [tiny_gpt2, MeanLossModel], ids=["token-normalised", "mean-of-micro-batches"])
def test_gradient_accumulation_probes_the_accumulated_objective(tmp_path, build):
    # 2 micro-batches of 4 are one batch of 8 (sequential sampler): same gradient, same curvature, same lr.
    # GPT-2 gets num_items_in_batch (losses summed); the plain module's losses are averaged by the Trainer.
    law = dict(scale=1.0, ema=0.5)
    _, big = train(tmp_path / "big", build(),
                   EdgeOfStabilityCallback(CDAT(**law), sharpness_every=2, fd_above=None, monitor_budget=None),
                   max_steps=6,
                   per_device_train_batch_size=8, max_grad_norm=0.0)
    eos = EdgeOfStabilityCallback(CDAT(**law), sharpness_every=2, fd_above=None, monitor_budget=None)
    _, accumulated = train(tmp_path / "acc", build(), eos, max_steps=6, per_device_train_batch_size=4,
                           gradient_accumulation_steps=2, max_grad_norm=0.0)
    assert len(accumulated.steps) == 6
    for a, b in zip(accumulated.steps, big.steps, strict=True):
        assert a["denominator"] == pytest.approx(b["denominator"], rel=1e-4)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-4)
        if measured(b, "sharpness") is not None:
            assert a["sharpness"] == pytest.approx(b["sharpness"], rel=1e-3)
    # (elementwise, Adam's normalisation amplifies rounding in parameters whose gradient is ~0)
    difference = np.linalg.norm(accumulated.params[-1] - big.params[-1]) / np.linalg.norm(big.params[-1])
    assert difference < 1e-4


def test_bf16_mixed_precision_measures_the_same_curvature(tmp_path):
    # bf16=True: the Trainer's forward runs under CPU autocast; the probes run the same forward, SDPA falls
    # back to the math kernel, and the curvature agrees with the float32 run's to bf16 accuracy
    runs, probes = {}, []

    def spy(module, args):  # whether each forward pass of a probe ran under bf16 autocast
        if eos.probing:
            try:
                under_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            except TypeError:  # torch < 2.4: the device-less names
                under_bf16 = torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.bfloat16
            probes.append(under_bf16)

    for bf16 in (False, True):
        eos = EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9), sharpness_every=3)
        model = tiny_gpt2()
        model.transformer.register_forward_pre_hook(spy)
        probes.clear()
        trainer, runs[bf16] = train(tmp_path / str(bf16), model, eos, max_steps=6, bf16=bf16)
        assert eos.tuner.route == "double-backward+sdpa-math"
    assert probes and all(probes)
    full, mixed = runs[False].steps, runs[True].steps
    assert all(s["skipped"] == 0 and math.isfinite(s["lr"]) for s in mixed)
    assert mixed[0]["denominator"] == pytest.approx(full[0]["denominator"], rel=0.05)
    assert mixed[0]["sharpness"] == pytest.approx(full[0]["sharpness"], rel=0.05)
    assert logged(trainer, "eos/lr") == [s["lr"] for s in mixed]


def test_finite_differences_do_not_reuse_a_clipped_gradient(tmp_path):
    # max_grad_norm clips the gradient before the step: the tuner's one-sided finite differences must take
    # g(w) of the objective, not the clipped one (whose difference to g(w + h u) is ~ g / h, not H u).
    # float64 end to end, so finite differences agree with double backward to ~1e-8.
    runs = {}
    for route in ("double-backward", "fd-onesided"):
        eos = EdgeOfStabilityCallback(CDAT(scale=2.0), sharpness_every=2, route=route)
        _, runs[route] = train(tmp_path / route, MeanLossModel().double(), eos, max_steps=3, max_grad_norm=0.05)
    exact, approximate = runs["double-backward"].steps, runs["fd-onesided"].steps
    assert all(s["grad_norm"] == pytest.approx(0.05, rel=1e-3) for s in exact)  # every step was clipped
    for a, b in zip(approximate, exact, strict=True):
        assert a["denominator"] == pytest.approx(b["denominator"], rel=1e-5)
        assert measured(a, "sharpness", 0.0) == pytest.approx(measured(b, "sharpness", 0.0), rel=1e-5)


def test_scheduler_override_ignores_it_and_multiply_applies_its_shape(tmp_path):
    schedule = dict(lr_scheduler_type="linear", warmup_steps=2, max_steps=8)
    factors = [t / 2 if t < 2 else (8 - t) / 6 for t in range(8)]  # linear warm-up for 2 steps, then decay to 0

    sgd = dict(optim="sgd", weight_decay=0.0)  # w' - w = -lr g: the applied lr can be read off the parameters

    trainer, override = train(tmp_path / "o", tiny_gpt2(), EdgeOfStabilityCallback(Constant(0.01)), **schedule, **sgd)
    assert override.lrs() == pytest.approx([0.01] * 8)
    assert override.applied_lrs() == pytest.approx([0.01] * 8, rel=1e-4)  # also where the warm-up is at 0
    assert override.scheduler_lrs == pytest.approx([1e-3 * f for f in factors])  # the scheduler ran as usual
    assert logged(trainer, "learning_rate") == pytest.approx([0.01] * 8)  # the applied lr, as eos/lr

    trainer, multiply = train(tmp_path / "m", tiny_gpt2(),
                              EdgeOfStabilityCallback(Constant(0.01), lr_mode="multiply"), **schedule, **sgd)
    # the scheduler's lr(t); older transformers (4.48 and 4.50 do) read it after the scheduler's step: lr(t + 1)
    after = [t / 2 if t < 2 else (8 - t) / 6 for t in range(1, 9)]
    assert logged(trainer, "learning_rate") in (pytest.approx([1e-3 * f for f in factors]),
                                                pytest.approx([1e-3 * f for f in after]))
    assert multiply.lrs() == pytest.approx([0.01 * f for f in factors])
    assert multiply.applied_lrs()[1:] == pytest.approx([0.01 * f for f in factors[1:]], rel=1e-4)
    np.testing.assert_array_equal(multiply.params[0], multiply.initial)  # warm-up factor 0: no step at all

    eos = EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9), lr_mode="multiply")
    _, cdat = train(tmp_path / "c", tiny_gpt2(), eos, **schedule, **sgd)
    expected = [s["law_lr"] * f for s, f in zip(cdat.steps, factors, strict=True)]
    assert [s["lr"] for s in cdat.steps] == pytest.approx(expected)
    assert cdat.applied_lrs()[1:] == pytest.approx(expected[1:], rel=1e-4)
    # the first probe (warm-up factor 0) still measured the curvature along a real update
    assert cdat.steps[0]["denominator"] > 1e-6 and cdat.steps[0]["numerator"] > 0


def resume_callback():
    """EMA and probe_every=2: the lr depends on the tuner's state, not only on the weights.

    The sharpness monitor at a budget that makes it tick in the resumed part too (every 3 steps with finite
    differences, every 6 with exact products: two operators for AdamW, 90% of the budget for products), its edge
    out of reach (no ticks in debt while AdamW's first preconditioned readings are far above 38, which would leave
    no credit for the resumed part).
    """
    return EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9), probe_every=2, sharpness_every=3, monitor_budget=1.0,
                                   monitor_edge=1e12)


#: resumed from checkpoint-4: 8 resumed steps, so that the monitor ticks in them also where its checks keep exact
#: products (transformers 4.48 / torch 2.3: a tick of two exact products costs 5 steps, one every 6 steps)
RESUME_RUN = dict(max_steps=12, save_strategy="steps", save_steps=4)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 12-step run that saves checkpoint-4 (and -8, -12), and its recorder."""
    out = tmp_path_factory.mktemp("uninterrupted")
    _, recorder = train(out, tiny_gpt2(), resume_callback(), **RESUME_RUN)
    saved = torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert saved["eos_core"]["step"] == 4
    return out, recorder


def test_resume_from_a_trainer_checkpoint_continues_the_lr_trajectory(uninterrupted):
    out, straight = uninterrupted
    # resume in the same output_dir (as resume_from_checkpoint=True does): bit-identical continuation
    _, resumed = train(out, tiny_gpt2(seed=1), resume_callback(), resume=str(out / "checkpoint-4"), **RESUME_RUN)
    assert resumed.lrs() == straight.lrs()[4:]
    np.testing.assert_array_equal(resumed.params[-1], straight.params[-1])


def test_resume_from_a_checkpoint_copied_outside_output_dir_continues_the_tuner(tmp_path, uninterrupted):
    # trainer.train(resume_from_checkpoint=<a folder elsewhere>), nothing in TrainingArguments: the callback reads
    # the tuner's state from the folder the Trainer loaded, so the resumed steps are those of the uninterrupted run
    out, straight = uninterrupted
    elsewhere = tmp_path / "copied"
    shutil.copytree(out / "checkpoint-4", elsewhere)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, resumed = train(tmp_path / "other", tiny_gpt2(seed=1), resume_callback(), resume=str(elsewhere),
                           **RESUME_RUN)
    assert not [w for w in caught if "checkpoint" in str(w.message)]
    assert len(resumed.steps) == 8
    for mine, theirs in zip(resumed.steps, straight.steps[4:], strict=True):
        assert same_diagnostics(mine, theirs)  # bit-identical: lr, EMAs, sharpness, the monitor's, step index
    np.testing.assert_array_equal(resumed.params[-1], straight.params[-1])
    assert resumed.eos.tuner.monitor.ticks == straight.eos.tuner.monitor.ticks  # resumed, and ticked as straight did
    at_checkpoint = torch.load(elsewhere / "optimizer.pt", weights_only=True)["eos_core"]["monitor"]["ticks"]
    assert resumed.eos.tuner.monitor.ticks > at_checkpoint  # the monitor ticked in the resumed half too


def without_tuner_state(state):
    """An optimizer state dict as the Trainer saves it without the callback: none of the tuner's three copies."""
    state = {k: v for k, v in state.items() if k != "eos_core"}
    state["param_groups"] = [{k: v for k, v in g.items() if k != "eos_core"} for g in state["param_groups"]]
    state["state"] = {key: {n: v for n, v in entry.items() if not n.startswith("eos_core")}
                      for key, entry in state["state"].items()}
    return state


def test_resume_from_an_old_checkpoint_reads_the_tuner_state_from_the_file(tmp_path, uninterrupted):
    """A checkpoint of state version 2 (only the top-level key, which torch's load_state_dict drops): the callback
    finds it in the folder the Trainer loaded."""
    out, straight = uninterrupted
    old = tmp_path / "old"
    shutil.copytree(out / "checkpoint-4", old)
    state = torch.load(old / "optimizer.pt", weights_only=True)
    torch.save({**without_tuner_state(state), "eos_core": state["eos_core"]}, old / "optimizer.pt")
    _, resumed = train(tmp_path / "run", tiny_gpt2(seed=1), resume_callback(), resume=str(old), **RESUME_RUN)
    assert resumed.lrs() == straight.lrs()[4:]


def test_resume_from_a_checkpoint_without_the_tuners_state_warns_and_restarts(tmp_path, uninterrupted):
    out, straight = uninterrupted
    plain = tmp_path / "plain"
    shutil.copytree(out / "checkpoint-4", plain)
    state = torch.load(plain / "optimizer.pt", weights_only=True)
    torch.save(without_tuner_state(state), plain / "optimizer.pt")  # a checkpoint saved without the callback
    with pytest.warns(RuntimeWarning, match="no checkpoint matching"):
        _, lost = train(tmp_path / "lost", tiny_gpt2(seed=1), resume_callback(), resume=str(plain), **RESUME_RUN)
    assert lost.lrs() != straight.lrs()[4:]


def test_the_trainers_learning_rate_log_is_the_applied_lr_in_override_mode(tmp_path):
    # a decaying schedule the law ignores, logs every 3 steps: every training log's learning_rate is eos/lr
    pytest.importorskip("tensorboard")
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9), sharpness_every=4)
    trainer, recorder = train(tmp_path, tiny_gpt2(), eos, max_steps=9, logging_steps=3,
                              lr_scheduler_type="linear", report_to=["tensorboard"])
    history = [e for e in trainer.state.log_history if "learning_rate" in e]
    assert [e["step"] for e in history] == [3, 6, 9]
    assert [e["learning_rate"] for e in history] == [e["eos/lr"] for e in history]
    assert [e["learning_rate"] for e in history] == [recorder.lrs()[i] for i in (2, 5, 8)]
    assert recorder.scheduler_lrs[2] == pytest.approx(1e-3 * 7 / 9)  # while the scheduler went its own way
    tensorboard = tensorboard_scalars(tmp_path, "train/learning_rate")
    assert [step for step, _ in tensorboard] == [3, 6, 9]
    assert [value for _, value in tensorboard] == pytest.approx([recorder.lrs()[i] for i in (2, 5, 8)], rel=1e-6)


class Poison(TrainerCallback):
    """Makes the model's output NaN during optimizer step `at` (during its probes only, if `probes_only`)."""

    def __init__(self, model, eos, at, probes_only):
        self.eos, self.at, self.probes_only, self.active = eos, at, probes_only, False
        model.lm_head.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        if self.active and (self.eos.probing or not self.probes_only):
            return output * float("nan")
        return None

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step == self.at


def poisoned_run(tmp_path, probes_only):
    model = tiny_gpt2()
    eos = EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.5))
    recorder = StepRecorder(eos)
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=6), train_dataset=TokenData(),
                      callbacks=[eos, recorder, Poison(model, eos, 3, probes_only)])
    trainer.train()
    return trainer, recorder


def test_nonfinite_loss_skips_the_step_without_touching_the_weights(tmp_path):
    with pytest.warns(RuntimeWarning, match="step 3 skipped"):
        trainer, recorder = poisoned_run(tmp_path, probes_only=False)
    np.testing.assert_array_equal(recorder.params[3], recorder.params[2])
    assert recorder.steps[3]["skipped"] == 1.0 and recorder.steps[2]["skipped"] == 0.0
    assert not np.array_equal(recorder.params[4], recorder.params[3])
    assert all(np.isfinite(p).all() for p in recorder.params)
    assert logged(trainer, "eos/skipped") == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # every step logged once


def test_a_skipped_step_repeats_the_step_index_and_every_step_is_logged_once(tmp_path):
    # the callback tells that the optimizer stepped by tuner.calls: the step after a skipped one reports the same
    # step index, and must be logged as well
    with pytest.warns(RuntimeWarning, match="step 3 skipped"):
        trainer, recorder = poisoned_run(tmp_path, probes_only=False)
    assert [s["step"] for s in recorder.steps] == [0, 1, 2, 3, 3, 4]
    assert logged(trainer, "eos/lr") == recorder.lrs()


def test_nonfinite_curvature_keeps_the_last_good_lr(tmp_path):
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _, recorder = poisoned_run(tmp_path, probes_only=True)
    lrs = recorder.lrs()
    assert recorder.steps[3]["fallback"] == 1.0 and lrs[3] == lrs[2]
    assert lrs[4] != lrs[3]
    assert not np.array_equal(recorder.params[3], recorder.params[2])  # the step was taken, with the last lr
    assert all(np.isfinite(p).all() for p in recorder.params)


def test_a_second_tuner_on_the_trainers_optimizer_fails_with_instructions(tmp_path):
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    CurvatureTuner(optimizer, CDAT())
    with pytest.raises(ValueError, match="already has a CurvatureTuner.*one callback per Trainer"):
        train(tmp_path / "a", model, EdgeOfStabilityCallback(CDAT()), optimizers=(optimizer, None), max_steps=1)
    with pytest.raises(ValueError, match="already has a CurvatureTuner"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Trainer(model=tiny_gpt2(), args=arguments(tmp_path / "b", max_steps=1), train_dataset=TokenData(),
                    callbacks=[EdgeOfStabilityCallback(CDAT()), EdgeOfStabilityCallback(CDAT())]).train()


def test_unsupported_optimizer_and_arguments_fail_with_instructions(tmp_path):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="EdgeOfStabilityCallback.*linear in the learning rate.*supported optimizer"):
        train(tmp_path / "a", model, EdgeOfStabilityCallback(CDAT()),
              optimizers=(torch.optim.Rprop(model.parameters(), lr=1e-3), None), max_steps=1)
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        train(tmp_path / "b", tiny_gpt2(), EdgeOfStabilityCallback(CDAT()), label_smoothing_factor=0.1, max_steps=1)


@pytest.mark.parametrize("kwargs,name", [({"probe_every": 0}, "probe_every"), ({"route": "magic"}, "route"),
                                          ({"lr_mode": "add"}, "lr_mode"), ({"loss_fn": 3}, "loss_fn"),
                                          ({"sharpness_iters": 0}, "sharpness_iters"), ({"warn": "jit"}, "warn='jit'"),
                                          ({"fd_eps": -1.0}, "fd_eps"), ({"lanczos_steps": 5}, "lanczos_steps"),
                                          ({"optimizer": None}, "optimizer is set by the callback"),
                                          ({"reference_lr": 0.1}, "reference_lr is set by the callback")])
def test_invalid_settings_fail_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EdgeOfStabilityCallback(CDAT(), **kwargs)
    with pytest.raises(ValueError, match="law"):
        EdgeOfStabilityCallback("cdat")


def test_old_option_names_work_with_a_deprecation_warning_pointing_at_the_caller():
    with pytest.warns(DeprecationWarning, match="power_tol= is deprecated, use sharpness_tol=") as caught:
        eos = EdgeOfStabilityCallback(CDAT(), power_tol=1e-5)
    assert {w.filename for w in caught if issubclass(w.category, DeprecationWarning)} == {__file__}
    assert eos.settings.sharpness_tol == 1e-5


def test_params_helper_sees_the_trained_model(tmp_path):
    # guards the recorder the other tests rely on: it must see the weights move
    model = tiny_gpt2()
    before = flat(model)
    _, recorder = train(tmp_path, model, EdgeOfStabilityCallback(CDAT(scale=2.0)), max_steps=2)
    assert not np.array_equal(recorder.params[-1], before)
    np.testing.assert_array_equal(recorder.params[-1], flat(model))


# ---------------------------------------------------------------------------------------------------------------
# the sharpness monitor (monitor_budget, on by default) and the horizon of a decaying law
# ---------------------------------------------------------------------------------------------------------------
def test_monitoring_only_by_default_leaves_the_run_untouched(tmp_path):
    """law=None with the default budget: the Trainer's AdamW and linear schedule step bit for bit as without the
    callback, and every log carries the monitor's estimates of lambda_max and of the preconditioned lambda_max."""
    options = dict(max_steps=6, lr_scheduler_type="linear", learning_rate=1e-2)
    alone = Trainer(model=tiny_gpt2(), args=arguments(tmp_path / "alone", **options), train_dataset=TokenData())
    alone.train()
    eos = EdgeOfStabilityCallback(None)
    assert eos.settings.monitor_budget == 0.05
    trainer, recorder = train(tmp_path / "monitored", tiny_gpt2(), eos, **options)
    np.testing.assert_array_equal(flat(trainer.model), flat(alone.model))
    assert recorder.lrs() == recorder.scheduler_lrs  # the scheduler's lr, applied
    history = [e for e in trainer.state.log_history if "learning_rate" in e]
    assert [e["learning_rate"] for e in history] == logged(alone, "learning_rate")
    for entry, step in zip(history, recorder.steps, strict=True):
        assert entry["eos/sharpness"] == step["sharpness"] and entry["eos/sharpness_age"] == step["sharpness_age"]
        assert entry["eos/lr_sharpness"] == step["lr"] * step["sharpness"]
        assert entry["eos/edge"] == pytest.approx(38.0)  # on the preconditioned sharpness, AdamW's beta1 = 0.9
    assert [s["sharpness_age"] for s in recorder.steps] == list(range(6))  # the cold start, then k = 44 steps


def test_a_too_large_learning_rate_raises_the_warning_and_logs_unstable(tmp_path):
    """Plain SGD on a quadratic at lr * lambda_max = 5 (edge 2): the monitor's cold start converges on the first
    step's Hessian beyond the warning threshold, so it warns at once, and eos/unstable = 1 is in the logs (the largest
    value since the previous log)."""
    eos = EdgeOfStabilityCallback(None)
    with pytest.warns(RuntimeWarning, match="edge of stability 2 by more than 60% .3 consecutive measurements, "
                      "or one of this step.s Hessian alone.:"):
        trainer, recorder = train(tmp_path, LinearRegression(), eos, optim="sgd", learning_rate=0.5, max_steps=4,
                                  logging_steps=2, max_grad_norm=0.0)
    flags = [s["unstable"] for s in recorder.steps]
    assert flags == [1.0, 1.0, 1.0, 1.0] and recorder.steps[0]["lr_sharpness"] > 3.2
    history = [e for e in trainer.state.log_history if "learning_rate" in e]
    assert [e["eos/unstable"] for e in history] == [1.0, 1.0]
    # the monitor off: no warning, no value
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = train(tmp_path / "off", LinearRegression(), EdgeOfStabilityCallback(None, monitor_budget=None),
                           optim="sgd", learning_rate=0.5, max_steps=4, logging_steps=2, max_grad_norm=0.0)
    assert not [w for w in caught if "edge of stability" in str(w.message)]
    assert not logged(trainer, "eos/unstable")


def test_a_decaying_law_gets_the_horizon_of_the_run_under_accumulation_and_resume(tmp_path):
    """CDAT(decay="cosine") without horizon: the callback fills in state.max_steps (2 epochs of 8 batches, 2 per
    optimizer step: 8 steps), the applied lr is the rule's lr times s(t / 8), and a resumed run continues it."""
    law = CDAT(scale=2.0, ema=0.9, decay="cosine")
    run = dict(max_steps=-1, num_train_epochs=2, gradient_accumulation_steps=2, per_device_train_batch_size=8,
               save_strategy="steps", save_steps=4, max_grad_norm=0.0, lr_scheduler_type="constant")
    eos = EdgeOfStabilityCallback(law, monitor_budget=None)
    trainer, straight = train(tmp_path, MeanLossModel(), eos, **run)
    assert trainer.state.max_steps == 8 and eos.tuner.law.horizon == 8 and law.horizon is None
    decays = [s["decay"] for s in straight.steps]
    assert decays == pytest.approx([0.5 * (1.0 + math.cos(math.pi * t / 8)) for t in range(8)], rel=1e-12)
    assert decays[0] == 1.0 and decays[-1] < 0.04
    for s in straight.steps:
        assert s["lr"] == pytest.approx(2.0 * s["numerator_ema"] / s["denominator_ema"] * s["decay"], rel=1e-9)
    assert logged(trainer, "eos/decay") == decays

    resumed_eos = EdgeOfStabilityCallback(law, monitor_budget=None)
    _, resumed = train(tmp_path, MeanLossModel(seed=1), resumed_eos, resume=str(tmp_path / "checkpoint-4"), **run)
    assert resumed_eos.tuner.law.horizon == 8
    assert [s["decay"] for s in resumed.steps] == decays[4:]
    assert resumed.lrs() == straight.lrs()[4:]
