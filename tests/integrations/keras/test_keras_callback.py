"""EdgeOfStabilityCallback: the diagnostics reach History, CSVLogger and the progress bar, every batch and epoch."""

import csv
import math

import keras
import numpy as np
from keras_helpers import compile_tuned, digits, mlp

from eos_core import CDAT
from eos_core.adapters.keras import CurvatureTuner, is_attached
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
    assert per_step["step"] == list(range(1, steps + 1))
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
    assert callback.history["step"] == [1, 3, 5]  # the diagnostics were read after steps 0, 2 and 4
    assert set(callback.history) == {"lr", "numerator", "step"}
    # probes at steps 0, 2, 4: every read step measured the numerator
    assert np.isfinite(callback.history["numerator"]).all()
    # epoch 0 ended after step 2 (read), epoch 1 after step 5 (not read): it carries step 4's values
    assert history["cdat_lr"] == [callback.history["lr"][1], callback.history["lr"][2]]

