"""Chooses block length, window and whether speculation pays at all.

A small cost model fed by measurements (EMAs): draft time per token t_d,
link round trip + verify time for a block, acceptance rate a. For block
length g, with W blocks in flight:

    sync      rate = E_bonus(g) / (g*t_d + rtt + t_v(g))
    pipelined rate = E(g) / (c + (1 - a^g) * (g*t_d + rtt + t_v(g) - c)),
              c = max(g*t_d, t_v(g), (g*t_d + rtt + t_v(g)) / W)

E(g) = expected tokens kept per block (a rejection still yields the
correction). c is the steady-state time between verdicts: the edge drafting a
block, the cloud verifying one (passes are serial per session) or the window
running dry; the second term is the refill after a rejection, when the blocks
in flight are thrown away and the next useful verdict is a whole cycle away.
With cloud_lead the verifier decodes on alone during that refill instead of
idling, so the refill also yields (refill time / t_ar) tokens; speculation
then costs at most the extra verify time per pass (t_v(g) vs t_ar).
The cloud-only rate is the verifier's autoregressive rate, which streaming
preserves over any link. Speculation is abandoned for cloud-only streaming
when its best predicted rate falls below that.

Trees: a block may carry up to B siblings beside its chain (kernels/tree.py).
Each costs verify time (one token's b on a tree-attention target; on a CPU
verifier, which copies and re-evaluates each branch, far more: measured from
the verdicts' verify time, `sibling_s`) and a few uplink bytes, and yields one
more token when the verifier takes it (the sibling, then the target's token
after it, where the chain would have yielded the correction alone); the yield
per sibling sent is measured too (`SiblingGain`). The plan takes the B, 0 included,
of the highest predicted rate, so a tree is chosen only where it is predicted
faster than the chain. A session on chains keeps measuring the yield without
sending siblings: after each verdict the edge works out what its best sibling
would have done (edge/picospec.py: _observe_unsent_sibling).
"""
from __future__ import annotations

import copy
import statistics
from collections import deque
from dataclasses import dataclass

from kernels import speculation_rate


@dataclass
class Ema:
    value: float
    weight: float = 0.25

    def add(self, x: float) -> None:
        self.value += self.weight * (x - self.value)


class WindowMedian:
    """The median of the last `size` samples: a draft step's time. One step can take far longer
    than the rest (a catch-up, a stall, a pause of the device), and an average would carry it
    into the next session's decision (measured: one 1.04 s step among 102 of 13 ms left an EMA
    at 271 ms, and no later session speculated)."""

    def __init__(self, first: float, size: int = 16):
        self._samples: deque[float] = deque([first], maxlen=size)
        self.value = first           # kept current on add: the plan reads it for every (g, W) it prices

    def add(self, x: float) -> None:
        self._samples.append(x)
        self.value = statistics.median(self._samples)


class AcceptRate:
    """Per-position acceptance a: accepted / tested, both decayed. A block's
    accepted/drafted would be biased low (positions after a rejection are never
    tested) and more so the longer the block, which would push g down further."""

    def __init__(self, prior: float, decay: float = 0.85, prior_weight: float = 4.0):
        self.accepted, self.tested, self.decay = prior * prior_weight, prior_weight, decay

    def add(self, accepted: int, tested: int) -> None:
        self.accepted = self.decay * self.accepted + accepted
        self.tested = self.decay * self.tested + tested

    @property
    def value(self) -> float:
        return self.accepted / self.tested


class SiblingGain:
    """Tokens gained per sibling sent (a sibling taken by the verifier gains one),
    decayed like AcceptRate; the prior is what a sibling at an uncertain
    position typically yields, before this pair and link have been measured."""

    def __init__(self, prior: float = 0.15, decay: float = 0.95, prior_weight: float = 8.0):
        self.hits, self.sent, self.decay = prior * prior_weight, prior_weight, decay

    def add(self, hits: int, sent: int) -> None:
        if sent:
            self.hits = self.decay * self.hits + hits
            self.sent = self.decay * self.sent + sent

    @property
    def value(self) -> float:
        return self.hits / self.sent


# A tree must be predicted this much faster than the chain (the model is
# rough, and the chain is the known quantity).
TREE_MARGIN = 1.02

SWITCH_MARGIN = 0.9
# The rate model can be optimistic (measured: a MoE drafter on a 40 ms step, predicted ~1.2x
# cloud-only, ran at 0.85-0.93x), so what a session really gets counts too: once it has
# committed REALIZED_MIN_TOKENS since its first verdict, speculation must also *be* at least
# SWITCH_MARGIN x cloud-only's rate, and the next session starts only if the last one beat
# cloud-only (START_MARGIN).
REALIZED_MIN_TOKENS = 16
# Starting a session is held to a higher bar than keeping one going: a session
# that starts and then falls back has paid its blocks for nothing (measured:
# codec Q against the real CPU target, predicted just above 0.9x, speculated on
# its first prompts before switching and left the bench cell at 0.89x
# cloud-only), while hysteresis keeps a running one from flapping.
START_MARGIN = 1.0


@dataclass
class Plan:
    gamma: int
    window: int
    spec_rate: float
    cloud_rate: float
    tree_budget: int = 0     # siblings per block beside the chain (0: a chain)
    chain_rate: float = 0.0  # the best chain's predicted rate, for comparison
    realized_rate: float | None = None   # tokens/s the session really got (None: too early to say)
    session_rate: float | None = None    # the same from the session's start, its first token's wait included

    @property
    def realized_ok(self) -> bool:
        return self.realized_rate is None or self.realized_rate >= SWITCH_MARGIN * self.cloud_rate

    @property
    def speculate(self) -> bool:
        # The cost model can err either way (measured: stop-and-wait ran ~18 % faster than it
        # predicted against an emulated 70B target), so speculation is abandoned only when
        # predicted clearly slower than cloud-only streaming, or when it really was.
        return self.spec_rate >= SWITCH_MARGIN * self.cloud_rate and self.realized_ok

    @property
    def worth_starting(self) -> bool:
        # Starting again after a session that did not beat cloud-only is a loss even when it
        # held on: each start pays the drafter's prompt prefill before the first token (measured:
        # a MoE drafter's sessions ran at 0.88-0.92x, most of it their later first tokens). So the
        # last session's whole rate, its start included, must have beaten cloud-only's steady
        # rate (which leaves out cloud-only's own first-token wait: a bias towards streaming that
        # only matters where speculation gains a few per cent at most).
        whole = self.session_rate if self.session_rate is not None else self.realized_rate
        realized = whole is None or whole >= START_MARGIN * self.cloud_rate
        return self.spec_rate >= START_MARGIN * self.cloud_rate and realized


class Planner:
    def __init__(self, pipelined: bool, t_draft_s: float, rtt_s: float, verify_a_s: float,
                 verify_b_s: float, ar_token_s: float, prior_accept: float = 0.7,
                 gamma: int | None = None, window: int | None = None, max_gamma: int = 16,
                 max_window: int = 8, lead: bool = False, lead_after_rtt: bool = False,
                 tree: str = "off", started: float | None = None):
        # started: when this session's attempt began (before its Open and the drafter's
        # prefill), so that its whole rate counts what starting it cost
        self.started = started
        # lead_after_rtt: codec P, where the verifier cannot lead past a rejection
        # before the edge's correction arrives, a round trip later
        self.pipelined, self.lead, self.lead_after_rtt = pipelined, lead, lead_after_rtt
        self.t_draft = WindowMedian(t_draft_s)
        # Round trip minus the verifier's compute: a windowed minimum, since
        # blocks queued behind others at the verifier inflate single samples.
        self.rtt_samples: deque[float] = deque([rtt_s], maxlen=16)
        self.accept = AcceptRate(prior_accept)
        self.verify_a, self.verify_b = verify_a_s, verify_b_s
        self.advertised_a = verify_a_s
        self.ar_token_s = ar_token_s
        self.fixed_gamma, self.fixed_window = gamma, window
        self.max_gamma, self.max_window = max_gamma, max_window
        self.blocks = 0
        self.tree = tree                 # off | auto | always (see edge.config)
        self.sibling_gain = SiblingGain()
        self.sibling_s = Ema(verify_b_s, weight=0.3)   # verify time per sibling, measured
        self._progress0: tuple[float, int] | None = None   # (time, tokens) at the first verdict
        self.realized_rate: float | None = None
        self.session_rate: float | None = None

    def observe_block(self, drafted: int, accepted: int, round_trip_s: float, verify_s: float,
                      siblings: int = 0) -> None:
        self.blocks += 1
        if drafted:
            self.accept.add(accepted, accepted + (accepted < drafted))
        self.rtt_samples.append(max(0.0, round_trip_s - verify_s))
        if verify_s > 0 and drafted and not siblings:
            # keep the cloud's advertised fixed cost, learn only the level
            self.verify_a = 0.8 * self.verify_a + 0.2 * max(0.0, verify_s - self.verify_b * drafted)
        elif verify_s > 0 and drafted:
            # what a sibling really costs the verifier, beyond the chain it sits beside (on a
            # CPU its branch is copied and re-evaluated: far more than one token's b)
            extra = max(0.0, verify_s - self.verify_a - self.verify_b * drafted) / siblings
            self.sibling_s.add(extra)

    def observe_siblings(self, hits: int, sent: int) -> None:
        self.sibling_gain.add(hits, sent)

    def observe_draft(self, seconds: float) -> None:
        self.t_draft.add(seconds)

    def observe_progress(self, tokens: int, now: float) -> None:
        """The session has committed `tokens` at time `now` (called per verdict): the rate it
        really gets, counted from the first verdict so that the start-up round trip is left out
        (whether to go on), and from `started` (whether to start again)."""
        if self._progress0 is None:
            self._progress0 = (now, tokens)
            return
        t0, n0 = self._progress0
        if tokens - n0 >= REALIZED_MIN_TOKENS and now > t0:
            self.realized_rate = (tokens - n0) / (now - t0)
            if self.started is not None and now > self.started:
                self.session_rate = tokens / (now - self.started)

    @property
    def cloud_token_s(self) -> float:
        """The verifier's time per token if this session streamed from it now.
        A shared verifier batches every session into one pass, so under load a
        pass (and a block's verify time) grows for streaming and speculation
        alike: the verify time measured over the advertised one scales both."""
        load = max(1.0, self.verify_a / self.advertised_a) if self.advertised_a > 0 else 1.0
        return max(self.ar_token_s * load, 1e-6)

    @property
    def rtt(self) -> float:
        return min(self.rtt_samples)

    def rate(self, g: int, w: int, siblings: int = 0) -> float:
        """Predicted tokens/s for block length g and window w; w == 1 is
        stop-and-wait, where the cloud adds a bonus token after a full accept.
        `siblings`: tree nodes beside the chain, each a verify token more and
        `sibling_gain` tokens more per block."""
        tv = self.verify_a + self.verify_b * (g + 1) + self.sibling_s.value * siblings
        return speculation_rate.rate(self.accept.value, g, w, self.t_draft.value, self.rtt, tv,
                                     extra=siblings * self.sibling_gain.value,
                                     lead_token_s=self.cloud_token_s if self.lead else None,
                                     lead_after_rtt=self.lead_after_rtt)

    def plan(self, lead_after_rtt: bool | None = None) -> Plan:
        """The best (g, w); pipelined sessions also weigh stop-and-wait, which
        wins when rejections are frequent enough that drafting ahead is waste.
        `lead_after_rtt`: price the other codec's leading instead of this session's."""
        if lead_after_rtt is not None and lead_after_rtt != self.lead_after_rtt:
            other = copy.copy(self)
            other.lead_after_rtt = lead_after_rtt
            return other.plan()
        cloud = 1.0 / self.cloud_token_s
        gammas = [self.fixed_gamma] if self.fixed_gamma else range(1, self.max_gamma + 1)
        best = None
        for g in gammas:
            for w in self._windows(g):
                r = self.rate(g, w)
                if best is None or r > best.spec_rate:
                    best = Plan(g, w, r, cloud, realized_rate=self.realized_rate,
                                session_rate=self.session_rate)
        best.chain_rate = best.spec_rate
        if self.tree == "off":
            return best
        # The chain's (g, w), with the sibling budget of the highest rate;
        # `always` takes at least one sibling.
        budgets = range(1 if self.tree == "always" else 0, best.gamma + 1)
        b = max(budgets, key=lambda k: (self.rate(best.gamma, best.window, k), -k))
        r = self.rate(best.gamma, best.window, b)
        if self.tree == "always" or r >= TREE_MARGIN * best.chain_rate:
            best.tree_budget, best.spec_rate = b, r
        return best

    def _windows(self, g: int) -> list[int]:
        if not self.pipelined:
            return [1]
        if self.fixed_window:
            return [self.fixed_window]
        return speculation_rate.windows(g, self.t_draft.value, self.rtt, self.verify_a + self.verify_b * (g + 1),
                                        self.max_window)
