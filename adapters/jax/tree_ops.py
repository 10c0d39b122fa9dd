"""Vector arithmetic on pytrees of arrays, for the core's spectral estimators (the VectorOps protocol).

A vector is any pytree of floating arrays shaped like the parameters. Scalars are 0-d arrays of
`numerics.dtype`; inner products accumulate in at least float32 (bf16 / fp16 leaves are upcast), so
curvature accumulates in fp32 under mixed precision. Every operation is a pure `jax.numpy`
function of its inputs: the estimators written against [`VectorOps`][eos_core.spectral.VectorOps] trace
under `jax.jit` and run under any sharding of the leaves.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eos_core.adapters.jax.numerics import jax_numerics
from eos_core.numerics import Numerics
from eos_core.spectral.start import random_start

PyTree = Any


def accumulation_dtype(dtype: Any) -> Any:
    """The dtype an inner product over leaves of `dtype` accumulates in.

    Args:
        dtype: the leaves' dtype.

    Returns:
        `dtype` promoted with float32: float32 for bfloat16 / float16 / float32 leaves, float64 for float64 ones.
    """
    return jnp.promote_types(dtype, jnp.float32)


def tree_dot(x: PyTree, y: PyTree, dtype: Any = None) -> jax.Array:
    r"""The inner product of two pytrees, $\sum_{\rm leaves} \langle x_i, y_i \rangle$.

    Args:
        x: a pytree of arrays.
        y: a pytree with the same leaves' shapes (in `jax.tree.leaves` order).
        dtype: the result's dtype (None: the promoted accumulation dtype of the leaves, float32 for no leaves).

    Returns:
        A 0-d array; each leaf's product is accumulated in at least float32
        ([`accumulation_dtype`][eos_core.adapters.jax.tree_ops.accumulation_dtype]).

    Raises:
        ValueError: `x` and `y` have different numbers of leaves.
    """
    xs, ys = jax.tree.leaves(x), jax.tree.leaves(y)
    if len(xs) != len(ys):
        raise ValueError(f"tree_dot: trees with {len(xs)} and {len(ys)} leaves")
    parts = []
    for a, b in zip(xs, ys, strict=True):
        acc = accumulation_dtype(jnp.result_type(a, b))
        parts.append(jnp.vdot(jnp.ravel(a).astype(acc), jnp.ravel(b).astype(acc)))
    out_dtype = dtype if dtype is not None else (jnp.result_type(*parts) if parts else jnp.float32)
    if not parts:
        return jnp.zeros((), out_dtype)
    return sum(p.astype(out_dtype) for p in parts)


def tree_norm(x: PyTree, dtype: Any = None) -> jax.Array:
    r"""The Euclidean norm of the concatenated leaves, $\sqrt{\langle x, x \rangle}$.

    Args:
        x: a pytree of arrays.
        dtype: the result's dtype (None: as in [`tree_dot`][eos_core.adapters.jax.tree_ops.tree_dot]).

    Returns:
        A 0-d array, accumulated in at least float32.
    """
    return jnp.sqrt(tree_dot(x, x, dtype))


def tree_scale(alpha: Any, x: PyTree) -> PyTree:
    """`alpha * x` leaf by leaf.

    Args:
        alpha: a scalar (Python number or 0-d array), cast to each leaf's dtype.
        x: a pytree of arrays.

    Returns:
        A pytree like `x`, each leaf in its own dtype.
    """
    return jax.tree.map(lambda a: jnp.asarray(alpha).astype(a.dtype) * a, x)


def tree_axpy(alpha: Any, x: PyTree, y: PyTree) -> PyTree:
    """`alpha * x + y` leaf by leaf.

    Args:
        alpha: a scalar, cast to each leaf of `y`'s dtype.
        x: a pytree of arrays, cast to the dtypes of `y`.
        y: a pytree of the same structure.

    Returns:
        A pytree like `y`, in the dtypes of `y`'s leaves.
    """
    return jax.tree.map(lambda a, b: jnp.asarray(alpha).astype(b.dtype) * a.astype(b.dtype) + b, x, y)


def tree_all_finite(x: PyTree) -> jax.Array:
    """Whether every entry of every leaf is finite.

    Args:
        x: a pytree of arrays.

    Returns:
        A 0-d bool array (True for a tree without leaves).
    """
    flags = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(x)]
    out = jnp.asarray(True)
    for flag in flags:
        out = out & flag
    return out


def tree_select(pred: Any, x: PyTree, y: PyTree) -> PyTree:
    """`x` where the scalar `pred` holds, else `y`, without a branch (leafwise `jnp.where`).

    Args:
        pred: a scalar bool (traced or not).
        x: a pytree.
        y: a pytree of the same structure and shapes.

    Returns:
        The selected pytree.
    """
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), x, y)


def ready_after(*tokens: Any) -> jax.Array:
    """A predicate that always holds, but that XLA computes only after `tokens` (scalar outputs of `lax.cond`s).

    A `lax.cond` whose branch reads the parameters, when nothing the new parameters depend on comes out of it, makes
    XLA copy the (donated) parameters on every step, taken or not: the conditional may then run after the update
    writes the new parameters into the old ones' buffer. Selecting the updates (and the base's new state) on this
    predicate orders the branches first; the select fuses into the update, so nothing is copied (the monitored step
    of a 784-256-256-10 MLP copied its 1.1 MB of weights on every step, with Adam its moments too).

    Args:
        tokens: scalars computed by the branches (None: skipped).

    Returns:
        A 0-d bool array, True.
    """
    ready = jnp.asarray(True)
    for token in tokens:
        if token is not None:
            value = jnp.asarray(token).reshape(-1)[0].astype(jnp.float32)
            ready = ready & (jnp.isnan(value) | ~jnp.isnan(value))  # true for every value; XLA does not fold `a | ~a`
    return ready


def tree_random_normal(x: PyTree, seed: Any) -> PyTree:
    """A standard normal pytree shaped like `x`, a deterministic function of the integer `seed`.

    Args:
        x: a pytree of arrays (only shapes and dtypes are read).
        seed: an integer, may be traced (Lanczos draws restart vectors from `seed + step`).

    Returns:
        A pytree like `x` with independent standard normal entries (`jax.random.normal`, one key per leaf folded
        from `PRNGKey(seed)`), in the leaves' dtypes.
    """
    key = jax.random.PRNGKey(jnp.asarray(seed, dtype=jnp.uint32))
    leaves, treedef = jax.tree.flatten(x)
    out = [jax.random.normal(jax.random.fold_in(key, i), jnp.shape(a), dtype=jnp.result_type(a))
           for i, a in enumerate(leaves)]
    return jax.tree.unflatten(treedef, out)


def _spread(leaf: Any) -> bool:
    """A concrete array on more than one device."""
    return isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and len(leaf.sharding.device_set) > 1


def tree_random_start(x: PyTree, seed: int) -> PyTree:
    """The spectral estimators' start vector: [`eos_core.spectral.random_start`][] shaped like `x`.

    The core draws it with numpy in float64 from the shapes of the leaves in `jax.tree.leaves` order
    (unit norm over all leaves), so PyTorch, JAX and Keras start power iteration and Lanczos from the
    same vector for the same parameters; each leaf is then cast to the dtype of the matching leaf of
    `x` and, for a leaf spread over several devices, placed with its sharding. Only shapes, dtypes and
    shardings of `x` are read, so this works under `jax.jit` too: traced, the vector is drawn on the host
    at run time by `jax.pure_callback` (a model-sized constant is never embedded in the compiled program).

    Args:
        x: a pytree of arrays (the parameters), concrete or traced.
        seed: the integer seed (`seed` for H, `seed + 1` for the preconditioned operator).

    Returns:
        A pytree like `x` whose concatenated leaves have norm 1 (up to the rounding of the cast).
    """
    leaves, treedef = jax.tree.flatten(x)
    shapes = [tuple(int(n) for n in jnp.shape(a)) for a in leaves]
    dtypes = [jnp.result_type(a) for a in leaves]

    def draw() -> list[np.ndarray]:
        return [np.asarray(a).astype(d) for a, d in zip(random_start(shapes, int(seed)), dtypes, strict=True)]

    if any(isinstance(a, jax.core.Tracer) for a in leaves):
        out = jax.pure_callback(draw, [jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, dtypes, strict=True)])
    else:  # a leaf spread over devices gives its sharding (a sharded parameter gets a sharded vector); a leaf on
        # one device gives an uncommitted array, as jnp.asarray does (committed, jit would refuse to move it)
        out = [jax.device_put(a, leaf.sharding) if _spread(leaf) else jnp.asarray(a)
               for a, leaf in zip(draw(), leaves, strict=True)]
    return jax.tree.unflatten(treedef, list(out))


def tree_size(x: PyTree) -> int:
    """The number of scalar entries of a pytree.

    Args:
        x: a pytree of arrays (concrete or traced: only shapes are read).

    Returns:
        The total number of entries, a Python int.
    """
    return int(sum(np.prod(jnp.shape(a), dtype=np.int64) for a in jax.tree.leaves(x)))


class TreeOps:
    """[`VectorOps`][eos_core.spectral.VectorOps] for pytrees of JAX arrays.

    Scalars are 0-d arrays of `numerics.dtype` (float64 with `jax_enable_x64`, else float32).
    A Lanczos basis of `m` vectors is a pytree whose leaves carry a leading axis of size `m`. Every method is a pure
    `jax.numpy` function, so the core's estimators trace under `jax.jit` and run under any sharding of the leaves.

    Args:
        numerics: the scalars' numerics (default: [`jax_numerics()`][eos_core.adapters.jax.jax_numerics]).
    """

    def __init__(self, numerics: Numerics | None = None) -> None:
        self.numerics = numerics if numerics is not None else jax_numerics()

    def dot(self, x: PyTree, y: PyTree) -> jax.Array:
        """The inner product over all entries (a 0-d array of `numerics.dtype`, accumulated in float32 or wider)."""
        return tree_dot(x, y, self.numerics.dtype)

    def norm(self, x: PyTree) -> jax.Array:
        """The Euclidean norm over all entries (a 0-d array of `numerics.dtype`)."""
        return tree_norm(x, self.numerics.dtype)

    def axpy(self, alpha: Any, x: PyTree, y: PyTree) -> PyTree:
        """`alpha * x + y` leaf by leaf, in the dtypes of `y`."""
        return tree_axpy(alpha, x, y)

    def scale(self, alpha: Any, x: PyTree) -> PyTree:
        """`alpha * x` leaf by leaf, in the dtypes of `x`."""
        return tree_scale(alpha, x)

    def multiply(self, x: PyTree, y: PyTree) -> PyTree:
        """The elementwise product `x * y`, in the dtypes of `y`."""
        return jax.tree.map(lambda a, b: (a * b).astype(jnp.result_type(b)), x, y)

    def rsqrt(self, x: PyTree) -> PyTree:
        """The elementwise `x ** -0.5` (`lax.rsqrt`)."""
        return jax.tree.map(jax.lax.rsqrt, x)

    def random_like(self, x: PyTree, seed: Any, *, rademacher: bool = False) -> PyTree:
        """A standard normal pytree shaped like `x` (its signs, +-1, with `rademacher`), a function of `seed`."""
        sample = tree_random_normal(x, seed)
        if rademacher:
            return jax.tree.map(lambda a: jnp.where(a >= 0, 1.0, -1.0).astype(a.dtype), sample)
        return sample

    def select(self, pred: Any, x: PyTree, y: PyTree) -> PyTree:
        """`x` where the scalar `pred` holds, else `y` (a vector or a basis; no branch, `pred` may be traced)."""
        return tree_select(pred, x, y)

    def size(self, x: PyTree) -> int:
        """The number of scalar entries (a Python int)."""
        return tree_size(x)

    def basis_zeros(self, x: PyTree, m: int) -> PyTree:
        """A basis of `m` zero vectors: a pytree like `x` whose leaves have a leading axis of size `m`."""
        return jax.tree.map(lambda a: jnp.zeros((int(m), *jnp.shape(a)), dtype=jnp.result_type(a)), x)

    def basis_set(self, basis: PyTree, j: Any, x: PyTree) -> PyTree:
        """A new basis with vector `j` (may be traced) replaced by `x`, cast to the basis' dtypes."""
        return jax.tree.map(lambda b, a: b.at[j].set(a.astype(b.dtype)), basis, x)

    def basis_vector(self, basis: PyTree, j: Any) -> PyTree:
        """Vector `j` (may be traced) of the basis, a pytree like one basis vector."""
        return jax.tree.map(lambda b: b[j], basis)

    def basis_coeffs(self, basis: PyTree, x: PyTree) -> jax.Array:
        """The `(m,)` array of inner products `<b_i, x>` (accumulated in float32 or wider, in `numerics.dtype`)."""
        total = None
        for b, a in zip(jax.tree.leaves(basis), jax.tree.leaves(x), strict=True):
            acc = accumulation_dtype(jnp.result_type(b, a))
            part = b.reshape(b.shape[0], -1).astype(acc) @ jnp.ravel(a).astype(acc)
            part = part.astype(self.numerics.dtype)
            total = part if total is None else total + part
        return total

    def basis_combine(self, basis: PyTree, coeffs: Any) -> PyTree:
        """The vector `sum_i coeffs[i] * b_i`, shaped and typed like one basis vector."""

        def combine(b: jax.Array) -> jax.Array:
            acc = accumulation_dtype(b.dtype)
            c = jnp.asarray(coeffs).astype(acc)
            return jnp.tensordot(c, b.astype(acc), axes=1).astype(b.dtype)

        return jax.tree.map(combine, basis)
