"""Which experts to hold, at what precision, and what to fetch ahead.

One `PolicyConfig` per named policy; the decisions are small pure methods
so the runtime stays a plain loop.

- resident-fp: every expert in memory at full precision (quality reference).
- lru-fp: on-demand reads at full precision, LRU eviction (llama.cpp mmap).
- lru-prefetch-int4: LRU + next-layer gate prefetch, everything int4
  (Mixtral-offloading).
- static-int2 / static-int4: uniform precision, LRU.
- dymoe: per-token importance picks each expert's precision (top gate
  weight high, the rest low), per-layer floors from measured sensitivity,
  residency by a calibration-free prior (running gate frequency + weight
  norm score), look-ahead prefetch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edge.moe.store import FP

POLICIES = ("resident-fp", "lru-fp", "lru-prefetch-int4", "static-int2", "static-int4", "dymoe")


@dataclass
class PolicyConfig:
    name: str
    high_bits: int = FP          # precision for important experts
    low_bits: int = FP           # precision allowed for unimportant ones
    high_share: float = 1.0      # experts covering this much gate mass run high
    prefetch: bool = False
    prior: bool = False          # residency by frequency + norm prior (else LRU)
    all_resident: bool = False
    floors: dict[int, int] = field(default_factory=dict)   # layer -> min bits

    @classmethod
    def from_name(cls, name: str, floors: dict[int, int] | None = None) -> "PolicyConfig":
        table = {
            "resident-fp": dict(all_resident=True),
            "lru-fp": dict(),
            "lru-prefetch-int4": dict(high_bits=4, low_bits=4, prefetch=True),
            "static-int2": dict(high_bits=2, low_bits=2),
            "static-int4": dict(high_bits=4, low_bits=4),
            "dymoe": dict(high_bits=4, low_bits=2, high_share=0.5, prefetch=True, prior=True),
        }
        if name not in table:
            raise ValueError(f"unknown MoE policy {name!r}; known: {', '.join(POLICIES)}")
        return cls(name=name, floors=dict(floors or {}) if name == "dymoe" else {}, **table[name])

    # ---- precision --------------------------------------------------------
    def bits_all(self) -> set[int]:
        return {self.high_bits, self.low_bits} | set(self.floors.values())

    def min_bits(self) -> int:
        return min(self.bits_all())

    def required_bits(self, layer: int, imp_sorted_rank: int, cum_before: float) -> int:
        """Precision an expert needs for this token. `cum_before` is the gate
        mass of the more important experts chosen with it: the first experts
        up to `high_share` of the mass run high, the tail may run low."""
        bits = self.high_bits if (imp_sorted_rank == 0 or cum_before < self.high_share) else self.low_bits
        return max(bits, self.floors.get(layer, 0)) if bits != FP else FP

    def acceptable(self, resident_bits: int, need_bits: int) -> bool:
        """A resident copy at higher precision than needed is always fine."""
        return resident_bits >= need_bits


def expert_requirements(policy: PolicyConfig, layer: int, sel, imp) -> dict[int, int]:
    """sel, imp: (T, A). For each expert used by any token, the highest
    precision any token needs from it."""
    need: dict[int, int] = {}
    order = imp.argsort(dim=-1, descending=True)
    for t in range(sel.shape[0]):
        cum = 0.0
        for r, a in enumerate(order[t].tolist()):
            e = int(sel[t, a])
            bits = policy.required_bits(layer, r, cum)
            need[e] = max(need.get(e, 0), bits)
            cum += float(imp[t, a])
    return need
