"""The Lightning tests import their shared helpers from this folder (pytest runs with --import-mode=importlib)."""

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[2]  # tests/, for stopped_clock.py
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from stopped_clock import steady_monitor_clock_fixture  # noqa: E402

pytest.importorskip("lightning")
pytest.importorskip("sklearn")

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


steady_monitor_clock = steady_monitor_clock_fixture()  # the PyTorch monitor's clock stands still
