"""Admission by SLO, the math (sim/admission.py): predictions against hand-computed values."""
from __future__ import annotations

import math

import pytest

from sim.admission import (Demand, SessionRatios, Slowdown, admits, batch_budget, pass_tokens, predict,
                           prefill_chunk, scheduled_pass)
from sim.latency import TARGETS, LatencyProfile

# t(n) = 0.1 + 0.01 n seconds: every figure below is a line of arithmetic
LINE = LatencyProfile("test-line", 0.1, 0.01, "test")
SPEC = Demand(tau=2.0, tokens=5, kv=100)        # a speculative session: 2 tokens from a 5-token pass
CLOUD = Demand(tau=1.0, tokens=1, kv=50)        # a cloud-only stream


def test_batched_rate_is_the_slowest_tau_over_one_pass_of_every_token():
    p = predict(LINE, [SPEC, SPEC, CLOUD])
    # 5 + 5 + 1 = 11 tokens: t = 0.1 + 0.11 = 0.21 s; slowest tau 1: 1 / 0.21 tokens/s
    assert (p.pass_tokens, p.kv_tokens) == (11, 250)
    assert p.pass_s == pytest.approx(0.21) and p.min_rate == pytest.approx(1 / 0.21)
    # without the cloud-only stream the slowest gains 2 per pass of 10 tokens: 2 / 0.2 = 10
    assert predict(LINE, [SPEC, SPEC]).min_rate == pytest.approx(10.0)


def test_unbatched_rate_takes_a_round_of_one_pass_per_session():
    p = predict(LINE, [SPEC, SPEC, CLOUD], batched=False)
    # (0.1 + 0.05) + (0.1 + 0.05) + (0.1 + 0.01) = 0.41 s a round; the slowest gains 1 a round
    assert p.pass_s == pytest.approx(0.41) and p.min_rate == pytest.approx(1 / 0.41)
    assert p.pass_tokens == 5


def test_no_session_is_never_slow():
    assert predict(LINE, []).min_rate == math.inf


def test_fractional_mean_pass_sizes_round_up():
    assert pass_tokens([Demand(1, 2.5), Demand(1, 2.5), Demand(1, 0.2)]) == 6
    assert pass_tokens([Demand(1, 2.0), Demand(1, 3.0)]) == 5


@pytest.mark.parametrize("slo, admitted", [(4.5, True), (1 / 0.21, True), (4.8, False), (10.0, False)])
def test_admits_iff_every_session_keeps_the_slo(slo, admitted):
    ok, p = admits(LINE, [SPEC, SPEC], CLOUD, slo, cap=256)
    assert ok is admitted and p.min_rate == pytest.approx(1 / 0.21)


def test_a_pass_over_the_cap_is_refused_whatever_the_rate():
    assert admits(LINE, [SPEC, SPEC], CLOUD, 0.1, cap=11)[0]
    assert not admits(LINE, [SPEC, SPEC], CLOUD, 0.1, cap=10)[0]
    # one session per pass: the cap bounds each pass, never their sum
    assert admits(LINE, [SPEC, SPEC], CLOUD, 0.1, cap=10, batched=False)[0]


def test_seventy_b_admits_two_prior_sessions_at_five_tokens_per_s():
    """The figure tests/test_admission.py relies on: t(n) = 0.142 + 0.0029 n, sessions
    at the prior (1 token from an 8-token pass): 1 / (0.142 + 0.0029 * 16) = 5.31 tokens/s
    for two, 1 / (0.142 + 0.0029 * 24) = 4.73 for three."""
    p70 = TARGETS["llama-70b-a100-linear"]
    prior = Demand(1.0, 8, 10)
    assert predict(p70, [prior] * 2).min_rate == pytest.approx(1 / 0.1884)
    assert predict(p70, [prior] * 3).min_rate == pytest.approx(1 / 0.2116)
    assert admits(p70, [prior], prior, 5.0, 256)[0] and not admits(p70, [prior] * 2, prior, 5.0, 256)[0]


def test_a_roofline_target_is_priced_over_the_sessions_kv():
    q = TARGETS["qwen3-32b-a100"]
    short, long_ = Demand(2.0, 8, 512), Demand(2.0, 8, 30_000)
    assert predict(q, [short, short]).pass_s == pytest.approx(q.forward_s(16, 1024))
    assert predict(q, [short, long_]).pass_s == pytest.approx(q.forward_s(16, 30_512))
    assert predict(q, [short, long_]).min_rate < predict(q, [short, short]).min_rate


def test_batch_budget_is_the_largest_pass_that_keeps_the_slowest_at_the_slo():
    # tau 2 at 9.99 tokens/s: 0.1 + 0.01 n <= 2 / 9.99, so n <= 10.02: 10 tokens
    assert batch_budget(LINE, 2.0, 0, 9.99, cap=256, floor=3) == 10
    assert 2.0 / LINE.forward_s(10) >= 9.99 > 2.0 / LINE.forward_s(11)
    assert batch_budget(LINE, 2.0, 0, 9.99, cap=8, floor=3) == 8          # capped by --max-batch-tokens
    assert batch_budget(LINE, 2.0, 0, 1.0, cap=256, floor=3) == 190       # 2 / (0.1 + 0.01 * 190) = 1
    assert batch_budget(LINE, 2.0, 0, 0.5, cap=256, floor=3) == 256       # any pass keeps a low SLO
    assert batch_budget(LINE, 2.0, 0, 100.0, cap=256, floor=3) == 3       # none does: a block still fits


def test_batch_budget_on_a_roofline_target_matches_a_scan():
    q = TARGETS["llama-70b-a100"]
    for slo in (5.0, 6.0, 6.5):
        got = batch_budget(q, 1.0, 2048, slo, cap=256, floor=34)
        scan = max([n for n in range(34, 257) if 1.0 / q.forward_s(n, 2048) >= slo], default=34)
        assert got == scan, slo


def test_bad_inputs_are_refused():
    for bad in [dict(tau=0, tokens=1), dict(tau=1, tokens=0), dict(tau=1, tokens=1, kv=-1)]:
        with pytest.raises(ValueError):
            Demand(**bad)
    with pytest.raises(ValueError):
        batch_budget(LINE, 1.0, 0, 1.0, cap=2, floor=3)


# -- the corrections: a measured slowdown, and the candidate's prompt -----------------
def test_a_slowdown_scales_every_pass_time():
    p = predict(LINE, [SPEC, SPEC, CLOUD], slowdown=1.5)
    # 11 tokens: 0.21 s modelled, 0.315 s as served; the slowest gains 1 a pass
    assert p.pass_s == pytest.approx(0.315) and p.min_rate == pytest.approx(1 / 0.315)
    assert predict(LINE, [SPEC, SPEC, CLOUD], batched=False, slowdown=2.0).pass_s == pytest.approx(0.82)
    assert admits(LINE, [SPEC, SPEC], CLOUD, 4.5, cap=256)[0]
    assert not admits(LINE, [SPEC, SPEC], CLOUD, 4.5, cap=256, slowdown=1.1)[0]   # 4.33 tokens/s


def test_batch_budget_shrinks_with_the_slowdown():
    # tau 2 at 9.99 tokens/s, 1.25x slower: 0.1 + 0.01 n <= 2 / (9.99 * 1.25) = 0.16016: n <= 6
    assert batch_budget(LINE, 2.0, 0, 9.99, cap=256, floor=3, slowdown=1.25) == 6
    q = TARGETS["qwen3-32b-a100"]
    for slow in (1.0, 1.05, 1.3, 2.0):
        got = batch_budget(q, 1.0, 4096, 10.0, cap=256, floor=34, slowdown=slow)
        scan = max([n for n in range(34, 257) if 1.0 / (slow * q.forward_s(n, 4096)) >= 10.0], default=34)
        assert got == scan, slow


def test_prefill_chunk_is_half_the_budget_at_most_the_cap():
    assert [prefill_chunk(b, 64) for b in (1, 2, 41, 106, 256)] == [1, 1, 20, 53, 64]


def test_the_candidates_prompt_needs_a_chunk_of_room_beside_every_decode():
    """Held: two sessions of 2 tokens from 5; candidate: a stream. Every session keeps
    1 / 0.21 = 4.76 tokens/s, but the budget that keeps 4.5 is 12 tokens (0.1 + 0.01 * 12
    = 0.22 s), whose prompt chunk is 6: 11 decode tokens and 6 do not fit in 12."""
    assert admits(LINE, [SPEC, SPEC], CLOUD, 4.5, cap=256)[0]
    ok, p = admits(LINE, [SPEC, SPEC], CLOUD, 4.5, cap=256, chunk_cap=64)
    assert not ok and p.min_rate == pytest.approx(1 / 0.21)
    assert admits(LINE, [SPEC, SPEC], CLOUD, 4.5, cap=256, chunk_cap=1)[0]       # 11 + 1 = 12 fits
    assert admits(LINE, [SPEC], CLOUD, 4.5, cap=256, chunk_cap=64)[0]            # 6 + 6 = 12 fits


def _admits_by_scan(profile, demands, slo, cap, floor, slowdown, chunk_cap) -> bool:
    """A slow reference: the scheduler's rule pass by pass. The budget is the largest pass
    (a scan) keeping the slowest at slo; while a prompt waits, decodes get the budget less
    the chunk; every session must be in that pass and keep slo."""
    tau = min(d.tau for d in demands)
    kv = sum(d.kv for d in demands)
    rate = lambda n: tau / (slowdown * profile.forward_s(n, kv))      # noqa: E731
    budget = max([n for n in range(floor, cap + 1) if rate(n) >= slo], default=floor)
    chunk = max(1, min(chunk_cap, budget // 2))
    decodes = math.ceil(sum(d.tokens for d in demands) - 1e-9)
    return decodes <= cap and rate(decodes) >= slo and decodes <= budget - chunk


def test_admission_with_prompts_matches_the_scheduler_rule_by_scan():
    import random
    rnd = random.Random(7)
    q = TARGETS["qwen3-32b-a100"]
    seen = set()
    for _ in range(300):
        demands = [Demand(rnd.choice([1.0, 1.0, 2.5, 4.0]), rnd.choice([1, 1, 5, 9, 13]), rnd.randrange(50, 900))
                   for _ in range(rnd.randrange(1, 40))]
        slo, slow = rnd.choice([5.0, 10.0, 20.0]), rnd.choice([1.0, 1.1, 1.4])
        ok, _ = admits(q, demands[:-1], demands[-1], slo, cap=256, slowdown=slow, chunk_cap=64, floor=34)
        assert ok == _admits_by_scan(q, demands, slo, 256, 34, slow, 64), (demands, slo, slow)
        seen.add(ok)
    assert seen == {True, False}, "the draws cover both answers"


def test_the_scheduled_pass_fills_the_budget_with_waiting_prompts():
    assert scheduled_pass(32, 0, 100) == 32
    assert scheduled_pass(32, 500, 100) == 100
    assert scheduled_pass(32, 20, 100) == 52
    assert scheduled_pass(120, 500, 100) == 120          # decodes over the budget: no prompt fits


def test_the_slowdown_is_a_running_mean_of_each_passes_mean_ratio():
    s = Slowdown(weight=0.2)
    assert s.value == 1.0
    assert s.add([1.5, 2.5]) == pytest.approx(1.2)        # mean 2: 1 + 0.2 * (2 - 1)
    assert s.add([0.5]) == pytest.approx(1.16)            # under 1 counts as 1: 1.2 + 0.2 * (1 - 1.2)
    assert s.add([]) == pytest.approx(1.16) and s.passes == 2
    for _ in range(60):
        s.add([1.3, 1.3])
    assert s.value == pytest.approx(1.3, abs=1e-4)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            Slowdown(bad)


def test_each_sessions_ratio_is_its_real_time_over_its_modelled_time():
    r = SessionRatios(min_intervals=2)
    r.add("a", 0.2, 0.1)
    assert r.worst() == 1.0, "one interval is not enough"
    r.add("a", 0.1, 0.1)
    assert r.worst() == pytest.approx(1.5)                  # 0.3 s over 0.2 s
    r.add("b", 0.5, 0.2)
    r.add("b", 0.5, 0.2)
    assert r.worst() == pytest.approx(2.5)
    r.keep(["a", "c"])
    assert r.worst() == pytest.approx(1.5)
    r.add("c", 0.05, 0.1)
    r.add("c", 0.05, 0.1)
    assert r.worst() == pytest.approx(1.5)                  # c is faster than modelled: never below 1
    r.keep(["c"])
    assert r.worst() == 1.0
