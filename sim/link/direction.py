"""One direction of the link: a bounded FIFO shared by all connections, drained by one task.

Senders wait (TCP backpressure, not loss) while the bottleneck buffer is full.
The buffer is one FIFO, so a ping queues behind a bulk transfer (bufferbloat);
but while several connections want room, none may hold more than an equal
share of it. Each connection then has the same number of bytes in the FIFO, so
departures — and the rate — are shared byte-fairly whatever sizes the reads
returned, and none starves. The drainer books each chunk on the shaper, hands it to its
connection with a delivery time (departure + delay + jitter [+ one RTO]) and
keeps its bytes counted in the buffer until they have left the bottleneck.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

from sim.link.channel import impair
from sim.link.config import MSS, Direction
from sim.link.report import DirStats
from sim.link.shaper import RateShaper, TraceShaper, chunk_bytes
from sim.link.timing import Waker
from sim.link.trace import Trace


class Sink(Protocol):
    closed: bool

    def schedule(self, data: bytes | None, deliver_at: float, queued_at: float) -> None: ...


@dataclass
class Item:
    sink: Sink
    data: bytes | None  # None marks the sender's FIN
    queued_at: float = 0.0


class LinkDirection:
    def __init__(
        self,
        name: str,
        cond: Direction,
        rto_s: float,
        rng: random.Random,
        clock: Callable[[], float],
        traces: dict[str, Trace],
    ):
        self.name = name
        self.clock = clock
        self.rng = rng
        self.stats = DirStats()
        self.waker = Waker(clock)  # shared by this direction's writers: one wake-up latency estimate
        self.down_until = 0.0  # link is down (outage) until this time
        self._traces = traces
        self._queue: deque[Item] = deque()
        self._queued = 0
        self._held: dict[Sink, int] = {}  # bytes each connection has in the buffer
        self._waiters: deque[tuple[asyncio.Future, Item]] = deque()
        self._full_since: float | None = None
        self._kick = asyncio.Event()
        self.cond = cond
        self.rto_s = rto_s
        self.shaper = self._make_shaper(cond, not_before=clock())

    # -- conditions ---------------------------------------------------------

    def _make_shaper(self, cond: Direction, not_before: float) -> RateShaper | TraceShaper:
        if cond.trace:
            return TraceShaper(self._traces[cond.trace], origin=self.clock(), not_before=not_before)
        return RateShaper(cond.rate_mbit, not_before=not_before)

    @property
    def mean_rate_mbit(self) -> float:
        return self._traces[self.cond.trace].mean_mbit if self.cond.trace else self.cond.rate_mbit

    @property
    def chunk(self) -> int:
        return chunk_bytes(self.mean_rate_mbit)

    @property
    def capacity(self) -> int:
        return max(self.cond.queue_bytes, 2 * self.chunk)

    def apply(self, cond: Direction, rto_s: float) -> None:
        """Change conditions live; bytes already booked keep their departure time."""
        if cond.trace != self.cond.trace or cond.rate_mbit != self.cond.rate_mbit:
            self.shaper = self._make_shaper(cond, not_before=self.shaper.free_at)
        self.cond = cond
        self.rto_s = rto_s
        self._admit()  # a bigger buffer may let waiting senders in
        self._kick.set()

    def set_down_until(self, t: float) -> None:
        self.down_until = t
        self._kick.set()

    def pipe_limit(self) -> int:
        """Bytes one connection may have between its read and the receiver's socket:
        the buffer plus what is in flight on the wire, so a receiver that stops
        reading stops its sender instead of growing our memory."""
        c = self.cond
        # with loss the stream is often held behind a retransmission: allow two RTOs
        # in flight so the memory bound never throttles a reading receiver
        wire_s = (c.delay_ms + 3 * c.jitter_ms) / 1000 + (2 * self.rto_s if c.loss > 0 else 0.0)
        return self.capacity + int(self.mean_rate_mbit * 1e6 / 8 * wire_s) + 2 * self.chunk

    # -- admission ------------------------------------------------------------

    @staticmethod
    def _size(item: Item) -> int:
        return len(item.data) if item.data else 0

    def _share(self) -> int:
        """Most bytes one connection may hold while others want room too."""
        active = len(self._held.keys() | {it.sink for _, it in self._waiters})
        return max(self.chunk, self.capacity // max(1, active))

    def _fits(self, item: Item, share: int) -> bool:
        n = self._size(item)
        if self._queued == 0:
            return True  # an empty buffer takes anything, even a chunk larger than itself
        if self._queued + n > self.capacity:
            return False
        mine = self._held.get(item.sink, 0)
        return mine == 0 or mine + n <= share

    async def put(self, item: Item) -> None:
        if not self._waiters and self._fits(item, self._share()):
            self._enqueue(item)
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, item))
        self._admit()  # the line may hold connections at their share; this one may fit now
        if fut.done():
            return
        self.stats.queue_full_events += 1
        if self._full_since is None:
            self._full_since = self.clock()
        try:
            await fut
        finally:
            if not fut.done():  # cancelled while waiting: leave the line
                self._waiters = deque(w for w in self._waiters if w[0] is not fut)
                self._update_full()

    def _enqueue(self, item: Item) -> None:
        item.queued_at = self.clock()
        self._queue.append(item)
        n = self._size(item)
        if n:
            self._queued += n
            self._held[item.sink] = self._held.get(item.sink, 0) + n
        self._kick.set()

    def _admit(self) -> None:
        """Let in, in arrival order, every waiting sender that fits."""
        if not self._waiters:
            return
        share = self._share()
        kept: deque[tuple[asyncio.Future, Item]] = deque()
        for fut, item in self._waiters:
            if fut.done():
                continue
            if self._fits(item, share):
                self._enqueue(item)
                fut.set_result(None)
            else:
                kept.append((fut, item))
        self._waiters = kept
        self._update_full()

    def _update_full(self) -> None:
        if not self._waiters and self._full_since is not None:
            self.stats.queue_full_s += self.clock() - self._full_since
            self._full_since = None

    def fold_full_time(self) -> None:
        """Count a still-open 'buffer full' period up to now (for reports)."""
        if self._full_since is not None:
            now = self.clock()
            self.stats.queue_full_s += now - self._full_since
            self._full_since = now

    def _release(self, sink: Sink, n: int) -> None:
        self._queued -= n
        left = self._held.get(sink, 0) - n
        if left > 0:
            self._held[sink] = left
        else:
            self._held.pop(sink, None)
        self._admit()

    # -- the drainer ----------------------------------------------------------

    async def run(self) -> None:
        while True:
            if not self._queue:
                self._kick.clear()
                await self._kick.wait()
                continue
            now = self.clock()
            if now < self.down_until:
                self._kick.clear()
                try:
                    await asyncio.wait_for(self._kick.wait(), self.down_until - now)
                except asyncio.TimeoutError:
                    pass
                if self.clock() >= self.down_until:
                    # no credit for the time the link was down
                    self.shaper.hold_until(self.clock())
                continue
            item = self._queue[0]
            if item.sink.closed:
                self._queue.popleft()
                self._release(item.sink, self._size(item))
                continue
            if item.data is None:
                self._queue.popleft()
                item.sink.schedule(None, now + self.cond.delay_ms / 1000, item.queued_at)
                continue
            # Conditions may have changed since the chunk was read: leave at most
            # ~5 ms of current link time per booking so a slowed link trickles.
            piece = item.data
            if len(piece) > self.chunk:
                piece, item.data = piece[: self.chunk], piece[self.chunk :]
            else:
                self._queue.popleft()
            n = len(piece)
            imp = impair(self.cond, n, self.rto_s, self.rng)
            depart = self.shaper.reserve(n + imp.lost_segments * MSS, item.queued_at, now)
            if imp.lost_segments:
                self.stats.lost_segments += imp.lost_segments
                self.stats.retransmitted_bytes += imp.lost_segments * MSS
            item.sink.schedule(piece, depart + imp.delay_s + imp.rto_s, item.queued_at)
            if depart > now:
                await asyncio.sleep(depart - now)
            self._release(item.sink, n)
