"""Smoke test of benchmarks/theory_figures.py: it draws every PNG and prints the summary table."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "theory_figures.py"
FIGURES = (
    "fig4_constant_vs_fixed_y.png",
    "fig9_cdat_model.png",
    "fig10_p_eq4.png",
    "fig11_p_cdat_model.png",
    "reference_normalized_gd.png",
    "reference_minimalist.png",
)


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_and_usage_errors(tmp_path):
    result = _run("--help", cwd=tmp_path)
    assert result.returncode == 0 and "--out" in result.stdout
    result = _run("--dpi", "zero", cwd=tmp_path)
    assert result.returncode == 2 and "usage:" in result.stderr
    (tmp_path / "a_file").write_text("")
    result = _run("--out", "a_file", cwd=tmp_path)
    assert result.returncode == 2 and "not a folder" in result.stderr


def test_script_writes_all_figures_and_the_table(tmp_path):
    pytest.importorskip("matplotlib")
    result = _run("--dpi", "40", cwd=tmp_path)  # default --out: theory_figures/ in the working folder
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "theory_figures"
    assert sorted(p.name for p in out.iterdir()) == sorted(FIGURES)
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    labels = ("eq4 constant lr", "eq4 fixed y", "CDAT model sigma=2", "CDAT model sigma=1.9", "normalized GD",
              "GD on sqrt(L)", "minimalist")
    for label in labels:
        assert label in result.stdout
