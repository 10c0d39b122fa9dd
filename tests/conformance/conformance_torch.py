"""The conformance case on the PyTorch adapter."""

from __future__ import annotations

import torch
from conformance_case import LR, MOMENTUM, OPTIONS, STEPS, comparable, make_law, problem

from eos_core.adapters.torch import CurvatureTuner


class MLP(torch.nn.Module):
    def __init__(self, weights) -> None:
        super().__init__()
        self.w1, self.b1, self.w2, self.b2 = (torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))
                                              for w in weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2


def run(name: str) -> list[dict]:
    x, y, weights = problem()
    x, y = torch.tensor(x), torch.tensor(y)
    model = MLP(weights)
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    tuner = CurvatureTuner(sgd, make_law(name), model=model, **OPTIONS)

    def closure():
        tuner.zero_grad()
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        return loss

    rows = []
    for _ in range(STEPS):
        tuner.step(closure)
        rows.append(dict(tuner.diagnostics))
    return comparable(rows)
