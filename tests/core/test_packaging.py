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


def test_the_version_has_one_source_and_the_changelog_describes_it():
    import tomllib

    import eos_core

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "eos_core.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", eos_core.__version__)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[?(\d+\.\d+\.\d+)\]?", changelog, flags=re.M)
    assert releases and releases[0] == eos_core.__version__, (releases, eos_core.__version__)
    dist = next((d for d in importlib.metadata.distributions(name="eos-core") if d.read_text("RECORD")), None)
    direct_url = dist.read_text("direct_url.json") if dist else None
    if dist is not None and not (direct_url and json.loads(direct_url).get("dir_info", {}).get("editable")):
        assert dist.version == eos_core.__version__  # the installed wheel's metadata came from that one source


def _load_ci_script(name: str):
    spec = importlib.util.spec_from_file_location(f"ci_{name}", ROOT / ".ci" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"ci_{name}"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tox_writes_junit_for_every_test_env_and_the_summary_runs_last():
    import configparser

    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    envs = [e.strip() for e in tox["tox"]["env_list"].split(",")]
    assert {"docs", "package", "summary"} <= set(envs) and envs[-1] == "summary"
    assert "--junitxml={work_dir}{/}junit{/}{env_name}.xml" in tox["testenv"]["commands"]
    assert tox["testenv"]["parallel_show_output"].strip() == "true"
    depends = {e.strip() for e in tox["testenv:summary"]["depends"].split(",")}
    assert depends == set(envs) - {"summary"}, "the summary must wait for every other environment"
    assert "mkdocs build --strict" in tox["testenv:docs"]["commands"]


def test_tox_summary_table_counts_and_flags_failures(tmp_path, capsys):
    summary = _load_ci_script("tox_summary")
    (tmp_path / "core.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="0" failures="0" skipped="3" '
        'tests="120" time="41.5"/></testsuites>')
    (tmp_path / "torch.xml").write_text(
        '<testsuites><testsuite errors="1" failures="2" skipped="4" tests="200" time="300.2"/></testsuites>')
    assert summary.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["core"], ["torch"],
                                                                                              ["total"])}
    assert rows["core"][1:7] == ["120", "117", "0", "0", "3", "42"]
    assert rows["torch"][1:6] == ["200", "193", "2", "1", "4"]
    assert rows["total"][1:6] == ["320", "310", "2", "1", "7"]
    assert "FAILED: torch" in out
    (tmp_path / "torch.xml").unlink()
    assert summary.main([str(tmp_path)]) == 0
    assert summary.main([str(tmp_path / "missing")]) == 0
    assert "no JUnit file" in capsys.readouterr().out
