"""Lead tokens on the wire: the verifier decodes alone while no block is
queued, and blocks that overlap its lead tokens are checked against them.
Raw gRPC against the real verifier, greedy, so every token is predictable
from the target's own greedy output."""
from __future__ import annotations

import queue

import grpc
import pytest

from kernels import packing
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc

PROMPT = "Name three colours."


class Stream:
    """A Speculate call whose requests the test sends one at a time."""

    def __init__(self, stub, reply):
        self._q: queue.Queue = queue.Queue()
        self.responses = stub.Speculate(iter(self._q.get, None), metadata=(
            ("tandem-session", reply.session), ("tandem-session-key", reply.session_key)))

    def send(self, epoch, start, tokens):
        self._q.put(pb.Draft(epoch=epoch, start=start, tokens=packing.pack_tokens(tokens, 2)))

    def recv(self) -> pb.Verdict:
        return next(self.responses)

    def close(self) -> list[pb.Verdict]:
        self._q.put(None)
        return list(self.responses)


@pytest.fixture()
def opened(cloud, tokenizer, reference):
    ch = grpc.insecure_channel(cloud.address)
    stub = pb_grpc.VerifierStub(ch)
    prompt = tokenizer.encode(PROMPT)
    ref, _ = reference.greedy(prompt, 8)

    def open_lead(max_tokens, in_reply=False):
        r = stub.Open(pb.OpenRequest(fingerprint=tokenizer.fingerprint, prompt=prompt, lead=True,
                                     max_tokens=max_tokens, ignore_eos=True, lead_in_reply=in_reply))
        assert r.HasField("lead_token") == in_reply
        s = Stream(stub, r)
        s.reply = r
        return s

    yield open_lead, len(prompt), ref
    ch.close()


def test_first_lead_comes_with_the_open_reply_and_the_stream_goes_on_after_it(opened):
    open_lead, n, ref = opened
    s = open_lead(3, in_reply=True)
    assert s.reply.lead_token == ref[0]
    leads = [s.recv() for _ in range(2)]
    assert [(v.start, v.token) for v in leads] == [(n + 1, ref[1]), (n + 2, ref[2])]
    assert s.close() == [], "no lead past max_tokens"


def test_leads_are_the_targets_own_tokens_and_stop_at_max_tokens(opened):
    open_lead, n, ref = opened
    s = open_lead(3)
    leads = [s.recv() for _ in range(3)]
    assert all(v.lead for v in leads)
    assert [v.start for v in leads] == [n, n + 1, n + 2]
    assert [v.token for v in leads] == ref[:3]
    assert s.close() == [], "no lead past max_tokens"


def test_block_overlapping_matching_leads_is_verified_from_where_they_end(opened):
    open_lead, n, ref = opened
    s = open_lead(2)
    assert [s.recv().token for _ in range(2)] == ref[:2]
    s.send(0, n, ref[:5])                       # 2 positions already led, 3 left to verify
    v = s.recv()
    assert not v.lead and v.epoch == 0 and v.start == n
    assert v.accepted == 5, "led positions count as accepted, the rest passes the greedy test"
    s.close()


def test_block_contradicting_a_lead_is_dropped_and_the_epoch_moves_on(opened):
    open_lead, n, ref = opened
    s = open_lead(2)
    assert [s.recv().token for _ in range(2)] == ref[:2]
    wrong = (ref[1] + 1) % 49152
    s.send(0, n, [ref[0], wrong, ref[2]])       # the edge's branch died at position n+1
    s.send(0, n + 3, [ref[3]])                  # a follow-up of the dead branch: stale
    s.send(1, n + 2, [ref[2], ref[3]])          # the new branch, from after the lead tokens
    out = s.close()
    assert len(out) == 1, f"only the new branch is answered, got {out}"
    assert out[0].epoch == 1 and out[0].start == n + 2 and out[0].accepted == 2


def test_block_entirely_inside_the_leads_gets_no_answer(opened):
    open_lead, n, ref = opened
    s = open_lead(3)
    assert [s.recv().token for _ in range(3)] == ref[:3]
    s.send(0, n, ref[:2])
    s.send(0, n + 2, ref[2:5])                  # overlaps one lead, then verified
    out = s.close()
    assert len(out) == 1 and out[0].start == n + 2 and out[0].accepted == 3
