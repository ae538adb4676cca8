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

Two corrections make the prediction honest where the bare model flatters it:

  slowdown     real time over modelled time of what sessions see: every pass time
               above is multiplied by it (>= 1). The verifier measures it while it
               serves (`Slowdown`): a stream's real interval between its passes over
               the modelled time of the pass the scheduler ran meanwhile. It holds
               the per-pass cost beyond the modelled pass (the gap between passes,
               streams that miss a pass).
  prompts      while a prompt is prefilled the scheduler fills each pass up to its
               batch budget and keeps one prefill chunk of it from decodes
               (cloud/scheduler.py). A candidate brings a prompt, so it is admitted
               only if every decode fits beside a chunk within the budget that keeps
               the slowest at S: then passes that carry prompts keep S too.

What it does not model: a session slowed by its own link or drafter takes part
in fewer passes (the verifier cannot help it either way).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Iterable, Protocol, Sequence


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


def predict(profile: PassTime, demands: Sequence[Demand], batched: bool = True,
            slowdown: float = 1.0) -> Prediction:
    """The slowest session's predicted tokens/s when all of `demands` share the target,
    each pass taking `slowdown` times its modelled time."""
    if not demands:
        return Prediction(0, 0, 0.0, math.inf)
    kv = sum(d.kv for d in demands)
    if batched:
        n = pass_tokens(demands)
        t = profile.forward_s(n, kv)
    else:
        n = max(math.ceil(d.tokens - 1e-9) for d in demands)
        t = sum(profile.forward_s(math.ceil(d.tokens - 1e-9), d.kv) for d in demands)
    t *= slowdown
    return Prediction(n, kv, t, min(d.tau for d in demands) / t)


def prefill_chunk(budget: int, chunk_cap: int) -> int:
    """The room a waiting prompt keeps in a pass under a batch budget: half the budget,
    at most `chunk_cap` (cloud/scheduler.py's Scheduler.set_budget)."""
    return max(1, min(chunk_cap, budget // 2))


def admits(profile: PassTime, held: Sequence[Demand], new: Demand, slo: float, cap: int,
           batched: bool = True, slowdown: float = 1.0, chunk_cap: int | None = None,
           floor: int = 1) -> tuple[bool, Prediction]:
    """Whether `new` may join `held` with every session keeping `slo` tokens/s, and the
    prediction with it admitted. Batched, the pass must also fit `cap` tokens: a pass
    that does not fit splits, and the one-pass prediction would flatter it.

    With `chunk_cap` (batched), the candidate's prompt is counted too: while it is
    prefilled, a pass keeps a chunk of it beside the decodes, so every decode must fit
    in the batch budget that keeps `slo` (`batch_budget`, over `floor`) less that chunk;
    past it, decodes wait a pass each time a chunk goes in."""
    demands = [*held, new]
    p = predict(profile, demands, batched, slowdown)
    fits = not batched or p.pass_tokens <= cap
    if batched and chunk_cap is not None and fits and p.min_rate >= slo:
        budget = batch_budget(profile, min(d.tau for d in demands), p.kv_tokens, slo, cap, floor, slowdown)
        fits = p.pass_tokens + prefill_chunk(budget, chunk_cap) <= budget
    return fits and p.min_rate >= slo, p


def batch_budget(profile: PassTime, min_tau: float, kv_tokens: int, slo: float, cap: int, floor: int,
                 slowdown: float = 1.0) -> int:
    """The most tokens a pass may carry while the slowest session (`min_tau` tokens per
    pass) keeps `slo`: the largest n in [floor, cap] with min_tau / (slowdown *
    forward_s(n, K)) >= slo. `floor` when even that misses (a block is never split, so a
    pass must hold one); pass time grows with n, so a bisection finds it."""
    if cap < floor:
        raise ValueError(f"cap {cap} is below floor {floor}")
    ok = lambda n: min_tau / (slowdown * profile.forward_s(n, kv_tokens)) >= slo   # noqa: E731
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


def scheduled_pass(decode_tokens: int, prompt_tokens: int, budget: int) -> int:
    """Tokens in the pass the scheduler runs now: every decode, and waiting prompt tokens
    up to the batch budget (a prompt takes the room decodes leave)."""
    return decode_tokens + min(prompt_tokens, max(0, budget - decode_tokens))


class Slowdown:
    """How much slower than modelled the verifier serves: a running mean, over passes,
    of the real interval each session saw between its last two passes over the modelled
    time of the pass run in that interval. A pass's sessions count as one sample (their
    mean), folded in with `weight`; it starts at 1 (the model) and never goes below it:
    a pass is never shorter than its model (an emulated one is held to it), so a ratio
    under 1 is an interval measured across a pass boundary, not a faster verifier."""

    def __init__(self, weight: float = 0.2):
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        self.weight, self.value, self.passes = weight, 1.0, 0

    def add(self, ratios: Iterable[float]) -> float:
        """Fold in one pass's real-over-modelled ratios; returns the measure."""
        ratios = list(ratios)
        if ratios:
            r = max(1.0, sum(ratios) / len(ratios))
            self.value += self.weight * (r - self.value)
            self.passes += 1
        return self.value


class SessionRatios:
    """Each session's own real over modelled time, over the passes it took part in: the
    sum of its real intervals over the sum of the modelled pass times they were set
    against. `worst` is the slowest such session's, once it has `min_intervals` of them:
    the SLO is every session's, and a session that misses passes or sees longer gaps
    than the others is slower than the verifier-wide mean says."""

    def __init__(self, min_intervals: int = 4):
        self.min_intervals = min_intervals
        self._sums: dict[Hashable, list] = {}      # key -> [real s, modelled s, intervals]

    def add(self, key: Hashable, real_s: float, modelled_s: float) -> None:
        acc = self._sums.setdefault(key, [0.0, 0.0, 0])
        acc[0] += real_s
        acc[1] += modelled_s
        acc[2] += 1

    def keep(self, keys: Iterable[Hashable]) -> None:
        """Forget every session but `keys` (the ones held)."""
        keys = set(keys)
        self._sums = {k: v for k, v in self._sums.items() if k in keys}

    def worst(self) -> float:
        """The largest ratio over sessions with enough intervals (never below 1; 1 with none)."""
        return max([1.0] + [real / modelled for real, modelled, n in self._sums.values()
                            if n >= self.min_intervals and modelled > 0])
