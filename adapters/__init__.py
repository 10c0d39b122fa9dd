"""Framework adapters, installed as `eos_core.adapters`: curvature oracles, vector ops and optimizer wrappers.

Import the one you need (`eos_core.adapters.torch`, `eos_core.adapters.jax`,
`eos_core.adapters.keras`); each raises ImportError naming the extra to install when its framework
is missing. Importing this package imports no framework.
"""
