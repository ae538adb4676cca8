"""link-sim end to end on loopback: byte-exact forwarding, half-close, fairness, accuracy, outages."""

import asyncio
import os

import pytest

from sim.link.config import Direction, LinkConfig
from sim.link.control import Controller
from sim.link.measure import Arrivals, Upstream, compare_rtt, measure_rate, measure_rtt, median
from sim.link.proxy import LinkSim
from sim.link.timing import run


def link(rate=50.0, delay=0.0, **kw) -> LinkConfig:
    top = {k: kw.pop(k) for k in ("rto_ms", "outage_mode", "seed") if k in kw}
    d = Direction(rate_mbit=rate, delay_ms=delay, **kw)
    return LinkConfig(up=d, down=d, **top)


async def started(config: LinkConfig, upstream: Upstream | None = None):
    upstream = upstream or Upstream()
    uaddr = await upstream.start()
    sim = LinkSim(config, uaddr)
    paddr = await sim.start("127.0.0.1", 0)
    return sim, paddr, upstream


async def echo_roundtrip(paddr, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*paddr)
    writer.write(b"E")

    async def send():
        for i in range(0, len(payload), 50_000):
            writer.write(payload[i : i + 50_000])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    got = await reader.read(-1)  # until the echo server's FIN comes back through the link
    await sender
    writer.close()
    return got


def test_bytes_exact_through_delay_jitter_and_loss():
    """Heavy jitter (much larger than the gap between chunks) and loss must not corrupt or reorder."""

    async def main():
        cfg = link(rate=40, delay=5, jitter_ms=8, jitter_dist="uniform", loss=0.02, rto_ms=40, seed=3)
        sim, paddr, _ = await started(cfg)
        payload = os.urandom(1_500_000)
        got = await asyncio.wait_for(echo_roundtrip(paddr, payload), 30)
        rep = sim.final_report()
        await sim.stop()
        return payload, got, rep

    payload, got, rep = run(main())
    assert got == payload
    assert rep["up"]["lost_segments"] > 0 and rep["down"]["lost_segments"] > 0  # loss really happened


def test_half_close_both_ways():
    """Each side may finish sending first; the other keeps talking until it is done."""
    upstream = Upstream()

    async def cloud(reader, writer):
        writer.write(b"hello")
        writer.write_eof()  # cloud is done sending, still listening
        data = await reader.read(-1)
        # the cloud cannot write any more; the client checks what it got via the sink below
        upstream.received.append(data)
        writer.close()

    async def main():
        server = await asyncio.start_server(cloud, "127.0.0.1", 0)
        sim = LinkSim(link(rate=20, delay=3), server.sockets[0].getsockname()[:2])
        paddr = await sim.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*paddr)
        first = await asyncio.wait_for(reader.read(-1), 5)  # "hello" then EOF, while our side is open
        body = os.urandom(300_000)
        writer.write(body)
        writer.write_eof()
        await writer.drain()
        for _ in range(200):
            if upstream.received:
                break
            await asyncio.sleep(0.02)
        writer.close()
        await sim.stop()
        server.close()
        return first, body

    first, body = run(main())
    assert first == b"hello"
    assert upstream.received == [body]


def test_many_connections_all_exact():
    async def main():
        sim, paddr, _ = await started(link(rate=100, delay=2, jitter_ms=1))
        payloads = [os.urandom(20_000 + 997 * i) for i in range(60)]
        results = await asyncio.wait_for(asyncio.gather(*(echo_roundtrip(paddr, p) for p in payloads)), 60)
        rep = sim.final_report()
        await sim.stop()
        return payloads, results, rep

    payloads, results, rep = run(main())
    assert [len(r) for r in results] == [len(p) for p in payloads]
    assert results == payloads
    assert rep["connections"]["total"] == 60


def test_concurrent_connections_share_rate_fairly():
    """Four senders saturate an 8 Mbit/s uplink: each gets its quarter, none starves."""

    async def main():
        sim, paddr, upstream = await started(link(rate=8, delay=5))
        loop = asyncio.get_running_loop()
        writers = []
        for _ in range(4):
            _, w = await asyncio.open_connection(*paddr)
            w.write(b"S")
            writers.append(w)
        block = os.urandom(32 * 1024)

        async def push(w):
            while True:
                w.write(block)
                await w.drain()

        tasks = [asyncio.create_task(push(w)) for w in writers]
        t0 = loop.time()
        await asyncio.sleep(4.0)
        for t in tasks:
            t.cancel()
        for w in writers:
            w.transport.abort()
        await sim.stop()
        return upstream.sinks, t0

    sinks, t0 = run(main())
    assert len(sinks) == 4
    # the direction as a whole: all arrivals merged
    merged = Arrivals()
    for t, n in sorted((t, b - a) for s in sinks for t, a, b in zip(s.times, [0] + s.totals, s.totals)):
        merged.add(t, n)
    assert merged.rate_mbit(t0 + 1.0, t0 + 4.0) == pytest.approx(8.0, rel=0.03)
    # each connection's share of the bytes that arrived in one common window
    got = [sum(b - a for t, a, b in zip(s.times, [0] + s.totals, s.totals) if t0 + 1.0 < t <= t0 + 4.0) for s in sinks]
    for g in got:
        assert g / sum(got) == pytest.approx(0.25, rel=0.05), got


def test_rate_and_rtt_match_configuration():
    """8 Mbit/s each way within ±3 %; RTT within ±1 ms of 2×20 ms + the bare loopback RTT."""

    async def main():
        sim, paddr, upstream = await started(link(rate=8, delay=20))
        uaddr = upstream._server.sockets[0].getsockname()[:2]
        rtt, base = await compare_rtt(paddr, uaddr, rounds=3, pings=10)
        up = await measure_rate(paddr, upstream, "up", 3.0, 0.5)
        down = await measure_rate(paddr, upstream, "down", 3.0, 0.5)
        await sim.stop()
        return base, rtt, up, down

    base, rtt, up, down = run(main())
    assert up == pytest.approx(8.0, rel=0.03)
    assert down == pytest.approx(8.0, rel=0.03)
    assert rtt == pytest.approx(0.040 + base, abs=0.001)


def test_live_change_applies_to_running_connection():
    async def main():
        sim, paddr, upstream = await started(link(rate=4, delay=2))
        ctl = Controller(sim, {})
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection(*paddr, limit=1 << 22)
        writer.write(b"D")
        arr = Arrivals()
        t0 = loop.time()
        changed = False
        while loop.time() < t0 + 5.0:
            data = await reader.read(1 << 20)
            arr.add(loop.time(), len(data))
            if not changed and loop.time() > t0 + 2.5:
                reply = ctl.execute_text("set rate-down=1")
                changed = True
        writer.transport.abort()
        await sim.stop()
        return reply, arr.rate_mbit(t0 + 0.5, t0 + 2.5), arr.rate_mbit(t0 + 3.0, t0 + 5.0)

    reply, before, after = run(main())
    assert reply["ok"] and reply["conditions"]["down"]["rate_mbit"] == 1.0
    assert before == pytest.approx(4.0, rel=0.05)
    assert after == pytest.approx(1.0, rel=0.05)


def test_outage_wait_holds_bytes_then_delivers_them_all():
    async def main():
        sim, paddr, _ = await started(link(rate=20, delay=5))
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection(*paddr)
        writer.write(b"E" + b"x" * 1000)
        await reader.readexactly(1000)
        sim.outage(1.0)  # bytes wait
        t = loop.time()
        payload = os.urandom(200_000)
        writer.write(payload)
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
        waited = loop.time() - t
        rep = sim.final_report()
        writer.close()
        await sim.stop()
        return payload, got, waited, rep

    payload, got, waited, rep = run(main())
    assert got == payload
    assert 1.0 <= waited < 1.5
    assert rep["up"]["outage_s"] == pytest.approx(1.0, abs=0.05)


def test_outage_reset_kills_live_connections_and_refuses_new_ones():
    async def main():
        sim, paddr, _ = await started(link(rate=20, delay=2, outage_mode="reset"))
        reader, writer = await asyncio.open_connection(*paddr)
        writer.write(b"Eping")
        await reader.readexactly(4)
        sim.outage(0.5)
        live = None
        try:
            live = await asyncio.wait_for(reader.read(100), 2)
        except ConnectionResetError:
            live = "reset"
        r2, w2 = await asyncio.open_connection(*paddr)
        w2.write(b"Eping")
        try:
            during = await asyncio.wait_for(r2.read(100), 2)
        except ConnectionResetError:
            during = "reset"
        await asyncio.sleep(0.6)
        r3, w3 = await asyncio.open_connection(*paddr)
        w3.write(b"Eping")
        after = await asyncio.wait_for(r3.readexactly(4), 2)
        rep = sim.final_report()
        w3.close()
        await sim.stop()
        return live, during, after, rep

    live, during, after, rep = run(main())
    assert live == "reset"
    assert during == "reset"
    assert after == b"ping"
    assert rep["connections"]["reset_by_outage"] == 2


def test_backpressure_bounds_what_the_proxy_holds():
    """A cloud that stops reading must stop the edge's sender, not grow the proxy's memory."""

    async def stalled(reader, writer):
        await asyncio.sleep(30)

    async def main():
        server = await asyncio.start_server(stalled, "127.0.0.1", 0)
        sim = LinkSim(link(rate=100, delay=5, queue_kbyte=64), server.sockets[0].getsockname()[:2])
        paddr = await sim.start("127.0.0.1", 0)
        _, writer = await asyncio.open_connection(*paddr)
        block = os.urandom(64 * 1024)

        async def flood():
            while True:
                writer.write(block)
                await writer.drain()

        task = asyncio.create_task(flood())
        await asyncio.sleep(2.0)
        task.cancel()
        held = sim.up.stats.bytes_in - sim.up.stats.bytes_out
        limit = sim.up.pipe_limit() + sim.up.chunk
        writer.transport.abort()
        await sim.stop()
        server.close()
        return held, limit

    held, limit = run(main())
    # 100 Mbit/s for 2 s would be 25 MB; the proxy may hold only its buffer + the wire
    assert 0 < held <= limit < 1_000_000


def test_interval_report_says_what_was_delivered():
    async def main():
        sim, paddr, upstream = await started(link(rate=4, delay=10))
        sim.interval_report()
        await measure_rate(paddr, upstream, "down", 2.0, 0.0)
        rep = sim.interval_report()
        await sim.stop()
        return rep

    rep = run(main())
    d = rep["down"]
    assert d["mbit_per_s"] == pytest.approx(4.0 * 2.0 / rep["interval_s"], rel=0.1)
    assert d["added_delay_ms_p50"] >= 10.0  # at least the propagation delay
    assert d["queue_full_events"] > 0  # a saturating sender fills the buffer
    assert rep["conditions"]["down"]["rate_mbit"] == 4.0


@pytest.mark.parametrize("queue_kb, expect_s", [(8, 0.02 + 0.032), (100, 0.02 + 0.4)])
def test_bottleneck_buffer_sets_delay_under_load(queue_kb, expect_s):
    """Bufferbloat: a saturating download fills the buffer; a ping on another connection waits behind it."""

    async def main():
        sim, paddr, upstream = await started(link(rate=2, delay=10, queue_kbyte=queue_kb))
        reader, writer = await asyncio.open_connection(*paddr)
        writer.write(b"D")

        async def sink():
            while await reader.read(1 << 20):
                pass

        task = asyncio.create_task(sink())
        await asyncio.sleep(1.0)  # let the buffer fill
        rtts = await measure_rtt(paddr, 5, gap_s=0.05)
        task.cancel()
        writer.transport.abort()
        await sim.stop()
        return median(rtts)

    rtt = run(main())
    # RTT = 2 × 10 ms + the full buffer's drain time at 2 Mbit/s (queue_kb·8/2000 s)
    assert rtt == pytest.approx(expect_s, rel=0.2)
