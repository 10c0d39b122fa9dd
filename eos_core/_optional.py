"""Import guards for optional frameworks: a missing one raises ImportError naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import `module` or raise ImportError telling the user which extra of eos-core provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{feature} needs the '{module}' package, which is not installed. "
            f"Install it with: pip install 'eos-core[{extra}]'"
        ) from error
