"""Optional cross-check: shape with the kernel's `tc tbf` between two network namespaces.

Kernel netem is not available on these machines, but tbf is, so the delivered
rate of link-sim can be compared with the kernel's token bucket at the same
setting. We create two namespaces joined by a veth pair, put tbf on each end's
egress, and time a bulk TCP transfer between them. Needs root (CAP_NET_ADMIN);
`tbf_unavailable_reason()` says why not when it cannot run.

    python -m sim.link.netns check              # can the cross-check run here?
    python -m sim.link.netns measure RATE_MBIT  # delivered rate through tbf
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

from sim.link.measure import Arrivals

_ADDR_A, _ADDR_B = "10.77.0.1", "10.77.0.2"
# tbf meters frames, link-sim meters payload: a 1448-byte segment (TCP with
# timestamps) travels as a 1514-byte Ethernet frame.
WIRE_EFFICIENCY = 1448 / 1514
_PORT = 5201


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def tbf_unavailable_reason() -> str | None:
    """None when namespaces and tbf work here, else a one-line reason."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN)"
    name = f"tlsprobe{os.getpid()}"
    r = _ip("netns", "add", name)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        t = subprocess.run(
            ["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit", "burst", "32kb", "latency", "50ms"],
            capture_output=True, text=True, timeout=10,
        )
        if t.returncode != 0:
            return f"`tc qdisc add … tbf` failed: {t.stderr.strip()}"
    finally:
        _ip("netns", "del", name)
    return None


class VethPair:
    """Namespaces A and B joined by a veth pair, tbf at `rate_mbit` on both egresses."""

    def __init__(self, rate_mbit: float):
        tag = os.getpid() % 100_000
        self.a, self.b = f"tlsa{tag}", f"tlsb{tag}"
        self.rate_mbit = rate_mbit

    def __enter__(self) -> "VethPair":
        rate_kbit = int(self.rate_mbit * 1000)
        # bucket: ~2 ms at the rate, at least 4 full frames (a smaller one makes a
        # short measurement window overshoot by the burst); queue: 400 ms, long
        # enough that TCP never sees drops, so the cross-check compares pacing
        # and not congestion control
        burst = max(4 * 1514, int(self.rate_mbit * 1e6 / 8 * 0.002))
        steps = [
            ["netns", "add", self.a],
            ["netns", "add", self.b],
            ["link", "add", self.a, "type", "veth", "peer", "name", self.b],
            ["link", "set", self.a, "netns", self.a],
            ["link", "set", self.b, "netns", self.b],
            ["-n", self.a, "addr", "add", f"{_ADDR_A}/24", "dev", self.a],
            ["-n", self.b, "addr", "add", f"{_ADDR_B}/24", "dev", self.b],
            ["-n", self.a, "link", "set", self.a, "up"],
            ["-n", self.b, "link", "set", self.b, "up"],
            ["-n", self.a, "link", "set", "lo", "up"],
            ["-n", self.b, "link", "set", "lo", "up"],
        ]
        try:
            for s in steps:
                r = _ip(*s)
                if r.returncode != 0:
                    raise RuntimeError(f"ip {' '.join(s)}: {r.stderr.strip()}")
            for ns in (self.a, self.b):
                cmd = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ns, "root", "tbf",
                       "rate", f"{rate_kbit}kbit", "burst", str(burst), "latency", "400ms"]
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
                if r.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in (self.a, self.b):
            _ip("netns", "del", ns)  # deleting a namespace also removes its veth end


def measure_tbf_rate(rate_mbit: float, seconds: float = 3.0, warmup: float = 0.5) -> float:
    """Delivered Mbit/s of a bulk TCP transfer A→B through tbf at rate_mbit."""
    with VethPair(rate_mbit) as pair:
        me = [sys.executable, "-m", "sim.link.netns"]
        recv = subprocess.Popen(["ip", "netns", "exec", pair.b, *me, "recv", str(seconds), str(warmup)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = recv.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"tbf receiver failed: {recv.stderr.read()}")
        send = subprocess.run(["ip", "netns", "exec", pair.a, *me, "send", str(seconds + warmup + 0.5)],
                              capture_output=True, text=True, timeout=seconds + 30)
        out, err = recv.communicate(timeout=30)
        if recv.returncode != 0:
            raise RuntimeError(f"tbf receiver failed: {err} {send.stderr}")
        return json.loads(out)["mbit_per_s"]


def _recv(seconds: float, warmup: float) -> None:
    srv = socket.create_server((_ADDR_B, _PORT))
    print("ready", flush=True)
    conn, _ = srv.accept()
    arr = Arrivals()
    t0 = time.monotonic()
    while time.monotonic() < t0 + warmup + seconds:
        data = conn.recv(1 << 20)
        if not data:
            break
        arr.add(time.monotonic(), len(data))
    conn.close()
    print(json.dumps({"mbit_per_s": arr.rate_mbit(t0 + warmup, t0 + warmup + seconds)}))


def _send(seconds: float) -> None:
    block = os.urandom(64 * 1024)
    for _ in range(50):
        try:
            s = socket.create_connection((_ADDR_B, _PORT), timeout=5)
            break
        except OSError:
            time.sleep(0.05)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            s.sendall(block)
    except OSError:
        pass  # the receiver closes once it has measured
    s.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        reason = tbf_unavailable_reason()
        print(reason or "tbf cross-check available")
        return 1 if reason else 0
    if argv[:1] == ["measure"] and len(argv) == 2:
        reason = tbf_unavailable_reason()
        if reason:
            print(f"skipped: {reason}")
            return 1
        print(json.dumps({"rate_mbit": float(argv[1]), "tbf_mbit_per_s": measure_tbf_rate(float(argv[1]))}))
        return 0
    if argv[:1] == ["recv"]:
        _recv(float(argv[1]), float(argv[2]))
        return 0
    if argv[:1] == ["send"]:
        _send(float(argv[1]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
