"""The transformers tests import their shared helpers from this folder (pytest runs with --import-mode=importlib)."""

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[2]  # tests/, for stopped_clock.py
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from stopped_clock import steady_monitor_clock_fixture  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


steady_monitor_clock = steady_monitor_clock_fixture()  # the PyTorch monitor's clock stands still
