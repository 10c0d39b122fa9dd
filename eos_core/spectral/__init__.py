"""Spectral estimators that see only an operator `v -> H v` and a [`VectorOps`][eos_core.spectral.VectorOps].

One implementation serves numpy arrays (here), torch parameter lists and JAX pytrees (adapters).
"""

from eos_core.spectral.density import SpectralDensity, hutchinson_trace, spectral_density
from eos_core.spectral.lanczos import LanczosResult, default_num_steps, lanczos, lanczos_tridiagonal
from eos_core.spectral.operators import preconditioned_operator, shifted_operator
from eos_core.spectral.power_iteration import PowerIterationResult, power_iteration
from eos_core.spectral.start import random_start
from eos_core.spectral.tracking import (
    MonitorBudget,
    TrackerState,
    tracker_age,
    tracker_init,
    tracker_refocused,
    tracker_restarted,
    tracker_step,
    tracker_vector,
)
from eos_core.spectral.vector_ops import NumpyOps, VectorOps

__all__ = [
    "LanczosResult",
    "MonitorBudget",
    "NumpyOps",
    "PowerIterationResult",
    "SpectralDensity",
    "TrackerState",
    "VectorOps",
    "default_num_steps",
    "hutchinson_trace",
    "lanczos",
    "lanczos_tridiagonal",
    "power_iteration",
    "preconditioned_operator",
    "random_start",
    "shifted_operator",
    "spectral_density",
    "tracker_age",
    "tracker_init",
    "tracker_refocused",
    "tracker_restarted",
    "tracker_step",
    "tracker_vector",
]
