"""``fit`` on scikit-learn's digits with CDAT(scale=2): the learning-rate trajectory is the core law fed statistics
computed independently (float64 numpy backpropagation, Hessian-vector products by central differences)."""

import keras
import numpy as np
from keras_helpers import NumpyMLP, WeightRecorder, compile_tuned, digits, dot, mlp

from eos_core import CDAT
from eos_core import stats as S
from eos_core.adapters.keras import CurvatureTuner
from eos_core.integrations.keras import EdgeOfStabilityCallback

#: the exact route of the backend (torch's "auto" switches to finite differences where they agree)
EXACT = "double-backward" if keras.backend.backend() == "torch" else "auto"


def reference_trajectory(law, weights_before, batches, momentum=0.0):
    """Replay ``law`` on statistics from the float64 reference at the weights the run actually had.

    u_t is Keras SGD's update for lr = 1: m_t = momentum m_{t-1} - g_t, u_t = m_t (heavy ball).
    Returns the learning rates, the directions u_t and the losses.
    """
    state = law.init(None)
    buffer = None
    lrs, directions, losses = [], [], []
    for w, (x, y) in zip(weights_before, batches, strict=True):
        net = NumpyMLP(x, y)
        loss, g = net.loss_and_grad(w)
        buffer = [-a for a in g] if buffer is None else [momentum * b - a for b, a in zip(buffer, g, strict=True)]
        u = buffer
        hu = net.hvp(w, u)
        out = law.update(state, {S.GRAD_DOT_UPDATE: dot(g, u), S.CURVATURE: dot(u, hu)})
        state = out.state
        lrs.append(float(out.lr))
        directions.append(u)
        losses.append(loss)
    return np.array(lrs), directions, np.array(losses)


def check_steps(recorder, lrs, directions):
    """w_{t+1} = w_t + lr_t u_t for every recorded step, with the run's lr_t and the reference's u_t: the step
    agrees to float32 accuracy (1e-5 of the step's size, plus float32 rounding of the weights)."""
    after = recorder.before[1:] + [recorder.after]
    for before, nxt, lr, u in zip(recorder.before, after, lrs, directions, strict=True):
        for w0, w1, d in zip(before, nxt, u, strict=True):
            step = lr * d
            np.testing.assert_allclose(w1 - w0, step, rtol=0, atol=1e-5 * np.abs(step).max() + 1e-6 * np.abs(w0).max())


def test_full_batch_cdat_matches_core_law_on_independent_statistics():
    x, y = digits(400)
    model = compile_tuned(mlp(hidden=16), CurvatureTuner(keras.optimizers.SGD(0.1), CDAT(scale=2.0), route=EXACT))
    recorder, callback = WeightRecorder(), EdgeOfStabilityCallback()
    steps = 25
    history = model.fit(x, y, batch_size=len(x), epochs=steps, shuffle=False, verbose=0,
                        callbacks=[callback, recorder])

    lrs, directions, losses = reference_trajectory(CDAT(scale=2.0), recorder.before, [(x, y)] * steps)
    # float32 gradients and a float32 forward-over-forward u^T H u against float64: about 1e-6 relative
    np.testing.assert_allclose(callback.history["lr"], lrs, rtol=2e-4)
    check_steps(recorder, callback.history["lr"], directions)
    assert losses[-1] < 0.6 * losses[0]
    # History holds the diagnostics (one value per epoch = per step here)
    for key in ("eos/lr", "eos/numerator", "eos/denominator", "eos/loss", "eos/grad_norm"):
        assert len(history.history[key]) == steps
    np.testing.assert_allclose(history.history["eos/lr"], lrs, rtol=2e-4)
    np.testing.assert_allclose(history.history["eos/loss"], losses, rtol=1e-4)
    # n = max(-g.u, 0) = |g|^2 for u = -g
    np.testing.assert_allclose(history.history["eos/numerator"], np.square(history.history["eos/grad_norm"]),
                               rtol=1e-4)
    assert model.optimizer.lr == callback.history["lr"][-1]


def test_mini_batch_heavy_ball_cdat_with_ema_matches_core_law():
    x, y = digits(320)
    batch, epochs = 64, 3
    law = CDAT(scale=2.0, ema=0.9)
    model = compile_tuned(mlp(hidden=16, seed=1),
                          CurvatureTuner(keras.optimizers.SGD(0.05, momentum=0.9), law, route=EXACT))
    recorder, callback = WeightRecorder(), EdgeOfStabilityCallback()
    history = model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0,
                        callbacks=[callback, recorder])

    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)] * epochs
    lrs, directions, losses = reference_trajectory(law, recorder.before, batches, momentum=0.9)
    np.testing.assert_allclose(callback.history["lr"], lrs, rtol=2e-4)
    check_steps(recorder, callback.history["lr"], directions)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert len(history.history["eos/lr"]) == epochs
    # the epoch's value is the last step's
    np.testing.assert_allclose(history.history["eos/lr"], lrs[len(x) // batch - 1::len(x) // batch], rtol=2e-4)
    np.testing.assert_allclose(history.history["eos/numerator_ema"][-1], callback.history["numerator_ema"][-1])
