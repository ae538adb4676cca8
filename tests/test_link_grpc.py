"""gRPC (HTTP/2) through link-sim, as between edge-agent and cloud-verifier: exact, long-lived, delayed."""

import os
import statistics
import time
from concurrent import futures

import grpc
import pytest

from sim.link.measure import LinkSimProcess

_ident = lambda b: b  # noqa: E731  (raw bytes on the wire, no proto needed)


def _echo(request: bytes, context) -> bytes:
    return request


def _chunks(request: bytes, context):
    # stream the request back in 16 kB messages: many HTTP/2 DATA frames and window updates
    for i in range(0, len(request), 16_384):
        yield request[i : i + 16_384]


@pytest.fixture
def server():
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "tandem.test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_echo, request_deserializer=_ident, response_serializer=_ident),
            "Chunks": grpc.unary_stream_rpc_method_handler(_chunks, request_deserializer=_ident, response_serializer=_ident),
        },
    )
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield ("127.0.0.1", port)
    srv.stop(0)


def test_grpc_unary_and_streaming_through_the_link(server):
    link = LinkSimProcess(server, "--rate-up", "20", "--rate-down", "20", "--delay-ms", "10", "--jitter-ms", "0")
    try:
        with grpc.insecure_channel(f"{link.addr[0]}:{link.addr[1]}") as ch:
            unary = ch.unary_unary("/tandem.test.Echo/Unary", request_serializer=_ident, response_deserializer=_ident)
            chunks = ch.unary_stream("/tandem.test.Echo/Chunks", request_serializer=_ident, response_deserializer=_ident)
            unary(b"warm-up", timeout=10)  # connection setup: TCP + HTTP/2 handshakes cross the link
            times = []
            for i in range(15):
                msg = os.urandom(50 + i)
                t = time.monotonic()
                assert unary(msg, timeout=10) == msg
                times.append(time.monotonic() - t)
            big = os.urandom(1_000_000)
            t = time.monotonic()
            got = b"".join(chunks(big, timeout=30))
            transfer = time.monotonic() - t
    finally:
        rep = link.stop()
    assert got == big
    # one round trip per call on a live connection: 2 × 10 ms plus gRPC's own work
    assert 0.020 <= statistics.median(times) < 0.030
    # 1 MB up and 1 MB down at 20 Mbit/s each, pipelined: at least 0.4 s
    assert transfer >= 0.4
    assert rep["connections"]["total"] == 1  # one long-lived HTTP/2 connection carried everything
