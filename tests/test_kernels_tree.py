"""Draft trees: shape rules, wire packing, greedy acceptance, and recursive rejection sampling that
keeps the target distribution exactly (by enumeration, and by chi-square on many draws)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kernels.rejection import residual_probs, sample_residual
from kernels.sampling import (STREAM_ACCEPT, STREAM_RESIDUAL, STREAM_TARGET, race_keys, race_sample_at,
                              rng_for, sample)
from kernels.sparse import SparseDist, quantize_dist
from kernels.tree import (DraftTree, accept_greedy, accept_probability, accept_sampled, main_length,
                          merge_chained, pack_parents, race_draws, runner_up_accept, unpack_parents)
from tests.test_kernels_sampling import assert_samples_match, chi2_pvalue, random_probs

# A tree of 7 nodes below the root (depth-first, first children first):
#   root ─ 0 ─ 1 ─ 2        main chain 0-1-2
#        │   └ 3 ─ 4       sibling of 1 with a child
#        └ 5 ─ 6           sibling of 0 with a child
TOKENS = (10, 11, 12, 13, 14, 15, 16)
PARENTS = (-1, 0, 1, 0, 3, -1, 5)


def test_tree_shape_queries():
    t = DraftTree(TOKENS, PARENTS)
    assert t.children(-1) == [0, 5] and t.children(0) == [1, 3] and t.children(2) == []
    assert [t.depth(i) for i in range(7)] == [0, 1, 2, 1, 2, 0, 1]
    assert t.main_chain() == [0, 1, 2] and t.path_to(4) == [0, 3, 4]
    assert t.height == 3 and t.shape() == "2-2-1" and not t.is_chain
    c = DraftTree.chain([5, 6, 7])
    assert c.is_chain and c.parents == (-1, 0, 1) and c.shape() == "1-1-1" and c.main_chain() == [0, 1, 2]


@pytest.mark.parametrize("parents, why", [
    ((-1, 0, 2), "not depth-first"),          # a parent after its child
    ((-1, 0, 0, 1), "not depth-first"),       # back into a finished subtree
    ((0,), "not depth-first"),
    ((-1, 0), "parents"),                     # wrong length for 3 tokens
])
def test_tree_rejects_malformed_shapes(parents, why):
    with pytest.raises(ValueError, match=why):
        DraftTree(tuple(range(len(parents) if why != "parents" else 3)), parents)


def test_tree_rejects_repeated_siblings():
    with pytest.raises(ValueError, match="repeats a sibling"):
        DraftTree((4, 4), (-1, -1))


@pytest.mark.parametrize("parents", [(), (-1,), (-1, 0, 1, 2), PARENTS, (-1, -1, -1), (-1, 0, 0, 0, 3, 3, -1)])
def test_parents_round_trip(parents):
    data = pack_parents(parents)
    assert unpack_parents(data, len(parents)) == list(parents)


def test_parents_cost_nothing_for_a_chain_and_two_bytes_per_sibling():
    assert pack_parents((-1, 0, 1, 2, 3)) == b""
    # a chain of 4 plus one sibling at each depth: 4 extra nodes, 8 bytes
    parents = (-1, 0, 1, 2, 2, 1, 0, -1)
    assert len(pack_parents(parents)) == 2 * 4


@pytest.mark.parametrize("data, n", [(b"\x05\x00", 3), (b"\x01\x05", 3), (b"\x01", 3), (b"\x80", 2)])
def test_unpack_parents_rejects_garbage(data, n):
    with pytest.raises(ValueError):
        unpack_parents(data, n)


# ---------------------------------------------------------------------------------------------
# Greedy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argmax, path, token", [
    # argmax rows: root, then nodes 0..6
    ((10, 11, 12, 0, 0, 0, 0, 0), [0, 1, 2], 0),      # main chain, bonus after the leaf
    ((10, 13, 0, 0, 14, 99, 0, 0), [0, 3, 4], 99),    # sibling at depth 1, then its child
    ((15, 0, 0, 0, 0, 0, 16, 7), [5, 6], 7),          # sibling at the root
    ((10, 13, 0, 0, 3, 0, 0, 0), [0, 3], 3),          # the sibling's child rejected: correction 3
    ((42, 0, 0, 0, 0, 0, 0, 0), [], 42),              # nothing accepted
])
def test_accept_greedy_table(argmax, path, token):
    assert accept_greedy(DraftTree(TOKENS, PARENTS), argmax) == (path, token)


def test_accept_greedy_on_a_chain_is_verify_greedy():
    from kernels.rejection import verify_greedy
    rng = np.random.default_rng(0)
    for _ in range(200):
        draft = list(rng.integers(0, 3, 5))
        target = list(rng.integers(0, 3, 6))
        path, tok = accept_greedy(DraftTree.chain(draft), target)
        assert (len(path), tok) == verify_greedy(draft, target)


def test_accept_greedy_rejects_wrong_row_count():
    with pytest.raises(ValueError):
        accept_greedy(DraftTree(TOKENS, PARENTS), [0] * 7)


# ---------------------------------------------------------------------------------------------
# Sampled: exactness by enumeration (one node, k children drawn without replacement)
# ---------------------------------------------------------------------------------------------


def enumerate_node(p: np.ndarray, q: np.ndarray, k: int, update_p: bool = True) -> tuple[np.ndarray, float]:
    """Slow reference: the distribution of the token a node with k children outputs, and the
    mass of the outcomes where one of the children was accepted, by enumerating every ordered
    draw of k distinct children from q and every accept/reject outcome, written from the
    scheme's definition with plain loops."""
    v = p.size
    out, accepted = np.zeros(v), 0.0
    support = [t for t in range(v) if q[t] > 0]
    for kids in itertools.permutations(support, min(k, len(support))):
        # probability of drawing these children in this order, without replacement
        w, left = 1.0, 1.0
        for x in kids:
            w *= q[x] / left
            left -= q[x]
        pi, qi, reach = p.copy(), q.copy(), 1.0
        for x in kids:
            a = min(1.0, pi[x] / qi[x])
            out[x] += w * reach * a
            accepted += w * reach * a
            reach *= 1.0 - a
            if update_p:
                pi = residual_probs(pi, qi)
            qi = qi.copy()
            qi[x] = 0.0
            if qi.sum() > 0:
                qi /= qi.sum()
        out += w * reach * pi
    return out, accepted


def exact_node_output(p: np.ndarray, q: np.ndarray, k: int, update_p: bool = True) -> np.ndarray:
    return enumerate_node(p, q, k, update_p)[0]


@pytest.mark.parametrize("seed, v, k", [(0, 4, 1), (1, 4, 2), (2, 5, 3), (3, 6, 2), (4, 5, 4)])
def test_recursive_rejection_outputs_p_exactly(seed, v, k):
    rng = np.random.default_rng(seed)
    p = random_probs(rng, v, zeros=1)
    q = random_probs(rng, v, skew=0.5)
    np.testing.assert_allclose(exact_node_output(p, q, k), p, atol=1e-12)


@pytest.mark.parametrize("seed, v, k", [(0, 4, 1), (1, 5, 2), (2, 6, 3), (3, 4, 4), (4, 7, 2), (5, 3, 3)])
def test_accept_probability_matches_enumeration(seed, v, k):
    rng = np.random.default_rng(seed)
    p = random_probs(rng, v, zeros=1)
    q = quantize_dist(random_probs(rng, v, skew=0.5), bits=16)
    dense = q.dense(v)
    want = enumerate_node(p, dense, k)[1]
    assert accept_probability(p, q, k) == pytest.approx(want, abs=1e-12)
    if k == 1:
        assert want == pytest.approx(np.minimum(p, dense).sum(), abs=1e-12)
    # a wider node never accepts less
    assert accept_probability(p, q, k + 1) >= accept_probability(p, q, k) - 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_runner_up_accept_is_the_second_childs_test(seed):
    """The sibling a tree would carry is the race's runner-up, and its acceptance after the
    chain's token was rejected is the second child's test in accept_sampled, written densely."""
    rng = np.random.default_rng(seed)
    v = 9
    p = random_probs(rng, v, zeros=2)
    q = quantize_dist(random_probs(rng, v, skew=0.5), bits=8)
    keys = race_keys(seed, 40 + seed, q.ids)
    x, y = race_draws(q, keys, 2)
    got = runner_up_accept(p, q, x, keys)
    dense = q.dense(v)
    p2 = residual_probs(p, dense)
    q2 = dense.copy()
    q2[x] = 0.0
    q2 /= q2.sum()
    assert got[0] == y and got[1] == pytest.approx(min(1.0, p2[y] / q2[y]), abs=1e-12)
    assert runner_up_accept(p, SparseDist([x], [1], 1), x, keys[:1]) is None


def test_enumeration_catches_a_scheme_that_keeps_testing_against_p():
    # Trying every sibling against the original p (no residual update) over-weights the
    # siblings' tokens: the same reference must see it.
    rng = np.random.default_rng(3)
    p = random_probs(rng, 6)
    q = random_probs(rng, 6, skew=0.5)
    assert np.abs(exact_node_output(p, q, 2, update_p=False) - p).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Sampled: accept_sampled itself, chi-square against a Markov toy target
# ---------------------------------------------------------------------------------------------

V = 6
N_TRIALS = 12_000


def toy_models(seed: int):
    """A first-order Markov target p(next | prev) and draft q(next | prev) on V tokens."""
    rng = np.random.default_rng(seed)
    p_root = random_probs(rng, V, zeros=1)
    p_next = np.stack([random_probs(rng, V, zeros=1) for _ in range(V)])
    q_root = quantize_dist(random_probs(rng, V, skew=0.5), bits=8)
    q_next = [quantize_dist(random_probs(rng, V, skew=0.5), bits=8) for _ in range(V)]
    return p_root, p_next, q_root, q_next


def draw_tree(rng, q_root, q_next, widths=(3, 2)) -> tuple[DraftTree, list]:
    """Root with widths[0] children drawn without replacement from q_root; each child gets
    widths[1] children from q_next[child]. Depth-first order."""
    tokens, parents, qs = [], [], []

    def without_replacement(q: SparseDist, k: int) -> list[int]:
        w = q.weights.astype(np.float64)
        picks = rng.choice(q.ids.size, size=min(k, q.ids.size), replace=False, p=w / w.sum())
        return [int(q.ids[i]) for i in picks]

    for i, x in enumerate(without_replacement(q_root, widths[0])):
        node = len(tokens)
        tokens.append(x), parents.append(-1), qs.append(q_root if i == 0 else None)
        for j, y in enumerate(without_replacement(q_next[x], widths[1])):
            tokens.append(y), parents.append(node), qs.append(q_next[x] if j == 0 else None)
    return DraftTree(tokens, parents), qs


def two_tokens(tree, qs, p_root, p_next, rng, accept=accept_sampled) -> tuple[int, int]:
    """The first two output tokens: the path, the token after it, and (if only one token was
    decided) the second drawn from the target itself, as the next pass would."""
    probs = [p_root] + [p_next[t] for t in tree.tokens]
    path, token = accept(tree, probs, qs, lambda d, s: rng)   # one stream serves every decision here
    out = [tree.tokens[i] for i in path] + [token]
    if len(out) == 1:
        out.append(sample(p_next[out[0]], rng))
    return out[0], out[1]


def joint_pvalue(pairs, p_root, p_next) -> float:
    counts = np.zeros(V * V)
    for a, b in pairs:
        counts[a * V + b] += 1
    return chi2_pvalue(counts, (p_root[:, None] * p_next).reshape(-1))


@pytest.mark.parametrize("seed, widths", [(0, (3, 2)), (1, (2, 1)), (2, (1, 3)), (3, (4, 2))])
def test_accept_sampled_first_two_tokens_follow_the_target(seed, widths):
    p_root, p_next, q_root, q_next = toy_models(seed)
    rng = np.random.default_rng(1000 + seed)
    pairs = [two_tokens(*draw_tree(rng, q_root, q_next, widths), p_root, p_next, rng) for _ in range(N_TRIALS)]
    assert joint_pvalue(pairs, p_root, p_next) > 0.001


def broken_accept(tree, probs, qs, rng):
    """The classic mistake for multi-draft: each sibling tested against the original p."""
    path, node, d = [], -1, 0
    while True:
        p = probs[node + 1]
        kids = tree.children(node)
        if not kids:
            return path, sample(p, rng(d, STREAM_TARGET))
        q, u = qs[kids[0]], rng(d, STREAM_ACCEPT)
        hit = next((c for c in kids if u.random() < min(1.0, p[tree.tokens[c]] / q.prob(tree.tokens[c]))), None)
        if hit is None:
            return path, sample_residual(p, q, rng(d, STREAM_RESIDUAL))
        path.append(hit)
        node, d = hit, d + 1


def test_chi_square_catches_siblings_tested_against_the_original_p():
    p_root, p_next, q_root, q_next = toy_models(0)
    rng = np.random.default_rng(7)
    pairs = [two_tokens(*draw_tree(rng, q_root, q_next, (3, 2)), p_root, p_next, rng, accept=broken_accept)
             for _ in range(N_TRIALS)]
    assert joint_pvalue(pairs, p_root, p_next) < 1e-6


def test_accept_sampled_on_a_chain_takes_the_single_draft_decisions():
    """Same uniforms, same residual draw as the chain verifier (cloud/session.py)."""
    rng = np.random.default_rng(5)
    seed = 11
    for trial in range(300):
        ps = [random_probs(rng, V) for _ in range(4)]
        qs = [quantize_dist(random_probs(rng, V, skew=0.5), bits=8) for _ in range(3)]
        draft = [qs[i].sample(rng) for i in range(3)]
        path, tok = accept_sampled(DraftTree.chain(draft), ps, qs, lambda d, s: rng_for(seed, 100 * trial + d, s))
        # the chain reference, written as the session does it
        n, want = 3, None
        for i, x in enumerate(draft):
            if not rng_for(seed, 100 * trial + i, STREAM_ACCEPT).random() < min(1.0, ps[i][x] / qs[i].prob(x)):
                n, want = i, sample_residual(ps[i], qs[i], rng_for(seed, 100 * trial + i, STREAM_RESIDUAL))
                break
        if want is None:
            want = sample(ps[3], rng_for(seed, 100 * trial + 3, STREAM_TARGET))
        assert (len(path), tok) == (n, want)


def test_accept_sampled_rejects_a_child_outside_its_q():
    t = DraftTree((1, 2), (-1, -1))
    q = SparseDist([1, 5], [200, 55], 255)
    p = np.full(V, 1 / V)
    p0 = np.zeros(V)                  # p(1) = 0: child 0 is surely rejected, child 2 is tried
    p0[3] = 1.0
    with pytest.raises(ValueError, match="q = 0"):
        accept_sampled(t, [p0, p, p], [q, None], lambda d, s: rng_for(0, d, s))


def test_race_draws_are_draws_without_replacement_led_by_race_sample():
    rng = np.random.default_rng(9)
    q = quantize_dist(random_probs(rng, 8, skew=0.7), bits=8)
    firsts, seconds = [], []
    for pos in range(6000):
        keys = race_keys(3, pos, q.ids)
        a, b = race_draws(q, keys, 2)
        assert a == race_sample_at(q.weights, 3, pos, q.ids) and a != b
        firsts.append(a)
        seconds.append(b)
    dense = q.dense(8)
    assert_samples_match(firsts, dense)
    # the runner-up's marginal: sum over winners w of q(w) * q(y) / (1 - q(w))
    second = np.array([sum(dense[w] * dense[y] / (1 - dense[w]) for w in range(8) if w != y) for y in range(8)])
    assert_samples_match(seconds, second)


def test_subtree_re_roots_what_is_below_a_decided_node():
    t = DraftTree(TOKENS, PARENTS)
    sub, kept = t.subtree(0)
    assert kept == [1, 2, 3, 4] and sub.tokens == (11, 12, 13, 14) and sub.parents == (-1, 0, -1, 2)
    assert t.subtree(2)[1] == [] and t.subtree(5)[0].tokens == (16,)


def test_main_length_and_leaves_off_main():
    t = DraftTree(TOKENS, PARENTS)
    assert main_length(t.parents) == 3 and t.leaves_off_main() == [4, 6]
    assert main_length((-1, 0, 1)) == 3 and main_length(()) == 0


def test_merge_chained_hangs_each_block_below_the_previous_main_leaf():
    a = DraftTree((1, 2, 3, 9), (-1, 0, 1, 0))           # chain 1-2-3, sibling 9 of 2
    b = DraftTree((4, 5, 8), (-1, 0, -1))                # chain 4-5, sibling 8 of 4
    c = DraftTree.chain([6])
    m, origin = merge_chained([a, b, c])
    assert m.main_chain() == [0, 1, 2, 3, 4, 5] and [m.tokens[i] for i in m.main_chain()] == [1, 2, 3, 4, 5, 6]
    # 8 is a sibling of 4 (child of 3), 9 a sibling of 2 (child of 1)
    assert {m.tokens[i]: m.tokens[m.parents[i]] for i in range(len(m)) if i not in m.main_chain()} == {8: 3, 9: 1}
    assert [origin[i] for i in range(len(m)) if m.tokens[i] in (8, 9)] == [(1, 2), (0, 3)]
    assert merge_chained([DraftTree.chain([1, 2])])[0] == DraftTree.chain([1, 2])


def test_pruned_drops_the_deepest_last_siblings_first():
    t = DraftTree((1, 2, 3, 4, 5, 6), (-1, 0, 1, 1, 0, -1))   # main 1-2-3; siblings 4 (of 3), 5 (of 2), 6 (of 1)
    assert t.leaves_off_main() == [3, 4, 5]
    p, kept = t.pruned(1)
    assert kept == [0, 1, 2, 5] and p.tokens == (1, 2, 3, 6) and p.parents == (-1, 0, 1, -1)
    assert t.pruned(3) == (t, list(range(6)))
