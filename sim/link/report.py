"""What the link delivered: counters per direction and the JSON lines built from them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class DirStats:
    """Cumulative counters of one direction; `interval()` reads and resets the per-interval part."""

    bytes_in: int = 0  # read from the sender
    bytes_out: int = 0  # written to the receiver
    chunks_out: int = 0
    delay_sum_s: float = 0.0  # Σ (written − queued) over chunks: queueing + serialisation + propagation
    delay_max_s: float = 0.0
    queue_full_events: int = 0  # a sender had to wait because the bottleneck buffer was full
    queue_full_s: float = 0.0
    lost_segments: int = 0
    retransmitted_bytes: int = 0
    outage_s: float = 0.0
    _delays: list[float] = field(default_factory=list, repr=False)

    def delivered(self, nbytes: int, delay_s: float) -> None:
        self.bytes_out += nbytes
        self.chunks_out += 1
        self.delay_sum_s += delay_s
        self.delay_max_s = max(self.delay_max_s, delay_s)
        if len(self._delays) < 100_000:
            self._delays.append(delay_s)

    def totals(self) -> dict:
        return {
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "added_delay_ms_mean": _ms(self.delay_sum_s / self.chunks_out) if self.chunks_out else None,
            "added_delay_ms_max": _ms(self.delay_max_s),
            "queue_full_events": self.queue_full_events,
            "queue_full_s": round(self.queue_full_s, 3),
            "lost_segments": self.lost_segments,
            "retransmitted_bytes": self.retransmitted_bytes,
            "outage_s": round(self.outage_s, 3),
        }

    def take_delays(self) -> list[float]:
        out, self._delays = self._delays, []
        return out


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _pct(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    return _ms(sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))])


class Reporter:
    """Turns the counters into one JSON object per interval and one at exit."""

    def __init__(self, started: float):
        self.started = started
        self._last_t = started
        self._last: dict[str, dict] = {}

    def interval(self, now: float, stats: dict[str, DirStats], extra: dict) -> dict:
        dt = max(1e-9, now - self._last_t)
        out = {"t": round(now - self.started, 3), "interval_s": round(dt, 3)}
        for name, st in stats.items():
            prev = self._last.get(name, {})
            cur = st.totals()
            delays = sorted(st.take_delays())
            d_out = cur["bytes_out"] - prev.get("bytes_out", 0)
            out[name] = {
                "bytes_in": cur["bytes_in"] - prev.get("bytes_in", 0),
                "bytes_out": d_out,
                "mbit_per_s": round(d_out * 8 / dt / 1e6, 4),
                "added_delay_ms_p50": _pct(delays, 0.5),
                "added_delay_ms_p99": _pct(delays, 0.99),
                "queue_full_events": cur["queue_full_events"] - prev.get("queue_full_events", 0),
                "queue_full_s": round(cur["queue_full_s"] - prev.get("queue_full_s", 0), 3),
                "lost_segments": cur["lost_segments"] - prev.get("lost_segments", 0),
                "outage_s": round(cur["outage_s"] - prev.get("outage_s", 0), 3),
            }
            self._last[name] = cur
        out.update(extra)
        self._last_t = now
        return out

    def final(self, now: float, stats: dict[str, DirStats], extra: dict) -> dict:
        elapsed = max(1e-9, now - self.started)
        out: dict = {"final": True, "elapsed_s": round(elapsed, 3)}
        for name, st in stats.items():
            tot = st.totals()
            tot["mean_mbit_per_s"] = round(tot["bytes_out"] * 8 / elapsed / 1e6, 4)
            out[name] = tot
        out.update(extra)
        return out


def dumps(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False)
