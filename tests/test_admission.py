"""`cloud-verifier --slo-tokens-per-s`: admission by the cost model, on the real daemon.

The verifier emulates Llama-70B with the linear profile t(n) = 0.142 + 0.0029 n s, so the
model's decisions are a line of arithmetic (tests/test_admission_model.py). With an SLO
of 5 tokens/s and sessions at the prior (1 token from an 8-token pass), two sessions keep
1 / (0.142 + 0.0029 * 16) = 5.31 tokens/s and three would get 4.73: the third is refused.
Every decision comes from the profile and the acceptance fed to the verifier, never
from a clock, so a slow or loaded machine reaches the same ones.
"""
from __future__ import annotations

import re
import urllib.request

import grpc
import pytest

from cloud.admission import PRIOR_BLOCK, PRIOR_TAU, SloAdmission, SloMissed
from cloud.session import Codec, Limits, Session
from common.procs import free_port, start_cloud
from kernels import packing
from kernels.sampling import SamplingConfig
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from sim.admission import Demand, predict
from sim.latency import TARGETS

PROFILE = "llama-70b-a100-linear"
SLO = 5.0
PROMPT = "Hello there"


def allowed_at_prior(kv: int) -> int:
    """Sessions at the prior that the model says keep the SLO together."""
    k = 0
    while predict(TARGETS[PROFILE], [Demand(PRIOR_TAU, PRIOR_BLOCK, kv)] * (k + 1)).min_rate >= SLO:
        k += 1
    return k


class Verifier:
    """A real verifier daemon (emulating PROFILE unless told None) with its metrics."""

    def __init__(self, *extra: str, emulate: str | None = PROFILE):
        self.metrics_port = free_port()
        self.daemon = start_cloud("--threads", "1", *(("--emulate-target", emulate) if emulate else ()),
                                  "--metrics", f"127.0.0.1:{self.metrics_port}", *extra)
        self.channel = grpc.insecure_channel(self.daemon.address)
        self.stub = pb_grpc.VerifierStub(self.channel)

    def open(self, tokenizer) -> pb.OpenReply:
        return self.stub.Open(pb.OpenRequest(fingerprint=tokenizer.fingerprint, prompt=tokenizer.encode(PROMPT)),
                              timeout=120)

    def close(self, r: pb.OpenReply) -> None:
        self.stub.Close(pb.CloseRequest(session=r.session), metadata=(("tandem-session-key", r.session_key),),
                        timeout=60)

    def metric(self, name: str, labels: str = "") -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
        assert m, f"{name}{labels} not in /metrics"
        return float(m.group(1))

    def stop(self) -> None:
        self.channel.close()
        self.daemon.stop()


@pytest.fixture()
def slo_verifier():
    v = Verifier("--slo-tokens-per-s", str(SLO), "--slo-headroom", "0")
    yield v
    v.stop()


def refused(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert dict(e.value.trailing_metadata()).get("retry-after-ms") == "2000"
    return e.value


def test_the_session_past_what_the_model_allows_is_refused_until_one_closes(slo_verifier, tokenizer):
    v = slo_verifier
    k = allowed_at_prior(len(tokenizer.encode(PROMPT)))
    assert k == 2, "the profile and SLO were chosen for two sessions (module docstring)"
    held = [v.open(tokenizer) for _ in range(k)]
    err = refused(lambda: v.open(tokenizer))
    assert "SLO" in err.details() and "4.73 tokens/s" in err.details(), err.details()
    assert v.metric("tandem_verifier_slo_tokens_per_s") == SLO
    assert v.metric("tandem_verifier_predicted_min_tokens_per_s") == pytest.approx(1 / (0.142 + 0.0029 * 16))
    # even the smallest pass that holds a block (max draft 32 + 2) misses 5 tokens/s at tau 1
    assert v.metric("tandem_verifier_batch_budget_tokens") == 34
    assert v.metric("tandem_verifier_refusals_total", '{code="RESOURCE_EXHAUSTED"}') == 1

    # a cloud-only stream puts 1 token in a pass: 17 tokens keep 1 / 0.1913 = 5.23 tokens/s
    gen = pb.GenerateRequest(fingerprint=tokenizer.fingerprint, prompt=tokenizer.encode(PROMPT), max_tokens=2)
    out = list(v.stub.Generate(gen, timeout=120))
    assert out[-1].done and sum(len(c.tokens) for c in out) == 2

    v.close(held.pop(0))
    held.append(v.open(tokenizer))                    # closing one admits again
    refused(lambda: v.open(tokenizer))
    for r in held:
        v.close(r)


def test_measured_acceptance_replaces_the_prior(slo_verifier, tokenizer):
    """A session whose whole block is accepted gains 8 tokens from a 7-token pass; that
    becomes every unmeasured session's prior, and far more sessions keep 5 tokens/s."""
    v = slo_verifier
    prompt = tokenizer.encode(PROMPT)
    a, b = v.open(tokenizer), v.open(tokenizer)
    refused(lambda: v.open(tokenizer))
    # the target's own greedy continuation, from a cloud-only stream (admitted: see above)
    gen = pb.GenerateRequest(fingerprint=tokenizer.fingerprint, prompt=prompt, max_tokens=7, ignore_eos=True)
    cont = [t for c in v.stub.Generate(gen, timeout=120) for t in c.tokens]
    assert len(cont) == 7
    block = pb.Draft(epoch=0, start=len(prompt), tokens=packing.pack_tokens(cont, 2), want_bonus=True)
    verdicts = list(v.stub.Speculate(iter([block]), timeout=120,
                                     metadata=(("tandem-session", a.session), ("tandem-session-key", a.session_key))))
    assert sum(x.accepted for x in verdicts) == 7           # the stream's end also ends session a
    more = [v.open(tokenizer) for _ in range(3)]            # b and three more: 8 / (0.142 + 0.0029 * 28)
    # the stream's passes measured how much slower than the model this verifier serves (>= 1:
    # how much depends on this machine), and every pass time is scaled by it
    slow = v.metric("tandem_verifier_slo_slowdown")
    assert slow >= 1.0
    assert v.metric("tandem_verifier_predicted_min_tokens_per_s") == pytest.approx(8 / (slow * (0.142 + 0.0029 * 28)))
    for r in [b, *more]:
        v.close(r)


def test_a_prompt_needs_room_beside_every_decode(tokenizer):
    """At 3.8 tokens/s a pass may carry 41 tokens (0.142 + 0.0029 * 41 = 0.261 s), and a
    waiting prompt keeps 20 of them. Sessions at the prior put 8 tokens each in a pass:
    two (16 + 20 = 36) are admitted; a third would keep 4.73 tokens/s, but its prompt's
    chunk beside 24 decode tokens passes the budget (44 > 41), so it is refused, where
    the rate alone admitted five. No stream has run, so no measured slowdown enters."""
    v = Verifier("--slo-tokens-per-s", "3.8", "--slo-headroom", "0")
    try:
        held = [v.open(tokenizer) for _ in range(2)]
        assert v.metric("tandem_verifier_batch_budget_tokens") == 41
        assert v.metric("tandem_verifier_slo_slowdown") == 1.0
        err = refused(lambda: v.open(tokenizer))
        assert "24 tokens of a pass and a prompt chunk" in err.details(), err.details()
        for r in held:
            v.close(r)
    finally:
        v.stop()


def test_the_edge_waits_out_an_slo_refusal_as_it_does_a_full_verifier(slo_verifier, drafter, tokenizer):
    """One admission path: the edge retries after the retry-after-ms it is sent, then
    gives a clear error; once a session closes it is admitted and speculates."""
    from edge.agent import Agent
    from edge.client import CloudError, VerifierClient
    from tests.test_faults import OnLog, spec_config
    v = slo_verifier
    prompt = tokenizer.encode(PROMPT)
    held = [v.open(tokenizer) for _ in range(2)]
    client = VerifierClient(v.daemon.address)
    agent = lambda retries: Agent(client, drafter, tokenizer.fingerprint, tokenizer.n_vocab,  # noqa: E731
                                  tokenizer.eos, busy_retries=retries)
    try:
        # first, while no pass has taught the verifier a better prior than 1 token a pass
        with pytest.raises(CloudError) as e:
            agent(1).generate(prompt, spec_config(8))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "still full after 1 retries" in str(e.value) and "SLO" in str(e.value)
        with OnLog("verifier full", lambda: v.close(held.pop())):
            c = agent(3).generate(prompt, spec_config(8))
        assert c.stats.busy_retries == 1 and c.stats.segments == [{"mode": "picospec", "tokens": 8}]
    finally:
        client.close()
        for r in held:
            v.close(r)


def test_by_default_admission_aims_above_the_slo(tokenizer):
    """The default 10 % headroom: at 5 tokens/s decisions aim at 5.5, so the second
    session at the prior (5.31 tokens/s with two, module docstring) is refused where
    --slo-headroom 0 admits it, and the error says what was aimed at."""
    v = Verifier("--slo-tokens-per-s", str(SLO))
    try:
        held = v.open(tokenizer)
        err = refused(lambda: v.open(tokenizer))
        assert "5.31 tokens/s" in err.details() and "aiming at 5.5 with 10% headroom" in err.details(), err.details()
        v.close(held)
    finally:
        v.stop()


def test_without_the_flag_admission_is_unchanged(tokenizer):
    v = Verifier()
    try:
        held = [v.open(tokenizer) for _ in range(4)]       # past what the SLO above allowed
        assert v.metric("tandem_verifier_slo_tokens_per_s") == 0
        assert v.metric("tandem_verifier_batch_budget_tokens") == 0
        for r in held:
            v.close(r)
    finally:
        v.stop()


def test_a_real_target_is_priced_by_the_pass_time_it_measured(tokenizer):
    """No emulation: the start-up measurement prices passes. Only SLOs no machine can miss
    or meet are used, so the outcome never depends on how fast this one is (a pass takes
    at least 0.1 ms as measured, so no session gains 10^9 tokens/s)."""
    for slo, admitted in [("1e9", False), ("1e-3", True)]:
        v = Verifier("--slo-tokens-per-s", slo, emulate=None)
        try:
            assert v.metric("tandem_verifier_predicted_min_tokens_per_s") == float("inf")
            if admitted:
                v.close(v.open(tokenizer))
            else:
                assert "SLO" in refused(lambda: v.open(tokenizer)).details()
        finally:
            v.stop()


# -- the verifier's bookkeeping, driven without a model --------------------------------
def session(sid: str, tokens: int, passes: int = 0, pass_tokens: int = 0, gained: int = 0) -> Session:
    s = Session(sid, 0, SamplingConfig(), Codec.P, Limits(49152, 2048, 32, 2))
    s.tokens = list(range(tokens))
    s.count.passes, s.count.pass_tokens, s.count.gained = passes, pass_tokens, gained
    return s


def test_demands_come_from_each_sessions_passes_or_the_prior():
    line = TARGETS[PROFILE]
    adm = SloAdmission(SLO, line, cap=256, floor=34)
    fresh, stream = session("a", 10), session("g", 20)
    adm.admitted(stream, streaming=True)
    assert adm.demand(fresh) == Demand(PRIOR_TAU, PRIOR_BLOCK, 10)
    assert adm.demand(stream) == Demand(1.0, 1, 20)
    measured = session("m", 40, passes=4, pass_tokens=20, gained=12)
    assert adm.demand(measured) == Demand(3.0, 5.0, 40)
    # a speculative pass anywhere moves the prior of every unmeasured speculative session
    adm.observe(measured, 6, 4, speculative=True)
    adm.observe(stream, 1, 1, speculative=False)
    assert adm.demand(fresh) == Demand(4 / 1, 6 / 1, 10) and adm.demand(stream) == Demand(1.0, 1, 20)

    # held: tau 4, b 6 (fresh) and tau 1, b 1 (stream): 7 tokens, slowest 1 / (0.142 + 0.0029 * 7)
    budget = adm.refresh([fresh, stream])
    assert adm.now.min_rate == pytest.approx(1 / (0.142 + 0.0029 * 7))
    assert budget == 34 and adm.status() == {"slo_tokens_per_s": SLO, "slo_headroom": 0.0, "batch_budget": 34,
                                             "slowdown": 1.0,
                                             "predicted_min_tokens_per_s": round(1 / 0.1623, 3)}
    adm.check([fresh, stream], adm.prior(True, 5))          # one more stream: 8 tokens, 6.09 tokens/s
    with pytest.raises(SloMissed, match="under the 5 tokens/s"):
        adm.check([fresh, stream] + [session(f"s{i}", 5) for i in range(9)], adm.prior(True, 5))
    assert adm.refresh([]) == 256 and adm.status()["predicted_min_tokens_per_s"] is None


class Clock:
    """Explicit observation times for SloAdmission (never this machine's)."""

    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def streaming(adm: SloAdmission, sid: str, kv: int) -> Session:
    s = session(sid, kv, passes=1, pass_tokens=1, gained=1)
    s.n_past = kv                               # decoding: nothing left of its prompt
    adm.admitted(s, streaming=True)
    return s


LOW = 3.8     # tokens/s: t(n) <= 1 / 3.8 = 0.2632 s up to n = 41, so budgets stay above a small floor


def test_streams_slower_than_the_model_tighten_admission():
    """Four streams (1 token a pass each) on t(n) = 0.142 + 0.0029 n: a 4-token pass is
    0.1536 s, 6.51 tokens/s each, and a fifth stream is predicted at 1 / 0.1565 = 6.39.
    Fed intervals of three times the pass, the slowdown is 1 + 0.2 * (3 - 1) = 1.4 after
    one pass and 1.4 + 0.2 * (3 - 1.4) = 1.72 after two: the budget that keeps 3.8 tokens/s
    shrinks from 41 to 15 (0.142 + 0.0029 n <= 1 / (3.8 * 1.4)), and the fifth stream is
    refused at 6.39 / 1.72 = 3.71 tokens/s, which the bare model admits."""
    clock = Clock()
    adm = SloAdmission(LOW, TARGETS[PROFILE], cap=256, floor=2, clock=clock)
    held = [streaming(adm, f"g{i}", 20) for i in range(4)]
    adm.refresh(held)
    assert adm.pass_s == pytest.approx(0.1536) and adm.slowdown.value == 1.0 and adm.budget == 41

    def a_pass(interval: float) -> None:
        clock.t += interval
        for s in held:
            adm.observe(s, 1, 1, speculative=False)
        adm.refresh(held)
    a_pass(0.0)
    assert adm.slowdown.value == 1.0, "a stream's first pass is no interval"
    a_pass(3 * 0.1536)
    assert adm.slowdown.value == pytest.approx(1.4) and adm.budget == 15
    assert adm.now.min_rate == pytest.approx(1 / (1.4 * 0.1536))
    adm.check(held, adm.prior(True, 5))          # 6.39 / 1.4 = 4.56: still admitted
    a_pass(3 * 0.1536)
    assert adm.slowdown.value == pytest.approx(1.72)
    with pytest.raises(SloMissed, match=r"slowest at 3\.71 tokens/s \(1\.72x the modelled pass time"):
        adm.check(held, adm.prior(True, 5))
    bare = SloAdmission(LOW, TARGETS[PROFILE], cap=256, floor=2)
    bare.check(held, bare.prior(True, 5))        # the bare model admits it
    assert adm.status()["slowdown"] == pytest.approx(1.72)


def test_speculative_intervals_never_move_the_slowdown():
    """A speculative session's interval holds its link and drafter: not the verifier's."""
    clock = Clock()
    adm = SloAdmission(LOW, TARGETS[PROFILE], cap=256, floor=2, clock=clock)
    spec = session("s", 40, passes=2, pass_tokens=16, gained=6)
    spec.n_past = 40
    adm.refresh([spec])
    for _ in range(5):
        clock.t += 10.0
        adm.observe(spec, 8, 3, speculative=True)
        adm.refresh([spec])
    assert adm.slowdown.value == 1.0


def test_the_pass_a_stream_is_measured_against_holds_waiting_prompts():
    """Two decoding streams and a session still to prefill 100 prompt tokens: the
    scheduler fills the pass up to the budget (41) with the prompt, so an interval is set
    against t(41) = 0.2609 s, not t(2). A stream that saw 0.2609 s has a slowdown of 1:
    the prompt was in the model."""
    clock = Clock()
    adm = SloAdmission(LOW, TARGETS[PROFILE], cap=256, floor=2, clock=clock)
    a, b = streaming(adm, "a", 30), streaming(adm, "b", 30)
    fresh = session("p", 100)                    # n_past 0, no pass yet: 100 prompt tokens to go
    adm.admitted(fresh, streaming=True)
    adm.refresh([a, b, fresh])
    assert adm.budget == 41 and adm.pass_s == pytest.approx(0.142 + 0.0029 * 41)
    adm.observe(a, 1, 1, speculative=False)
    clock.t += 0.2609
    adm.observe(a, 1, 1, speculative=False)
    adm.refresh([a, b, fresh])
    assert adm.slowdown.value == pytest.approx(1.0)
    fresh.n_past = 100                           # prefilled: the next pass is the decodes alone
    adm.refresh([a, b, fresh])
    assert adm.pass_s == pytest.approx(0.142 + 0.0029 * 3)


def test_the_slowest_streams_own_ratio_sets_the_slowdown():
    """Four streams on 4-token passes (0.1536 s): three are in every pass, one only in
    every other (its intervals are twice the pass). Pass by pass the mean ratio is 1, 1.25,
    1, 1.25, ...: folded over eight passes, 1.1156. The slow stream's own ratio is 2, and
    that is what its SLO depends on."""
    clock = Clock()
    adm = SloAdmission(LOW, TARGETS[PROFILE], cap=256, floor=2, clock=clock)
    held = [streaming(adm, f"g{i}", 20) for i in range(4)]
    adm.refresh(held)
    for s in held:
        adm.observe(s, 1, 1, speculative=False)
    start = clock.t
    for k in range(1, 9):
        clock.t = start + k * 0.1536
        for s in held[:3] + (held[3:] if k % 2 == 0 else []):
            adm.observe(s, 1, 1, speculative=False)
        adm.refresh(held)
    assert adm.slowdown.value == pytest.approx(1.1155872)
    assert adm.slow() == pytest.approx(2.0) and adm.status()["slowdown"] == 2.0
    assert adm.now.min_rate == pytest.approx(1 / (2 * 0.1536))
    adm.refresh(held[:3])                        # the slow one ended: the others' own ratios are 1
    assert adm.slow() == pytest.approx(1.1155872)


def test_a_stream_asks_one_token_a_pass_whatever_its_prompt_step_counted():
    """A stream's first step carries its prompt and is counted as one of its passes: 70
    tokens, then 1 a pass. Priced by its counters it would put 24 tokens in each pass
    after three (72 / 3); it puts in 1."""
    adm = SloAdmission(LOW, TARGETS[PROFILE], cap=256, floor=2)
    g = session("g", 73, passes=3, pass_tokens=72, gained=3)
    adm.admitted(g, streaming=True)
    assert adm.demand(g) == Demand(1.0, 1, 73)
