"""The documentation site's sources agree with the code (numpy only; the `docs` tox env builds the site itself).

* every page is in the navigation and every navigation entry exists; every image a page shows exists;
* the generated tables (diagnostics registry, what each law measures) cover the code they are generated from;
* every tuning law has a page with its equation, a reference, a parameter table that names exactly the law's
  constructor parameters, and an example that runs;
* docstrings cite papers, not internal documents, and the modules converted to Markdown stay free of Sphinx markup;
* the griffe extension that renders the remaining Sphinx markup converts what it should.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


hooks = load("eos_docs_hooks", DOCS / "_ext" / "hooks.py")


def nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:"):text.index("\nhooks:")]
    return re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, flags=re.M)


def pages() -> list[str]:
    return sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "_ext" not in p.parts)


def test_every_page_is_in_the_navigation_and_every_entry_exists():
    listed = nav_pages()
    assert len(listed) == len(set(listed)), "a page is listed twice"
    assert sorted(listed) == pages()


def test_every_image_a_page_shows_is_drawn_by_make_figures():
    """Figures are not committed: docs/_ext/make_figures.py draws them into docs/assets/figures before the build."""
    script = (DOCS / "_ext" / "make_figures.py").read_text()
    drawn = set(re.findall(r'"([a-z0-9_]+\.png)"', script)) | {
        f"repro_{arch}{suffix}.png" for arch in ("mlp", "cnn") for suffix in ("", "_constant")}
    for page in pages():
        text = (DOCS / page).read_text()
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
            resolved = (DOCS / page).parent.joinpath(target).resolve()
            assert resolved.parent == (DOCS / "assets" / "figures").resolve(), f"{page}: {target} outside the figures"
            assert resolved.name in drawn, f"{page}: no script draws {target}"


def test_the_diagnostics_table_is_generated_from_the_registry():
    from eos_core.diagnostics import REGISTRY

    page = (DOCS / "guide" / "diagnostics.md").read_text()
    assert "<!-- eos:diagnostics-table -->" in page
    table = hooks.diagnostics_table()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [re.match(r"\| `([\w]+)`", row).group(1) for row in rows] == [entry.name for entry in REGISTRY]
    for entry, row in zip(REGISTRY, rows, strict=True):
        assert entry.meaning.replace("|", "\\|") in row


def law_classes() -> dict[str, type]:
    from eos_core import laws

    out = {}
    for name in laws.__all__:
        obj = getattr(laws, name)
        if inspect.isclass(obj) and issubclass(obj, laws.Law) and not inspect.isabstract(obj):
            out[name] = obj
    return out


def test_every_law_has_a_page_in_the_generated_table():
    table = hooks.laws_table()
    named = {expression.split("(")[0]: page for expression, page in hooks.LAW_PAGES}
    assert set(named) == set(law_classes()), "LAW_PAGES must list every law of eos_core.laws"
    for name, page in named.items():
        assert (DOCS / "laws" / page).is_file(), page
        assert f"[`{name}`]({page})" in table
    cdat_row = next(line for line in table.splitlines() if line.startswith("| [`CDAT`]"))
    assert "`curvature`" in cdat_row and "curvature probe" in cdat_row
    dcao_row = next(line for line in table.splitlines() if line.startswith("| [`DCAO`]"))
    assert "Lanczos" in dcao_row and "20 products" in dcao_row


@pytest.mark.parametrize("name", sorted(law_classes()))
def test_a_law_page_has_the_equation_a_reference_the_parameters_and_an_example(name):
    page_name = dict((e.split("(")[0], p) for e, p in hooks.LAW_PAGES)[name]
    text = (DOCS / "laws" / page_name).read_text()
    assert "$$" in text, "the rule as an equation"
    assert "arxiv.org/abs/" in text or "unpublished research proposal" in text, "a reference with a link"
    assert re.search(r"<!-- run: \w+ -->\n```python", text), "an example that runs"
    assert "## What it measures, and what that costs" in text and "## When to use it" in text
    # the parameter table names exactly the constructor's parameters
    table = text[text.index("## Parameters"):text.index("## What it measures")]
    documented = set()
    for cell in re.findall(r"^\| ([^|]+) \|", table, flags=re.M):
        documented |= set(re.findall(r"`(\w+)`", cell))
    signature = inspect.signature(law_classes()[name].__init__)
    expected = {p for p, v in signature.parameters.items() if p != "self" and v.kind != v.VAR_KEYWORD}
    if page_name == "schedules.md":
        expected = {p for cls in ("Constant", "WarmupCosine") for p, v in inspect.signature(
            law_classes()[cls].__init__).parameters.items() if p != "self" and v.kind != v.VAR_KEYWORD}
    assert documented == expected, f"{page_name}: documented {sorted(documented)}, signature {sorted(expected)}"


#: modules whose docstrings are Markdown now (Sphinx roles, `.. math::` and "SPEC" must not come back)
CONVERTED = sorted(
    [*(ROOT / "eos_core").glob("*.py"), *(ROOT / "eos_core").glob("*/*.py"), *(ROOT / "adapters").glob("**/*.py"),
     *(ROOT / "integrations").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
     *(ROOT / "benchmarks" / "minibatch").glob("*.py")]
)
SPHINX = re.compile(r":(func|class|meth|mod|data|attr|exc|obj|math):`|^\s*\.\. math::", re.M)


@pytest.mark.parametrize("path", CONVERTED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_converted_docstrings_use_markdown_and_cite_papers(path):
    text = path.read_text()
    assert not SPHINX.search(text), f"{path.name}: Sphinx markup; use Markdown (`[x][eos_core.x]`, `$...$`)"
    assert not re.search(r"\bSPEC\b(?!TRAL)|\.\./shared", text), f"{path.name}: cite the paper and equation instead"


def test_the_sphinx_markup_extension_converts_roles_math_and_literal_blocks():
    pytest.importorskip("griffe")
    ext = load("eos_docs_sphinx_markup", DOCS / "_ext" / "griffe_sphinx_markup.py")
    resolve = {"CurvatureTuner": "eos_core.adapters.torch.CurvatureTuner"}.get
    text = ext.convert_roles("See :class:`CurvatureTuner`, :func:`~a.b.missing` and :math:`\\eta u`.", resolve)
    assert text == ('See <autoref identifier="eos_core.adapters.torch.CurvatureTuner" optional>'
                    "<code>CurvatureTuner</code></autoref>, `missing` and $\\eta u$.")
    block = ext.convert_blocks("Rule:\n\n.. math::\n\n    a = b\n\n    c = d\n\nAfter.")
    assert block == "Rule:\n\n$$\na = b\n$$\n\n$$\nc = d\n$$\n\nAfter."
    literal = ext.convert_blocks("Usage::\n\n    tune(x)\n\nDone.")
    assert literal == "Usage:\n\n```python\ntune(x)\n```\n\nDone."
    doctest_block = ext.convert_blocks("Text.\n\n>>> f(1)\n2\n")
    assert doctest_block == "Text.\n\n```pycon\n>>> f(1)\n2\n```"
    examples = "Examples:\n    >>> f(1)\n    2"
    assert ext.convert_blocks(examples) == examples  # griffe's Examples section renders these itself
