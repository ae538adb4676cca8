"""Draft trees end to end: exact logits, the target's own greedy output, the target's distribution.

- Tree nodes' logits, evaluated by the verifier's scheduler (the main chain in the session's
  sequence, each branch in a scratch sequence copied from it once the main chain is in, evaluating
  its own nodes from its fork), are bit-identical
  to the same positions decoded as a chain, one token at a time.
- Greedy picospec with a tree on every block (`--tree always`) equals the target's greedy output
  on the foundation's prompts, with siblings really taken by the verifier.
- At T=0.8 the first three tokens follow the target's exact marginals (chi-square, 400 samples)
  with trees on every block, codec Q.
Everything is real: cloud-verifier and link-sim on loopback, llama.cpp models.
"""
from __future__ import annotations

import numpy as np
import pytest

from cloud.scheduler import Scheduler, Step
from cloud.target import Chunk, Target
from edge.agent import Agent
from edge.client import VerifierClient
from edge.config import GenConfig
from edge.picospec import Speculator
from edge.planner import Planner
from edge.model_files import shipped_gguf
from kernels.sampling import SamplingConfig
from kernels.tree import DraftTree
from tests.conftest import PROMPTS
from tests.test_speculative_greedy import assert_equal_to_reference, generate
from tests.test_speculative_sampled import N_SAMPLES, SAMPLING, exact, pvalue  # noqa: F401 - fixture

N_NEW = 32


def test_tree_nodes_logits_are_bit_identical_to_chain_decoding():
    rng = np.random.default_rng(3)
    target = Target(shipped_gguf(), n_ctx=256, n_seqs=4, n_threads=1)
    ref = Target(shipped_gguf(), n_ctx=256, n_seqs=1, n_threads=1)

    def chain(seq):
        ref.clear(0)
        return np.concatenate([ref.decode([Chunk(0, i, [t], 1)])[0] for i, t in enumerate(seq)])

    sched = Scheduler(target)
    sched.start()
    try:
        prompt = [int(x) for x in rng.integers(100, 40000, size=37)]
        sched.submit(Step(0, 0, prompt, 1, prefill=True)).result()
        # rejected drafts left in the session's cache, as after a real rejection
        sched.submit(Step(0, len(prompt), [11, 12, 13], 3)).result()
        n = len(prompt)
        # main chain a-b-c-d; siblings at levels 0 and 2, one with a child of its own
        tree = DraftTree((501, 502, 503, 504, 777, 888, 999), (-1, 0, 1, 2, 1, -1, 5))
        main = [tree.tokens[i] for i in tree.main_chain()]
        paths = [tree.path_to(leaf) for leaf in tree.leaves_off_main()]
        forks = [next(d for d, i in enumerate(p) if i not in tree.main_chain()) for p in paths]
        assert len(paths) == 2 and forks == [2, 0]

        def check(branches_first: bool) -> int:
            """As the verifier does it: each branch copies the session's sequence once the main
            chain is in it and evaluates its own nodes from its fork. Returns the passes taken."""
            own = Step(0, n, main, len(main))
            branches = [Step(1 + k, n + f, [tree.tokens[i] for i in p[f:]], len(p) - f,
                             copy_from=0, after=own) for k, (p, f) in enumerate(zip(paths, forks))]
            before = sched.passes
            sched.submit_many(branches + [own] if branches_first else [own] + branches)
            assert np.array_equal(own.future.result(), chain(prompt + main)[n:])
            for p, f, b in zip(paths, forks, branches):
                assert np.array_equal(b.future.result(), chain(prompt + [tree.tokens[i] for i in p])[n + f:]), \
                    f"branch {p}"
            return sched.passes - before

        # In one pass: the branches' copies must wait for a second decode, after the main chain.
        assert check(branches_first=False) == 1
        # Queued before their source: held back to the next pass.
        assert check(branches_first=True) == 2
        # A branch copied at the start of a pass evaluates its whole path.
        whole = sched.submit(Step(3, n, [tree.tokens[i] for i in paths[0]], len(paths[0]),
                                  copy_from=0))
        assert np.array_equal(whole.result(), chain(prompt + [tree.tokens[i] for i in paths[0]])[n:])
    finally:
        sched.stop()
        target.close()
        ref.close()



@pytest.mark.parametrize("codec, prompts", [
    pytest.param("P", PROMPTS, marks=pytest.mark.slow, id="P-20-prompts"),   # ~2 min
    pytest.param("Q", PROMPTS[:4], id="Q-4-prompts"),
])
def test_greedy_with_trees_equals_target(wan, drafter, tokenizer, reference, codec, prompts):
    """Every block a tree; no cloud lead, so every position is verified (on one CPU the
    real target would otherwise lead nearly all of them)."""
    hits = sent = 0
    for k, text in enumerate(prompts):
        prompt = tokenizer.encode(text)
        ref, gaps = reference.greedy(prompt, N_NEW)
        c = generate(wan.address, drafter, tokenizer, prompt, mode="picospec", codec=codec, gamma=4, window=2,
                     adaptive=False, cloud_lead=False, tree="always", max_tokens=N_NEW, stop_at_eos=False)
        assert len(c.tokens) == N_NEW and c.stats.fallback is None
        assert_equal_to_reference(c.tokens, ref, gaps, f"tree, codec {codec}, prompt {k}")
        hits += c.stats.tree["sibling_hits"]
        sent += c.stats.tree["siblings"]
    print(f"greedy trees, codec {codec}: {sent} siblings sent, {hits} taken")
    assert sent > 0 and (hits > 0 or len(prompts) < 8), "the tree path must have been exercised"


@pytest.mark.parametrize("sampling", [{}, dict(temperature=0.8, top_k=8, seed=5)], ids=["greedy", "T=0.8"])
def test_chains_measure_what_a_sibling_would_have_yielded(wan, drafter, tokenizer, monkeypatch, sampling):
    """`auto` on chains learns trees' yield without sending siblings: after every verdict the
    edge scores its best unsent sibling (T=0: is it the target's token; T>0: the verifier's
    sibling_accept at the rejected position, a probability).

    Which blocks are rejected, and where, depends on the sampled path, which differs between
    llama.cpp builds: the test checks that each score is what the verdict said, not its value."""
    seen, from_verifier = [], []
    real_plan, real_sib, real_observe = Planner.plan, Planner.observe_siblings, Speculator._observe_unsent_sibling

    def spy(self, hits, sent):
        seen.append((hits, sent))
        return real_sib(self, hits, sent)
    monkeypatch.setattr(Planner, "observe_siblings", spy)
    monkeypatch.setattr(Planner, "plan", _chains_only(real_plan))

    def observe(self, b, v, n_chain, led):
        before = len(seen)
        real_observe(self, b, v, n_chain, led)
        if v.HasField("sibling_accept"):
            from_verifier.append((seen[-1][0] if len(seen) > before else None, v.sibling_accept))
    monkeypatch.setattr(Speculator, "_observe_unsent_sibling", observe)
    for text in PROMPTS[1:3]:
        c = generate(wan.address, drafter, tokenizer, tokenizer.encode(text), mode="picospec", codec="Q",
                     gamma=4, window=2, adaptive=False, cloud_lead=False, tree="auto", max_tokens=N_NEW,
                     stop_at_eos=False, sampling=SamplingConfig(**sampling))
        assert c.stats.tree["siblings"] == 0, "the plan kept chains"
    scored = [h for h, n in seen if n == 1]
    assert len(scored) >= 4, f"every verified chain block scores its best sibling, got {seen}"
    assert all(0.0 <= h <= 1.0 for h in scored)
    if sampling:
        # a rejection somewhere in 64 tokens sampled at T=0.8 (this pair accepts ~0.8 a token)
        assert from_verifier, f"T>0: no verdict carried the verifier's sibling_accept (scores {scored})"
        assert all(0.0 <= q <= 1.0 for _, q in from_verifier), from_verifier
        # the score is the verifier's probability, or 0 where the rejection fell on another level
        assert all(h is None or h in (0.0, q) for h, q in from_verifier), from_verifier
    else:
        assert set(scored) <= {0.0, 1.0}


def _chains_only(plan):
    def chains(self, *a, **k):
        p = plan(self, *a, **k)
        p.tree_budget = 0
        return p
    return chains


@pytest.mark.slow   # ~2.5 min
def test_first_three_tokens_follow_the_target_with_trees(cloud, drafter, tokenizer, exact):  # noqa: F811
    prompt, dists = exact
    client = VerifierClient(cloud.address)
    client.wait_ready()
    agent = Agent(client, drafter, tokenizer.fingerprint, tokenizer.n_vocab, tokenizer.eos)
    rows, hits, sent = [], 0, 0
    try:
        for seed in range(N_SAMPLES):
            cfg = GenConfig(mode="picospec", codec="Q", gamma=3, window=1, adaptive=False, max_tokens=3,
                            stop_at_eos=False, cloud_lead=False, tree="always",
                            sampling=SamplingConfig(seed=seed, **SAMPLING))
            c = agent.generate(prompt, cfg)
            rows.append(c.tokens)
            hits += c.stats.tree["sibling_hits"]
            sent += c.stats.tree["siblings"]
    finally:
        client.close()
    samples = np.array(rows)
    print(f"sampled trees: {sent} siblings sent, {hits} taken")
    assert hits > 0, "siblings must have been taken, or the check proves nothing about trees"
    for pos in range(3):
        p = pvalue(samples[:, pos], dists[pos])
        print(f"trees, token {pos + 1}: chi-square p = {p:.3f}")
        assert p > 0.01, f"trees: token {pos + 1} does not follow the target (p={p:.2g})"


@pytest.mark.parametrize("case, why", [
    ("not-depth-first", "not depth-first"),
    ("repeated-sibling", "repeats a sibling"),
    ("codec-p-sampled", "codec P cannot carry draft trees"),
    ("later-sibling-with-q", "later sibling"),
])
def test_bad_trees_are_refused_and_the_verifier_keeps_serving(cloud, tokenizer, case, why):
    import grpc

    from kernels import packing
    from kernels.sparse import SparseDist
    from kernels.tree import pack_parents
    from proto import tandem_pb2 as pb
    from proto import tandem_pb2_grpc as pb_grpc
    from tests.test_verifier_errors import assert_serving, expect, speculate
    ch = grpc.insecure_channel(cloud.address)
    s = pb_grpc.VerifierStub(ch)
    try:
        sampled = case in ("codec-p-sampled", "later-sibling-with-q")
        r = s.Open(pb.OpenRequest(fingerprint=tokenizer.fingerprint, prompt=tokenizer.encode("Hello there"),
                                  codec=pb.CODEC_P if case == "codec-p-sampled" else pb.CODEC_Q,
                                  sampling=pb.Sampling(temperature=0.8, seed=1) if sampled else None))
        assert r.tree_branches > 0
        n = len(tokenizer.encode("Hello there"))
        tokens, parents = [28, 29, 30], [-1, 0, -1]
        if case == "not-depth-first":
            tokens, parents = [28, 29, 30, 31, 32], [-1, 0, 1, 0, 2]   # node 4 goes back below node 2
        if case == "repeated-sibling":
            tokens = [28, 29, 28]
        d = pb.Draft(epoch=0, start=n, tokens=packing.pack_tokens(tokens, r.token_width),
                     parents=pack_parents(parents))
        q = SparseDist([28, 29, 30], [100, 100, 55], 255)
        if case == "codec-p-sampled":
            d.q = packing.pack_u8([100, 100, 100])
        if case == "later-sibling-with-q":
            d.q_sparse.extend([packing.pack_sparse(q, r.token_width)] * 3)
        msg = expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: speculate(s, r, [d]))
        assert why in msg, msg
        assert_serving(ch, s, tokenizer)
    finally:
        ch.close()


def test_a_path_leaving_the_main_chain_at_a_block_end_answers_that_block_with_the_token():
    """Merged blocks [tree A of 4 levels, chain B]: the sibling at A's last level was taken.
    A's verdict must carry the path and the token after the sibling; B gets no verdict."""
    from cloud.server import split_verdict
    from cloud.session import VerdictData
    from proto import tandem_pb2 as pb
    group = [pb.Draft(epoch=2, start=10, tokens=b"\0" * 10, parents=b"\x04\x02"), pb.Draft(epoch=2, start=14,
                                                                                            tokens=b"\0" * 6)]
    v = VerdictData(2, 10, 4, token=77, path=[0, 0, 0, 1])
    out = split_verdict(v, group, [4, 3])
    assert len(out) == 1 and out[0].accepted == 4 and out[0].token == 77 and list(out[0].path) == [0, 0, 0, 1]
    full = split_verdict(VerdictData(2, 10, 7, token=None, path=[0] * 7), group, [4, 3])
    assert [o.accepted for o in full] == [4, 3] and not full[0].path and not full[1].HasField("token")
