"""Bad input gets a precise gRPC status, and the verifier keeps serving."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kernels import packing
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc


@pytest.fixture()
def stub(cloud):
    ch = grpc.insecure_channel(cloud.address)
    yield pb_grpc.VerifierStub(ch), ch
    ch.close()


def open_session(stub, tokenizer, prompt="Hello there"):
    return stub.Open(pb.OpenRequest(fingerprint=tokenizer.fingerprint, prompt=tokenizer.encode(prompt)))


def speculate(stub, reply, drafts):
    """A Speculate call on an Open'ed session, as its opener (session id and key)."""
    return list(stub.Speculate(iter(drafts), metadata=session_meta(reply)))


def session_meta(reply):
    return (("tandem-session", reply.session), ("tandem-session-key", reply.session_key))


def assert_serving(ch, stub, tokenizer):
    health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="tandem.v1.Verifier"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reply = open_session(stub, tokenizer)
    out = speculate(stub, reply, [pb.Draft(epoch=0, start=len(tokenizer.encode("Hello there")),
                                                   tokens=packing.pack_tokens([28], 2))])
    assert len(out) == 1 and out[0].accepted <= 1


def expect(code, fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.code() == code, e.value.details()
    return e.value.details()


def test_wrong_tokenizer_is_refused_with_both_fingerprints(stub, tokenizer):
    s, ch = stub
    msg = expect(grpc.StatusCode.FAILED_PRECONDITION,
                 lambda: s.Open(pb.OpenRequest(fingerprint="0123456789abcdef", prompt=[1, 2, 3])))
    assert "0123456789abcdef" in msg and tokenizer.fingerprint in msg
    assert_serving(ch, s, tokenizer)


def test_token_id_outside_vocabulary(stub, tokenizer):
    s, ch = stub
    r = open_session(s, tokenizer)
    n = len(tokenizer.encode("Hello there"))
    msg = expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: speculate(
        s, r, [pb.Draft(epoch=0, start=n, tokens=packing.pack_tokens([60000], 2))]))
    assert "outside the vocabulary" in msg
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           lambda: s.Open(pb.OpenRequest(fingerprint=tokenizer.fingerprint, prompt=[1, 99999])))
    assert_serving(ch, s, tokenizer)


def test_empty_and_oversized_and_garbled_drafts(stub, tokenizer):
    s, ch = stub
    n = len(tokenizer.encode("Hello there"))
    r = open_session(s, tokenizer)
    assert "empty draft" in expect(grpc.StatusCode.INVALID_ARGUMENT,
                                   lambda: speculate(s, r, [pb.Draft(epoch=0, start=n, tokens=b"")]))
    r = open_session(s, tokenizer)
    assert "exceeds the limit" in expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: speculate(
        s, r, [pb.Draft(epoch=0, start=n, tokens=packing.pack_tokens([28] * 1000, 2))]))
    r = open_session(s, tokenizer)
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           lambda: speculate(s, r, [pb.Draft(epoch=0, start=n, tokens=b"\x01\x02\x03")]))
    r = open_session(s, tokenizer)
    assert "expected" in expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: speculate(
        s, r, [pb.Draft(epoch=0, start=n + 7, tokens=packing.pack_tokens([28], 2))]))
    r = open_session(s, tokenizer)
    assert "ahead" in expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: speculate(
        s, r, [pb.Draft(epoch=5, start=n, tokens=packing.pack_tokens([28], 2))]))
    assert_serving(ch, s, tokenizer)


def test_context_overflow_is_out_of_range(stub, tokenizer):
    s, ch = stub
    expect(grpc.StatusCode.OUT_OF_RANGE,
           lambda: s.Open(pb.OpenRequest(fingerprint=tokenizer.fingerprint, prompt=[28] * 5000)))
    assert_serving(ch, s, tokenizer)


def test_unknown_session(stub, tokenizer):
    s, ch = stub
    nope = pb.OpenReply(session="nope", session_key="x")
    msg = expect(grpc.StatusCode.NOT_FOUND, lambda: speculate(s, nope, [pb.Draft(epoch=0, start=1, tokens=b"\x01\x00")]))
    assert "unknown session" in msg
    assert_serving(ch, s, tokenizer)


def test_client_disconnecting_mid_stream(cloud, tokenizer):
    """A stream cancelled half-way frees the session; the server carries on."""
    ch = grpc.insecure_channel(cloud.address)
    s = pb_grpc.VerifierStub(ch)
    r = open_session(s, tokenizer)
    n = len(tokenizer.encode("Hello there"))

    def drafts():
        yield pb.Draft(epoch=0, start=n, tokens=packing.pack_tokens([28, 29], 2))
        import time
        time.sleep(30)  # never sends more: the client goes away instead

    call = s.Speculate(drafts(), metadata=session_meta(r))
    next(call)
    call.cancel()
    ch.close()
    ch2 = grpc.insecure_channel(cloud.address)
    assert_serving(ch2, pb_grpc.VerifierStub(ch2), tokenizer)
    ch2.close()


def test_stale_epoch_blocks_are_dropped(stub, tokenizer):
    """After a rejection, blocks of the old epoch get no verdict; the next epoch proceeds."""
    s, ch = stub
    prompt = tokenizer.encode("Hello there")
    n = len(prompt)
    r = open_session(s, tokenizer)
    bad = [tokenizer.eos] * 3  # almost surely rejected at the first position
    out = speculate(s, r, [
        pb.Draft(epoch=0, start=n, tokens=packing.pack_tokens(bad, 2)),
        pb.Draft(epoch=0, start=n + 3, tokens=packing.pack_tokens(bad, 2)),  # stale once the first is rejected
    ])
    assert len(out) == 1 and out[0].accepted == 0 and out[0].HasField("token")


def test_another_clients_session_is_refused(stub, tokenizer):
    """Only the opener holds the session's key: a stream or Close without it is refused."""
    s, ch = stub
    r = open_session(s, tokenizer)
    n = len(tokenizer.encode("Hello there"))
    draft = [pb.Draft(epoch=0, start=n, tokens=packing.pack_tokens([28], 2))]
    for key in ("", "0" * 32):
        stolen = pb.OpenReply(session=r.session, session_key=key)
        assert "another client" in expect(grpc.StatusCode.PERMISSION_DENIED, lambda: speculate(s, stolen, draft))
    expect(grpc.StatusCode.PERMISSION_DENIED, lambda: s.Close(pb.CloseRequest(session=r.session)))
    assert len(speculate(s, r, draft)) == 1, "the opener still drives its session"


def test_full_verifier_refuses_with_a_retry_hint_and_frees_slots_on_close(tokenizer):
    """Every RPC that holds a sequence counts, Generate included; Close frees the slot."""
    from common.procs import start_cloud
    d = start_cloud("--threads", "1", "--max-sessions", "2")
    try:
        ch = grpc.insecure_channel(d.address)
        s = pb_grpc.VerifierStub(ch)
        a, b = open_session(s, tokenizer), open_session(s, tokenizer)
        with pytest.raises(grpc.RpcError) as e:
            open_session(s, tokenizer)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(e.value.trailing_metadata()).get("retry-after-ms")
        gen = pb.GenerateRequest(fingerprint=tokenizer.fingerprint, prompt=tokenizer.encode("Hi"), max_tokens=2)
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: list(s.Generate(gen)))
        s.Close(pb.CloseRequest(session=a.session), metadata=session_meta(a)[1:])
        # the freed sequence returns once the scheduler has cleared it: poll, never sleep a fixed time
        for _ in range(100):
            try:
                out = list(s.Generate(gen))
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                import time
                time.sleep(0.05)
        assert out[-1].done and len([t for c in out for t in c.tokens]) == 2
        assert len(speculate(s, b, [pb.Draft(epoch=0, start=len(tokenizer.encode("Hello there")),
                                             tokens=packing.pack_tokens([28], 2))])) == 1
        ch.close()
    finally:
        d.stop()


def test_generate_ends_at_the_context_and_at_zero_tokens_with_the_reason(tokenizer):
    """A stream stops where one more token would fill the context ("context"), and a request
    for no tokens gets none ("length")."""
    from common.procs import start_cloud
    d = start_cloud("--threads", "1", "--n-ctx", "64")
    try:
        with grpc.insecure_channel(d.address) as ch:
            stub = pb_grpc.VerifierStub(ch)
            prompt = tokenizer.encode("Hello there")
            for max_tokens, n, reason in ((100, 64 - 1 - len(prompt), "context"), (0, 0, "length")):
                out = list(stub.Generate(pb.GenerateRequest(fingerprint=tokenizer.fingerprint, prompt=prompt,
                                                            max_tokens=max_tokens, ignore_eos=True), timeout=120))
                assert sum(len(c.tokens) for c in out) == n and out[-1].done and out[-1].finish_reason == reason
    finally:
        d.stop()
