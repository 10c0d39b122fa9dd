"""The README's code blocks run, so the user guide cannot rot.

Every fenced ``python`` or ``bash`` block in README.md is preceded by a marker comment
``<!-- run: ENV -->`` naming the tox environment that executes it (its framework is installed there);
``<!-- run: keras -->`` runs in both Keras envs. Each tox env sets ``EOS_DOCS_ENV`` to its name and runs
the blocks tagged with it, each in a fresh interpreter (or bash) in a temporary folder. The quickstart
(the first block, ``<!-- run: ci -->``) is two commands: the first (install + demo) runs in the
``torch`` env from the repository root exactly as written; the second is the test command, which CI
itself executes (``.ci/run``, checked by ``tests/core/test_packaging.py``).

A block without a marker, or with an unknown environment, fails the ``core`` env's test: an untested
block cannot slip in.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
#: tox envs that run README blocks ("ci": run by .ci/run itself)
ENVS = ("core", "torch", "jax", "keras", "keras-jax", "keras-torch", "lightning", "transformers", "ci")
#: a block tagged with a group runs in each of its envs
GROUPS = {"keras": ("keras-jax", "keras-torch")}
BLOCK = re.compile(r"(?:<!--\s*run:\s*(?P<env>[\w-]+)\s*-->\s*\n)?```(?P<lang>[\w-]*)\n(?P<body>.*?)```", re.S)
CURRENT = os.environ.get("EOS_DOCS_ENV")


def blocks() -> list[tuple[int, str | None, str, str]]:
    """(line number, env, language, body) of every fenced block in the README."""
    text = README.read_text()
    out = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("lang")) + 1
        out.append((line, match.group("env"), match.group("lang"), match.group("body")))
    return out


def test_every_code_block_names_the_environment_that_runs_it():
    found = blocks()
    assert found, "README.md has no code blocks"
    for line, env, lang, _ in found:
        if lang in ("text", "console", "csv"):  # printed output shown to the reader, not code
            assert env is None, f"README.md:{line}: an output block carries a run marker"
            continue
        assert lang in ("python", "bash"), f"README.md:{line}: code block language {lang!r} (use python or bash)"
        assert env in ENVS, f"README.md:{line}: a {lang} block needs a '<!-- run: ENV -->' marker, ENV in {ENVS}"


def _selected() -> list[tuple[int, str, str]]:
    if CURRENT is None:
        return []
    return [(line, lang, body) for index, (line, env, lang, body) in enumerate(blocks())
            if index > 0 and (env == CURRENT or CURRENT in GROUPS.get(env or "", ()))]


@pytest.mark.skipif(CURRENT is None, reason="EOS_DOCS_ENV is not set (the tox envs set it)")
@pytest.mark.parametrize("line,lang,body", _selected() or [pytest.param(0, "", "", marks=pytest.mark.skip(
    reason=f"no README block is tagged for {CURRENT}"))])
def test_readme_block_runs(line, lang, body, tmp_path):
    command = [sys.executable, "-c", body] if lang == "python" else ["bash", "-euo", "pipefail", "-c", body]
    env = dict(os.environ, PYTHONWARNINGS="ignore", EOS_README_ROOT=str(ROOT))
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f"README.md:{line} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.mark.skipif(CURRENT != "torch", reason="the quickstart's install + demo command runs in the torch env")
def test_quickstart_first_command_installs_and_runs_the_demo(tmp_path):
    first = blocks()[0]
    command = [line.strip() for line in first[3].splitlines() if line.strip() and not line.startswith("#")][0]
    # run from the repository root, as a new user does (the demo writes ./eos-demo, ignored by git)
    started = time.time()
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "CDAT" in result.stdout
    figures = [p for p in (ROOT / "eos-demo").glob("*.png") if p.stat().st_mtime >= started - 1]
    assert figures, "the demo wrote no figure"
