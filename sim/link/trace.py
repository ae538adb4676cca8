"""Mahimahi link traces: one line per 1500-byte delivery opportunity, in ms.

Each line is a non-negative integer timestamp in milliseconds, non-decreasing;
several lines with one timestamp mean several packets in that millisecond. The
trace repeats with a period equal to its last timestamp, as in Mahimahi.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

from sim.link.config import TRACE_PACKET, ConfigError


@dataclass(frozen=True)
class Trace:
    path: str
    times_ms: tuple[int, ...]  # delivery opportunities within one period

    @property
    def period_ms(self) -> int:
        return self.times_ms[-1]

    @property
    def mean_mbit(self) -> float:
        """Capacity the trace offers, averaged over one period."""
        return len(self.times_ms) * TRACE_PACKET * 8 / (self.period_ms / 1000) / 1e6

    def capacity_bytes(self, start_ms: float, end_ms: float) -> int:
        """Bytes the trace can deliver in [start, end) measured from the trace's start, looping."""
        return TRACE_PACKET * (opps_before(self, end_ms) - opps_before(self, start_ms))


def opps_before(trace: Trace, t_ms: float) -> int:
    """Number of delivery opportunities strictly before t_ms (trace time, looping)."""
    if t_ms <= 0:
        return 0
    loops, rem = divmod(t_ms, trace.period_ms)
    n = int(loops) * len(trace.times_ms) + bisect.bisect_left(trace.times_ms, rem)
    if rem == 0:
        # the previous loop's opportunities at its very end (time == period) coincide with t
        n -= len(trace.times_ms) - bisect.bisect_left(trace.times_ms, trace.period_ms)
    return n


def parse_trace(text: str, path: str = "<trace>") -> Trace:
    times: list[int] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            t = int(line)
        except ValueError:
            raise ConfigError(f"{path}:{lineno}: expected an integer millisecond timestamp, got {line!r}") from None
        if t < 0:
            raise ConfigError(f"{path}:{lineno}: timestamp {t} is negative")
        if times and t < times[-1]:
            raise ConfigError(f"{path}:{lineno}: timestamp {t} goes back in time (previous {times[-1]})")
        times.append(t)
    if not times:
        raise ConfigError(f"{path}: trace has no delivery opportunities")
    if times[-1] <= 0:
        raise ConfigError(f"{path}: last timestamp must be > 0 ms, it sets the loop period")
    return Trace(path=path, times_ms=tuple(times))


def load_trace(path: str | Path) -> Trace:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read trace {p}: {e.strerror}") from None
    return parse_trace(text, str(p))
