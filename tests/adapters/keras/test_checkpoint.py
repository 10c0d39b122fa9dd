"""The tuner's state is Keras variables: save, load, continue is bit-identical to an uninterrupted run."""

import keras
import numpy as np
import pytest
from keras_helpers import compile_tuned, digits, mlp

from eos_core import CDAT, HyperGradient
from eos_core.adapters.keras import CurvatureTuner, current_diagnostics, find_tuner
from eos_core.integrations.keras import EdgeOfStabilityCallback


def tuned_model(law, **tuner_options):
    # No Dropout: Keras does not save its seed generators' state, so any Keras run with dropout resumes with other
    # masks, tuned or not.
    return compile_tuned(mlp(hidden=16, seed=3),
                         CurvatureTuner(keras.optimizers.SGD(0.05, momentum=0.9), law, **tuner_options))


def fit(model, x, y, epochs, initial_epoch=0, callbacks=()):
    callback = EdgeOfStabilityCallback()
    model.fit(x, y, batch_size=64, epochs=epochs, initial_epoch=initial_epoch, shuffle=False, verbose=0,
              callbacks=[callback, *callbacks])
    return callback


@pytest.mark.parametrize("law, options", [
    (CDAT(scale=2.0, ema=0.5), {"probe_every": 3, "sharpness_every": 2}),
    (HyperGradient(beta=0.05), {}),
], ids=["cdat-probe-every-3-sharpness", "hypergradient"])
def test_save_load_continue_equals_uninterrupted(tmp_path, law, options):
    x, y = digits(256)  # 4 steps per epoch
    uninterrupted = tuned_model(law, **options)
    full = fit(uninterrupted, x, y, epochs=3)

    first = tuned_model(law, **options)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch{epoch}.keras"))
    head = fit(first, x, y, epochs=2, callbacks=[checkpoint])
    restored = keras.models.load_model(tmp_path / "epoch2.keras")
    tuner = find_tuner(restored)
    assert isinstance(tuner, CurvatureTuner) and tuner.law == law and tuner.probe_every == first.optimizer.probe_every
    assert current_diagnostics(restored)["step"] == 8
    tail = fit(restored, x, y, epochs=3, initial_epoch=2)

    resumed = head.history["lr"] + tail.history["lr"]
    np.testing.assert_array_equal(np.array(resumed), np.array(full.history["lr"]))
    if "sharpness" in full.history:
        np.testing.assert_array_equal(np.array(head.history["sharpness"] + tail.history["sharpness"]),
                                      np.array(full.history["sharpness"]))
    for a, b in zip(uninterrupted.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert current_diagnostics(restored)["step"] == 12


def test_weights_file_restores_the_tuner_state(tmp_path):
    x, y = digits(128)
    model = tuned_model(CDAT(scale=2.0, ema=0.9))
    fit(model, x, y, epochs=1)
    saved_lr = model.optimizer.lr
    model.save_weights(tmp_path / "run.weights.h5")
    fresh = tuned_model(CDAT(scale=2.0, ema=0.9))
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.load_weights(tmp_path / "run.weights.h5")
    assert fresh.optimizer.lr == saved_lr
    assert fresh.optimizer.diagnostics["step"] == 2
    np.testing.assert_array_equal(fresh.optimizer.variables[-1].numpy(), model.optimizer.variables[-1].numpy())
