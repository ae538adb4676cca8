"""The verifier's retained MQTT status: `tandem/cloud/<id>/status`.

Payload (JSON), every `interval_s` and retained, so a subscriber that comes
later (an edge choosing a replica, a balancer, a dashboard) sees the latest:

    {"id": "v1", "state": "online", "ts": 1764403200.1, "target": "SmolLM2-135M-Instruct.Q4_1",
     "emulated": false, "sessions": 1, "max_sessions": 8, "queue": 0, "load": 0.125}

`get_status()` (the servicer's `status()`) supplies everything after "ts". A
last will `{"id", "state": "offline", "reason": "connection lost"}` (retained)
replaces it when the verifier dies without saying goodbye (SIGKILL, a lost
host); a clean stop publishes `"reason": "stopped"` itself.
"""
from __future__ import annotations

import time
from typing import Callable

from common.address import mqtt_address
from common.mqtt_publisher import PeriodicPublisher


def status_topic(verifier_id: str) -> str:
    return f"tandem/cloud/{verifier_id}/status"


def start_status_publisher(mqtt: str, verifier_id: str, get_status: Callable[[], dict],
                           interval_s: float = 2.0) -> PeriodicPublisher:
    host, port = mqtt_address(mqtt)

    def snapshot() -> dict:
        s = dict(get_status())
        # derived here, so any servicer's status() with sessions, max_sessions and target will do
        if "load" not in s and s.get("max_sessions"):
            s["load"] = round(s["sessions"] / s["max_sessions"], 3)
        s.setdefault("emulated", str(s.get("target", "")).startswith("emulated:"))
        return {"id": verifier_id, "state": "online", "ts": round(time.time(), 3), **s}

    return PeriodicPublisher(host, port, status_topic(verifier_id), snapshot, interval_s, retain=True, qos=1,
                             will={"id": verifier_id, "state": "offline", "reason": "connection lost"},
                             final={"id": verifier_id, "state": "offline", "reason": "stopped"},
                             client_id=f"tandem-cloud-{verifier_id}", name="cloud-status").start()
