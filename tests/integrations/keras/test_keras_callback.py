"""EdgeOfStabilityCallback: the diagnostics reach History, CSVLogger and the progress bar, every batch and epoch."""

import csv
import math

import keras
import numpy as np
import pytest
from keras_helpers import compile_tuned, digits, mlp

from eos_core import CDAT, AdaEoS, Polyak, WarmupCosine
from eos_core.adapters.keras import CurvatureTuner, is_attached
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
