"""The edge's protocol state without a model: `Speculator` driven by a drafter whose logits
are made up and a scripted stream standing in for the verifier. Both models are bigram
tables (the next token after each token; a token not in the table is followed by token + 1),
so every expectation follows from the tables each test writes down. Seconds.

The stand-in verifier (`FakeCloud`) judges each block it is sent as the real one does
(cloud/session.py): accepted drafts up to the target's first other choice, then the target's
token; blocks of an old epoch are dropped unanswered; with leading on, a block's positions
already decided by lead tokens are overlap (counted in `accepted`), a block that contradicts
them is dropped and breaks the branch. It answers only when the edge waits for it (its
window is full, or it has drafted all it may), unless a test scripts otherwise, so the
order of events in each test is fixed.
"""
from __future__ import annotations

import time
from collections import deque

import grpc
import numpy as np
import pytest

from edge import agent as agent_mod
from edge.agent import Agent
from edge.client import ByteCounter, CloudError
from edge.codec import Codec
from edge.config import GenConfig
from edge.drafter import Drafter
from edge.picospec import Speculator
from edge.planner import Planner
from edge.reconnect import Backoff
from edge.stats import GenStats
from kernels import packing
from kernels.rejection import PPayload
from kernels.sampling import SamplingConfig
from proto import tandem_pb2 as pb

V = 64
EOS = 63
WIDTH = packing.token_width(V)
PROMPT = [1, 2, 3]
GREEDY = SamplingConfig()
TOP1 = SamplingConfig(temperature=1.0, top_k=1, seed=7)   # sampled, but every distribution is one-hot

pytestmark = pytest.mark.timeout(30)      # a state machine that loops fails here, not after 10 minutes


def follow(table: dict[int, int], last: int) -> int:
    return table.get(last, last + 1)


def row(token: int) -> np.ndarray:
    x = np.zeros(V, np.float32)
    x[token] = 4.0
    return x


class FakeDrafter(Drafter):
    """A KV 'cache' that is the token list; logits put the argmax at the table's next token."""

    def __init__(self, table: dict[int, int]):
        self.table, self.tokens, self.truncations = table, [], []

    @property
    def n_vocab(self) -> int:
        return V

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def eval(self, tokens):
        assert tokens, "eval needs at least one token"
        self.tokens += list(tokens)
        return row(follow(self.table, self.tokens[-1]))

    def truncate(self, n_past: int) -> None:
        self.truncations.append(n_past)
        del self.tokens[n_past:]


class FakeCloud:
    """The verifier's side of the protocol over a bigram target."""

    def __init__(self, prompt: list[int], table: dict[int, int], sampled: bool, lead: bool):
        self.tokens, self.table, self.sampled, self.lead_on = list(prompt), table, sampled, lead
        self.epoch = 0
        self.queue: deque[pb.Draft] = deque()
        self.dropped: list[pb.Draft] = []

    def choice(self) -> int:
        return follow(self.table, self.tokens[-1])

    def receive(self, d: pb.Draft) -> None:
        assert not d.more_tail, "a one-hot payload never runs out of tail draws"
        self.queue.append(d)

    def lead(self) -> pb.Verdict:
        tok = self.choice()
        v = pb.Verdict(epoch=self.epoch, start=len(self.tokens), token=tok, lead=True)
        self.tokens.append(tok)
        return v

    def answer(self) -> list[pb.Verdict]:
        """The verdict for the oldest queued block that gets one (others are dropped)."""
        while self.queue:
            d = self.queue.popleft()
            v = self._verify(d)
            if v is not None:
                return [v]
            self.dropped.append(d)
        return []

    def _verify(self, d: pb.Draft) -> pb.Verdict | None:
        assert d.epoch <= self.epoch, "the edge is never ahead of the verifier's epoch"
        if d.epoch < self.epoch:
            return None
        ids = packing.unpack_tokens(d.tokens, WIDTH)
        chain = ids[d.fixed:]
        if d.fixed:
            assert d.start == len(self.tokens), "the correction goes where the verifier stopped"
            self.tokens += ids[:d.fixed]
        first = d.start + d.fixed
        overlap = len(self.tokens) - first
        assert overlap >= 0 and (overlap == 0 or self.lead_on), (d.start, self.tokens)
        if overlap:
            if chain[:overlap] != self.tokens[first:first + overlap]:
                self.epoch += 1                  # the branch died at a lead token
                return None
            if len(chain) <= overlap:
                return None                      # every position already decided
        n = overlap
        while n < len(chain) and chain[n] == self.choice():
            self.tokens.append(chain[n])
            n += 1
        v = pb.Verdict(epoch=d.epoch, start=d.start, accepted=n, verify_us=1000)
        if n < len(chain):
            self.epoch += 1
            if self.sampled:                     # codec P: p goes down, the edge draws the correction
                v.p_payload = packing.pack_payload(PPayload([self.choice()], [1.0], [], []), WIDTH)
            else:
                v.token = self.choice()
                self.tokens.append(v.token)
        elif d.want_bonus:
            v.token = self.choice()
            self.tokens.append(v.token)
        return v


def state(spec: Speculator) -> dict:
    return {"out": list(spec.out), "epoch": spec.epoch, "context": list(spec.context),
            "in_flight": [(b.epoch, b.start, b.end) for b in spec.in_flight],
            "drafter": list(spec.drafter.tokens), "truncations": list(spec.drafter.truncations)}


class FakeStream:
    """A DraftStream whose verdicts come from `cloud`, in the order a script says.

    recv with timeout 0 (the edge may draft) delivers what has arrived, else nothing; a
    scripted `at_poll` entry (predicate on the Speculator, message) arrives at the first poll
    where its predicate holds. recv with a timeout (the edge waits) takes script events until
    something arrives: "answer" (the verifier answers the next block; the default once the
    script is used up), "lead" (it decides the next position alone), a Verdict as is, an
    exception (the stream fails, for good, as the real client's reader does), or None
    (nothing within the timeout).
    Every delivered message is kept with the Speculator's state just before and just after
    it handled it (`delivered`)."""

    def __init__(self, cloud: FakeCloud, events=(), at_poll=()):
        self.cloud, self.events, self.at_poll = cloud, deque(events), deque(at_poll)
        self.sent: list[pb.Draft] = []
        self.inbox: deque = deque()
        self.delivered: list[dict] = []
        self.failed: Exception | None = None
        self.spec: Speculator | None = None
        self.closed = False

    def send(self, d: pb.Draft) -> None:
        assert not self.closed
        self.sent.append(d)
        self.cloud.receive(d)

    def recv(self, timeout=None):
        spec = self.spec
        if spec is not None:
            # the drafter holds exactly what the edge says it has seen
            assert spec.drafter.tokens == spec.context[:spec.drafter.n_past], (spec.drafter.tokens, spec.context)
            if self.delivered and "after" not in self.delivered[-1]:
                self.delivered[-1]["after"] = state(spec)
        if self.failed is not None:
            raise self.failed
        if timeout == 0:
            if not self.inbox and self.at_poll and self.at_poll[0][0](spec):
                self._take(self.at_poll.popleft()[1])
        else:
            while not self.inbox:
                ev = self.events.popleft() if self.events else "answer"
                if ev is None or (isinstance(ev, str) and ev == "answer" and not self.cloud.queue):
                    return None                  # nothing arrives in time
                self._take(ev)
        if not self.inbox:
            return None
        msg = self.inbox.popleft()
        if spec is not None:
            self.delivered.append({"msg": msg, "before": state(spec)})
        return msg

    def _take(self, ev) -> None:
        if isinstance(ev, Exception):
            self.failed = ev
            raise ev
        if isinstance(ev, str) and ev == "answer":
            self.inbox.extend(self.cloud.answer())
        elif isinstance(ev, str) and ev == "lead":
            self.inbox.append(self.cloud.lead())
        else:
            assert isinstance(ev, pb.Verdict), ev
            self.inbox.append(ev)

    def close(self) -> None:
        self.closed = True

    def blocks(self) -> list[tuple]:
        """(epoch, start, token ids, fixed, want_bonus) of every block sent."""
        return [(d.epoch, d.start, packing.unpack_tokens(d.tokens, WIDTH), d.fixed, d.want_bonus)
                for d in self.sent]


def cfg(mode="picospec", gamma=3, window=2, max_tokens=12, lead=False, sampling=GREEDY, **kw) -> GenConfig:
    return GenConfig(mode=mode, codec="P", gamma=gamma, window=window, adaptive=False, cloud_lead=lead,
                     tree="off", max_tokens=max_tokens, sampling=sampling, **kw)


def speculator(c: GenConfig, draft: dict | None = None, target: dict | None = None, events=(), at_poll=(),
               prompt=PROMPT):
    """A Speculator as edge/agent.py builds one, over the fakes."""
    drafter = FakeDrafter(draft or {})
    first = drafter.prefill(prompt)
    drafter.truncations.clear()
    lead = c.pipelined and c.cloud_lead
    cloud = FakeCloud(prompt, target or {}, sampled=not c.sampling.greedy, lead=lead)
    stream = FakeStream(cloud, events, at_poll)
    planner = Planner(c.pipelined, 0.001, 0.02, 0.005, 0.001, 0.01, gamma=c.gamma, window=c.window, lead=lead)
    got: list[int] = []
    spec = Speculator(stream, drafter, prompt, c, Codec.P, WIDTH, EOS, planner, None, got.extend,
                      GenStats(mode=c.mode), time.monotonic(), first, tree_branches=0, max_draft=64)
    stream.spec = spec
    return spec, stream, drafter, got


def verdicts(stream: FakeStream) -> list[dict]:
    return [d for d in stream.delivered if not d["msg"].lead]


# -- chains, T=0 ---------------------------------------------------------------------------------
def test_blocks_carry_the_drafters_argmaxes_and_a_full_accept_commits_them():
    # drafter and target both continue 3 -> 4 -> 5 -> ...
    spec, stream, drafter, got = speculator(cfg(gamma=3, window=2, max_tokens=6))
    out = spec.run()
    assert stream.blocks() == [(0, 3, [4, 5, 6], 0, False),    # window 2: no bonus asked, a block follows
                               (0, 6, [7, 8, 9], 0, False)]
    assert out == got == [4, 5, 6, 7, 8, 9]
    v1, v2 = verdicts(stream)
    assert v1["msg"].accepted == 3 and not v1["msg"].HasField("token")
    assert v1["after"]["out"] == [4, 5, 6] and v1["after"]["in_flight"] == [(0, 6, 9)]
    s = spec.stats
    assert (s.blocks, s.drafted, s.accepted, s.verified, s.rejections, s.tokens) == (2, 6, 6, 6, 0, 6)
    assert spec.epoch == 0 and drafter.truncations == []


def test_stop_and_wait_asks_for_the_bonus_and_continues_from_the_targets_token():
    # the target's token after 6 is 20, which the drafter would not have drafted (7)
    spec, stream, drafter, got = speculator(cfg(mode="sync", gamma=3, max_tokens=8), target={6: 20})
    out = spec.run()
    assert stream.blocks() == [(0, 3, [4, 5, 6], 0, True),
                               (0, 7, [21, 22, 23], 0, True)]   # drafted after the bonus 20
    assert out == got == [4, 5, 6, 20, 21, 22, 23, 24]          # 24: the second block's bonus
    assert spec.stats.accepted == 6 and spec.stats.rejections == 0 and spec.epoch == 0
    assert drafter.tokens[:7] == PROMPT + [4, 5, 6, 20], "the bonus went into the drafter's cache"


def rejection_run(events=()):
    # drafter 4 -> 5 -> 6 ...; the target takes 4, then 10 where 5 was drafted, then agrees again
    spec, stream, drafter, got = speculator(cfg(gamma=4, window=2, max_tokens=12), target={4: 10},
                                            events=events)
    return spec, stream, drafter, got, spec.run()


def test_rejection_commits_the_prefix_and_correction_rolls_back_and_starts_a_new_epoch():
    spec, stream, drafter, got, out = rejection_run()
    first = verdicts(stream)[0]
    assert (first["msg"].epoch, first["msg"].start, first["msg"].accepted, first["msg"].token) == (0, 3, 1, 10)
    # before: block 1 (positions 3..5, short: the first after a break) and block 2 (6..9) in flight
    assert first["before"]["in_flight"] == [(0, 3, 6), (0, 6, 10)]
    after = first["after"]
    assert after["out"] == [4, 10] and after["epoch"] == 1
    assert after["in_flight"] == [], "block 2 drafted past the rejection: dropped"
    assert after["context"] == PROMPT + [4, 10]
    assert after["truncations"] == [4] and after["drafter"] == PROMPT + [4], "cache rolled back to the committed 4"
    assert stream.blocks() == [
        (0, 3, [4, 5, 6], 0, False), (0, 6, [7, 8, 9, 10], 0, False),
        (1, 5, [11, 12, 13], 0, False),            # new epoch, from the correction, short again
        (1, 8, [14, 15, 16, 17], 0, False), (1, 12, [18, 19, 20], 0, False)]
    assert out == got == [4, 10] + list(range(11, 21))
    assert [packing.unpack_tokens(d.tokens, WIDTH) for d in stream.cloud.dropped] == [[7, 8, 9, 10]]
    s = spec.stats
    # tested: 4 (accepted) and 5 (rejected) of block 1, then all of blocks 3..5
    assert (s.rejections, s.accepted, s.verified, s.drafted) == (1, 1 + 10, 2 + 10, 17)


@pytest.mark.parametrize("stale", [
    pb.Verdict(epoch=0, start=6, accepted=4),              # "accepting" the dropped block 2
    pb.Verdict(epoch=0, start=6, accepted=0, token=30),    # "rejecting" it: would roll back
])
def test_verdict_of_an_old_epoch_is_ignored(stale):
    spec, stream, drafter, got, out = rejection_run(events=["answer", stale])
    hit = [d for d in stream.delivered if d["msg"] is stale]
    assert len(hit) == 1
    assert hit[0]["after"] == hit[0]["before"], "nothing committed, nothing rolled back"
    assert hit[0]["before"]["epoch"] == 1 and hit[0]["before"]["in_flight"] == [(1, 5, 8), (1, 8, 12)]
    assert out == [4, 10] + list(range(11, 21)) and spec.stats.rejections == 1


@pytest.mark.parametrize("bad, match", [
    (dict(start=4, accepted=1), "does not match"),        # not where the oldest block starts
    (dict(start=3, accepted=4), "does not match"),        # more accepted than drafted
    (dict(epoch=1, start=3, accepted=3), "ahead of this edge"),   # an epoch the edge never started
    (dict(start=3, accepted=3, token=50), "did not ask"),  # a bonus after a block with one behind it
])
def test_verdict_that_does_not_fit_the_oldest_block_is_a_protocol_error(bad, match):
    spec, stream, *_ = speculator(cfg(gamma=3, window=2, max_tokens=12),
                                  events=[pb.Verdict(**{"epoch": 0, **bad})])
    with pytest.raises(CloudError, match=match):
        spec.run()
    assert spec.out == []


# -- codec P at T>0 --------------------------------------------------------------------------------
def test_codec_p_rejection_draws_the_correction_and_sends_it_up_as_the_fixed_token():
    # one-hot p and q: the drafter's token is accepted iff the target wants it, and the
    # residual of a one-hot p is the target's token
    spec, stream, drafter, got = speculator(cfg(gamma=3, window=2, max_tokens=8, sampling=TOP1),
                                            target={4: 10})
    out = spec.run()
    first = verdicts(stream)[0]
    assert first["msg"].accepted == 1 and not first["msg"].HasField("token") and first["msg"].p_payload
    assert first["after"]["out"] == [4, 10] and first["after"]["epoch"] == 1
    assert spec.stats.tail_requests == 0
    blocks = stream.blocks()
    assert blocks[:2] == [(0, 3, [4, 5, 6], 0, False), (0, 6, [7, 8, 9], 0, False)]
    assert blocks[2] == (1, 4, [10, 11, 12, 13], 1, False), "correction 10 at 4 leads the next block"
    assert all(len(d.q) == len(packing.unpack_tokens(d.tokens, WIDTH)) - d.fixed for d in stream.sent)
    assert out == got == [4, 10, 11, 12, 13, 14, 15, 16]


# -- cloud lead ------------------------------------------------------------------------------------
def lead_cfg(**kw):
    return cfg(lead=True, gamma=3, window=2, **kw)


def test_lead_token_equal_to_the_draft_is_overlap_and_the_blocks_verdict_counts_it():
    spec, stream, drafter, got = speculator(lead_cfg(max_tokens=6), events=["lead", "answer"])
    out = spec.run()
    lead, v1, v2 = stream.delivered
    assert lead["msg"].lead and (lead["msg"].start, lead["msg"].token) == (3, 4)
    assert lead["after"]["out"] == [4] and lead["after"]["in_flight"] == [(0, 3, 6), (0, 6, 9)]
    assert lead["after"]["epoch"] == 0 and lead["after"]["truncations"] == [], "the branch lives"
    # the verifier verified block 1 past the led position: accepted counts it
    assert (v1["msg"].start, v1["msg"].accepted) == (3, 3)
    assert v1["after"]["out"] == [4, 5, 6], "4 committed once"
    assert out == got == [4, 5, 6, 7, 8, 9]
    s = spec.stats
    assert (s.leads, s.lead_checks, s.lead_hits, s.rejections) == (1, 1, 1, 0)
    assert (s.accepted, s.verified) == (5, 5), "the led draft is not the drafter's acceptance"
    assert all(not d.want_bonus for d in stream.sent), "with leading the verifier never sends a bonus"


def test_block_rejected_right_after_its_led_position_commits_only_the_correction():
    # the lead decides 4 (as drafted); the verifier then rejects 5 for 10: accepted == overlap
    spec, stream, drafter, got = speculator(lead_cfg(max_tokens=6), target={4: 10}, events=["lead", "answer"])
    out = spec.run()
    lead, v1 = stream.delivered[:2]
    assert (v1["msg"].accepted, v1["msg"].token) == (1, 10)
    assert v1["before"]["out"] == [4] and v1["after"]["out"] == [4, 10] and v1["after"]["epoch"] == 1
    assert v1["after"]["in_flight"] == [] and v1["after"]["drafter"] == PROMPT + [4]
    assert out == got == [4, 10, 11, 12, 13, 14]
    s = spec.stats
    assert (s.lead_hits, s.rejections) == (1, 1)
    assert (s.accepted, s.verified) == (0 + 4, 1 + 4), "5 was tested and rejected; 4 was led, not tested"


def test_lead_tokens_deciding_a_whole_block_retire_it_without_a_verdict():
    spec, stream, drafter, got = speculator(lead_cfg(max_tokens=6), events=["lead", "lead", "lead"])
    out = spec.run()
    assert [d["msg"].lead for d in stream.delivered[:3]] == [True] * 3
    assert stream.delivered[2]["after"]["in_flight"] == [(0, 6, 9)], "block 1 decided: no verdict comes"
    assert out == [4, 5, 6, 7, 8, 9] and stream.cloud.dropped and spec.stats.lead_hits == 3


def test_lead_token_other_than_the_draft_ends_the_branch():
    # the target's first token is 20 where the drafter drafted 4; both agree afterwards
    spec, stream, drafter, got = speculator(lead_cfg(max_tokens=6), target={3: 20}, events=["lead"])
    out = spec.run()
    lead = stream.delivered[0]
    assert lead["before"]["in_flight"] == [(0, 3, 6), (0, 6, 9)]
    after = lead["after"]
    assert after["out"] == [20] and after["epoch"] == 1 and after["in_flight"] == []
    assert after["context"] == PROMPT + [20] and after["drafter"] == PROMPT and after["truncations"] == [3]
    assert stream.blocks()[2:] == [(1, 4, [21, 22, 23], 0, False), (1, 7, [24, 25], 0, False)]
    assert out == got == [20, 21, 22, 23, 24, 25]
    s = spec.stats
    assert (s.leads, s.lead_checks, s.lead_hits, s.rejections) == (1, 1, 0, 1)


def test_lead_token_other_than_an_unsent_draft_rolls_back_in_the_same_epoch():
    # the lead arrives while block 1 is still being drafted: the verifier never saw it
    drafting = lambda s: s.cur is not None and len(s.cur.drafted) == 2
    spec, stream, drafter, got = speculator(lead_cfg(max_tokens=6), target={3: 20}, at_poll=[(drafting, "lead")])
    out = spec.run()
    lead = stream.delivered[0]
    assert lead["before"]["context"] == PROMPT + [4, 5] and lead["before"]["in_flight"] == []
    assert lead["after"]["epoch"] == 0 and lead["after"]["context"] == PROMPT + [20]
    assert lead["after"]["drafter"] == PROMPT and lead["after"]["truncations"] == [3]
    assert stream.blocks()[0] == (0, 4, [21, 22, 23], 0, False), "the half-drafted block was never sent"
    assert out == [20, 21, 22, 23, 24, 25] and spec.stats.rejections == 0


def test_lead_token_equal_to_an_unsent_draft_keeps_the_block():
    drafting = lambda s: s.cur is not None and len(s.cur.drafted) == 2
    spec, stream, drafter, got = speculator(lead_cfg(max_tokens=6), at_poll=[(drafting, "lead")])
    out = spec.run()
    assert stream.delivered[0]["after"]["out"] == [4]
    # the block keeps its start: the verifier counts position 3 as overlap
    assert stream.blocks()[0] == (0, 3, [4, 5, 6], 0, False)
    assert verdicts(stream)[0]["msg"].accepted == 3
    assert out == [4, 5, 6, 7, 8, 9] and spec.stats.accepted == 5


def test_first_lead_from_the_open_reply_starts_the_first_block_after_it():
    spec, stream, drafter, got = speculator(lead_cfg(max_tokens=4), target={3: 30})
    spec.take_first_lead(stream.cloud.lead().token)      # decided at Open: 30, where the drafter says 4
    assert spec.out == got == [30] and spec.stats.lead_checks == 0, "nothing drafted there yet"
    out = spec.run()
    assert stream.blocks()[0][:3] == (0, 4, [31, 32, 33])
    assert out == [30, 31, 32, 33]


def test_lead_for_another_position_is_a_protocol_error():
    spec, stream, *_ = speculator(lead_cfg(max_tokens=6),
                                  events=[pb.Verdict(epoch=0, start=4, token=5, lead=True)])
    with pytest.raises(CloudError, match="expected 3"):
        spec.run()


# -- the stream ending ---------------------------------------------------------------------------
def test_stream_closed_mid_generation_raises_what_the_agent_falls_back_on_and_keeps_commits():
    closed = CloudError(grpc.StatusCode.UNAVAILABLE, "verifier closed the stream")   # edge/client.py's _Reader
    spec, stream, drafter, got = speculator(cfg(gamma=3, window=2, max_tokens=12), target={4: 10},
                                             events=["answer", closed])
    with pytest.raises(CloudError) as e:
        spec.run()
    assert e.value is closed and e.value.code not in agent_mod.FATAL
    assert spec.out == got == [4, 10], "what the verifier committed before the close stays"
    assert [(b.epoch, b.start) for b in spec.in_flight] == [(1, 5), (1, 8)], "never committed"


def test_no_verdict_within_the_stall_timeout_raises_a_cloud_error():
    spec, stream, drafter, got = speculator(cfg(gamma=3, window=2, max_tokens=12, stall_timeout_s=7),
                                            events=["answer", None])
    with pytest.raises(CloudError, match="no verdict for 7 s") as e:
        spec.run()
    assert e.value.code not in agent_mod.FATAL
    assert spec.out == got == [4, 5, 6]


class FakeClient:
    """What Agent needs of a VerifierClient, with one Speculate stream scripted."""

    def __init__(self, stream_factory):
        self.stream_factory, self.bytes, self.target, self.accepts_zstd = stream_factory, ByteCounter(), "fake", False
        self.streams = []

    def probe(self, *a, **k):
        return False

    def open_async(self, req):
        return req

    def open_result(self, req):
        return pb.OpenReply(session="s", token_width=WIDTH, n_vocab=V, max_draft=64, verify_a_s=0.005,
                            verify_b_s=0.001, ar_token_s=0.01)

    def speculate(self, session):
        s = self.stream_factory()
        self.streams.append(s)
        return s


def test_agent_keeps_the_committed_tokens_and_finishes_edge_only_after_a_close():
    # the stream fails after the verifier's first verdict (4, then its correction 10)
    drafter = FakeDrafter({})
    agent = Agent(None, drafter, "fp", V, EOS, backoff=Backoff(base_s=60, max_s=60))
    holder = {}

    def make_stream():
        st = FakeStream(FakeCloud(PROMPT, {4: 10}, sampled=False, lead=False),
                        events=["answer", CloudError(grpc.StatusCode.UNAVAILABLE, "verifier closed the stream")])
        holder["stream"] = st
        return st

    agent.client = FakeClient(make_stream)
    c = agent.generate(PROMPT, cfg(gamma=3, window=2, max_tokens=6))
    # 4 and 10 came from the verifier; the drafter alone continues 10 -> 11 -> ...
    assert c.tokens == [4, 10, 11, 12, 13, 14]
    assert c.stats.segments == [{"mode": "picospec", "tokens": 2}, {"mode": "edge-only", "tokens": 4}]
    assert c.stats.fallback == "edge-only" and holder["stream"].closed


# -- stopping --------------------------------------------------------------------------------------
def test_max_tokens_stops_drafting_and_the_last_block_asks_for_no_bonus():
    spec, stream, drafter, got = speculator(cfg(gamma=3, window=2, max_tokens=5))
    out = spec.run()
    assert stream.blocks() == [(0, 3, [4, 5, 6], 0, False), (0, 6, [7, 8], 0, False)]
    assert out == [4, 5, 6, 7, 8] and spec.stats.drafted == 5
    assert drafter.tokens == PROMPT + [4, 5, 6, 7], "nothing evaluated past the last position wanted"


@pytest.mark.parametrize("max_tokens, bonus", [(3, False), (4, True)])
def test_stop_and_wait_asks_for_a_bonus_only_where_a_token_is_still_wanted(max_tokens, bonus):
    spec, stream, drafter, got = speculator(cfg(mode="sync", gamma=3, max_tokens=max_tokens))
    out = spec.run()
    assert stream.blocks()[0] == (0, 3, [4, 5, 6], 0, bonus)
    assert out == [4, 5, 6, 7][:max_tokens] and len(stream.sent) == 1


def test_drafted_eos_ends_the_block_and_drafting_until_it_is_decided():
    # both models end after 4
    spec, stream, drafter, got = speculator(cfg(gamma=3, window=2, max_tokens=12), draft={4: EOS},
                                            target={4: EOS})
    out = spec.run()
    assert stream.blocks() == [(0, 3, [4, EOS], 0, False)], "nothing drafted past the end"
    assert out == got == [4, EOS] and EOS not in drafter.tokens


def test_drafted_eos_the_target_rejects_lets_drafting_go_on():
    spec, stream, drafter, got = speculator(cfg(gamma=3, window=2, max_tokens=6), draft={4: EOS})
    out = spec.run()
    assert stream.blocks()[0] == (0, 3, [4, EOS], 0, False)
    assert stream.blocks()[1][:3] == (1, 5, [6, 7, 8])      # after the target's 5
    assert out == [4, 5, 6, 7, 8, 9]


def test_eos_from_the_verifier_ends_the_generation():
    # the drafter would go on; the target's correction after 5 is the end
    spec, stream, drafter, got = speculator(cfg(gamma=3, window=2, max_tokens=12), target={5: EOS})
    out = spec.run()
    assert out == got == [4, 5, EOS]
    assert len(stream.sent) == 2, "blocks in flight at the end are simply dropped"
