"""A clock for the PyTorch sharpness monitor that never advances (shared by the callback and Keras tests).

The callbacks run the sharpness monitor by default, and it spaces its Hessian-vector products by the measured times
of a step and of a product; on two shared cores those vary from run to run. With a clock that never advances no time
is measured and the monitor follows the core's cost model (`eos_core.monitor.COST_MODEL`), so a run, and a resumed
run, tick at the same steps every time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest


class StoppedClock:
    """A `time` module whose clock never advances."""

    @staticmethod
    def perf_counter() -> float:
        return 0.0


@contextlib.contextmanager
def stopped_monitor_clock() -> Iterator[None]:
    """The PyTorch monitor reads [`StoppedClock`][] while the context is open."""
    from eos_core.adapters.torch import monitor

    patch = pytest.MonkeyPatch()
    patch.setattr(monitor, "time", StoppedClock())
    try:
        yield
    finally:
        patch.undo()


def steady_monitor_clock_fixture(backend: str | None = None) -> Any:
    """An autouse session fixture that runs the tests under [`stopped_monitor_clock`][] (only when `KERAS_BACKEND`
    is `backend`, if given): runs and resumed runs tick at the same steps. Assign it in a conftest."""

    @pytest.fixture(autouse=True, scope="session")
    def steady_monitor_clock() -> Iterator[None]:
        if backend is not None and os.environ.get("KERAS_BACKEND") != backend:
            yield
            return
        with stopped_monitor_clock():
            yield

    return steady_monitor_clock
