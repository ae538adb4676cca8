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
from tests.conftest import first_divergence
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


def open_when_free(stub, tokenizer, deadline_s: float = 30.0, prompt: list[int] | None = None) -> pb.OpenReply:
    end = time.monotonic() + deadline_s
    while True:
        try:
            return stub.Open(pb.OpenRequest(fingerprint=tokenizer.fingerprint,
                                            prompt=prompt or tokenizer.encode(PROMPT)))
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


def pass_tokens(port: int, at_least: float = 0.0, deadline_s: float = 30.0) -> float:
    """Tokens the verifier's passes evaluated so far; with `at_least`, polled until the count
    has reached it (a pass is counted just after its steps are answered)."""
    end = time.monotonic() + deadline_s
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        n = float(re.search(r"^tandem_verifier_pass_tokens_sum ([0-9.e+-]+)$", text, re.M).group(1))
        if n >= at_least or time.monotonic() > end:
            return n
        time.sleep(0.01)


def agrees(got: list[int], ref: list[int], gaps: list[float], tie: float = 1e-3) -> bool:
    """`got` is the reference's greedy output, up to a position where the reference's top two
    logits are within `tie` (another build or batch shape may pick either there)."""
    i = first_divergence(got, ref)
    return len(got) == len(ref) and (i is None or gaps[i] < tie)


def test_a_hand_over_keeps_the_session_for_a_stream_from_its_cache(single, tokenizer, reference):
    """An edge that stops speculating hands its session over (a last `handover` draft): the
    stream ends cleanly, the session stays with its cache, and a Generate naming it streams
    on from the prompt and accepted tokens without evaluating them again. The tokens are the
    target's own, as a fresh stream's would be."""
    stub, port, _ = single
    prompt = tokenizer.encode("Write a short story about a robot who learns to paint, in three sentences.")
    ref, gaps = reference.greedy(prompt, 12)
    start = pass_tokens(port)
    r = open_when_free(stub, tokenizer, prompt=prompt)
    block = pb.Draft(epoch=0, start=len(prompt), tokens=packing.pack_tokens(ref[:3], 2))
    out = list(stub.Speculate(iter([block, pb.Draft(handover=True)]), metadata=meta(r)))
    assert len(out) == 1 and (out[0].accepted == 3 or min(gaps[:3]) < 1e-3), \
        "the block before the hand-over is answered, then the stream ends"
    before = pass_tokens(port, at_least=start + len(prompt) + 3)    # the prompt's and the block's passes
    got = []
    for chunk in stub.Generate(pb.GenerateRequest(fingerprint=tokenizer.fingerprint, prompt=prompt + ref[:3],
                                                  max_tokens=6, ignore_eos=True, session=r.session),
                               metadata=meta(r)[1:]):
        got += list(chunk.tokens)
    assert agrees(got, ref[3:9], gaps[3:9])
    # one token a pass at most, each new token's (a fresh stream would prefill the prompt again)
    assert pass_tokens(port) - before <= 6 < len(prompt)
    r2 = open_when_free(stub, tokenizer)            # the stream's end freed the slot
    stub.Close(pb.CloseRequest(session=r2.session), metadata=meta(r2)[1:])


def test_the_edge_client_hands_a_session_over_and_streams_on(single, tokenizer, reference):
    """The edge's side of the same (edge/client.py `DraftStream.hand_over`, what the agent does
    when its planner switches to streaming mid-request): the stream ends cleanly within the
    timeout, verdicts still on the way are dropped, and a cloud-only stream continues the
    session with the session key the client kept."""
    from edge.baselines import cloud_only
    from edge.client import VerifierClient
    from edge.config import GenConfig
    from edge.stats import GenStats
    _, _, daemon = single
    prompt = tokenizer.encode("List three colours of the rainbow, then stop.")
    ref, gaps = reference.greedy(prompt, 10)
    client = VerifierClient(daemon.address)
    try:
        client.wait_ready()
        end = time.monotonic() + 30
        while True:
            try:
                reply = client.open_result(client.open_async(
                    pb.OpenRequest(fingerprint=tokenizer.fingerprint, prompt=prompt)))
                break
            except Exception:  # noqa: BLE001 - the single slot is still being freed
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        stream = client.speculate(reply.session)
        stream.send(pb.Draft(epoch=0, start=len(prompt), tokens=packing.pack_tokens(ref[:2], 2)))
        assert stream.hand_over(timeout_s=30.0)
        out = cloud_only(client, tokenizer.fingerprint, prompt + ref[:2],
                         GenConfig(mode="cloud-only", max_tokens=4, stop_at_eos=False),
                         lambda t: None, GenStats("cloud-only"), time.monotonic(), session=reply.session)
        assert agrees(out, ref[2:6], gaps[2:6])
    finally:
        client.close()
