"""Tuning laws: small objects with explicit state that turn scalar statistics into a learning rate.

Every law here is backend-neutral (numpy by default, traceable by JAX); adapters compute the
statistics a law declares in `law.needs` and apply what it decides.
"""

from eos_core.laws.adaeos import AdaEoS, AdaEoSState
from eos_core.laws.armijo import Armijo, ArmijoState
from eos_core.laws.base import Law, LawOutput
from eos_core.laws.cdat import CDAT, CDATState
from eos_core.laws.dcao import DCAO, DCAOState
from eos_core.laws.exact_sharpness import ExactSharpness, ExactSharpnessState
from eos_core.laws.hypergradient import HyperGradient, HyperGradientState
from eos_core.laws.polyak import Polyak, PolyakState
from eos_core.laws.schedules import Constant, ScheduleState, WarmupCosine

__all__ = [
    "CDAT",
    "DCAO",
    "AdaEoS",
    "AdaEoSState",
    "Armijo",
    "ArmijoState",
    "CDATState",
    "Constant",
    "DCAOState",
    "ExactSharpness",
    "ExactSharpnessState",
    "HyperGradient",
    "HyperGradientState",
    "Law",
    "LawOutput",
    "Polyak",
    "PolyakState",
    "ScheduleState",
    "WarmupCosine",
]
