"""A dependency-free progress bar on stderr.

On a terminal the bar redraws in place (at most 10 times a second); elsewhere (a pipe, a CI log)
it writes one line per run when the run ends, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """`[2/7] CDAT(scale=2)   |#######.......|  150/300  loss 0.0412  lr 0.81  3.2s`."""

    def __init__(self, label: str, total: int, *, position: str = "", stream: TextIO | None = None,
                 enabled: bool = True, width: int = 24) -> None:
        self.label = label
        self.total = max(int(total), 1)
        self.position = position
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.interactive = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._count = 0
        self._info = ""

    def _line(self) -> str:
        filled = int(self.width * self._count / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        prefix = f"{self.position} " if self.position else ""
        elapsed = time.perf_counter() - self.start
        return (f"{prefix}{self.label:<22} |{bar}| {self._count:>{len(str(self.total))}}/{self.total}"
                f"  {self._info}  {elapsed:.1f}s")

    def update(self, count: int, info: str = "") -> None:
        """Record progress (`count` steps done) and redraw the bar on a terminal, at most 10 times a second."""
        self._count, self._info = count, info
        if not self.interactive:
            return
        now = time.perf_counter()
        if now - self._last_draw >= 0.1 or count >= self.total:
            self._last_draw = now
            self.stream.write("\r" + self._line() + "\x1b[K")
            self.stream.flush()

    def close(self, info: str | None = None) -> None:
        """Write the final line (with `info` as its note, when given) and end it."""
        if info is not None:
            self._info = info
        if not self.enabled:
            return
        self.stream.write(("\r" if self.interactive else "") + self._line() + ("\x1b[K" if self.interactive else "")
                          + "\n")
        self.stream.flush()
