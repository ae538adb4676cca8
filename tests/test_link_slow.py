"""link-sim accuracy across its whole range (slow: ~2–3 minutes).

The proxy runs as its own process (as in real use); the measuring client and the
upstream server share this one. Tolerances are the issue's: rate ±3 % from
64 kbit/s to 200 Mbit/s, RTT ±1 ms of the configured delay plus the bare
loopback RTT, trace replay ±2 % of the trace's capacity over 30 s.
"""

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sim.link.control import send_command
from sim.link.measure import Arrivals, Upstream, compare_rtt, measure_rate, tune_socket
from sim.link.netns import WIRE_EFFICIENCY, tbf_unavailable_reason
from sim.link.profiles import DEFAULT_PROFILES
from sim.link.timing import run
from sim.link.trace import load_trace

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
READY = "link-sim listening on "


class ProxyProcess:
    def __init__(self, upstream_port: int, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sim.link.cli", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream_port}", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()
        assert line.startswith(READY), self.proc.stderr.read()
        host, port = line[len(READY):].strip().rsplit(":", 1)
        self.addr = (host, int(port))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=10)


def measure_both(rate: float, seconds: float, warmup: float) -> tuple[float, float]:
    async def main():
        upstream = Upstream()
        _, uport = await upstream.start()
        proxy = ProxyProcess(uport, "--rate-up", str(rate), "--rate-down", str(rate), "--delay-ms", "0", "--jitter-ms", "0")
        try:
            up = await measure_rate(proxy.addr, upstream, "up", seconds, warmup)
            down = await measure_rate(proxy.addr, upstream, "down", seconds, warmup)
        finally:
            proxy.stop()
            await upstream.close()
        return up, down

    return run(main())


@pytest.mark.parametrize("rate", [0.064, 0.256, 1.0, 4.0, 16.0, 64.0, 200.0])
def test_rate_sweep_within_3_percent(rate):
    # long windows: a 64 kbit/s link moves only 8 kB/s, and on a loaded shared
    # machine a window must outlast this process's own scheduling hiccups
    seconds = 10.0 if rate < 0.5 else 6.0
    up, down = measure_both(rate, seconds, warmup=0.5)
    assert up == pytest.approx(rate, rel=0.03), (up, down)
    assert down == pytest.approx(rate, rel=0.03), (up, down)


@pytest.mark.parametrize("delay_ms", [1.0, 10.0, 100.0])
def test_rtt_within_1ms(delay_ms):
    async def main():
        upstream = Upstream()
        _, uport = await upstream.start()
        proxy = ProxyProcess(uport, "--rate-up", "50", "--rate-down", "50", "--delay-ms", str(delay_ms), "--jitter-ms", "0")
        try:
            # ~30+ pings: the median must not hinge on a few scheduler hiccups of a shared machine
            rtt, base = await compare_rtt(proxy.addr, ("127.0.0.1", uport), rounds=6, pings=8 if delay_ms < 50 else 5)
        finally:
            proxy.stop()
            await upstream.close()
        return base, rtt

    base, rtt = run(main())
    assert rtt == pytest.approx(2 * delay_ms / 1000 + base, abs=0.001)


def test_trace_replay_within_2_percent_over_30s():
    trace_path = str(DEFAULT_PROFILES.parent / "traces" / "lte-down.mahi")
    trace = load_trace(trace_path)

    async def main():
        upstream = Upstream()
        _, uport = await upstream.start()
        cport = _free_port()
        proxy = ProxyProcess(uport, "--rate-up", "50", "--trace-down", trace_path, "--delay-ms", "5",
                             "--jitter-ms", "0", "--control", f"127.0.0.1:{cport}")
        loop = asyncio.get_running_loop()
        try:
            # link-sim's clock is this machine's monotonic clock, as is ours
            origin = send_command("127.0.0.1", cport, "status")["report"]["trace_origin_monotonic"]["down"]
            reader, writer = await asyncio.open_connection(*proxy.addr, limit=1 << 22)
            tune_socket(writer)
            writer.write(b"D")
            arr = Arrivals()
            t0 = loop.time()
            while loop.time() < t0 + 31.5:
                arr.add(loop.time(), len(await reader.read(1 << 20)))
            writer.transport.abort()
        finally:
            proxy.stop()
            await upstream.close()
        return arr, origin, t0

    arr, origin, t0 = run(main())
    start, end = t0 + 1.0, t0 + 31.0
    delivered = arr.rate_mbit(start, end)
    # what the trace offered over the same 30 s, shifted by the 5 ms propagation delay
    offered = trace.capacity_bytes((start - 0.005 - origin) * 1000, (end - 0.005 - origin) * 1000) * 8 / 30 / 1e6
    assert delivered == pytest.approx(offered, rel=0.02)
    assert offered == pytest.approx(trace.mean_mbit, rel=0.5)  # sanity: a real, non-empty window


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tbf_cross_check_agrees():
    reason = tbf_unavailable_reason()
    if reason:
        pytest.skip(f"tc tbf cross-check not possible here: {reason}")
    from sim.link.netns import measure_tbf_rate

    tbf = measure_tbf_rate(8.0, seconds=3.0)
    ours, _ = measure_both(8.0, 3.0, warmup=0.5)
    # tbf meters whole frames (66 bytes of Ethernet/IP/TCP headers per 1448-byte
    # segment); link-sim's rate is payload, so compare like with like
    assert tbf == pytest.approx(ours * WIRE_EFFICIENCY, rel=0.03)
