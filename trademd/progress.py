"""A small progress display on stderr for long runs (frames, rates, ETA)."""

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Progress of ``total`` units of work, redrawn on one line on a terminal and printed as
    a line every ``every_s`` seconds otherwise (logs, CI).

    Args:
        total: amount of work.
        unit: what is counted (``frames``).
        stream: where to write (stderr by default, so stdout stays machine-readable).
        enabled: False silences it.
    """

    def __init__(self, total: int, unit: str, stream: TextIO | None = None, enabled: bool = True,
                 every_s: float = 10.0):
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.every_s = every_s
        self._start = time.perf_counter()
        self._last_print = -float("inf")
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, done: int, **metrics: str) -> None:
        """Report ``done`` units finished, with extra ``name=value`` figures."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self._tty and now - self._last_print < self.every_s and done < self.total:
            return
        self._last_print = now
        fraction = done / self.total if self.total else 1.0
        elapsed = now - self._start
        eta = elapsed / fraction - elapsed if fraction > 0 else float("nan")
        bar = "#" * int(20 * fraction)
        extra = "  ".join(f"{k}={v}" for k, v in metrics.items())
        line = f"[{bar:<20}] {done}/{self.total} {self.unit}  {extra}  eta {eta:.0f}s"
        if self._tty:
            self.stream.write("\r" + line + ("\n" if done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
