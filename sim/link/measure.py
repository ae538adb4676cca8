"""Measuring a link from the outside: an upstream test server, delivered rate, RTT.

Used by the tests and by `tandem-bench link`. The upstream server speaks a
one-byte preamble: b"S" sink (count what arrives), b"D" source (send until the
client closes), b"E" echo. Rates are measured at the receiver, over a window
that starts after a warm-up, from receive timestamps: bytes in (t_a, t_b] /
(t_b − t_a).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.address import split_host_port

_BLOCK = 64 * 1024
_ROOT = Path(__file__).resolve().parents[2]
READY = "link-sim listening on "


_SOCKBUF = 4 * 1024 * 1024


def tune_socket(writer: asyncio.StreamWriter) -> None:
    """No Nagle, and deep socket buffers: on a shared, loaded machine this process
    can be descheduled for tens of ms; the kernel buffers must carry the link
    through that, or we would measure our own stalls instead of link-sim."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKBUF)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKBUF)


@dataclass
class Arrivals:
    """Receive timestamps and cumulative byte counts of one stream."""

    times: list[float] = field(default_factory=list)
    totals: list[int] = field(default_factory=list)
    total: int = 0

    def add(self, t: float, n: int) -> None:
        self.total += n
        self.times.append(t)
        self.totals.append(self.total)

    def rate_mbit(self, start: float, end: float | None = None) -> float:
        """Delivered rate between the first arrival at/after `start` and the last one before `end`."""
        idx = [i for i, t in enumerate(self.times) if t >= start and (end is None or t <= end)]
        if len(idx) < 2:
            raise ValueError("too few arrivals in the measurement window")
        a, b = idx[0], idx[-1]
        return (self.totals[b] - self.totals[a]) * 8 / (self.times[b] - self.times[a]) / 1e6


class Upstream:
    """Sink / source / echo server standing in for the cloud side."""

    def __init__(self) -> None:
        self.sinks: list[Arrivals] = []
        self.received: list[bytes] = []  # full payload of each sink connection (only when keep=True)
        self.keep = False
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port, limit=4 * 1024 * 1024, backlog=1024)
        return self._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tune_socket(writer)
        loop = asyncio.get_running_loop()
        try:
            mode = await reader.readexactly(1)
            if mode == b"S":
                arr = Arrivals()
                self.sinks.append(arr)
                parts = []
                while data := await reader.read(1 << 20):
                    arr.add(loop.time(), len(data))
                    if self.keep:
                        parts.append(data)
                self.received.append(b"".join(parts))
            elif mode == b"D":
                block = os.urandom(_BLOCK)
                while True:
                    writer.write(block)
                    await writer.drain()
            elif mode == b"E":
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                writer.write_eof()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # loop shutting down; re-raising makes asyncio's stream callback log a spurious error
        finally:
            writer.close()


async def _send_until(writer: asyncio.StreamWriter, deadline) -> None:
    """Keep the link saturated until deadline() (re-read as it may move) has passed."""
    loop = asyncio.get_running_loop()
    block = os.urandom(_BLOCK)
    while loop.time() < deadline():
        writer.write(block)
        # On a slow link a full kernel send buffer reports writable only after a
        # third of it has drained — minutes at 64 kbit/s — so re-check the deadline.
        try:
            await asyncio.wait_for(writer.drain(), max(0.0, min(1.0, deadline() - loop.time())))
        except asyncio.TimeoutError:
            pass


async def measure_rate(
    proxy: tuple[str, int], upstream: Upstream, direction: str, seconds: float, warmup: float, limit_s: float = 120.0
) -> float:
    """Saturate one direction through the proxy; return delivered Mbit/s over `seconds`,
    counted from `warmup` after the first byte arrived (bytes of earlier connections
    may still be ahead of ours in the bottleneck queue, as in a real network)."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(*proxy, limit=4 * 1024 * 1024)
    tune_socket(writer)
    give_up = loop.time() + limit_s
    try:
        if direction == "up":
            n_before = len(upstream.sinks)
            writer.write(b"S")

            def deadline() -> float:
                if len(upstream.sinks) > n_before and upstream.sinks[n_before].times:
                    return upstream.sinks[n_before].times[0] + warmup + seconds
                return give_up

            await _send_until(writer, deadline)
            arr = upstream.sinks[n_before]
        else:
            writer.write(b"D")
            arr = Arrivals()
            while loop.time() < (arr.times[0] + warmup + seconds if arr.times else give_up):
                data = await reader.read(1 << 20)
                if not data:
                    break
                arr.add(loop.time(), len(data))
        if not arr.times:
            raise TimeoutError(f"nothing arrived within {limit_s:g} s")
        first = arr.times[0]
        return arr.rate_mbit(first + warmup, first + warmup + seconds)
    finally:
        writer.transport.abort()


async def measure_rtt(proxy: tuple[str, int], count: int, gap_s: float = 0.01, size: int = 1) -> list[float]:
    """Ping-pong `size`-byte messages through an echo connection; one RTT per ping, seconds."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(*proxy)
    tune_socket(writer)
    payload = b"p" * size
    try:
        writer.write(b"E" + payload)  # the first exchange also pays the handshake; discard it
        await reader.readexactly(size)
        rtts = []
        for _ in range(count):
            await asyncio.sleep(gap_s)
            t = loop.time()
            writer.write(payload)
            await reader.readexactly(size)
            rtts.append(loop.time() - t)
        return rtts
    finally:
        writer.transport.abort()


async def compare_rtt(proxy: tuple[str, int], bare: tuple[str, int], rounds: int = 3, pings: int = 10) -> tuple[float, float]:
    """Median RTT through the proxy and straight to the echo server, measured in
    alternating rounds so a burst of load on a shared machine hits both alike."""
    via, base = [], []
    for _ in range(rounds):
        base += await measure_rtt(bare, pings, gap_s=0.005)
        via += await measure_rtt(proxy, pings, gap_s=0.005)
    return median(via), median(base)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


class LinkSimProcess:
    """`link-sim` as its own process, the way other scripts run it."""

    def __init__(self, upstream: tuple[str, int], *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sim.link.cli", "--listen", "127.0.0.1:0", "--upstream", f"{upstream[0]}:{upstream[1]}", *args],
            cwd=_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith(READY):
            self.proc.kill()
            raise RuntimeError(f"link-sim did not start: {self.proc.stderr.read().strip()}")
        self.addr = split_host_port(line[len(READY):].strip())

    def stop(self) -> dict:
        """SIGTERM; returns the final JSON report."""
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=15)
        if self.proc.returncode != 0:
            raise RuntimeError(f"link-sim exited {self.proc.returncode}: {err.strip()}")
        return json.loads(out.strip().splitlines()[-1])
