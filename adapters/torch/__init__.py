"""PyTorch adapter (placeholder until the PyTorch adapter issue lands: import guard only)."""

from eos_core._optional import require

require("torch", extra="torch", feature="eos_core.adapters.torch")
