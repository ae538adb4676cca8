"""Draft trees: their shape, their wire form, and verifying them exactly.

A draft tree hangs below the last decided token (the *root*). Node i holds a token and the index
of its parent (-1: the root); nodes are in depth-first order with each node's children in the
order they were drawn, so the first-children path from the root (the *main chain*, what the edge
keeps drafting on) comes first, and a chain is simply a tree whose parents are 0..n-2 after -1.
A node at depth d (root children: d = 0) sits at absolute position start + d.

Children of one node are successive draws *without replacement* from one draft distribution q
(the edge takes the winner and runners-up of its exponential race, which is exactly that).

Verification walks down from the root along the *accepted path*:

- greedy: take the child whose token is the target's argmax at the current node; stop when none
  is. The next token (the argmax at the path's end) is the correction, or the bonus at a leaf.
- sampled (recursive rejection sampling, as SpecInfer's multi-step speculative sampling, here
  without replacement): at a node with target distribution p and children x_1..x_k drawn from
  q_1 = q, q_2 = q without x_1 (renormalised), ...: accept x_i with probability
  min(1, p_i(x_i) / q_i(x_i)), where p_1 = p and p_{i+1} = norm(max(0, p_i - q_i)); after every
  child is rejected, draw the correction from p_{k+1}. Each try is one ordinary speculative step
  (x_i ~ q_i whatever happened before), which outputs p_i exactly; so the node outputs p exactly,
  however many children it has. (With replacement, a repeated child would always be rejected:
  x_1 was rejected only if p(x_1) < q(x_1), so p_2(x_1) = 0.)

Codec P cannot carry trees at T > 0: the second child's test needs p_2(x_2) = (p(x_2) -
q(x_2))+ / Z with Z = sum_y (p(y) - q(y))+, a sum over q's whole support, which the cloud in
codec P never sees (it gets q(x) of the drafted token only); and the edge, which would draw the
correction from p_{k+1}, would need Z as well but knows p only on its top entries. Codec Q sends
q up, so the cloud runs the whole recursion. Trees at T > 0 therefore use codec Q; at T = 0 both
codecs carry them (only token ids are compared).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from kernels.packing import decode_varint, encode_varint
from kernels.rejection import residual_probs, sample_residual
from kernels.sampling import STREAM_ACCEPT, STREAM_RESIDUAL, STREAM_TARGET, sample
from kernels.sparse import SparseDist

__all__ = [
    "DraftTree",
    "accept_probability",
    "accept_greedy",
    "main_length",
    "merge_chained",
    "accept_sampled",
    "race_draws",
    "runner_up_accept",
    "pack_parents",
    "unpack_parents",
]

ROOT = -1


@dataclass(frozen=True)
class DraftTree:
    tokens: tuple[int, ...]
    parents: tuple[int, ...]          # parent node index, ROOT (-1) for the root's children

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
        object.__setattr__(self, "parents", tuple(int(p) for p in self.parents))
        n = len(self.tokens)
        if len(self.parents) != n:
            raise ValueError(f"{n} tokens but {len(self.parents)} parents")
        depth: list[int] = []
        stack: list[int] = []         # the path from the root to the previous node
        seen: dict[int, set] = {}
        for i, p in enumerate(self.parents):
            # Depth-first order: a node's parent is the previous node or one of its ancestors.
            while stack and stack[-1] != p:
                stack.pop()
            if p != ROOT and not stack:
                raise ValueError(f"node {i}: parent {p} is not on the path to node {i - 1} (not depth-first)")
            kids = seen.setdefault(p, set())
            if self.tokens[i] in kids:
                raise ValueError(f"node {i}: token {self.tokens[i]} repeats a sibling (children are distinct draws)")
            kids.add(self.tokens[i])
            depth.append(len(stack))
            stack.append(i)
        object.__setattr__(self, "_depth", tuple(depth))

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> "DraftTree":
        return cls(tuple(tokens), tuple(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    def depth(self, i: int) -> int:
        return self._depth[i]

    @property
    def height(self) -> int:
        """Levels below the root (a chain of n: n)."""
        return max(self._depth, default=-1) + 1

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node` (empty for the root)."""
        out = []
        while node != ROOT:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def main_chain(self) -> list[int]:
        """First children from the root down: the branch the edge drafts ahead on."""
        out, node = [], ROOT
        while True:
            kids = self.children(node)
            if not kids:
                return out
            node = kids[0]
            out.append(node)

    def subtree(self, node: int) -> tuple["DraftTree", list[int]]:
        """The nodes below `node`, re-rooted at it (the tree left when `node` is decided), and
        their indices here. Depth-first order makes them the run after `node` that is deeper."""
        keep = []
        for i in range(node + 1, len(self)):
            if self.depth(i) <= self.depth(node):
                break
            keep.append(i)
        where = {old: new for new, old in enumerate(keep)}
        return DraftTree([self.tokens[i] for i in keep],
                         [where.get(self.parents[i], ROOT) for i in keep]), keep

    def pruned(self, max_branches: int) -> tuple["DraftTree", list[int]]:
        """This tree with at most `max_branches` leaves off the main chain, and the kept
        nodes' indices here. Drops the deepest such leaves that are their parent's last child:
        the siblings before them keep their ranks, and dropping the last draws of a set drawn
        without replacement leaves the earlier ones exactly as drawn."""
        tree, kept = self, list(range(len(self)))
        while len(tree.leaves_off_main()) > max_branches:
            last = [i for i in tree.leaves_off_main() if tree.children(tree.parents[i])[-1] == i]
            drop = max(last, key=lambda i: (tree.depth(i), i))
            keep = [i for i in range(len(tree)) if i != drop]
            where = {old: new for new, old in enumerate(keep)}
            tree = DraftTree([tree.tokens[i] for i in keep], [where.get(tree.parents[i], ROOT) for i in keep])
            kept = [kept[i] for i in keep]
        return tree, kept

    def leaves_off_main(self) -> list[int]:
        """Leaves not on the main chain: one scratch evaluation of its path each."""
        main = set(self.main_chain())
        return [i for i in range(len(self)) if i not in main and not self.children(i)]

    def shape(self) -> str:
        """Children per level along the main chain, e.g. '2-1-2-1' (a chain of 4: '1-1-1-1')."""
        return "-".join(str(len(self.children(n))) for n in [ROOT] + self.main_chain()[:-1])


# ---------------------------------------------------------------------------------------------
# Wire form: a chain costs nothing beyond its tokens; every other node costs two varints
# ---------------------------------------------------------------------------------------------


def pack_parents(parents: Sequence[int]) -> bytes:
    """Only the nodes whose parent is not the node before them: (gap to the previous such node,
    i - 2 - parent) as varints. Empty for a chain; two bytes per sibling in a small tree."""
    out, last = bytearray(), -1
    for i, p in enumerate(parents):
        if p != i - 1:
            if not ROOT <= p < i - 1:
                raise ValueError(f"node {i}: parent {p} must precede it")
            out += encode_varint(i - last - 1) + encode_varint(i - 2 - p)
            last = i
    return bytes(out)


def unpack_parents(data: bytes, n: int) -> list[int]:
    """Parents of n nodes from `pack_parents`' bytes; ValueError on anything malformed."""
    parents = list(range(-1, n - 1))
    off, last = 0, -1
    data = bytes(data)
    while off < len(data):
        gap, off = decode_varint(data, off)
        back, off = decode_varint(data, off)
        i = last + 1 + gap
        if i >= n:
            raise ValueError(f"tree names node {i} of a draft of {n} tokens")
        p = i - 2 - back
        if p < ROOT:
            raise ValueError(f"node {i}: parent {p} out of range")
        parents[i] = p
        last = i
    return parents


def main_length(parents: Sequence[int]) -> int:
    """Length of the main chain: in depth-first order, the leading run of nodes whose parent
    is the node before them."""
    n = 0
    while n < len(parents) and parents[n] == n - 1:
        n += 1
    return n


def merge_chained(trees: Sequence[DraftTree]) -> tuple[DraftTree, list[tuple[int, int]]]:
    """Blocks that each continue the previous block's main chain, as one tree: block k+1 hangs
    below block k's main-chain leaf. Returns the tree and, per node, (block, node in block)."""
    tokens: list[int] = []
    parents: list[int] = []
    origin: list[tuple[int, int]] = []

    def add(k: int, parent_of_root: int) -> None:
        t = trees[k]
        m = main_length(t.parents)
        base = len(tokens)
        for i in range(m):                               # the main chain ...
            tokens.append(t.tokens[i])
            parents.append(parent_of_root if i == 0 else base + i - 1)
            origin.append((k, i))
        if k + 1 < len(trees):                           # ... the next block below its leaf ...
            add(k + 1, base + m - 1 if m else parent_of_root)
        shift = len(tokens) - m                          # ... then this block's other nodes
        for i in range(m, len(t)):
            p = t.parents[i]
            tokens.append(t.tokens[i])
            parents.append(parent_of_root if p == ROOT else (base + p if p < m else shift + p))
            origin.append((k, i))

    if trees:
        add(0, ROOT)
    return DraftTree(tokens, parents), origin


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


def accept_greedy(tree: DraftTree, argmax: Sequence[int]) -> tuple[list[int], int]:
    """(accepted path as node indices, next token). argmax[0] is the target's argmax at the root,
    argmax[i + 1] at node i. The next token is the correction, or the bonus after a leaf."""
    if len(argmax) != len(tree) + 1:
        raise ValueError(f"need {len(tree) + 1} argmax rows for {len(tree)} nodes, got {len(argmax)}")
    path, node = [], ROOT
    while True:
        want = int(argmax[node + 1])
        nxt = next((c for c in tree.children(node) if tree.tokens[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        node = nxt


def _without(q: SparseDist, token: int) -> SparseDist:
    keep = q.ids != token
    return SparseDist(q.ids[keep], q.weights[keep], q.total - q.weight(token))


def accept_sampled(tree: DraftTree, probs: Sequence[np.ndarray], qs: Sequence[SparseDist | None],
                   rng: Callable[[int, int], np.random.Generator]) -> tuple[list[int], int]:
    """Recursive rejection sampling down the tree: (accepted path, next token).

    probs[0]: the target's distribution at the root, probs[i + 1] at node i (full vocabulary).
    qs[i]: the draft distribution node i was drawn from, given for each node's first child; later
    siblings were drawn from it without the earlier ones (their entry is ignored and may be None).
    rng(depth, stream): the generator of one decision at depth `depth` below the root
    (STREAM_ACCEPT for the uniforms, one per child tried, in order; STREAM_RESIDUAL for the
    correction; STREAM_TARGET for the bonus after a leaf). For a chain this is exactly the
    single-draft scheme: same tests, same draws.
    """
    if len(probs) != len(tree) + 1:
        raise ValueError(f"need {len(tree) + 1} target rows for {len(tree)} nodes, got {len(probs)}")
    if len(qs) != len(tree):
        raise ValueError(f"need one q per node: got {len(qs)} for {len(tree)} nodes")
    path, node, d = [], ROOT, 0
    while True:
        p = np.asarray(probs[node + 1], dtype=np.float64)
        kids = tree.children(node)
        if not kids:
            return path, sample(p, rng(d, STREAM_TARGET))
        q = qs[kids[0]]
        if q is None:
            raise ValueError(f"node {kids[0]} (a first child) needs the q it was drawn from")
        u = rng(d, STREAM_ACCEPT)
        for k, c in enumerate(kids):
            x = tree.tokens[c]
            q_x = q.prob(x)
            if not q_x > 0.0:
                raise ValueError(f"node {c}: token {x} has q = 0 where it was drawn")
            if u.random() < min(1.0, p[x] / q_x):
                accepted = c
                break
            if k + 1 == len(kids):    # every child rejected: the correction, from the last residual
                return path, sample_residual(p, q, rng(d, STREAM_RESIDUAL))
            p = residual_probs(p, q)
            q = _without(q, x)
        path.append(accepted)
        node, d = accepted, d + 1


def race_draws(q: SparseDist, keys: np.ndarray, k: int) -> list[int]:
    """The first k finishers of the exponential race on q (keys: one clock per entry of q.ids):
    successive draws without replacement from q, the first being `race_sample`'s own draw.
    (Clocks E_i / q_i are independent exponentials of rate q_i; once the winner is out, the
    others' remaining times are again such exponentials, so the runner-up is a draw from q
    without the winner, and so on.)"""
    if np.shape(keys) != q.ids.shape:
        raise ValueError(f"need one key per entry: {np.shape(keys)} keys for {q.ids.size} entries")
    order = np.argsort(-(q.weights / np.asarray(keys, dtype=np.float64)), kind="stable")
    return [int(q.ids[i]) for i in order[:k]]


def accept_probability(p: np.ndarray, q: SparseDist, k: int) -> float:
    """P(a node with k children, drawn without replacement from q, passes one of them on to the
    target) under `accept_sampled`'s scheme: the per-position acceptance a node of width k has
    (k = 1: the chain's sum(min(p, q))). What trees can gain at all, measured without a tree.

    Exact, by recursion over which child is tried first: after a rejection the residual
    norm(max(0, p_i - q_i)) is the same whichever child was rejected, so one serves them all."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")

    def node(p_i: np.ndarray, q_i: SparseDist, depth: int) -> float:
        share = q_i.weights / q_i.total
        take = np.minimum(1.0, p_i[q_i.ids] / share)
        out = float(np.dot(share, take))
        if depth > 1 and q_i.ids.size > 1:
            r = residual_probs(p_i, q_i)
            for j in np.flatnonzero(take < 1.0):
                out += share[j] * (1.0 - take[j]) * node(r, _without(q_i, int(q_i.ids[j])), depth - 1)
        return out

    return node(np.asarray(p, dtype=np.float64), q, k)


def runner_up_accept(p: np.ndarray, q: SparseDist, rejected: int, keys: np.ndarray) -> tuple[int, float] | None:
    """(y, P(y accepted)): the sibling a tree would have carried beside the rejected draft, the
    runner-up of the position's race (keys as in `race_draws`), and the probability that
    `accept_sampled` takes it once `rejected` was rejected: min(1, p_2(y) / q_2(y)). None when
    q has nothing beside the rejected token."""
    y = next((t for t in race_draws(q, keys, q.ids.size) if t != rejected), None)
    if y is None:
        return None
    p2 = residual_probs(p, q)
    q2 = _without(q, rejected)
    return y, min(1.0, float(p2[y]) / q2.prob(y))
