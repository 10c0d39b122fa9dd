"""The code blocks of the README and of the documentation site run, so neither can rot.

Every fenced ``python`` or ``bash`` block in README.md and in ``docs/**/*.md`` is preceded by a marker
comment ``<!-- run: ENV -->`` naming the tox environment that executes it (its framework is installed
there); ``<!-- run: keras -->`` runs in both Keras envs. Each tox env sets ``EOS_DOCS_ENV`` to its name
and runs the blocks tagged with it, each in a fresh interpreter (or bash) in a temporary folder; a block
whose text is the same as one already run (the site repeats the README's examples) runs once.
Blocks meant to be read, not run (printed output, shell sessions) use the languages ``text``,
``console``, ``csv`` or ``pycon`` and carry no marker.

The quickstart (README's first block, ``<!-- run: ci -->``) is two commands: the first (a virtual
environment, the install and the demo) runs in the ``torch`` env exactly as written, from a fresh copy
of the repository, as a new user runs it (it installs into its own ``.venv`` there, never into the
interpreter running the tests); the second is the test command, which CI itself executes (``.ci/run``,
checked by ``tests/core/test_packaging.py``).

A block without a marker, or with an unknown environment, fails the ``core`` env's test: an untested
block cannot slip in.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: tox envs that run blocks ("ci": run by .ci/run itself)
ENVS = ("core", "torch", "jax", "keras", "keras-jax", "keras-torch", "lightning", "transformers", "ci")
#: a block tagged with a group runs in each of its envs
GROUPS = {"keras": ("keras-jax", "keras-torch")}
#: fenced blocks shown to the reader and never run
READ_ONLY = ("text", "console", "csv", "pycon")
BLOCK = re.compile(r"^(?P<indent>[ \t]*)(?:<!--\s*run:\s*(?P<env>[\w-]+)\s*-->\s*\n[ \t]*)?```(?P<lang>[\w-]*)[^\n]*\n"
                   r"(?P<body>.*?)^[ \t]*```", re.S | re.M)
CURRENT = os.environ.get("EOS_DOCS_ENV")


def documents() -> list[Path]:
    """README.md, then every Markdown page of the site in path order."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def blocks(path: Path = README) -> list[tuple[int, str | None, str, str]]:
    """(line number, env, language, body) of every fenced block of one Markdown file."""
    text = path.read_text()
    out = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("lang")) + 1
        out.append((line, match.group("env"), match.group("lang"), textwrap.dedent(match.group("body"))))
    return out


def name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_every_code_block_names_the_environment_that_runs_it():
    assert blocks(), "README.md has no code blocks"
    counted = 0
    for path in documents():
        for line, env, lang, _ in blocks(path):
            counted += 1
            where = f"{name(path)}:{line}"
            if lang in READ_ONLY:  # printed output or a session shown to the reader, not code
                assert env is None, f"{where}: a {lang} block carries a run marker"
                continue
            assert lang in ("python", "bash"), f"{where}: code block language {lang!r} (use python or bash)"
            assert env in ENVS, f"{where}: a {lang} block needs a '<!-- run: ENV -->' marker, ENV in {ENVS}"
            assert env != "ci" or path == README, f"{where}: only the README's quickstart is run by CI itself"
    assert counted > len(blocks()), "the documentation pages have no code block"


def _selected() -> list[tuple[str, str, str]]:
    if CURRENT is None:
        return []
    seen: set[str] = set()
    out = []
    for path in documents():
        for index, (line, env, lang, body) in enumerate(blocks(path)):
            if path == README and index == 0:
                continue  # the quickstart: its own test below, and CI
            if env == CURRENT or CURRENT in GROUPS.get(env or "", ()):
                if body.strip() in seen:
                    continue
                seen.add(body.strip())
                out.append((f"{name(path)}:{line}", lang, body))
    return out


@pytest.mark.skipif(CURRENT is None, reason="EOS_DOCS_ENV is not set (the tox envs set it)")
@pytest.mark.parametrize("where,lang,body", _selected() or [pytest.param("", "", "", marks=pytest.mark.skip(
    reason=f"no block is tagged for {CURRENT}"))])
def test_documented_block_runs(where, lang, body, tmp_path):
    command = [sys.executable, "-c", body] if lang == "python" else ["bash", "-euo", "pipefail", "-c", body]
    # a block that crashes (a signal, an abort at exit) prints every thread's Python stack with its failure
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONFAULTHANDLER="1", EOS_README_ROOT=str(ROOT))
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f"{where} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def quickstart_commands() -> list[str]:
    """The quickstart block's command lines (comments dropped)."""
    body = blocks()[0][3]
    return [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]


#: what a fresh clone does not hold (caches, environments, outputs)
_NOT_IN_A_CLONE = shutil.ignore_patterns(".git", ".tox", ".venv", "venv", "build", "dist", "eos-demo", "runs",
                                         "lightning_logs", "__pycache__", "*.egg-info", ".pytest_cache",
                                         ".ruff_cache", ".hypothesis", "results", "theory_figures")


def fresh_copy(target: Path) -> Path:
    """The repository's files as a clone (plus the work tree's untracked, not ignored, files) would hold them."""
    listed = None
    if (ROOT / ".git").exists() and shutil.which("git"):
        result = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, timeout=60)
        if result.returncode == 0:
            listed = [f for f in result.stdout.decode().split("\0") if f and (ROOT / f).is_file()]
    if listed is None:
        shutil.copytree(ROOT, target, ignore=_NOT_IN_A_CLONE)
        return target
    for file in listed:
        (target / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / file, target / file)
    return target


def test_quickstart_is_one_command_line_each_that_makes_its_own_virtual_environment():
    first, second = quickstart_commands()
    for command in (first, second):
        # works on a Python marked externally managed (PEP 668): nothing is installed outside .venv
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && "), command
        assert "pip install" in command and "--user" not in command and "--break-system-packages" not in command
    assert "eos_core demo" in first and "tox" in second


@pytest.mark.skipif(CURRENT != "torch", reason="the quickstart's install + demo command runs in the torch env")
def test_quickstart_first_command_installs_and_runs_the_demo(tmp_path):
    command = quickstart_commands()[0]
    clone = fresh_copy(tmp_path / "eos_core")
    started = time.time()
    # as written, from the root of a fresh copy, as a new user does (the demo writes ./eos-demo)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=clone, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "CDAT" in result.stdout
    figures = [p for p in (clone / "eos-demo").glob("*.png") if p.stat().st_mtime >= started - 1]
    assert figures, "the demo wrote no figure"
    # it installed into its own virtual environment, not into the interpreter that runs this test
    venv_python = clone / ".venv" / "bin" / "python"
    check = subprocess.run([str(venv_python), "-c", "import eos_core, torch; print(eos_core.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and str(clone / ".venv") in check.stdout, check.stdout + check.stderr
    assert str(clone) not in str(Path(sys.executable).resolve())
