"""Packaging: the core imports no framework, the layout installs under one namespace, guards name extras."""

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORKS = ("torch", "jax", "jaxlib", "optax", "keras", "tensorflow", "lightning", "pytorch_lightning",
              "transformers", "matplotlib")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)


def test_import_eos_core_pulls_in_no_framework():
    code = (
        "import sys, eos_core, eos_core.laws, eos_core.spectral, eos_core.theory, eos_core.adapters, "
        "eos_core.integrations\n"
        f"loaded = [m for m in {FRAMEWORKS!r} if m in sys.modules]\n"
        "print(loaded)\n"
        "assert not loaded, loaded\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stdout + result.stderr


def test_installed_layout_has_no_top_level_adapters_or_integrations():
    # the installed distribution (it has a RECORD), not a source tree's egg-info that may sit on sys.path
    dist = next(d for d in importlib.metadata.distributions(name="eos-core") if d.read_text("RECORD"))
    direct_url = dist.read_text("direct_url.json")
    if direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"):
        pytest.skip("editable install: the file list holds the editable finder, not the package")
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if str(f).endswith(".py")}
    assert tops == {"eos_core"}, tops
    result = run_python("import eos_core.adapters, eos_core.integrations; "
                        "print(eos_core.adapters.__name__, eos_core.integrations.__name__)")
    assert result.stdout.split() == ["eos_core.adapters", "eos_core.integrations"]


def test_a_source_checkout_imports_like_the_installed_package():
    # Python started in the repository root imports ./eos_core, not the installed copy: the layers that an
    # install maps into eos_core (adapters/, integrations/ at the root) must still be found
    code = ("import sys, eos_core, eos_core.adapters, eos_core.integrations, eos_core.laws\n"
            "print(eos_core.__file__); print(eos_core.adapters.__file__); print(eos_core.integrations.__file__)\n"
            "assert 'adapters' not in sys.modules and 'integrations' not in sys.modules  # nothing top-level")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    files = [Path(line) for line in result.stdout.split()]
    assert files == [ROOT / "eos_core" / "__init__.py", ROOT / "adapters" / "__init__.py",
                     ROOT / "integrations" / "__init__.py"]


@pytest.mark.parametrize(
    "module,framework,extra",
    [
        ("eos_core.adapters.torch", "torch", "torch"),
        ("eos_core.adapters.jax", "jax", "jax"),
        ("eos_core.adapters.keras", "keras", "keras"),
        ("eos_core.integrations.lightning", "lightning", "lightning"),
        ("eos_core.integrations.transformers", "transformers", "transformers"),
        ("eos_core.integrations.keras", "keras", "keras"),
    ],
)
def test_adapter_without_its_framework_names_the_extra(module, framework, extra):
    # Simulate a missing framework in any environment: a None entry in sys.modules makes import fail.
    code = (
        "import sys\n"
        f"sys.modules[{framework!r}] = None\n"
        "try:\n"
        f"    import {module}\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n"
        "else:\n"
        "    print('IMPORTED')\n"
    )
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not written yet")
    result = run_python(code)
    assert "IMPORTERROR" in result.stdout, result.stdout + result.stderr
    assert f"eos-core[{extra}]" in result.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    quickstart = [line.strip() for block in commands[:1] for line in block.splitlines() if line.strip()
                  and not line.strip().startswith("#")]
    assert len(quickstart) == 2, quickstart
    test_command = quickstart[1]
    assert "tox" in test_command
    assert test_command in ci
