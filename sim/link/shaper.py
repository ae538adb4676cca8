"""Pacing math: when may the next bytes leave the bottleneck.

Both shapers are fluid servers driven by a byte-credit clock rather than by
sleeping per packet: per-1500-byte sleeps fall ~50 % short at 10 Mbit/s because
every wake-up is late. Instead each reservation is placed right after the
previous one on an ideal timeline, so lateness of the task that drains the queue
never costs capacity — up to `max_lag` seconds of it, which bounds the burst a
stalled event loop may release. A link that went idle earns no credit: bytes
that arrive to an empty queue start at their arrival time.

Times are plain floats (seconds on any monotonic clock) passed in by the
caller, so tests drive these classes with a fake clock.
"""

from __future__ import annotations

import math

from sim.link.config import TRACE_PACKET
from sim.link.trace import Trace, opps_before

# How much lateness of the draining task is made up for. On a shared machine
# under heavy CPU pressure the proxy can be descheduled for a few hundred ms;
# making that up keeps the average rate, at the cost of a burst no larger than
# this much link time.
MAX_LAG_S = 0.25


class RateShaper:
    def __init__(self, rate_mbit: float, max_lag_s: float = MAX_LAG_S, not_before: float = 0.0):
        self.bytes_per_s = rate_mbit * 1e6 / 8
        self.max_lag_s = max_lag_s
        self._t_free = not_before

    @property
    def free_at(self) -> float:
        """When everything reserved so far has left."""
        return self._t_free

    def reserve(self, nbytes: int, arrival: float, now: float) -> float:
        """Book nbytes that joined the queue at `arrival`; return when their last byte leaves."""
        start = max(self._t_free, arrival, now - self.max_lag_s)
        self._t_free = start + nbytes / self.bytes_per_s
        return self._t_free

    def hold_until(self, t: float) -> None:
        """Nothing may leave before t (the link was down)."""
        self._t_free = max(self._t_free, t)


class TraceShaper:
    """Delivery opportunities from a Mahimahi trace that starts at `origin`.

    Byte position k·1500 … (k+1)·1500 of the link belongs to opportunity k; an
    opportunity that passes while the queue is empty is lost, as in Mahimahi.
    """

    def __init__(self, trace: Trace, origin: float, max_lag_s: float = MAX_LAG_S, not_before: float = 0.0):
        self.trace = trace
        self.origin = origin
        self.max_lag_s = max_lag_s
        self._served = 0  # byte position reached on the opportunity timeline
        self.hold_until(not_before)

    def _time_of(self, k: int) -> float:
        loops, j = divmod(k, len(self.trace.times_ms))
        return self.origin + (loops * self.trace.period_ms + self.trace.times_ms[j]) / 1000

    def _first_opp_at_or_after(self, t: float) -> int:
        return opps_before(self.trace, (t - self.origin) * 1000)

    @property
    def free_at(self) -> float:
        return self._time_of(math.ceil(self._served / TRACE_PACKET))

    def reserve(self, nbytes: int, arrival: float, now: float) -> float:
        t = max(arrival, now - self.max_lag_s)
        start = max(self._served, self._first_opp_at_or_after(t) * TRACE_PACKET)
        self._served = start + nbytes
        return self._time_of(math.ceil(self._served / TRACE_PACKET) - 1)

    def hold_until(self, t: float) -> None:
        self._served = max(self._served, self._first_opp_at_or_after(t) * TRACE_PACKET)


def chunk_bytes(rate_mbit: float) -> int:
    """Read size worth ~5 ms of link time: small enough to pace smoothly, big enough
    that a Python event loop keeps up at 200 Mbit/s."""
    return int(min(256 * 1024, max(64, rate_mbit * 1e6 / 8 * 0.005)))
