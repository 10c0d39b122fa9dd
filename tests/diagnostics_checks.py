"""Comparisons of diagnostics dicts shared by the Lightning and Trainer callback tests (and the scripts they run)."""

import math


def measured(diagnostics: dict, name: str, default=None):
    """The value of ``name`` when it was measured on that step: the tuner reports NaN (or leaves out) the rest."""
    value = diagnostics.get(name)
    return default if value is None or math.isnan(value) else value


def same_diagnostics(a: dict, b: dict) -> bool:
    """Same keys and bit-identical values (NaN equal to NaN)."""
    def same(x, y):
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            return True
        return x == y and type(x) is type(y)
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
