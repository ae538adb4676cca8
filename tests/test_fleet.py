"""The fleet model (sim/fleet.py) against hand-computed cases."""
from __future__ import annotations

import argparse
import math
from collections import Counter

import pytest

from common.rates import stream_rate
from kernels.speculation_rate import expected_tokens
from sim import fleet as F
from sim.latency import TARGETS, LatencyProfile

# A linear target ignores the KV cache, so its pass times are exact closed forms.
LIN = LatencyProfile("lin", 0.070, 0.0019, "test: t(n) = 70 ms + 1.9 ms * n")
IDEAL = F.Link("ideal", 0.0, 0.0, math.inf, math.inf)      # no delay, no serialisation
LONG = dict(warmup_s=2.0, window_s=60.0)


def device(t_draft: float = 0.0128, accept: float = 1.0, link: F.Link = IDEAL) -> F.Device:
    return F.Device(link, t_draft, accept)


def fixed(g: int, w: int):
    return lambda dev, target: F.Plan("picospec", g, w, 0.0)


# -- cloud-only: one token per session per pass ------------------------------------------------
def test_one_cloud_only_session_on_an_idle_replica_gets_one_over_t1():
    r = F.simulate([device()], 1, LIN, "cloud-only", **LONG)
    assert r.rates[0] == pytest.approx(1 / LIN.forward_s(1), rel=0.005)        # 13.97 tok/s
    assert r.tokens_per_pass == 1


@pytest.mark.parametrize("n", [2, 8, 32])
def test_n_cloud_only_sessions_get_one_over_tn_each(n):
    r = F.simulate([device()] * n, 1, LIN, "cloud-only", **LONG)
    assert len(r.rates) == n
    for rate in r.rates:
        assert rate == pytest.approx(1 / LIN.forward_s(n), rel=0.005)
    assert r.tokens_per_pass == n and r.utilisation == pytest.approx(1.0, abs=0.01)


def test_cloud_only_on_the_roofline_target_prices_the_growing_kv_cache():
    t = TARGETS["qwen3-32b-a100"]
    r = F.simulate([device()] * 16, 1, t, "cloud-only", warmup_s=0.5, window_s=10.0)
    # 16 sessions of 512 + (up to ~150) tokens of context: between t(16, 16·512) and t(16, 16·700)
    lo, hi = 1 / t.forward_s(16, 16 * 700), 1 / t.forward_s(16, 16 * 512)
    assert all(lo * 0.99 <= x <= hi * 1.01 for x in r.rates)


def test_the_token_budget_splits_sessions_over_passes():
    # 300 one-token steps under a budget of 100 tokens: a third of the sessions per pass, oldest first
    r = F.simulate([device()] * 300, 1, LIN, "cloud-only", budget=100, warmup_s=1.0, window_s=20.0)
    assert r.tokens_per_pass == pytest.approx(100, abs=0.5)
    assert sum(r.rates) == pytest.approx(100 / LIN.forward_s(100), rel=0.01)


# -- requests: the capacity bench's protocol -----------------------------------------------------
def test_a_request_prefills_its_prompt_then_streams_its_tokens():
    """A 600-token prompt goes in chunks of 64 tokens a pass, as the scheduler cuts it: nine of
    64 and one of 24, the last gives the first token; the 9 others take a one-token pass each.
    The stream rate leaves the prefill out, as the bench's does."""
    r = F.simulate([device()], 1, LIN, "cloud-only", requests=F.Requests((600,), 10))
    prefill = 9 * LIN.forward_s(64) + LIN.forward_s(24)
    assert r.window_s == pytest.approx(prefill + 9 * LIN.forward_s(1))
    assert r.rates == pytest.approx([1 / LIN.forward_s(1)])
    assert r.aggregate_tokens_per_s == pytest.approx(r.rates[0])


def test_prompts_share_a_pass_and_decodes_go_first():
    """Two 100-token prompts advance side by side, a chunk of 64 each a pass (128, then 72
    tokens); then both decode together, 2 tokens a pass. With a 700-token prompt beside two
    10-token ones: pass 1 takes 10 + 10 + 64, passes 2-10 the two decodes and 64 more of the
    long prompt, pass 11 the decodes and its last 60 (its first token), pass 12 the short
    ones' last tokens and the long one's first decode; then 1 token a pass."""
    t = LIN.forward_s
    r = F.simulate([device()] * 2, 1, LIN, "cloud-only", requests=F.Requests((100, 100), 5))
    assert r.window_s == pytest.approx(t(128) + t(72) + 4 * t(2))
    assert r.rates == pytest.approx([1 / t(2)] * 2)
    f = F.Fleet([device()] * 3, 1, LIN, "cloud-only", F.Admission(), 0.0, F.REQUEST_HORIZON_S, 0,
                requests=F.Requests((10, 10, 700), 12))
    f.replicas[0].prompts.sort(key=lambda s: s.prefill_left)   # arrival order: the long prompt last
    f.run()
    rates = sorted(stream_rate(s.stamps) for s in f.sessions)
    short = 11 / (9 * t(66) + t(62) + t(3))          # slowed by the long prompt's chunks
    long = 11 / (t(3) + 10 * t(1))
    assert rates == pytest.approx([short, short, long])


def test_a_replayed_session_meets_its_rejections_where_the_run_did():
    """A device with a measured accept path: stop-and-wait blocks of 4, the first output token
    from the prompt's pass. A "0" at output position 3 rejects the first block there (two
    accepted and the correction: 4 tokens), so 6 tokens take two verify passes; with no "0"
    the first block yields 4 and the bonus (6 tokens), and one suffices. No draw decides:
    every seed runs the same."""
    def passes(path: str, seed: int) -> tuple[int, list]:
        dev = F.Device(IDEAL, 0.0128, 0.5, path=path)
        f = F.Fleet([dev], 1, LIN, "picospec", F.Admission(), 0.0, F.REQUEST_HORIZON_S, seed,
                    plan_of=fixed(4, 1), lead=False, requests=F.Requests((20,), 6))
        f.run()
        assert f.sessions[0].generated == 6
        return f.replicas[0].passes, f.sessions[0].stamps
    rejected = [passes("1110" + "1" * 20, seed) for seed in range(3)]
    accepted = [passes("1" * 24, seed) for seed in range(3)]
    assert {p for p, _ in rejected} == {1 + 2} and {p for p, _ in accepted} == {1 + 1}
    assert rejected[0][1] == rejected[1][1] == rejected[2][1]
    # without a path, acceptance 0.5 is drawn: seeds differ
    drawn = {tuple(passes(None, seed)[1]) for seed in range(6)}
    assert len(drawn) > 1


@pytest.mark.parametrize("mode", ["cloud-only", "picospec"])
def test_every_request_ends_with_exactly_its_tokens(mode):
    devs = [device(accept=a) for a in (0.0, 0.5, 0.9, 1.0)]
    f = F.Fleet(devs, 1, LIN, mode, F.Admission(), 0.0, F.REQUEST_HORIZON_S, 0, plan_of=fixed(4, 2),
                requests=F.Requests((50, 60, 70, 80), 33))
    f.run()
    assert all(s.done and s.generated == 33 and len(s.stamps) == 33 for s in f.sessions)
    # nothing is queued for a finished session
    assert not f.replicas[0].queue and not f.replicas[0].prompts


def test_requests_need_a_prompt_per_device():
    with pytest.raises(ValueError, match="2 prompts for 3 devices"):
        F.simulate([device()] * 3, 1, LIN, "cloud-only", requests=F.Requests((5, 5), 4))


# -- picospec ------------------------------------------------------------------------------------
@pytest.mark.parametrize("t_draft", [0.050, 0.005])
def test_picospec_with_full_acceptance_and_no_rtt_runs_at_the_slower_of_drafting_and_verifying(t_draft):
    """a = 1, RTT 0, g = 4, W = 2: the edge drafts the next block while one is verified, so a
    block of g tokens lands every max(g·t_d, t(g)). Its bonus token is the next block's first
    position, so g per block, not g + 1."""
    g = 4
    r = F.simulate([device(t_draft)], 1, LIN, "picospec", plan_of=fixed(g, 2), **LONG)
    expect = g / max(g * t_draft, LIN.forward_s(g))      # 20.0 (draft-bound), 51.5 (verify-bound)
    assert r.rates[0] == pytest.approx(expect, rel=0.01)
    # the replica is busy t(g) of every block's cycle: 39 % while the edge drafts slower, 100 % else
    assert r.utilisation == pytest.approx(LIN.forward_s(g) / max(g * t_draft, LIN.forward_s(g)), rel=0.01)


def test_stop_and_wait_with_full_acceptance_gets_the_bonus_every_cycle():
    """W = 1: draft g, send (RTT/2 + bytes/rate), verify g + 1 (the previous bonus, carried),
    answer (RTT/2 + bytes/rate); g + 1 tokens a cycle."""
    g, td = 4, 0.010
    link = F.Link("slow", 0.05, 0.05, 1000.0, 1000.0)       # 100 ms RTT, 1000 bytes/s each way
    up = 0.05 + (F.BLOCK_BYTES + F.TOKEN_BYTES * (g + 1)) / 1000.0       # 0.105 s
    down = 0.05 + F.VERDICT_BYTES / 1000.0                               # 0.084 s
    cycle = g * td + up + LIN.forward_s(g + 1) + down                    # 0.3085 s
    r = F.simulate([device(td, link=link)], 1, LIN, "picospec", plan_of=fixed(g, 1), **LONG)
    assert r.rates[0] == pytest.approx((g + 1) / cycle, rel=0.01)        # 16.2 tok/s


def test_picospec_with_no_acceptance_yields_one_token_a_round_trip():
    """a = 0: every block is rejected at its first token, yielding the correction; the edge then
    restarts: draft a short block (3), send, verify 3 + 1 (the carried correction), answer."""
    td = 0.010
    link = F.Link("rtt", 0.025, 0.025, math.inf, math.inf)
    cycle = 3 * td + 0.025 + LIN.forward_s(4) + 0.025
    r = F.simulate([device(td, accept=0.0, link=link)], 1, LIN, "picospec", plan_of=fixed(6, 4), lead=False,
                   **LONG)
    assert r.rates[0] == pytest.approx(1 / cycle, rel=0.01)


def test_a_leading_verifier_never_leaves_a_session_below_streaming():
    """a = 0 with cloud lead: after the first rejection the verifier decodes on alone, one token
    a pass; every lead token kills the edge's branch (its draft there never matches), so each
    new block arrives for a dead branch and is dropped, and the session streams at 1 / t(1)."""
    link = F.Link("rtt", 0.025, 0.025, math.inf, math.inf)
    r = F.simulate([device(0.010, accept=0.0, link=link)], 1, LIN, "picospec", plan_of=fixed(6, 4), **LONG)
    assert r.rates[0] == pytest.approx(1 / LIN.forward_s(1), rel=0.01)


def test_a_session_that_is_never_rejected_never_leads():
    """a = 1: a lead token always matches the edge's draft there, so the branch lives and its
    block skips the led positions; nothing is ever rejected, so no lead starts at all and the
    rate is the lead-free one."""
    g, td = 4, 0.010
    link = F.Link("rtt", 0.025, 0.025, math.inf, math.inf)
    with_lead = F.simulate([device(td, link=link)], 1, LIN, "picospec", plan_of=fixed(g, 1), **LONG)
    without = F.simulate([device(td, link=link)], 1, LIN, "picospec", plan_of=fixed(g, 1), lead=False, **LONG)
    assert with_lead.rates[0] == pytest.approx(without.rates[0], rel=1e-9)


def test_lead_keeps_a_mid_acceptance_session_above_its_lead_free_rate():
    """a = 0.7 over a 50 ms RTT: the lead fills the refill after each rejection with tokens."""
    link = F.Link.named("picospec-wan")
    d = F.Device(link, 0.0128, 0.7)
    t = TARGETS["qwen3-32b-a100"]
    with_lead = F.simulate([d], 1, t, "picospec", plan_of=fixed(4, 3), warmup_s=1.0, window_s=120.0)
    without = F.simulate([d], 1, t, "picospec", plan_of=fixed(4, 3), lead=False, warmup_s=1.0, window_s=120.0)
    assert with_lead.rates[0] > 1.05 * without.rates[0]


def test_expected_tokens_per_block_hand_computed():
    # a = 0.5, g = 2: P(0 accepted) = .5 -> 1 token, P(1) = .25 -> 2, P(2) = .25 -> 3 (bonus) or 2
    assert expected_tokens(0.5, 2, bonus=True) == pytest.approx(0.5 * 1 + 0.25 * 2 + 0.25 * 3)   # 1.75
    assert expected_tokens(0.5, 2, bonus=False) == pytest.approx(0.5 * 1 + 0.25 * 2 + 0.25 * 2)  # 1.5
    assert expected_tokens(1.0, 5, bonus=True) == 6 and expected_tokens(0.0, 5, bonus=True) == 1


def test_drawn_acceptance_gives_the_expected_tokens_per_block():
    """Stop-and-wait, RTT 0: a cycle is g·t_d + t(g + carried); over many cycles the tokens per
    cycle average E_bonus(g) = (1 - a^(g+1)) / (1 - a)."""
    g, td, a = 4, 0.010, 0.8
    r = F.simulate([device(td, accept=a)], 1, LIN, "picospec", plan_of=fixed(g, 1), warmup_s=1.0,
                   window_s=400.0, seed=3, lead=False)
    e = expected_tokens(a, g, bonus=True)              # 3.36
    # every cycle after the first carries a correction or bonus: g + 1 tokens to verify
    assert r.rates[0] == pytest.approx(e / (g * td + LIN.forward_s(g + 1)), rel=0.03)


@pytest.mark.parametrize("link,dev,workload", [("wifi", "jetson-orin", "humaneval"), ("lte", "jetson-orin", "chat"),
                                               ("lte", "jetson-orin-1b", "humaneval"), ("3g", "jetson-orin", "mtbench")])
def test_one_picospec_session_is_near_what_the_planner_predicts(link, dev, workload):
    """The planner's closed form (idle verifier) and the DES agree within 15 % for one session,
    without cloud lead (the closed form's lead term counts every led token as a gain; the DES
    also lets a lead token kill the branch, and comes out below it)."""
    d = next(x for x in F.population(360) if (x.link.name, x.device, x.workload) == (link, dev, workload))
    t = TARGETS["qwen3-32b-a100"]
    p = F.plan(d, t, lead=False)
    assert p.mode == "picospec"
    r = F.simulate([d], 1, t, "picospec", warmup_s=1.0, window_s=120.0, lead=False)
    assert r.rates[0] == pytest.approx(p.predicted_tokens_per_s, rel=0.15)


def test_the_planner_streams_where_speculation_cannot_pay():
    t = TARGETS["qwen3-32b-a100"]
    sat = F.Device(F.Link.named("satellite"), 0.0345, 0.77)     # 600 ms RTT, a 1B drafter, chat
    assert F.plan(sat, t, lead=False).mode == "cloud-only"
    r = F.simulate([sat], 1, t, "picospec", warmup_s=1.0, window_s=20.0, lead=False)
    assert r.picospec_sessions == 0 and r.rates[0] == pytest.approx(1 / t.forward_s(1), rel=0.02)


# -- the fleet: mix, balancer, admission ---------------------------------------------------------
def test_population_follows_the_shares():
    """Each share within 1 % of the fleet (cells round: 0.05 x 0.7 / 3 of 360 is 4.2 devices)."""
    devs = F.population(360)
    for attr, mix in (("device", F.DEVICE_MIX), ("workload", F.WORKLOADS)):
        counts = Counter(getattr(d, attr) for d in devs)
        assert set(counts) == {s.name for s in mix}
        assert all(abs(counts[s.name] - 360 * s.weight) <= 3.6 for s in mix), counts
    links = Counter(d.link.name for d in devs)
    assert all(abs(links[s.name] - 360 * s.weight) <= 3.6 for s in F.LINK_MIX), links
    assert {d.accept for d in devs} == {0.904, 0.813, 0.77}
    assert F.population(360) == devs                                   # no random draws
    # interleaved: every tenth device (a replica the balancer fills in turn) has nearly the same mix
    tenth = Counter(d.link.name for d in devs[::10])
    assert all(abs(tenth[s.name] - 36 * s.weight) <= 2 for s in F.LINK_MIX), tenth


def test_least_sessions_balancer_and_max_sessions():
    r = F.simulate([device()] * 10, 3, LIN, "cloud-only", warmup_s=0.5, window_s=20.0)
    assert r.admitted == 10 and r.refused == 0
    full = F.simulate([device()] * 10, 3, LIN, "cloud-only", F.Admission(max_sessions=3), warmup_s=0.5,
                      window_s=2.0)
    assert full.admitted == 9 and full.refused == 1
    # 10 sessions as 4 + 3 + 3: the four on the fuller replica are slower
    rates = sorted(r.rates)
    assert rates[:4] == pytest.approx([1 / LIN.forward_s(4)] * 4, rel=0.01)
    assert rates[4:] == pytest.approx([1 / LIN.forward_s(3)] * 6, rel=0.01)


def test_admits_hand_computed():
    assert F.admits(0, F.Admission())
    assert F.admits(2, F.Admission(max_sessions=3)) and not F.admits(3, F.Admission(max_sessions=3))
    slo = F.Admission(slo_tokens_per_s=10.0, target=LIN, slo_headroom=0.0)
    # 1/t(n) >= 10 <=> 70 + 1.9 n <= 100 ms <=> n <= 15.8: the 15th session is admitted, the 16th not
    assert F.admits(14, slo) and not F.admits(15, slo)
    # a picospec session putting 5 tokens in a pass and getting 3 out: 3 / (70 + 1.9·5n) ms >= 10
    spec = F.Admission(slo_tokens_per_s=10.0, target=LIN, step_tokens=5, yield_tokens=3, slo_headroom=0.0)
    assert F.admits(23, spec) and not F.admits(24, spec)      # n = 24: 298 ms; n = 25: 307.5 ms
    # with 25 % headroom, as the verifier: 1/t(n) >= 12.5 <=> t(n) <= 80 ms <=> n <= 5.26
    aimed = F.Admission(slo_tokens_per_s=10.0, target=LIN, slo_headroom=0.25)
    assert F.admits(4, aimed) and not F.admits(5, aimed)


# -- sizing ---------------------------------------------------------------------------------------
def test_search_finds_the_largest_passing_count():
    calls = []

    def fake(n):        # p10 = 100 / n: SLO 10 holds up to n = 10
        calls.append(n)
        return argparse.Namespace(p10=100 / n)
    assert F.max_sessions_per_replica(10, fake) == 10
    assert len(calls) <= 2 * math.ceil(math.log2(10)) + 2
    assert F.max_sessions_per_replica(200, fake) == 0
    assert F.max_sessions_per_replica(0.001, fake, limit=64) == 64


def test_search_on_the_model_matches_the_closed_form_and_is_monotone():
    """Cloud-only on the linear target: 1/t(n) >= SLO <=> n <= (1/SLO - a) / b: 38 at 7 tok/s,
    15 at 10 tok/s, 5 at 12.5 tok/s (t(5) = 79.5 ms, t(6) = 81.4 ms), none at 14.5 (t(1) = 71.9 ms)."""
    def one(n):
        return F.replica_sample(n, LIN, "cloud-only", min_sessions=n, devices_of=lambda k: [device()] * k,
                                warmup_s=1.0, window_s=60.0)
    per = {slo: F.max_sessions_per_replica(slo, one) for slo in (7.0, 10.0, 12.5, 14.5)}
    assert per == {7.0: 38, 10.0: 15, 12.5: 5, 14.5: 0}
    replicas = [F.replicas_needed(10_000, per[s]) for s in (7.0, 10.0, 12.5)]
    assert replicas == sorted(replicas) and F.replicas_needed(10_000, 0) is None
    assert [F.replicas_needed(d, 15) for d in (1, 15, 16, 10_000)] == [1, 1, 2, 667]


def test_cost_per_million_tokens_hand_computed():
    # 10 replicas x 2 GPUs x $2/h = $40/h for 1000 tok/s = 3.6M tok/h: $11.11 per million
    assert F.cost_per_million_tokens(10, 2, 2.0, 1000.0) == pytest.approx(40 / 3.6)
    assert F.cost_per_million_tokens(1, 1, 2.0, 0.0) is None


def test_default_table_names_a_source_for_every_entry():
    rows = F.default_table()
    assert {r["kind"] for r in rows} == {"workload (acceptance)", "device (draft step, s)", "link (RTT, s)"}
    assert all(r["source"] and r["value"] is not None for r in rows)
    by_kind = Counter()
    for r in rows:
        by_kind[r["kind"]] += r["share"]
    assert all(v == pytest.approx(1.0) for v in by_kind.values())


def test_a_mix_from_the_command_line_is_normalised_and_checked():
    mix = F.parse_mix("wifi=3, lte=1", {"wifi", "lte", "3g"}, "link")
    assert [(s.name, s.weight) for s in mix] == [("wifi", 0.75), ("lte", 0.25)]
    assert [s.weight for s in F.parse_mix("wifi", {"wifi"}, "link")] == [1.0]
    for bad, why in (("wifi=x", "not NAME=SHARE"), ("moon=1", "unknown link 'moon'"), ("wifi=0", "must be > 0"),
                     ("", "empty")):
        with pytest.raises(ValueError, match=why):
            F.parse_mix(bad, {"wifi"}, "link")
    devs = F.population(20, links=F.parse_mix("wifi=1", {"wifi"}, "link"),
                        devices=F.parse_mix("jetson-orin=1", {"jetson-orin"}, "device"))
    assert {(d.link.name, d.device) for d in devs} == {("wifi", "jetson-orin")}
