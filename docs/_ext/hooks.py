"""MkDocs hooks of the documentation site.

* `on_startup` / `on_config`: lay out the import package as it installs. The repository keeps `adapters/` and
  `integrations/` beside `eos_core/` and an install maps them to `eos_core.adapters` and
  `eos_core.integrations`; griffe reads the sources statically (nothing is imported, so the docs need
  no framework), so it is given a copy in that layout: `build/docs-src/eos_core/`.
* `on_page_markdown`: replace the markers `<!-- eos:diagnostics-table -->` and `<!-- eos:laws-table -->`
  with tables generated from the code (`eos_core.diagnostics.REGISTRY` and each law's `request()`), so
  the pages cannot drift from the registry.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SOURCE_TREE = ROOT / "build" / "docs-src"
#: the folders an install maps into the eos_core package
LAYERS = {"adapters": ROOT / "adapters", "integrations": ROOT / "integrations"}


def build_source_tree(target: Path = SOURCE_TREE) -> Path:
    """`target/eos_core/`: a copy of `eos_core/` with `adapters/` and `integrations/` inside (Python files only).

    A copy, not links: griffe resolves links and would find the folders outside the package again.
    """
    package = target / "eos_core"
    if package.exists():
        shutil.rmtree(package)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "eos_core", package, ignore=ignore)
    for name, folder in LAYERS.items():
        shutil.copytree(folder, package / name, ignore=ignore)
    return target


def _import_eos_core() -> Any:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import eos_core

    return eos_core


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def diagnostics_table() -> str:
    """The diagnostics registry as a Markdown table: name, meaning, when it holds a value, type."""
    from eos_core import diagnostics

    when = {"step": "every step", "probe": "probe steps", "tracked": "tracked steps",
            "total": "every step (cumulative)"}
    rows = ["| name | meaning | holds a value on | type |", "|---|---|---|---|"]
    for entry in diagnostics.REGISTRY:
        rows.append(f"| `{entry.name}` | {_cell(entry.meaning)} | {when.get(entry.when, entry.when)} | {entry.kind} |")
    return "\n".join(rows)


#: (law, its page) in the order of the laws' pages
LAW_PAGES = (
    ("CDAT(scale=2.0)", "cdat.md"),
    ("ExactSharpness(scale=2.0)", "exact-sharpness.md"),
    ("AdaEoS(target=2.0, lr_init=0.1)", "adaeos.md"),
    ("DCAO(target=1.5, lr_init=0.1)", "dcao.md"),
    ("Armijo()", "armijo.md"),
    ("Polyak(f_star=0.0)", "polyak.md"),
    ("HyperGradient(beta=0.01, lr_init=0.1)", "hypergradient.md"),
    ("Constant(0.1)", "schedules.md"),
    ("WarmupCosine(peak_lr=1.0, total_steps=100)", "schedules.md"),
)


def laws_table(prefix: str = "") -> str:
    """What each law measures on a probe step and what that costs, from `law.request()`."""
    eos_core = _import_eos_core()
    from eos_core import stats as S

    cost = {
        S.GRAD_DOT_UPDATE: "a dot product",
        S.CURVATURE: "**one u^T H u**, the curvature probe (its cost depends on the route, below)",
        S.LOSS: "the step's loss",
        S.TRIAL_LOSS: "**forward passes** at trial steps (the line search)",
        S.GRAD_NORM_SQ: "a dot product",
        S.GRAD_PREV_UPDATE_COSINE: "a dot product (with the previous update)",
        S.SHARPNESS: "**power iteration** on H (Hessian-vector products)",
        S.PRECONDITIONED_SHARPNESS: "**power iteration** on P^-1/2 H P^-1/2",
        S.TOP_EIGENVALUES: "**Lanczos** on H (Hessian-vector products)",
        S.PRECONDITIONED_TOP_EIGENVALUES: "**Lanczos** on P^-1/2 H P^-1/2",
    }
    rows = ["| law | statistics per probe (`law.needs`) | what they cost | second-order? |", "|---|---|---|---|"]
    for expression, page in LAW_PAGES:
        law = eval(expression, {name: getattr(eos_core, name) for name in eos_core.__all__})  # noqa: S307
        request = law.request()
        needs = sorted(request.needs)
        costs = "; ".join(dict.fromkeys(cost.get(n, n) for n in needs)) or "nothing (a schedule)"
        if request.spectral & {S.SHARPNESS, S.PRECONDITIONED_SHARPNESS}:
            tolerance = f", stops at {request.power_tol:g} relative change" if request.power_tol else ", all run"
            kind = f"spectral estimator (power iteration: <= {request.power_iters} products{tolerance})"
        elif request.spectral:
            kind = (f"spectral estimator (Lanczos: top {request.num_eigenvalues}, {request.lanczos_steps} "
                    "products)")
        elif request.curvature:
            kind = "curvature probe"
        elif needs:
            kind = "no (first order)"
        else:
            kind = "no (nothing measured)"
        name = expression.split("(")[0]
        rows.append(f"| [`{name}`]({prefix}{page}) | {', '.join(f'`{n}`' for n in needs) or '-'} | {costs} "
                    f"| {kind} |")
    return "\n".join(rows)


MARKERS = {
    "<!-- eos:diagnostics-table -->": lambda page: diagnostics_table(),
    "<!-- eos:laws-table -->": lambda page: laws_table("" if page.file.src_uri.startswith("laws/") else "laws/"),
}


def on_startup(**kwargs: Any) -> None:
    """Lay out the package for griffe before any plugin is configured.

    mkdocstrings drops the search paths that do not exist when it sets up its handler (in its own `on_config`,
    which runs before a hook's): on a fresh clone `build/docs-src` must exist by then, or griffe would read the
    source folder `./eos_core`, which lacks the adapters and integrations.
    """
    build_source_tree()


def on_config(config: Any, **kwargs: Any) -> Any:
    """Refresh the copy (under `mkdocs serve`, each rebuild picks up edited docstrings)."""
    build_source_tree()
    return config


def on_page_markdown(markdown: str, *, page: Any, **kwargs: Any) -> str:
    """Fill the generated tables."""
    for marker, render in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render(page))
    return markdown


if os.environ.get("EOS_DOCS_DEBUG"):  # pragma: no cover
    print(diagnostics_table())
    print(laws_table())
