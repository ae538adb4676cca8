"""`--slo-tokens-per-s S`: admit a session only while every session is predicted to keep S.

The prediction is sim/admission.py's over the target's pass time: the emulated
target's profile, or for a real target the pass time t(n) = a + b*n the verifier
measured at start-up (the one it advertises to edges). Each session's demand is
what it did so far (tokens gained and tokens put in per decode pass: its
acceptance); a session that has not been through a decode pass yet gets a prior:
the verifier-wide mean of speculative sessions' passes, or PRIOR_TAU tokens from
a PRIOR_BLOCK-token pass before there is any, and 1 token from a 1-token pass for
a cloud-only stream. The same numbers give the scheduler its batch budget.

Headroom: the prediction is every session's steady rate, but the SLO is kept by the
tail (p10) of what sessions see, and sessions admitted together, before any pass has
been measured, are priced by the model alone. So decisions and the batch budget aim at
S * (1 + headroom) (`--slo-headroom`, 10 % by default): at 10 tokens/s without it, 32
cloud-only streams on the emulated 32B were all admitted and their p10 came out 9.3
(docs/operations.md).

Two corrections (sim/admission.py): the candidate's prompt must find room in the
passes beside every decode (a prefill chunk within the budget), and every modelled
pass time is scaled by the slowdown the verifier measures while it serves. The
slowdown comes from cloud-only streams: a stream queues its next token as soon
as it has one, so its real interval between passes is all the verifier's (pass,
gap to the next pass, a pass it missed), set against the modelled time of the
pass the scheduler ran meanwhile (every decode, and waiting prompts up to the
budget). A speculative session's interval also holds its link and its drafter,
which would read as a slow verifier, so it is not used.

Everything here runs on the event loop, as the sessions' state does.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable

from cloud.session import Session
from cloud.sessions import Full
from cloud.target import INVARIANT_BATCH
from sim.admission import (Demand, PassTime, Prediction, SessionRatios, Slowdown, admits, batch_budget, pass_tokens,
                           predict, scheduled_pass)
from sim.latency import DEFAULT_BLOCK

PRIOR_TAU = 1.0             # a pass gains at least one token (the correction, bonus or streamed token)
PRIOR_BLOCK = DEFAULT_BLOCK  # tokens a speculative session puts in a pass until one is measured
CHUNK_CAP = 2 * INVARIANT_BATCH  # the scheduler's prefill chunk (cloud/scheduler.py's default)


class SloMissed(Full):
    """Admitting one more session would leave some session under the SLO: refused as a
    full verifier is (RESOURCE_EXHAUSTED with retry-after-ms)."""


@dataclass
class Totals:
    passes: int = 0
    pass_tokens: int = 0
    gained: int = 0


class SloAdmission:
    def __init__(self, slo: float, profile: PassTime, cap: int, floor: int, batched: bool = True,
                 chunk_cap: int = CHUNK_CAP, clock=time.monotonic, headroom: float = 0.0):
        if slo <= 0:
            raise ValueError("the SLO must be > 0 tokens/s")
        if not 0 <= headroom < 1:
            raise ValueError("the SLO headroom must be in [0, 1)")
        self.headroom, self.aim = headroom, slo * (1 + headroom)   # what decisions hold to
        self.slo, self.profile, self.cap, self.floor, self.batched = slo, profile, cap, min(floor, cap), batched
        self.chunk_cap, self.clock = chunk_cap, clock
        self.spec = Totals()                     # speculative sessions' decode passes, verifier-wide
        self._streams: set[str] = set()          # sessions a cloud-only stream opened
        self.now = Prediction(0, 0, 0.0, math.inf)   # the sessions held now
        self.budget = cap
        self.slowdown = Slowdown()               # real over modelled, as streams see it, pass by pass
        self.per_stream = SessionRatios()        # ... and each stream's own, over its life
        self.pass_s = 0.0                        # modelled time of the pass the scheduler runs now
        self._seen: dict[str, float] = {}        # stream -> when its last pass's rows came
        self._ratios: list[float] = []           # streams' real over modelled since the last refresh

    # -- demands -------------------------------------------------------------------
    def prior(self, streaming: bool, prompt_len: int) -> Demand:
        """What a new session is assumed to ask before it has been measured."""
        if streaming:
            return Demand(1.0, 1, prompt_len)
        s = self.spec
        if s.passes and s.gained:
            return Demand(s.gained / s.passes, s.pass_tokens / s.passes, prompt_len)
        return Demand(PRIOR_TAU, PRIOR_BLOCK, prompt_len)

    def demand(self, sess: Session) -> Demand:
        """What `sess` asks: its own mean once it has had a decode pass; until then the
        prior as it stands now (what the verifier learned since it was admitted counts).
        A cloud-only stream always asks 1 token a pass for 1: its counters also hold its
        first step, which carries its whole prompt, and would price every later pass of
        it as a prompt's share (a 70-token prompt: 3.9 tokens a pass over 24 tokens)."""
        c, kv = sess.count, len(sess.tokens)
        if sess.sid in self._streams:
            return self.prior(True, kv)
        if c.passes and c.gained:
            return Demand(c.gained / c.passes, c.pass_tokens / c.passes, kv)
        return self.prior(False, kv)

    # -- decisions -------------------------------------------------------------------
    def check(self, held: Iterable[Session], new: Demand) -> None:
        """Raise SloMissed unless `new` can join `held` with every session keeping the SLO."""
        slow = self.slow()
        ok, p = admits(self.profile, [self.demand(s) for s in held], new, self.aim, self.cap, self.batched,
                       slowdown=slow, chunk_cap=self.chunk_cap, floor=self.floor)
        if ok:
            return
        measured = f" ({slow:.2f}x the modelled pass time, as measured)" if slow > 1 else ""
        aim = f" (aiming at {self.aim:.4g} with {self.headroom:.0%} headroom)" if self.headroom else ""
        if p.min_rate < self.aim:
            raise SloMissed(f"verifier at its SLO: one more session would leave the slowest at {p.min_rate:.2f} "
                            f"tokens/s{measured}, under the {self.slo:g} tokens/s promised{aim}")
        if p.pass_tokens > self.cap:
            raise SloMissed(f"verifier at its SLO: one more session would need a pass of {p.pass_tokens} tokens, "
                            f"over the batch of {self.cap}")
        raise SloMissed(f"verifier at its SLO: with one more session, the {p.pass_tokens} tokens of a pass and a "
                        f"prompt chunk beside them would pass the budget that keeps {self.aim:.4g} tokens/s{measured}")

    def admitted(self, sess: Session, streaming: bool) -> None:
        if streaming:
            self._streams.add(sess.sid)

    def observe(self, sess: Session, n_in: int, gained: int, speculative: bool) -> None:
        """A decode step of `sess` is done (its counters already hold it): learn the prior."""
        if speculative:                         # counted as the session's own counters are
            s = self.spec
            s.passes, s.pass_tokens, s.gained = s.passes + (1 if n_in else 0), s.pass_tokens + n_in, s.gained + gained
        elif n_in and sess.sid in self._streams:
            # a stream's real interval between its passes, over the modelled pass run meanwhile
            now, last = self.clock(), self._seen.get(sess.sid)
            self._seen[sess.sid] = now
            if last is not None and self.pass_s > 0:
                self._ratios.append((now - last) / self.pass_s)
                self.per_stream.add(sess.sid, now - last, self.pass_s)

    def refresh(self, held: Iterable[Session]) -> int:
        """Predict for the sessions held now; returns the batch budget that keeps the
        slowest of them at the SLO (the cap with no session)."""
        held = list(held)
        if self._ratios:
            self.slowdown.add(self._ratios)
            self._ratios = []
        sids = {s.sid for s in held}
        self._streams &= sids
        self._seen = {sid: t for sid, t in self._seen.items() if sid in sids}
        self.per_stream.keep(sids)
        slow = self.slow()
        demands = [self.demand(s) for s in held]
        self.now = predict(self.profile, demands, self.batched, slow)
        if not demands or not self.batched:
            self.budget = self.cap              # one session per pass: each pass is its own, so no budget
            self.pass_s = self.now.pass_s / slow
        else:
            self.budget = batch_budget(self.profile, min(d.tau for d in demands), self.now.kv_tokens, self.aim,
                                       self.cap, self.floor, slow)
            # the pass the scheduler runs now: decodes, and waiting prompts filling the budget
            prompts = [prompt_left(s) for s in held]
            decodes = pass_tokens([d for d, left in zip(demands, prompts) if not left])
            self.pass_s = self.profile.forward_s(scheduled_pass(decodes, sum(prompts), self.budget),
                                                 self.now.kv_tokens)
        return self.budget

    def slow(self) -> float:
        """The slowdown the prediction uses: the running mean over passes, or the slowest
        held stream's own where that is larger."""
        return max(self.slowdown.value, self.per_stream.worst())

    def status(self) -> dict:
        return {"slo_tokens_per_s": self.slo, "slo_headroom": self.headroom,
                "predicted_min_tokens_per_s": None if math.isinf(self.now.min_rate) else round(self.now.min_rate, 3),
                "batch_budget": self.budget, "slowdown": round(self.slow(), 4)}


def prompt_left(sess: Session) -> int:
    """Prompt tokens a session still has to prefill: what its cache lacks before its
    first decode pass (after that, only a token or two of lag, which its demand counts)."""
    lag = len(sess.tokens) - sess.n_past
    return lag if sess.count.passes == 0 and lag > 1 else 0
