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

A session never calls the model: each request becomes a `Step` (tokens to
evaluate at a position of the session's sequence, and a `finish` that turns
the logits rows into the answer) that the scheduler runs inside a batched
pass. The session's sequence in the target's cache (`n_past` tokens) may hold
rejected drafts past `tokens`; the next step simply starts where the valid
prefix ends and the target cuts the rest.

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
from typing import Callable

import numpy as np

from cloud.scheduler import Step
from cloud.target import INVARIANT_BATCH
from kernels import packing
from kernels.rejection import (PPayload, accept_token, draw_tail, encode_p, sample_residual,
                               snap_p, verify_greedy)
from kernels.sampling import (STREAM_ACCEPT, STREAM_RESIDUAL, STREAM_TAIL, STREAM_TARGET,
                              SamplingConfig, logits_to_probs, race_keys, race_sample_at, rng_for, sample)
from kernels.tree import DraftTree, accept_greedy, accept_sampled, runner_up_accept

CODEC_P, CODEC_Q = 0, 1


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
class TreeWork:
    """A draft tree's verification: `steps` (the session's own, then one per branch off the
    main chain) may share one pass; `finish` takes their rows in the same order."""
    steps: list[Step]
    finish: Callable[[list[np.ndarray]], VerdictData]


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


@dataclass
class Session:
    sid: str
    seq: int                              # the session's sequence in the target's cache
    sampling: SamplingConfig
    codec: int
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
    last_used: float = field(default_factory=time.monotonic)
    streams: int = 0                      # live RPCs using the session (it is freed only at 0)

    def _step(self, tokens: list[int], n_logits: int, finish, chunkable: bool) -> Step:
        return Step(self.seq, self.n_past, tokens, n_logits, finish, prefill=chunkable)

    # -- setup ------------------------------------------------------------
    def prefill_step(self, prompt: list[int]) -> Step:
        if not prompt:
            raise BadDraft("empty prompt: at least one token is needed to predict from")
        self._check_ids(prompt)
        if len(prompt) >= self.limits.n_ctx:
            raise ContextFull(f"prompt of {len(prompt)} tokens does not fit the context of {self.limits.n_ctx}")
        self.tokens, self.prompt_len, self.n_past = list(prompt), len(prompt), 0

        def finish(rows: np.ndarray) -> None:
            self.pending, self.n_past = rows[-1], len(prompt)
        return self._step(list(prompt), 1, finish, chunkable=True)

    def restart_from(self, prompt: list[int]) -> None:
        """Continue from `prompt` (a cloud-only stream taking the session over):
        keep the cache for the prefix it shares with what the session holds."""
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

    # -- the verify step ---------------------------------------------------
    def verify_step(self, epoch: int, start: int, block: list[int], fixed: int, q_u8: list[int],
                    q_sparse: list, want_bonus: bool) -> Step | None:
        """The pass that verifies one block (or several merged); None when the
        block needs no pass (stale epoch, or every position already led)."""
        lim = self.limits
        if self._stale(epoch):
            return None
        self._check_ids(block)
        if fixed > len(block) or fixed > 1:
            raise BadDraft(f"fixed={fixed} is invalid for a block of {len(block)} tokens (at most 1)")
        if len(block) - fixed > lim.max_draft:
            raise BadDraft(f"draft of {len(block) - fixed} tokens exceeds the limit of {lim.max_draft}")
        overlap = self._overlap(start, block, may_overlap=not fixed)
        if overlap is None:
            return None
        drafted = block[fixed + overlap:]
        q_u8, q_sparse = q_u8[overlap:], q_sparse[overlap:]
        if not drafted and not want_bonus:
            raise BadDraft("empty draft: send at least one token, or ask for the bonus")
        if len(self.tokens) + len(block) + 1 > lim.n_ctx:
            raise ContextFull(f"context full: {len(self.tokens)} + {len(block)} tokens exceed n_ctx={lim.n_ctx}")
        sampled = not self.sampling.greedy
        if sampled:
            self._check_q(drafted, q_u8, q_sparse)
        if fixed:
            self._take_correction(block[0])
        elif self.rejection is not None:
            raise BadDraft(f"the block must start with the correction for position {self.rejection.pos}")

        lag = self.tokens[self.n_past:]
        p0, kv_end, t0 = len(self.tokens), len(self.tokens) + len(drafted), time.monotonic()

        def finish(rows: np.ndarray) -> VerdictData:
            if not lag:                                   # the last pass already predicted p0
                rows = np.concatenate([self.pending[None, :], rows])   # (len(drafted)+1, V)
            if not sampled:
                n_acc, nxt = verify_greedy(drafted, [int(np.argmax(r)) for r in rows])
                token = nxt if (n_acc < len(drafted) or want_bonus) else None
                payload, sibling = b"", None          # T=0: the edge scores its sibling itself
            else:
                n_acc, token, payload, sibling = self._verify_sampled(p0, drafted, rows, q_u8, q_sparse, want_bonus)
            self.tokens += drafted[:n_acc]
            self.n_past = min(kv_end, len(self.tokens))
            self.pending = rows[n_acc]
            if token is not None:
                self.tokens.append(token)
                self.pending = None                       # it predicted the position just filled
            self.lead.awaiting = False
            if n_acc < len(drafted):
                self._break()
            c = self.count
            c.blocks, c.drafted, c.accepted = c.blocks + 1, c.drafted + len(drafted), c.accepted + n_acc
            return VerdictData(epoch, start, overlap + n_acc, token, payload, verify_s=time.monotonic() - t0,
                               overlap=overlap, sibling_accept=sibling)
        return self._step(lag + drafted, len(drafted) + (1 if lag else 0), finish, chunkable=False)

    # -- trees ---------------------------------------------------------------
    def verify_tree_step(self, epoch: int, start: int, tree: DraftTree, q_sparse: list, want_bonus: bool,
                         scratch: list[int]) -> TreeWork | None:
        """The passes that verify a draft tree (blocks merged into one tree included);
        None when it needs none. q_sparse: per node the q it was drawn from (sampled;
        None for later siblings, drawn from their first sibling's q without it)."""
        lim = self.limits
        if self._stale(epoch):
            return None
        self._check_ids(tree.tokens)
        if len(tree) > lim.max_draft:
            raise BadDraft(f"draft of {len(tree)} tokens exceeds the limit of {lim.max_draft}")
        if not scratch:
            raise BadDraft("this verifier takes no draft trees (started with --tree-seqs 0)")
        sampled = not self.sampling.greedy
        if sampled and self.codec == CODEC_P:
            raise BadDraft("codec P cannot carry draft trees at T>0 (a sibling's test needs q's whole support): "
                           "use codec Q")
        if self.rejection is not None:
            raise BadDraft(f"the block must start with the correction for position {self.rejection.pos}")
        if sampled and len(q_sparse) != len(tree):
            raise BadDraft(f"codec Q needs one entry of q_sparse per tree node: got {len(q_sparse)} for {len(tree)}")
        overlap = self._overlap(start, [tree.tokens[i] for i in tree.main_chain()], may_overlap=True)
        if overlap is None:
            return None
        if overlap:
            tree, kept = tree.subtree(overlap - 1)        # main-chain node overlap-1 is index overlap-1
            q_sparse = [q_sparse[i] for i in kept] if sampled else q_sparse
        if len(self.tokens) + tree.height + 1 > lim.n_ctx:
            raise ContextFull(f"context full: {len(self.tokens)} + {tree.height} tokens exceed n_ctx={lim.n_ctx}")
        if len(tree.leaves_off_main()) > len(scratch):
            # merged blocks may bring more branches than one pass can verify: drop the deepest
            tree, kept = tree.pruned(len(scratch))
            q_sparse = [q_sparse[i] for i in kept] if sampled else q_sparse
        qs = self._tree_qs(tree, q_sparse) if sampled else []
        main_idx = tree.main_chain()
        branches = [tree.path_to(leaf) for leaf in tree.leaves_off_main()]
        lag = self.tokens[self.n_past:]
        p0, t0 = len(self.tokens), time.monotonic()
        keep = lambda rows: rows                          # noqa: E731 - rows go to finish() below
        own = self._step(lag + [tree.tokens[i] for i in main_idx], len(main_idx) + (1 if lag else 0), keep,
                         chunkable=False)
        on_main = set(main_idx)
        off_main = set(range(len(tree))) - on_main
        steps = [own]
        forks = []                                        # per branch: the depth where it leaves the main chain
        for k, path in enumerate(branches):
            f = next(d for d, i in enumerate(path) if i not in on_main)
            forks.append(f)
            new = [i for i in path if i in off_main]        # each off-main node is charged once
            off_main -= set(new)
            # copied from the session's sequence once the main chain is in it, so the branch
            # evaluates only its own nodes, from the depth where it forks
            steps.append(Step(scratch[k % len(scratch)], p0 + f, [tree.tokens[i] for i in path[f:]],
                              len(path) - f, keep, copy_from=self.seq, charged=len(new), after=own))

        def finish(rows_list: list[np.ndarray]) -> VerdictData:
            own_rows = rows_list[0]
            root = own_rows[0] if lag else self.pending
            row = dict(zip(main_idx, own_rows[1:] if lag else own_rows))
            for path, f, rows in zip(branches, forks, rows_list[1:]):
                for i, r in zip(path[f:], rows):
                    row.setdefault(i, r)
            rows = [root] + [row[i] for i in range(len(tree))]
            if not sampled:
                path, token = accept_greedy(tree, [int(np.argmax(r)) for r in rows])
            else:
                probs = [snap_p(logits_to_probs(r, self.sampling)) for r in rows]
                seed = self.sampling.seed
                path, token = accept_sampled(tree, probs, qs, lambda d, s: rng_for(seed, p0 + d, s))
            on_main = next((j for j, i in enumerate(path) if j >= len(main_idx) or i != main_idx[j]), len(path))
            full = on_main == len(main_idx) == len(path)
            if full and not want_bonus:
                token = None                              # the next block takes that position
            self.tokens += [tree.tokens[i] for i in path]
            self.n_past = p0 + on_main                    # the main chain's accepted part is in the cache
            self.pending = (own_rows[on_main] if lag else ([root] + list(own_rows))[on_main]) \
                if on_main == len(path) else None
            if token is not None:
                self.tokens.append(token)
                self.pending = None
            self.lead.awaiting = False
            if not full:
                self._break()
            c = self.count
            c.blocks, c.drafted, c.accepted = c.blocks + 1, c.drafted + len(tree), c.accepted + len(path)
            ranks = [tree.children(tree.parents[i]).index(i) for i in path]
            return VerdictData(epoch, start, overlap + len(path), token, verify_s=time.monotonic() - t0,
                               overlap=overlap, path=[0] * overlap + ranks)
        return TreeWork(steps, finish)

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

    def _stale(self, epoch: int) -> bool:
        """A block of an older epoch is dropped unanswered; one from the future is an error."""
        self.last_used = time.monotonic()
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

    def lead_step(self) -> Step:
        """Decode the next token alone, as cloud-only streaming would, racing the
        edge's draft on shared keys. Needs no pass when the last one already
        produced its distribution."""
        pos, t0, lag = len(self.tokens), time.monotonic(), self.tokens[self.n_past:]

        def pick(p: np.ndarray) -> int:
            return race_sample_at(p, self.sampling.seed, pos)

        def finish(rows: np.ndarray) -> VerdictData:
            tok = self._next_token(rows, pick)
            ld = self.lead
            self.count.leads += 1
            ld.sent = {q: t for q, t in ld.sent.items() if q > pos - 64}
            ld.sent[pos] = time.monotonic()
            if lag:
                d = time.monotonic() - t0
                ld.pass_s = d if not ld.pass_s else 0.8 * ld.pass_s + 0.2 * d
            return VerdictData(self.epoch, pos, 0, tok, verify_s=time.monotonic() - t0, lead=True)
        self.last_used = time.monotonic()
        return self._step(lag, 1 if lag else 0, finish, chunkable=len(lag) > INVARIANT_BATCH)

    def stream_step(self) -> Step:
        """The next token of cloud-only streaming (`Generate`)."""
        pos, lag = len(self.tokens), self.tokens[self.n_past:]
        pick = lambda p: sample(p, rng_for(self.sampling.seed, pos, STREAM_TARGET))
        self.last_used = time.monotonic()
        return self._step(lag, 1 if lag else 0, lambda rows: self._next_token(rows, pick), chunkable=len(lag) > INVARIANT_BATCH)

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

    # -- helpers -----------------------------------------------------------
    def _verify_sampled(self, p0, drafted, rows, q_u8, q_sparse, want_bonus):
        seed = self.sampling.seed
        for i, x in enumerate(drafted):
            p = snap_p(logits_to_probs(rows[i], self.sampling))
            qx = q_u8[i] / 255.0 if self.codec == CODEC_P else q_sparse[i].prob(x)
            u = rng_for(seed, p0 + i, STREAM_ACCEPT).random()
            if accept_token(p[x], qx, u):
                continue
            if self.codec == CODEC_Q:
                q = q_sparse[i]
                y = sample_residual(p, q, rng_for(seed, p0 + i, STREAM_RESIDUAL))
                sibling = runner_up_accept(p, q, x, race_keys(seed, p0 + i, q.ids))
                return i, y, b"", None if sibling is None else sibling[1]
            payload = encode_p(p, self.limits.p_top_k, self.limits.p_tail, rng_for(seed, p0 + i, STREAM_TAIL))
            self.rejection = PendingRejection(p0 + i, p, payload.top_ids, 0)
            return i, None, packing.pack_payload(payload, self.limits.width), None
        token = None
        if want_bonus:
            p = logits_to_probs(rows[len(drafted)], self.sampling)
            token = sample(p, rng_for(seed, p0 + len(drafted), STREAM_TARGET))
        return len(drafted), token, b"", None

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
        if self.codec == CODEC_P:
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
