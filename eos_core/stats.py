"""Names of the scalar statistics a law may ask an adapter for.

A law declares the names it needs in `law.needs`; an adapter computes exactly those (and nothing
else) on a probe step and passes them in a mapping to `law.update`. Notation as in the CDAT paper
(Roulet et al. 2024): `w` parameters, `g = grad f(w)` (mini-batch gradient in the stochastic
case), `u` the base optimizer's update for learning rate 1 (`w_next = w + lr * u`), `H` the
Hessian of `f` at `w` and `P` the diagonal preconditioner of an adaptive base optimizer.
"""

from __future__ import annotations

LOSS = "loss"
"""f(w) on the current batch."""

GRAD_DOT_UPDATE = "grad_dot_update"
"""g . u (negative for a descent direction)."""

CURVATURE = "curvature"
"""u^T H u, the second directional derivative of f along u."""

GRAD_NORM_SQ = "grad_norm_sq"
"""||g||^2."""

SHARPNESS = "sharpness"
"""lambda_max(H), estimated by warm-started power iteration."""

PRECONDITIONED_SHARPNESS = "preconditioned_sharpness"
"""lambda_max(P^{-1/2} H P^{-1/2}), the sharpness that defines the adaptive edge (Cohen et al. 2022)."""

TOP_EIGENVALUES = "top_eigenvalues"
"""The k largest eigenvalues of H in descending order (Lanczos), an array of shape (k,)."""

PRECONDITIONED_TOP_EIGENVALUES = "preconditioned_top_eigenvalues"
"""The k largest eigenvalues of P^{-1/2} H P^{-1/2}, descending."""

TRIAL_LOSS = "trial_loss"
"""A callable `lr -> f(w + lr * u)` on the current batch, without a backward pass (line searches)."""

GRAD_PREV_UPDATE_COSINE = "grad_prev_update_cosine"
"""cos(g_t, u_{t-1}): the current gradient against the previous step's update (hypergradient).
Adapters pass 0 on the first step, when there is no previous update."""

GRAD_DOT_PREVIOUS_UPDATE = "grad_dot_previous_update"
"""g_t . u_{t-1}: the current batch's gradient against the previous step's update (for lr 1), a gradient that
update did not see (CDAT's unbiased mini-batch numerator). Adapters pass NaN when there is no previous update."""

PREVIOUS_UPDATE_CURVATURE = "previous_update_curvature"
"""u_{t-1}^T H_t u_{t-1}: the curvature of the current batch along the previous step's update (NaN when none)."""

PREVIOUS_LR = "previous_lr"
"""The learning rate applied to u_{t-1}, the previous step's update (NaN when there is no previous update; 0 is a
measurement: the previous step did not move, and g_t(w_t) is the gradient at w_{t-1})."""

ALL = frozenset(
    {
        LOSS,
        GRAD_DOT_UPDATE,
        CURVATURE,
        GRAD_NORM_SQ,
        SHARPNESS,
        PRECONDITIONED_SHARPNESS,
        TOP_EIGENVALUES,
        PRECONDITIONED_TOP_EIGENVALUES,
        TRIAL_LOSS,
        GRAD_PREV_UPDATE_COSINE,
        GRAD_DOT_PREVIOUS_UPDATE,
        PREVIOUS_UPDATE_CURVATURE,
        PREVIOUS_LR,
    }
)
"""Every statistic a law may ask for."""

CURVATURE_PROBES = frozenset({CURVATURE, PREVIOUS_UPDATE_CURVATURE})
"""The statistics that need the curvature probe u^T H u."""
SPECTRAL = frozenset({SHARPNESS, PRECONDITIONED_SHARPNESS, TOP_EIGENVALUES, PRECONDITIONED_TOP_EIGENVALUES})
"""The statistics that need a spectral estimator (power iteration or Lanczos)."""
