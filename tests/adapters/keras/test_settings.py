"""Invalid settings raise ValueError at construction, naming the setting; unsupported backends say so at import."""

import os
import subprocess
import sys

import keras
import pytest
from keras_helpers import BACKEND

from eos_core import CDAT, DCAO, AdaEoS, ExactSharpness
from eos_core.adapters.keras import CurvatureTuner
from eos_core.integrations.keras import EdgeOfStabilityCallback


def sgd():
    return keras.optimizers.SGD(0.1)


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
    (lambda: CurvatureTuner(sgd(), CDAT(), initial_lr=-0.1), "initial_lr"),
    (lambda: CurvatureTuner(sgd(), CDAT(), seed="zero"), "seed"),
    (lambda: CurvatureTuner(sgd(), CDAT(), warn="yes"), "warn"),
    (lambda: CurvatureTuner(sgd(), CDAT(), warn=None), "warn"),
    (lambda: CurvatureTuner(sgd(), CDAT(), probe_evry=2), "probe_evry"),
    (lambda: CurvatureTuner(sgd(), "cdat"), "law"),
    (lambda: CurvatureTuner(sgd(), DCAO()), "DCAO decides momentum, weight_decay"),
    (lambda: CurvatureTuner(sgd(), AdaEoS(), initial_lr=0.0), "initial learning rate must be > 0"),
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
    (lambda: CurvatureTuner(built_sgd(), CDAT()), "already built"),
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
