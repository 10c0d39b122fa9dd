"""Trainer callbacks, installed as `eos_core.integrations`.

`eos_core.integrations.lightning`, `eos_core.integrations.transformers` and
`eos_core.integrations.keras` each provide an `EdgeOfStabilityCallback`. Importing this package
imports no framework.
"""
