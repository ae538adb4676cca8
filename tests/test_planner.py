"""The edge's cost model: what it learns from verdicts and what it predicts."""
from __future__ import annotations

import random

import pytest

from edge.planner import AcceptRate, Planner


def simulate_blocks(est, alpha: float, gamma: int, n: int, seed: int = 0) -> tuple[int, int]:
    rng = random.Random(seed)
    drafted = accepted = 0
    for _ in range(n):
        k = 0
        while k < gamma and rng.random() < alpha:
            k += 1
        est.add(k, k + (k < gamma))
        drafted, accepted = drafted + gamma, accepted + k
    return drafted, accepted


def test_accept_rate_is_per_position_whatever_the_block_length():
    for gamma in (2, 8, 16):
        est = AcceptRate(prior=0.5, decay=0.999)
        drafted, accepted = simulate_blocks(est, 0.75, gamma, 3000, seed=gamma)
        assert abs(est.value - 0.75) < 0.03, (gamma, est.value)
        if gamma >= 8:
            assert accepted / drafted < 0.4, "accepted/drafted would have been far off"


def planner(**kw):
    base = dict(pipelined=True, t_draft_s=0.013, rtt_s=0.05, verify_a_s=0.070, verify_b_s=0.0019,
                ar_token_s=0.0719, prior_accept=0.75)
    base.update(kw)
    return Planner(**base)


def test_leading_verifier_never_predicts_much_below_cloud_only():
    cloud = 1 / 0.0719
    for a in (0.05, 0.3, 0.6):
        p = planner(lead=True, prior_accept=a)
        assert p.plan().spec_rate >= 0.85 * cloud, a
        assert p.plan().spec_rate >= planner(lead=False, prior_accept=a).plan().spec_rate


def test_pipelining_beats_stop_and_wait_on_a_wan_at_good_acceptance():
    pipe = planner(prior_accept=0.85).plan()
    sync = planner(pipelined=False, prior_accept=0.85).plan()
    assert pipe.window > 1 and pipe.spec_rate > sync.spec_rate
    assert sync.window == 1


def test_auto_codec_picks_q_where_leading_through_rejections_pays():
    """Codec P idles the verifier for a round trip per rejection (the edge draws the
    correction); Q leads through it. auto weighs that with the last session's measurements."""
    import dataclasses

    from edge.codec import Codec
    from edge.config import GenConfig
    from edge.picospec import choose_codec
    from kernels.sampling import SamplingConfig
    sampled = GenConfig(sampling=SamplingConfig(temperature=0.7, top_p=0.9))
    vocab = 49152
    wan = planner(lead=True, lead_after_rtt=True, prior_accept=0.77)
    assert choose_codec(sampled, vocab, wan) == Codec.Q
    assert choose_codec(sampled, vocab, planner(lead=True, rtt_s=0.001, prior_accept=0.77)) == Codec.P  # no round trip to save
    assert choose_codec(sampled, vocab, planner(lead=True, prior_accept=0.97)) == Codec.P    # rejections are rare
    assert choose_codec(sampled, vocab, None) == Codec.P                                     # nothing measured yet: bytes
    assert choose_codec(dataclasses.replace(sampled, cloud_lead=False), vocab, wan) == Codec.P
    assert choose_codec(dataclasses.replace(sampled, mode="sync"), vocab, wan) == Codec.P
    assert choose_codec(GenConfig(), vocab, wan) == Codec.P                                  # greedy
    assert choose_codec(dataclasses.replace(sampled, codec="P"), vocab, wan) == Codec.P
    assert wan.plan().spec_rate == wan.plan(lead_after_rtt=True).spec_rate < wan.plan(lead_after_rtt=False).spec_rate


def test_starting_needs_a_predicted_gain_keeping_on_only_a_near_tie():
    from edge.planner import Plan
    cloud = 60.0
    assert Plan(3, 2, 0.95 * cloud, cloud).speculate and not Plan(3, 2, 0.95 * cloud, cloud).worth_starting
    assert Plan(3, 2, 1.01 * cloud, cloud).worth_starting
    assert not Plan(3, 2, 0.85 * cloud, cloud).speculate


def test_a_loaded_verifier_slows_streaming_as_much_as_verification():
    """Many sessions share one verifier's passes: blocks verified 3x slower than the
    verifier advertised at Open mean its streaming would be 3x slower too, so
    speculation is not abandoned for a cloud-only rate the loaded verifier cannot give."""
    p = planner(lead=True)
    alone = p.plan()
    for _ in range(40):
        p.observe_block(4, 3, round_trip_s=0.05 + 3 * 0.0776, verify_s=3 * (0.070 + 0.0019 * 4))
    loaded = p.plan()
    assert abs(loaded.cloud_rate - alone.cloud_rate / 3) < 0.05 * alone.cloud_rate
    assert loaded.speculate and loaded.spec_rate / loaded.cloud_rate > 0.9 * alone.spec_rate / alone.cloud_rate


def test_trees_only_where_the_measured_yield_beats_the_chain():
    p = planner(lead=True, tree="auto")
    p.sibling_gain.hits, p.sibling_gain.sent = 0.0, 100.0          # siblings never taken
    plan = p.plan()
    assert plan.tree_budget == 0 and plan.spec_rate == plan.chain_rate
    p.sibling_gain.hits = 40.0                                      # 0.4 tokens per sibling
    plan = p.plan()
    assert plan.tree_budget > 0 and plan.spec_rate > plan.chain_rate
    assert planner(lead=True, tree="off").plan().tree_budget == 0


def test_tree_always_sends_at_least_one_sibling_even_when_it_does_not_pay():
    p = planner(lead=True, tree="always")
    p.sibling_gain.hits, p.sibling_gain.sent = 0.0, 100.0
    plan = p.plan()
    assert plan.tree_budget >= 1 and plan.spec_rate <= plan.chain_rate


def test_sibling_gain_is_measured_per_sibling_sent():
    p = planner(tree="auto")
    for _ in range(200):
        p.observe_siblings(1, 4)
    assert abs(p.sibling_gain.value - 0.25) < 0.01


def test_siblings_that_slow_the_verifier_down_are_priced_out():
    """A verifier whose tree passes cost 40 ms more per sibling (a CPU copying branches)
    makes auto go back to chains, however often siblings are taken."""
    p = planner(lead=True, tree="auto")
    p.sibling_gain.hits, p.sibling_gain.sent = 30.0, 100.0
    assert p.plan().tree_budget > 0                                 # priced at one token's b
    for _ in range(20):
        p.observe_block(4, 3, 0.2, 0.070 + 0.0019 * 4 + 0.040 * 2, siblings=2)
    assert abs(p.sibling_s.value - 0.040) < 0.002
    assert p.plan().tree_budget == 0


def test_a_session_that_really_runs_slower_than_cloud_only_stops_and_the_next_does_not_start():
    p = planner()                                   # predicted well above cloud-only (13.9 tok/s)
    assert p.plan().speculate and p.plan().worth_starting
    p.observe_progress(0, 10.0)                     # first verdict
    p.observe_progress(8, 11.0)                     # too few tokens to judge yet
    assert p.realized_rate is None and p.plan().speculate
    p.observe_progress(20, 12.0)                    # 20 tokens in 2 s: 10 tok/s, below 0.9 x 13.9
    assert p.realized_rate == 10.0
    plan = p.plan()
    assert plan.spec_rate > plan.cloud_rate         # the model still says it pays ...
    assert not plan.speculate and not plan.worth_starting   # ... what it really got says not


def test_a_session_that_really_pays_keeps_speculating():
    p = planner()
    p.observe_progress(3, 5.0)
    p.observe_progress(43, 7.0)                     # 20 tok/s
    assert p.plan().speculate and p.plan().worth_starting


def test_a_session_that_held_on_below_cloud_only_does_not_start_the_next():
    p = planner()
    p.observe_progress(0, 0.0)
    p.observe_progress(26, 2.0)                     # 13 tok/s: above 0.9 x 13.9, below 13.9
    assert p.plan().speculate                       # keeps going: switching costs too
    assert not p.plan().worth_starting              # but the next session streams from the start


def test_a_session_whose_start_cost_more_than_its_steady_gain_does_not_start_the_next():
    p = planner(started=0.0)
    p.observe_progress(0, 1.0)                      # the first verdict a second after the request
    p.observe_progress(30, 3.0)                     # steady 15 tok/s, but 30 tokens in 3 s: 10
    plan = p.plan()
    assert plan.realized_rate == 15.0 and plan.session_rate == 10.0
    assert plan.speculate and not plan.worth_starting


def test_one_slow_draft_step_does_not_price_the_next_session():
    """A draft step that stalled (a catch-up, a device pause) is one sample among many: the
    planner's draft time is their median, so the next session is still judged on 13 ms steps."""
    from edge.planner import WindowMedian
    t = WindowMedian(0.013)
    for _ in range(100):
        t.add(0.013)
    t.add(1.04)
    assert t.value == pytest.approx(0.013)
    for _ in range(15):
        t.add(0.2)                       # the device really got slower: the window follows
    assert t.value == pytest.approx(0.2)
