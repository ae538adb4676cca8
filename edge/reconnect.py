"""When to try the verifier again: exponential backoff with jitter, and a probe
that runs in the background so edge-only generation never stalls on it.

Jitter matters when many edges lose the same verifier at once (a restart, a
failover behind a balancer): without it they all come back in the same
instant. Each delay is drawn from [ (1 - jitter) * d, d ] with d doubling
from `base_s` up to `max_s` ("equal jitter").
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Backoff:
    base_s: float = 0.25
    max_s: float = 8.0
    factor: float = 2.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def __post_init__(self):
        if not 0 < self.base_s <= self.max_s:
            raise ValueError("backoff needs 0 < base_s <= max_s")
        if self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("backoff needs factor >= 1 and jitter in [0, 1]")

    def next_delay(self, at_least_s: float = 0.0) -> float:
        """The wait before the next attempt; `at_least_s` is a floor the server
        asked for (retry-after), jittered upwards so clients do not align on it."""
        d = min(self.max_s, self.base_s * self.factor ** self.attempts)
        self.attempts += 1
        d = max(d, at_least_s)
        return d * (1 - self.jitter * self.rng.random()) if at_least_s <= 0 else d * (1 + self.jitter * self.rng.random())

    def reset(self) -> None:
        self.attempts = 0

    def fresh(self) -> "Backoff":
        """The same policy from its first step (one per completion)."""
        return Backoff(self.base_s, self.max_s, self.factor, self.jitter, self.rng)


class Reconnector:
    """Probes the verifier in the background with backoff after it was lost;
    `ready()` is cheap and never blocks, so the edge can ask between tokens."""

    def __init__(self, probe: Callable[[], bool], backoff: Backoff, clock: Callable[[], float] = time.monotonic):
        self.probe, self.backoff, self.clock = probe, backoff, clock
        self._lock = threading.Lock()
        self._due = 0.0
        self._ok = False
        self._running: threading.Thread | None = None
        self.probes = 0

    def lost(self) -> None:
        """The verifier just failed: the first probe waits one backoff step."""
        with self._lock:
            self._ok = False
            self._due = self.clock() + self.backoff.next_delay()

    def ready(self) -> bool:
        """True once a probe has succeeded since the last `lost()`; starts a probe
        when one is due and none is running."""
        with self._lock:
            if self._ok:
                return True
            if self._running is None and self.clock() >= self._due:
                self._running = threading.Thread(target=self._probe, daemon=True)
                self._running.start()
            return False

    def wait(self, timeout_s: float) -> bool:
        """Blocks until ready or `timeout_s` has passed (for callers with nothing else to do)."""
        deadline = self.clock() + timeout_s
        while not self.ready():
            if self.clock() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def _probe(self) -> None:
        try:
            ok = bool(self.probe())
        except Exception:          # a probe that fails in any way means "not yet"
            ok = False
        with self._lock:
            self.probes += 1
            self._ok = ok
            if ok:
                self.backoff.reset()
            else:
                self._due = self.clock() + self.backoff.next_delay()
            self._running = None
