"""u is the wrapped Keras optimizer's update for learning rate 1: with a constant law the tuned run *is* the plain
Keras run at that learning rate (momentum buffers, bias corrections, decoupled weight decay, constraints)."""

import keras
import numpy as np
import pytest
from keras_helpers import WeightRecorder, compile_tuned, digits, loss_object, mlp

from eos_core import Constant, WarmupCosine
from eos_core.adapters.keras import CurvatureTuner


def adamw_excluding_biases(lr):
    optimizer = keras.optimizers.AdamW(lr, weight_decay=0.1)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    return optimizer


OPTIMIZERS = {
    "sgd-momentum": lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
    "sgd-nesterov-clipnorm": lambda lr: keras.optimizers.SGD(lr, momentum=0.8, nesterov=True, clipnorm=0.5),
    "adam-amsgrad": lambda lr: keras.optimizers.Adam(lr, amsgrad=True),
    "adamw-exclude-bias": adamw_excluding_biases,
    "rmsprop-centered-momentum": lambda lr: keras.optimizers.RMSprop(lr, centered=True, momentum=0.5),
    "adagrad-weight-decay": lambda lr: keras.optimizers.Adagrad(lr, weight_decay=0.01),
    "lion": lambda lr: keras.optimizers.Lion(lr * 0.1),
}


def train(model, optimizer, x, y, epochs=2):
    model.compile(optimizer=optimizer, loss=loss_object())
    model.fit(x, y, batch_size=64, epochs=epochs, shuffle=False, verbose=0)
    return [w.numpy() for w in model.trainable_variables]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_constant_law_reproduces_the_plain_optimizer(name):
    x, y = digits(192)
    lr = 0.05
    plain = train(mlp(hidden=8), OPTIMIZERS[name](lr), x, y)
    inner = OPTIMIZERS[name](lr)
    lr_used = float(inner.learning_rate.numpy())
    tuned = train(mlp(hidden=8), CurvatureTuner(inner, Constant(lr_used)), x, y)
    for a, b in zip(plain, tuned, strict=True):
        # w + lr * u against Keras's own w + (lr-scaled update): float32 rounding of the product only
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)


def test_constraint_is_applied_after_the_tuned_step():
    x, y = digits(128)
    constraint = keras.constraints.NonNeg()
    plain = train(mlp(hidden=8, kernel_constraint=constraint), keras.optimizers.SGD(0.2, momentum=0.9), x, y)
    tuned = train(mlp(hidden=8, kernel_constraint=constraint),
                  CurvatureTuner(keras.optimizers.SGD(0.1, momentum=0.9), Constant(0.2)), x, y)
    assert (tuned[0] >= 0).all() and (tuned[0] == 0).any()
    for a, b in zip(plain, tuned, strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)


def test_schedule_law_needs_no_train_step_wrapper_and_sets_learning_rate():
    x, y = digits(128)
    law = WarmupCosine(peak_lr=0.5, total_steps=4, warmup_steps=2)
    model = compile_tuned(mlp(hidden=8), CurvatureTuner(keras.optimizers.SGD(0.1), law))
    recorder = WeightRecorder()
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[recorder])
    expected = [0.0, 0.25, 0.5, 0.25]  # warm-up over 2 steps, then cosine down to 0 at step 4
    weights = recorder.before + [recorder.after]
    # SGD without momentum: the step is exactly lr * (-g); a zero-lr step leaves the weights unchanged
    np.testing.assert_array_equal(weights[1][0], weights[0][0])
    assert not np.array_equal(weights[2][0], weights[1][0])
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(expected[-1])
    assert model.optimizer.diagnostics["lr"] == pytest.approx(expected[-1])
    assert model.optimizer.diagnostics["step"] == 3  # the index of the last of 4 steps


def count_inside_backend_apply_gradients(optimizer):
    """Make ``optimizer`` count its steps as Keras 3.5 does: inside ``_backend_apply_gradients`` (Keras 3.15's
    ``apply`` increments after that call instead)."""
    original = optimizer._backend_apply_gradients

    def backend_apply_gradients(grads, trainable_variables):
        original(grads, trainable_variables)
        optimizer._iterations.assign_add(1)

    optimizer._backend_apply_gradients = backend_apply_gradients
    return optimizer


@pytest.mark.parametrize("keras_counts_inside", [False, True], ids=["keras-3.15", "keras-3.5"])
def test_each_step_is_counted_once_whatever_keras_version_counts_it(keras_counts_inside):
    x, y = digits(192)
    lr, epochs = 0.01, 2
    steps = epochs * len(x) // 64
    plain = train(mlp(hidden=8), keras.optimizers.Adam(lr), x, y, epochs=epochs)
    inner = keras.optimizers.Adam(lr)
    if keras_counts_inside:
        count_inside_backend_apply_gradients(inner)
    model = mlp(hidden=8)
    tuned = train(model, CurvatureTuner(inner, Constant(float(inner.learning_rate.numpy()))), x, y, epochs=epochs)
    assert int(inner.iterations.numpy()) == steps
    assert int(model.optimizer.iterations.numpy()) == steps
    # Adam's bias correction reads the count: a step counted twice changes every later update
    for a, b in zip(plain, tuned, strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)
