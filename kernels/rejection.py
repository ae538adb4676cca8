"""Lossless speculative-decoding verification math.

Vocabulary used throughout (as in vLLM's rejection sampler):

- **draft tokens** x_1..x_γ: proposed by the edge, x_i ~ q_i (the draft distribution at
  position i, exactly the `SparseDist` the edge sampled from).
- **accepted tokens**: the longest prefix of the draft that passes verification. Greedy: x_i
  equals the target's argmax. Random: x_i passes `u_i < min(1, p_i(x_i) / q_i(x_i))` with
  u_i ~ U[0, 1) (p_i: the target distribution).
- **correction (recovered) token**: emitted at the first rejected position j instead of x_j.
  Greedy: the target's argmax at j. Random: a draw from the residual
  `norm(max(0, p_j - q_j))`. Accept-or-correct at one position yields exactly p_j.
- **bonus token**: when all γ drafts are accepted, one more token from the target at position
  γ+1 (its argmax, or a draw from p_{γ+1}), free because the target scored that position anyway.

Separate rejection sampling (PicoSpec): the accept test runs in the cloud, which needs only
x_i and q_i(x_i). The residual needs both p_j (cloud) and q_j (edge), so one of them crosses
the link after a rejection: codec Q sends q up with the draft (`sample_residual`, cloud side);
codec P sends p down once, sparse (`encode_p` / `sample_residual_p`, edge side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kernels.sampling import sample
from kernels.sparse import SparseDist, kept_indices

__all__ = [
    "PPayload",
    "accept_token",
    "draw_tail",
    "encode_p",
    "residual_probs",
    "residual_weights",
    "sample_residual",
    "sample_residual_p",
    "snap_p",
    "total_variation",
    "verify_greedy",
]


# ---------------------------------------------------------------------------------------------
# Greedy and per-token tests
# ---------------------------------------------------------------------------------------------


def verify_greedy(draft: Sequence[int], target_argmax: Sequence[int]) -> tuple[int, int]:
    """(n_accepted, next_token): next_token is the correction, else the bonus (-1 if not given)."""
    n = len(draft)
    if len(target_argmax) not in (n, n + 1):
        raise ValueError(
            f"target_argmax needs {n} or {n + 1} entries for {n} draft tokens, "
            f"got {len(target_argmax)}"
        )
    for i in range(n):
        if int(draft[i]) != int(target_argmax[i]):
            return i, int(target_argmax[i])
    return n, int(target_argmax[n]) if len(target_argmax) > n else -1


def accept_token(p_x: float, q_x: float, u: float) -> bool:
    """The random accept test u < min(1, p(x) / q(x)); x was drawn from q, so q(x) > 0."""
    if not q_x > 0.0:
        raise ValueError(f"q(x) must be > 0 for a drafted token, got {q_x!r}")
    return u < min(1.0, p_x / q_x)


def residual_weights(p: np.ndarray, q: np.ndarray | SparseDist) -> np.ndarray:
    """Unnormalised max(0, p - q): the one place the residual is computed.

    q is dense (full vocabulary) or a `SparseDist`; a sparse q is subtracted at its own ids
    only (p is full-vocab, q has a few entries), with the same float expression as
    SparseDist.dense, so both forms of one q give the same bits."""
    if not isinstance(q, SparseDist):
        return np.maximum(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64), 0.0)
    r = np.array(p, dtype=np.float64)
    if q.ids[-1] >= r.size:
        raise ValueError(f"q has token id {int(q.ids[-1])} outside vocabulary of {r.size}")
    r[q.ids] = np.maximum(r[q.ids] - q.weights / q.total, 0.0)
    return r


def residual_probs(p: np.ndarray, q: np.ndarray | SparseDist) -> np.ndarray:
    """norm(max(0, p - q)); p itself when the residual is empty (p == q: nothing is rejected)."""
    r = residual_weights(p, q)
    s = r.sum()
    if s <= 0.0:
        return np.array(p, dtype=np.float64)
    return r / s


def sample_residual(p: np.ndarray, q: SparseDist, rng: np.random.Generator) -> int:
    """Codec Q, cloud side: one exact draw from norm(max(0, p - q))."""
    r = residual_weights(p, q)
    if not r.sum() > 0.0:
        return sample(p, rng)
    return sample(r, rng)


def total_variation(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).sum())


# ---------------------------------------------------------------------------------------------
# Codec P: p goes down once, sparse; the edge finishes the residual draw itself
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class PPayload:
    top_ids: np.ndarray  # int64, the K most probable tokens of p, ascending id
    top_probs: np.ndarray  # float32, their exact probabilities as the cloud used them
    tail_ids: np.ndarray  # int64, pre-drawn y ~ p restricted to the tail, in draw order
    tail_probs: np.ndarray  # float32, p(y) for each tail draw

    def __post_init__(self) -> None:
        self.top_ids = np.asarray(self.top_ids, dtype=np.int64).reshape(-1)
        self.top_probs = np.asarray(self.top_probs, dtype=np.float32).reshape(-1)
        self.tail_ids = np.asarray(self.tail_ids, dtype=np.int64).reshape(-1)
        self.tail_probs = np.asarray(self.tail_probs, dtype=np.float32).reshape(-1)
        if self.top_ids.size != self.top_probs.size:
            raise ValueError(f"{self.top_ids.size} top ids but {self.top_probs.size} probs")
        if self.tail_ids.size != self.tail_probs.size:
            raise ValueError(f"{self.tail_ids.size} tail ids but {self.tail_probs.size} probs")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PPayload):
            return NotImplemented
        return all(
            np.array_equal(getattr(self, f), getattr(other, f))
            for f in ("top_ids", "top_probs", "tail_ids", "tail_probs")
        )

    @property
    def top_mass(self) -> float:
        return float(self.top_probs.astype(np.float64).sum())

    @property
    def tail_mass(self) -> float:
        return max(0.0, 1.0 - self.top_mass)

    def with_tail(self, tail_ids: np.ndarray, tail_probs: np.ndarray) -> "PPayload":
        """This payload extended by more tail draws (what the edge holds after asking for more)."""
        return PPayload(
            top_ids=self.top_ids,
            top_probs=self.top_probs,
            tail_ids=np.concatenate([self.tail_ids, np.asarray(tail_ids, np.int64)]),
            tail_probs=np.concatenate([self.tail_probs, np.asarray(tail_probs, np.float32)]),
        )


def snap_p(p: np.ndarray) -> np.ndarray:
    """p rounded through float32: the values the cloud tests with and sends, bit for bit."""
    return np.asarray(p).astype(np.float32).astype(np.float64)


def draw_tail(
    p: np.ndarray, top_ids: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """n iid draws y ~ p restricted to the tokens outside top_ids, with p(y) as float32.

    When the tail holds no mass (every non-zero token is in top_ids) the edge can still be asked
    for a tail draw, because float32 rounding leaves payload.tail_mass a hair above 0; such draws
    come from p itself, which keeps every proposal distributed as p.
    """
    p = np.asarray(p, dtype=np.float64)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    w = p.copy()
    w[np.asarray(top_ids, dtype=np.int64)] = 0.0
    if not w.sum() > 0.0:
        w = p
    cdf = np.cumsum(w)
    u = rng.random(n) * cdf[-1]
    ids = np.searchsorted(cdf, u, side="right")
    # Guard the u * total == total rounding case, as kernels.sampling.sample does.
    ids = np.minimum(ids, np.flatnonzero(w)[-1]).astype(np.int64)
    return ids, p[ids].astype(np.float32)


def encode_p(p: np.ndarray, top_k: int, n_tail: int, rng: np.random.Generator) -> PPayload:
    """The codec-P downlink for a (snapped) p: its top_k entries plus n_tail pre-drawn tail samples."""
    p = np.asarray(p, dtype=np.float64)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k!r}")
    top = kept_indices(p, top_k)
    tail_ids, tail_probs = draw_tail(p, top, n_tail, rng)
    return PPayload(
        top_ids=top,
        top_probs=p[top].astype(np.float32),
        tail_ids=tail_ids,
        tail_probs=tail_probs,
    )


def _residual_provably_empty(payload: PPayload, q: SparseDist) -> bool:
    """True when max(0, p - q) is zero everywhere, judged from what the edge knows.

    The edge knows p exactly on the top-K entries and only the mass of the tail, so the residual
    is provably empty when the top part has none and the tail has no mass. With q on an odd
    total (2**bits - 1) and p in float32, p == q is possible only for one-hot p == q, which lands
    here. An empty residual the edge cannot prove (p <= q everywhere with p's float32 mass a
    hair short of 1 and no tail token outside q) would make every round reject: the caller
    should cap how many times it extends the tail.
    """
    if payload.tail_mass > 0.0:
        return False
    i = np.minimum(np.searchsorted(q.ids, payload.top_ids), q.ids.size - 1)
    top_q = np.where(q.ids[i] == payload.top_ids, q.weights[i] / q.total, 0.0)
    return not np.any(payload.top_probs.astype(np.float64) > top_q)


def sample_residual_p(
    payload: PPayload, q: SparseDist, rng: np.random.Generator, tail_cursor: int = 0
) -> tuple[int | None, int]:
    """Codec P, edge side: an exact draw from norm(max(0, p - q)) by proposing from p.

    Each round proposes y ~ p (a top entry with probability top_mass, else the next unused tail
    draw) and accepts it with probability max(0, 1 - q(y)/p(y)), so P(y) ∝ (p(y) - q(y))⁺.

    Returns (token, cursor), or (None, cursor) when a round is about to start with no unused
    tail draw left: extend the payload's tail (`PPayload.with_tail`) and call again with that
    cursor and the SAME rng (its state carried on, not a fresh `rng_for`). Rounds are iid and
    the check happens only between rounds, so stopping there and resuming later is exactly the
    uninterrupted loop. (Asking only once a round has chosen the tail would be cheaper but
    biased: a resumed call would re-flip the top/tail coin that had come up tail.) Send
    n_tail >= 1 with the payload, or the first call already asks for more.
    """
    if not 0 <= tail_cursor <= payload.tail_ids.size:
        raise ValueError(f"tail_cursor {tail_cursor} outside [0, {payload.tail_ids.size}]")
    top_probs = payload.top_probs.astype(np.float64)
    top_cdf = np.cumsum(top_probs)
    top_mass = float(top_cdf[-1]) if top_cdf.size else 0.0
    tail_mass = payload.tail_mass
    mass = top_mass + tail_mass
    if not mass > 0.0:
        raise ValueError("payload carries no probability mass")
    if _residual_provably_empty(payload, q):
        # p == q: nothing can be rejected for real, and residual_probs falls back to p.
        i = int(np.searchsorted(top_cdf, rng.random() * top_mass, side="right"))
        return int(payload.top_ids[min(i, top_cdf.size - 1)]), tail_cursor
    cursor = tail_cursor
    while True:
        if tail_mass > 0.0 and cursor >= payload.tail_ids.size:
            return None, cursor
        u = rng.random() * mass
        if u < top_mass:
            i = min(int(np.searchsorted(top_cdf, u, side="right")), top_cdf.size - 1)
            y, p_y = int(payload.top_ids[i]), float(top_probs[i])
        else:
            y, p_y = int(payload.tail_ids[cursor]), float(payload.tail_probs[cursor])
            cursor += 1
        if rng.random() * p_y < p_y - q.prob(y):
            return y, cursor
