"""The Keras wrapper and the active backend's own adapter, on the same model, give the same learning rates.

JAX backend: :func:`eos_core.adapters.jax.tune` around ``optax.sgd(1.0, momentum=0.9)`` on the Keras model's
stateless loss. torch backend: :class:`eos_core.adapters.torch.CurvatureTuner` around ``torch.optim.SGD`` on the
Keras model's parameters. Keras SGD with momentum at lr = 1 keeps ``m <- mu m - g`` and steps ``u = m``, the
heavy-ball direction both of those optimizers take, so both runs follow the same trajectory. The initial learning
rate is 0.125, exact in float32 (Keras keeps it in a float32 variable; 0.1 would start the two runs 1.5e-9 apart,
a difference CDAT's edge-of-stability dynamics amplify to 1e-4 within a dozen steps).
"""

import keras
import numpy as np
from keras_helpers import BACKEND, compile_tuned, digits, loss_object, mlp

from eos_core import CDAT
from eos_core.adapters.keras import CurvatureTuner
from eos_core.integrations.keras import EdgeOfStabilityCallback

STEPS = 12


def keras_run(x, y, law):
    model = compile_tuned(mlp(hidden=16, seed=4), CurvatureTuner(keras.optimizers.SGD(0.125, momentum=0.9), law,
                                                                   sharpness_every=4))
    callback = EdgeOfStabilityCallback()
    model.fit(x, y, batch_size=len(x), epochs=STEPS, shuffle=False, verbose=0, callbacks=[callback])
    return callback.history, [w.numpy() for w in model.trainable_variables]


def jax_run(x, y, law):
    import jax
    import jax.numpy as jnp
    import optax

    from eos_core.adapters.jax import diagnostics, tune

    model = mlp(hidden=16, seed=4)
    loss = loss_object()
    non_trainable = [v.value for v in model.non_trainable_variables]
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    def value_fn(params):
        logits, _ = model.stateless_call(params, non_trainable, xs)
        return loss(ys, logits)

    opt = tune(optax.sgd(1.0, momentum=0.9), law, sharpness_every=4)
    params = [jnp.asarray(v.value) for v in model.trainable_variables]
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(value_fn)(params)
        updates, state = opt.update(grads, state, params, value_fn=value_fn)
        return optax.apply_updates(params, updates), state

    history = {"lr": [], "sharpness": []}
    for _ in range(STEPS):
        params, state = step(params, state)
        d = diagnostics(state)
        history["lr"].append(d["lr"])
        history["sharpness"].append(d["sharpness"])
    return history, [np.asarray(p) for p in params]


def torch_run(x, y, law):
    import torch

    from eos_core.adapters.torch import CurvatureTuner as TorchCurvatureTuner

    model = mlp(hidden=16, seed=4)
    loss = loss_object()
    params = [v.value for v in model.trainable_variables]
    tuner = TorchCurvatureTuner(torch.optim.SGD(params, lr=0.125, momentum=0.9), law, sharpness_every=4)
    xs, ys = torch.as_tensor(x), torch.as_tensor(y)

    def closure():
        tuner.zero_grad()
        value = loss(ys, model(xs))
        value.backward()
        return value

    history = {"lr": [], "sharpness": []}
    for _ in range(STEPS):
        tuner.step(closure)
        history["lr"].append(tuner.diagnostics["lr"])
        history["sharpness"].append(tuner.diagnostics.get("sharpness", np.nan))
    return history, [p.detach().numpy().copy() for p in params]


def test_keras_wrapper_and_backend_adapter_give_the_same_learning_rates():
    x, y = digits(300)
    law = CDAT(scale=2.0)
    wrapped, wrapped_weights = keras_run(x, y, law)
    native, native_weights = (jax_run if BACKEND == "jax" else torch_run)(x, y, law)
    assert len(wrapped["lr"]) == len(native["lr"]) == STEPS
    # the same float32 computation in a different order: rounding differences only, not amplified over 12 steps
    np.testing.assert_allclose(wrapped["lr"], native["lr"], rtol=1e-5)
    np.testing.assert_allclose(wrapped["sharpness"], native["sharpness"], rtol=1e-4)
    assert np.isfinite(wrapped["sharpness"][::4]).all()
    for a, b in zip(wrapped_weights, native_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
