"""The edge half of speculative decoding, stop-and-wait (`sync`) or pipelined (`picospec`).

    draft -> send block -> (keep drafting the next block) -> verdict -> accept / roll back

Positions are absolute. `context` is what the drafter should have seen: the prompt,
the committed output, then speculative tokens of blocks in flight. A verdict
commits accepted tokens; a rejection bumps the epoch (the cloud drops every
block of the old one), throws the speculative tail away, rolls the drafter's
KV cache back and continues from the correction. With codec P the edge draws
the correction itself from the sparse p the verdict carries; it then travels
up as the `fixed` first token of the next block.

With `cloud_lead` (pipelined only) the verifier decodes on by itself whenever
no block is queued and streams those `lead` tokens down: a lead equal to the
edge's own draft at that position keeps its branch alive, a different one ends
it (the verifier drops the branch's blocks when they arrive, so both sides
bump the epoch). Drafts race on the verifier's keys (race_sample) to make the
first case common. Blocks then have a length fixed before their tokens are
drawn, so whether a position is led or verified never depends on its own draw.

Trees (`tree` auto/always, a verifier that takes them): when a block is
complete the edge adds siblings beside its chain at the positions where the
drafter was least sure, within the planner's budget: at T=0 the drafter's
runner-up token, at T>0 the runner-up of the position's race (a draw from q
without the chain's token, kernels.tree.race_draws). Siblings are leaves: they
cost the edge no draft step, the verifier one more token in the pass. Whether a
position gets a sibling depends on the chain's tokens and q's only, never on
the sibling's own draw (that would bias it). A verdict whose path ends in a
sibling commits the chain up to it, the sibling, and the target's token after
it, where a chain would have yielded only the correction; the branch drafted
ahead is dropped as after any rejection.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edge.baselines import OnTokens, sampling_proto
from edge.client import CloudError, DraftStream
from edge.codec import Codec
from edge.config import GenConfig
from edge.drafter import Drafter
from edge.planner import Planner
from edge.stats import GenStats
from kernels import packing
from kernels.rejection import PPayload, sample_residual_p
from kernels.sampling import STREAM_RESIDUAL, logits_to_probs, race_keys, race_sample_at, rng_for, runner_up
from kernels.sparse import SparseDist, quantize_dist
from kernels.tree import pack_parents, race_draws
from proto import tandem_pb2 as pb
from sim.latency import Hold, LatencyProfile

# After a rejection the pipeline is empty and the verifier waits for (or leads
# past) the next block: a short first block restarts it a few draft steps sooner.
FIRST_BLOCK = 3
# When the verifier decides nearly every token alone (its own decoding outruns
# the edge's drafts, or the link is too long for drafts to arrive in time), the
# drafts only cost the edge compute and uplink: stream cloud-only instead.
LEAD_SHARE_SWITCH = 0.9
LEAD_SWITCH_AFTER = 24
# A sibling is worth its verify token only where the chain is likely to reach its
# position and the drafter's own token there is unsure.
MIN_SIBLING_GAIN = 0.03


@dataclass
class Block:
    epoch: int
    start: int
    fixed: int | None                      # codec P correction carried up front
    drafted: list[int] = field(default_factory=list)
    qs: list[SparseDist | None] = field(default_factory=list)
    runner_up: list[tuple[int, float] | None] = field(default_factory=list)  # T=0: (token, drafter prob)
    confidence: list[float] = field(default_factory=list)  # the drafter's probability of its own token
    siblings: list[tuple[int, int]] = field(default_factory=list)  # (level, token): leaves beside the chain
    want_bonus: bool = False               # asked the verifier for the token after a fully accepted block
    sent_at: float = 0.0

    @property
    def first(self) -> int:
        """Position of drafted[0]."""
        return self.start + (self.fixed is not None)

    @property
    def end(self) -> int:
        return self.first + len(self.drafted)


class SwitchToCloudOnly(Exception):
    """The planner found speculation slower than cloud-only streaming.
    `session`: an open session whose cache the cloud-only stream can continue."""

    def __init__(self, session: str = ""):
        super().__init__(session)
        self.session = session


class Speculator:
    def __init__(self, stream: DraftStream, drafter: Drafter, prompt: list[int], cfg: GenConfig,
                 codec: Codec, width: int, eos: int, planner: Planner, device: LatencyProfile | None,
                 on_tokens: OnTokens, stats: GenStats, t0: float, first_logits: np.ndarray,
                 tree_branches: int = 0, max_draft: int = 64):
        self.stream, self.drafter, self.cfg, self.codec, self.width = stream, drafter, cfg, codec, width
        self.eos, self.planner, self.device, self.on_tokens, self.stats, self.t0 = (
            eos, planner, device, on_tokens, stats, t0)
        self.n_prompt = len(prompt)
        self.context = list(prompt)
        self.out: list[int] = []
        self.in_flight: deque[Block] = deque()
        self.cur: Block | None = None
        self.epoch = 0
        self.fixed_next: int | None = None
        self.logits = first_logits            # predicts position len(context) while drafter.n_past == len(context)
        self.plan = planner.plan()
        self.done = False
        self.lead = cfg.pipelined and cfg.cloud_lead
        self.restart = True                   # the next block is the first after a break
        # Trees need a verifier that takes them, and at T>0 codec Q (kernels/tree.py says why).
        self.trees = tree_branches > 0 and cfg.tree != "off" and (cfg.sampling.greedy or codec == Codec.Q)
        self.tree_branches = tree_branches
        planner.tree = cfg.tree if self.trees else "off"
        self.plan = planner.plan()
        self.max_draft = max_draft
        self.tree_stats = {"passes": 0, "siblings": 0, "sibling_hits": 0, "tree_blocks": 0, "shapes": {}}
        stats.tree = self.tree_stats

    # -- the loop, on one screen -------------------------------------------
    def run(self) -> list[int]:
        while not self.done:
            can_draft = self._can_draft()
            verdict = self.stream.recv(timeout=0 if can_draft else self.cfg.stall_timeout_s)
            if verdict is not None and verdict.lead:
                self._on_lead(verdict)
            elif verdict is not None:
                self._on_verdict(verdict)
            elif can_draft:
                self._draft_one()
                if self._block_complete():
                    self._send(self.cur)
                    self.cur = None
            else:
                raise CloudError(None, f"no verdict for {self.cfg.stall_timeout_s:.0f} s")
        return self.out

    # -- drafting ------------------------------------------------------------
    def _spec_len(self) -> int:
        return len(self.context) - self.n_prompt - len(self.out)

    def _committed(self) -> int:
        return self.n_prompt + len(self.out)

    def _stall(self) -> float:
        return self.drafter.stall_s

    def _can_draft(self) -> bool:
        if self.cur is None and len(self.in_flight) >= (self.plan.window if self.cfg.pipelined else 1):
            return False
        if self.cur is None and self.cfg.stop_at_eos and self.eos in self.context[self._committed():]:
            return False
        return len(self.out) + self._spec_len() < self.cfg.max_tokens

    def _draft_one(self) -> None:
        if self.cur is None:
            start = len(self.context) - (1 if self.fixed_next is not None else 0)
            self.cur = Block(self.epoch, start, self.fixed_next)
            self.fixed_next = None
        t = time.monotonic()
        todo = self.context[self.drafter.n_past:]
        # a draft step samples inside its time; the device prices its compute, the store its reads
        with Hold(self.device if todo else None, len(todo), stall=self._stall) as hold:
            if todo:
                self.logits = self.drafter.eval(todo)
            x, q, alt = self._draw(len(self.context))
        self.stats.note_draft_step(hold)
        if len(todo) == 1:
            # one draft step prices one: a step that first catches the drafter up on a
            # correction and lead tokens evaluates several, and priced as one it made the
            # planner see 363 ms steps where a step takes 13 (then no next session started)
            self.planner.observe_draft(time.monotonic() - t)
        self.context.append(x)
        self.cur.drafted.append(x)
        self.cur.qs.append(q)
        self.cur.runner_up.append(alt[0])
        self.cur.confidence.append(alt[1])

    def _draw(self, pos: int) -> tuple[int, SparseDist | None, tuple]:
        """(token, the q it was drawn from, (T=0 runner-up, confidence in the token))."""
        s = self.cfg.sampling
        if s.greedy:
            x = int(np.argmax(self.logits))
            if not self.trees:
                return x, None, (None, 1.0)
            y = runner_up(self.logits, x)
            e = np.exp(self.logits[[x, y]] - self.logits[x])
            z = float(np.exp(self.logits - self.logits[x]).sum())
            return x, None, ((y, float(e[1]) / z), float(e[0]) / z)
        probs = logits_to_probs(self.logits, s)
        # Codec P sends q(x) up as one byte, so the draft samples from an 8-bit q
        # (any q is exact as long as the verifier tests with the one sampled from).
        q = quantize_dist(probs, bits=8, top_k=None if self.codec == Codec.P else self.cfg.q_top_k)
        x = race_sample_at(q.weights, s.seed, pos, q.ids)
        return x, q, (None, q.prob(x))

    def _sibling_candidates(self, b: Block) -> list[tuple[float, int]]:
        """(expected gain, level) of a sibling at each level that has one, best first: gain =
        P(the chain reaches the level) x P(the drafter's token there is wrong)."""
        reach, cands = 1.0, []
        for d, q in enumerate(b.qs):
            if q is None:                             # T=0: the drafter's runner-up
                cands.append((reach * b.runner_up[d][1], d))
            elif q.ids.size > 1:                      # T>0: the race's runner-up
                cands.append((reach * (1.0 - b.confidence[d]), d))
            reach *= b.confidence[d]
        return sorted(cands, reverse=True)

    def _sibling_token(self, b: Block, d: int) -> int:
        """The sibling at level d: T=0 the drafter's runner-up; T>0 the race's runner-up, a draw
        from q without the chain's token (its own q is not looked at)."""
        q = b.qs[d]
        if q is None:
            return b.runner_up[d][0]
        return race_draws(q, race_keys(self.cfg.sampling.seed, b.first + d, q.ids), 2)[1]

    def _pick_siblings(self, b: Block) -> list[tuple[int, int]]:
        """(level, token) of the siblings worth sending: the budget's best candidates."""
        # Each sibling is a branch the verifier evaluates in a scratch sequence; it has
        # tree_branches of them per pass.
        budget = min(self.plan.tree_budget, self.tree_branches,
                     self.max_draft - len(b.drafted) - (b.fixed is not None))
        if budget <= 0:
            return []
        best = self._sibling_candidates(b)[:budget]
        # `always` sends its best sibling whatever it is worth (tests, measurement)
        keep = [d for i, (gain, d) in enumerate(best)
                if gain >= MIN_SIBLING_GAIN or (i == 0 and self.cfg.tree == "always")]
        return [(d, self._sibling_token(b, d)) for d in sorted(keep)]

    def _observe_unsent_sibling(self, b: Block, v: pb.Verdict, n_chain: int, led: int) -> None:
        """What the best sibling would have yielded beside a chain sent without one, so the
        planner measures trees' yield without paying for probes: nothing unless the chain's
        first rejection fell on its level; there, at T=0 whether it is the target's token,
        at T>0 the verifier's probability of accepting it (`sibling_accept`)."""
        cands = [c for c in self._sibling_candidates(b) if c[1] >= led]
        if not cands or cands[0][0] < MIN_SIBLING_GAIN:
            return                                    # no sibling would have been sent
        level = cands[0][1]
        if level != n_chain:
            hit = 0.0
        elif self.cfg.sampling.greedy:
            hit = float(v.HasField("token") and v.token == b.runner_up[level][0])
        elif v.HasField("sibling_accept"):
            hit = v.sibling_accept
        else:
            return                                    # a verifier that does not say
        self.planner.observe_siblings(hit, 1)

    def _block_complete(self) -> bool:
        b = self.cur
        ends_at_eos = not self.lead and b.drafted[-1] == self.eos and self.cfg.stop_at_eos
        gamma = min(self.plan.gamma, FIRST_BLOCK) if self.restart and self.cfg.pipelined else self.plan.gamma
        return (len(b.drafted) >= gamma or ends_at_eos
                or len(self.out) + self._spec_len() >= self.cfg.max_tokens)

    def _send(self, b: Block) -> None:
        if self.trees:
            b.siblings = self._pick_siblings(b)
        # Depth-first with the chain first: the siblings follow it, deepest level first,
        # each a leaf whose parent is the chain's node one level up (-1: the root).
        sibs = sorted(b.siblings, reverse=True)
        ids = ([b.fixed] if b.fixed is not None else []) + b.drafted + [y for _, y in sibs]
        d = pb.Draft(epoch=b.epoch, start=b.start, tokens=packing.pack_tokens(ids, self.width),
                     fixed=1 if b.fixed is not None else 0)
        if sibs:
            d.parents = pack_parents(list(range(-1, len(b.drafted) - 1)) + [lvl - 1 for lvl, _ in sibs])
            self.tree_stats["tree_blocks"] += 1
            self.tree_stats["siblings"] += len(sibs)
            shape = "-".join("2" if any(l == lvl for l, _ in sibs) else "1" for lvl in range(len(b.drafted)))
            self.tree_stats["shapes"][shape] = self.tree_stats["shapes"].get(shape, 0) + 1
        if not self.cfg.sampling.greedy:
            if self.codec == Codec.P:
                d.q = packing.pack_u8([q.weights[np.searchsorted(q.ids, x)] for x, q in zip(b.drafted, b.qs)])
            else:
                d.q_sparse.extend(packing.pack_sparse(q, self.width) for q in b.qs)
                d.q_sparse.extend(b"" for _ in sibs)    # drawn from their level's q, without the chain's token
        reaches_end = len(self.out) + self._spec_len() >= self.cfg.max_tokens or b.drafted[-1] == self.eos
        # With no follow-up block coming, the position after the block needs the cloud's bonus token.
        d.want_bonus = b.want_bonus = not reaches_end and not self.lead and (
            not self.cfg.pipelined or self.plan.window == 1)
        b.sent_at = time.monotonic()
        self.restart = False
        self.stream.send(d)
        self.in_flight.append(b)
        self.stats.blocks += 1
        self.stats.drafted += len(b.drafted)

    # -- verdicts ------------------------------------------------------------
    def _on_lead(self, v: pb.Verdict) -> None:
        """A token the verifier decided alone, at the first undecided position."""
        j = self._committed()
        if v.start != j:
            raise CloudError(None, f"lead token for position {v.start}, expected {j}")
        if len(self.context) > j:
            self.stats.lead_checks += 1
            self.stats.lead_hits += self.context[j] == v.token
        if len(self.context) <= j or self.context[j] != v.token:
            # blocks reaching past j drafted another token there: the verifier drops them on arrival
            self._roll_back(j, drop_in_flight=bool(self.in_flight) and self.in_flight[-1].end > j)
            self.context.append(v.token)
        self.stats.leads += 1
        self._commit([v.token])
        while self.in_flight and self.in_flight[0].end <= j + 1:
            self.in_flight.popleft()                 # every position decided by leads: no verdict comes
        if (self.cfg.adaptive and not self.done and self.stats.tokens >= LEAD_SWITCH_AFTER
                and self.stats.leads >= LEAD_SHARE_SWITCH * self.stats.tokens):
            raise SwitchToCloudOnly()

    def _roll_back(self, keep: int, drop_in_flight: bool) -> None:
        """Drop every speculative token from position `keep` on, and the drafter's cache past it;
        with `drop_in_flight` the blocks sent too: a new epoch, whose blocks alone both sides keep."""
        if drop_in_flight:
            self.epoch += 1
            self.stats.rejections += 1
            self.in_flight.clear()
            self.restart = True
        self.cur = None
        self.context = self.context[:keep]
        self.drafter.truncate(min(self.drafter.n_past, keep))

    def take_first_lead(self, token: int) -> None:
        """The verifier's token for the first position, decided at Open (`lead_token`): a lead
        that came with the reply instead of a stream round trip later."""
        self._on_lead(pb.Verdict(epoch=self.epoch, start=self._committed(), token=token, lead=True))

    def _on_verdict(self, v: pb.Verdict) -> None:
        if v.epoch > self.epoch:
            raise CloudError(None, f"verdict for epoch {v.epoch}, ahead of this edge's {self.epoch}")
        if v.epoch != self.epoch or not self.in_flight:
            return                                   # answer to a block we already gave up
        b = self.in_flight.popleft()
        led = max(0, self._committed() - b.first)    # drafts already decided by lead tokens
        if v.start != b.start or v.accepted > len(b.drafted) or v.accepted < led:
            raise CloudError(None, f"verdict for position {v.start} does not match block at {b.start}")
        sibling = self._taken_sibling(b, v)
        if v.accepted == len(b.drafted) and sibling is None and v.HasField("token") and not b.want_bonus:
            # a token after a block that did not ask for one would land behind later drafts
            raise CloudError(None, f"verdict at {v.start} carries a bonus token the block did not ask for")
        n_chain = v.accepted - (sibling is not None)  # chain tokens accepted
        self.planner.observe_block(len(b.drafted) - led, n_chain - led, time.monotonic() - b.sent_at,
                                   v.verify_us / 1e6, siblings=len(b.siblings))
        if b.siblings:
            self.planner.observe_siblings(sibling is not None, len(b.siblings))
        elif self.trees:
            self._observe_unsent_sibling(b, v, n_chain, led)
        self.tree_stats["passes"] += 1
        self.tree_stats["sibling_hits"] += sibling is not None
        # acceptance stays the chain's own (comparable with chains); a taken sibling is
        # counted in tree_stats["sibling_hits"]
        self.stats.accepted += n_chain - led
        self.stats.verified += n_chain - led + (n_chain < len(b.drafted))
        self._commit(b.drafted[led:n_chain])
        if v.accepted == len(b.drafted) and sibling is None:
            if v.HasField("token"):                  # bonus: nothing speculative follows it
                self.context.append(v.token)
                self._commit([v.token])
        else:
            self._roll_back(self._committed(), drop_in_flight=True)
            if sibling is not None:
                self.context.append(sibling)
                self._commit([sibling])
            if v.HasField("token"):
                y = v.token
            elif sibling is not None:
                raise CloudError(None, f"verdict took the sibling at position {v.start + v.accepted - 1} "
                                       "but sent no token after it")
            else:
                y = self._residual_p(v, b.qs[v.accepted])
                self.fixed_next = y                  # travels up with the next block: no message of its own
            self.context.append(y)
            self._commit([y])
        self.planner.observe_progress(len(self.out), time.monotonic())
        if not self.done and self.cfg.adaptive:
            self.plan = self.planner.plan()
            if not self.plan.speculate and self.planner.blocks >= 4:
                raise SwitchToCloudOnly()

    def _taken_sibling(self, b: Block, v: pb.Verdict) -> int | None:
        """The sibling token the verdict's path ends in, or None (it follows the chain)."""
        ranks = list(v.path)
        if not any(ranks):
            return None
        level = v.accepted - 1
        wrong = CloudError(None, f"verdict path {ranks} does not match the tree sent at {b.start}")
        if len(ranks) != v.accepted or any(ranks[:-1]) or ranks[-1] != 1:
            raise wrong                               # siblings are leaves, one per level
        token = next((y for lvl, y in b.siblings if lvl == level), None)
        if token is None:
            raise wrong
        return token

    def _residual_p(self, v: pb.Verdict, q: SparseDist) -> int:
        payload = packing.unpack_payload(v.p_payload, self.width)
        pos = v.start + v.accepted
        rng = rng_for(self.cfg.sampling.seed, pos, STREAM_RESIDUAL)
        token, cursor = sample_residual_p(payload, q, rng)
        while token is None:                         # out of tail draws: ask for more (rare)
            self.stats.tail_requests += 1
            self.stream.send(pb.Draft(epoch=self.epoch, start=pos, more_tail=True))
            extra = self._wait_tail()
            payload = PPayload(payload.top_ids, payload.top_probs,
                               np.concatenate([payload.tail_ids, extra.tail_ids]),
                               np.concatenate([payload.tail_probs, extra.tail_probs]))
            token, cursor = sample_residual_p(payload, q, rng, cursor)
        return token

    def _wait_tail(self) -> PPayload:
        v = self.stream.recv(timeout=self.cfg.stall_timeout_s)
        if v is None or not v.tail:
            raise CloudError(None, "verifier did not answer a request for more tail draws")
        return packing.unpack_payload(v.tail, self.width)

    def _commit(self, tokens: list[int]) -> None:
        for t in tokens:
            if self.done:
                return
            self.out.append(t)
            self.stats.tokens += 1
            if self.stats.tokens == 1:
                self.stats.ttft_s = time.monotonic() - self.t0
            self.on_tokens([t])
            if (t == self.eos and self.cfg.stop_at_eos) or len(self.out) >= self.cfg.max_tokens:
                self.done = True


# Codec Q lets the verifier draw each correction itself and lead on through the
# round trip that codec P spends waiting for the edge's; auto picks Q when the
# planner predicts that gain to exceed what Q's larger uplink could cost.
Q_LEAD_GAIN = 1.05


def choose_codec(cfg: GenConfig, n_vocab: int, measured: Planner | None = None, p_top_k: int = 16,
                 p_tail: int = 4, prior_accept: float = 0.7, gamma: int = 4) -> Codec:
    """`auto`: with a pipelined, leading session and a planner that has measured
    this pair and link (the last session's), the codec of the higher predicted
    rate; otherwise the codec whose expected bytes cost less link time per block,
    uplink weighted by how much scarcer it is (cfg.uplink_share). At T=0 both
    send only token ids, and P is the protocol default."""
    if cfg.codec != "auto":
        return Codec[cfg.codec]
    if cfg.sampling.greedy:
        return Codec.P
    if cfg.tree == "always":
        return Codec.Q    # the codec that carries trees at T>0
    if measured is not None and cfg.pipelined and cfg.cloud_lead and measured.pipelined:
        p_rate = measured.plan(lead_after_rtt=True).spec_rate
        q_rate = measured.plan(lead_after_rtt=False).spec_rate
        if q_rate >= Q_LEAD_GAIN * p_rate:
            return Codec.Q
    w = packing.token_width(n_vocab)
    reject = 1 - prior_accept ** gamma
    p_down = reject * (p_top_k * (w + 4) + p_tail * (w + 4) + 4)
    p_up = gamma          # one byte of q(x) per drafted token
    q_up = gamma * (1 + cfg.q_top_k * (w + 1))
    cost = lambda up, down: up / cfg.uplink_share + down
    return Codec.P if cost(p_up, p_down) <= cost(q_up, 0) else Codec.Q


def open_request(fingerprint: str, cfg: GenConfig, codec: Codec, prompt: list[int]) -> pb.OpenRequest:
    return pb.OpenRequest(fingerprint=fingerprint, sampling=sampling_proto(cfg), codec=codec,
                          prompt=prompt, client="edge-agent", lead=cfg.pipelined and cfg.cloud_lead,
                          max_tokens=cfg.max_tokens, ignore_eos=not cfg.stop_at_eos,
                          lead_first=cfg.lead_first if cfg.pipelined and cfg.cloud_lead else 0,
                          lead_in_reply=cfg.pipelined and cfg.cloud_lead)
