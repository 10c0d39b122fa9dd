"""Scalar arithmetic and control flow that laws and spectral estimators are written against.

Every tuning law and spectral estimator in [`eos_core`][] is written once, branch-free, against a
[`Numerics`][eos_core.numerics.Numerics] bundle: an array namespace for scalars (`numpy` here, `jax.numpy` in the JAX
adapter), a float dtype and the control-flow primitives `while_loop` / `fori_loop` with the signatures of
`jax.lax.while_loop` and `jax.lax.fori_loop`. With [`NUMPY`][eos_core.numerics.NUMPY] they run as plain Python loops;
the JAX adapter passes `jax.lax` primitives so the same code traces under `jit`. Nothing here imports a framework.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np


def python_while_loop(cond_fun: Callable[[Any], Any], body_fun: Callable[[Any], Any], init_val: Any) -> Any:
    """`jax.lax.while_loop` semantics in plain Python."""
    val = init_val
    while bool(cond_fun(val)):
        val = body_fun(val)
    return val


def python_fori_loop(lower: int, upper: int, body_fun: Callable[[int, Any], Any], init_val: Any) -> Any:
    """`jax.lax.fori_loop` semantics in plain Python."""
    val = init_val
    for i in range(int(lower), int(upper)):
        val = body_fun(i, val)
    return val


def numpy_index_update(array: np.ndarray, index: Any, value: Any) -> np.ndarray:
    """Functional `array.at[index].set(value)` for numpy (copies, never mutates)."""
    out = np.array(array, copy=True)
    out[int(index)] = value
    return out


class Numerics(NamedTuple):
    """Scalar namespace, dtype and control flow used by laws and spectral estimators.

    Attributes:
        xp: array namespace for scalars and small arrays (`numpy` or `jax.numpy`).
        dtype: float dtype of every scalar a law keeps in its state.
        while_loop: `while_loop(cond_fun, body_fun, init_val)` as in `jax.lax`.
        fori_loop: `fori_loop(lower, upper, body_fun, init_val)` as in `jax.lax`.
        index_update: `index_update(array, i, value)`, a functional `array.at[i].set(value)`.
        eager: True when scalars are concrete (numpy, eager torch); False under tracing (`jax.jit`),
            where an algorithm may not branch on a value (it then uses fixed iteration counts).
        int_dtype: integer dtype of the counters a law keeps (steps, measurements): exact to 2^31 steps at
            least, where a float32 counter would stop counting at 2^24.
    """

    xp: Any
    dtype: Any
    while_loop: Callable[..., Any]
    fori_loop: Callable[..., Any]
    index_update: Callable[[Any, Any, Any], Any]
    eager: bool = True
    int_dtype: Any = np.int64

    def scalar(self, value: Any) -> Any:
        """`value` as a 0-d array of the float dtype (`dtype`).

        Args:
            value: a number or 0-d array.

        Returns:
            The 0-d array.
        """
        return self.xp.asarray(value, dtype=self.dtype)

    def counter(self, value: Any = 0) -> Any:
        """`value` as a 0-d integer array of the integer dtype (`int_dtype`): a step or measurement count.

        Args:
            value: the count.

        Returns:
            The 0-d integer array.
        """
        return self.xp.asarray(value, dtype=self.int_dtype)

    def clip(self, value: Any, low: Any, high: Any) -> Any:
        """`min(max(value, low), high)` that keeps infinite bounds exact.

        Args:
            value: the value.
            low: the lower bound (may be -inf).
            high: the upper bound (may be inf).

        Returns:
            The clipped value.
        """
        return self.xp.minimum(self.xp.maximum(value, low), high)


NUMPY = Numerics(
    xp=np,
    dtype=np.float64,
    while_loop=python_while_loop,
    fori_loop=python_fori_loop,
    index_update=numpy_index_update,
)
"""Float64 numpy scalars and Python control flow: the default everywhere."""


class _PythonScalars:
    """The few array-namespace functions the per-step rules use, for Python floats, ints and bools.

    numpy's functions on Python scalars build 0-d arrays: a few microseconds each, ten of them a step, more with the
    caches cold after a training step's forward and backward passes. The PyTorch adapter applies the per-step rules
    of [`eos_core.monitor`][] and [`eos_core.diagnostics`][] to host floats with this namespace instead; the results
    are those of numpy (NaN propagates through `minimum` and `maximum` as there).
    """

    @staticmethod
    def where(condition: Any, x: Any, y: Any) -> Any:
        """`x if condition else y`."""
        return x if condition else y

    @staticmethod
    def logical_not(x: Any) -> bool:
        """`not x`."""
        return not x

    @staticmethod
    def isnan(x: float) -> bool:
        """`x != x`."""
        return x != x

    @staticmethod
    def isfinite(x: float) -> bool:
        """Neither NaN nor infinite."""
        return x - x == 0.0

    @staticmethod
    def abs(x: float) -> float:
        """`|x|`."""
        return abs(x)

    @staticmethod
    def minimum(x: float, y: float) -> float:
        """The smaller of two floats (NaN when either is)."""
        return x if (x != x or x <= y) else y

    @staticmethod
    def maximum(x: float, y: float) -> float:
        """The larger of two floats (NaN when either is)."""
        return x if (x != x or x >= y) else y


#: Host scalars: the array namespace `xp` for the per-step rules applied to Python floats.
PYTHON_SCALARS = _PythonScalars()
