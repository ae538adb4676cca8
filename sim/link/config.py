"""Conditions of the simulated link, per direction, and their limits.

`up` is edge→cloud (client→upstream), `down` is cloud→edge. Units are the ones
people quote for links: Mbit/s, milliseconds, kilobytes, a loss probability.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MIN_RATE_MBIT = 0.032  # 32 kbit/s: a bad GPRS link
MAX_RATE_MBIT = 1000.0
MAX_DELAY_MS = 10_000.0
JITTER_DISTS = ("normal", "uniform", "exponential")
OUTAGE_MODES = ("wait", "reset")

# Segment size TCP would use on a 1500-byte MTU path; loss is drawn per segment.
MSS = 1448
# A Mahimahi delivery opportunity carries one full-size packet.
TRACE_PACKET = 1500


class ConfigError(ValueError):
    """A bad value; the message names the setting (and the file line when there is one)."""


@dataclass(frozen=True)
class Direction:
    """Conditions of one direction of the link."""

    rate_mbit: float = 10.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    jitter_dist: str = "normal"
    loss: float = 0.0  # probability that a segment is lost and retransmitted after one RTO
    queue_kbyte: float = 0.0  # bottleneck buffer; 0 = auto (100 ms at the rate, at least 32 KB)
    trace: str | None = None  # Mahimahi trace file; when set it replaces rate_mbit

    def __post_init__(self) -> None:
        _check_range("rate", self.rate_mbit, MIN_RATE_MBIT, MAX_RATE_MBIT, "Mbit/s")
        _check_range("delay", self.delay_ms, 0.0, MAX_DELAY_MS, "ms")
        _check_range("jitter", self.jitter_ms, 0.0, MAX_DELAY_MS, "ms")
        if self.jitter_dist not in JITTER_DISTS:
            raise ConfigError(
                f"jitter distribution {self.jitter_dist!r} unknown; choose one of {', '.join(JITTER_DISTS)}"
            )
        # Loss at or above 50 % would stall TCP for ever rather than model it.
        _check_range("loss", self.loss, 0.0, 0.5, "(probability)")
        _check_range("queue", self.queue_kbyte, 0.0, 1_000_000.0, "KB")

    @property
    def queue_bytes(self) -> int:
        if self.queue_kbyte > 0:
            return int(self.queue_kbyte * 1000)
        return max(32_000, int(self.rate_mbit * 1e6 / 8 * 0.100))

    def replace(self, **changes) -> "Direction":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["queue_bytes"] = self.queue_bytes
        return out


@dataclass(frozen=True)
class LinkConfig:
    """Everything link-sim needs to shape both directions."""

    up: Direction = field(default_factory=Direction)
    down: Direction = field(default_factory=Direction)
    profile: str | None = None
    outage_mode: str = "wait"  # during an outage bytes wait, or live connections are reset
    rto_ms: float = 0.0  # 0 = auto: max(200 ms, RTT + 4·jitter), Linux's floor and formula
    seed: int = 0

    def __post_init__(self) -> None:
        if self.outage_mode not in OUTAGE_MODES:
            raise ConfigError(f"outage mode {self.outage_mode!r} unknown; choose wait or reset")
        _check_range("rto", self.rto_ms, 0.0, 60_000.0, "ms")

    @property
    def rtt_ms(self) -> float:
        return self.up.delay_ms + self.down.delay_ms

    @property
    def effective_rto_ms(self) -> float:
        if self.rto_ms > 0:
            return self.rto_ms
        return max(200.0, self.rtt_ms + 4 * max(self.up.jitter_ms, self.down.jitter_ms))

    def replace(self, **changes) -> "LinkConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return {
            "profile": self.profile,
            "up": self.up.to_json(),
            "down": self.down.to_json(),
            "outage_mode": self.outage_mode,
            "rto_ms": self.effective_rto_ms,
        }


def _check_range(name: str, value: float, lo: float, hi: float, unit: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} {value:g} {unit} out of range [{lo:g}, {hi:g}]")
