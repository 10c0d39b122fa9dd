"""The tuner's state is Keras variables: save, load, continue is bit-identical to an uninterrupted run."""

import warnings

import keras
import numpy as np
import pytest
from keras_helpers import BACKEND, compile_tuned, digits, mlp

from eos_core import CDAT, HyperGradient
from eos_core.adapters.keras import CurvatureTuner, current_diagnostics, find_tuner
from eos_core.adapters.keras.tuner import STATE_VERSION
from eos_core.integrations.keras import EdgeOfStabilityCallback

if BACKEND == "torch":
    from eos_core.adapters.torch import STATE_KEY
    from eos_core.adapters.torch import STATE_VERSION as TORCH_STATE_VERSION


def tuned_model(law, optimizer=None, **tuner_options):
    # No Dropout: Keras does not save its seed generators' state, so any Keras run with dropout resumes with other
    # masks, tuned or not.
    optimizer = optimizer if optimizer is not None else keras.optimizers.SGD(0.05, momentum=0.9)
    return compile_tuned(mlp(hidden=16, seed=3), CurvatureTuner(optimizer, law, **tuner_options))


def fit(model, x, y, epochs, initial_epoch=0, callbacks=()):
    callback = EdgeOfStabilityCallback()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "eos_core", RuntimeWarning)  # the skipped steps of the NaN batch
        model.fit(x, y, batch_size=64, epochs=epochs, initial_epoch=initial_epoch, shuffle=False, verbose=0,
                  callbacks=[callback, *callbacks])
    return callback


def tuner_state(model):
    """Everything the tuner keeps, as numpy arrays: the PyTorch tuner's state on torch (field by field), the
    optimizer's variables on JAX."""
    tuner = find_tuner(model)
    if BACKEND != "torch":
        return {str(i): np.array(v.numpy()) for i, v in enumerate(tuner.variables)}
    engine = tuner._engine
    if engine.dirty:  # loaded, not read back yet: read the variables as the next step would
        engine._read()
        engine.dirty = False
    saved = dict(engine.torch_tuner.state_dict()[STATE_KEY])
    out = {}
    for key, value in saved.items():
        if isinstance(value, list) and value and hasattr(value[0], "detach"):
            out.update({f"{key}[{i}]": t.detach().numpy().copy() for i, t in enumerate(value)})
        elif isinstance(value, dict):
            out.update({f"{key}.{k}": np.asarray(v) for k, v in value.items()})
        else:
            out[key] = np.asarray(value, dtype=object)
    return out


def assert_same_diagnostics(a, b):
    assert list(a) == list(b)
    for key in a:
        assert a[key] == b[key] or (np.isnan(a[key]) and np.isnan(b[key])), key


def assert_same_state(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


CASES = {
    "cdat-probe-every-3-sharpness": (lambda: CDAT(scale=2.0, ema=0.5), lambda: None,
                                     {"probe_every": 3, "sharpness_every": 2}),
    "hypergradient": (lambda: HyperGradient(beta=0.05), lambda: None, {}),
    # Adam: sharpness tracking estimates the preconditioned sharpness too (its own warm-start vector)
    "adam-preconditioned-sharpness": (lambda: CDAT(scale=2.0, ema=0.9), lambda: keras.optimizers.Adam(0.01),
                                      {"probe_every": 2, "sharpness_every": 3}),
}


@pytest.mark.parametrize("case, nan_batch", [
    *((case, False) for case in sorted(CASES)),
    ("adam-preconditioned-sharpness", True),  # skipped steps counted across the checkpoint
    ("hypergradient", True),  # the previous update of a skipped step is the last taken one's
])
def test_save_load_continue_equals_uninterrupted(tmp_path, case, nan_batch):
    make_law, make_optimizer, options = CASES[case]
    x, y = digits(256)  # 4 steps per epoch
    if nan_batch:
        x = x.copy()
        x[70, 3] = np.nan  # batch 1 of every epoch is skipped
    uninterrupted = tuned_model(make_law(), make_optimizer(), **options)
    full = fit(uninterrupted, x, y, epochs=3)

    first = tuned_model(make_law(), make_optimizer(), **options)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch{epoch}.keras"))
    head = fit(first, x, y, epochs=2, callbacks=[checkpoint])
    restored = keras.models.load_model(tmp_path / "epoch2.keras")
    tuner = find_tuner(restored)
    assert isinstance(tuner, CurvatureTuner) and tuner.law == make_law()
    assert tuner.get_config() == first.optimizer.get_config()
    after_load = current_diagnostics(restored)
    assert_same_diagnostics(after_load, current_diagnostics(first))
    assert after_load["step"] == (5 if nan_batch else 7)  # the index of the last step taken
    assert after_load["skipped_steps"] == (2 if nan_batch else 0)
    assert_same_state(tuner_state(restored), tuner_state(first))  # every part of the state was saved
    tail = fit(restored, x, y, epochs=3, initial_epoch=2)

    assert set(full.history) == set(head.history) == set(tail.history)
    for key, values in full.history.items():  # every diagnostic of every step, bit for bit
        np.testing.assert_array_equal(np.array(head.history[key] + tail.history[key]), np.array(values), err_msg=key)
    if "sharpness_every" in options:
        assert np.isfinite(tail.history["sharpness"]).any()
        if case.startswith("adam"):
            assert np.isfinite(tail.history["preconditioned_sharpness"]).any()
    for a, b in zip(uninterrupted.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert_same_state(tuner_state(restored), tuner_state(uninterrupted))
    assert current_diagnostics(restored)["step"] == (8 if nan_batch else 11)


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
    assert fresh.optimizer.diagnostics["step"] == 1
    np.testing.assert_array_equal(fresh.optimizer.variables[-1].numpy(), model.optimizer.variables[-1].numpy())


def built_tuner(law=None, **options):
    model = tuned_model(law or CDAT(scale=2.0), **options)
    model.optimizer.build(model.trainable_variables)
    return model.optimizer


def saved_store(tuner):
    store = {}
    tuner.save_own_variables(store)
    return store


def version_index(tuner):
    return next(i for i, v in enumerate(tuner.variables) if v.path.endswith("eos_core_state_version"))


def test_the_saved_state_carries_its_version_and_a_newer_one_is_refused():
    source = built_tuner()
    store = saved_store(source)
    index = version_index(source)
    assert int(store[str(index)]) == STATE_VERSION == 2
    built_tuner().load_own_variables(store)  # the same version loads
    store[str(index)] = np.asarray(STATE_VERSION + 1, dtype=store[str(index)].dtype)
    target = built_tuner()
    before = [np.array(v.numpy()) for v in target.variables]
    with pytest.raises(ValueError, match=f"version {STATE_VERSION + 1}, newer than this eos_core reads"):
        target.load_own_variables(store)
    for variable, value in zip(target.variables, before, strict=True):  # nothing was overwritten
        np.testing.assert_array_equal(variable.numpy(), value)
    with pytest.raises(ValueError, match="newer than this eos_core reads"):
        built_tuner().set_weights([store[str(i)] for i in range(len(store))])


@pytest.mark.skipif(BACKEND != "torch", reason="the PyTorch tuner's own state version (torch backend)")
def test_a_pytorch_tuner_state_of_a_newer_version_fails_the_load():
    source = built_tuner(sharpness_every=2)
    store = saved_store(source)
    index = next(i for i, v in enumerate(source.variables) if v.path.endswith("eos_core_counters"))
    counters = np.array(store[str(index)])
    assert counters[0] == TORCH_STATE_VERSION  # the version of the PyTorch state the values came from
    counters[0] = TORCH_STATE_VERSION + 1
    store[str(index)] = counters
    with pytest.raises(ValueError, match="newer than this eos_core reads"):
        built_tuner(sharpness_every=2).load_own_variables(store)


@pytest.mark.parametrize("what", ["other-settings", "before-versions"])
def test_a_state_of_another_layout_raises_instead_of_being_skipped(what):
    if what == "other-settings":  # tracking adds the warm-start vectors
        store = saved_store(built_tuner(sharpness_every=2))
    else:  # a release before the version variable: one variable fewer, the version's place holds another one
        store = saved_store(built_tuner())
        index = version_index(built_tuner())
        values = [store[str(i)] for i in range(len(store)) if i != index]
        store = {str(i): value for i, value in enumerate(values)}
    with pytest.raises(ValueError, match="cannot resume this run"):  # Keras itself would skip it with a warning
        built_tuner().load_own_variables(store)


def test_set_weights_restores_every_variable_of_the_tuner_and_the_wrapped_optimizer():
    x, y = digits(128)
    model = tuned_model(CDAT(scale=2.0, ema=0.9), keras.optimizers.Adam(0.01), sharpness_every=1)
    fit(model, x, y, epochs=1)
    weights = [np.array(v.numpy()) for v in model.optimizer.variables]
    fresh = built_tuner(CDAT(scale=2.0, ema=0.9), optimizer=keras.optimizers.Adam(0.01), sharpness_every=1)
    fresh.set_weights(weights)
    for variable, value in zip(fresh.variables, weights, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)
    assert_same_diagnostics(fresh.diagnostics, model.optimizer.diagnostics)


def test_a_model_saved_before_training_loads_and_trains(tmp_path):
    model = tuned_model(CDAT(scale=2.0), sharpness_every=2)
    model.save(tmp_path / "untrained.keras")  # the optimizer is not built yet: no tuner state to resume
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Skipping variable loading for optimizer", UserWarning)  # Keras's own
        restored = keras.models.load_model(tmp_path / "untrained.keras")
    x, y = digits(128)
    fit(restored, x, y, epochs=1)
    fit(model, x, y, epochs=1)
    assert_same_diagnostics(current_diagnostics(restored), current_diagnostics(model))
