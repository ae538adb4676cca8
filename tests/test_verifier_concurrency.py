"""Many edges, one verifier: sessions batched together stay exact.

Real verifier behind real link-sim, real drafters, several sessions at once
(threads, one client each), so the scheduler batches their steps into shared
passes. Which steps share a pass depends on timing; what is checked never does:
every session's greedy output equals the target's own, and sampled output
follows the target's distribution.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from edge.agent import Agent
from edge.client import VerifierClient
from edge.config import GenConfig
from kernels.sampling import SamplingConfig
from tests.conftest import PROMPTS
from tests.test_speculative_greedy import assert_equal_to_reference
from tests.test_speculative_sampled import N_SAMPLES, PROMPT, SAMPLING, marginals, pvalue

N_NEW = 32


@pytest.fixture(scope="module")
def drafters():
    from edge.derive import DEFAULT_DRAFT, ensure
    from edge.llama_model import LlamaDrafter
    ds = [LlamaDrafter(ensure(DEFAULT_DRAFT, quiet=True), n_threads=1) for _ in range(6)]
    yield ds
    for d in ds:
        d.close()


def run_concurrently(fns) -> list:
    out, errors = [None] * len(fns), []

    def call(i):
        try:
            out[i] = fns[i]()
        except Exception as e:  # noqa: BLE001 - reported below with its session
            errors.append((i, e))
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"sessions failed: {errors}"
    return out


def generate(address, drafter, tokenizer, prompt, cfg):
    client = VerifierClient(address)
    client.wait_ready()
    try:
        return Agent(client, drafter, tokenizer.fingerprint, tokenizer.n_vocab, tokenizer.eos).generate(prompt, cfg)
    finally:
        client.close()


def test_eight_concurrent_sessions_of_mixed_modes_each_equal_the_target(wan, drafters, tokenizer, reference):
    """picospec (both codecs, lead on and off), sync and cloud-only; prompts of 15 to ~150 tokens."""
    long_prompt = " ".join(PROMPTS[:12])
    texts = [PROMPTS[0], long_prompt, PROMPTS[3], PROMPTS[5], PROMPTS[8], PROMPTS[11], PROMPTS[14], PROMPTS[17]]
    modes = [dict(mode="picospec", codec="P"), dict(mode="picospec", codec="Q", cloud_lead=False),
             dict(mode="sync"), dict(mode="cloud-only"), dict(mode="picospec", codec="P", cloud_lead=False),
             dict(mode="sync"), dict(mode="cloud-only"), dict(mode="picospec", codec="Q")]
    prompts = [tokenizer.encode(t) for t in texts]
    refs = [reference.greedy(p, N_NEW) for p in prompts]
    free = iter(drafters)
    jobs = []
    for p, m in zip(prompts, modes):
        d = None if m["mode"] == "cloud-only" else next(free)
        cfg = GenConfig(max_tokens=N_NEW, stop_at_eos=False, adaptive=False, gamma=4, **m)
        jobs.append(lambda p=p, d=d, cfg=cfg: generate(wan.address, d, tokenizer, p, cfg))
    results = run_concurrently(jobs)
    for k, (c, (ref, gaps), m) in enumerate(zip(results, refs, modes)):
        assert len(c.tokens) == N_NEW and c.stats.fallback is None, (k, m, c.stats.fallback)
        assert_equal_to_reference(c.tokens, ref, gaps, f"session {k} {m} ({len(prompts[k])}-token prompt)")


def test_sampled_output_follows_the_target_with_four_sessions_batched(cloud, drafters, tokenizer, reference):
    """The chi-square check of test_speculative_sampled, its 400 completions run by 4
    concurrent sessions (codec Q, the first position led and the rest verified)."""
    prompt = tokenizer.encode(PROMPT, raw=True)
    dists = marginals(reference.model, prompt)

    def worker(w: int):
        client = VerifierClient(cloud.address)
        client.wait_ready()
        agent = Agent(client, drafters[w], tokenizer.fingerprint, tokenizer.n_vocab, tokenizer.eos)
        rows = []
        try:
            for seed in range(w, N_SAMPLES, 4):
                cfg = GenConfig(mode="picospec", codec="Q", gamma=2, window=2, adaptive=False, max_tokens=3,
                                stop_at_eos=False, lead_first=1, sampling=SamplingConfig(seed=seed, **SAMPLING))
                c = agent.generate(prompt, cfg)
                rows.append((c.tokens, c.stats.verified, c.stats.leads))
        finally:
            client.close()
        return rows
    rows = [r for part in run_concurrently([lambda w=w: worker(w) for w in range(4)]) for r in part]
    samples = np.array([r[0] for r in rows])
    assert samples.shape == (N_SAMPLES, 3)
    assert sum(r[1] for r in rows) > 0 and sum(r[2] for r in rows) == N_SAMPLES
    for pos in range(3):
        p = pvalue(samples[:, pos], dists[pos])
        print(f"4 sessions, codec Q, token {pos + 1}: chi-square p = {p:.3f}")
        assert p > 0.01, f"token {pos + 1} does not follow the target (p={p:.2g})"
