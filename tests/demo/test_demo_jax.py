"""``eos-core demo --backend jax`` and its agreement with the PyTorch backend (tox env ``jax``)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from eos_core.cli import main  # noqa: E402
from eos_core.demo import jax_backend  # noqa: E402
from eos_core.demo.data import load_dataset  # noqa: E402
from eos_core.demo.methods import Method  # noqa: E402
from eos_core.demo.models import ModelSpec  # noqa: E402


def test_demo_cli_jax_backend(tmp_path, capsys):
    # two methods: each one is a separate jit compilation, the cost of this test
    code = main(["demo", "--backend", "jax", "--steps", "10", "--samples", "200", "--methods", "gd,cdat2",
                 "--lr-grid", "0.5", "--out", str(tmp_path)])
    assert code == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "jax backend" in out and "median lr*sharpness (2nd half)" in out
    for label in ("GD lr=0.5  (best constant)", "CDAT(scale=2)"):
        assert label in out
    assert "[2/2] CDAT(scale=2)" in captured.err  # the progress bar
    assert (tmp_path / "edge_of_stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (tmp_path / "trajectories.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["method", "step", "loss", "lr", "sharpness", "lr_sharpness"]
    cdat = [r for r in rows if r["method"] == "CDAT(scale=2)"]
    assert len(cdat) == 10 and [r["step"] for r in cdat if r["sharpness"]] == ["0", "5"]


@pytest.mark.parametrize("arch, method", [("mlp", Method("cdat", 2.0)), ("cnn", Method("armijo"))])
def test_torch_and_jax_backends_train_the_same_trajectory(arch, method):
    """Same initial weights, same loss, same law: in float64 both adapters produce the same run.

    Losses and learning rates agree to 1e-7 relative: PyTorch's default `route="auto"` moves to one-sided finite
    differences once they agree with double backward (first-order error, about 1e-8 relative in float64 on this
    run), where JAX differentiates exactly. The sharpness agrees as closely: both power iterations (at most
    20 iterations, stopping at 1e-3 relative change) start from the same vector,
    :func:`eos_core.spectral.random_start` on the same parameter shapes in the same order (with their own
    random vectors, on this tiny network whose top eigenvalues are close, they agreed to 10% only).
    """
    pytest.importorskip("torch")
    from eos_core.demo import torch_backend

    data = load_dataset("digits", num_samples=100)
    spec = ModelSpec(arch=arch, width=6)
    x64 = jax.config.read("jax_enable_x64")
    runs = [b.train(method, data, spec, steps=8, sharpness_every=4, dtype="float64")
            for b in (torch_backend, jax_backend)]
    assert jax.config.read("jax_enable_x64") == x64  # float64 only for the duration of the run
    for name, rtol in (("loss", 1e-7), ("lr", 1e-7), ("sharpness", 1e-7)):
        a, b = (getattr(r, name) for r in runs)
        assert np.array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=rtol, err_msg=f"{method.label} {name}")
