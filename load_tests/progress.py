"""A one-line progress bar on stderr: redrawn in place on a terminal, a line per 10% otherwise."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, title: str, enabled: bool = True, stream: TextIO = sys.stderr):
        self.total, self.title, self.enabled, self.stream = total, title, enabled and total > 0, stream
        self.ok = self.failed = 0
        self._start = self._drawn_at = time.monotonic()
        self._tty = stream.isatty()
        self._last_tenth = 0

    def update(self, success: bool) -> None:
        self.ok += success
        self.failed += not success
        if not self.enabled:
            return
        now, done = time.monotonic(), self.ok + self.failed
        tenth = done * 10 // self.total
        if self._tty and (now - self._drawn_at > 0.1 or done == self.total):
            self.stream.write("\r" + self.line())
            self._drawn_at = now
        elif not self._tty and tenth > self._last_tenth:
            self.stream.write(self.line() + "\n")
            self._last_tenth = tenth
        self.stream.flush()

    def line(self) -> str:
        done, elapsed = self.ok + self.failed, time.monotonic() - self._start
        filled = 30 * done // self.total
        return (f"{self.title} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} "
                f"ok {self.ok} failed {self.failed} | {done / max(elapsed, 1e-9):.2f} req/s | {elapsed:.1f} s")

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()
