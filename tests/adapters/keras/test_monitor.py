"""The sharpness monitor (monitor_budget) in the Keras tuner, on the backend of KERAS_BACKEND: its estimate against an
independent Hessian, its diagnostics, and its state in Keras variables (save, load, continue bit-identically)."""

import math
import warnings

import keras
import numpy as np
import pytest
from keras_helpers import BACKEND, NumpyMLP, WeightRecorder, compile_tuned, digits, mlp

from eos_core import CDAT
from eos_core.adapters.keras import CurvatureTuner, current_diagnostics, find_tuner
from eos_core.diagnostics import MONITOR_KEYS, keys_for
from eos_core.integrations.keras import EdgeOfStabilityCallback


def fit(model, x, y, epochs, initial_epoch=0, callbacks=(), batch_size=None):
    callback = EdgeOfStabilityCallback()
    model.fit(x, y, batch_size=batch_size or len(x), epochs=epochs, initial_epoch=initial_epoch, shuffle=False,
              verbose=0, callbacks=[callback, *callbacks])
    return callback


def test_the_tracked_lambda_max_matches_an_independent_hessian():
    """Monitoring only, full batch: the weights are those of plain SGD, and the monitor's lambda_max at its last tick
    is the top eigenvalue of the numpy Hessian at the weights of that step (within the tracker's accuracy)."""
    x, y = digits(256)
    model = compile_tuned(mlp(hidden=8, seed=4), CurvatureTuner(keras.optimizers.SGD(0.5), None, monitor_budget=1.0))
    recorder = WeightRecorder()
    callback = fit(model, x, y, epochs=12, callbacks=[recorder])
    history = callback.history
    assert set(keys_for(None)) - {"step", "route"} == set(history) - {"step"}
    assert history["lr"] == [0.5] * 12 and history["edge"] == [2.0] * 12
    assert set(history["monitor_every"]) == {2.0}  # k = ceil(1.1 / 0.9): one finite-difference product, 1.1 steps
    ticks = [t for t, age in enumerate(history["sharpness_age"]) if age == 0]
    assert ticks[0] == 0 and len(ticks) >= 5
    last = ticks[-1]
    top = float(np.linalg.eigvalsh(NumpyMLP(x, y).hessian(recorder.before[last]))[-1])
    # within the 5%: a reading mid-cycle mixes the Hessians of its ticks (JAX backend: the ticks of steps 8
    # and 10, lambda_max 4.33 and 4.19, read 4.33 at step 10)
    assert history["sharpness"][last] == pytest.approx(top, rel=0.05)
    assert history["sharpness_residual"][last] < 0.3
    np.testing.assert_allclose(history["lr_sharpness"], 0.5 * np.array(history["sharpness"]), rtol=1e-12)
    assert set(history["unstable"]) == {0.0}  # 0.5 * lambda_max below 2
    for key in ("preconditioned_sharpness", "preconditioned_sharpness_age"):  # SGD: no preconditioner
        assert all(math.isnan(v) for v in history[key])
    # plain SGD's own weights (the tuner applied the optimizer's step as it is)
    plain = compile_tuned(mlp(hidden=8, seed=4), keras.optimizers.SGD(0.5))
    plain.fit(x, y, batch_size=len(x), epochs=12, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_monitor_diagnostics_are_nan_while_it_is_off():
    tuner = CurvatureTuner(keras.optimizers.SGD(0.1), CDAT())
    tuner.build(mlp(hidden=8).trainable_variables)
    found = tuner.diagnostics
    assert tuple(found) == keys_for(CDAT()) and set(MONITOR_KEYS) <= set(found)
    assert all(math.isnan(found[key]) for key in MONITOR_KEYS)


def test_save_load_continue_resumes_the_monitor_bit_identically(tmp_path):
    """CDAT on Adam with the monitor (both trackers: H and P^-1/2 H P^-1/2) ticking every few steps: a run saved after
    4 steps and continued from the file has every diagnostic of every step (the monitor's among them) and the weights
    of the uninterrupted run, and the saved tuner state holds the monitor's; the preconditioned tracker, not started
    when saved, starts after the load as it does uninterrupted."""
    x, y = digits(128)  # 2 steps per epoch

    def tuned():
        # monitor_edge: Adam's first steps are beyond its edge of 38, and the monitor would then tick at every step
        # and repay that debt for the rest of this short run; a high edge keeps the budget's spacing, k = 4
        return compile_tuned(mlp(hidden=8, seed=5), CurvatureTuner(keras.optimizers.Adam(0.01), CDAT(scale=2.0),
                                                                   probe_every=2, monitor_budget=0.6,
                                                                   monitor_edge=1e4))

    uninterrupted = tuned()
    full = fit(uninterrupted, x, y, epochs=8, batch_size=64)  # the preconditioned tracker starts at step 10
    first = tuned()
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch{epoch}.keras"))
    head = fit(first, x, y, epochs=2, batch_size=64, callbacks=[checkpoint])
    restored = keras.models.load_model(tmp_path / "epoch2.keras")
    tuner = find_tuner(restored)
    assert tuner.monitor_budget == 0.6 and tuner.edge == (1e4, True)
    assert tuner.get_config() == first.optimizer.get_config()
    assert_same(current_diagnostics(restored), current_diagnostics(first))
    tail = fit(restored, x, y, epochs=8, initial_epoch=2, batch_size=64)
    for key, values in full.history.items():
        np.testing.assert_array_equal(np.array(head.history[key] + tail.history[key]), np.array(values), err_msg=key)
    for a, b in zip(uninterrupted.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    ages = tail.history["sharpness_age"]
    assert 0.0 in ages and 0.0 in tail.history["preconditioned_sharpness_age"]  # both trackers ticked after the load
    assert tail.history["monitor_every"][-1] == 5.0  # ceil(2 operators x 1.1 steps / (0.9 x 0.6))


def test_a_state_saved_with_the_monitor_does_not_load_into_a_tuner_without_it():
    def built(**options):
        model = compile_tuned(mlp(hidden=8), CurvatureTuner(keras.optimizers.SGD(0.1), CDAT(), **options))
        model.optimizer.build(model.trainable_variables)
        return model.optimizer

    store = {}
    built(monitor_budget=0.05).save_own_variables(store)
    with pytest.raises(ValueError, match="monitor_budget"):
        built().load_own_variables(store)


@pytest.mark.skipif(BACKEND != "torch", reason="the PyTorch monitor's state in the torch engine's variables")
def test_the_torch_engine_stores_every_field_of_the_monitor():
    x, y = digits(64)
    model = compile_tuned(mlp(hidden=8), CurvatureTuner(keras.optimizers.Adam(0.01), None, monitor_budget=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit(model, x, y, epochs=12)  # full batch: the preconditioned tracker starts at step 10
    engine = model.optimizer._engine
    saved = engine.torch_tuner.monitor.state_dict()
    engine._read()  # the variables handed back to the PyTorch tuner
    assert saved["trackers"][1] is not None  # Adam: the preconditioned tracker started too
    assert _same_nan(engine.torch_tuner.monitor.state_dict(), saved)


def _same_nan(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_nan(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_nan(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def assert_same(a, b):
    assert list(a) == list(b)
    for key in a:
        assert a[key] == b[key] or (np.isnan(a[key]) and np.isnan(b[key])), key
