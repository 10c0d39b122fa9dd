"""Exponential moving averages of the scalar estimates laws smooth (CDAT paper, section 3)."""

from __future__ import annotations

from typing import Any


def ema_update(average: Any, value: Any, beta: float) -> Any:
    r"""One EMA step in the CDAT paper's convention: :math:`\tilde x_{t+1} = (1-\beta) x_t + \beta \tilde x_t`.

    ``beta`` is the weight of the past (0 disables smoothing). Works on any array namespace.
    """
    return (1.0 - beta) * value + beta * average


def bias_correction(beta: float, count: Any) -> Any:
    r"""The factor :math:`1 - \beta^{t}` carried by an EMA that started at 0 after ``t`` updates.

    Divide the EMA by it to read an unbiased average. A *ratio* of two EMAs updated together (CDAT's
    n~/d~) carries the same factor in numerator and denominator and needs no correction.
    """
    return 1.0 - beta**count
