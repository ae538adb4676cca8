"""One background I/O thread in front of the expert store.

Demand reads (the current layer is waiting) jump ahead of queued prefetches
(look-ahead guesses for the next layer); a prefetch whose layer has already
been computed is dropped unread. A read already in flight is shared rather
than issued twice.

With `batch` (DyMoE), the thread takes every queued read of the same layer
and precision together and issues each run of experts adjacent on flash
as one request (`ExpertStore.read_run`): a prompt needs all 8 experts of most
layers, and at 1.5 ms per request on an SD card separate reads of the ~3.6
missing ones per layer cost 0.16 s of a 0.7 s prompt. Callers submit a
layer's reads in one `submit_many` so the thread sees them together.
"""
from __future__ import annotations

import heapq
import itertools
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from edge.moe.store import ExpertStore, ExpertWeights

DEMAND, PREFETCH = 0, 1


@dataclass(order=True)
class _Read:
    kind: int
    seq: int
    step: int = field(compare=False)
    layer: int = field(compare=False)
    e: int = field(compare=False)
    bits: int = field(compare=False)
    fut: Future | None = field(compare=False)


class IOQueue:
    def __init__(self, store: ExpertStore,
                 on_read: Callable[[tuple[int, int], ExpertWeights, bool, float], None],
                 batch: bool = False):
        self.store, self.on_read, self.batch = store, on_read, batch
        self._heap: list[_Read] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self.inflight: dict[tuple[int, int], tuple[int, Future]] = {}
        self.horizon = (0, -1)      # (step, layer) the compute has reached
        self.dropped = 0
        self.requests = 0           # storage requests issued (a run counts once)
        self._thread = threading.Thread(target=self._run, name="expert-io", daemon=True)
        self._thread.start()

    def submit(self, layer: int, e: int, bits: int, kind: int, step: int) -> Future:
        return self.submit_many(layer, [(e, bits)], kind, step)[0]

    def submit_many(self, layer: int, reads: list[tuple[int, int]], kind: int,
                    step: int) -> list[Future]:
        """Queue (expert, bits) reads of one layer at once; one future each."""
        futs, new = [], []
        with self._lock:
            for e, bits in reads:
                cur = self.inflight.get((layer, e))
                if cur is not None and cur[0] >= bits:
                    futs.append(cur[1])
                    continue
                fut: Future = Future()
                self.inflight[layer, e] = (bits, fut)
                futs.append(fut)
                new.append(_Read(kind, next(self._seq), step, layer, e, bits, fut))
        if new:
            with self._cv:
                for r in new:
                    heapq.heappush(self._heap, r)
                self._cv.notify()
        return futs

    def pending(self, key) -> tuple[int, Future] | None:
        with self._lock:
            return self.inflight.get(key)

    def _take(self) -> list[_Read] | None:
        """The most urgent read, plus (batching) every queued read of the
        same layer and precision."""
        with self._cv:
            while not self._heap:
                self._cv.wait()
            head = heapq.heappop(self._heap)
            if head.fut is None:
                return None
            batch = [head]
            if self.batch:
                rest = []
                for r in self._heap:
                    same = r.fut is not None and (r.layer, r.bits) == (head.layer, head.bits)
                    (batch if same else rest).append(r)
                heapq.heapify(rest)
                self._heap = rest
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            live = []
            for r in batch:
                if r.kind == PREFETCH and (r.step, r.layer) < self.horizon:
                    self._finish((r.layer, r.e), r.fut, None)
                    self.dropped += 1
                else:
                    live.append(r)
            slot = lambda r: self.store.slot(r.layer, r.e)
            live.sort(key=slot)
            runs: list[list[_Read]] = []
            for r in live:
                if runs and slot(r) == slot(runs[-1][-1]) + 1:
                    runs[-1].append(r)
                else:
                    runs.append([r])
            for run in runs:
                self._read(run)

    def _read(self, run: list[_Read]) -> None:
        self.requests += 1
        done = 0
        stream = self.store.read_run(run[0].layer, [r.e for r in run], run[0].bits)
        try:
            for r, (w, busy) in zip(run, stream):
                self.on_read((r.layer, r.e), w, r.kind == PREFETCH, busy)
                self._finish((r.layer, r.e), r.fut, w)
                done += 1
        except BaseException as exc:  # surface in the waiting threads
            for r in run[done:]:
                self._finish((r.layer, r.e), r.fut, None, exc)
        finally:
            stream.close()

    def _finish(self, key, fut: Future, w, exc=None) -> None:
        with self._lock:
            if self.inflight.get(key, (0, None))[1] is fut:
                del self.inflight[key]
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(w)

    def close(self) -> None:
        with self._cv:
            heapq.heappush(self._heap, _Read(-1, -1, 0, 0, 0, 0, None))
            self._cv.notify()
        self._thread.join(timeout=5)
