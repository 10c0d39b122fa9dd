"""PyTorch adapter: the `CurvatureTuner` wrapper, curvature oracles and vector ops on parameter lists.

[`CurvatureTuner`][eos_core.adapters.torch.CurvatureTuner] drives any `torch.optim` optimizer whose step is linear
in the learning rate with a tuning law of [`eos_core.laws`][]. It works on whole parameters (one process or DDP)
and on FSDP2-sharded `DTensor` parameters ([`ParameterSpace`][eos_core.adapters.torch.ParameterSpace]). The
curvature it measures comes from an [`Oracle`][eos_core.adapters.torch.Oracle] (`u^T H u` and `H v` by double
backward, forward-mode AD or finite differences of gradients); [`TorchOps`][eos_core.adapters.torch.TorchOps]
lets the core's spectral estimators work on lists of tensors.

Importing this package needs torch (the `torch` extra); it raises an `ImportError` naming the extra otherwise.

Examples:
    >>> tuner = CurvatureTuner(torch.optim.SGD(model.parameters(), lr=0.1), CDAT(scale=2.0))  # doctest: +SKIP
    >>> loss = tuner.step(closure)                                                            # doctest: +SKIP
"""

from eos_core._optional import require

require("torch", extra="torch", feature="eos_core.adapters.torch")

from eos_core.adapters.torch.distributed import Reducer  # noqa: E402
from eos_core.adapters.torch.objective import BackwardCapture, Objective  # noqa: E402
from eos_core.adapters.torch.oracles import HessianOperator, Oracle, RouteUnavailable, gradient  # noqa: E402
from eos_core.adapters.torch.sharding import ParameterSpace  # noqa: E402
from eos_core.adapters.torch.tuner import STATE_KEY, STATE_VERSION, CurvatureTuner  # noqa: E402
from eos_core.adapters.torch.vector_ops import TorchOps  # noqa: E402

__all__ = [
    "STATE_KEY",
    "STATE_VERSION",
    "BackwardCapture",
    "CurvatureTuner",
    "HessianOperator",
    "Objective",
    "Oracle",
    "ParameterSpace",
    "Reducer",
    "RouteUnavailable",
    "TorchOps",
    "gradient",
]
