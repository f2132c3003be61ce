"""Progress of long work, on stderr: records done / total, rate and ETA.

On a terminal one line is redrawn in place (at most 5 times a second); otherwise (a log file, a
scheduler, a pipe) one line is printed per finished unit (a file, a work unit, a batch), so logs show
steady progress without carriage returns. Either way `close()` prints a one-line summary.

    with Progress("encode", total=rows, units=len(units)) as p:
        for r in results:
            p.update(r["rows"])          # one finished unit of r["rows"] records

VAEPIPE_PROGRESS=0 silences it (the summary too); VAEPIPE_PROGRESS=lines forces the line format on
a terminal, =tty the redrawn line off one."""
from __future__ import annotations

import os
import sys
import time
from typing import TextIO


def _num(n: float) -> str:
    return f"{n:,.0f}"


def _duration(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


class Progress:
    def __init__(self, what: str, total: int | None = None, units: int | None = None, noun: str = "records",
                 stream: TextIO | None = None, tty: bool | None = None, min_interval: float = 0.2):
        self.what, self.total, self.units, self.noun = what, total, units, noun
        self.stream = stream if stream is not None else sys.stderr
        mode = os.environ.get("VAEPIPE_PROGRESS", "").strip().lower()
        self.enabled = mode not in ("0", "off", "false", "no")
        if tty is None:
            tty = {"lines": False, "tty": True}.get(mode, _isatty(self.stream))
        self.tty, self.min_interval = tty, min_interval
        self.done, self.units_done = 0, 0
        self.t0 = time.perf_counter()
        self._last_draw = 0.0
        self._drawn = False
        self.closed = False

    # --- figures --------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def rate(self) -> float:
        e = self.elapsed
        return self.done / e if e > 0 else 0.0

    def eta(self) -> float | None:
        if not self.total or self.done <= 0 or self.done >= self.total:
            return None
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    def status(self) -> str:
        """`encode: 3/12 units, 250,000/1,000,000 records (25%), 41,000 records/s, ETA 18 s`"""
        parts = []
        if self.units:
            parts.append(f"{self.units_done}/{self.units} units")
        if self.total:
            parts.append(f"{_num(self.done)}/{_num(self.total)} {self.noun} ({100 * self.done / self.total:.0f}%)")
        else:
            parts.append(f"{_num(self.done)} {self.noun}")
        parts.append(f"{_num(self.rate)} {self.noun}/s")
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {_duration(eta)}")
        return f"{self.what}: " + ", ".join(parts)

    def summary(self) -> str:
        """`encode: 1,000,000 records in 24 s (41,000 records/s)`"""
        units = f" in {self.units_done} units" if self.units else ""
        return (f"{self.what}: {_num(self.done)} {self.noun}{units} in {_duration(self.elapsed)} "
                f"({_num(self.rate)} {self.noun}/s)")

    # --- reporting ------------------------------------------------------------------------------
    def update(self, n: int, units: int = 1) -> None:
        """`units` finished units holding `n` records between them."""
        self.done += int(n)
        self.units_done += int(units)
        if not self.enabled:
            return
        if not self.tty:
            self._write(self.status() + "\n")
            return
        now = time.perf_counter()
        if now - self._last_draw >= self.min_interval or (self.total and self.done >= self.total):
            self._last_draw = now
            self._write("\r\033[K" + self.status())
            self._drawn = True

    def close(self) -> str:
        """Print (once) and return the summary line."""
        line = self.summary()
        if self.enabled and not self.closed:
            self._write(("\r\033[K" if self.tty and self._drawn else "") + line + "\n")
        self.closed = True
        return line

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self.tty and self._drawn and self.enabled:
            self._write("\n")   # leave the last status visible above the traceback
        self.closed = True

    def _write(self, s: str) -> None:
        try:
            self.stream.write(s)
            self.stream.flush()
        except (OSError, ValueError):   # a closed pipe must not fail the job
            pass


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
