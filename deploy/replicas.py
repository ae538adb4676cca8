"""`make replicas`: cloud-verifier replicas on loopback behind HAProxy (deploy/haproxy.cfg).

    python -m deploy.replicas [--replicas N] [--listen HOST:PORT] [-- VERIFIER ARGS...]

Starts N verifiers (each on a free loopback port) and HAProxy in front of them,
prints 'tandem balancer listening on HOST:PORT' when a health check passes
through it, and stops everything on Ctrl-C or SIGTERM. Edges use that address
as --cloud; each session stays on one replica (affinity on the edge's
`tandem-affinity` header) and moves to another when its replica dies.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from common.procs import ROOT, Daemon, start_cloud

CONFIG = ROOT / "deploy" / "haproxy.cfg"


def haproxy_missing() -> str | None:
    """Why the balancer cannot run here, or None."""
    if shutil.which("haproxy") is None:
        return "haproxy is not installed (Debian: apt-get install haproxy; `make setup` tries)"
    return None


def render_config(n: int) -> str:
    """deploy/haproxy.cfg with a `server` line per replica beyond the two it names."""
    return CONFIG.read_text() + "".join(f'    server r{i} "${{TANDEM_REPLICA_{i}}}"\n' for i in range(3, n + 1))


class ReplicaSet:
    def __init__(self, n: int = 2, listen: str = "127.0.0.1:50051", verifier_args: tuple[str, ...] = (),
                 ready_timeout_s: float = 60.0):
        if n < 2:
            raise ValueError("a replica set needs at least 2 verifiers")
        why = haproxy_missing()
        if why:
            raise FileNotFoundError(why)
        self.address = listen
        self.replicas: list[Daemon] = []
        self.proc = None
        self.log: deque[str] = deque(maxlen=400)
        self._dir = tempfile.TemporaryDirectory(prefix="tandem-lb-")
        try:
            self.replicas = [start_cloud(*verifier_args) for _ in range(n)]
            cfg = Path(self._dir.name) / "haproxy.cfg"
            cfg.write_text(render_config(n))
            env = {**os.environ, "TANDEM_LB_LISTEN": listen,
                   **{f"TANDEM_REPLICA_{i + 1}": r.address for i, r in enumerate(self.replicas)}}
            self.proc = subprocess.Popen(["haproxy", "-f", str(cfg), "-db"], env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
            threading.Thread(target=self._drain, daemon=True).start()
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)

    def _wait_ready(self, timeout_s: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"haproxy exited ({self.proc.returncode}):\n{''.join(self.log)}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    time.sleep(0.1)
        raise RuntimeError(f"the balancer on {self.address} did not pass a health check within {timeout_s:.0f} s:\n"
                           + "".join(self.log))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for r in self.replicas:
            r.stop()
        self._dir.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.replicas", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=2, help="verifier replicas (default: %(default)s)")
    ap.add_argument("--listen", default="127.0.0.1:50051", help="the balancer's HOST:PORT (default: %(default)s)")
    ap.add_argument("verifier_args", nargs=argparse.REMAINDER,
                    help="after --: arguments for every cloud-verifier (e.g. -- --emulate-target qwen3-32b-a100)")
    a = ap.parse_args(argv)
    extra = tuple(x for x in a.verifier_args if x != "--")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        rs = ReplicaSet(a.replicas, a.listen, extra)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"replicas: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    for i, r in enumerate(rs.replicas, 1):
        print(f"replica r{i}: cloud-verifier on {r.address}", flush=True)
    print(f"tandem balancer listening on {rs.address}", flush=True)
    stop.wait()
    rs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
