"""A griffe extension: render the Sphinx markup left in docstrings as Markdown for mkdocstrings.

The library's docstrings are moving from Sphinx markup (``:func:`x```, ``.. math::``) to Markdown
(`` [`x`][eos_core.x] ``, ``$...$``). This extension converts what is left when the documentation is
built, without touching the sources:

* ``:func:`` / ``:class:`` / ``:meth:`` / ``:mod:`` / ``:data:`` / ``:attr:`` / ``:exc:`` / ``:obj:`` roles
  become cross-references when the target resolves in the loaded package (relative to the object,
  its parents, or absolute), else inline code. The references are *optional*: an object that no page
  renders shows as code instead of breaking ``mkdocs build --strict``. (References written in Markdown
  are not optional: a broken one fails the build.)
* ``:math:`x``` becomes ``$x$``; a ``.. math::`` block becomes ``$$ ... $$`` (one per paragraph).
* a paragraph ending in ``::`` (a literal block) becomes a fenced code block; bare doctest lines
  (``>>>``) outside an Examples section become a ``pycon`` block.
* an attribute documented by a Sphinx ``#:`` comment (on the line above, or trailing on its line) gets
  that comment as its docstring, so that it is rendered and can be referenced.

``tests/docs/test_docs_site.py`` lists which modules still hold Sphinx markup.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?P<role>func|class|meth|mod|data|attr|exc|obj|const):`(?P<body>[^`]+)`")
MATH_ROLE = re.compile(r":math:`(?P<body>[^`]+)`")
TITLED = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _resolve(obj: griffe.Object, target: str, collection: Any) -> str | None:
    """The full path of ``target`` as Sphinx would look it up from ``obj``, when it exists in the package."""
    name = target.rstrip("()")
    candidates = []
    if name.startswith("."):
        module = obj.module
        base = module.path if module.is_package else (module.parent.path if module.parent else module.path)
        candidates.append(base + name)
    else:
        scope: Any = obj
        while scope is not None:
            candidates.append(f"{scope.path}.{name}")
            scope = scope.parent
        candidates.append(name)
    for candidate in candidates:
        try:
            collection.get_member(candidate)
        except Exception:  # noqa: BLE001 (KeyError, alias resolution errors: not found)
            continue
        return candidate
    return None


def convert_roles(text: str, resolve: Any) -> str:
    """Sphinx roles -> cross-references or inline code; ``:math:`` -> ``$...$``."""
    text = MATH_ROLE.sub(lambda m: f"${m['body']}$", text)

    def role(match: re.Match[str]) -> str:
        body = match["body"].strip()
        titled = TITLED.match(body)
        title, target = (titled["title"], titled["target"]) if titled else (None, body)
        short = target.startswith("~")
        target = target.lstrip("~!")
        display = title or (target.rstrip("()").rsplit(".", 1)[-1] if short else target)
        path = resolve(target)
        if path is None:
            return f"`{display}`"
        return f'<autoref identifier="{path}" optional><code>{display}</code></autoref>'

    return ROLE.sub(role, text)


def convert_blocks(text: str) -> str:
    """``.. math::`` blocks, ``::`` literal blocks and bare doctest lines -> Markdown blocks."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    in_examples = False
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if re.match(r"^(Examples?|Example usage):\s*$", stripped):
            in_examples = True
        elif stripped and _indent(line) == 0 and stripped.endswith(":") and not stripped.startswith(">>>"):
            in_examples = False
        if stripped.startswith(".. math::") or (stripped.endswith("::") and not stripped.startswith(">>>")):
            indent = _indent(line)
            is_math = stripped.startswith(".. math::")
            head = stripped[len(".. math::"):].strip() if is_math else ""
            block = [head] if head else []
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > indent):
                block.append(lines[j])
                j += 1
            while block and not block[-1].strip():
                block.pop()
            body = textwrap.dedent("\n".join(block)).strip("\n")
            pad = " " * indent
            if is_math:
                for k, paragraph in enumerate(p for p in re.split(r"\n\s*\n", body) if p.strip()):
                    if k:
                        out.append("")
                    out += [pad + "$$", *(pad + row for row in paragraph.splitlines()), pad + "$$"]
            else:
                out.append(line.rstrip()[:-1])  # "text::" -> "text:"
                out += ["", pad + "```python", *(pad + row if row else "" for row in body.splitlines()),
                        pad + "```"]
            if j < len(lines):
                out.append("")
            i = j
            continue
        if stripped.startswith(">>>") and not in_examples:
            indent = _indent(line)
            pad = " " * indent
            block = []
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) >= indent:
                block.append(lines[i][indent:])
                i += 1
            out += [pad + "```pycon", *(pad + row for row in block), pad + "```"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def convert(text: str, resolve: Any) -> str:
    """The whole conversion of one docstring."""
    return convert_roles(convert_blocks(text), resolve)


def comment_docstring(obj: griffe.Object, lines: list[str]) -> str | None:
    """The ``#:`` comment that documents an attribute: trailing on its line, or the lines just above it."""
    if not obj.lineno or obj.lineno > len(lines):
        return None
    own = re.search(r"#:\s?(.*)$", lines[obj.lineno - 1])
    if own:
        return own.group(1).strip()
    above = []
    index = obj.lineno - 2
    while index >= 0 and lines[index].strip().startswith("#:"):
        above.insert(0, lines[index].strip()[2:].strip())
        index -= 1
    return " ".join(above) or None


class SphinxMarkup(griffe.Extension):
    """Convert each docstring of the loaded package once its object tree is complete."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        collection = loader.modules_collection
        seen: set[int] = set()

        def visit(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is None and obj.is_attribute and obj.filepath is not None:
                try:
                    text = comment_docstring(obj, loader.lines_collection[obj.filepath])
                except KeyError:
                    text = None
                if text:
                    obj.docstring = griffe.Docstring(text, lineno=obj.lineno, parent=obj)
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value, lambda t: _resolve(obj, t, collection))
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
