"""Every law the Keras adapter supports, in ``fit``, against the float64 reference (explicit Hessian of a tiny MLP)."""

import keras
import numpy as np
import pytest
from keras_helpers import BACKEND, NumpyMLP, WeightRecorder, compile_tuned, digits, dot, mlp

from eos_core import AdaEoS, Armijo, ExactSharpness, HyperGradient, Polyak
from eos_core.adapters.keras import CurvatureTuner
from eos_core.integrations.keras import EdgeOfStabilityCallback

HIDDEN = 4  # 310 weights: the explicit Hessian is cheap


def run(law, optimizer=None, steps=2, **options):
    x, y = digits(128)
    optimizer = optimizer or keras.optimizers.SGD(0.25)
    model = compile_tuned(mlp(hidden=HIDDEN, seed=6), CurvatureTuner(optimizer, law, **options))
    recorder, callback = WeightRecorder(), EdgeOfStabilityCallback()
    model.fit(x, y, batch_size=len(x), epochs=steps, shuffle=False, verbose=0, callbacks=[callback, recorder])
    return NumpyMLP(x, y), recorder, callback.history


def top_eigenvalue(matrix):
    eigenvalues = np.linalg.eigvalsh(matrix)
    return eigenvalues[np.argmax(np.abs(eigenvalues))]


def test_polyak_step_is_loss_over_squared_gradient_norm():
    net, recorder, history = run(Polyak(lr_max=10.0), steps=3)
    for t, w in enumerate(recorder.before):
        loss, g = net.loss_and_grad(w)
        assert history["lr"][t] == pytest.approx(min(loss / dot(g, g), 10.0), rel=1e-5)
        assert history["loss"][t] == pytest.approx(loss, rel=1e-5)


def test_exact_sharpness_uses_the_top_hessian_eigenvalue():
    net, recorder, history = run(ExactSharpness(scale=2.0, power_iters=300, power_tol=1e-7))
    for t, w in enumerate(recorder.before):
        top = top_eigenvalue(net.hessian(w))
        assert history["sharpness"][t] == pytest.approx(top, rel=1e-3)
        assert history["lr"][t] == pytest.approx(2.0 / history["sharpness"][t], rel=1e-5)


def test_adaeos_feedback_on_the_warm_started_estimate():
    lr0, gamma = 0.25, 0.5
    net, recorder, history = run(AdaEoS(target=2.0, gamma=gamma, power_iters=3), steps=3)
    lr = lr0
    for t, w in enumerate(recorder.before):
        estimate = history["sharpness"][t]
        assert 0 < estimate <= abs(top_eigenvalue(net.hessian(w))) * (1 + 1e-4)  # a Rayleigh quotient
        lr = lr * float(np.clip((2.0 / (lr * estimate)) ** gamma, 0.5, 2.0))
        assert history["lr"][t] == pytest.approx(lr, rel=1e-4)


def test_armijo_accepts_the_largest_trial_step_with_sufficient_decrease():
    c, c_minus = 0.3, 0.5
    net, recorder, history = run(Armijo(c=c, c_minus=c_minus, c_plus=2.0, lr_max=8.0), steps=3)
    for t, w in enumerate(recorder.before):
        loss, g = net.loss_and_grad(w)

        def sufficient(lr, w=w, loss=loss, g=g):
            trial = net.loss_and_grad([a - lr * b for a, b in zip(w, g, strict=True)])[0]
            return trial <= loss - c * lr * dot(g, g)

        lr = history["lr"][t]
        assert history["accepted"][t] == 1.0 and sufficient(lr * (1 - 1e-5))
        if history["trials"][t] > 1:  # the previous, larger trial failed
            assert not sufficient(lr / c_minus * (1 + 1e-5))


def test_hypergradient_uses_the_cosine_with_the_previous_update():
    beta = 0.2
    net, recorder, history = run(HyperGradient(beta=beta), steps=3)
    lr, previous = 0.25, None
    for t, w in enumerate(recorder.before):
        g = net.grad(w)
        cosine = 0.0 if previous is None else dot(g, previous) / (dot(g, g) * dot(previous, previous)) ** 0.5
        lr = lr * (1 - beta * cosine)
        assert history["lr"][t] == pytest.approx(lr, rel=1e-5)
        assert history["cosine"][t] == pytest.approx(cosine, abs=1e-5)
        previous = [-a for a in g]


def test_sharpness_and_preconditioned_sharpness_of_adam():
    beta_1, beta_2, epsilon = 0.9, 0.999, 1e-7
    adam = keras.optimizers.Adam(0.01, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)
    # JAX also runs a law on the preconditioned Hessian; torch refuses those laws (test_settings.py)
    law = (ExactSharpness(scale=2.0, preconditioned=True, power_iters=400, power_tol=1e-8) if BACKEND == "jax"
           else Polyak(lr_max=0.01))
    net, recorder, history = run(law, adam, steps=1, sharpness_every=1, sharpness_iters=400, sharpness_tol=1e-8)
    w = recorder.before[0]
    hessian = net.hessian(w)
    assert history["sharpness"][0] == pytest.approx(top_eigenvalue(hessian), rel=1e-3)
    assert history["lr_sharpness"][0] == pytest.approx(history["lr"][0] * history["sharpness"][0], rel=1e-6)
    # Keras Adam after its first step, at lr = 1: u = -P^{-1} m with P = (sqrt(v) + eps) (1 - beta_1) / sqrt(1 - beta_2)
    g = np.concatenate([a.ravel() for a in net.grad(w)])
    p = (np.sqrt((1 - beta_2) * g**2) + epsilon) * (1 - beta_1) / np.sqrt(1 - beta_2)
    expected = top_eigenvalue(hessian / np.sqrt(np.outer(p, p)))
    assert history["preconditioned_sharpness"][0] == pytest.approx(expected, rel=2e-2)
    if BACKEND == "jax":  # ExactSharpness(preconditioned=True): lr = 2 / lambda_max(P^-1/2 H P^-1/2)
        assert history["lr"][0] * expected == pytest.approx(2.0, rel=2e-2)
