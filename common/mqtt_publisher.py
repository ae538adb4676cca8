"""A best-effort periodic MQTT publisher on a thread of its own (aiomqtt).

Every `interval_s` it asks `snapshot()` for a dict and publishes it as JSON.
It owns its event loop and thread, so the daemon that uses it never waits on
the broker: a broker that is slow, gone or hanging only costs this thread
time. The snapshot is *pulled* from the daemon's counters, never pushed by the
code that generates or verifies, so there is no queue that could fill up and
no call on the hot path that could block. A lost broker is retried every
`retry_s`; what happened is counted (`published`, `failures`, `connected`).

Optional: a retained topic and a last will (the broker publishes the will
when the connection dies without a clean disconnect, e.g. on SIGKILL); a
clean `stop()` publishes `final` itself, since a clean disconnect suppresses
the will. Nothing here imports code of ours: edge, cloud and sim use it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("tandem.mqtt")


class PeriodicPublisher:
    def __init__(self, host: str, port: int, topic: str, snapshot: Callable[[], dict], interval_s: float,
                 retain: bool = False, qos: int = 0, will: dict | None = None, final: dict | None = None,
                 client_id: str | None = None, retry_s: float = 2.0, name: str = "mqtt"):
        if interval_s <= 0:
            raise ValueError("the publishing interval must be > 0 s")
        self.host, self.port, self.topic = host, port, topic
        self.snapshot, self.interval_s, self.retain, self.qos = snapshot, interval_s, retain, qos
        self.will, self.final, self.client_id, self.retry_s, self.name = will, final, client_id, retry_s, name
        self.published = 0
        self.failures = 0            # connections lost or refused, and publishes that failed
        self.snapshot_errors = 0
        self.connected = False
        self.last_error = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"{name}-publisher", daemon=True)

    def start(self) -> "PeriodicPublisher":
        self._thread.start()
        self._ready.wait(5)
        return self

    def stop(self, timeout_s: float = 3.0) -> None:
        """Publish `final` (when connected) and disconnect cleanly; never blocks
        longer than `timeout_s`, whatever the broker does."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)

    def counters(self) -> dict:
        return {"published": self.published, "failures": self.failures, "connected": self.connected,
                "snapshot_errors": self.snapshot_errors, "last_error": self.last_error}

    # -- the publisher's own thread ------------------------------------------
    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            loop.run_until_complete(self._run())
        finally:
            loop.close()

    def _payload(self) -> str | None:
        try:
            return json.dumps(self.snapshot())
        except Exception as e:   # a bad snapshot must not end telemetry for good
            self.snapshot_errors += 1
            log.warning("%s: snapshot failed: %s", self.name, e)
            return None

    async def _sleep_or_stop(self, seconds: float) -> bool:
        """True when stop() was called during the wait."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def _run(self) -> None:
        import aiomqtt
        will = aiomqtt.Will(self.topic, json.dumps(self.will), qos=1, retain=self.retain) if self.will else None
        warned = False
        while not self._stop.is_set():
            try:
                async with aiomqtt.Client(self.host, self.port, identifier=self.client_id, will=will,
                                          timeout=5, keepalive=max(5, int(self.interval_s * 3))) as client:
                    self.connected = True
                    if warned:
                        log.warning("%s: MQTT broker %s:%d back", self.name, self.host, self.port)
                    warned = False
                    while True:
                        payload = self._payload()
                        if payload is not None:
                            await client.publish(self.topic, payload, qos=self.qos, retain=self.retain)
                            self.published += 1
                        t_next = time.monotonic() + self.interval_s
                        if await self._sleep_or_stop(max(0.0, t_next - time.monotonic())):
                            if self.final is not None:
                                await client.publish(self.topic, json.dumps(self.final), qos=1, retain=self.retain)
                            return
            except aiomqtt.MqttError as e:
                self.connected = False
                self.failures += 1
                self.last_error = str(e)
                if not warned:
                    log.warning("%s: MQTT broker %s:%d unavailable (%s); going on without it, retrying every %g s",
                                self.name, self.host, self.port, e, self.retry_s)
                    warned = True
                if await self._sleep_or_stop(self.retry_s):
                    return
            finally:
                self.connected = False
