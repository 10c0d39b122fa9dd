"""The docstring examples (`>>>`) run, each in the tox environment that has its module's framework.

Every module of the installed package is assigned to one environment: the numpy-only core to `core`, each adapter
and callback to its framework's environment (the Keras ones to both Keras environments). In its environment a module
must import, and its examples must pass (doctest, with `ELLIPSIS` and `NORMALIZE_WHITESPACE`). Outside a tox
environment (`EOS_DOCS_ENV` unset) the core's examples run.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
from pathlib import Path

import pytest

CURRENT = os.environ.get("EOS_DOCS_ENV", "core")
#: module prefix -> the tox environments that run its examples (the longest matching prefix wins)
ENVIRONMENTS = {
    "eos_core": ("core",),
    "eos_core.adapters.torch": ("torch",),
    "eos_core.adapters.jax": ("jax",),
    "eos_core.adapters.keras": ("keras-jax", "keras-torch"),
    "eos_core.adapters.keras.jax_engine": ("keras-jax",),
    "eos_core.adapters.keras.torch_engine": ("keras-torch",),
    "eos_core.integrations.keras": ("keras-jax", "keras-torch"),
    "eos_core.integrations.lightning": ("lightning",),
    "eos_core.integrations.transformers": ("transformers",),
    "eos_core.integrations._common": ("lightning",),
    "eos_core.demo.torch_backend": ("torch",),
    "eos_core.demo.jax_backend": ("jax",),
    "eos_core.adapters": ("core",),
    "eos_core.integrations": ("core",),
}
#: run as scripts, not imported for their examples
SKIP = ("eos_core.__main__",)


def all_modules() -> list[str]:
    """Every module of the package. In a source checkout `eos_core.__path__` also holds the repository root (so that
    `adapters/` and `integrations/` import as `eos_core.adapters`...): only the package folders are walked."""
    import eos_core
    import eos_core.adapters
    import eos_core.integrations

    names = {"eos_core", "eos_core.adapters", "eos_core.integrations"}
    roots = [(path, "eos_core.") for path in eos_core.__path__ if Path(path).name == "eos_core"]
    roots += [(path, "eos_core.adapters.") for path in eos_core.adapters.__path__]
    roots += [(path, "eos_core.integrations.") for path in eos_core.integrations.__path__]
    for path, prefix in roots:
        # walk_packages imports packages to list their children: an adapter whose framework is missing raises
        # ImportError there (onerror swallows it) and its submodules are not listed, which is what we want
        for info in pkgutil.walk_packages([path], prefix=prefix, onerror=lambda name: None):
            if info.name not in SKIP and not info.name.startswith("eos_core.adapters.keras._"):
                names.add(info.name)
    return sorted(names)


def environments(module: str) -> tuple[str, ...]:
    prefix = max((p for p in ENVIRONMENTS if module == p or module.startswith(p + ".")), key=len)
    return ENVIRONMENTS[prefix]


MODULES = [m for m in all_modules() if CURRENT in environments(m)]


def test_every_module_has_an_environment_that_runs_its_examples():
    assert MODULES, f"no module is assigned to {CURRENT}"
    if CURRENT == "core":
        assert "eos_core.laws.cdat" in MODULES and "eos_core.plotting" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_pass(module):
    imported = importlib.import_module(module)  # in its own environment a module must import
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = [t for t in finder.find(imported, module) if t.examples]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {module} failed (output above)"


def test_the_core_documents_its_laws_by_example():
    if CURRENT != "core":
        pytest.skip("the core's examples run in the core env")
    finder = doctest.DocTestFinder(exclude_empty=True)
    laws = importlib.import_module("eos_core.laws")
    documented = {name for name in laws.__all__ if not name.endswith("State")
                  if any(t.examples for t in finder.find(getattr(laws, name), name))}
    assert documented >= {"CDAT", "ExactSharpness", "AdaEoS", "DCAO", "Armijo", "Polyak", "HyperGradient", "Constant",
                          "WarmupCosine"}, documented
