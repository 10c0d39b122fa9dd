"""Exponential moving averages of the scalar estimates laws smooth (CDAT paper, section 3)."""

from __future__ import annotations

from typing import Any


def ema_update(average: Any, value: Any, beta: float) -> Any:
    r"""One EMA step in the CDAT paper's convention: $\tilde x_{t+1} = (1-\beta) x_t + \beta \tilde x_t$.

    Works on any array namespace.

    Args:
        average: the current average $\tilde x_t$.
        value: the new estimate $x_t$.
        beta: $\beta$, the weight of the past (0 disables smoothing).

    Returns:
        $\tilde x_{t+1}$.
    """
    return (1.0 - beta) * value + beta * average


def bias_correction(beta: float, count: Any) -> Any:
    r"""The factor $1 - \beta^{t}$ carried by an EMA that started at 0 after `t` updates.

    Divide the EMA by it to read an unbiased average. A *ratio* of two EMAs updated together (CDAT's
    n~/d~) carries the same factor in numerator and denominator and needs no correction.

    Args:
        beta: the EMA's weight of the past.
        count: t, the number of updates so far.

    Returns:
        $1 - \beta^t$.
    """
    return 1.0 - beta**count
