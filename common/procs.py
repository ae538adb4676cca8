"""Start the real daemons as subprocesses: the replica set (deploy/), the
benchmarks, the demo and the tests all run the daemons this way.

Daemons are started by module name (`python -m cloud.cli`), so nothing here
imports them: this module stays below edge, cloud and sim.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from common.address import split_host_port

ROOT = Path(__file__).resolve().parent.parent


class Daemon:
    """A daemon started with `python -m MODULE ARGS` that prints
    '<name> listening on HOST:PORT' when ready."""

    def __init__(self, module: str, args: list[str], ready: str, timeout_s: float = 60.0, env=None):
        self.cmd = [sys.executable, "-m", module, *args]
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, **(env or {})})
        self.stderr: deque[str] = deque(maxlen=400)
        self.stdout: list[str] = []
        threading.Thread(target=self._drain, args=(self.proc.stderr, self.stderr), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        self.address = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.stdout.append(line)
            if ready in line:   # '<name> listening on HOST:PORT', maybe followed by ' (what it found)'
                self.address = line.split(ready, 1)[1].split()[0]
                self.ready_line = line.strip()
                break
        if self.address is None:
            self.stop()
            raise RuntimeError(f"{' '.join(self.cmd)} did not start:\n{''.join(self.stderr)}")
        threading.Thread(target=self._drain, args=(self.proc.stdout, self.stdout), daemon=True).start()

    @staticmethod
    def _drain(stream, sink) -> None:
        for line in stream:
            sink.append(line)

    @property
    def port(self) -> int:
        return split_host_port(self.address)[1]

    def stop(self, timeout_s: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def free_port() -> int:
    """A loopback port nothing listens on now (for a daemon's --metrics)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_cloud(*extra: str) -> Daemon:
    return Daemon("cloud.cli", ["--listen", "127.0.0.1:0", *extra], "cloud-verifier listening on")


def start_link(upstream: str, *extra: str) -> Daemon:
    return Daemon("sim.link.cli", ["--listen", "127.0.0.1:0", "--upstream", upstream, *extra],
                  "link-sim listening on")


def start_serve(cloud: str | None, *extra: str, timeout_s: float = 90.0) -> Daemon:
    """`edge-agent serve` on a free loopback port; `address` is its HTTP HOST:PORT."""
    args = ["serve", "--http", "127.0.0.1:0", "--threads", "1"] + (["--cloud", cloud] if cloud else [])
    return Daemon("edge.cli", [*args, *extra], "edge-agent serve listening on", timeout_s=timeout_s)

