"""Which Keras backend is active, checked before and after `import keras`: JAX and torch only.

Keras picks its backend when it is first imported, from `KERAS_BACKEND` or else the `"backend"`
entry of `$KERAS_HOME/keras.json` (`~/.keras/keras.json`), default `"tensorflow"`. The curvature
probes reuse the JAX adapter ([`eos_core.adapters.jax`][]) on the JAX backend and the PyTorch adapter
([`eos_core.adapters.torch`][]) on the torch backend; there is no TensorFlow adapter, so any other
backend is refused with an ImportError that says what to set. The check runs before `import keras`
too, because with the TensorFlow backend selected and TensorFlow not installed `import keras` itself
fails, and that failure must not be reported as "keras is not installed".
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

from eos_core._optional import require

SUPPORTED_BACKENDS: tuple[str, ...] = ("jax", "torch")


def configured_backend() -> str:
    """The backend Keras will use when it is first imported, read without importing it.

    Returns:
        `KERAS_BACKEND` when set, else the `"backend"` entry of `$KERAS_HOME/keras.json` (`~/.keras/keras.json`),
        else `"tensorflow"` (also when that file is missing or unreadable).
    """
    name = os.environ.get("KERAS_BACKEND")
    if name:
        return name
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    try:
        return str(json.loads((home / "keras.json").read_text()).get("backend", "tensorflow"))
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def unsupported_message(feature: str, backend: str) -> str:
    """The ImportError's text for `feature` on the unsupported Keras backend `backend` (it says what to set)."""
    return (
        f"{feature} supports the Keras backends {' and '.join(SUPPORTED_BACKENDS)}; the active Keras backend is "
        f"{backend!r}. TensorFlow (and every other backend) is not supported: its curvature probes would need a "
        "third implementation of the oracles. Set KERAS_BACKEND=jax or KERAS_BACKEND=torch before Keras is first "
        "imported (or put \"backend\": \"jax\" in ~/.keras/keras.json)."
    )


def import_keras(feature: str, extra: str = "keras") -> ModuleType:
    """`import keras` for `feature`, checking the backend before and after the import.

    Args:
        feature: what needs Keras, named in the errors (e.g. `"eos_core.adapters.keras"`).
        extra: the `eos-core` extra that installs Keras, named when it is missing.

    Returns:
        The `keras` module, with the JAX or torch backend active.

    Raises:
        ImportError: Keras is not installed (naming the extra), or the configured or active backend is not one of
            `SUPPORTED_BACKENDS` (saying how to select `jax` or `torch`).
    """
    if importlib.util.find_spec("keras") is not None:
        backend = _imported_backend() or configured_backend()
        if backend not in SUPPORTED_BACKENDS:
            raise ImportError(unsupported_message(feature, backend))
    keras = require("keras", extra=extra, feature=feature)
    active = keras.backend.backend()
    if active not in SUPPORTED_BACKENDS:
        raise ImportError(unsupported_message(feature, active))
    return keras


def _imported_backend() -> str | None:
    """The backend of an already imported Keras (None when Keras is not imported yet)."""
    config = sys.modules.get("keras.src.backend.config")
    if config is None:
        return None
    return str(config.backend())
