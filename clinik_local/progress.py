"""A dependency-free progress report for long CLI work, on stderr.

On a terminal it is a bar redrawn in place (at most ten times a second). Anywhere else
(a log file, a pipe, CI) it prints plain lines instead, so long work is never silent:
the first after two seconds, then one every five, and a closing line if any was
printed. Work that finishes quickly prints nothing off a terminal.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]

_TTY_INTERVAL = 0.1
_LINE_FIRST = 2.0
_LINE_INTERVAL = 5.0


class Progress:
    """``with Progress("importing", total) as bar: bar.advance(n)``; ``bar.note(text)``."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 0)
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._started = time.perf_counter()
        self._last_draw = self._started
        self._lines = 0

    def __enter__(self) -> Progress:
        if self._tty:
            self._draw_bar()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tty:
            self._draw_bar()
            self._write("\n")
        elif self._lines:
            elapsed = time.perf_counter() - self._started
            self._write(f"{self.label}: {self.done:,} of {self.total:,} in {elapsed:.1f} s\n")

    def advance(self, n: int = 1) -> None:
        """Record ``n`` more units done and redraw (rate-limited)."""
        self.done += n
        now = time.perf_counter()
        if self._tty:
            if now - self._last_draw >= _TTY_INTERVAL:
                self._draw_bar(now)
            return
        due = _LINE_FIRST if self._lines == 0 else _LINE_INTERVAL
        if now - self._last_draw >= due:
            self._last_draw = now
            self._lines += 1
            self._write(f"{self.label}: {self.done:,} of {self.total:,} ({self._rate(now)}/s)\n")

    def note(self, text: str) -> None:
        """Print one line of news (e.g. "the service is unreachable") without garbling the bar."""
        if self._tty:
            self._write("\r\x1b[K" + text + "\n")
            self._draw_bar()
        else:
            self._write(text + "\n")

    def _rate(self, now: float) -> str:
        return f"{self.done / max(now - self._started, 1e-9):,.0f}"

    def _draw_bar(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self._last_draw = now
        width = 30
        frac = 1.0 if self.total == 0 else min(self.done / self.total, 1.0)
        filled = int(frac * width)
        self._write(
            f"\r{self.label:<22} [{'#' * filled}{'.' * (width - filled)}] "
            f"{self.done:>9,}/{self.total:,} {self._rate(now):>10}/s"
        )

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()
