"""eos_core: curvature-aware learning-rate tuners and edge-of-stability diagnostics.

The core is pure Python + numpy and never imports a deep-learning framework. Framework adapters
live in :mod:`eos_core.adapters` (``torch``, ``jax``, ``keras``) and trainer callbacks in
:mod:`eos_core.integrations` (``lightning``, ``transformers``, ``keras``).
"""

from eos_core import routes, stats
from eos_core.laws import (
    CDAT,
    DCAO,
    AdaEoS,
    Armijo,
    Constant,
    ExactSharpness,
    HyperGradient,
    Law,
    LawOutput,
    Polyak,
    WarmupCosine,
)
from eos_core.numerics import NUMPY, Numerics

__version__ = "0.1.0"

__all__ = [
    "CDAT",
    "DCAO",
    "NUMPY",
    "AdaEoS",
    "Armijo",
    "Constant",
    "ExactSharpness",
    "HyperGradient",
    "Law",
    "LawOutput",
    "Numerics",
    "Polyak",
    "WarmupCosine",
    "__version__",
    "routes",
    "stats",
]
