"""The shaping TCP proxy: connections, byte pumps, live conditions and outages.

Every connection has two pipes (up: client→upstream, down: upstream→client).
A pipe's pump reads from its source into the shared direction FIFO; the
direction's drainer paces it and schedules each chunk for delivery; the pipe's
writer writes chunks to the destination in order at their delivery time. Bytes
are never dropped or reordered: a connection ends only by FIN on both sides, by
a socket error on either side (propagated as a reset), or by an outage in reset
mode.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import sys
from collections import deque
from typing import Callable

from sim.link.config import LinkConfig
from sim.link.direction import Item, LinkDirection
from sim.link.report import Reporter
from sim.link.shaper import TraceShaper
from sim.link.trace import Trace, load_trace

_READER_LIMIT = 4 * 1024 * 1024


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST, like a peer whose connection state vanished."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


class Pipe:
    def __init__(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: LinkDirection):
        self.src = src
        self.dst = dst
        self.link = link
        self.closed = False
        self._deliveries: deque[tuple[float, bytes | None, float]] = deque()
        self._last_deliver = 0.0
        self._outstanding = 0  # read but not yet written and drained
        self._has_delivery = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def schedule(self, data: bytes | None, deliver_at: float, queued_at: float) -> None:
        # TCP delivers in order: a chunk never overtakes the one before it.
        deliver_at = max(deliver_at, self._last_deliver)
        self._last_deliver = deliver_at
        self._deliveries.append((deliver_at, data, queued_at))
        self._has_delivery.set()

    async def pump(self) -> None:
        while True:
            while self._outstanding > self.link.pipe_limit():
                self._room.clear()
                await self._room.wait()
            data = await self.src.read(self.link.chunk)
            if not data:
                await self.link.put(Item(self, None))
                return
            self.link.stats.bytes_in += len(data)
            self._outstanding += len(data)
            await self.link.put(Item(self, data))

    async def write_loop(self) -> None:
        clock = self.link.clock
        waker = self.link.waker
        while True:
            while not self._deliveries:
                self._has_delivery.clear()
                await self._has_delivery.wait()
            due = max(self._deliveries[0][0], self.link.down_until)
            if not waker.due(due):
                await waker.sleep_until(due)
                continue  # an outage may have begun meanwhile
            # everything already due goes out in one write
            now = clock()
            parts: list[bytes] = []
            eof = False
            while self._deliveries and waker.due(self._deliveries[0][0]):
                _, data, queued_at = self._deliveries.popleft()
                if data is None:
                    eof = True
                    break
                parts.append(data)
                self.link.stats.delivered(len(data), now - queued_at)
            if parts:
                blob = b"".join(parts)
                self.dst.write(blob)
                await self.dst.drain()
                self._outstanding -= len(blob)
                self._room.set()
            if eof:
                if self.dst.can_write_eof():
                    self.dst.write_eof()
                return


class Connection:
    def __init__(self, sim: "LinkSim", reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.sim = sim
        self.client_r, self.client_w = reader, writer
        self.up_w: asyncio.StreamWriter | None = None
        self.pipes: list[Pipe] = []
        self.tasks: list[asyncio.Task] = []
        self.aborted = False

    async def run(self) -> None:
        sim = self.sim
        # The upstream handshake crosses the link: wait out an outage, then one RTT.
        while sim.clock() < sim.down_until:
            await asyncio.sleep(sim.down_until - sim.clock())
        await asyncio.sleep(sim.config.rtt_ms / 1000)
        if self.aborted:
            return
        try:
            up_r, self.up_w = await asyncio.open_connection(*sim.upstream, limit=_READER_LIMIT)
        except OSError as e:
            print(f"link-sim: upstream {sim.upstream[0]}:{sim.upstream[1]} unreachable: {e}", file=sys.stderr)
            _reset(self.client_w)
            return
        for w in (self.client_w, self.up_w):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = Pipe(self.client_r, self.up_w, sim.up)
        down = Pipe(up_r, self.client_w, sim.down)
        self.pipes = [up, down]
        self.tasks = [asyncio.create_task(c) for p in self.pipes for c in (p.pump(), p.write_loop())]
        done, pending = await asyncio.wait(self.tasks, return_when=asyncio.FIRST_EXCEPTION)
        if pending or any(t.exception() for t in done if not t.cancelled()):
            self.abort()
        else:
            for w in (self.client_w, self.up_w):
                w.close()

    def abort(self, reset: bool = True) -> None:
        """End both sides now, with RST (an error or outage) or FIN (link-sim shutting down);
        bytes still inside the link are discarded."""
        self.aborted = True
        for p in self.pipes:
            p.closed = True
        for t in self.tasks:
            t.cancel()
        for w in (self.client_w, self.up_w):
            if reset:
                _reset(w)
            elif w is not None:
                w.close()


class LinkSim:
    def __init__(self, config: LinkConfig, upstream: tuple[str, int], clock: Callable[[], float] | None = None):
        loop = asyncio.get_running_loop()
        self.clock = clock or loop.time
        self.upstream = upstream
        self.traces: dict[str, Trace] = {}
        self._load_traces(config)
        self.config = config
        rto = config.effective_rto_ms / 1000
        self.up = LinkDirection("up", config.up, rto, random.Random(config.seed * 2 + 1), self.clock, self.traces)
        self.down = LinkDirection("down", config.down, rto, random.Random(config.seed * 2 + 2), self.clock, self.traces)
        self.started = self.clock()
        self.reporter = Reporter(self.started)
        self.connections: set[Connection] = set()
        self.total_connections = 0
        self.reset_connections = 0
        self.down_until = 0.0
        self._outage_s = 0.0  # completed outage time
        self._outage_start: float | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks = [asyncio.create_task(d.run()) for d in (self.up, self.down)]

    def _load_traces(self, config: LinkConfig) -> None:
        for d in (config.up, config.down):
            if d.trace and d.trace not in self.traces:
                self.traces[d.trace] = load_trace(d.trace)

    # -- lifecycle ----------------------------------------------------------

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._accept, host, port, limit=_READER_LIMIT, backlog=1024)
        return self._server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            c.abort(reset=False)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.clock() < self.down_until and self.config.outage_mode == "reset":
            self.reset_connections += 1
            _reset(writer)
            return
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        self.total_connections += 1
        try:
            await conn.run()
        except asyncio.CancelledError:
            conn.abort()
        finally:
            self.connections.discard(conn)

    # -- live control -------------------------------------------------------

    def apply(self, config: LinkConfig) -> None:
        self._load_traces(config)
        self.config = config
        rto = config.effective_rto_ms / 1000
        self.up.apply(config.up, rto)
        self.down.apply(config.down, rto)

    def outage(self, seconds: float, mode: str | None = None) -> None:
        """Take the link down for `seconds` from now."""
        now = self.clock()
        mode = mode or self.config.outage_mode
        if mode != self.config.outage_mode:
            self.config = self.config.replace(outage_mode=mode)
        self._close_outage(now)
        self._outage_start = now
        self.down_until = now + seconds
        for d in (self.up, self.down):
            d.set_down_until(self.down_until)
        if mode == "reset":
            for c in list(self.connections):
                self.reset_connections += 1
                c.abort()

    def restore(self) -> None:
        """End an outage now."""
        now = self.clock()
        self._close_outage(now)
        self.down_until = min(self.down_until, now)
        for d in (self.up, self.down):
            d.set_down_until(self.down_until)

    def _close_outage(self, now: float) -> None:
        if self._outage_start is not None:
            self._outage_s += max(0.0, min(now, self.down_until) - self._outage_start)
            self._outage_start = None

    def outage_seconds(self, now: float) -> float:
        live = max(0.0, min(now, self.down_until) - self._outage_start) if self._outage_start is not None else 0.0
        return self._outage_s + live

    # -- reports ----------------------------------------------------------

    def _stats(self) -> dict:
        out = self.outage_seconds(self.clock())
        for d in (self.up, self.down):
            d.stats.outage_s = out
            d.fold_full_time()
        return {"up": self.up.stats, "down": self.down.stats}

    def _extra(self) -> dict:
        return {
            "connections": {
                "active": len(self.connections),
                "total": self.total_connections,
                "reset_by_outage": self.reset_connections,
            },
            "link_down": self.clock() < self.down_until,
            # lets an observer on this machine (same monotonic clock) line up its
            # measurements with a trace's delivery opportunities
            "trace_origin_monotonic": {
                d.name: d.shaper.origin for d in (self.up, self.down) if isinstance(d.shaper, TraceShaper)
            },
            "conditions": self.config.to_json(),
        }

    def interval_report(self) -> dict:
        return self.reporter.interval(self.clock(), self._stats(), self._extra())

    def final_report(self) -> dict:
        return self.reporter.final(self.clock(), self._stats(), self._extra())
