"""Check the package as a user installs it (tox env `package`).

1. `python -m build`: the sdist, then the wheel built from that sdist (what pip does with an sdist).
2. `twine check --strict` on both (metadata and the README as PyPI renders it).
3. The wheel's layout: everything under `eos_core/` (adapters and integrations included), nothing else
   at the top level; the sdist carries the README and pyproject.toml.
4. A clean virtual environment with the wheel alone installed (no extra): the version is the one in
   the metadata, `eos-core --version` and `eos-core demo --help` run, `import eos_core.adapters` pulls in
   no framework, and `eos-core demo` without its extra is a usage error that names `eos-core[demo]`.

Usage: python .ci/check_package.py --workdir DIR [--source REPO]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], *, cwd: Path, expect: int = 0) -> subprocess.CompletedProcess:
    """Run a command, echo it, and fail with its output when the exit code is not `expect`."""
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != expect:
        sys.exit(f"exit code {result.returncode} (expected {expect}) from {' '.join(command)}\n"
                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def check(condition: bool, message: str) -> None:
    if not condition:
        sys.exit(f"package check failed: {message}")
    print(f"  ok: {message}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="scratch folder (emptied first)")
    parser.add_argument("--source", type=Path, default=ROOT, help="the repository to package")
    args = parser.parse_args()
    started = time.perf_counter()
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    dist = work / "dist"
    dist.mkdir(parents=True)

    # run from the scratch folder: in the repository root, `python -m build` would import ./build/ instead
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(args.source.resolve())], cwd=work)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    check(len(wheels) == 1 and len(sdists) == 1, f"one wheel and one sdist: {[p.name for p in dist.iterdir()]}")
    run([sys.executable, "-m", "twine", "check", "--strict", str(wheels[0]), str(sdists[0])], cwd=work)
    check(True, "twine check --strict passes on the wheel and the sdist")

    names = zipfile.ZipFile(wheels[0]).namelist()
    tops = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    check(tops == {"eos_core"}, f"the wheel installs eos_core only (top level: {sorted(tops)})")
    for required in ("eos_core/adapters/torch/__init__.py", "eos_core/adapters/jax/__init__.py",
                     "eos_core/adapters/keras/__init__.py", "eos_core/integrations/lightning.py",
                     "eos_core/integrations/transformers.py", "eos_core/demo/runner.py"):
        check(required in names, f"the wheel holds {required}")
    with tarfile.open(sdists[0]) as sdist:
        members = {Path(m.name).relative_to(Path(m.name).parts[0]).as_posix() for m in sdist.getmembers()
                   if len(Path(m.name).parts) > 1}
    check({"README.md", "pyproject.toml", "adapters/torch/__init__.py"} <= members,
          "the sdist holds README.md, pyproject.toml and the adapters")

    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--clear", str(venv)], cwd=work)
    python = venv / ("Scripts" if sys.platform == "win32" else "bin") / "python"
    script = python.parent / "eos-core"
    run([str(python), "-m", "pip", "install", "--quiet", str(wheels[0])], cwd=work)
    version = run([str(python), "-c", "import importlib.metadata as m, eos_core; "
                   "print(m.version('eos-core'), eos_core.__version__)"], cwd=work).stdout.split()
    check(len(version) == 2 and version[0] == version[1], f"metadata version = eos_core.__version__ = {version}")
    check(wheels[0].name.startswith(f"eos_core-{version[0]}-"), f"the wheel's name carries {version[0]}")
    shown = run([str(script), "--version"], cwd=work).stdout.strip()
    check(shown == f"eos-core {version[0]}", f"eos-core --version prints {shown!r}")
    demo_help = run([str(script), "demo", "--help"], cwd=work).stdout
    check("--backend" in demo_help and "--methods" in demo_help, "eos-core demo --help runs from the clean venv")
    run([str(script), "plot", "--help"], cwd=work)
    loaded = run([str(python), "-c", "import sys, eos_core, eos_core.adapters, eos_core.integrations, "
                  "eos_core.laws, eos_core.spectral, eos_core.theory; print(sorted(m for m in "
                  "('torch', 'jax', 'keras', 'matplotlib') if m in sys.modules))"], cwd=work).stdout.strip()
    check(loaded == "[]", "import eos_core (and its layers) pulls in no framework")
    missing = run([str(script), "demo", "--quick", "--out", str(work / "demo")], cwd=work, expect=2)
    check("eos-core[demo]" in missing.stderr and "Traceback" not in missing.stderr,
          "eos-core demo without the [demo] extra is a usage error naming eos-core[demo]")
    print(f"package: {wheels[0].name} and {sdists[0].name} checked in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
