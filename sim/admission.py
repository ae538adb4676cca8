"""Admission by SLO: does every session keep S tokens/s if one more is admitted?

Pure math over a target's modelled pass time; `cloud-verifier --slo-tokens-per-s`
feeds it the sessions it holds (cloud/admission.py).

    i = 1..n     the sessions, the candidate included
    tau_i        tokens session i gains per pass it takes part in (accepted drafts
                 + correction or bonus for speculation; 1 for cloud-only)
    b_i          tokens it puts in a pass (block + 1 for speculation, 1 for cloud-only)
    kv_i         tokens its sequence holds (what the pass's attention reads)

Batched, every session takes part in one pass of B = sum(b_i) tokens over
K = sum(kv_i) tokens of KV cache, which lasts t = forward_s(B, K); session i then
gains tau_i / t tokens/s at best (one pass per pass time). One session per pass
(no batching): a round of passes lasts sum_j forward_s(b_j, kv_j), and session i
gains tau_i per round. The candidate is admitted iff every session, the candidate
included, is predicted to keep S and the batched pass fits the batch cap.

What it does not model: a session slowed by its own link or drafter takes part
in fewer passes (the verifier cannot help it either way), and prompt prefills
add passes while they last (the scheduler keeps them within the budget below).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence


class PassTime(Protocol):
    """What a latency profile offers: seconds for a pass of n tokens over kv tokens of KV cache."""

    def forward_s(self, n_tokens: int, kv_tokens: int | None = None) -> float: ...


@dataclass(frozen=True)
class Demand:
    """What one session asks of the target per pass."""
    tau: float      # tokens gained per pass it takes part in
    tokens: float   # tokens it puts in a pass (b)
    kv: int = 0     # tokens its sequence holds

    def __post_init__(self):
        if self.tau <= 0 or self.tokens <= 0 or self.kv < 0:
            raise ValueError(f"a demand needs tau > 0, tokens > 0 and kv >= 0, got {self}")


@dataclass(frozen=True)
class Prediction:
    pass_tokens: int    # tokens in the batched pass (one session's pass, unbatched: the largest)
    kv_tokens: int
    pass_s: float       # time of that pass; unbatched: of a round of one pass per session
    min_rate: float     # tokens/s of the slowest session (inf with no session)


def pass_tokens(demands: Sequence[Demand]) -> int:
    """Tokens in a pass carrying every demand: a fractional mean rounds up (a pass
    holds whole tokens, and rounding up never flatters the prediction)."""
    return math.ceil(sum(d.tokens for d in demands) - 1e-9)


def predict(profile: PassTime, demands: Sequence[Demand], batched: bool = True) -> Prediction:
    """The slowest session's predicted tokens/s when all of `demands` share the target."""
    if not demands:
        return Prediction(0, 0, 0.0, math.inf)
    kv = sum(d.kv for d in demands)
    if batched:
        n = pass_tokens(demands)
        t = profile.forward_s(n, kv)
    else:
        n = max(math.ceil(d.tokens - 1e-9) for d in demands)
        t = sum(profile.forward_s(math.ceil(d.tokens - 1e-9), d.kv) for d in demands)
    return Prediction(n, kv, t, min(d.tau for d in demands) / t)


def admits(profile: PassTime, held: Sequence[Demand], new: Demand, slo: float, cap: int,
           batched: bool = True) -> tuple[bool, Prediction]:
    """Whether `new` may join `held` with every session keeping `slo` tokens/s, and the
    prediction with it admitted. Batched, the pass must also fit `cap` tokens: a pass
    that does not fit splits, and the one-pass prediction would flatter it."""
    p = predict(profile, [*held, new], batched)
    fits = not batched or p.pass_tokens <= cap
    return fits and p.min_rate >= slo, p


def batch_budget(profile: PassTime, min_tau: float, kv_tokens: int, slo: float, cap: int, floor: int) -> int:
    """The most tokens a pass may carry while the slowest session (`min_tau` tokens per
    pass) keeps `slo`: the largest n in [floor, cap] with min_tau / forward_s(n, K) >= slo.
    `floor` when even that misses (a block is never split, so a pass must hold one);
    pass time grows with n, so a bisection finds it."""
    if cap < floor:
        raise ValueError(f"cap {cap} is below floor {floor}")
    ok = lambda n: min_tau / profile.forward_s(n, kv_tokens) >= slo   # noqa: E731
    if not ok(floor):
        return floor
    lo, hi = floor, cap                      # ok(lo) holds; find the last n that does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
