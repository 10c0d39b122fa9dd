"""The core's [`Numerics`][eos_core.numerics.Numerics] bound to `jax.numpy` and `jax.lax` control flow.

Laws and spectral estimators of [`eos_core`][] are written branch-free against a `Numerics`
bundle; with the one built here they trace under `jax.jit` (`while_loop` / `fori_loop` are the
`lax` primitives, so loops have fixed shapes and `eager=False` tells the estimators not to branch
on values).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from eos_core.numerics import Numerics


def _index_update(array: Any, index: Any, value: Any) -> Any:
    return array.at[index].set(value)


def default_dtype() -> Any:
    """The default floating dtype of JAX (the dtype a Python float becomes).

    Returns:
        `jnp.float64` when `jax_enable_x64` is on, else `jnp.float32`.
    """
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def jax_numerics(dtype: Any = None) -> Numerics:
    """The [`Numerics`][eos_core.numerics.Numerics] bundle of JAX, for laws and estimators traced under `jit`.

    Args:
        dtype: the dtype of the scalars it makes (None: float64 with `jax_enable_x64`, else float32).

    Returns:
        A `Numerics` with `xp=jax.numpy`, `lax.while_loop` / `lax.fori_loop` loops, functional index updates
        (`array.at[i].set(v)`), int32 counters and `eager=False` (no branching on values).
    """
    return Numerics(
        xp=jnp,
        dtype=jnp.dtype(default_dtype() if dtype is None else dtype),
        while_loop=lax.while_loop,
        fori_loop=lax.fori_loop,
        index_update=_index_update,
        eager=False,
        int_dtype=jnp.int32,
    )
