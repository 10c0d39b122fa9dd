"""EdgeOfStabilityCallback: the diagnostics reach History, CSVLogger and the progress bar, every batch and epoch."""

import csv
import math

import keras
import numpy as np
import pytest
from keras_helpers import compile_tuned, digits, mlp

from eos_core import CDAT, AdaEoS, Polyak, WarmupCosine
from eos_core.adapters.keras import CurvatureTuner, find_tuner, is_attached
from eos_core.diagnostics import BY_NAME, keys_for
from eos_core.integrations.keras import EdgeOfStabilityCallback

STEPS_PER_EPOCH, EPOCHS = 3, 3


def tuned(sharpness_every=2, probe_every=1):
    return compile_tuned(mlp(hidden=16, seed=9), CurvatureTuner(
        keras.optimizers.SGD(0.05, momentum=0.9), CDAT(scale=2.0, ema=0.9), probe_every=probe_every,
        sharpness_every=sharpness_every))


def latest(values, upto):
    """The last non-NaN value at or before index ``upto``."""
    measured = [v for v in values[:upto + 1] if not math.isnan(v)]
    return measured[-1] if measured else math.nan


def test_history_csv_logger_and_progress_bar_receive_the_diagnostics(tmp_path, capsys):
    x, y = digits(64 * STEPS_PER_EPOCH)
    model = tuned()
    callback = EdgeOfStabilityCallback()
    path = tmp_path / "log.csv"
    history = model.fit(x, y, batch_size=64, epochs=EPOCHS, shuffle=False, verbose=1,
                        callbacks=[callback, keras.callbacks.CSVLogger(str(path))]).history
    printed = capsys.readouterr().out

    steps = STEPS_PER_EPOCH * EPOCHS
    per_step = callback.history
    assert per_step["step"] == list(range(steps))  # the index of the step each row describes
    assert all(len(values) == steps for values in per_step.values())
    np.testing.assert_array_equal(np.isfinite(per_step["sharpness"]), [t % 2 == 0 for t in range(steps)])
    for key in ("lr", "numerator", "denominator", "sharpness", "lr_sharpness", "loss", "grad_norm", "update_norm",
                "numerator_ema", "denominator_ema", "probed", "fallback", "skipped", "skipped_steps"):
        assert len(history["eos/" + key]) == EPOCHS, key
    for epoch in range(EPOCHS):
        last = (epoch + 1) * STEPS_PER_EPOCH - 1
        for key in ("lr", "numerator", "denominator", "loss"):
            assert history["eos/" + key][epoch] == per_step[key][last]
        # measured every other step: the epoch carries the latest measurement
        assert history["eos/sharpness"][epoch] == latest(per_step["sharpness"], last)
        assert history["eos/lr_sharpness"][epoch] == latest(per_step["lr_sharpness"], last)
    measured = [t for t in range(steps) if t % 2 == 0]
    np.testing.assert_allclose(np.array(per_step["lr_sharpness"])[measured],
                               np.array(per_step["lr"])[measured] * np.array(per_step["sharpness"])[measured],
                               rtol=1e-6)

    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == EPOCHS
    for key in ("eos/lr", "eos/numerator", "eos/denominator", "eos/sharpness", "eos/lr_sharpness"):
        np.testing.assert_allclose([float(row[key]) for row in rows], history[key], rtol=1e-6)

    for key in ("eos/lr:", "eos/lr_sharpness:", "eos/sharpness:", "eos/numerator:"):
        assert key in printed
    assert is_attached(model)


def test_keys_prefix_and_log_every():
    x, y = digits(64 * STEPS_PER_EPOCH)
    callback = EdgeOfStabilityCallback(keys=("lr", "numerator"), log_prefix="cdat_", log_every=2)
    history = tuned(sharpness_every=None, probe_every=2).fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0,
                                                             callbacks=[callback]).history
    assert {k for k in history if k.startswith("cdat_")} == {"cdat_lr", "cdat_numerator"}
    assert not any(k.startswith("eos/") for k in history)
    assert callback.history["step"] == [0, 2, 4]  # the diagnostics were read after steps 0, 2 and 4
    assert set(callback.history) == {"lr", "numerator", "step"}
    # probes at steps 0, 2, 4: every read step measured the numerator
    assert np.isfinite(callback.history["numerator"]).all()
    # epoch 0 ended after step 2 (read), epoch 1 after step 5 (not read): it carries step 4's values
    assert history["cdat_lr"] == [callback.history["lr"][1], callback.history["lr"][2]]



@pytest.mark.parametrize("law, options", [
    (CDAT(scale=2.0), {"sharpness_every": 2}),
    (Polyak(lr_max=1.0), {}),
    (WarmupCosine(peak_lr=0.1, total_steps=4), {}),
    (AdaEoS(target=2.0, power_iters=3), {"probe_every": 2}),
], ids=["cdat-tracking", "polyak", "warmup-cosine", "adaeos"])
def test_diagnostics_are_exactly_the_registry_keys_before_and_after_steps(law, options):
    model = compile_tuned(mlp(hidden=8, seed=2), CurvatureTuner(keras.optimizers.SGD(0.05), law, **options))
    tuner = model.optimizer
    tuner.build(model.trainable_variables)
    keys = keys_for(law)
    before = tuner.diagnostics
    assert tuple(before) == keys
    assert before["step"] == 0 and before["skipped_steps"] == 0 and before["route"] == "auto"
    assert before["lr"] == before["law_lr"] == pytest.approx(float(law.hold(law.init(tuner.reference_lr)).lr), rel=1e-7)
    x, y = digits(128)
    callback = EdgeOfStabilityCallback()
    history = model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0, callbacks=[callback]).history
    after = tuner.diagnostics
    assert tuple(after) == keys
    for key, value in after.items():
        kind = BY_NAME[key].kind
        assert type(value) is {"int": int, "str": str, "float": float}[kind], key
    assert after["step"] == 3 and after["lr"] == after["law_lr"]
    assert after["lr_sharpness"] == after["lr"] * after["sharpness"] or math.isnan(after["sharpness"])
    # the callback logs every numeric diagnostic but the step index
    assert {k for k in history if k.startswith("eos/")} == {"eos/" + k for k in keys if k not in ("step", "route")}
    assert set(callback.history) == set(keys) - {"route"}


# -- the sharpness monitor and the tuner the callback installs --------------------------------------------------
def plain_model(optimizer, **mlp_options):
    model = mlp(hidden=16, seed=9, **mlp_options)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_monitoring_only_by_default_leaves_the_run_untouched():
    """A model compiled with a plain Adam (a learning-rate schedule, weight decay, a kernel constraint): with the
    callback's defaults (law=None, monitor_budget=0.05) the weights are bit for bit those of fit without it, and the
    monitor's estimates are in the logs."""
    x, y = digits(64 * STEPS_PER_EPOCH)

    def make():
        schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=2, decay_rate=0.8)
        return plain_model(keras.optimizers.Adam(schedule, weight_decay=0.01),
                           kernel_constraint=keras.constraints.MaxNorm(1.5))

    alone = make()
    alone.fit(x, y, batch_size=64, epochs=EPOCHS, shuffle=False, verbose=0)
    model = make()
    callback = EdgeOfStabilityCallback()
    history = model.fit(x, y, batch_size=64, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[callback]).history
    for a, b in zip(model.get_weights(), alone.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    tuner = callback.tuner
    assert isinstance(model.optimizer, CurvatureTuner) and model.optimizer is tuner and tuner.law is None
    assert tuner.settings.monitor_budget == 0.05 and tuner.edge == (pytest.approx(38.0), True)
    steps = STEPS_PER_EPOCH * EPOCHS
    schedule = [0.01 * 0.8 ** (t / 2) for t in range(steps)]
    np.testing.assert_allclose(callback.history["lr"], schedule, rtol=1e-6)  # the optimizer's own, untouched
    ages = callback.history["sharpness_age"]  # the cold start at the first steps (H, then P^-1/2 H P^-1/2), k >= 22
    assert ages[0] == 0.0 and ages[-1] >= steps - 3 and (np.diff(ages[2:]) == 1).all()
    assert np.isfinite(callback.history["sharpness"]).all()
    np.testing.assert_allclose(callback.history["lr_sharpness"],  # float32 products on JAX
                               np.array(callback.history["lr"]) * np.array(callback.history["sharpness"]), rtol=1e-6)
    for key in ("eos/sharpness", "eos/lr_sharpness", "eos/sharpness_age", "eos/edge", "eos/monitor_every"):
        assert len(history[key]) == EPOCHS, key


def test_a_too_large_learning_rate_raises_the_warning_and_logs_unstable(capsys):
    """Least squares (a quadratic: lambda_max does not move) with plain SGD at 3 times its edge: the monitor's cold
    start converges on the first step's Hessian, far beyond the warning threshold, so a RuntimeWarning comes at once
    (on JAX from the callback's read), and eos/unstable = 1 reaches the logs and the progress bar."""
    x, y = digits(256)
    targets = (y / 9.0).astype("float32")
    top = float(np.linalg.eigvalsh(2.0 * (x.astype(np.float64).T @ x) / len(x))[-1])  # without the bias: a bound
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    model.compile(optimizer=keras.optimizers.SGD(3.0 * 2.0 / top), loss="mse")
    callback = EdgeOfStabilityCallback()
    with pytest.warns(RuntimeWarning, match="edge of stability 2 by more than 60% .3 consecutive measurements, "
                      "or one of this step.s Hessian alone.:") as caught:
        history = model.fit(x, targets, batch_size=len(x), epochs=5, shuffle=False, verbose=1,
                            callbacks=[callback]).history
    assert len([w for w in caught if "edge of stability" in str(w.message)]) == 1  # once per episode
    assert callback.history["unstable"] == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert min(callback.history["lr_sharpness"]) > 6.0
    assert history["eos/unstable"] == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert "eos/unstable: 1" in capsys.readouterr().out


def test_a_law_installed_by_the_callback_gets_the_horizon_and_resumes_from_the_saved_model(tmp_path):
    """EdgeOfStabilityCallback(CDAT(decay="cosine")) on a plain SGD model: the tuner it installs has the horizon
    epochs * steps of fit (the whole run), the applied lr is the rule's times s(t / T), and the model saved by
    ModelCheckpoint (the tuner in its compile config) continues the run bit for bit, monitor included."""
    x, y = digits(128)  # 2 steps per epoch, 4 epochs: T = 8
    law = CDAT(scale=2.0, ema=0.9, decay="cosine")

    def run(model, epochs, initial_epoch=0, callbacks=()):
        callback = EdgeOfStabilityCallback(law, monitor_budget=0.6)
        model.fit(x, y, batch_size=64, epochs=epochs, initial_epoch=initial_epoch, shuffle=False, verbose=0,
                  callbacks=[callback, *callbacks])
        return callback

    full = run(plain_model(keras.optimizers.SGD(0.05)), 4)
    assert full.tuner.law == CDAT(scale=2.0, ema=0.9, decay="cosine", horizon=8) and law.horizon is None
    decays = full.history["decay"]
    np.testing.assert_allclose(decays, [0.5 * (1.0 + math.cos(math.pi * t / 8)) for t in range(8)], rtol=1e-5)
    assert decays[-1] < 0.04
    rule = 2.0 * np.array(full.history["numerator_ema"]) / np.array(full.history["denominator_ema"])
    np.testing.assert_allclose(full.history["lr"], rule * np.array(decays), rtol=1e-5)

    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch{epoch}.keras"))
    run(plain_model(keras.optimizers.SGD(0.05)), 4, callbacks=[checkpoint])
    restored = keras.models.load_model(tmp_path / "epoch2.keras")
    assert find_tuner(restored).law.horizon == 8 and find_tuner(restored).monitor_budget == 0.6
    tail = run(restored, 4, initial_epoch=2)
    assert tail.tuner is find_tuner(restored)  # the restored tuner is logged, not replaced
    for key, values in full.history.items():
        np.testing.assert_array_equal(tail.history[key], values[4:], err_msg=key)
    assert 0.0 in tail.history["sharpness_age"]  # the monitor ticked after the load


def test_a_decaying_law_without_a_known_number_of_steps_asks_for_the_horizon():
    x, y = digits(128)

    def batches():  # a generator: fit does not know the steps of an epoch
        for i in range(0, len(x), 64):
            yield x[i:i + 64], y[i:i + 64]

    model = plain_model(keras.optimizers.SGD(0.05))
    with pytest.raises(ValueError, match="EdgeOfStabilityCallback: CDAT.*number of optimizer steps.*horizon="):
        model.fit(batches(), epochs=1, verbose=0, callbacks=[EdgeOfStabilityCallback(CDAT(decay="cosine"))])
    assert not isinstance(model.optimizer, CurvatureTuner)


def test_a_compiled_tuner_is_logged_as_it_is_and_must_agree_with_the_callback():
    model = tuned(sharpness_every=None)
    tuner = model.optimizer
    params = {"epochs": 1, "steps": 2, "verbose": 0}
    callback = EdgeOfStabilityCallback()  # the defaults: log the tuner as it is configured (monitor off)
    callback.set_model(model)
    callback.set_params(params)
    assert model.optimizer is tuner and callback.tuner is tuner and tuner.monitor_budget is None
    EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9)).set_params(params)  # no model yet: nothing to check
    for disagreeing, match in ((EdgeOfStabilityCallback(CDAT(scale=3.0)), "law CDAT"),
                               (EdgeOfStabilityCallback(monitor_budget=0.2), "monitor_budget=0.2"),
                               (EdgeOfStabilityCallback(sharpness_every=5), "sharpness_every=5")):
        disagreeing.set_model(model)
        with pytest.raises(ValueError, match=f"compiled with a CurvatureTuner of its own.*{match}"):
            disagreeing.set_params(params)
    agreeing = EdgeOfStabilityCallback(CDAT(scale=2.0, ema=0.9), probe_every=1)
    agreeing.set_model(model)
    agreeing.set_params(params)
    assert agreeing.tuner is tuner
