"""The edge's MQTT telemetry: `tandem/edge/<id>/telemetry`, every `--telemetry-interval`.

Payload (JSON, not retained; rates are over the time since the last message):

    {"id": "edge", "ts": 1764403200.5, "interval_s": 5.0,
     "tokens_per_s": 31.4, "tokens_total": 1532, "completions_total": 12,
     "acceptance_rate": 0.77, "mode": "picospec", "last_mode": "picospec", "fallback": null,
     "verifier_reachable": true, "link_rtt_ms": 51.2,
     "queue": {"waiting": 0, "running": 1, "capacity": 9},
     "cache_hit_rate": null, "emulated": false}

acceptance_rate, fallback and cache_hit_rate are those of the latest completion
(acceptance per drafted position; null when none drafted; cache_hit_rate only
with the MoE drafter); link_rtt_ms is the planner's measured round trip.
Publishing is best-effort on its own thread (common/mqtt_publisher.py): the
snapshot is pulled from counters, so a broker that is gone or hangs can never
stall generation; the publisher reconnects by itself.
"""
from __future__ import annotations

import time
from typing import Callable

from common.address import mqtt_address
from common.mqtt_publisher import PeriodicPublisher

FIELDS = ("id", "ts", "interval_s", "tokens_per_s", "tokens_total", "completions_total", "acceptance_rate", "mode",
          "last_mode", "fallback", "verifier_reachable", "link_rtt_ms", "queue", "cache_hit_rate", "emulated")


def telemetry_topic(edge_id: str) -> str:
    return f"tandem/edge/{edge_id}/telemetry"


class TelemetrySnapshot:
    """Called by the publisher thread: the payload above from the daemon's live
    state (`live()` returns an object with the LiveState fields)."""

    def __init__(self, edge_id: str, live: Callable[[], object], queue_capacity: int):
        self.edge_id, self.live, self.queue_capacity = edge_id, live, queue_capacity
        self._t, self._tokens = time.monotonic(), 0

    def __call__(self) -> dict:
        s = self.live()
        now = time.monotonic()
        dt, self._t = now - self._t, now
        rate = (s.tokens_total - self._tokens) / dt if dt > 0 else 0.0
        self._tokens = s.tokens_total
        return {"id": self.edge_id, "ts": round(time.time(), 3), "interval_s": round(dt, 3),
                "tokens_per_s": round(rate, 3), "tokens_total": s.tokens_total,
                "completions_total": s.completions_total,
                "acceptance_rate": None if s.acceptance_rate is None else round(s.acceptance_rate, 4),
                "mode": s.mode, "last_mode": s.last_mode, "fallback": s.fallback,
                "verifier_reachable": s.verifier_reachable,
                "link_rtt_ms": None if s.link_rtt_s is None else round(s.link_rtt_s * 1e3, 2),
                "queue": {"waiting": s.waiting, "running": s.running, "capacity": self.queue_capacity},
                "cache_hit_rate": None if s.cache_hit_rate is None else round(s.cache_hit_rate, 4),
                "emulated": s.emulated}


def start_telemetry(mqtt: str, edge_id: str, live: Callable[[], object], queue_capacity: int,
                    interval_s: float) -> PeriodicPublisher:
    host, port = mqtt_address(mqtt)
    return PeriodicPublisher(host, port, telemetry_topic(edge_id), TelemetrySnapshot(edge_id, live, queue_capacity),
                             interval_s, client_id=f"tandem-edge-{edge_id}", name="edge-telemetry").start()
