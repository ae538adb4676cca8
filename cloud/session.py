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
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from kernels import packing
from kernels.rejection import (PPayload, accept_token, draw_tail, encode_p, sample_residual,
                               snap_p, verify_greedy)
from kernels.sampling import (STREAM_ACCEPT, STREAM_RESIDUAL, STREAM_TAIL, STREAM_TARGET,
                              SamplingConfig, logits_to_probs, race_sample_at, rng_for, sample)
from sim.latency import Hold, LatencyProfile

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


@dataclass
class PendingRejection:
    """Codec P: the cloud sent p at `pos`; the edge owes the correction."""
    pos: int
    p: np.ndarray
    top_ids: np.ndarray
    draws: int


@dataclass
class Session:
    sid: str
    ctx: object                      # TargetContext
    sampling: SamplingConfig
    codec: int
    n_vocab: int
    n_ctx: int
    max_draft: int
    width: int
    p_top_k: int = 16
    p_tail: int = 4
    emulate: LatencyProfile | None = None
    lead: bool = False
    lead_until: int = 0                   # absolute position the edge wants tokens up to
    eos: int | None = None                # leading stops after it (None: never)
    tokens: list[int] = field(default_factory=list)
    epoch: int = 0
    pending: np.ndarray | None = None     # logits predicting position len(tokens)
    rejection: PendingRejection | None = None
    last_used: float = field(default_factory=time.monotonic)
    blocks: int = 0
    drafted: int = 0
    accepted: int = 0
    leads: int = 0
    prompt_len: int = 0
    # True from the start and after every break until a block of the new branch
    # is verified. While a branch lives its next block is already on the way:
    # a lead pass then would only delay it (one token for a whole pass).
    awaiting_branch: bool = True
    broke_at: float | None = None         # when the last branch ended (None: the first is still due)
    respond_s: float = 0.0                # edge's measured time from a break to the new branch's block
    lead_pass_s: float = 0.0              # measured time of a lead pass
    lead_sent: dict = field(default_factory=dict)   # position -> when its lead token was decided

    # -- setup ------------------------------------------------------------
    def prefill(self, prompt: list[int]) -> None:
        if not prompt:
            raise BadDraft("empty prompt: at least one token is needed to predict from")
        self._check_ids(prompt)
        if len(prompt) >= self.n_ctx:
            raise ContextFull(f"prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx}")
        with Hold(self.emulate, len(prompt)):
            logits = self.ctx.eval(prompt)
        self.tokens = list(prompt)
        self.prompt_len = len(prompt)
        self.pending = logits[-1]

    # -- the verify step ---------------------------------------------------
    def verify(self, epoch: int, start: int, block: list[int], fixed: int, q_u8: list[int],
               q_sparse: list, want_bonus: bool) -> VerdictData | None:
        """Verify one block; None when the block is stale (older epoch)."""
        self.last_used = time.monotonic()
        if epoch < self.epoch:
            return None
        if epoch > self.epoch:
            raise BadDraft(f"epoch {epoch} is ahead of the session's epoch {self.epoch}")
        self._check_ids(block)
        if fixed > len(block) or fixed > 1:
            raise BadDraft(f"fixed={fixed} is invalid for a block of {len(block)} tokens (at most 1)")
        if len(block) - fixed > self.max_draft:
            raise BadDraft(f"draft of {len(block) - fixed} tokens exceeds the limit of {self.max_draft}")
        overlap = len(self.tokens) - start
        if overlap < 0 or (overlap > 0 and (not self.lead or fixed)):
            raise BadDraft(f"block starts at position {start}, expected {len(self.tokens)}")
        if overlap:                                       # positions decided while the block travelled
            seen = self.tokens[start:start + len(block)]
            if block[:len(seen)] != seen:
                # the edge's branch died at a lead token, and the edge saw it when the token went down
                wrong = start + next(i for i, (a, b) in enumerate(zip(block, seen)) if a != b)
                self._break(self.lead_sent.get(wrong))
                return None
            if len(block) <= overlap:
                self.awaiting_branch = False              # the branch lives: its next block is coming
                return None                               # every position already decided
        drafted = block[fixed + overlap:]
        q_u8, q_sparse = q_u8[overlap:], q_sparse[overlap:]
        if not drafted and not want_bonus:
            raise BadDraft("empty draft: send at least one token, or ask for the bonus")
        if len(self.tokens) + len(block) + 1 > self.n_ctx:
            raise ContextFull(f"context full: {len(self.tokens)} + {len(block)} tokens exceed n_ctx={self.n_ctx}")
        sampled = not self.sampling.greedy
        if sampled:
            self._check_q(drafted, q_u8, q_sparse)
        if fixed:
            self._take_correction(block[0])
        elif self.rejection is not None:
            raise BadDraft(f"the block must start with the correction for position {self.rejection.pos}")

        t0 = time.monotonic()
        # Emulated: the whole pass (forward and the accept/sampling math, which a
        # GPU server does inside it) is held to the modelled time together.
        with Hold(self.emulate, len(self.tokens) - self.ctx.n_past + len(drafted)):
            rows = self._score(drafted)                   # (len(drafted)+1, V)
            p0 = len(self.tokens)
            if not sampled:
                n_acc, nxt = verify_greedy(drafted, [int(np.argmax(r)) for r in rows])
                token = nxt if (n_acc < len(drafted) or want_bonus) else None
                payload = b""
            else:
                n_acc, token, payload = self._verify_sampled(p0, drafted, rows, q_u8, q_sparse, want_bonus)
        rejected = n_acc < len(drafted)

        self.tokens += drafted[:n_acc]
        self.ctx.truncate(len(self.tokens))
        self.pending = rows[n_acc] if self.ctx.n_past == len(self.tokens) else None
        if token is not None:
            self.tokens.append(token)
            self.pending = None                           # it predicted the position just filled
        self.awaiting_branch = False
        if rejected:
            self._break()
        self.blocks += 1
        self.drafted += len(drafted)
        self.accepted += n_acc
        return VerdictData(epoch, start, overlap + n_acc, token, payload, verify_s=time.monotonic() - t0,
                           overlap=overlap)

    # -- leading -----------------------------------------------------------
    def can_lead(self) -> bool:
        n = len(self.tokens)
        return (self.lead and self.awaiting_branch and self.rejection is None and n < self.lead_until
                and n + 1 < self.n_ctx
                and not (self.eos is not None and self.tokens[-1] == self.eos and n > self.prompt_len))

    def _break(self, at: float | None = None) -> None:
        self.epoch += 1
        self.awaiting_branch = True
        self.broke_at = at or time.monotonic()

    def block_arrived(self, t: float, epoch: int) -> None:
        """Learn how long the edge takes to answer a break with a new branch."""
        if self.awaiting_branch and epoch == self.epoch and self.broke_at is not None and t >= self.broke_at:
            r = t - self.broke_at
            self.respond_s = r if not self.respond_s else 0.7 * self.respond_s + 0.3 * r

    def lead_wait(self, now: float) -> float:
        """Seconds to wait for the new branch before leading (0: lead now). A
        lead pass that would still run when the branch's block is due delays
        the block by most of a pass for one token: wait for the block instead."""
        if not self.respond_s or not self.lead_pass_s or self.broke_at is None:
            return 0.0
        due = self.broke_at + self.respond_s
        if now + self.lead_pass_s <= due or now > due + self.lead_pass_s / 2:
            return 0.0
        return due + self.lead_pass_s / 2 - now

    def lead_one(self) -> VerdictData:
        """Decode the next token alone, as cloud-only streaming would. Free when
        the last pass already produced its distribution; else one forward pass."""
        self.last_used = time.monotonic()
        t0 = time.monotonic()
        lag = self.tokens[self.ctx.n_past:]
        pos = len(self.tokens)
        with Hold(self.emulate if lag else None, len(lag)):
            if lag:
                self.pending = self.ctx.eval(lag)[-1]
            if self.sampling.greedy:
                tok = int(np.argmax(self.pending))
            else:
                p = logits_to_probs(self.pending, self.sampling)
                tok = race_sample_at(p, self.sampling.seed, pos)
        self.tokens.append(tok)
        self.pending = None
        self.leads += 1
        self.lead_sent = {p: t for p, t in self.lead_sent.items() if p > pos - 64}
        self.lead_sent[pos] = time.monotonic()
        if lag:
            d = time.monotonic() - t0
            self.lead_pass_s = d if not self.lead_pass_s else 0.8 * self.lead_pass_s + 0.2 * d
        return VerdictData(self.epoch, pos, 0, tok, verify_s=time.monotonic() - t0, lead=True)

    def more_tail(self, epoch: int) -> VerdictData:
        rej = self.rejection
        if rej is None or epoch != self.epoch:
            raise BadDraft("no pending rejection to send more tail draws for")
        ids, probs = draw_tail(rej.p, rej.top_ids, self.p_tail,
                               rng_for(self.sampling.seed, rej.pos, STREAM_TAIL + 16 * (1 + rej.draws)))
        rej.draws += 1
        tail = PPayload(np.zeros(0, np.int64), np.zeros(0, np.float32), ids, probs)
        return VerdictData(epoch, rej.pos, 0, tail=packing.pack_payload(tail, self.width))

    # -- helpers -----------------------------------------------------------
    def _score(self, drafted: list[int]) -> np.ndarray:
        lag = self.tokens[self.ctx.n_past:]
        todo = lag + drafted
        if not todo:
            return self.pending[None, :]
        logits = self.ctx.eval(todo)
        if lag:
            return logits[len(lag) - 1:]
        return np.concatenate([self.pending[None, :], logits])

    def _verify_sampled(self, p0, drafted, rows, q_u8, q_sparse, want_bonus):
        seed = self.sampling.seed
        for i, x in enumerate(drafted):
            p = snap_p(logits_to_probs(rows[i], self.sampling))
            qx = q_u8[i] / 255.0 if self.codec == CODEC_P else q_sparse[i].prob(x)
            u = rng_for(seed, p0 + i, STREAM_ACCEPT).random()
            if accept_token(p[x], qx, u):
                continue
            if self.codec == CODEC_Q:
                y = sample_residual(p, q_sparse[i], rng_for(seed, p0 + i, STREAM_RESIDUAL))
                return i, y, b""
            payload = encode_p(p, self.p_top_k, self.p_tail, rng_for(seed, p0 + i, STREAM_TAIL))
            self.rejection = PendingRejection(p0 + i, p, payload.top_ids, 0)
            return i, None, packing.pack_payload(payload, self.width)
        token = None
        if want_bonus:
            p = logits_to_probs(rows[len(drafted)], self.sampling)
            token = sample(p, rng_for(seed, p0 + len(drafted), STREAM_TARGET))
        return len(drafted), token, b""

    def _take_correction(self, token: int) -> None:
        rej = self.rejection
        if rej is None or rej.pos != len(self.tokens):
            raise BadDraft("a fixed token is only allowed right after a codec-P rejection")
        if rej.p[token] <= 0.0:
            raise BadDraft(f"correction {token} has zero probability under the target at position {rej.pos}")
        self.tokens.append(token)
        self.rejection = None

    def _check_ids(self, ids) -> None:
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise BadDraft(f"token id {bad[0]} is outside the vocabulary (n_vocab={self.n_vocab})")

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
