"""The command line without any framework: help, usage errors, missing packages named, no framework imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from eos_core.cli import main

FRAMEWORKS = ("torch", "jax", "optax", "keras", "tensorflow", "sklearn", "matplotlib", "pandas")


def run_python(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code] if code is not None else [sys.executable, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/")


def test_python_dash_m_eos_core_help():
    result = run_python("-m", "eos_core", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: eos-core" in result.stdout and "demo" in result.stdout and "plot" in result.stdout
    demo = run_python("-m", "eos_core", "demo", "--help")
    assert demo.returncode == 0 and "--backend" in demo.stdout and "--methods" in demo.stdout


def test_cli_modules_import_no_framework():
    code = ("import sys, eos_core.cli, eos_core.plotting, eos_core.demo.runner, eos_core.demo.claims\n"
            "import eos_core.cli as c; c.build_parser()\n"
            f"print([m for m in {FRAMEWORKS!r} if m in sys.modules])\n")
    result = run_python(code=code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage: eos-core" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--steps", "0"], "--steps: expected an integer >= 1"),
    (["demo", "--steps", "ten"], "--steps: expected an integer >= 1"),
    (["demo", "--seed", "-1"], "--seed: expected an integer >= 0"),
    (["demo", "--methods", "sgd"], "unknown method 'sgd'"),
    (["demo", "--methods", "cdat=-2"], "scale must be > 0"),
    (["demo", "--lr-grid", "0.5,-1"], "learning rates must be > 0"),
    (["demo", "--backend", "tensorflow"], "invalid choice: 'tensorflow'"),
    (["demo", "--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["demo", "--model", "cnn", "--dataset", "mnist1d"], "--model cnn needs the 8x8 images"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["plot"], "the following arguments are required: history"),
])
def test_bad_arguments_exit_2_with_a_usage_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: eos-core" in err and message in err, err
    assert "Traceback" not in err


def test_bad_argument_through_the_real_entry_point_prints_no_traceback():
    result = run_python("-m", "eos_core", "demo", "--steps", "-3")
    assert result.returncode == 2
    assert "usage: eos-core demo" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("hidden, backend, install", [
    ("torch", "torch", "pip install 'eos-core[demo]'"),
    ("matplotlib", "torch", "pip install 'eos-core[demo]'"),
    ("sklearn", "torch", "pip install 'eos-core[demo]'"),
    ("jax", "jax", "pip install 'eos-core[jax]'"),
    ("optax", "jax", "pip install 'eos-core[jax]'"),
])
def test_a_missing_package_is_a_usage_error_naming_the_install(hidden, backend, install, tmp_path):
    code = (f"import sys\nsys.modules[{hidden!r}] = None\nfrom eos_core.cli import main\n"
            f"sys.exit(main(['demo', '--backend', {backend!r}, '--quick', '--out', {str(tmp_path)!r}]))\n")
    result = run_python(code=code)
    assert result.returncode == 2, result.stdout + result.stderr
    assert install in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_mnist1d_without_the_package_names_it(tmp_path):
    code = ("import sys\nsys.modules['mnist1d'] = None\nfrom eos_core.cli import main\n"
            f"sys.exit(main(['demo', '--dataset', 'mnist1d', '--out', {str(tmp_path)!r}]))\n")
    result = run_python(code=code)
    assert result.returncode == 2
    assert "pip install mnist1d" in result.stderr and "Traceback" not in result.stderr


def test_out_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quick", "--out", str(target)])
    assert exit_info.value.code == 2
    assert "is not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_plot_command_draws_a_csv_history(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    history = tmp_path / "metrics.csv"
    rows = ["step,eos/loss,eos/lr,eos/sharpness,eos/lr_sharpness"]
    rows += [f"{i},{1 / (i + 1)},0.5,{'' if i % 2 else 3.9 + 0.01 * i},{'' if i % 2 else 0.5 * (3.9 + 0.01 * i)}"
             for i in range(12)]
    history.write_text("\n".join(rows) + "\n")
    image = tmp_path / "figure.png"
    assert main(["plot", str(history), "--out", str(image), "--title", "mine"]) == 0
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(image) in capsys.readouterr().out


def test_plot_command_with_an_unreadable_history_is_a_usage_error(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    bad = tmp_path / "bad.csv"
    bad.write_text("accuracy\n0.5\n")
    for argv in (["plot", str(bad)], ["plot", str(tmp_path / "missing.csv")]):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--out", str(tmp_path / "x.png")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "usage: eos-core plot" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
