"""logits_to_probs against a slow loop reference, rng_for, sample; plus the statistical helpers
(chi-square without scipy) that the other kernel test files import."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from kernels.sampling import (
    STREAM_ACCEPT,
    STREAM_DRAFT,
    STREAM_RESIDUAL,
    STREAM_TAIL,
    STREAM_TARGET,
    SamplingConfig,
    logits_to_probs,
    race_keys,
    race_sample,
    race_sample_at,
    rng_for,
    runner_up,
    sample,
)

# Statistical tests run with fixed seeds, so they are deterministic; ALPHA only says how
# unlikely a pass-by-luck would have been for a correct sampler to fail.
ALPHA = 1e-4


# ---------------------------------------------------------------------------------------------
# Chi-square without scipy
# ---------------------------------------------------------------------------------------------


def _gamma_q(a: float, x: float) -> float:
    """Regularised upper incomplete gamma Q(a, x): series below a+1, continued fraction above."""
    if x <= 0.0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        ap = a
        while abs(term) > abs(total) * 1e-15:
            ap += 1.0
            term *= x / ap
            total += term
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return math.exp(log_front) * h


def chi2_sf(stat: float, dof: int) -> float:
    return _gamma_q(dof / 2.0, stat / 2.0)


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of `counts` to `probs`; bins expecting < 5 are pooled, and any count in a
    bin of probability 0 is an impossible outcome (p-value 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    n = counts.sum()
    expected = probs / probs.sum() * n
    if np.any(counts[expected == 0] > 0):
        return 0.0
    small = expected < 5
    obs = list(counts[~small])
    exp = list(expected[~small])
    if small.any() and expected[small].sum() > 0:
        obs.append(counts[small].sum())
        exp.append(expected[small].sum())
    obs, exp = np.array(obs), np.array(exp)
    if obs.size < 2:
        return 1.0
    stat = float(((obs - exp) ** 2 / exp).sum())
    return chi2_sf(stat, obs.size - 1)


def assert_samples_match(samples, probs, alpha: float = ALPHA) -> None:
    probs = np.asarray(probs, dtype=np.float64)
    counts = np.bincount(np.asarray(samples, dtype=np.int64), minlength=probs.size)
    assert counts.size == probs.size, "a sample fell outside the vocabulary"
    pval = chi2_pvalue(counts, probs)
    assert pval > alpha, (
        f"samples do not follow the expected distribution (chi-square p={pval:.3g})\n"
        f"observed {np.round(counts / counts.sum(), 4)}\nexpected {np.round(probs / probs.sum(), 4)}"
    )


def random_probs(rng: np.random.Generator, v: int, zeros: int = 0, skew: float = 1.0) -> np.ndarray:
    """A random distribution on v tokens with `zeros` tokens of probability exactly 0."""
    p = rng.dirichlet(np.full(v, skew))
    if zeros:
        p[rng.choice(v, size=zeros, replace=False)] = 0.0
        p /= p.sum()
    return p


@pytest.mark.parametrize(
    "stat, dof, expected",
    [
        (3.841458820694124, 1, 0.05),
        (18.307038053275146, 10, 0.05),
        (6.634896601021214, 1, 0.01),
        (124.34211340400408, 100, 0.05),
        (0.0, 3, 1.0),
        (2.0, 2, math.exp(-1.0)),  # dof 2 is exponential: sf = exp(-x/2)
    ],
)
def test_chi2_sf_matches_known_quantiles(stat, dof, expected):
    assert chi2_sf(stat, dof) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_chi2_check_rejects_a_wrong_sampler():
    # The check must be able to fail: samples from a distribution 5 points of TV away.
    rng = np.random.default_rng(1)
    p = np.array([0.3, 0.3, 0.2, 0.1, 0.1])
    wrong = np.array([0.35, 0.25, 0.2, 0.1, 0.1])
    samples = rng.choice(5, size=20_000, p=wrong)
    with pytest.raises(AssertionError, match="chi-square"):
        assert_samples_match(samples, p)
    assert_samples_match(rng.choice(5, size=20_000, p=p), p)


def test_chi2_check_rejects_an_impossible_outcome():
    with pytest.raises(AssertionError):
        assert_samples_match([0, 1, 2] * 100, [0.5, 0.5, 0.0])


# ---------------------------------------------------------------------------------------------
# logits_to_probs vs a slow reference
# ---------------------------------------------------------------------------------------------


def ref_logits_to_probs(logits, temperature: float, top_k: int, top_p: float) -> list[float]:
    """Loops only: the semantics written out plainly."""
    v = len(logits)
    if temperature <= 0:
        best = 0
        for i in range(v):
            if logits[i] > logits[best]:
                best = i
        return [1.0 if i == best else 0.0 for i in range(v)]
    x = [float(l) / temperature for l in logits]
    order = sorted(range(v), key=lambda i: (-x[i], i))  # descending, lower id first on ties
    kept = order[:top_k] if 0 < top_k < v else order
    if top_p < 1.0:
        m = max(x[i] for i in kept)
        z = sum(math.exp(x[i] - m) for i in kept)
        prefix, cum = [], 0.0
        for i in kept:
            prefix.append(i)
            cum += math.exp(x[i] - m) / z
            if cum >= top_p:
                break
        kept = prefix
    m = max(x[i] for i in kept)
    z = sum(math.exp(x[i] - m) for i in kept)
    out = [0.0] * v
    for i in kept:
        out[i] = math.exp(x[i] - m) / z
    return out


def _random_config(rng: np.random.Generator, v: int) -> SamplingConfig:
    temperature = float(rng.choice([0.0, 0.3, 0.7, 1.0, 1.5, 3.0]))
    top_k = int(rng.choice([0, 1, 2, v - 1, v, v + 3, int(rng.integers(1, v + 1))]))
    top_p = float(rng.choice([1.0, 0.999, 0.9, 0.5, 0.05, float(rng.uniform(0.01, 1.0))]))
    return SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)


def _random_logits(rng: np.random.Generator, v: int) -> np.ndarray:
    kind = rng.integers(4)
    x = rng.normal(scale=float(rng.choice([0.5, 2.0, 8.0])), size=v)
    if kind == 1:
        x = np.round(x)  # many ties, including at the top-k boundary
    elif kind == 2:
        x[rng.choice(v, size=v // 3, replace=False)] = -np.inf  # masked tokens
    elif kind == 3:
        x = np.full(v, 0.25)  # everything tied
    return x


def test_logits_to_probs_matches_reference_on_random_configs():
    rng = np.random.default_rng(2024)
    for _ in range(400):
        v = int(rng.integers(5, 51))
        cfg = _random_config(rng, v)
        logits = _random_logits(rng, v)
        got = logits_to_probs(logits, cfg)
        want = ref_logits_to_probs(list(logits), cfg.temperature, cfg.top_k, cfg.top_p)
        assert got.dtype == np.float64 and got.shape == (v,)
        # Same kept set exactly, same values to rounding.
        np.testing.assert_array_equal(got > 0, np.array(want) > 0, err_msg=str(cfg))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=str(cfg))
        assert got.sum() == pytest.approx(1.0, abs=1e-12)


def test_logits_to_probs_large_vocab_matches_reference():
    # The top-p fast path sorts only a growing candidate set; check it where that matters.
    rng = np.random.default_rng(5)
    logits = np.round(rng.normal(scale=3.0, size=3000), 1)  # ties everywhere
    for cfg in [
        SamplingConfig(0.9, 0, 0.999),
        SamplingConfig(0.9, 0, 0.3),
        SamplingConfig(1.3, 100, 0.97),
        SamplingConfig(2.0, 2999, 0.9999),
    ]:
        want = ref_logits_to_probs(list(logits), cfg.temperature, cfg.top_k, cfg.top_p)
        got = logits_to_probs(logits, cfg)
        np.testing.assert_array_equal(got > 0, np.array(want) > 0, err_msg=str(cfg))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_greedy_is_one_hot_at_lowest_argmax():
    logits = np.array([1.0, 5.0, 2.0, 5.0])
    for cfg in [SamplingConfig(), SamplingConfig(-1.0, 2, 0.5)]:
        np.testing.assert_array_equal(logits_to_probs(logits, cfg), [0, 1, 0, 0])
    assert SamplingConfig().greedy and SamplingConfig(temperature=-0.5).greedy
    assert not SamplingConfig(temperature=0.1).greedy


def test_top_k_boundary_ties_keep_lower_ids():
    logits = np.array([1.0, 3.0, 2.0, 2.0, 2.0])
    probs = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_k=3))
    np.testing.assert_array_equal(probs > 0, [False, True, True, True, False])


def test_runner_up_is_the_stable_descending_orders_second():
    rng = np.random.default_rng(11)
    for trial in range(300):
        size = int(rng.integers(2, 40))
        # few distinct values, so ties at the top and around the argmax are common
        x = rng.integers(0, 4 if trial % 2 else 1000, size=size).astype(np.float32)
        order = np.argsort(-x, kind="stable")
        assert runner_up(x, int(order[0])) == int(order[1])


def test_runner_up_on_one_hot_and_edges():
    x = np.zeros(49152, np.float32)
    x[123] = 1.0
    assert runner_up(x, 123) == 0
    assert runner_up(np.array([5.0, 1.0]), 0) == 1
    assert runner_up(np.array([1.0, 5.0]), 1) == 0
    with pytest.raises(ValueError):
        runner_up(np.array([1.0]), 0)


def test_top_k_one_equals_greedy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=20)
    np.testing.assert_array_equal(
        logits_to_probs(logits, SamplingConfig(temperature=0.7, top_k=1)),
        logits_to_probs(logits, SamplingConfig()),
    )


@pytest.mark.parametrize(
    "top_p, n_kept",
    [
        (0.25, 1),  # exactly reaching top_p with one token is enough
        (0.5, 2),  # cumulative 0.25, 0.5: the prefix reaching exactly top_p
        (0.5000001, 3),
        (1e-9, 1),  # always at least one token
        (1.0, 4),
    ],
)
def test_top_p_boundary_on_uniform_logits(top_p, n_kept):
    probs = logits_to_probs(np.zeros(4), SamplingConfig(temperature=1.0, top_p=top_p))
    np.testing.assert_array_equal(probs > 0, np.arange(4) < n_kept)
    np.testing.assert_allclose(probs[:n_kept], 1.0 / n_kept)


def test_top_p_applies_to_the_top_k_renormalised_mass():
    # Softmax over all: [0.4, 0.3, 0.2, 0.1]. Over the top-2: [4/7, 3/7]. With top_p = 0.55
    # the top-2 renormalised prefix needs one token (4/7 > 0.55); on the full softmax it would
    # need two (0.4 < 0.55).
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    only_p = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_p=0.55))
    both = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_k=2, top_p=0.55))
    np.testing.assert_array_equal(only_p > 0, [True, True, False, False])
    np.testing.assert_array_equal(both, [1.0, 0, 0, 0])


def test_temperature_scales_logits():
    logits = np.array([0.0, 1.0, 2.0])
    probs = logits_to_probs(logits, SamplingConfig(temperature=2.0))
    want = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum()
    np.testing.assert_allclose(probs, want, rtol=1e-14)


def test_masked_tokens_never_kept():
    logits = np.array([-np.inf, 0.0, -np.inf, 1.0])
    probs = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_k=3))
    assert probs[0] == probs[2] == 0.0 and probs.sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "logits",
    [np.array([0.0, np.nan]), np.array([-np.inf, -np.inf]), np.array([0.0, np.inf]), np.zeros(0)],
)
def test_logits_to_probs_rejects_bad_logits(logits):
    with pytest.raises(ValueError):
        logits_to_probs(logits, SamplingConfig(temperature=1.0))


@pytest.mark.parametrize(
    "kwargs",
    [dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=float("nan"))],
)
def test_sampling_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# rng_for
# ---------------------------------------------------------------------------------------------


def test_rng_for_is_a_pure_function_of_its_key():
    a = rng_for(7, 123, STREAM_ACCEPT).random(4)
    rng_for(7, 124, STREAM_ACCEPT).random(100)  # other decisions in between change nothing
    np.testing.assert_array_equal(a, rng_for(7, 123, STREAM_ACCEPT).random(4))


def test_rng_for_streams_are_distinct():
    keys = [(s, pos, st) for s in (0, 1, 2**63) for pos in (0, 1, 2**40) for st in range(5)]
    firsts = {rng_for(*k).random() for k in keys}
    assert len(firsts) == len(keys)
    assert len({STREAM_DRAFT, STREAM_ACCEPT, STREAM_RESIDUAL, STREAM_TAIL, STREAM_TARGET}) == 5


def test_rng_for_first_draws_are_uniform_across_positions():
    # Callers draw once per (seed, pos): those first draws must themselves look iid uniform.
    u = np.array([rng_for(11, pos, STREAM_ACCEPT).random() for pos in range(4000)])
    counts = np.bincount((u * 20).astype(int), minlength=20)
    assert chi2_pvalue(counts, np.full(20, 0.05)) > ALPHA
    v = np.array([rng_for(11, pos, STREAM_DRAFT).random() for pos in range(4000)])
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.08  # same positions, other stream: uncorrelated


def test_rng_for_accepts_any_int_seed_and_rejects_bad_positions():
    rng_for(-5, 0, 0).random()
    rng_for(2**200, 0, 0).random()
    for pos, stream in [(-1, 0), (0, -1), (2**64, 0)]:
        with pytest.raises(ValueError):
            rng_for(0, pos, stream)


def test_rng_for_is_fast():
    # Brief: < ~30 us. Bound loosely here, the test machine is shared.
    best = min(_time_rng_for() for _ in range(3))
    assert best < 200e-6, f"rng_for took {best * 1e6:.0f} us"


def _time_rng_for(n: int = 300) -> float:
    t0 = time.perf_counter()
    for pos in range(n):
        rng_for(3, pos, STREAM_RESIDUAL)
    return (time.perf_counter() - t0) / n


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------


def test_sample_matches_distribution():
    rng = np.random.default_rng(8)
    p = random_probs(rng, 12, zeros=3)
    samples = [sample(p, rng) for _ in range(20_000)]
    assert_samples_match(samples, p)


def test_sample_accepts_unnormalised_weights():
    rng = np.random.default_rng(9)
    w = np.array([3.0, 0.0, 1.0, 6.0])
    assert_samples_match([sample(w, rng) for _ in range(10_000)], w)


def test_sample_uses_exactly_one_uniform():
    p = np.array([0.1, 0.2, 0.7])
    a, b = np.random.default_rng(4), np.random.default_rng(4)
    sample(p, a)
    b.random()
    assert a.random() == b.random()


def test_sample_is_inverse_cdf():
    class Fixed:
        def __init__(self, u):
            self.u = u

        def random(self):
            return self.u

    p = np.array([0.25, 0.0, 0.5, 0.25])
    assert [sample(p, Fixed(u)) for u in (0.0, 0.2499, 0.25, 0.7499, 0.75, 1 - 2**-53)] == [
        0, 0, 2, 2, 3, 3
    ]
    # Rounding u * total up to total must not fall onto a trailing zero-probability token.
    assert sample(np.array([0.3, 0.7, 0.0]), Fixed(1 - 2**-53)) == 1


@pytest.mark.parametrize("probs", [np.zeros(3), np.array([0.5, -0.1, 0.6]), np.zeros(0)])
def test_sample_rejects_bad_probs(probs):
    with pytest.raises(ValueError):
        sample(probs, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# race_sample: exact on its own, and two races on shared keys agree often
# ---------------------------------------------------------------------------------------------


def test_race_sample_matches_distribution_over_positions():
    rng = np.random.default_rng(21)
    p = random_probs(rng, 12, zeros=3)
    samples = [race_sample(p, race_keys(5, pos, np.arange(p.size))) for pos in range(20_000)]
    assert_samples_match(samples, p)


def test_race_sample_on_sparse_entries_names_tokens():
    p = np.array([0.2, 0.5, 0.3])
    ids = np.array([7, 40, 41])
    samples = [race_sample(p, race_keys(1, pos, ids), ids) for pos in range(20_000)]
    assert set(samples) <= {7, 40, 41}
    assert_samples_match([int(np.flatnonzero(ids == x)[0]) for x in samples], p)


def test_races_on_shared_keys_agree_more_than_independent_draws():
    """The point of the race: a draft that is close to the target picks the
    target's token far more often than an independent draw would."""
    rng = np.random.default_rng(22)
    p = random_probs(rng, 50, zeros=0)
    q = 0.8 * p + 0.2 * random_probs(rng, 50, zeros=0)
    n = 5000
    shared = sum(race_sample(p, k) == race_sample(q, k) for k in (race_keys(3, i, np.arange(50)) for i in range(n))) / n
    independent = float(np.dot(p, q))
    overlap = float(np.minimum(p, q).sum())       # the best any coupling can do
    assert shared > 2 * independent
    assert shared <= overlap + 0.02


def test_race_keys_are_exponential_and_depend_on_every_coordinate():
    keys = race_keys(11, 3, np.arange(200_000))
    bins = np.minimum((np.exp(-keys) * 50).astype(int), 49)        # Exp(1) clocks <=> exp(-E) uniform
    assert_samples_match(bins, np.full(50, 1 / 50))
    across = np.array([race_keys(11, pos, np.array([0]))[0] for pos in range(20_000)])   # one token, many positions
    assert_samples_match(np.minimum((np.exp(-across) * 20).astype(int), 19), np.full(20, 1 / 20))
    one = race_keys(11, 3, np.array([5]))[0]
    assert one == keys[5]                                  # a token's clock does not depend on the others asked
    assert len({one, race_keys(12, 3, np.array([5]))[0], race_keys(11, 4, np.array([5]))[0],
                race_keys(11, 3, np.array([6]))[0]}) == 4


def test_race_sample_at_uses_only_the_support():
    """A full-vocabulary distribution and its sparse form race identically."""
    rng = np.random.default_rng(23)
    p = random_probs(rng, 40, zeros=25)
    ids = np.flatnonzero(p)
    for pos in range(300):
        assert race_sample_at(p, 9, pos) == race_sample_at(p[ids], 9, pos, ids)


def test_race_sample_rejects_bad_probs():
    with pytest.raises(ValueError):
        race_sample(np.zeros(3), np.ones(3))
    with pytest.raises(ValueError):
        race_sample(np.array([0.5, -0.1]), np.ones(2))
