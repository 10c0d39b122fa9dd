"""The Keras callback tests share the Keras adapter tests' helpers (tests/adapters/keras/keras_helpers.py).

They run on the backend named by KERAS_BACKEND (jax or torch; jax when unset), like the adapter tests.
"""

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[2]  # tests/, for stopped_clock.py
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from stopped_clock import steady_monitor_clock_fixture  # noqa: E402

os.environ.setdefault("KERAS_BACKEND", "jax")
if os.environ["KERAS_BACKEND"] not in ("jax", "torch"):
    collect_ignore_glob = ["test_*.py"]
else:
    pytest.importorskip("keras")
    pytest.importorskip(os.environ["KERAS_BACKEND"])
    pytest.importorskip("sklearn")
    if os.environ["KERAS_BACKEND"] == "jax":
        pytest.importorskip("optax")

HELPERS = Path(__file__).resolve().parents[2] / "adapters" / "keras"
if str(HELPERS) not in sys.path:
    sys.path.insert(0, str(HELPERS))


def pytest_configure(config):
    # Keras 3 converts its variables with np.array(x, copy=False) semantics that NumPy 2 deprecates; noise only
    config.addinivalue_line("filterwarnings",
                            "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


steady_monitor_clock = steady_monitor_clock_fixture("torch")  # the PyTorch monitor's clock stands still
