"""Theory models of the edge of stability, to compare real training runs against (CDAT paper section 2.3, 3.2, app. A).

Pure Python + numpy. Every simulator takes keyword settings whose defaults are the paper's, and returns a
NamedTuple of numpy arrays with one entry per state t = 0..steps.

* [`self_stabilization`][eos_core.theory.self_stabilization]: the CDAT paper's eq. 4/5 (Damian et al.'s model of the
  top eigendirection) with a constant learning rate or the fixed-y tuner of eq. 6 (Fig. 4, 10).
* [`cdat_model`][eos_core.theory.cdat_model]: the CDAT paper's model of its own tuner, eq. 9/10 (Fig. 9, 11).
* [`normalized_gd`][eos_core.theory.normalized_gd]: Arora, Li and Panigrahi: normalised GD and GD on sqrt(L - min L).
* [`minimalist`][eos_core.theory.minimalist]: Liu, Zhang, Du and Zhao: a two-layer width-one network on 2-D inputs.

**Choices we made where the papers are silent** (details and reasons in each module's docstring):

* **Eq. 4, Fig. 4**: the paper gives no x_0, lambda_0 or horizon. Both runs start at x_0 = 0.3,
  lambda_0 = 1.9 (y_0 = -0.1, which is what eta_0 = 1 means for the fixed-y rule); constant lr for 85
  steps, fixed-y rule for 200. Eq. 4 with a constant lr is only quasi-stable: its edge fixed point is a
  repelling focus (modulus sqrt(1 + 2 eta^2 a) = 1.03 per step at a = 3e-2, eta = 1), so the oscillation
  around 2/eta grows about 2x per cycle and the run collapses after about 105 steps; 85 steps show the
  sharpening and two oscillations. Eq. 6's parameter eps gives y = -2 eps (the paper's "y = -eps" in the
  text is loose): eta = 1.9/lambda is eps = 0.05.
* **Eq. 9/10, Fig. 9**: the paper's settings; horizon 10000 steps. p and g are propagated in log space.
* **Arora, Li, Panigrahi**: L(w) = 1/2 (w_1 ... w_D - 1)^2 (default D = 2, i.e. 1/2 (uv - 1)^2), whose
  minimisers prod w = 1 have sharpness sum 1/w_i^2 >= D, minimal at w = 1. Start at the imbalanced
  (3, 0.1); eta = 0.05 for both algorithms; 5000 steps. The Hessian is analytic and the gradient-flow limit
  point Phi(w) exact (conserved w_i^2 - w_j^2). The edge is measured by the two-step harmonic mean of
  eta_t lambda_t, which is 2 exactly for a period-2 orbit on a quadratic (the orbits here are not
  symmetric, so a single eta_t lambda_t alternates around 2).
* **Liu, Zhang, Du, Zhao**: f(x) = v w^T x, population squared loss, x ~ N(0, Sigma) with feature variances
  lambda_1 = 100, lambda_2 = 0.01, target y = c x_2: the *low-variance* feature x_2 is the relevant one
  (the assignment that produces the three phases and matches the paper's Fig. 2 rates), c = 0.4, a small
  feature correlation rho = 0.1 (without it the irrelevant weight underflows to 0 during sharpening and
  the edge phase cannot start in float64), v_0 = 0.55, w_0 = (0.01, 0.1), eta = 1/20, and 50000 steps
  (the paper's 10000 end inside the edge phase of our model).
"""

from eos_core.theory.cdat_model import CDATModelTrajectory, cdat_model_lr, simulate_cdat_model
from eos_core.theory.minimalist import (
    MinimalistTrajectory,
    minimalist_covariance,
    minimalist_gradient,
    minimalist_hessian,
    minimalist_loss,
    minimalist_sharpness,
    simulate_minimalist_gd,
)
from eos_core.theory.normalized_gd import (
    ManifoldTrajectory,
    product_gradient,
    product_hessian,
    product_limit_point,
    product_limit_sharpness,
    product_loss,
    product_sharpness,
    simulate_normalized_gd,
    simulate_sqrt_loss_gd,
    two_step_edge,
)
from eos_core.theory.self_stabilization import (
    SelfStabilizationTrajectory,
    eq4_step,
    fixed_y_lr,
    simulate_constant_lr,
    simulate_fixed_y,
    simulate_self_stabilization,
)

__all__ = [
    "CDATModelTrajectory",
    "ManifoldTrajectory",
    "MinimalistTrajectory",
    "SelfStabilizationTrajectory",
    "cdat_model_lr",
    "eq4_step",
    "fixed_y_lr",
    "minimalist_covariance",
    "minimalist_gradient",
    "minimalist_hessian",
    "minimalist_loss",
    "minimalist_sharpness",
    "product_gradient",
    "product_hessian",
    "product_limit_point",
    "product_limit_sharpness",
    "product_loss",
    "product_sharpness",
    "simulate_cdat_model",
    "simulate_constant_lr",
    "simulate_fixed_y",
    "simulate_minimalist_gd",
    "simulate_normalized_gd",
    "simulate_self_stabilization",
    "simulate_sqrt_loss_gd",
    "two_step_edge",
]
