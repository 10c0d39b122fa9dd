"""Checks for settings: each failure is a ValueError that names the setting and its owner."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any


def reject_unknown(owner: str, unknown: Mapping[str, Any], valid: Iterable[str]) -> None:
    """Raise ValueError when `unknown` (the `**options` a constructor received) is not empty."""
    if unknown:
        names = ", ".join(sorted(unknown))
        raise ValueError(
            f"{owner} got unknown option(s) {names}; valid options are: {', '.join(sorted(valid))}"
        )


def as_float(owner: str, name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a number, got {value!r}") from None
    if math.isnan(out):
        raise ValueError(f"{owner}: {name} must not be NaN")
    return out


def positive(owner: str, name: str, value: Any, *, allow_inf: bool = False) -> float:
    out = as_float(owner, name, value)
    if not out > 0 or (math.isinf(out) and not allow_inf):
        raise ValueError(f"{owner}: {name} must be > 0{'' if allow_inf else ' and finite'}, got {value!r}")
    return out


def non_negative(owner: str, name: str, value: Any, *, allow_inf: bool = False) -> float:
    out = as_float(owner, name, value)
    if out < 0 or (math.isinf(out) and not allow_inf):
        raise ValueError(f"{owner}: {name} must be >= 0{'' if allow_inf else ' and finite'}, got {value!r}")
    return out


def in_interval(
    owner: str, name: str, value: Any, low: float, high: float, *, closed_low: bool, closed_high: bool
) -> float:
    out = as_float(owner, name, value)
    ok_low = out >= low if closed_low else out > low
    ok_high = out <= high if closed_high else out < high
    if not (ok_low and ok_high):
        interval = f"{'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"
        raise ValueError(f"{owner}: {name} must lie in {interval}, got {value!r}")
    return out


def positive_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value < 1:
        raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r}")
    return int(value)


def lr_bounds(owner: str, lr_min: Any, lr_max: Any) -> tuple[float, float]:
    low = non_negative(owner, "lr_min", lr_min)
    high = positive(owner, "lr_max", lr_max, allow_inf=True)
    if low > high:
        raise ValueError(f"{owner}: lr_min ({low}) must not exceed lr_max ({high})")
    return low, high


def ordered_pair(owner: str, name: str, value: Any, *, low: float | None = None) -> tuple[float, float]:
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a pair (low, high), got {value!r}") from None
    a, b = as_float(owner, name, a), as_float(owner, name, b)
    if a > b:
        raise ValueError(f"{owner}: {name} must satisfy low <= high, got {value!r}")
    if low is not None and a < low:
        raise ValueError(f"{owner}: {name} must have low >= {low}, got {value!r}")
    return a, b
