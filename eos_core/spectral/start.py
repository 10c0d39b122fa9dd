"""The random start vector of the spectral estimators, the same in every framework.

Power iteration and Lanczos start from a random unit vector (later warm-started from the previous
eigenvector). Drawing it here, with numpy, from the seed and the parameters' shapes (in the order the
adapter lists them) gives PyTorch, JAX and Keras the same start, so the same run reports the same
`sharpness` and `power_iterations` in every framework.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def random_start(shapes: Sequence[tuple[int, ...]], seed: int) -> list[np.ndarray]:
    """A standard normal vector, split into arrays of `shapes`, scaled to unit norm as a whole.

    Args:
        shapes: the shapes of the parameters, in the adapter's order.
        seed: the seed (`TunerSettings.seed`; the preconditioned estimator uses `seed + 1`).

    Returns:
        float64 arrays of the given shapes whose concatenation has norm 1.
    """
    rng = np.random.default_rng(int(seed))
    parts = [rng.standard_normal(tuple(int(n) for n in shape)) for shape in shapes]
    norm = float(np.sqrt(sum(float(np.sum(p * p)) for p in parts)))
    if norm == 0.0:  # only when every shape is empty
        return parts
    return [p / norm for p in parts]
