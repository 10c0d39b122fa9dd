"""eos_core: curvature-aware learning-rate tuners and edge-of-stability diagnostics.

The core is pure Python + numpy and never imports a deep-learning framework. Framework adapters
live in `eos_core.adapters` (`torch`, `jax`, `keras`) and trainer callbacks in
`eos_core.integrations` (`lightning`, `transformers`, `keras`).
"""

import os as _os

# The repository keeps the layers adapters/ and integrations/ beside this folder, and an install maps them
# into this package (eos_core.adapters, eos_core.integrations). Python run from the repository root imports
# this folder instead of the installed package: let it find the two layers beside it too, so that
# `python -m eos_core demo` and `import eos_core.adapters.torch` behave the same in a checkout as installed.
_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "adapters")) and all(
    _os.path.isfile(_os.path.join(_ROOT, layer, "__init__.py")) for layer in ("adapters", "integrations")
):
    __path__.append(_ROOT)  # noqa: F821 (the package's own __path__)

from eos_core import diagnostics, request, routes, settings, stats  # noqa: E402
from eos_core.laws import (  # noqa: E402
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
from eos_core.numerics import NUMPY, Numerics  # noqa: E402
from eos_core.request import StatsRequest  # noqa: E402
from eos_core.settings import TunerSettings  # noqa: E402

__version__ = "0.2.0"

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
    "StatsRequest",
    "TunerSettings",
    "WarmupCosine",
    "__version__",
    "diagnostics",
    "request",
    "routes",
    "settings",
    "stats",
]
