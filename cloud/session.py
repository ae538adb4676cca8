"""One edge's verification session: the cloud half of PicoSpec.

Positions are absolute. `tokens` is everything decided so far (prompt +
accepted output + corrections); the KV cache may lag behind it by the tokens
decided but not yet evaluated (a correction or bonus). Each block of drafts is
evaluated in one pass together with that lag, which yields the target's
distribution at every drafted position plus one.

    accepted   drafted tokens that passed the test, kept in order
    correction the token drawn from the residual after the first rejection
    bonus      a token drawn from p after a fully accepted block, only when
               the edge asked for it (it has no follow-up block in flight:
               otherwise the next block's first token takes that position)
    lead       with `lead` on, a token the verifier decodes on its own while no
               block is queued, so it never idles waiting for the edge (a
               pipelined session is then never much slower than cloud-only).

Leading moves the session ahead of blocks the edge already sent. A block may
therefore start before the current position: its drafts at decided positions
must equal the decided tokens (then the rest is verified as usual), else the
edge's branch is dead and the epoch moves on; the edge, which receives the
lead tokens before any answer to that block, takes the same step. Lead tokens
race the draft on shared keys (kernels.sampling.race_sample), so an edge that
drafted the same token keeps its branch alive.

A session never calls the model, and only the event loop changes it: each
request becomes a plan holding one or more `Step`s (tokens to evaluate at a
position of the session's sequence) that the scheduler runs inside a batched
pass and answers with logits rows; the session's `apply_*` method for that
plan then turns the rows into the answer and moves the session on. So a
session can be driven with made-up rows (tests/test_session_states.py). The
session's sequence in the target's cache (`n_past` tokens) may hold rejected
drafts past `tokens`; the next step simply starts where the valid prefix ends
and the target cuts the rest.

Draft trees (kernels/tree.py) become `TreeWork`: the session's own step
evaluates the lag and the main chain, and each branch off the main chain is
evaluated in a scratch sequence copied from the session's once the main chain
is in it (later in the same pass), from the depth where the branch forks: its
own nodes only, each a chain evaluation, so every node's logits are those of
its path decoded alone. The
accepted path is the longest the target takes (greedy: argmax at every node;
sampled: recursive rejection sampling over siblings); the main-chain part of
it stays in the session's sequence, an accepted branch node is re-evaluated
as lag by the next pass, and the scratch copies are simply overwritten.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from cloud.scheduler import Step
from cloud.target import INVARIANT_BATCH
from kernels import packing
from kernels.rejection import (PPayload, accept_token, draw_tail, encode_p, sample_residual,
                               snap_p, verify_greedy)
from kernels.sampling import (STREAM_ACCEPT, STREAM_RESIDUAL, STREAM_TAIL, STREAM_TARGET,
                              SamplingConfig, logits_to_probs, race_keys, race_sample_at, rng_for, sample)
from kernels.sparse import SparseDist
from kernels.tree import DraftTree, accept_greedy, accept_sampled, runner_up_accept
from proto import tandem_pb2 as pb


class Codec(IntEnum):
    """The residual codec at T>0 (kernels/rejection.py). The wire's numbers, with names
    that read in logs and comparisons; converted once, where a request arrives."""
    P = pb.CODEC_P          # p goes down once per rejection; the edge draws the correction
    Q = pb.CODEC_Q          # q comes up with every draft; the cloud draws the correction


class BadDraft(ValueError):
    """A draft the session cannot accept; the servicer maps it to INVALID_ARGUMENT."""


class ContextFull(BadDraft):
    """The draft would overflow the context window (OUT_OF_RANGE)."""


@dataclass
class VerdictData:
    epoch: int
    start: int
    accepted: int
    token: int | None = None
    p_payload: bytes = b""
    tail: bytes = b""
    verify_s: float = 0.0
    lead: bool = False
    overlap: int = 0                      # leading drafts that were already decided (lead tokens)
    path: list[int] = field(default_factory=list)   # trees: rank among its siblings of each accepted level
    sibling_accept: float | None = None   # codec Q chains: what a sibling at the rejected level would have done


@dataclass
class ChainWork:
    """A block (or several merged) to verify: its pass, and what judging the rows needs."""
    step: Step
    epoch: int
    start: int
    overlap: int
    drafted: list[int]
    q_u8: list[int]
    q_sparse: list[SparseDist]
    want_bonus: bool
    lag: bool                             # the step starts with lag (else the first row is `pending`)
    t0: float


@dataclass
class TreeWork:
    """A draft tree to verify: `steps` (the session's own, then one per branch off the main
    chain) may share one pass; `apply_tree` takes their rows in the same order."""
    steps: list[Step]
    epoch: int
    start: int
    overlap: int
    tree: DraftTree
    qs: list                              # sampled: per node its q (first children) or None
    want_bonus: bool
    branches: list[list[int]]             # per branch off the main chain: its path of nodes
    forks: list[int]                      # ... and the depth where it leaves the main chain
    lag: bool                             # the own step starts with lag (else the root's row is `pending`)
    t0: float


@dataclass
class DecodeWork:
    """One token decoded alone at `pos`: a lead token, or cloud-only streaming's next."""
    step: Step
    pos: int
    t0: float


@dataclass
class ChainOutcome:
    """What the target made of a drafted chain."""
    accepted: int
    token: int | None
    payload: bytes = b""
    sibling: float | None = None
    rejection: "PendingRejection | None" = None


@dataclass
class PendingRejection:
    """Codec P: the cloud sent p at `pos`; the edge owes the correction."""
    pos: int
    p: np.ndarray
    top_ids: np.ndarray
    draws: int


@dataclass
class Limits:
    """What the verifier allows a session (the same for every session)."""
    n_vocab: int
    n_ctx: int
    max_draft: int
    width: int
    p_top_k: int = 16
    p_tail: int = 4


@dataclass
class LeadState:
    """When the verifier decodes on alone. `awaiting` is True from the start and
    after every break until a block of the new branch is verified: while a
    branch lives its next block is already on the way, and a lead pass then
    would only delay it (one token for a whole pass)."""
    on: bool = False
    until: int = 0                        # absolute position the edge wants tokens up to
    first: int = 0                        # >0: lead exactly the first `first` positions, never later ones
    awaiting: bool = True
    broke_at: float | None = None         # when the last branch ended (None: the first is still due)
    respond_s: float = 0.0                # edge's measured time from a break to the new branch's block
    pass_s: float = 0.0                   # measured time of a lead pass
    sent: dict = field(default_factory=dict)   # position -> when its lead token was decided


@dataclass
class Counters:
    blocks: int = 0
    drafted: int = 0
    accepted: int = 0
    leads: int = 0
    # decode passes (verify, lead, stream) this session took part in, the tokens it put in
    # them, and the tokens it gained from them: what admission by SLO predicts from
    passes: int = 0
    pass_tokens: int = 0
    gained: int = 0

    def served(self, n_in: int, gained: int) -> None:
        """One decode step done: `n_in` tokens evaluated (0: it needed no pass, as a lead
        token whose distribution the last pass gave), `gained` tokens decided."""
        if n_in:
            self.passes += 1
            self.pass_tokens += n_in
        self.gained += gained


@dataclass
class Session:
    sid: str
    seq: int                              # the session's sequence in the target's cache
    sampling: SamplingConfig
    codec: Codec
    limits: Limits
    eos: int | None = None                # leading stops after it (None: never)
    client: str = ""
    key: str = field(default_factory=lambda: secrets.token_hex(16))
    lead: LeadState = field(default_factory=LeadState)
    count: Counters = field(default_factory=Counters)
    tokens: list[int] = field(default_factory=list)
    prompt_len: int = 0
    n_past: int = 0                       # tokens of `tokens` already in the cache
    epoch: int = 0
    pending: np.ndarray | None = None     # logits predicting position len(tokens)
    rejection: PendingRejection | None = None
    opened: float = field(default_factory=time.monotonic)

    def _step(self, tokens: list[int], n_logits: int, chunkable: bool) -> Step:
        return Step(self.seq, self.n_past, tokens, n_logits, prefill=chunkable)

    def _lag(self) -> list[int]:
        """Tokens decided but not yet in the cache (a correction, bonus or lead token)."""
        return self.tokens[self.n_past:]

    # -- setup ------------------------------------------------------------
    def prefill_step(self, prompt: list[int]) -> Step:
        if not prompt:
            raise BadDraft("empty prompt: at least one token is needed to predict from")
        self._check_ids(prompt)
        if len(prompt) >= self.limits.n_ctx:
            raise ContextFull(f"prompt of {len(prompt)} tokens does not fit the context of {self.limits.n_ctx}")
        self.tokens, self.prompt_len, self.n_past = list(prompt), len(prompt), 0
        return self._step(list(prompt), 1, chunkable=True)

    def apply_prefill(self, rows: np.ndarray) -> None:
        self.pending, self.n_past = rows[-1], self.prompt_len

    def restart_from(self, prompt: list[int], sampling: SamplingConfig) -> None:
        """Continue from `prompt` under `sampling` (a cloud-only stream taking the session
        over): keep the cache for the prefix it shares with what the session holds."""
        self.sampling = sampling
        if self.tokens == prompt and self.pending is not None and self.n_past == len(prompt):
            return
        same = 0
        for a, b in zip(self.tokens[:self.n_past], prompt):
            if a != b:
                break
            same += 1
        self.tokens, self.pending, self.rejection = list(prompt), None, None
        self.n_past = min(same, len(prompt) - 1)
        self.prompt_len = len(prompt)

    # -- chains ------------------------------------------------------------
    def verify_step(self, epoch: int, start: int, block: list[int], fixed: int, q_u8: list[int],
                    q_sparse: list, want_bonus: bool) -> ChainWork | None:
        """The pass that verifies one block (or several merged); None when the
        block needs no pass (stale epoch, or every position already led)."""
        if self._stale(epoch):
            return None
        self._check_block(block, fixed)
        overlap = self._overlap(start, block, may_overlap=not fixed)
        if overlap is None:
            return None
        drafted = block[fixed + overlap:]
        q_u8, q_sparse = q_u8[overlap:], q_sparse[overlap:]
        if not drafted and not want_bonus:
            raise BadDraft("empty draft: send at least one token, or ask for the bonus")
        self._check_room(len(block))
        if not self.sampling.greedy:
            self._check_q(drafted, q_u8, q_sparse)
        if fixed:
            self._take_correction(block[0])
        elif self.rejection is not None:
            raise BadDraft(f"the block must start with the correction for position {self.rejection.pos}")
        lag = self._lag()
        step = self._step(lag + drafted, len(drafted) + (1 if lag else 0), chunkable=False)
        step.judge = self._chain_judge(drafted, bool(lag), q_u8, q_sparse)
        return ChainWork(step, epoch, start, overlap, drafted, q_u8, q_sparse, want_bonus, bool(lag),
                         time.monotonic())

    def apply_chain(self, work: ChainWork, rows: np.ndarray) -> VerdictData:
        """Judge a chain's rows and move the session on."""
        rows = self._rows_from_here(rows, work.lag)       # row j predicts position len(tokens) + j
        drafted = work.drafted
        if self.sampling.greedy:
            out = self._judge_greedy(drafted, rows, work.want_bonus)
        else:
            out = self._judge_sampled(drafted, rows, work.q_u8, work.q_sparse, work.want_bonus)
        if out.rejection is not None:
            self.rejection = out.rejection                # codec P: the edge owes the correction
        n_acc = out.accepted
        if np.isnan(rows[n_acc, 0]):
            # the cache skipped a row this verdict reads: its judge and the verdict disagree
            raise RuntimeError(f"lazy verdict bug: row {n_acc} of the chain was never computed")
        self._advance(drafted[:n_acc], in_cache=n_acc, pending=rows[n_acc], token=out.token,
                      broke=n_acc < len(drafted), drafted=len(drafted))
        return VerdictData(work.epoch, work.start, work.overlap + n_acc, out.token, out.payload,
                           verify_s=time.monotonic() - work.t0, overlap=work.overlap, sibling_accept=out.sibling)

    def _check_block(self, block: list[int], fixed: int) -> None:
        self._check_ids(block)
        if fixed > len(block) or fixed > 1:
            raise BadDraft(f"fixed={fixed} is invalid for a block of {len(block)} tokens (at most 1)")
        if len(block) - fixed > self.limits.max_draft:
            raise BadDraft(f"draft of {len(block) - fixed} tokens exceeds the limit of {self.limits.max_draft}")

    def _judge_greedy(self, drafted: list[int], rows: np.ndarray, want_bonus: bool) -> ChainOutcome:
        n_acc, nxt = verify_greedy(drafted, [int(np.argmax(r)) for r in rows])
        # T=0: no payload, and the edge scores its sibling itself
        return ChainOutcome(n_acc, nxt if (n_acc < len(drafted) or want_bonus) else None)

    def _chain_judge(self, drafted: list[int], lag: bool, q_u8: list[int], q_sparse: list):
        """Chunk.judge for a chain: the verdict reads rows up to the first one that rejects its
        drafted token (that row gives the correction), none after it; the test is the verdict's
        own (`_accepts`). Step row k predicts drafted[k] with a lag, drafted[k + 1] without (the
        pending row, which the last pass gave, predicts drafted[0])."""
        # what it reads of the session is taken now: it runs on the scheduler's thread
        shift, p0, pending = (0 if lag else 1), len(self.tokens), self.pending

        def judge(k: int, row: np.ndarray | None) -> bool:
            if k < 0:
                return lag or not drafted or self._accepts(drafted, 0, pending, p0, q_u8, q_sparse)
            j = k + shift
            return j >= len(drafted) or self._accepts(drafted, j, row, p0, q_u8, q_sparse)
        return judge

    def _accepts(self, drafted, i: int, row: np.ndarray, p0: int, q_u8, q_sparse) -> bool:
        """Whether the target keeps drafted[i] given its row (p0: the chain's first position)."""
        if self.sampling.greedy:
            return int(np.argmax(row)) == drafted[i]
        return self._keeps(snap_p(logits_to_probs(row, self.sampling)), drafted, i, p0, q_u8, q_sparse)

    def _keeps(self, p: np.ndarray, drafted, i: int, p0: int, q_u8, q_sparse) -> bool:
        """The random test of drafted[i] against the target's p there (T > 0)."""
        x = drafted[i]
        qx = q_u8[i] / 255.0 if self.codec == Codec.P else q_sparse[i].prob(x)
        return accept_token(p[x], qx, rng_for(self.sampling.seed, p0 + i, STREAM_ACCEPT).random())

    def _judge_sampled(self, drafted, rows, q_u8, q_sparse, want_bonus) -> ChainOutcome:
        seed, p0 = self.sampling.seed, len(self.tokens)
        for i, x in enumerate(drafted):
            p = snap_p(logits_to_probs(rows[i], self.sampling))
            if self._keeps(p, drafted, i, p0, q_u8, q_sparse):
                continue
            if self.codec == Codec.Q:
                return self._correct_q(p0 + i, p, q_sparse[i], x)
            return self._defer_p(p0 + i, p, i)
        token = None
        if want_bonus:
            p = logits_to_probs(rows[len(drafted)], self.sampling)
            token = sample(p, rng_for(seed, p0 + len(drafted), STREAM_TARGET))
        return ChainOutcome(len(drafted), token)

    def _correct_q(self, pos: int, p: np.ndarray, q: SparseDist, rejected: int) -> ChainOutcome:
        """Codec Q: the cloud has q, so it draws the correction from the residual itself."""
        seed = self.sampling.seed
        y = sample_residual(p, q, rng_for(seed, pos, STREAM_RESIDUAL))
        sibling = runner_up_accept(p, q, rejected, race_keys(seed, pos, q.ids))
        return ChainOutcome(pos - len(self.tokens), y, sibling=None if sibling is None else sibling[1])

    def _defer_p(self, pos: int, p: np.ndarray, n_acc: int) -> ChainOutcome:
        """Codec P: send p down; the edge owes the correction in its next block."""
        lim = self.limits
        payload = encode_p(p, lim.p_top_k, lim.p_tail, rng_for(self.sampling.seed, pos, STREAM_TAIL))
        return ChainOutcome(n_acc, None, packing.pack_payload(payload, lim.width),
                            rejection=PendingRejection(pos, p, payload.top_ids, 0))

    # -- trees ---------------------------------------------------------------
    def verify_tree_step(self, epoch: int, start: int, tree: DraftTree, q_sparse: list, want_bonus: bool,
                         scratch: list[int]) -> TreeWork | None:
        """The passes that verify a draft tree (blocks merged into one tree included);
        None when it needs none. q_sparse: per node the q it was drawn from (sampled;
        None for later siblings, drawn from their first sibling's q without it)."""
        if self._stale(epoch):
            return None
        self._check_tree(tree, q_sparse, scratch)
        sampled = not self.sampling.greedy
        overlap = self._overlap(start, [tree.tokens[i] for i in tree.main_chain()], may_overlap=True)
        if overlap is None:
            return None
        if overlap:
            tree, kept = tree.subtree(overlap - 1)        # main-chain node overlap-1 is index overlap-1
            q_sparse = [q_sparse[i] for i in kept] if sampled else q_sparse
        self._check_room(tree.height)
        if len(tree.leaves_off_main()) > len(scratch):
            # merged blocks may bring more branches than one pass can verify: drop the deepest
            tree, kept = tree.pruned(len(scratch))
            q_sparse = [q_sparse[i] for i in kept] if sampled else q_sparse
        qs = self._tree_qs(tree, q_sparse) if sampled else []
        lag = bool(self._lag())
        steps, branches, forks = self._tree_steps(tree, scratch)
        return TreeWork(steps, epoch, start, overlap, tree, qs, want_bonus, branches, forks, lag, time.monotonic())

    def apply_tree(self, work: TreeWork, rows_list: list[np.ndarray]) -> VerdictData:
        """Judge a tree's rows (its own step's, then each branch's) and move the session on."""
        tree, main_idx = work.tree, work.tree.main_chain()
        main_rows = self._rows_from_here(rows_list[0], work.lag)   # the root, then each main-chain node
        path, token = self._judge_tree(work, self._node_rows(work, main_rows, rows_list[1:]))
        on_main = next((j for j, i in enumerate(path) if j >= len(main_idx) or i != main_idx[j]), len(path))
        full = on_main == len(main_idx) == len(path)
        if full and not work.want_bonus:
            token = None                                  # the next block takes that position
        # the main chain's accepted part is in the cache; an accepted branch node is lag
        self._advance([tree.tokens[i] for i in path], in_cache=on_main,
                      pending=main_rows[on_main] if on_main == len(path) else None, token=token,
                      broke=not full, drafted=len(tree))
        ranks = [tree.children(tree.parents[i]).index(i) for i in path]
        return VerdictData(work.epoch, work.start, work.overlap + len(path), token,
                           verify_s=time.monotonic() - work.t0, overlap=work.overlap,
                           path=[0] * work.overlap + ranks)

    def _check_tree(self, tree: DraftTree, q_sparse: list, scratch: list[int]) -> None:
        self._check_ids(tree.tokens)
        if len(tree) > self.limits.max_draft:
            raise BadDraft(f"draft of {len(tree)} tokens exceeds the limit of {self.limits.max_draft}")
        if not scratch:
            raise BadDraft("this verifier takes no draft trees (started with --tree-seqs 0)")
        sampled = not self.sampling.greedy
        if sampled and self.codec == Codec.P:
            raise BadDraft("codec P cannot carry draft trees at T>0 (a sibling's test needs q's whole support): "
                           "use codec Q")
        if self.rejection is not None:
            raise BadDraft(f"the block must start with the correction for position {self.rejection.pos}")
        if sampled and len(q_sparse) != len(tree):
            raise BadDraft(f"codec Q needs one entry of q_sparse per tree node: got {len(q_sparse)} for {len(tree)}")

    def _tree_steps(self, tree: DraftTree, scratch: list[int]) -> tuple[list[Step], list[list[int]], list[int]]:
        """The session's own step (lag and main chain), then one per branch off the main chain,
        copied from the session's sequence once the main chain is in it, so the branch
        evaluates only its own nodes, from the depth where it forks."""
        main_idx, lag, p0 = tree.main_chain(), self._lag(), len(self.tokens)
        own = self._step(lag + [tree.tokens[i] for i in main_idx], len(main_idx) + (1 if lag else 0),
                         chunkable=False)
        on_main = set(main_idx)
        off_main = set(range(len(tree))) - on_main
        steps, branches, forks = [own], [], []
        for k, leaf in enumerate(tree.leaves_off_main()):
            path = tree.path_to(leaf)
            f = next(d for d, i in enumerate(path) if i not in on_main)
            new = [i for i in path if i in off_main]        # each off-main node is charged once
            off_main -= set(new)
            steps.append(Step(scratch[k % len(scratch)], p0 + f, [tree.tokens[i] for i in path[f:]],
                              len(path) - f, copy_from=self.seq, charged=len(new), after=own))
            branches.append(path)
            forks.append(f)
        return steps, branches, forks

    @staticmethod
    def _node_rows(work: TreeWork, main_rows: np.ndarray, branch_rows: list[np.ndarray]) -> list[np.ndarray]:
        """[root's row] + one row per tree node, each from the evaluation of its own path."""
        row = dict(zip(work.tree.main_chain(), main_rows[1:]))
        for path, f, rows in zip(work.branches, work.forks, branch_rows):
            for i, r in zip(path[f:], rows):
                row.setdefault(i, r)
        return [main_rows[0]] + [row[i] for i in range(len(work.tree))]

    def _judge_tree(self, work: TreeWork, rows: list[np.ndarray]) -> tuple[list[int], int]:
        if self.sampling.greedy:
            return accept_greedy(work.tree, [int(np.argmax(r)) for r in rows])
        probs = [snap_p(logits_to_probs(r, self.sampling)) for r in rows]
        seed, p0 = self.sampling.seed, len(self.tokens)
        return accept_sampled(work.tree, probs, work.qs, lambda d, s: rng_for(seed, p0 + d, s))

    def _tree_qs(self, tree: DraftTree, q_sparse: list) -> list:
        """Per node its q (first children) or None, each node's token checked against the q
        its sibling set was drawn from."""
        qs: list = [None] * len(tree)
        first_q: dict[int, object] = {}
        for i, (x, q) in enumerate(zip(tree.tokens, q_sparse)):
            parent = tree.parents[i]
            if parent not in first_q:
                if q is None:
                    raise BadDraft(f"tree node {i} is a first child: it needs the q it was drawn from")
                first_q[parent] = qs[i] = q
            elif q is not None:
                raise BadDraft(f"tree node {i} is a later sibling: its q is its first sibling's (send none)")
            if first_q[parent].prob(x) <= 0.0:
                raise BadDraft(f"tree node {i}: token {x} has q = 0 where it was drawn")
        return qs

    # -- one commit path for chains and trees ----------------------------------
    def _rows_from_here(self, rows: np.ndarray, lag: bool) -> np.ndarray:
        """The rows from the one predicting position len(tokens) on: a pass without
        lag evaluates no token there, the last pass already predicted it."""
        if lag:
            return rows
        return np.concatenate([self.pending[None, :], rows])

    def _advance(self, accepted: list[int], in_cache: int, pending: np.ndarray | None, token: int | None,
                 broke: bool, drafted: int) -> None:
        """Take a verdict: `accepted` drafts (the first `in_cache` of them are in the cache),
        then `token` (correction or bonus) if any; `pending` predicts the position after
        the accepted drafts. A rejection (`broke`) ends the edge's branch."""
        p0 = len(self.tokens)
        self.tokens += accepted
        self.n_past = p0 + in_cache
        self.pending = pending
        if token is not None:
            self.tokens.append(token)
            self.pending = None                           # it predicted the position just filled
        self.lead.awaiting = False
        if broke:
            self._break()
        c = self.count
        c.blocks, c.drafted, c.accepted = c.blocks + 1, c.drafted + drafted, c.accepted + len(accepted)

    def _stale(self, epoch: int) -> bool:
        """A block of an older epoch is dropped unanswered; one from the future is an error."""
        if epoch > self.epoch:
            raise BadDraft(f"epoch {epoch} is ahead of the session's epoch {self.epoch}")
        return epoch < self.epoch

    def _overlap(self, start: int, chain: list[int], may_overlap: bool) -> int | None:
        """How many of `chain`'s leading positions lead tokens already decided
        while the block travelled; None when the block needs no pass (its branch
        died at a lead token, or every position is decided)."""
        overlap = len(self.tokens) - start
        if overlap < 0 or (overlap > 0 and (not self.lead.on or not may_overlap)):
            raise BadDraft(f"block starts at position {start}, expected {len(self.tokens)}")
        if overlap:
            seen = self.tokens[start:start + len(chain)]
            if chain[:len(seen)] != seen:
                # the edge's branch died at a lead token, and the edge saw it when the token went down
                wrong = start + next(i for i, (a, b) in enumerate(zip(chain, seen)) if a != b)
                self._break(self.lead.sent.get(wrong))
                return None
            if len(chain) <= overlap:
                self.lead.awaiting = False                # the branch lives: its next block is coming
                return None                               # every position already decided
        return overlap

    # -- leading and streaming ----------------------------------------------
    def can_lead(self) -> bool:
        n, ld = len(self.tokens), self.lead
        if not (ld.on and self.rejection is None and n < ld.until and n + 1 < self.limits.n_ctx
                and not (self.eos is not None and self.tokens[-1] == self.eos and n > self.prompt_len)):
            return False
        if ld.first:
            return n - self.prompt_len < ld.first
        return ld.awaiting

    def must_lead(self) -> bool:
        """A fixed lead schedule (`lead.first`): lead now, before reading any block."""
        return bool(self.lead.first) and self.can_lead()

    def _break(self, at: float | None = None) -> None:
        self.epoch += 1
        self.lead.awaiting = True
        self.lead.broke_at = at or time.monotonic()

    def branch_went_quiet(self) -> None:
        """The live branch sent nothing for a while: lead as if it had broken."""
        self.lead.awaiting = True

    def block_arrived(self, t: float, epoch: int) -> None:
        """Learn how long the edge takes to answer a break with a new branch."""
        ld = self.lead
        if ld.awaiting and epoch == self.epoch and ld.broke_at is not None and t >= ld.broke_at:
            r = t - ld.broke_at
            ld.respond_s = r if not ld.respond_s else 0.7 * ld.respond_s + 0.3 * r

    def lead_wait(self, now: float) -> float:
        """Seconds to wait for the new branch before leading (0: lead now). A
        lead pass that would still run when the branch's block is due delays
        the block by most of a pass for one token: wait for the block instead."""
        ld = self.lead
        if ld.first or not ld.respond_s or not ld.pass_s or ld.broke_at is None:
            return 0.0
        due = ld.broke_at + ld.respond_s
        if now + ld.pass_s <= due or now > due + ld.pass_s / 2:
            return 0.0
        return due + ld.pass_s / 2 - now

    def lead_step(self) -> DecodeWork:
        """Decode the next token alone, as cloud-only streaming would, racing the
        edge's draft on shared keys. Needs no pass when the last one already
        produced its distribution."""
        return self._decode_work()

    def apply_lead(self, work: DecodeWork, rows: np.ndarray) -> VerdictData:
        pos = work.pos
        tok = self._next_token(rows, lambda p: race_sample_at(p, self.sampling.seed, pos))
        ld = self.lead
        self.count.leads += 1
        ld.sent = {q: t for q, t in ld.sent.items() if q > pos - 64}
        ld.sent[pos] = time.monotonic()
        if work.step.tokens:                              # a pass ran: learn its time
            d = time.monotonic() - work.t0
            ld.pass_s = d if not ld.pass_s else 0.8 * ld.pass_s + 0.2 * d
        return VerdictData(self.epoch, pos, 0, tok, verify_s=time.monotonic() - work.t0, lead=True)

    def stream_step(self) -> DecodeWork:
        """The next token of cloud-only streaming (`Generate`)."""
        return self._decode_work()

    def apply_stream(self, work: DecodeWork, rows: np.ndarray) -> int:
        pos = work.pos
        return self._next_token(rows, lambda p: sample(p, rng_for(self.sampling.seed, pos, STREAM_TARGET)))

    def _decode_work(self) -> DecodeWork:
        lag = self._lag()
        step = self._step(lag, 1 if lag else 0, chunkable=len(lag) > INVARIANT_BATCH)
        return DecodeWork(step, len(self.tokens), time.monotonic())

    def _next_token(self, rows: np.ndarray, pick) -> int:
        if len(rows):
            self.pending, self.n_past = rows[-1], len(self.tokens)
        if self.sampling.greedy:
            tok = int(np.argmax(self.pending))
        else:
            tok = pick(logits_to_probs(self.pending, self.sampling))
        self.tokens.append(tok)
        self.pending = None
        return tok

    def more_tail(self, epoch: int) -> VerdictData:
        rej = self.rejection
        if rej is None or epoch != self.epoch:
            raise BadDraft("no pending rejection to send more tail draws for")
        ids, probs = draw_tail(rej.p, rej.top_ids, self.limits.p_tail,
                               rng_for(self.sampling.seed, rej.pos, STREAM_TAIL + 16 * (1 + rej.draws)))
        rej.draws += 1
        tail = PPayload(np.zeros(0, np.int64), np.zeros(0, np.float32), ids, probs)
        return VerdictData(epoch, rej.pos, 0, tail=packing.pack_payload(tail, self.limits.width))

    # -- checks ------------------------------------------------------------
    def _check_room(self, n_new: int) -> None:
        if len(self.tokens) + n_new + 1 > self.limits.n_ctx:
            raise ContextFull(f"context full: {len(self.tokens)} + {n_new} tokens exceed n_ctx={self.limits.n_ctx}")

    def _take_correction(self, token: int) -> None:
        rej = self.rejection
        if rej is None or rej.pos != len(self.tokens):
            raise BadDraft("a fixed token is only allowed right after a codec-P rejection")
        if rej.p[token] <= 0.0:
            raise BadDraft(f"correction {token} has zero probability under the target at position {rej.pos}")
        self.tokens.append(token)
        self.rejection = None

    def _check_ids(self, ids) -> None:
        bad = [t for t in ids if not 0 <= t < self.limits.n_vocab]
        if bad:
            raise BadDraft(f"token id {bad[0]} is outside the vocabulary (n_vocab={self.limits.n_vocab})")

    def _check_q(self, drafted, q_u8, q_sparse) -> None:
        if self.codec == Codec.P:
            if len(q_u8) != len(drafted):
                raise BadDraft(f"codec P needs one q per drafted token: got {len(q_u8)} for {len(drafted)}")
            if any(v == 0 for v in q_u8):
                raise BadDraft("q(x) = 0 for a drafted token: the draft cannot have sampled it")
        else:
            if len(q_sparse) != len(drafted):
                raise BadDraft(f"codec Q needs one sparse q per drafted token: got {len(q_sparse)} for {len(drafted)}")
            for x, q in zip(drafted, q_sparse):
                if q.prob(x) <= 0.0:
                    raise BadDraft(f"drafted token {x} has q = 0 in its own sparse q")
