"""kernels/speculation_rate.py against slow references: E(g) by enumerating where the first
rejection falls, and the pipelined rate's limits."""
import itertools

import pytest

from kernels.speculation_rate import expected_tokens, rate, windows


def expected_by_enumeration(a: float, g: int, bonus: bool) -> float:
    """Sum over every accept/reject pattern of its probability times the tokens it keeps."""
    total = 0.0
    for pattern in itertools.product((True, False), repeat=g):
        p, kept = 1.0, 0
        for ok in pattern:
            p *= a if ok else 1 - a
        accepted = next((i for i, ok in enumerate(pattern) if not ok), g)
        kept = accepted + (1 if accepted < g or bonus else 0)
        total += p * kept
    return total


@pytest.mark.parametrize("a", [0.0, 0.3, 0.77, 0.95, 1.0])
@pytest.mark.parametrize("g", [1, 2, 5])
@pytest.mark.parametrize("bonus", [True, False])
def test_expected_tokens_equals_enumeration(a, g, bonus):
    assert expected_tokens(a, g, bonus) == pytest.approx(expected_by_enumeration(a, g, bonus))


def test_stop_and_wait_is_tokens_per_cycle():
    assert rate(0.5, 2, 1, 0.01, 0.05, 0.03) == pytest.approx(1.75 / (0.02 + 0.05 + 0.03))


def test_a_full_window_without_rejections_runs_at_the_slowest_stage():
    # a clipped to 0.999: almost no refill; the verdicts come every max(g*t_d, t_v)
    assert rate(1.0, 4, 8, 0.01, 0.05, 0.03) == pytest.approx(expected_tokens(0.999, 4, False) / 0.04, rel=0.01)


def test_a_leading_verifier_fills_the_refill():
    base = rate(0.5, 4, 4, 0.01, 0.05, 0.03)
    led = rate(0.5, 4, 4, 0.01, 0.05, 0.03, lead_token_s=0.02)
    after_rtt = rate(0.5, 4, 4, 0.01, 0.05, 0.03, lead_token_s=0.02, lead_after_rtt=True)
    assert base < after_rtt < led


def test_windows_keep_the_pipe_full():
    assert windows(4, 0.01, 0.05, 0.03, 8) == [1, 3]         # a 0.12 s cycle, 0.04 s of drafting
    assert windows(4, 0.01, 0.5, 0.03, 8) == [1, 8]          # capped
