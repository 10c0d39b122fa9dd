r"""JAX / Optax adapter: a curvature-aware optax transformation around any optax optimizer.

[`tune(base, law)`][eos_core.adapters.jax.tune] wraps a full optax optimizer built with learning rate 1
(`optax.sgd(1.0)`, `optax.adam(1.0)`, ...) whose update is the direction `u` (CDAT paper: Roulet et al., 2024,
"Stepping on the edge: curvature aware learning rate tuners", section 2.1), measures the statistics
`law.request()` asks for ($u^\top H u$ by forward-over-forward differentiation, the paper's route, appendix C.3;
Hessian spectra by warm-started power iteration / Lanczos on pytrees, ...) and returns `lr * u` with `lr` the
law's decision. Everything is jittable and the state is a pytree; [`diagnostics`][eos_core.adapters.jax.diagnostics]
reads the last step's values on the host.

Importing this module needs `jax` and `optax` (`pip install 'eos-core[jax]'`).
"""

from eos_core._optional import require

require("jax", extra="jax", feature="eos_core.adapters.jax")
require("optax", extra="jax", feature="eos_core.adapters.jax")

from eos_core.adapters.jax.monitor import MonitorState, MonitorTimer, set_monitor_cost  # noqa: E402
from eos_core.adapters.jax.numerics import jax_numerics  # noqa: E402
from eos_core.adapters.jax.oracles import (  # noqa: E402
    CURVATURE_AUTO_CHAIN,
    HVP_AUTO_CHAIN,
    curvature,
    finite_difference_step,
    hvp,
    resolve_curvature_route,
    resolve_hvp_route,
)
from eos_core.adapters.jax.preconditioner import (  # noqa: E402
    AdamPreconditioner,
    RmsPreconditioner,
    find_preconditioner,
)
from eos_core.adapters.jax.spectral import (  # noqa: E402
    hessian_operator,
    top_eigenvalue,
    top_eigenvalues,
)
from eos_core.adapters.jax.transform import (  # noqa: E402
    SUPPORTED_OPTIONS,
    Diagnostics,
    TuneState,
    decode_diagnostics,
    diagnostics,
    find_tune_state,
    hvp_route,
    tune,
    warn_bad_steps,
    warn_unstable,
)
from eos_core.adapters.jax.tree_ops import TreeOps  # noqa: E402

__all__ = [
    "CURVATURE_AUTO_CHAIN",
    "HVP_AUTO_CHAIN",
    "MonitorState",
    "MonitorTimer",
    "SUPPORTED_OPTIONS",
    "AdamPreconditioner",
    "Diagnostics",
    "RmsPreconditioner",
    "TreeOps",
    "TuneState",
    "curvature",
    "decode_diagnostics",
    "diagnostics",
    "find_preconditioner",
    "find_tune_state",
    "finite_difference_step",
    "hessian_operator",
    "hvp",
    "hvp_route",
    "jax_numerics",
    "resolve_curvature_route",
    "resolve_hvp_route",
    "set_monitor_cost",
    "top_eigenvalue",
    "top_eigenvalues",
    "tune",
    "warn_bad_steps",
    "warn_unstable",
]
