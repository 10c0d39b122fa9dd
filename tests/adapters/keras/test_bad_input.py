"""Bad input on Keras: a non-finite step is skipped with a warning and never corrupts the weights."""

import math
import warnings

import keras
import numpy as np
import pytest
from keras_helpers import BACKEND, WeightRecorder, compile_tuned, digits, mlp

from eos_core import CDAT
from eos_core.adapters.keras import CurvatureTuner, current_diagnostics
from eos_core.integrations.keras import EdgeOfStabilityCallback


def test_nan_batch_is_skipped_weights_and_optimizer_state_untouched(tmp_path):
    x, y = digits(256)
    x = x.copy()
    x[130, 5] = np.nan  # batch 2 of 4 (batch size 64): its loss and gradient are NaN
    model = compile_tuned(mlp(hidden=16, seed=5),
                          CurvatureTuner(keras.optimizers.SGD(0.05, momentum=0.9), CDAT(scale=2.0, ema=0.5)))
    recorder, callback = WeightRecorder(), EdgeOfStabilityCallback()
    with pytest.warns(RuntimeWarning, match="skipped"):
        model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0, callbacks=[callback, recorder])

    history = callback.history
    assert history["skipped"] == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    # step: the index of the step described among the steps taken; a skipped step reports the next one's index
    assert history["step"] == [0, 1, 2, 2, 3, 4, 5, 5]
    assert history["skipped_steps"] == [0, 0, 1, 1, 1, 1, 2, 2] and history["fallback_steps"] == [0] * 8
    for bad in (2, 6):
        for before, after in zip(recorder.before[bad], recorder.before[bad + 1], strict=True):
            np.testing.assert_array_equal(after, before)  # the weights did not move
        # a skipped step reports the previous step's values (and skipped = 1)
        assert history["lr"][bad] == history["lr"][bad - 1]
    assert all(np.isfinite(w).all() for w in recorder.after)
    assert all(math.isfinite(v) and v > 0 for i, v in enumerate(history["lr"]))
    tuner = model.optimizer
    assert tuner.diagnostics["skipped_steps"] == 2
    # the wrapped optimizer's state did not advance on the skipped steps (its momentum is not NaN either)
    assert int(tuner.inner_optimizer.iterations.numpy()) == 6
    assert all(np.isfinite(v.numpy()).all() for v in tuner.inner_optimizer.variables)
    # training continued: the last clean batches train the model
    assert history["loss"][-1] < history["loss"][0]
    # the skips were reported during fit: reading again, or reading a restored copy, reports nothing more
    model.save_weights(tmp_path / "run.weights.h5")
    fresh = compile_tuned(mlp(hidden=16, seed=5),
                          CurvatureTuner(keras.optimizers.SGD(0.05, momentum=0.9), CDAT(scale=2.0, ema=0.5)))
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.load_weights(tmp_path / "run.weights.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert current_diagnostics(model)["skipped_steps"] == 2 and current_diagnostics(fresh)["skipped_steps"] == 2


@pytest.mark.parametrize("warn", [True, "jit", False])
def test_every_skipped_step_is_reported_once_also_when_reading_every_other_batch(warn):
    x, y = digits(256)
    x = x.copy()
    x[70, 5] = np.nan  # batch 1 of 4: steps 1 and 5 are skipped; log_every=2 reads after steps 0, 2, 4, 6
    model = compile_tuned(mlp(hidden=16, seed=5),
                          CurvatureTuner(keras.optimizers.SGD(0.05), CDAT(scale=2.0), warn=warn))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0,
                  callbacks=[EdgeOfStabilityCallback(log_every=2)])
        if BACKEND == "jax":
            import jax

            jax.effects_barrier()  # warn="jit": the in-jit callbacks have run
    skips = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "skipped" in str(w.message)]
    assert model.optimizer.diagnostics["skipped_steps"] == 2
    if warn is False:
        assert skips == []
        return
    assert len(skips) == 2  # one warning per skipped step (torch and warn="jit": from the step itself)
    if BACKEND == "jax" and warn is True:  # from the reads after steps 2 and 6, with the running count
        assert [m.split(" (")[0] for m in skips] == ["eos_core tune: 1 step(s) up to step 2 were skipped",
                                                     "eos_core tune: 1 step(s) up to step 6 were skipped"]
        assert "2 step(s) skipped so far" in skips[1]


def test_curvature_probe_without_the_train_step_wrapper_says_what_to_do():
    x, y = digits(64)
    model = compile_tuned(mlp(hidden=8), CurvatureTuner(keras.optimizers.SGD(0.1), CDAT(scale=2.0)))
    with pytest.raises(RuntimeError, match="EdgeOfStabilityCallback"):
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    if keras.backend.backend() == "torch":  # no step was taken (on JAX the error comes while tracing the first step,
        # after Keras has moved the values out of the variables; Keras does not put them back after an exception)
        for now, start in zip(model.get_weights(), mlp(hidden=8).get_weights(), strict=True):
            np.testing.assert_array_equal(now, start)


@pytest.mark.parametrize("optimizer, message", [
    (lambda: keras.optimizers.Ftrl(0.1), "optimizer must be one of the Keras optimizers"),
    (lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)), "LossScaleOptimizer"),
], ids=["unsupported", "loss-scale"])
def test_callback_refuses_an_optimizer_it_cannot_wrap(optimizer, message):
    """The callback installs a tuner around the compiled optimizer when fit starts; one it cannot wrap is refused
    there, with the callback's name, before any step."""
    x, y = digits(64)
    model = mlp(hidden=8)
    model.compile(optimizer=optimizer(), loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=f"EdgeOfStabilityCallback: .*{message}"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, epochs=1, verbose=0, callbacks=[EdgeOfStabilityCallback()])
    assert model.optimizer.iterations.numpy() == 0
