"""A dependency-free progress bar for long CLI work (drawn only on a terminal)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """``with Progress("importing", total) as bar: bar.advance(n)``; silent when not a TTY."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 0)
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._last_draw = 0.0
        self._started = time.perf_counter()

    def __enter__(self) -> Progress:
        self._draw(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._draw(force=True)
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()

    def advance(self, n: int = 1) -> None:
        """Record ``n`` more units done and redraw at most ten times a second."""
        self.done += n
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self._tty:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        width = 30
        frac = 1.0 if self.total == 0 else min(self.done / self.total, 1.0)
        filled = int(frac * width)
        rate = self.done / max(now - self._started, 1e-9)
        self._stream.write(
            f"\r{self.label:<22} [{'#' * filled}{'.' * (width - filled)}] "
            f"{self.done:>9,}/{self.total:,} {rate:>10,.0f}/s"
        )
        self._stream.flush()
