"""What a session owns is freed on Close, cancel, disconnect and idle expiry,
and never while a stream still uses it (a Close then ends the stream first); metrics say what the verifier did.

One verifier with room for a single session: whether the slot came back is
seen by the next Open being admitted (polled with a deadline, never a fixed sleep)."""
from __future__ import annotations

import queue
import re
import socket
import time
import urllib.request

import grpc
import pytest

from common.procs import start_cloud
from kernels import packing
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc

PROMPT = "Hello there"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single():
    port = free_port()
    d = start_cloud("--threads", "1", "--max-sessions", "1", "--idle-timeout", "1", "--metrics", f"127.0.0.1:{port}")
    ch = grpc.insecure_channel(d.address)
    yield pb_grpc.VerifierStub(ch), port, d
    ch.close()
    d.stop()


def meta(r):
    return (("tandem-session", r.session), ("tandem-session-key", r.session_key))


def open_when_free(stub, tokenizer, deadline_s: float = 30.0) -> pb.OpenReply:
    end = time.monotonic() + deadline_s
    while True:
        try:
            return stub.Open(pb.OpenRequest(fingerprint=tokenizer.fingerprint, prompt=tokenizer.encode(PROMPT)))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > end:
                raise
            time.sleep(0.05)


def draft(tokenizer, tokens=(28,)):
    return pb.Draft(epoch=0, start=len(tokenizer.encode(PROMPT)), tokens=packing.pack_tokens(list(tokens), 2))


def test_close_frees_the_slot(single, tokenizer):
    stub, _, _ = single
    r = open_when_free(stub, tokenizer)
    stub.Close(pb.CloseRequest(session=r.session), metadata=meta(r)[1:])
    r2 = open_when_free(stub, tokenizer)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Speculate(iter([draft(tokenizer)]), metadata=meta(r)))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    stub.Close(pb.CloseRequest(session=r2.session), metadata=meta(r2)[1:])


def live_stream(stub, tokenizer):
    """An opened session with a Speculate stream that has had one verdict and waits for more
    blocks: (OpenReply, the queue that feeds the stream (None ends it), the call)."""
    r = open_when_free(stub, tokenizer)
    q: queue.Queue = queue.Queue()
    call = stub.Speculate(iter(q.get, None), metadata=meta(r))
    q.put(draft(tokenizer))
    assert next(call).start == len(tokenizer.encode(PROMPT))
    return r, q, call


def test_close_during_a_stream_ends_it_and_frees_the_slot(single, tokenizer):
    stub, _, _ = single
    r, q, call = live_stream(stub, tokenizer)
    stub.Close(pb.CloseRequest(session=r.session), metadata=meta(r)[1:])   # the stream waits for a block
    with pytest.raises(grpc.RpcError) as e:
        next(call)
    assert e.value.code() == grpc.StatusCode.ABORTED and "closed" in e.value.details()
    q.put(None)
    r2 = open_when_free(stub, tokenizer)
    stub.Close(pb.CloseRequest(session=r2.session), metadata=meta(r2)[1:])


def test_cancelled_stream_frees_the_slot(single, tokenizer):
    stub, _, _ = single
    _, _, call = live_stream(stub, tokenizer)
    call.cancel()
    r2 = open_when_free(stub, tokenizer)
    stub.Close(pb.CloseRequest(session=r2.session), metadata=meta(r2)[1:])


def test_disconnected_client_frees_the_slot(single, tokenizer):
    stub, _, d = single
    ch = grpc.insecure_channel(d.address)
    other = pb_grpc.VerifierStub(ch)
    r = open_when_free(other, tokenizer)
    q: queue.Queue = queue.Queue()
    call = other.Speculate(iter(q.get, None), metadata=meta(r))
    q.put(draft(tokenizer))
    next(call)
    ch.close()                                       # the edge goes away without a word
    r2 = open_when_free(stub, tokenizer)
    stub.Close(pb.CloseRequest(session=r2.session), metadata=meta(r2)[1:])


def test_idle_session_expires_but_never_under_a_live_stream(single, tokenizer):
    stub, _, _ = single
    r = open_when_free(stub, tokenizer)              # opened, never streamed: expires after 1 s idle
    r2 = open_when_free(stub, tokenizer)
    q: queue.Queue = queue.Queue()
    call = stub.Speculate(iter(q.get, None), metadata=meta(r2))
    # a live stream that stays quiet for several idle timeouts keeps its session
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        with pytest.raises(grpc.RpcError) as e:
            stub.Open(pb.OpenRequest(fingerprint=tokenizer.fingerprint, prompt=tokenizer.encode(PROMPT)))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        time.sleep(0.5)
    q.put(draft(tokenizer))
    assert next(call).start == len(tokenizer.encode(PROMPT))
    q.put(None)
    assert list(call) == []
    with pytest.raises(grpc.RpcError):
        list(stub.Speculate(iter([draft(tokenizer)]), metadata=meta(r)))   # the expired one is gone


def test_metrics_count_passes_tokens_and_refusals(single, tokenizer):
    stub, port, _ = single
    r = open_when_free(stub, tokenizer)
    out = list(stub.Speculate(iter([draft(tokenizer, (28, 29, 30))]), metadata=meta(r)))
    assert len(out) == 1
    with pytest.raises(grpc.RpcError):
        stub.Open(pb.OpenRequest(fingerprint="wrong", prompt=[1]))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(tandem_\S+) ([0-9.e+-]+)$", text, re.M)}
    assert values["tandem_verifier_pass_tokens_count"] >= 2          # at least a prefill and a verify pass
    assert values["tandem_verifier_drafted_tokens_total"] >= 3
    assert values['tandem_verifier_refusals_total{code="FAILED_PRECONDITION"}'] >= 1
    assert "tandem_verifier_pass_seconds_bucket" in text
