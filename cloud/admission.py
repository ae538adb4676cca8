"""`--slo-tokens-per-s S`: admit a session only while every session is predicted to keep S.

The prediction is sim/admission.py's over the target's pass time: the emulated
target's profile, or for a real target the pass time t(n) = a + b*n the verifier
measured at start-up (the one it advertises to edges). Each session's demand is
what it did so far (tokens gained and tokens put in per decode pass: its
acceptance); a session that has not been through a decode pass yet gets a prior:
the verifier-wide mean of speculative sessions' passes, or PRIOR_TAU tokens from
a PRIOR_BLOCK-token pass before there is any, and 1 token from a 1-token pass for
a cloud-only stream. The same numbers give the scheduler its batch budget.

Everything here runs on the event loop, as the sessions' state does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from cloud.session import Session
from cloud.sessions import Full
from sim.admission import Demand, PassTime, Prediction, admits, batch_budget, predict
from sim.latency import DEFAULT_BLOCK

PRIOR_TAU = 1.0             # a pass gains at least one token (the correction, bonus or streamed token)
PRIOR_BLOCK = DEFAULT_BLOCK  # tokens a speculative session puts in a pass until one is measured


class SloMissed(Full):
    """Admitting one more session would leave some session under the SLO: refused as a
    full verifier is (RESOURCE_EXHAUSTED with retry-after-ms)."""


@dataclass
class Totals:
    passes: int = 0
    pass_tokens: int = 0
    gained: int = 0


class SloAdmission:
    def __init__(self, slo: float, profile: PassTime, cap: int, floor: int, batched: bool = True):
        if slo <= 0:
            raise ValueError("the SLO must be > 0 tokens/s")
        self.slo, self.profile, self.cap, self.floor, self.batched = slo, profile, cap, min(floor, cap), batched
        self.spec = Totals()                     # speculative sessions' decode passes, verifier-wide
        self._streams: set[str] = set()          # sessions a cloud-only stream opened
        self.now = Prediction(0, 0, 0.0, math.inf)   # the sessions held now
        self.budget = cap

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
        prior as it stands now (what the verifier learned since it was admitted counts)."""
        c, kv = sess.count, len(sess.tokens)
        if c.passes and c.gained:
            return Demand(c.gained / c.passes, c.pass_tokens / c.passes, kv)
        return self.prior(sess.sid in self._streams, kv)

    # -- decisions -------------------------------------------------------------------
    def check(self, held: Iterable[Session], new: Demand) -> None:
        """Raise SloMissed unless `new` can join `held` with every session keeping the SLO."""
        ok, p = admits(self.profile, [self.demand(s) for s in held], new, self.slo, self.cap, self.batched)
        if ok:
            return
        if p.min_rate >= self.slo:
            raise SloMissed(f"verifier at its SLO: one more session would need a pass of {p.pass_tokens} tokens, "
                            f"over the batch of {self.cap}")
        raise SloMissed(f"verifier at its SLO: one more session would leave the slowest at {p.min_rate:.2f} "
                        f"tokens/s, under the {self.slo:g} tokens/s promised")

    def admitted(self, sess: Session, streaming: bool) -> None:
        if streaming:
            self._streams.add(sess.sid)

    def observe(self, sess: Session, n_in: int, gained: int, speculative: bool) -> None:
        """A decode step of `sess` is done (its counters already hold it): learn the prior."""
        if speculative:                         # counted as the session's own counters are
            s = self.spec
            s.passes, s.pass_tokens, s.gained = s.passes + (1 if n_in else 0), s.pass_tokens + n_in, s.gained + gained

    def refresh(self, held: Iterable[Session]) -> int:
        """Predict for the sessions held now; returns the batch budget that keeps the
        slowest of them at the SLO (the cap with no session)."""
        held = list(held)
        self._streams &= {s.sid for s in held}
        demands = [self.demand(s) for s in held]
        self.now = predict(self.profile, demands, self.batched)
        if not demands or not self.batched:
            self.budget = self.cap              # one session per pass: each pass is its own, so no budget
        else:
            self.budget = batch_budget(self.profile, min(d.tau for d in demands), self.now.kv_tokens, self.slo,
                                       self.cap, self.floor)
        return self.budget

    def status(self) -> dict:
        return {"slo_tokens_per_s": self.slo,
                "predicted_min_tokens_per_s": None if math.isinf(self.now.min_rate) else round(self.now.min_rate, 3),
                "batch_budget": self.budget}
