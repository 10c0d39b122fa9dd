"""The conformance case on the Keras adapter, on the backend named by KERAS_BACKEND (run as a script: it prints
the diagnostics of every law as JSON).

The model is the case's tanh MLP and loss written with the backend's own array functions. Keras 3.15 computes
several of its ops on a float64 tensor in float32 outside TensorFlow (its ``result_type`` maps float64 to
float32): ``ops.tanh`` on JAX, ``ops.matmul`` and ``ops.divide_no_nan`` (the mean reduction of every Keras loss)
on torch, ``ops.mean`` on both. A ``Dense(activation="tanh")`` model with ``loss="mse"`` is therefore a float32
model whatever ``floatx`` says: its loss is 1e-7 off the float64 loss the other frameworks compute, and the
edge-of-stability dynamics amplify that past the conformance tolerance. The tuner itself only ever sees the
loss Keras computes and the gradient it takes, so writing the model in float64 is all this case needs.
"""

from __future__ import annotations

import json
import sys

import keras
from conformance_case import LAWS, LR, MOMENTUM, OPTIONS, STEPS, comparable, make_law, problem

from eos_core.adapters.keras import CurvatureTuner, current_diagnostics
from eos_core.integrations.keras import EdgeOfStabilityCallback

BACKEND = keras.backend.backend()
if BACKEND == "jax":  # float64 arrays need x64 in JAX (conformance_jax.py does the same)
    import jax
    import jax.numpy as xp

    jax.config.update("jax_enable_x64", True)
else:
    import torch as xp


class Dense(keras.layers.Layer):
    """``x @ kernel + bias`` (then tanh), kernel shaped (in, out) as in every framework of the case, computed by the
    backend's own ``matmul`` and ``tanh`` in the dtype of the weights."""

    def __init__(self, units: int, tanh: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.units, self.tanh = units, tanh

    def build(self, input_shape) -> None:
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")

    def call(self, x):
        z = xp.matmul(x, self.kernel.value) + self.bias.value
        return xp.tanh(z) if self.tanh else z


class MeanSquaredError(keras.losses.Loss):
    """The mean over all entries of the squared error (Keras' "mse"), as a sum over the batch of per-sample sums
    divided by the number of entries (the "sum" reduction adds the per-sample values exactly)."""

    def __init__(self) -> None:
        super().__init__(reduction="sum", name="mean_squared_error")

    def call(self, y_true, y_pred):
        squared = (y_true - y_pred) ** 2
        return squared.sum(-1) / float(y_pred.shape[0] * y_pred.shape[-1])


class Collect(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []

    def on_train_batch_end(self, batch, logs=None) -> None:
        self.rows.append(current_diagnostics(self.model))


def run(name: str) -> list[dict]:
    keras.config.set_floatx("float64")
    x, y, (w1, b1, w2, b2) = problem()
    model = keras.Sequential([keras.Input((x.shape[1],)), Dense(w1.shape[1], tanh=True), Dense(w2.shape[1])])
    model.set_weights([w1, b1, w2, b2])
    tuner = CurvatureTuner(keras.optimizers.SGD(LR, momentum=MOMENTUM), make_law(name), **OPTIONS)
    model.compile(optimizer=tuner, loss=MeanSquaredError())
    collect = Collect()
    model.fit(x, y, batch_size=len(x), epochs=STEPS, shuffle=False, verbose=0,
              callbacks=[EdgeOfStabilityCallback(), collect])
    return comparable(collect.rows)


if __name__ == "__main__":
    names = [n for n in LAWS if n != "dcao"] if len(sys.argv) < 2 else sys.argv[1:]
    json.dump({n: run(n) for n in names}, sys.stdout)
