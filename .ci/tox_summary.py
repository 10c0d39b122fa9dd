"""Print one table of the tox matrix's test results (tox env `summary`, which runs after the others).

Every test environment writes its pytest results as JUnit XML (`pytest --junitxml`) into
`.tox/junit/<env>.xml`; this script reads them and prints, per environment: tests run, passed, failed,
errors, skipped, the pytest time, and how long ago the environment finished (a file from an earlier
`tox` invocation is marked as such). Environments without tests (lint, docs, package) do not appear:
tox's own report, printed after this table, gives every environment's status and setup time.

Usage: python .ci/tox_summary.py JUNIT_DIR
Exit code: 1 when a listed environment has failures or errors, else 0.
"""

from __future__ import annotations

import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

#: files older than this (relative to the newest) are reported as left by an earlier tox invocation
STALE_AFTER_S = 3 * 3600.0


@dataclass
class Result:
    env: str
    tests: int
    failures: int
    errors: int
    skipped: int
    seconds: float
    finished: float  #: the file's modification time

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


def read(path: Path) -> Result:
    """The totals of one JUnit XML file (pytest writes `<testsuites><testsuite .../></testsuites>`)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    seconds = 0.0
    for suite in suites:
        for key in total:
            total[key] += int(suite.get(key, 0))
        seconds += float(suite.get("time", 0.0))
    return Result(path.stem, seconds=seconds, finished=path.stat().st_mtime, **total)


def age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def table(results: list[Result], now: float) -> str:
    """The summary table, one row per environment and a total row."""
    newest = max((r.finished for r in results), default=now)
    headers = ("env", "tests", "passed", "failed", "errors", "skipped", "time", "finished")
    rows = []
    for r in results:
        stale = newest - r.finished > STALE_AFTER_S
        rows.append((r.env, str(r.tests), str(r.passed), str(r.failures), str(r.errors), str(r.skipped),
                     f"{r.seconds:.0f} s", age(now - r.finished) + (" (earlier run)" if stale else "")))
    if results:
        rows.append(("total", *(str(sum(getattr(r, k) for r in results))
                                for k in ("tests", "passed", "failures", "errors", "skipped")),
                     f"{sum(r.seconds for r in results):.0f} s", ""))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: tuple[str, ...]) -> str:
        cells = [c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(cells).rstrip()

    out = [line(headers), line(tuple("-" * w for w in widths))]
    out += [line(row) for row in rows[:-1]]
    if rows:
        out += [line(tuple("-" * w for w in widths)), line(rows[-1])]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[0])
    files = sorted(folder.glob("*.xml")) if folder.is_dir() else []
    if not files:
        print(f"tox summary: no JUnit file in {folder} (no test environment has finished)")
        return 0
    results = [read(path) for path in files]
    print("Test results per tox environment (pytest time; tox's report below adds each env's setup time):")
    print(table(results, time.time()))
    bad = [r.env for r in results if r.failures or r.errors]
    if bad:
        print(f"FAILED: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
