"""Rejection-sampling math: greedy verification cases, the accept test, residuals, and the full
speculative step composed for codec Q and codec P, checked against exact distributions."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.rejection import (
    PPayload,
    accept_token,
    draw_tail,
    encode_p,
    residual_probs,
    sample_residual,
    sample_residual_p,
    snap_p,
    total_variation,
    verify_greedy,
)
from kernels.sampling import STREAM_RESIDUAL, rng_for, sample
from kernels.sparse import SparseDist, quantize_dist
from tests.test_kernels_sampling import assert_samples_match, random_probs

N_SAMPLES = 12_000


def forced_argmax_logits(tokens: list[int], vocab: int) -> np.ndarray:
    """Target logits, one row per position, whose argmax is the given token (vLLM's helper)."""
    logits = np.full((len(tokens), vocab), -10.0)
    logits[np.arange(len(tokens)), tokens] = 10.0
    return logits


# ---------------------------------------------------------------------------------------------
# verify_greedy
# ---------------------------------------------------------------------------------------------


def test_verify_greedy_all_accepted_takes_bonus():
    target = forced_argmax_logits([1, 2, 3, 4], vocab=8).argmax(-1)
    assert verify_greedy([1, 2, 3], target) == (3, 4)


def test_verify_greedy_first_token_rejected():
    target = forced_argmax_logits([5, 2, 3, 4], vocab=8).argmax(-1)
    assert verify_greedy([1, 2, 3], target) == (0, 5)


def test_verify_greedy_no_bonus_position():
    assert verify_greedy([1, 2], [1, 2]) == (2, -1)
    assert verify_greedy([1, 2], [1, 7]) == (1, 7)


@pytest.mark.parametrize(
    "draft, target, expected",
    [
        ([], [9], (0, 9)),  # empty draft: just the target's next token
        ([], [], (0, -1)),
        ([4], [4, 0], (1, 0)),
        ([4], [3, 0], (0, 3)),
        ([1, 2, 3, 4], [1, 2, 9, 4, 5], (2, 9)),  # later matches after a mismatch don't count
        ([1, 2, 3, 4], [1, 2, 3, 4, 5], (4, 5)),
        ([1, 2, 3, 4], [1, 2, 3, 0, 5], (3, 0)),
        ([7, 7, 7], [7, 7, 7, 7], (3, 7)),
    ],
)
def test_verify_greedy_table(draft, target, expected):
    assert verify_greedy(draft, target) == expected
    assert verify_greedy(np.array(draft, dtype=np.int64), np.array(target, dtype=np.int64)) == expected


@pytest.mark.parametrize("draft, target", [([1, 2], [1]), ([1], [1, 2, 3]), ([], [1, 2])])
def test_verify_greedy_rejects_wrong_lengths(draft, target):
    with pytest.raises(ValueError):
        verify_greedy(draft, target)


# ---------------------------------------------------------------------------------------------
# accept_token, residual_probs, total_variation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p_x, q_x, u, accepted",
    [
        (0.5, 0.25, 0.999, True),  # p >= q: always accepted
        (0.2, 0.4, 0.49, True),  # ratio 0.5
        (0.2, 0.4, 0.5, False),  # strict inequality at the ratio
        (0.0, 0.4, 0.0, False),  # the target never emits it
        (0.3, 0.3, 0.0, True),
    ],
)
def test_accept_token_table(p_x, q_x, u, accepted):
    assert accept_token(p_x, q_x, u) is accepted


@pytest.mark.parametrize("q_x", [0.0, -0.1, float("nan")])
def test_accept_token_rejects_impossible_draft(q_x):
    with pytest.raises(ValueError):
        accept_token(0.5, q_x, 0.1)


def test_residual_probs_example():
    p = np.array([0.5, 0.3, 0.2, 0.0])
    q = np.array([0.2, 0.5, 0.2, 0.1])
    np.testing.assert_allclose(residual_probs(p, q), [1.0, 0.0, 0.0, 0.0])
    p = np.array([0.4, 0.4, 0.2])
    q = np.array([0.2, 0.2, 0.6])
    np.testing.assert_allclose(residual_probs(p, q), [0.5, 0.5, 0.0])


def test_residual_probs_equal_distributions_fall_back_to_p():
    p = np.array([0.25, 0.75])
    np.testing.assert_array_equal(residual_probs(p, p), p)


def test_total_variation():
    assert total_variation(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 1.0
    assert total_variation(np.array([0.5, 0.5]), np.array([0.25, 0.75])) == 0.25


# ---------------------------------------------------------------------------------------------
# Codec Q: the cloud draws the residual from the q̃ sent up with the draft
# ---------------------------------------------------------------------------------------------


def spec_step_q(p: np.ndarray, q: SparseDist, rng: np.random.Generator, residual=sample_residual) -> int:
    """One speculative position, codec Q: draft x ~ q, accept test, residual on reject."""
    x = q.sample(rng)
    if accept_token(p[x], q.prob(x), rng.random()):
        return x
    return residual(p, q, rng)


def _q_case(seed: int, v: int, bits: int, top_k: int | None):
    rng = np.random.default_rng(seed)
    p = random_probs(rng, v, zeros=v // 4)
    q = quantize_dist(random_probs(rng, v, skew=0.5), bits=bits, top_k=top_k)
    return rng, p, q


@pytest.mark.parametrize(
    "seed, v, bits, top_k",
    [(1, 5, 16, None), (2, 12, 8, 4), (3, 30, 8, 8), (4, 50, 16, 16)],
)
def test_sample_residual_matches_residual(seed, v, bits, top_k):
    rng, p, q = _q_case(seed, v, bits, top_k)
    want = residual_probs(p, q.dense(v))
    assert_samples_match([sample_residual(p, q, rng) for _ in range(N_SAMPLES)], want)


@pytest.mark.parametrize(
    "seed, v, bits, top_k",
    [(5, 6, 16, None), (6, 20, 8, 4), (7, 40, 8, 1)],
)
def test_speculative_step_codec_q_yields_p(seed, v, bits, top_k):
    rng, p, q = _q_case(seed, v, bits, top_k)
    assert_samples_match([spec_step_q(p, q, rng) for _ in range(N_SAMPLES)], p)


def test_speculative_step_with_wrong_residual_is_caught():
    # The composed check must be able to fail: drawing the correction from p instead of the
    # residual is the classic mistake (it over-weights what the draft already proposes).
    rng, p, q = _q_case(6, 20, 8, 4)
    wrong = lambda p, q, rng: sample(p, rng)  # noqa: E731
    with pytest.raises(AssertionError, match="chi-square"):
        assert_samples_match([spec_step_q(p, q, rng, residual=wrong) for _ in range(N_SAMPLES)], p)


def test_speculative_step_with_unquantised_q_is_caught():
    # Testing against the q the draft did NOT sample from (the float one before quantising to
    # 8-bit top-4) is the loss that using q̃ everywhere avoids.
    rng = np.random.default_rng(12)
    v = 10
    p = random_probs(rng, v)
    q_float = random_probs(rng, v, skew=0.3)
    q = quantize_dist(q_float, bits=8, top_k=2)

    def step():
        x = q.sample(rng)
        if accept_token(p[x], q_float[x], rng.random()):
            return x
        return sample(residual_probs(p, q_float), rng)

    with pytest.raises(AssertionError, match="chi-square"):
        assert_samples_match([step() for _ in range(N_SAMPLES)], p)


def test_sample_residual_when_p_equals_q_samples_p():
    q = SparseDist([0, 2], [85, 170], 255)
    p = q.dense(3)
    rng = np.random.default_rng(13)
    assert_samples_match([sample_residual(p, q, rng) for _ in range(4000)], p)


def test_sample_residual_rejects_out_of_vocab_q():
    with pytest.raises(ValueError):
        sample_residual(np.array([0.5, 0.5]), SparseDist([0, 5], [1, 254], 255), np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# Codec P: the cloud sends p once, sparse; the edge draws the residual itself
# ---------------------------------------------------------------------------------------------


def test_snap_p_round_trips_through_float32():
    rng = np.random.default_rng(14)
    p = random_probs(rng, 40)
    s = snap_p(p)
    assert s.dtype == np.float64
    np.testing.assert_array_equal(s, s.astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(snap_p(s), s)
    assert np.abs(s - p).max() < 1e-7


def test_encode_p_layout():
    rng = np.random.default_rng(15)
    p = snap_p(random_probs(rng, 30, zeros=5))
    payload = encode_p(p, top_k=6, n_tail=50, rng=rng)
    assert payload.top_ids.dtype == np.int64 and payload.top_probs.dtype == np.float32
    assert payload.tail_ids.dtype == np.int64 and payload.tail_probs.dtype == np.float32
    np.testing.assert_array_equal(payload.top_ids, np.sort(np.argsort(-p, kind="stable")[:6]))
    np.testing.assert_array_equal(payload.top_probs.astype(np.float64), p[payload.top_ids])
    assert not np.isin(payload.tail_ids, payload.top_ids).any()
    assert np.all(p[payload.tail_ids] > 0)
    np.testing.assert_array_equal(payload.tail_probs.astype(np.float64), p[payload.tail_ids])
    assert payload.tail_mass == pytest.approx(1.0 - p[payload.top_ids].sum(), abs=1e-12)


def test_encode_p_top_k_beyond_support_keeps_only_nonzero():
    p = snap_p(np.array([0.0, 0.5, 0.0, 0.5]))
    payload = encode_p(p, top_k=10, n_tail=0, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(payload.top_ids, [1, 3])
    assert payload.tail_mass == 0.0


def test_draw_tail_matches_p_restricted_to_tail():
    rng = np.random.default_rng(16)
    p = snap_p(random_probs(rng, 25, zeros=4))
    top = np.argsort(-p)[:5]
    ids, probs = draw_tail(p, top, 20_000, rng)
    want = p.copy()
    want[top] = 0.0
    assert_samples_match(ids, want)
    np.testing.assert_array_equal(probs.astype(np.float64), p[ids])


def test_draw_tail_with_empty_tail_draws_from_p():
    # float32 rounding can leave tail_mass a hair above 0 with nothing outside top_ids.
    p = np.array([0.25, 0.75, 0.0])
    ids, probs = draw_tail(p, np.array([0, 1]), 4000, np.random.default_rng(17))
    assert_samples_match(ids, p)


def test_ppayload_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        PPayload(np.array([1, 2]), np.array([0.5], np.float32), np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError):
        PPayload(np.array([1]), np.array([0.5], np.float32), np.array([3]), np.zeros(0))


def residual_p_with_extensions(
    p: np.ndarray, payload: PPayload, q: SparseDist, rng, tail_rng, chunk: int = 1
) -> tuple[int, int]:
    """The edge/cloud exchange around sample_residual_p: ask for `chunk` more tail draws
    whenever the edge runs out. Returns (token, number of extensions)."""
    cursor, extensions = 0, 0
    while True:
        token, cursor = sample_residual_p(payload, q, rng, cursor)
        if token is not None:
            return token, extensions
        assert cursor == payload.tail_ids.size  # None only when every draw is used
        payload = payload.with_tail(*draw_tail(p, payload.top_ids, chunk, tail_rng))
        extensions += 1


def _p_case(seed: int, v: int, q_bits: int, q_top_k: int | None):
    rng = np.random.default_rng(seed)
    p = snap_p(random_probs(rng, v, zeros=v // 5))
    q = quantize_dist(random_probs(rng, v, skew=0.5), bits=q_bits, top_k=q_top_k)
    return rng, p, q


@pytest.mark.parametrize(
    "seed, v, top_k, n_tail",
    [
        (20, 8, 3, 64),  # plenty of tail draws
        (21, 30, 5, 0),  # every tail proposal needs an extension
        (22, 50, 1, 1),
        (23, 10, 10, 0),  # top-K covers p: tail never used
    ],
)
def test_sample_residual_p_matches_residual(seed, v, top_k, n_tail):
    rng, p, q = _p_case(seed, v, 16, None)
    want = residual_probs(p, q.dense(v))
    tail_rng = np.random.default_rng(seed + 1000)
    out, ext = [], 0
    for _ in range(N_SAMPLES):
        payload = encode_p(p, top_k, n_tail, tail_rng)
        token, e = residual_p_with_extensions(p, payload, q, rng, tail_rng)
        out.append(token)
        ext += e
    assert_samples_match(out, want)
    if n_tail == 0 and top_k < v:
        assert ext > 0  # the extension path was exercised


@pytest.mark.parametrize(
    "seed, v, q_bits, q_top_k, top_k, n_tail",
    [(30, 6, 16, None, 2, 2), (31, 25, 16, None, 4, 0), (32, 40, 8, 6, 8, 1)],
)
def test_speculative_step_codec_p_yields_p(seed, v, q_bits, q_top_k, top_k, n_tail):
    rng, p, q = _p_case(seed, v, q_bits, q_top_k)
    tail_rng = np.random.default_rng(seed + 1000)
    out = []
    for _ in range(N_SAMPLES):
        x = q.sample(rng)
        if accept_token(p[x], q.prob(x), rng.random()):  # cloud side
            out.append(x)
            continue
        payload = encode_p(p, top_k, n_tail, tail_rng)  # downlink
        out.append(residual_p_with_extensions(p, payload, q, rng, tail_rng)[0])  # edge side
    assert_samples_match(out, p)


def test_sample_residual_p_that_reuses_tail_draws_is_caught():
    # Reusing the first tail draw instead of consuming fresh ones biases the tail: the check
    # must notice. The wrong sampler keeps calling with cursor 0.
    rng, p, q = _p_case(21, 30, 16, None)
    tail_rng = np.random.default_rng(5)
    want = residual_probs(p, q.dense(30))
    out = []
    for _ in range(N_SAMPLES // 2):
        payload = encode_p(p, 3, 1, tail_rng)
        token = None
        while token is None:
            token, _ = sample_residual_p(payload, q, rng, 0)
        out.append(token)
    with pytest.raises(AssertionError, match="chi-square"):
        assert_samples_match(out, want)


def test_sample_residual_p_one_hot_equal_returns_the_token():
    # p == q (only possible one-hot): the residual is empty and the result is p's token.
    p = snap_p(np.array([0.0, 0.0, 1.0, 0.0]))
    q = SparseDist([2], [65535], 65535)
    payload = encode_p(p, top_k=2, n_tail=0, rng=np.random.default_rng(0))
    assert sample_residual_p(payload, q, np.random.default_rng(1)) == (2, 0)
    assert residual_probs(p, q.dense(4))[2] == 1.0


def test_sample_residual_p_is_deterministic_per_position():
    rng, p, q = _p_case(40, 20, 16, None)
    payload = encode_p(p, 4, 8, rng)
    runs = {sample_residual_p(payload, q, rng_for(9, 77, STREAM_RESIDUAL)) for _ in range(5)}
    assert len(runs) == 1


def test_sample_residual_p_rejects_bad_cursor():
    rng, p, q = _p_case(41, 10, 16, None)
    payload = encode_p(p, 3, 2, rng)
    with pytest.raises(ValueError):
        sample_residual_p(payload, q, rng, tail_cursor=3)
