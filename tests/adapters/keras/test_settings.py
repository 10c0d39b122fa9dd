"""Invalid settings raise ValueError at construction, naming the setting; unsupported backends say so at import."""

import math
import os
import subprocess
import sys
import warnings

import keras
import pytest
from keras_helpers import BACKEND

from eos_core import CDAT, DCAO, AdaEoS, ExactSharpness
from eos_core.adapters.keras import CurvatureTuner
from eos_core.integrations.keras import EdgeOfStabilityCallback
from eos_core.settings import TunerSettings


def sgd():
    return keras.optimizers.SGD(0.1)


def stepped_sgd():
    optimizer = sgd()
    variable = keras.Variable([1.0, 2.0])
    optimizer.apply([keras.ops.ones((2,))], [variable])
    return optimizer


def built_sgd():
    optimizer = sgd()
    optimizer.build([keras.Variable([1.0, 2.0])])
    return optimizer


@pytest.mark.parametrize("make, match", [
    (lambda: CurvatureTuner(sgd(), CDAT(), probe_every=0), "probe_every"),
    (lambda: CurvatureTuner(sgd(), CDAT(), probe_every=1.5), "probe_every"),
    (lambda: CurvatureTuner(sgd(), CDAT(), route="hessian"), "route"),
    (lambda: CurvatureTuner(sgd(), CDAT(), sharpness_every=0), "sharpness_every"),
    (lambda: CurvatureTuner(sgd(), CDAT(), sharpness_iters=0), "sharpness_iters"),
    (lambda: CurvatureTuner(sgd(), CDAT(), sharpness_tol=-1.0), "sharpness_tol"),
    (lambda: CurvatureTuner(sgd(), CDAT(), reference_lr=-0.1), "reference_lr"),
    (lambda: CurvatureTuner(sgd(), CDAT(), reference_lr=0.0), "reference_lr"),
    (lambda: CurvatureTuner(sgd(), CDAT(), lr_mode="multiply"), "does not support the option.s. lr_mode"),
    (lambda: CurvatureTuner(sgd(), CDAT(), skip_nonfinite=False), "does not support the option.s. skip_nonfinite"),
    (lambda: CurvatureTuner(sgd(), CDAT(), settings=TunerSettings(fd_above=None)), "fd_above"),
    (lambda: CurvatureTuner(sgd(), CDAT(), settings={"probe_every": 2}), "settings"),
    (lambda: CurvatureTuner(sgd(), CDAT(), seed="zero"), "seed"),
    (lambda: CurvatureTuner(sgd(), CDAT(), warn="yes"), "warn"),
    (lambda: CurvatureTuner(sgd(), CDAT(), warn=None), "warn"),
    (lambda: CurvatureTuner(sgd(), CDAT(), probe_evry=2), "probe_evry"),
    (lambda: CurvatureTuner(sgd(), "cdat"), "law"),
    (lambda: CurvatureTuner(sgd(), DCAO()), "DCAO decides momentum, weight_decay"),
    (lambda: CurvatureTuner(keras.optimizers.SGD(0.0), AdaEoS()), "initial learning rate must be > 0"),
    (lambda: CurvatureTuner(sgd(), CDAT(scale=0.0)), "scale"),
    (lambda: CurvatureTuner(keras.optimizers.Ftrl(0.1), CDAT()), "optimizer must be one of"),
    (lambda: CurvatureTuner(keras.optimizers.Lamb(0.1), CDAT()), "optimizer must be one of"),
    (lambda: CurvatureTuner("sgd", CDAT()), "optimizer must be one of"),
    (lambda: CurvatureTuner(keras.optimizers.LossScaleOptimizer(sgd()), CDAT()), "LossScaleOptimizer"),
    (lambda: CurvatureTuner(keras.optimizers.SGD(0.1, use_ema=True), CDAT()), "use_ema"),
    (lambda: CurvatureTuner(keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), CDAT()),
     "gradient_accumulation_steps"),
    (lambda: CurvatureTuner(keras.optimizers.SGD(0.1, loss_scale_factor=128.0), CDAT()), "loss_scale_factor"),
    (lambda: CurvatureTuner(keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)), CDAT()),
     "learning_rate"),
    (lambda: CurvatureTuner(stepped_sgd(), CDAT()), "already stepped"),
    (lambda: CurvatureTuner(sgd(), None, reference_lr=0.5), "reference_lr"),
    (lambda: CurvatureTuner(sgd(), CDAT(), monitor_budget=0.0), "monitor_budget"),
    (lambda: CurvatureTuner(sgd(), None, monitor_budget=1.5), "monitor_budget"),
    (lambda: CurvatureTuner(sgd(), None, monitor_budget=True), "monitor_budget"),
    (lambda: CurvatureTuner(sgd(), None, monitor_budget=0.05, monitor_patience=0), "monitor_patience"),
    (lambda: CurvatureTuner(sgd(), None, monitor_budget=0.05, monitor_edge=-1.0), "monitor_edge"),
    (lambda: EdgeOfStabilityCallback(monitor_budget=2.0), "EdgeOfStabilityCallback: monitor_budget"),
    (lambda: EdgeOfStabilityCallback(monitor_margin=-0.5), "EdgeOfStabilityCallback: monitor_margin"),
    (lambda: EdgeOfStabilityCallback(lr_mode="multiply"), "EdgeOfStabilityCallback.*lr_mode"),
    (lambda: EdgeOfStabilityCallback(reference_lr=0.1), "EdgeOfStabilityCallback: reference_lr"),
    (lambda: EdgeOfStabilityCallback("cdat"), "EdgeOfStabilityCallback: law"),
    (lambda: EdgeOfStabilityCallback(DCAO()), "EdgeOfStabilityCallback: .*DCAO decides"),
    (lambda: EdgeOfStabilityCallback(log_every=0), "log_every"),
    (lambda: EdgeOfStabilityCallback(keys="lr"), "keys"),
    (lambda: EdgeOfStabilityCallback(log_prefix=None), "log_prefix"),
])
def test_invalid_setting_raises_value_error_naming_it(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.skipif(BACKEND != "torch", reason="torch backend routes")
@pytest.mark.parametrize("route", ["jvp-jvp", "jvp-grad"])
def test_torch_backend_refuses_forward_mode_routes(route):
    with pytest.raises(ValueError, match="route"):
        CurvatureTuner(sgd(), CDAT(), route=route)


def test_preconditioned_laws_need_jax_and_an_adaptive_optimizer():
    if BACKEND == "torch":
        with pytest.raises(ValueError, match="JAX backend only"):
            CurvatureTuner(keras.optimizers.Adam(0.01), ExactSharpness(preconditioned=True))
    else:
        with pytest.raises(ValueError, match="adaptive optimizer"):
            CurvatureTuner(sgd(), ExactSharpness(preconditioned=True))
        CurvatureTuner(keras.optimizers.Adam(0.01), ExactSharpness(preconditioned=True))


def test_every_warn_mode_is_accepted_and_survives_the_config():
    for warn in (True, "jit", False):
        tuner = CurvatureTuner(sgd(), CDAT(), warn=warn)
        assert tuner.warn == warn and CurvatureTuner.from_config(tuner.get_config()).warn == warn


def test_settings_object_and_keyword_options_combine():
    settings = TunerSettings(probe_every=3, sharpness_every=2, sharpness_iters=7, seed=5)
    tuner = CurvatureTuner(sgd(), CDAT(), settings=settings, probe_every=4, sharpness_tol=0.0)
    assert (tuner.probe_every, tuner.sharpness_every, tuner.sharpness_iters, tuner.sharpness_tol, tuner.seed) == (
        4, 2, 7, 0.0, 5)
    assert tuner.settings == settings.replace(probe_every=4, sharpness_tol=0.0)
    # the deprecated name given as a keyword replaces the settings' value of the new one
    with pytest.warns(DeprecationWarning, match="power_iters"):
        assert CurvatureTuner(sgd(), CDAT(), settings=settings, power_iters=9).sharpness_iters == 9


def test_initial_lr_is_the_deprecated_name_of_reference_lr():
    with pytest.warns(DeprecationWarning, match="initial_lr= is deprecated, use reference_lr=") as caught:
        tuner = CurvatureTuner(sgd(), CDAT(), initial_lr=0.25)
    assert caught[0].filename == __file__  # the warning points at the line that built the tuner
    assert tuner.reference_lr == tuner.initial_lr == 0.25 == tuner.settings.reference_lr
    with pytest.raises(ValueError, match="reference_lr= only"):
        CurvatureTuner(sgd(), CDAT(), initial_lr=0.25, reference_lr=0.5)


def test_default_reference_lr_is_the_wrapped_optimizers_learning_rate():
    tuner = CurvatureTuner(keras.optimizers.SGD(0.125), CDAT())
    assert tuner.reference_lr == 0.125 and tuner.settings.reference_lr is None
    assert float(tuner.inner_optimizer.learning_rate.numpy()) == 1.0  # u is the update for lr = 1
    assert CurvatureTuner(sgd(), CDAT(), reference_lr=0.5).reference_lr == 0.5


CONFIG_KEYS = {"name", "optimizer", "law", "probe_every", "route", "sharpness_every", "sharpness_iters",
               "sharpness_tol", "reference_lr", "seed", "warn", "monitor_budget", "monitor_edge", "monitor_margin",
               "monitor_patience"}


@pytest.mark.parametrize("make", [
    lambda: CurvatureTuner(keras.optimizers.SGD(0.125, momentum=0.9), CDAT(scale=1.5, ema=0.5), probe_every=3,
                           route="fd-central", sharpness_every=4, sharpness_iters=11, sharpness_tol=1e-4, seed=7,
                           warn=False, name="tuned"),
    lambda: CurvatureTuner(keras.optimizers.Adam(0.01), AdaEoS(), reference_lr=0.3),
    lambda: CurvatureTuner(keras.optimizers.SGD(0.0), CDAT()),  # lr 0: the law starts from 0
    lambda: CurvatureTuner(keras.optimizers.Adam(0.01), None, monitor_budget=0.1, monitor_edge=20.0,
                           monitor_margin=0.5, monitor_patience=2),
], ids=["every-option", "reference-lr", "zero-lr", "measuring-monitor"])
def test_config_round_trips_with_the_new_names(make):
    tuner = make()
    config = tuner.get_config()
    assert set(config) == CONFIG_KEYS
    restored = CurvatureTuner.from_config(config)
    assert restored.get_config() == config
    assert restored.settings.as_dict() | {"reference_lr": None} == tuner.settings.as_dict() | {"reference_lr": None}
    assert restored.reference_lr == tuner.reference_lr and restored.law == tuner.law
    assert type(restored.inner_optimizer) is type(tuner.inner_optimizer)


def test_without_a_law_the_optimizer_keeps_its_learning_rate_and_schedule():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    tuner = CurvatureTuner(keras.optimizers.SGD(schedule), None)
    assert tuner.law is None and tuner.measuring and tuner.reference_lr == pytest.approx(0.1)
    assert tuner.inner_optimizer._learning_rate is schedule
    plain = CurvatureTuner(keras.optimizers.SGD(0.125), None)
    assert float(plain.inner_optimizer.learning_rate.numpy()) == 0.125  # not set to 1: its own update is applied
    # a built optimizer that has stepped is fine too (its own steps continue)
    assert CurvatureTuner(stepped_sgd(), None).measuring
    # a built one that has not stepped can be taken over by a law (what fit leaves before the first step)
    assert CurvatureTuner(built_sgd(), CDAT()).law == CDAT()


def test_the_monitor_edge_is_the_keras_optimizers():
    cases = [(keras.optimizers.SGD(0.1), 2.0, False), (keras.optimizers.SGD(0.1, momentum=0.9), 3.8, False),
             (keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True), 3.8 / 2.8, False),
             (keras.optimizers.Adam(0.1), 38.0, True), (keras.optimizers.AdamW(0.1, beta_1=0.8), 18.0, True),
             (keras.optimizers.RMSprop(0.1), 2.0, True)]
    for optimizer, edge, preconditioned in cases:
        found = CurvatureTuner(optimizer, None, monitor_budget=0.05).edge
        assert found[0] == pytest.approx(edge) and found[1] is preconditioned, optimizer
    unknown = CurvatureTuner(keras.optimizers.Adagrad(0.1), None, monitor_budget=0.05).edge
    assert math.isnan(unknown[0]) and unknown[1] is False
    given = CurvatureTuner(keras.optimizers.Adam(0.1), None, monitor_budget=0.05, monitor_edge=10.0).edge
    assert given == (10.0, True)


def test_configs_saved_with_initial_lr_still_load():
    config = CurvatureTuner(keras.optimizers.SGD(0.125), CDAT(), probe_every=2).get_config()
    old = {k: v for k, v in config.items() if k != "reference_lr"} | {"initial_lr": 0.125}
    old["law"] = {k: v for k, v in old["law"].items() if k != "registered_name"}  # older law descriptions
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # a saved file is not the user's code: no warning
        restored = CurvatureTuner.from_config(old)
    assert restored.reference_lr == 0.125 and restored.probe_every == 2 and restored.law == CDAT()
    assert restored.get_config() == config


def test_every_route_of_the_backend_is_accepted():
    routes = ["auto", "double-backward", "fd-central", "fd-onesided"]
    if BACKEND == "jax":
        routes += ["jvp-jvp", "jvp-grad"]
    for route in routes:
        assert CurvatureTuner(sgd(), CDAT(), route=route).route == route


@pytest.mark.parametrize("module", ["eos_core.adapters.keras", "eos_core.integrations.keras"])
@pytest.mark.parametrize("backend", ["tensorflow", "numpy"])
def test_unsupported_backend_is_refused_at_import(module, backend):
    env = {**os.environ, "KERAS_BACKEND": backend}
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError") and "TensorFlow" in message and "not supported" in message
    assert "jax and torch" in message and repr(backend) in message
