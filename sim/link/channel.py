"""What happens to bytes after they leave the bottleneck: delay, jitter, loss.

Loss is modelled as TCP experiences it over a byte stream: a lost segment is
retransmitted, so the bytes still arrive, one RTO late, and the retransmission
uses link capacity again. Jitter never reorders a byte stream: the caller
delivers each chunk no earlier than the one before it (TCP would hold later
bytes back anyway), so heavy jitter shows up as head-of-line delay.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from sim.link.config import MSS, Direction


@dataclass(frozen=True)
class Impairment:
    delay_s: float  # propagation delay + jitter for this chunk (>= 0)
    lost_segments: int  # segments that needed a retransmission
    rto_s: float  # extra delay they caused (0 when none was lost)


def impair(cond: Direction, nbytes: int, rto_s: float, rng: random.Random) -> Impairment:
    delay = cond.delay_ms
    if cond.jitter_ms > 0:
        if cond.jitter_dist == "normal":
            delay += rng.gauss(0.0, cond.jitter_ms)
        elif cond.jitter_dist == "uniform":
            delay += rng.uniform(-cond.jitter_ms, cond.jitter_ms)
        else:  # exponential: one-sided queueing-like delay with mean jitter_ms
            delay += rng.expovariate(1.0 / cond.jitter_ms)
    lost = 0
    if cond.loss > 0 and nbytes > 0:
        lost = sum(rng.random() < cond.loss for _ in range(math.ceil(nbytes / MSS)))
    return Impairment(delay_s=max(0.0, delay) / 1000, lost_segments=lost, rto_s=rto_s if lost else 0.0)
