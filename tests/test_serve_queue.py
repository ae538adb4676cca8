"""`edge-agent serve` under pressure: a bounded queue (429 + Retry-After), a client that
leaves mid-stream frees its slot at once, and a verifier that is not there.

The queue test runs the daemon edge-only with the emulated Jetson Orin edge: each
draft step is held to at least its modelled time (~13 ms), so the long request
takes at least ~20 s whatever the machine's speed, and the test decides when it
ends (by disconnecting) instead of racing it.
"""
import http.client
import json
import socket
import threading

import pytest

from common.procs import start_serve
from tests.conftest import wait_for

LONG = 1500            # tokens of the request that is cut short: >= 19 s at the emulated device's pace


def metric(address: str, name: str) -> float:
    text = get(address, "/metrics")[1].decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    raise KeyError(name)


def get(address: str, path: str):
    conn = http.client.HTTPConnection(*address.split(":"), timeout=60)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


def post(address: str, path: str, body: dict, timeout: float = 120):
    conn = http.client.HTTPConnection(*address.split(":"), timeout=timeout)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn, conn.getresponse()


@pytest.fixture(scope="module")
def edge_only():
    d = start_serve(None, "--mode", "edge-only", "--emulate-device", "jetson-orin", "--queue-size", "1")
    yield d
    assert d.stop() == 0, "".join(d.stderr)


def test_full_queue_gets_429_and_a_client_that_leaves_frees_its_slot(edge_only):
    addr = edge_only.address
    # A: a long stream, read until its first token arrives
    conn_a, resp_a = post(addr, "/v1/completions", {"model": "tandem", "prompt": "Once upon a time", "stream": True,
                                                    "max_tokens": LONG, "ignore_eos": True, "temperature": 0})
    assert resp_a.status == 200
    assert resp_a.readline().startswith(b"data: ")
    # B: waits behind A (queue size 1)
    result_b: dict = {}

    def run_b():
        conn, r = post(addr, "/v1/completions", {"model": "tandem", "prompt": "Hello", "max_tokens": 4,
                                                 "temperature": 0, "ignore_eos": True})
        result_b["status"], result_b["body"] = r.status, json.loads(r.read())
        conn.close()
    tb = threading.Thread(target=run_b)
    tb.start()
    wait_for(lambda: metric(addr, "tandem_queue_waiting") == 1, what="B to wait in the queue")
    # C: the queue is full
    conn_c, resp_c = post(addr, "/v1/completions", {"model": "tandem", "prompt": "Hi", "max_tokens": 2})
    body_c = json.loads(resp_c.read())
    conn_c.close()
    assert resp_c.status == 429 and int(resp_c.getheader("Retry-After")) >= 1
    assert body_c["error"]["code"] == "queue_full"
    # A leaves mid-stream: its generation stops, B gets the drafter
    assert conn_a.sock is not None       # a chunked stream keeps its connection
    conn_a.sock.shutdown(socket.SHUT_RDWR)
    resp_a.close()
    conn_a.close()
    tb.join(60)
    assert result_b.get("status") == 200 and result_b["body"]["usage"]["completion_tokens"] == 4
    assert metric(addr, "tandem_cancelled_total") == 1
    # A was cut long before its LONG tokens: everything generated so far is far less
    assert metric(addr, "tandem_completion_tokens_total") < LONG / 2
    wait_for(lambda: metric(addr, "tandem_queue_running") == 0 and metric(addr, "tandem_queue_waiting") == 0,
             what="an empty queue")
    assert get(addr, "/healthz")[0] == 200


def test_a_client_that_leaves_a_non_streaming_request_frees_its_slot(edge_only):
    addr = edge_only.address
    before = metric(addr, "tandem_cancelled_total")
    conn = http.client.HTTPConnection(*addr.split(":"), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tandem", "prompt": "Once", "max_tokens": LONG,
                                                        "ignore_eos": True}), {"Content-Type": "application/json"})
    wait_for(lambda: metric(addr, "tandem_queue_running") == 1, what="the request to run")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: metric(addr, "tandem_cancelled_total") == before + 1, what="the generation to stop")
    wait_for(lambda: metric(addr, "tandem_queue_running") == 0, what="the slot to be free")


def test_a_client_that_leaves_while_waiting_frees_its_place_at_once(edge_only):
    addr = edge_only.address
    long = {"model": "tandem", "prompt": "Once", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    conn_a, resp_a = post(addr, "/v1/completions", long)
    assert resp_a.readline().startswith(b"data: ")
    conn_b, resp_b = post(addr, "/v1/completions", long)           # waits behind A
    assert resp_b.status == 200
    wait_for(lambda: metric(addr, "tandem_queue_waiting") == 1, what="B to wait")
    conn_b.sock.shutdown(socket.SHUT_RDWR)
    conn_b.close()
    wait_for(lambda: metric(addr, "tandem_queue_waiting") == 0, what="B's place to be freed")
    assert metric(addr, "tandem_queue_running") == 1                 # A still generating
    conn_a.sock.shutdown(socket.SHUT_RDWR)
    conn_a.close()
    wait_for(lambda: metric(addr, "tandem_queue_running") == 0, what="A to stop")


def test_without_a_verifier_the_daemon_answers_edge_only_and_says_so():
    with socket.socket() as s:           # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    d = start_serve(dead)
    try:
        status, body = get(d.address, "/healthz")
        health = json.loads(body)
        assert status == 200 and health["verifier"]["reachable"] is False and health["serving"] == "edge-only"
        conn, r = post(d.address, "/v1/chat/completions", {"model": "tandem", "max_tokens": 8, "temperature": 0,
                                                            "messages": [{"role": "user", "content": "Hi"}]})
        reply = json.loads(r.read())
        conn.close()
        assert r.status == 200, reply
        tandem = reply["tandem"]
        assert tandem["fallback"] == "edge-only" and tandem["edge_only_tokens"] == reply["usage"]["completion_tokens"]
        assert [s["mode"] for s in tandem["segments"]] == ["edge-only"]
        assert json.loads(get(d.address, "/v1/models")[1])["data"][0]["id"] == "tandem"
    finally:
        assert d.stop() == 0, "".join(d.stderr)
