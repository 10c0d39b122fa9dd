"""The core's :class:`~eos_core.numerics.Numerics` bound to ``jax.numpy`` and ``jax.lax`` control flow.

Laws and spectral estimators of :mod:`eos_core` are written branch-free against a ``Numerics``
bundle; with the one built here they trace under ``jax.jit`` (``while_loop`` / ``fori_loop`` are the
``lax`` primitives, so loops have fixed shapes and ``eager=False`` tells the estimators not to branch
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
    """float64 when ``jax_enable_x64`` is on, else float32 (the dtype of a Python float in JAX)."""
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def jax_numerics(dtype: Any = None) -> Numerics:
    """A :class:`Numerics` with ``jax.numpy`` scalars of ``dtype`` (default: :func:`default_dtype`)."""
    return Numerics(
        xp=jnp,
        dtype=jnp.dtype(default_dtype() if dtype is None else dtype),
        while_loop=lax.while_loop,
        fori_loop=lax.fori_loop,
        index_update=_index_update,
        eager=False,
        int_dtype=jnp.int32,
    )
