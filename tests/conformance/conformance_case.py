"""The shared conformance case: one model, one data set, one optimizer and ten laws, framework-free.

A two-layer tanh MLP (parameters ``[w1, b1, w2, b2]`` in that order, kernels shaped (in, out) in every
framework, so the spectral estimators' random start is the same), squared error on a fixed random teacher,
full batch, float64, SGD with momentum 0.5 (no weight decay: Keras decouples it), every law of the README's
"The other laws" block (Keras refuses DCAO by design), route double backward, sharpness tracked every 5 steps.
"""

from __future__ import annotations

import math

import numpy as np

from eos_core import CDAT, DCAO, AdaEoS, Armijo, Constant, ExactSharpness, HyperGradient, Polyak, WarmupCosine

STEPS = 30
LR = 0.5
MOMENTUM = 0.5
OPTIONS = {"route": "double-backward", "sharpness_every": 5, "seed": 0}
LAWS = ("constant", "warmup-cosine", "armijo", "polyak", "hypergradient", "greedy", "cdat", "exact-sharpness",
        "adaeos", "dcao")
#: relative and absolute tolerance of the float diagnostics between frameworks
RTOL, ATOL = 1e-6, 1e-10


def make_law(name: str):
    """A fresh law of the ten (same settings as the README's block)."""
    return {
        "constant": lambda: Constant(0.5),
        "warmup-cosine": lambda: WarmupCosine(peak_lr=1.0, total_steps=STEPS),
        "armijo": lambda: Armijo(),
        "polyak": lambda: Polyak(f_star=0.0),
        "hypergradient": lambda: HyperGradient(beta=0.01, lr_init=0.5),
        "greedy": lambda: CDAT(scale=1.0),
        "cdat": lambda: CDAT(scale=2.0),
        "exact-sharpness": lambda: ExactSharpness(scale=2.0),
        "adaeos": lambda: AdaEoS(target=2.0, gamma=0.5, lr_init=0.5),
        "dcao": lambda: DCAO(target=1.5, momentum_sensitivity=0.3, momentum_bounds=(0.0, 0.95)),
    }[name]()


def problem() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``(x, y, [w1, b1, w2, b2])`` in float64."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((64, 5))
    y = np.tanh(x @ rng.standard_normal((5, 4))) @ rng.standard_normal((4, 3))
    w1 = rng.standard_normal((5, 16)) / math.sqrt(5.0)
    b1 = 0.1 * rng.standard_normal(16)
    w2 = rng.standard_normal((16, 3)) / 4.0
    b2 = np.zeros(3)
    return x, y, [w1, b1, w2, b2]


def loss_numpy(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """The loss every framework computes: the mean over all entries of the squared error (Keras' "mse")."""
    w1, b1, w2, b2 = params
    return float(np.mean((np.tanh(x @ w1 + b1) @ w2 + b2 - y) ** 2))


def comparable(rows: list[dict]) -> list[dict]:
    """Diagnostics rows as JSON-friendly dicts (NaN kept as the string "nan")."""
    out = []
    for row in rows:
        clean = {}
        for key, value in row.items():
            if isinstance(value, str):
                clean[key] = value
            elif isinstance(value, bool | int | np.integer):
                clean[key] = int(value)
            else:
                number = float(value)
                clean[key] = "nan" if math.isnan(number) else number
        out.append(clean)
    return out
