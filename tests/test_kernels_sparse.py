"""SparseDist and quantize_dist: exact sums, argmax kept, determinism, exact sampling."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from kernels.sparse import SparseDist, quantize_dist
from tests.test_kernels_sampling import assert_samples_match, random_probs


def ref_quantize(probs: np.ndarray, bits: int, top_k: int | None) -> dict[int, int]:
    """Largest remainder written out with loops and python sorting (same float scaling)."""
    total = 2**bits - 1
    nz = [i for i in range(len(probs)) if probs[i] > 0]
    nz.sort(key=lambda i: (-probs[i], i))
    kept = sorted(nz if top_k is None else nz[:top_k])
    vals = np.array([probs[i] for i in kept])
    scaled = vals / vals.sum() * total
    floors = [int(np.floor(s)) for s in scaled]
    left = total - sum(floors)
    by_frac = sorted(range(len(kept)), key=lambda j: (-(scaled[j] - floors[j]), j))
    for j in by_frac[:left]:
        floors[j] += 1
    return {kept[j]: floors[j] for j in range(len(kept)) if floors[j] > 0}


# ---------------------------------------------------------------------------------------------
# SparseDist
# ---------------------------------------------------------------------------------------------


def test_sparse_dist_prob_and_dense():
    d = SparseDist(ids=np.array([1, 4, 7]), weights=np.array([1, 2, 252]), total=255)
    assert d.prob(4) == 2 / 255 and d.prob(0) == 0.0 and d.prob(8) == 0.0
    assert d.weight(7) == 252
    dense = d.dense(9)
    assert dense.dtype == np.float64 and dense.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(np.flatnonzero(dense), [1, 4, 7])
    with pytest.raises(ValueError):
        d.dense(7)


def test_sparse_dist_sample_is_exact():
    rng = np.random.default_rng(0)
    d = SparseDist(ids=np.array([0, 2, 3, 9]), weights=np.array([1, 100, 30, 124]), total=255)
    samples = [d.sample(rng) for _ in range(20_000)]
    assert_samples_match(samples, d.dense(10))


def test_sparse_dist_sample_is_one_integer_draw():
    d = SparseDist(ids=np.array([3, 5]), weights=np.array([10, 20]), total=30)
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    r = int(b.integers(0, 30))
    assert d.sample(a) == (3 if r < 10 else 5)
    assert a.random() == b.random()


def test_sparse_dist_sample_maps_every_integer_to_its_bucket():
    # Exactness without statistics: r in [0, total) covers each id exactly `weight` times.
    class Fixed:
        def __init__(self, r):
            self.r = r

        def integers(self, low, high):
            assert (low, high) == (0, 6)
            return self.r

    d = SparseDist(ids=np.array([2, 5, 8]), weights=np.array([1, 2, 3]), total=6)
    assert [d.sample(Fixed(r)) for r in range(6)] == [2, 5, 5, 8, 8, 8]


def test_sparse_dist_equality():
    a = SparseDist([1, 2], [3, 4], 7)
    assert a == SparseDist(np.array([1, 2]), np.array([3, 4]), 7)
    assert a != SparseDist([1, 3], [3, 4], 7)


@pytest.mark.parametrize(
    "ids, weights, total",
    [
        ([], [], 0),  # empty
        ([1, 1], [1, 1], 2),  # duplicate id
        ([2, 1], [1, 1], 2),  # not ascending
        ([-1, 1], [1, 1], 2),  # negative id
        ([1, 2], [0, 2], 2),  # zero weight
        ([1, 2], [1, 2], 4),  # wrong total
        ([1, 2], [1], 1),  # length mismatch
    ],
)
def test_sparse_dist_rejects_invalid(ids, weights, total):
    with pytest.raises(ValueError):
        SparseDist(ids=np.array(ids, dtype=np.int64), weights=np.array(weights), total=total)


# ---------------------------------------------------------------------------------------------
# quantize_dist
# ---------------------------------------------------------------------------------------------


def test_quantize_dist_matches_reference_on_random_inputs():
    rng = np.random.default_rng(11)
    for _ in range(300):
        v = int(rng.integers(5, 51))
        p = random_probs(rng, v, zeros=int(rng.integers(0, v // 2)), skew=float(rng.choice([0.1, 1, 5])))
        bits = int(rng.choice([1, 4, 8, 16]))
        top_k = None if rng.random() < 0.4 else int(rng.integers(1, v + 2))
        d = quantize_dist(p, bits=bits, top_k=top_k)
        want = ref_quantize(p, bits, top_k)
        assert dict(zip(d.ids.tolist(), d.weights.tolist())) == want, (bits, top_k)


def test_quantize_dist_matches_reference_on_a_vocabulary_mostly_zero():
    # What top-p leaves: a few non-zero entries in a 49k vocabulary, with ties at the top-k
    # boundary and fewer non-zero entries than top_k.
    rng = np.random.default_rng(5)
    for n_nz, top_k in [(40, 16), (16, 16), (9, 16), (200, 16), (40, 1)]:
        p = np.zeros(49152)
        ids = rng.choice(p.size, n_nz, replace=False)
        p[ids] = rng.choice([1.0, 2.0, 3.0, 0.5], n_nz)       # few distinct values: many ties
        p /= p.sum()
        d = quantize_dist(p, bits=8, top_k=top_k)
        assert dict(zip(d.ids.tolist(), d.weights.tolist())) == ref_quantize(p, 8, top_k), (n_nz, top_k)


@pytest.mark.parametrize("bits", [1, 2, 8, 12, 16, 24])
@pytest.mark.parametrize("top_k", [None, 1, 4, 40])
def test_quantize_dist_invariants(bits, top_k):
    rng = np.random.default_rng(bits * 100 + (top_k or 0))
    total = 2**bits - 1
    for _ in range(20):
        v = int(rng.integers(5, 300))
        p = random_probs(rng, v, zeros=v // 5, skew=float(rng.choice([0.05, 1.0])))
        d = quantize_dist(p, bits=bits, top_k=top_k)
        assert d.total == total and int(d.weights.sum()) == total  # exact, in integers
        assert d.weights.max() < 2**bits  # fits the wire field
        assert d.weights.min() >= 1  # zero-rounded entries dropped
        assert np.all(np.diff(d.ids) > 0)
        assert int(np.argmax(p)) in d.ids  # argmax kept
        assert np.all(p[d.ids] > 0)
        if top_k is not None:
            assert d.ids.size <= top_k
            kth = np.sort(p)[::-1][min(top_k, v) - 1]
            assert np.all(p[d.ids] >= kth)
        # Largest remainder: every kept weight within one unit of its exact share.
        kept_mass = np.sort(p)[::-1][: top_k or v].sum()
        exact = p[d.ids] / kept_mass * total
        assert np.all(np.abs(d.weights - exact) < 1.0 + 1e-9)


def test_quantize_dist_keeps_argmax_when_everything_rounds_to_zero():
    # 8-bit over 1000 near-uniform tokens: each share is ~0.255 of a unit, so only the largest
    # 255 fractional parts get weight; the (unique, not the first) argmax must be among them.
    p = np.full(1000, 1.0)
    p[777] = 1.0 + 1e-9
    d = quantize_dist(p / p.sum(), bits=8)
    assert d.ids.size == 255 and d.weight(777) == 1 and int(d.weights.sum()) == 255


def test_quantize_dist_ties_keep_lower_ids():
    d = quantize_dist(np.full(10, 0.1), bits=2)  # 3 units over 10 equal tokens
    np.testing.assert_array_equal(d.ids, [0, 1, 2])
    d = quantize_dist(np.array([0.1, 0.3, 0.3, 0.3]), bits=8, top_k=2)
    np.testing.assert_array_equal(d.ids, [1, 2])


def test_quantize_dist_is_deterministic():
    rng = np.random.default_rng(3)
    p = random_probs(rng, 5000, skew=0.2)
    a = quantize_dist(p, bits=16)
    b = quantize_dist(p.copy(), bits=16)
    assert a == b
    assert quantize_dist(p, bits=8, top_k=16) == quantize_dist(p.copy(), bits=8, top_k=16)


def test_quantize_dist_one_hot_and_exact_inputs():
    d = quantize_dist(np.array([0.0, 1.0, 0.0]), bits=16)
    assert d == SparseDist([1], [65535], 65535)
    # Shares that are exact multiples of a unit come out unchanged.
    p = np.array([85, 0, 170]) / 255
    assert quantize_dist(p, bits=8) == SparseDist([0, 2], [85, 170], 255)


def test_quantize_dist_accepts_unnormalised_input():
    p = np.array([2.0, 6.0, 0.0, 2.0])
    d = quantize_dist(p, bits=8)
    assert [Fraction(int(w), 255) for w in d.weights] == [Fraction(51, 255), Fraction(153, 255), Fraction(51, 255)]


@pytest.mark.parametrize(
    "probs, kwargs",
    [
        (np.zeros(4), {}),
        (np.array([0.5, -0.1, 0.6]), {}),
        (np.array([0.5, np.nan]), {}),
        (np.array([0.5, 0.5]), dict(top_k=0)),
        (np.array([0.5, 0.5]), dict(bits=0)),
    ],
)
def test_quantize_dist_rejects_bad_input(probs, kwargs):
    with pytest.raises(ValueError):
        quantize_dist(probs, **kwargs)
