"""PyTorch adapter: curvature oracles, vector ops on parameter lists, and the ``CurvatureTuner`` wrapper (whole
parameters, DDP, or FSDP2-sharded DTensor parameters: :class:`ParameterSpace`).

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
