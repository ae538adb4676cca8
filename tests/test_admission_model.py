"""Admission by SLO, the math (sim/admission.py): predictions against hand-computed values."""
from __future__ import annotations

import math

import pytest

from sim.admission import Demand, admits, batch_budget, pass_tokens, predict
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
