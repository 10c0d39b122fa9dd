"""The methods the demo compares, and how `--methods` / `--lr-grid` name them.

* `gd`: gradient descent at each constant learning rate of the grid (default `2^i`,
  i = -2..1: 0.25, 0.5, 1, 2); the best one by final train loss (diverged runs excluded) is the
  baseline the tuners are compared with (claims B2 and B3 of [`eos_core.demo.claims`][]; CDAT paper
  Fig. 1, 5).
* `armijo`: backtracking line search, `eos_core.Armijo()` with the paper's settings
  (appendix C.3: start at `min(4 * lr_prev, 1)`, shrink by 0.8).
* `cdat1` / `cdat2` / `cdat=SCALE`: `eos_core.CDAT(scale=SCALE)` (eq. 8, no EMA: full batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from eos_core.laws import CDAT, Armijo, Constant, Law

#: The default learning-rate grid 2^i, i = -2..1.
DEFAULT_GRID: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
#: The default `--methods`: GD over the grid, Armijo, CDAT(scale=1) and CDAT(scale=2).
DEFAULT_METHODS = "gd,armijo,cdat1,cdat2"
_ALIASES = {"cdat1": 1.0, "cdat2": 2.0}


@dataclass(frozen=True)
class Method:
    """One training run's learning-rate rule.

    Examples:
        >>> Method("cdat", 2.0).label
        'CDAT(scale=2)'
        >>> Method.from_label("GD lr=0.5")
        Method(kind='gd', value=0.5)
    """

    kind: str  #: "gd", "armijo" or "cdat"
    value: float = math.nan  #: the constant lr (gd) or the scale sigma (cdat)

    @property
    def label(self) -> str:
        """The run's name in tables, figures and CSV files.

        Returns:
            `"GD lr=<value>"`, `"Armijo"` or `"CDAT(scale=<value>)"` (values formatted with `:g`).
        """
        if self.kind == "gd":
            return f"GD lr={self.value:g}"
        if self.kind == "armijo":
            return "Armijo"
        return f"CDAT(scale={self.value:g})"

    @classmethod
    def from_label(cls, label: str) -> Method:
        """Parse a run's name back into its method, the inverse of [`label`][eos_core.demo.methods.Method.label].

        Args:
            label: `"GD lr=0.5"`, `"Armijo"` or `"CDAT(scale=2)"`; surrounding whitespace is ignored.

        Returns:
            The method the label names.

        Raises:
            ValueError: `label` is none of the three forms, or its lr or scale is not a number.
        """
        text = label.strip()
        try:
            if text.startswith("GD lr="):
                return cls("gd", float(text[len("GD lr="):]))
            if text == "Armijo":
                return cls("armijo")
            if text.startswith("CDAT(scale=") and text.endswith(")"):
                return cls("cdat", float(text[len("CDAT(scale="):-1]))
        except ValueError:
            pass
        raise ValueError(f"not a demo method label: {label!r}")

    def law(self) -> Law:
        """The learning-rate law that runs this method.

        Returns:
            `Constant(value)` for `gd`, `Armijo()` with its defaults (the paper's settings) for `armijo`, and
            `CDAT(scale=value)` with its defaults (no EMA) for `cdat`.
        """
        if self.kind == "gd":
            return Constant(self.value)
        if self.kind == "armijo":
            return Armijo()
        return CDAT(scale=self.value)


def parse_grid(text: str) -> tuple[float, ...]:
    """Parse the `--lr-grid` option.

    Args:
        text: comma-separated learning rates, e.g. `"0.25,0.5,1"`.

    Returns:
        The distinct learning rates in increasing order, e.g. `(0.25, 0.5, 1.0)`.

    Raises:
        ValueError: an entry is not a number, is not > 0 and finite, or `text` holds no entry; the message names
            `--lr-grid`.

    Examples:
        >>> parse_grid("1, 0.25,0.5,1")
        (0.25, 0.5, 1.0)
    """
    values = []
    for token in (t.strip() for t in text.split(",")):
        try:
            value = float(token)
        except ValueError:
            raise ValueError(f"--lr-grid: {token!r} is not a number (expected e.g. 0.25,0.5,1,2)") from None
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--lr-grid: learning rates must be > 0 and finite, got {token!r}")
        values.append(value)
    if not values:
        raise ValueError("--lr-grid: give at least one learning rate")
    return tuple(sorted(set(values)))


def parse_methods(text: str, grid: tuple[float, ...] = DEFAULT_GRID) -> list[Method]:
    """Parse the `--methods` option into the runs, in order.

    `gd` expands to one run per grid learning rate; `cdat1` and `cdat2` are `cdat=1` and `cdat=2`. Duplicates are
    dropped (the first occurrence keeps its place).

    Args:
        text: comma-separated `gd`, `armijo`, `cdat1`, `cdat2`, `cdat=SCALE` (case-insensitive, blanks ignored).
        grid: the constant learning rates `gd` expands to (default
            [`DEFAULT_GRID`][eos_core.demo.methods.DEFAULT_GRID]).

    Returns:
        One [`Method`][eos_core.demo.methods.Method] per run.

    Raises:
        ValueError: `text` names no method, an unknown method, or a `cdat=` scale that is not a number or not > 0
            and finite; the message names `--methods`.

    Examples:
        >>> [m.label for m in parse_methods("gd,cdat2", grid=(0.5, 1.0))]
        ['GD lr=0.5', 'GD lr=1', 'CDAT(scale=2)']
    """
    methods: list[Method] = []
    tokens = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not tokens:
        raise ValueError("--methods: give at least one of gd, armijo, cdat1, cdat2, cdat=SCALE")
    for token in tokens:
        if token == "gd":
            methods += [Method("gd", lr) for lr in grid]
        elif token == "armijo":
            methods.append(Method("armijo"))
        elif token in _ALIASES:
            methods.append(Method("cdat", _ALIASES[token]))
        elif token.startswith("cdat="):
            try:
                scale = float(token.split("=", 1)[1])
            except ValueError:
                raise ValueError(f"--methods: {token!r}: the scale after 'cdat=' must be a number") from None
            if not (scale > 0 and math.isfinite(scale)):
                raise ValueError(f"--methods: {token!r}: the CDAT scale must be > 0 and finite")
            methods.append(Method("cdat", scale))
        else:
            raise ValueError(f"--methods: unknown method {token!r}; choose from gd, armijo, cdat1, cdat2, cdat=SCALE")
    return list(dict.fromkeys(methods))
