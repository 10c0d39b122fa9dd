"""Cross-framework conformance: PyTorch, JAX and Keras (JAX and torch backends) fed the same model, data, optimizer
and law report the same diagnostics (same keys; the same values to 1e-6 in float64) over 30 steps, for all ten
laws (Keras refuses DCAO: it compiles momentum and weight decay into its train step)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conformance_case import ATOL, LAWS, RTOL  # noqa: E402

pytest.importorskip("torch")
pytest.importorskip("jax")


def _close(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=RTOL, abs_tol=ATOL)


def assert_same(reference: list[dict], other: list[dict], what: str) -> None:
    assert len(reference) == len(other), what
    for step, (a, b) in enumerate(zip(reference, other, strict=True)):
        assert set(a) == set(b), f"{what}, step {step}: keys differ: {sorted(set(a) ^ set(b))}"
        wrong = {k: (a[k], b[k]) for k in a if not _close(a[k], b[k])}
        assert not wrong, f"{what}, step {step}: {wrong}"


@pytest.fixture(scope="module")
def torch_rows():
    import conformance_torch

    return {name: conformance_torch.run(name) for name in LAWS}


@pytest.fixture(scope="module")
def jax_rows():
    import conformance_jax

    return {name: conformance_jax.run(name) for name in LAWS}


def _keras_rows(backend: str) -> dict:
    os.environ.setdefault("KERAS_BACKEND", "jax")  # keras' import-time default is TensorFlow, not installed
    pytest.importorskip("keras")
    env = {**os.environ, "KERAS_BACKEND": backend}
    done = subprocess.run([sys.executable, str(HERE / "conformance_keras.py")], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("law", LAWS)
def test_torch_and_jax_report_the_same_diagnostics(law, torch_rows, jax_rows):
    rows = torch_rows[law]
    assert any(r["probed"] == 1.0 for r in rows) or law in ("constant", "warmup-cosine")
    assert any(isinstance(r["sharpness"], float) for r in rows)  # tracking ran
    assert_same(rows, jax_rows[law], f"{law}: torch vs JAX")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_reports_the_same_diagnostics(backend, torch_rows):
    rows = _keras_rows(backend)
    assert set(rows) == set(LAWS) - {"dcao"}
    for law, keras_rows in rows.items():
        assert_same(torch_rows[law], keras_rows, f"{law}: torch vs Keras on {backend}")
