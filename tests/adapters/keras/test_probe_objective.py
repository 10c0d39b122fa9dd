"""The probes evaluate the step's own objective: same dropout masks, batch statistics in training mode, and no side
effects on moving averages or metrics."""

import keras
import numpy as np
import pytest
from keras_helpers import BACKEND, compile_tuned, digits, loss_object, mlp

from eos_core import CDAT
from eos_core.adapters.keras import CurvatureTuner
from eos_core.integrations.keras import EdgeOfStabilityCallback

EXACT = "jvp-jvp" if BACKEND == "jax" else "double-backward"


def first_step(route, **model_options):
    x, y = digits(128)
    model = compile_tuned(mlp(hidden=16, seed=7, **model_options),
                          CurvatureTuner(keras.optimizers.SGD(0.1), CDAT(scale=2.0), route=route))
    callback, batch_logs = EdgeOfStabilityCallback(), []
    logger = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: batch_logs.append(dict(logs)))
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0, callbacks=[callback, logger])
    return callback.history, batch_logs[0]


def test_dropout_masks_are_replayed_in_the_probes():
    exact, logs = first_step(EXACT, dropout=0.3)
    differenced, _ = first_step("fd-onesided", dropout=0.3)
    # One-sided differences subtract the step's gradient (the step's mask) from the probe's gradient at w + h u:
    # with another mask the difference would be O(1), not O(h), and u^T H u off by orders of magnitude.
    assert differenced["denominator"][0] == pytest.approx(exact["denominator"][0], rel=5e-3)
    assert exact["numerator"][0] == differenced["numerator"][0]
    assert exact["loss"][0] == pytest.approx(logs["loss"], rel=1e-6)  # the loss Keras reported for the step


def test_batchnorm_statistics_and_metrics_are_those_of_the_real_step():
    x, y = digits(128)
    plain = mlp(hidden=16, seed=8, batchnorm=True)
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_object(), metrics=["accuracy"])
    plain_logs = plain.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0).history

    tuned = compile_tuned(mlp(hidden=16, seed=8, batchnorm=True),
                          CurvatureTuner(keras.optimizers.SGD(0.1), CDAT(scale=2.0), sharpness_every=1),
                          metrics=["accuracy"])
    tuned_logs = tuned.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0,
                           callbacks=[EdgeOfStabilityCallback()]).history
    # the moving mean / variance moved once (the step's forward pass), not once per probe evaluation
    for a, b in zip(plain.non_trainable_variables, tuned.non_trainable_variables, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-7)
    assert tuned_logs["loss"] == pytest.approx(plain_logs["loss"], rel=1e-6)
    assert tuned_logs["accuracy"] == plain_logs["accuracy"]
    assert np.isfinite(tuned_logs["eos/sharpness"]).all()
