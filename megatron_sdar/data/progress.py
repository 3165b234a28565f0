"""A progress line for long data-tool runs: count, rate, bytes read and time left, on stderr.

On a terminal the line is rewritten in place at most every 2 s; into a log file a new line is
written at most every 30 s. A run that ends before the first report prints nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def human_bytes(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} TB"


def human_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Reports ``count`` ``unit`` done, their rate and an ETA.

    The ETA comes from ``total`` (of the same unit) when known, else from input bytes
    (``done_bytes`` of ``total_bytes``). ``every`` reports each that many units instead of by time.
    """

    def __init__(
        self,
        unit: str,
        *,
        total: int | None = None,
        total_bytes: int | None = None,
        enabled: bool = True,
        every: int | None = None,
        interval: float | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.unit = unit
        self.total = total
        self.total_bytes = total_bytes
        self.enabled = enabled
        self.every = every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (2.0 if self.tty else 30.0)
        self.clock = clock
        self.start = clock()
        self.last = self.start
        self.reported = 0
        self.printed = False
        self.width = 0

    def update(self, count: int, done_bytes: int | None = None) -> None:
        """Called after each unit; prints when a report is due."""
        if not self.enabled:
            return
        if self.every is not None:
            if count % self.every or count == self.reported:  # each multiple once, and not 0
                return
            now = self.clock()
        else:
            now = self.clock()
            if now - self.last < self.interval:
                return
        self.last, self.reported = now, count
        self._print(self.line(count, done_bytes, now))

    def line(self, count: int, done_bytes: int | None, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        parts = [f"{count:,} {self.unit}", f"{count / elapsed:,.0f} {self.unit}/s"]
        left = None
        if self.total:
            parts[0] += f" of {self.total:,} ({count / self.total:.0%})"
            if count:
                left = (self.total - count) * elapsed / count
        if done_bytes is not None:
            read = human_bytes(done_bytes)
            if self.total_bytes:
                read += f" of {human_bytes(self.total_bytes)} ({min(done_bytes / self.total_bytes, 1):.0%})"
            parts.append(f"{read} read, {human_bytes(done_bytes / elapsed)}/s")
            if left is None and self.total_bytes and done_bytes:
                left = max(self.total_bytes - done_bytes, 0) * elapsed / done_bytes
        if left is not None:
            parts.append(f"ETA {human_seconds(left)}")
        return ", ".join(parts)

    def _print(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.printed = True

    def finish(self, count: int, done_bytes: int | None = None) -> None:
        """The last report (with the time taken), only when an earlier one was printed."""
        if not (self.enabled and self.printed):
            return
        now = self.clock()
        text = self.line(count, done_bytes, now).split(", ETA")[0]
        self._print(f"{text}, done in {human_seconds(now - self.start)}")
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
