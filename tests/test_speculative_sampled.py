"""Sampled speculative output follows the target's distribution exactly.

At T=0.8, top-k=8, the first three generated tokens of 400 independent
completions (seeds 0..399) are compared with the target's exact marginals,
computed by enumerating every branch (8 x 8) with the real model. Both
residual codecs, several blocks in flight, the real verifier on loopback.
The check can fail: a sampler that ignored q (accepting every draft) would
follow the drafter's distribution instead and is rejected (see the last test).
"""
from __future__ import annotations

import numpy as np
import pytest

from edge.agent import Agent
from edge.client import VerifierClient
from edge.config import GenConfig
from kernels.sampling import SamplingConfig, logits_to_probs
from tests.test_kernels_sampling import chi2_pvalue

PROMPT = "The best thing about summer is"
N_SAMPLES = 400
SAMPLING = dict(temperature=0.8, top_k=8)


def marginals(model, prompt: list[int], depth: int = 3) -> list[dict[int, float]]:
    """Exact distribution of each of the first `depth` generated tokens."""
    cfg = SamplingConfig(**SAMPLING)
    out = [dict() for _ in range(depth)]

    def walk(prefix: list[int], weight: float, level: int):
        model.truncate(len(prompt) + len(prefix) - 1 if prefix else 0)
        logits = model.eval(prompt if not prefix else [prefix[-1]])
        p = logits_to_probs(logits, cfg)
        for tok in np.nonzero(p)[0]:
            w = weight * p[tok]
            out[level][int(tok)] = out[level].get(int(tok), 0.0) + w
            if level + 1 < depth:
                walk(prefix + [int(tok)], w, level + 1)
                model.truncate(len(prompt) + len(prefix))

    model.truncate(0)
    walk([], 1.0, 0)
    return out


@pytest.fixture(scope="module")
def exact(reference, tokenizer):
    prompt = tokenizer.encode(PROMPT, raw=True)
    return prompt, marginals(reference.model, prompt)


def sample_first_tokens(address, drafter, tokenizer, prompt, codec, lead, n=N_SAMPLES):
    client = VerifierClient(address)
    client.wait_ready()
    agent = Agent(client, drafter, tokenizer.fingerprint, tokenizer.n_vocab, tokenizer.eos)
    rows, counts = [], {"tails": 0, "leads": 0, "accepted": 0, "verified": 0}
    try:
        for seed in range(n):
            # lead_first=1: the verifier leads the first position and verifies the other two,
            # on any machine (left to timing, a fast verifier led all three every time)
            cfg = GenConfig(mode="picospec", codec=codec, gamma=2, window=2, adaptive=False, max_tokens=3,
                            stop_at_eos=False, cloud_lead=lead, lead_first=1 if lead else 0,
                            sampling=SamplingConfig(seed=seed, **SAMPLING))
            c = agent.generate(prompt, cfg)
            rows.append(c.tokens)
            counts["tails"] += c.stats.tail_requests
            counts["leads"] += c.stats.leads
            counts["accepted"] += c.stats.accepted
            counts["verified"] += c.stats.verified
    finally:
        client.close()
    return np.array(rows), counts


def pvalue(samples: np.ndarray, dist: dict[int, float]) -> float:
    support = sorted(dist)
    index = {t: i for i, t in enumerate(support)}
    counts = np.zeros(len(support) + 1)
    for s in samples:
        counts[index.get(int(s), len(support))] += 1
    probs = np.array([dist[t] for t in support] + [0.0])
    return chi2_pvalue(counts, probs)


@pytest.mark.parametrize("lead", [True, False], ids=["lead", "no-lead"])
@pytest.mark.parametrize("codec", ["P", "Q"])
def test_first_three_tokens_match_target_marginals(cloud, drafter, tokenizer, exact, codec, lead):
    prompt, dists = exact
    samples, counts = sample_first_tokens(cloud.address, drafter, tokenizer, prompt, codec, lead)
    assert samples.shape == (N_SAMPLES, 3)
    print(f"codec {codec}, lead {lead}: {counts}")
    # both ways of deciding a position must have been exercised, or the check proves little
    assert counts["verified"] > 0 and counts["accepted"] > 0
    assert counts["leads"] == (N_SAMPLES if lead else 0)
    for pos in range(3):
        p = pvalue(samples[:, pos], dists[pos])
        print(f"codec {codec} token {pos + 1}: chi-square p = {p:.3f}")
        assert p > 0.01, f"codec {codec}: token {pos + 1} does not follow the target (p={p:.2g})"


def test_check_rejects_the_drafters_own_distribution(drafter, tokenizer, exact):
    """Sampling the drafter alone (what a broken accept test would produce) fails the same check."""
    prompt, dists = exact
    cfg = SamplingConfig(**SAMPLING)
    rng = np.random.default_rng(0)
    drafter.truncate(0)
    q = logits_to_probs(drafter.eval(prompt), cfg)
    samples = rng.choice(len(q), size=N_SAMPLES, p=q)
    assert pvalue(samples, dists[0]) < 0.01
