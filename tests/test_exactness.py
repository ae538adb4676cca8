"""The verifier's start-up check: is a batched pass bit-identical to one-token decoding here?

On this build with one KV stream per sequence it is, and the verifier says `exact: bitwise`.
A unified KV cache lets one sequence's next tokens fill cells another sequence freed by a
rollback, out of position order: the check must see that, and the verifier must then serve
one session per pass and say so, or refuse to start with --require-bitwise.
"""
from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest

from common.procs import ROOT, start_cloud
from cloud import exactness
from cloud.target import Target
from edge.model_files import shipped_gguf


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
    return float(line.split()[1])


@pytest.mark.parametrize("unified", [False, True], ids=["kv-streams", "kv-unified"])
def test_the_check_sees_whether_batching_is_exact(unified):
    target = Target(shipped_gguf(), n_ctx=256, n_seqs=6, n_threads=1, kv_unified=unified)
    try:
        found = exactness.check(target)
        assert found.seqs == 4 and found.rows >= 30, found
        if unified:
            assert not found.bitwise and found.label().startswith("max logit diff"), found
        else:
            assert found.bitwise and found.label() == "bitwise", found
        # the sequences it used are left empty for the sessions
        assert all(target.seq_len(s) == 0 for s in range(target.n_seqs))
    finally:
        target.close()


def test_verifier_says_bitwise_on_its_ready_line_and_in_metrics():
    port = free_port()
    d = start_cloud("--threads", "1", "--metrics", f"127.0.0.1:{port}")
    try:
        assert d.ready_line.endswith("(exact: bitwise)"), d.ready_line
        assert metric(port, "tandem_verifier_exact_bitwise") == 1.0
        assert metric(port, "tandem_verifier_exact_max_logit_diff") == 0.0
    finally:
        d.stop()


def test_verifier_serves_without_batching_where_the_check_fails():
    port = free_port()
    d = start_cloud("--threads", "1", "--kv-unified", "--metrics", f"127.0.0.1:{port}")
    try:
        assert "batching off (batched: max logit diff" in d.ready_line, d.ready_line
        assert any("serving one session per pass" in line for line in d.stderr), list(d.stderr)
        assert metric(port, "tandem_verifier_exact_max_logit_diff") >= 0.0
    finally:
        d.stop()


def test_verifier_refuses_with_require_bitwise_where_the_check_fails():
    p = subprocess.run([sys.executable, "-m", "cloud.cli", "--listen", "127.0.0.1:0", "--threads", "1",
                        "--kv-unified", "--require-bitwise"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0
    assert "not bit-identical" in p.stderr and "--require-bitwise" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert "listening on" not in p.stdout
