"""The `link-sim` command as other scripts use it: ready line, flags, signals, control, schedules."""

import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sim.link.cli import build_parser
from sim.link.control import send_command

ROOT = Path(__file__).resolve().parent.parent
READY = "link-sim listening on "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EchoServer:
    """A plain blocking echo server in a thread, so the proxy under test is the only asyncio here."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addr = self.sock.getsockname()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except ConnectionResetError:
                pass

    def close(self):
        self.sock.close()


@pytest.fixture
def start():
    """Starts link-sim processes; kills any a failing test left running."""
    procs = []

    def _start(*args, wait_ready=True):
        proc = subprocess.Popen(
            [sys.executable, "-m", "sim.link.cli", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        if not wait_ready:
            return proc, None
        line = proc.stdout.readline()
        assert line.startswith(READY), (line, proc.stderr.read() if proc.poll() is not None else "")
        host, port = line[len(READY) :].strip().rsplit(":", 1)
        return proc, (host, int(port))

    yield _start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def stop(proc, sig=signal.SIGTERM, with_stderr=False):
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    rep = json.loads(out.strip().splitlines()[-1])
    return (rep, err) if with_stderr else rep


@pytest.fixture
def echo():
    srv = EchoServer()
    yield srv
    srv.close()


def ping_on(s: socket.socket, payload=b"hello") -> float:
    t = time.monotonic()
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        got += s.recv(65536)
    assert got == payload
    return time.monotonic() - t


def ping(addr, payload=b"hello") -> float:
    """RTT of a fresh connection: includes the handshake's round trip across the link."""
    with socket.create_connection(addr, timeout=5) as s:
        return ping_on(s, payload)


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, "-m", "sim.link.cli", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for action in build_parser()._actions:
        for opt in action.option_strings:
            assert opt in out.stdout
        assert action.help, action.option_strings
    for word in ("ctl", "profiles", "outage", "rate-up", "listening on"):
        assert word in out.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ready_line_forwarding_and_clean_stop(echo, sig, start):
    proc, addr = start("--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo.addr[1]}", "--delay-ms", "1")
    rtt = ping(addr, b"x" * 1000)
    assert rtt >= 0.002
    rep = stop(proc, sig)
    assert rep["final"] is True
    assert rep["up"]["bytes_out"] == rep["down"]["bytes_out"] == 1000
    assert rep["conditions"]["profile"] == "picospec-wan"  # the default profile


def test_flags_override_profile(echo, start):
    port = free_port()
    proc, addr = start(
        "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{echo.addr[1]}",
        "--profile", "3g", "--rate-down", "5", "--delay-ms", "4",
    )
    assert addr == ("127.0.0.1", port)
    rtt = ping(addr)
    rep = stop(proc)
    c = rep["conditions"]
    assert c["profile"] == "3g"
    assert c["down"]["rate_mbit"] == 5 and c["up"]["rate_mbit"] == 0.5  # up keeps the profile's rate
    assert c["up"]["delay_ms"] == c["down"]["delay_ms"] == 4
    assert 0.008 <= rtt < 0.2


@pytest.mark.parametrize(
    "args, words",
    [
        (["--profile", "atlantis"], "unknown profile 'atlantis'"),
        (["--rate-up", "5000"], "rate 5000 Mbit/s out of range"),
        (["--loss", "0.7"], "loss"),
        (["--trace-down", "/nonexistent.mahi"], "cannot read trace"),
    ],
)
def test_bad_values_exit_2_with_reason(args, words, start):
    proc, _ = start("--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", *args, wait_ready=False)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 2
    assert words in err
    assert READY not in out


def test_bad_schedule_names_file_line(tmp_path, start):
    sched = tmp_path / "s.txt"
    sched.write_text("1 profile 3g\n2 outage two\n")
    proc, _ = start("--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--schedule", str(sched), wait_ready=False)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 2
    assert f"{sched}:2:" in err


def test_control_port_and_ctl_subcommand(echo, start):
    cport = free_port()
    proc, addr = start(
        "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo.addr[1]}",
        "--control", f"127.0.0.1:{cport}", "--profile", "lan",
    )
    try:
        conn = socket.create_connection(addr, timeout=5)
        fast = statistics.median(ping_on(conn) for _ in range(5))
        reply = send_command("127.0.0.1", cport, "set delay=30")
        assert reply["ok"] and reply["conditions"]["up"]["delay_ms"] == 30
        slow = statistics.median(ping_on(conn) for _ in range(5))  # the live connection sees the new delay
        conn.close()
        assert slow - fast == pytest.approx(0.060, abs=0.003)
        ctl = subprocess.run(
            [sys.executable, "-m", "sim.link.cli", "ctl", f"127.0.0.1:{cport}", "profile", "3g"],
            cwd=ROOT, capture_output=True, text=True,
        )
        assert ctl.returncode == 0 and json.loads(ctl.stdout)["conditions"]["profile"] == "3g"
        bad = subprocess.run(
            [sys.executable, "-m", "sim.link.cli", "ctl", f"127.0.0.1:{cport}", "set", "rate-up=-1"],
            cwd=ROOT, capture_output=True, text=True,
        )
        assert bad.returncode == 1 and "out of range" in json.loads(bad.stdout)["error"]
        status = send_command("127.0.0.1", cport, "status")
        assert status["report"]["up"]["bytes_out"] == 50  # ten 5-byte pings
    finally:
        stop(proc)


def test_schedule_switches_conditions_and_interval_reports(echo, tmp_path, start):
    sched = tmp_path / "s.txt"
    sched.write_text("# switch to 3g, then an outage\n0.3 profile 3g\n0.6 outage 0.5\n")
    reports = tmp_path / "r.jsonl"
    proc, addr = start(
        "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo.addr[1]}", "--profile", "lan",
        "--schedule", str(sched), "--report-interval", "0.25", "--report-file", str(reports),
    )
    time.sleep(1.5)
    rep = stop(proc)
    lines = [json.loads(line) for line in reports.read_text().splitlines()]
    assert len(lines) >= 4
    assert lines[0]["conditions"]["profile"] == "lan"
    assert lines[-1]["conditions"]["profile"] == "3g"
    assert any(line["link_down"] for line in lines)
    assert rep["down"]["outage_s"] == pytest.approx(0.5, abs=0.05)


def test_list_profiles():
    out = subprocess.run([sys.executable, "-m", "sim.link.cli", "profiles"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("lan", "wifi", "5g", "lte", "3g", "satellite", "picospec-wan"):
        assert any(line.startswith(name + " ") for line in out.stdout.splitlines())


def test_upstream_down_resets_client_but_proxy_survives(echo, start):
    dead = free_port()
    proc, addr = start("--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{dead}", "--profile", "lan")
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(b"hi")
        try:
            got = s.recv(10)
        except ConnectionResetError:
            got = b""
    assert got == b""
    assert proc.poll() is None
    rep, err = stop(proc, with_stderr=True)
    assert rep["up"]["bytes_out"] == 0
    assert "unreachable" in err
