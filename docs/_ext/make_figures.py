"""Redraw the figures the documentation shows (`docs/assets/figures/`), from the scripts that produce them.

    python docs/_ext/make_figures.py                        # everything: about 6 minutes of one CPU core
    python docs/_ext/make_figures.py --only theory demo      # a part
    python docs/_ext/make_figures.py --from-csv DIR          # reproductions redrawn from DIR/{mlp,cnn}/trajectories.csv

* `demo.png`: `eos-core demo` with its defaults (torch backend);
* `repro_{mlp,cnn}.png`, `repro_{mlp,cnn}_constant.png`: `benchmarks/reproduce_{mlp,cnn}.py` with their defaults;
* `theory_*.png`: `benchmarks/theory_figures.py`.

Needs the `demo` extra (torch, scikit-learn, matplotlib). The PNGs are stored as 256-colour palettes (about a third
of the size, no visible difference on line plots).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "docs" / "assets" / "figures"
THEORY = {
    "fig4_constant_vs_fixed_y.png": "theory_fig4.png",
    "fig9_cdat_model.png": "theory_fig9.png",
    "reference_normalized_gd.png": "theory_normalized_gd.png",
    "reference_minimalist.png": "theory_minimalist.png",
}


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    subprocess.run(command, cwd=ROOT, env=env, check=True)


def store(source: Path, name: str, *, compress: bool) -> None:
    target = FIGURES / name
    if compress:
        from PIL import Image

        with Image.open(source) as image:
            image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    else:
        shutil.copyfile(source, target)
    print(f"wrote {target.relative_to(ROOT)} ({target.stat().st_size // 1024} KiB)")


def redraw(csv: Path, out: Path, arch: str) -> None:
    """The reproduction's two figures from its saved trajectories (the scripts redraw nothing with --from-csv)."""
    sys.path.insert(0, str(ROOT))
    from eos_core.demo.results import best_constant, read_trajectories_csv
    from eos_core.plotting import plot_edge_of_stability

    runs = read_trajectories_csv(csv)
    best = best_constant(runs)
    out.mkdir(parents=True, exist_ok=True)
    shown = {r.label: r.as_history() for r in runs if r.method.kind != "gd" or r is best}
    plot_edge_of_stability(shown, path=out / "edge_of_stability.png",
                           title=f"benchmarks/reproduce_{arch}.py: best constant lr, Armijo, CDAT 1 / 2 / 2.0625")
    grid = {r.label: r.as_history() for r in runs if r.method.kind == "gd" and not r.stopped}
    plot_edge_of_stability(grid, path=out / "constant_lrs.png",
                           title="B1: GD at each constant lr of the grid (dotted: 2/lr)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=("theory", "demo", "reproductions"),
                        default=["theory", "demo", "reproductions"])
    parser.add_argument("--from-csv", type=Path, default=None,
                        help="redraw the reproductions from DIR/mlp/trajectories.csv and DIR/cnn/trajectories.csv")
    parser.add_argument("--no-compress", action="store_true", help="copy the PNGs as drawn (RGBA)")
    args = parser.parse_args()
    FIGURES.mkdir(parents=True, exist_ok=True)
    compress = not args.no_compress
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        if "theory" in args.only:
            run([sys.executable, "benchmarks/theory_figures.py", "--out", str(work / "theory")])
            for source, name in THEORY.items():
                store(work / "theory" / source, name, compress=compress)
        if "demo" in args.only:
            run([sys.executable, "-m", "eos_core", "demo", "--no-progress", "--out", str(work / "demo")])
            store(work / "demo" / "edge_of_stability.png", "demo.png", compress=compress)
        if "reproductions" in args.only:
            for arch in ("mlp", "cnn"):
                if args.from_csv is not None:
                    redraw(args.from_csv / arch / "trajectories.csv", work / arch, arch)
                else:
                    run([sys.executable, f"benchmarks/reproduce_{arch}.py", "--no-progress", "--out",
                         str(work / arch)])
                store(work / arch / "edge_of_stability.png", f"repro_{arch}.png", compress=compress)
                store(work / arch / "constant_lrs.png", f"repro_{arch}_constant.png", compress=compress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
