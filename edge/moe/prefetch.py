"""One background I/O thread in front of the expert store.

Demand reads (the current layer is waiting) jump ahead of queued prefetches
(look-ahead guesses for the next layer); a prefetch whose layer has already
been computed is dropped unread. A read already in flight is shared rather
than issued twice.
"""
from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import Future
from typing import Callable

from edge.moe.store import ExpertStore, ExpertWeights

DEMAND, PREFETCH = 0, 1


class IOQueue:
    def __init__(self, store: ExpertStore,
                 on_read: Callable[[tuple[int, int], ExpertWeights, bool, float], None]):
        self.store, self.on_read = store, on_read
        self._q: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self.inflight: dict[tuple[int, int], tuple[int, Future]] = {}
        self.horizon = (0, -1)      # (step, layer) the compute has reached
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="expert-io", daemon=True)
        self._thread.start()

    def submit(self, layer: int, e: int, bits: int, kind: int, step: int) -> Future:
        key = (layer, e)
        with self._lock:
            cur = self.inflight.get(key)
            if cur is not None and cur[0] >= bits:
                return cur[1]
            fut: Future = Future()
            self.inflight[key] = (bits, fut)
        self._q.put((kind, next(self._seq), step, layer, e, bits, fut))
        return fut

    def pending(self, key) -> tuple[int, Future] | None:
        with self._lock:
            return self.inflight.get(key)

    def _run(self) -> None:
        while True:
            kind, _, step, layer, e, bits, fut = self._q.get()
            if fut is None:
                return
            if kind == PREFETCH and (step, layer) < self.horizon:
                self._finish((layer, e), fut, None)
                self.dropped += 1
                continue
            try:
                w, busy = self.store.read(layer, e, bits)
                self.on_read((layer, e), w, kind == PREFETCH, busy)
            except BaseException as exc:  # surface in the waiting thread
                self._finish((layer, e), fut, None, exc)
                continue
            self._finish((layer, e), fut, w)

    def _finish(self, key, fut: Future, w, exc=None) -> None:
        with self._lock:
            if self.inflight.get(key, (0, None))[1] is fut:
                del self.inflight[key]
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(w)

    def close(self) -> None:
        self._q.put((-1, -1, 0, 0, 0, 0, None))
        self._thread.join(timeout=5)
