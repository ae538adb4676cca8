"""Turning target/draft logits into the distribution both sides agree on, and drawing from it.

Everything here is a pure function of its arguments: the cloud and the edge must compute the
same distribution from the same logits and the same `SamplingConfig`, and a random decision
at an absolute position must not depend on when (or in which batch) it was taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Random streams per absolute position. Each (seed, pos, stream) owns a disjoint slice of
# Philox's counter space, so no decision can ever consume another decision's randomness.
STREAM_DRAFT = 0
STREAM_ACCEPT = 1
STREAM_RESIDUAL = 2
STREAM_TAIL = 3
STREAM_TARGET = 4
STREAM_RACE = 5   # shared by the draft and the cloud's leading tokens: see race_sample

_U64 = 1 << 64
_U128 = 1 << 128


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # <= 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int = 0

    def __post_init__(self) -> None:
        # Reject here so a bad handshake fails once, not at every token.
        if not np.isfinite(self.temperature):
            raise ValueError(f"temperature must be finite, got {self.temperature!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def _check_logits(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {x.shape}")
    if np.isnan(x).any():
        raise ValueError("logits contain NaN")
    if not np.isfinite(x.max()):
        raise ValueError("logits have no finite maximum (all -inf or some +inf)")
    return x


def _descending_order(x: np.ndarray) -> np.ndarray:
    # Stable sort of -x: among equal values the lower token id comes first. This is the
    # single tie rule for both top-k and top-p, and it matches np.argmax's choice.
    return np.argsort(-x, kind="stable")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def top_k_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k largest entries; boundary ties keep the lower token ids.

    Exactly k tokens survive (never more, unlike Hugging Face's `>= kth value` rule, which keeps
    every tie): a fixed-size kept set is what the wire codecs and the quantiser assume. The
    result equals taking the first k of a stable descending sort, in O(V) instead of O(V log V).
    """
    if k <= 0 or k >= x.size:
        return np.ones(x.shape, dtype=bool)
    kth = np.partition(x, x.size - k)[x.size - k]
    keep = x > kth
    ties = np.flatnonzero(x == kth)[: k - int(keep.sum())]
    keep[ties] = True
    return keep


def runner_up(x: np.ndarray, first: int) -> int:
    """The second entry of the stable descending order when x[first] is its first (the
    argmax): the largest other entry, the lower token id among ties.

    Two argmax scans over views; a partition would cost 20x more on real logits and far
    more on heavily tied ones (introselect degrades on runs of equal values)."""
    cands = []
    if first > 0:
        cands.append(int(np.argmax(x[:first])))
    if first + 1 < x.size:
        cands.append(first + 1 + int(np.argmax(x[first + 1:])))
    if not cands:
        raise ValueError("runner_up needs at least two entries")
    return max(cands, key=lambda i: (x[i], -i))


def top_p_mask(x: np.ndarray, keep: np.ndarray, top_p: float) -> np.ndarray:
    """Shrink `keep` to the smallest descending prefix whose softmax mass reaches top_p."""
    if top_p >= 1.0:
        return keep
    idx = np.flatnonzero(keep)
    sub = x[idx]
    e = np.exp(sub - sub.max())
    probs = e / e.sum()
    # Sorting the whole vocabulary is the slow part, and the prefix is usually short: sort only
    # the entries >= the m-th largest (a set closed under ties, so its stable order is exactly
    # the head of the full stable order), growing m until the prefix fits inside it.
    m = min(64, sub.size)
    while True:
        kth = np.partition(sub, sub.size - m)[sub.size - m]
        cand = np.flatnonzero(sub >= kth)
        order = cand[_descending_order(sub[cand])]
        cum = np.cumsum(probs[order])
        # First position where the prefix mass reaches top_p (searchsorted "left" finds the
        # first cum >= top_p); at least one token is always kept.
        n_keep = int(np.searchsorted(cum, top_p, side="left")) + 1
        if n_keep <= order.size or cand.size == sub.size:
            break
        m = min(4 * m, sub.size)
    out = np.zeros_like(keep)
    out[idx[order[:n_keep]]] = True
    return out


def logits_to_probs(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """Full-vocabulary float64 distribution (zeros outside the kept set).

    Order as in llama.cpp / Hugging Face: temperature, then top-k, then top-p (on the softmax of
    the top-k survivors), then softmax over what is left. Greedy gives a one-hot at np.argmax.
    """
    x = _check_logits(logits)
    if cfg.greedy:
        out = np.zeros(x.size, dtype=np.float64)
        out[int(np.argmax(x))] = 1.0
        return out
    x = x / cfg.temperature
    keep = top_k_mask(x, cfg.top_k)
    keep = top_p_mask(x, keep, cfg.top_p)
    out = np.zeros(x.size, dtype=np.float64)
    out[keep] = _softmax(x[keep])
    return out


def rng_for(seed: int, pos: int, stream: int) -> np.random.Generator:
    """An independent generator for one decision: (seed, absolute position, stream id).

    Philox is counter-based: the key carries the seed and the top two counter words carry
    (pos, stream), so every decision starts in its own 2**128-long block of the counter space.
    """
    if not 0 <= pos < _U64:
        raise ValueError(f"pos must be in [0, 2**64), got {pos!r}")
    if not 0 <= stream < _U64:
        raise ValueError(f"stream must be in [0, 2**64), got {stream!r}")
    counter = (int(stream) << 192) | (int(pos) << 128)
    return np.random.Generator(np.random.Philox(counter=counter, key=int(seed) % _U128))


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw with exactly one rng.random(); `probs` need not be normalised."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"probs must be a non-empty 1-D array, got shape {p.shape}")
    cdf = np.cumsum(p)
    total = cdf[-1]
    if not (total > 0.0 and np.isfinite(total)) or p.min() < 0.0:
        raise ValueError("probs must be non-negative with a positive finite sum")
    u = rng.random() * total
    # side="right": a zero-probability token has cdf equal to its predecessor's, so it can
    # never be the first entry strictly above u.
    i = int(np.searchsorted(cdf, u, side="right"))
    if i >= p.size:
        # u * total rounded up to total: take the last token that has mass.
        i = int(np.flatnonzero(p)[-1])
    return i


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection on uint64 whose output bits all depend on every input bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def race_keys(seed: int, pos: int, ids: np.ndarray) -> np.ndarray:
    """The exponential clocks E_i ~ Exp(1) of the race at one position, for token ids `ids`.

    Each clock is a hash of (seed, pos, token id) alone, so the draft and the target run the
    same race at the same position, and a side needs clocks only for the tokens its
    distribution can pick (tens after top-k/top-p) instead of the whole vocabulary."""
    if not 0 <= pos < _U64:
        raise ValueError(f"pos must be in [0, 2**64), got {pos!r}")
    with np.errstate(over="ignore"):   # uint64 arithmetic wraps by design
        key = _mix64(np.array([int(seed) % _U64], dtype=np.uint64) * _GOLDEN + np.uint64(STREAM_RACE))
        key = _mix64(key ^ np.array([pos], dtype=np.uint64) * _GOLDEN)       # one SplitMix64 stream per (seed, pos)
        z = _mix64(key + (np.asarray(ids, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)
    u = ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53    # uniform on (0, 1), 53 bits
    return -np.log(u)


def race_sample(probs: np.ndarray, keys: np.ndarray, ids: np.ndarray | None = None) -> int:
    """argmax_i probs_i / keys_i: an exact draw from `probs` (normalised or not).

    Token i's clock E_i / p_i is Exp(rate p_i), so i wins with probability p_i / sum(p).
    Two distributions raced on the same keys pick the same token far more often than
    independent draws (identical distributions always agree), which lets a draft
    predict the target's own draws; each side's marginal stays exact. `keys[i]` is the
    clock of entry i, and `ids` names entry i's token (default: token i)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or p.min() < 0.0 or not p.max() > 0.0:
        raise ValueError("probs must be a non-empty 1-D array, non-negative with some mass")
    if np.shape(keys) != p.shape:
        raise ValueError(f"need one key per entry: {np.shape(keys)} keys for {p.shape} probs")
    with np.errstate(divide="ignore"):
        score = np.where(p > 0.0, p / keys, -1.0)
    i = int(np.argmax(score))
    return i if ids is None else int(ids[i])


def race_sample_at(probs: np.ndarray, seed: int, pos: int, ids: np.ndarray | None = None) -> int:
    """race_sample at (seed, pos), computing clocks only for entries with mass."""
    p = np.asarray(probs, dtype=np.float64)
    if ids is None:
        ids = np.flatnonzero(p > 0.0)
        if ids.size == 0:
            raise ValueError("probs must have some mass")
        p = p[ids]
    return race_sample(p, race_keys(seed, pos, ids), ids)
