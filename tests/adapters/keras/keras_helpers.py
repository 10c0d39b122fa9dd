"""Helpers for the Keras tests: digits data, a tiny MLP with numpy-drawn weights, an independent float64 reference.

The reference (:class:`NumpyMLP`) is the same network written in numpy: the loss and its gradient by hand
(backpropagation in float64) and Hessian-vector products by central differences of that gradient. It
shares no code with Keras, JAX, PyTorch or eos_core's adapters, so statistics computed with it check the
tuner independently.
"""

from __future__ import annotations

import functools

import keras
import numpy as np

BACKEND = keras.backend.backend()


@functools.cache
def digits(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, inputs scaled to [0, 1] (float32), the first ``n`` samples."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype("float32"), y.astype("int32")
    return (x, y) if n is None else (x[:n], y[:n])


def initial_weights(hidden: int, seed: int = 0, inputs: int = 64, classes: int = 10) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((inputs, hidden)) / np.sqrt(inputs)).astype("float32"),
        np.full((hidden,), 0.01, "float32"),
        (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype("float32"),
        np.zeros((classes,), "float32"),
    ]


def mlp(hidden: int = 8, seed: int = 0, *, dropout: float | None = None, batchnorm: bool = False,
        kernel_constraint=None) -> keras.Model:
    """Input(64) -> Dense(hidden, tanh) [-> BatchNorm] [-> Dropout] -> Dense(10) logits, same weights on any backend."""
    layers = [keras.Input((64,)), keras.layers.Dense(hidden, activation="tanh", kernel_constraint=kernel_constraint)]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    if dropout:
        layers.append(keras.layers.Dropout(dropout, seed=seed))
    layers.append(keras.layers.Dense(10))
    model = keras.Sequential(layers)
    weights = initial_weights(hidden, seed)
    if batchnorm:
        weights = weights[:2] + [w.numpy() for w in model.layers[1].weights] + weights[2:]
    model.set_weights(weights)
    return model


LOSS = "sparse_categorical_crossentropy_from_logits"


def loss_object() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def trainable_values(model: keras.Model) -> list[np.ndarray]:
    """The trainable weights now, also in the middle of ``fit`` (JAX keeps them in ``model._jax_state``)."""
    state = getattr(model, "_jax_state", None)
    if isinstance(state, dict) and state.get("trainable_variables"):
        return [np.array(v, dtype=np.float64) for v in state["trainable_variables"]]
    return [np.array(v.numpy(), dtype=np.float64, copy=True) for v in model.trainable_variables]


class WeightRecorder(keras.callbacks.Callback):
    """Records the trainable weights entering every training step (``before[t]``) and after the last one."""

    def __init__(self) -> None:
        super().__init__()
        self.before: list[list[np.ndarray]] = []

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append(trainable_values(self.model))

    def on_train_end(self, logs=None):
        self.after = trainable_values(self.model)


class NumpyMLP:
    """The tanh MLP with mean softmax cross-entropy, in float64 numpy (weights as [W1, b1, W2, b2])."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x = np.asarray(x, np.float64)
        self.y = np.asarray(y)
        self.onehot = np.eye(10)[self.y]

    def loss_and_grad(self, w: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
        w1, b1, w2, b2 = w
        n = len(self.x)
        a = np.tanh(self.x @ w1 + b1)
        z = a @ w2 + b2
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        loss = float(-np.mean(np.log(p[np.arange(n), self.y])))
        dz = (p - self.onehot) / n
        dz1 = (dz @ w2.T) * (1.0 - a**2)
        return loss, [self.x.T @ dz1, dz1.sum(0), a.T @ dz, dz.sum(0)]

    def grad(self, w: list[np.ndarray]) -> list[np.ndarray]:
        return self.loss_and_grad(w)[1]

    def hvp(self, w: list[np.ndarray], v: list[np.ndarray]) -> list[np.ndarray]:
        """H v by central differences of the float64 gradient (error O(h^2), h ||v|| = 1e-6 max(||w||, 1))."""
        h = 1e-6 * max(norm(w), 1.0) / norm(v)
        plus = self.grad([a + h * b for a, b in zip(w, v, strict=True)])
        minus = self.grad([a - h * b for a, b in zip(w, v, strict=True)])
        return [(p - m) / (2 * h) for p, m in zip(plus, minus, strict=True)]


    def hessian(self, w: list[np.ndarray]) -> np.ndarray:
        """The explicit Hessian (flattened weights, in order) by central differences, symmetrised."""
        flat = np.concatenate([a.ravel() for a in w])
        h = 1e-5 * max(float(np.linalg.norm(flat)), 1.0)
        columns = []
        for i in range(flat.size):
            step = np.zeros_like(flat)
            step[i] = h
            plus = np.concatenate([g.ravel() for g in self.grad(unflatten(flat + step, w))])
            minus = np.concatenate([g.ravel() for g in self.grad(unflatten(flat - step, w))])
            columns.append((plus - minus) / (2 * h))
        matrix = np.stack(columns, axis=1)
        return 0.5 * (matrix + matrix.T)


def unflatten(flat: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    out, start = [], 0
    for a in like:
        out.append(flat[start:start + a.size].reshape(a.shape))
        start += a.size
    return out


def dot(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(sum(np.vdot(x, y) for x, y in zip(a, b, strict=True)))


def norm(a: list[np.ndarray]) -> float:
    return dot(a, a) ** 0.5


def compile_tuned(model: keras.Model, tuner, **kwargs) -> keras.Model:
    model.compile(optimizer=tuner, loss=loss_object(), **kwargs)
    return model
