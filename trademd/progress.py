"""What long runs show on the terminal: a small progress display on stderr (frames, rates,
ETA), and nothing from the banners of chatty libraries."""

from contextlib import contextmanager
import logging
import sys
import time
from typing import Iterator, TextIO

__all__ = ["Progress", "quiet_loggers"]


@contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Within the block, the loggers ``names`` (and their children) pass only errors; their
    levels are restored after. For imports and calls of libraries that log banners and
    warnings meant for their own users (pymbar's "JAX NOT FOUND", openmmtools' "experimental
    API")."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


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
