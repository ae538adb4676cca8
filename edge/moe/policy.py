"""Which experts to hold, at what precision, and what to fetch ahead.

One `PolicyConfig` per named policy; the decisions are small pure methods
so the runtime stays a plain loop.

- resident-fp: every expert in memory at full precision (quality reference).
- lru-fp: on-demand reads of the F16 file, LRU eviction.
- lru-native: on-demand reads of each matrix at the precision the file
  really holds (a Q4-derived matrix at int4), LRU, no prefetch, no
  importance: what a llama.cpp user gets by mmapping the quantised file.
- lru-prefetch-int4: LRU + next-layer gate prefetch, everything int4
  (Mixtral-offloading).
- static-int2 / static-int4: uniform precision, LRU.
- dymoe: the layer's floor sets each expert's precision; with importance
  (`dymoe-with-importance`, off by default) per-token importance picks it: the experts
  holding the first `high_share` of the router's mass run one level above
  the layer's floor (and at least int8; full precision where the floor is
  int8), the tail runs at the floor (int4, or int2 where measured
  sensitivity permits). Floors come from `moe-calibrate` (KL when one layer
  is degraded, chosen under a summed-KL budget; full precision allowed); without them, `default_floors` keeps the first and last
  MoE layers and any layer that uses every expert (dense / shared) at int8
  and lets the rest go to int4, never int2. A prompt (prefill) reads each
  missing expert once for all its tokens at the layer's low precision,
  since prompt positions are not sampled from. Residency by expected next
  use (running gate frequency; plus a weight-norm prior with
  `dymoe-with-prior`, off by default), look-ahead
  prefetch during prompts. Not for single tokens: there the flash is the
  bottleneck (~0.19 s of reads a token against ~0.04 s of compute to hide
  them behind), and a read of a wrong guess holds the queue when the
  layer's real misses arrive; measured on the test bed at 25 %, SD card:
  TPOT 0.255-0.262 s with decode prefetch (only guesses of at least the
  uniform importance share; all guesses was worse: 17 % more bytes),
  0.238-0.241 s without, agreement the same.
  A budget that holds every expert at higher floors is not a reason to
  quantise: floors are lifted, all layers together, as far as every expert
  still fits (`afforded`); at a budget that holds everything at full
  precision dymoe reads nothing and computes what resident-fp computes.
- dymoe-no-X / dymoe-with-X, X in {evict, prior, importance, prefetch,
  batch}: dymoe with one mechanism switched off / on (the benchmark's
  ablations): LRU instead of next-use eviction; no weight-norm prior (warm
  start and flash order by id); every expert at the layer's floor whatever
  its gate weight; demand reads only; one storage request per expert.
  `DEFAULT_ON` says which dymoe has.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from edge.moe.bits import FP

LADDER = (2, 4, 8, FP)
# DyMoE's mechanisms, each the PolicyConfig field that switches it. A
# mechanism is on in `dymoe` only where it beat dymoe without it by more than
# the runs' spread in `tandem-bench moe` (docs/dymoe.md); the others stay
# selectable: `dymoe-with-X` turns X on, `dymoe-no-X` off.
MECHANISMS = {"evict": "evict_next_use", "prior": "prior", "importance": "importance",
              "prefetch": "prefetch", "batch": "batch_reads"}
# Measured with `tandem-bench moe --quick` (25 %, SD card, medians of 3 runs
# with min-max; four runs, docs/dymoe.md), each mechanism against the
# default it would join: next-use eviction beat LRU on TPOT in all four;
# batched reads beat their ablation on TTFT in the last three (0.84 against
# 0.62 s in the last). Prompt prefetch beat an eviction-only dymoe on TTFT
# (0.88 against 1.01 s), sat inside the spread in the third run and beat
# its ablation on TPOT and TTFT in the fourth: on. The weight-norm prior
# never beat its ablation; importance cost TPOT beyond the spread with
# everything on, flipped in the later runs, and at 25 % upgrades one layer
# at most: both off.
DEFAULT_ON = ("evict", "prefetch", "batch")
# dymoe with one mechanism toggled against its default: what the benchmark compares.
TOGGLES = tuple(f"dymoe-no-{m}" if m in DEFAULT_ON else f"dymoe-with-{m}" for m in MECHANISMS)
POLICIES = (("resident-fp", "lru-fp", "lru-native", "lru-prefetch-int4", "static-int2", "static-int4",
             "dymoe") + tuple(f"dymoe-no-{m}" for m in MECHANISMS)
            + tuple(f"dymoe-with-{m}" for m in MECHANISMS))
_DYMOE = dict(high_bits=8, low_bits=2, high_share=0.5, prefill_low=True, high_above_floor=True,
              native=True, prefill_lookahead=2, prefetch_decode=False, afford=True,
              **{f: m in DEFAULT_ON for m, f in MECHANISMS.items()})


def toggled(name: str) -> tuple[str, bool] | None:
    """(mechanism, on) for `dymoe-no-X` / `dymoe-with-X`, else None."""
    for prefix, on in (("dymoe-no-", False), ("dymoe-with-", True)):
        if name.startswith(prefix) and name.removeprefix(prefix) in MECHANISMS:
            return name.removeprefix(prefix), on
    return None


@dataclass
class PolicyConfig:
    name: str
    high_bits: int = FP          # precision for important experts
    low_bits: int = FP           # precision allowed for unimportant ones
    high_share: float = 1.0      # experts covering this much gate mass run high
    prefetch: bool = False
    prior: bool = False          # weight-norm prior: warm start, flash order, first use rates
    evict_next_use: bool = False # evict by expected time to next use (else LRU)
    importance: bool = True      # precision by the token's gate weight (else all at the floor)
    all_resident: bool = False
    prefill_low: bool = False    # prompt tokens read experts at the layer's low precision
    high_above_floor: bool = False
    native: bool = False         # DyMoE's flash format: matrices at their lossless precision
    batch_reads: bool = False    # adjacent experts of one layer in one storage request
    prefill_lookahead: int = 1   # layers hinted ahead during a prompt
    prefetch_decode: bool = True # look ahead for single tokens too (else only in prompts)
    afford: bool = False         # lift floors as far as every expert still fits the budget
    floors: dict[int, int] = field(default_factory=dict)   # layer -> min bits

    @classmethod
    def from_name(cls, name: str, floors: dict[int, int] | None = None) -> "PolicyConfig":
        table = {
            "resident-fp": dict(all_resident=True),
            "lru-fp": dict(),
            "lru-native": dict(native=True),
            "lru-prefetch-int4": dict(high_bits=4, low_bits=4, prefetch=True),
            "static-int2": dict(high_bits=2, low_bits=2),
            "static-int4": dict(high_bits=4, low_bits=4),
            "dymoe": _DYMOE,
        }
        for m, f in MECHANISMS.items():
            table[f"dymoe-no-{m}"] = {**_DYMOE, f: False}
            table[f"dymoe-with-{m}"] = {**_DYMOE, f: True}
        if name not in table:
            raise ValueError(f"unknown MoE policy {name!r}; known: {', '.join(POLICIES)}")
        dymoe = name.startswith("dymoe")
        return cls(name=name, floors=dict(floors or {}) if dymoe else {}, **table[name])

    # ---- precision --------------------------------------------------------
    def low_for(self, layer: int) -> int:
        return FP if self.low_bits == FP else max(self.low_bits, self.floors.get(layer, 0))

    def high_for(self, layer: int) -> int:
        """High precision: at least `high_bits`, and with `high_above_floor`
        one level above the layer's floor (important experts of a layer
        whose floor is int8 run at full precision)."""
        if self.high_bits == FP:
            return FP
        floor = self.floors.get(layer, 0)
        if self.high_above_floor and floor:
            floor = LADDER[min(LADDER.index(floor) + 1, len(LADDER) - 1)] if floor in LADDER else FP
        return max(self.high_bits, floor)

    @property
    def uniform(self) -> bool:
        """Every expert is computed at one precision whatever the budget: the
        budget changes what is resident and read, never the logits."""
        return self.high_bits == self.low_bits and not self.floors and not self.afford

    def bits_all(self) -> set[int]:
        return {self.high_bits, self.low_bits} | set(self.floors.values())

    def min_bits(self) -> int:
        return min(self.bits_all())

    def required_bits(self, layer: int, imp_sorted_rank: int, cum_before: float) -> int:
        """Precision an expert needs for this token. `cum_before` is the gate
        mass of the more important experts chosen with it: the first experts
        up to `high_share` of the mass run high, the tail may run low."""
        if not self.importance:
            return self.low_for(layer)
        high = imp_sorted_rank == 0 or cum_before < self.high_share
        return self.high_for(layer) if high else self.low_for(layer)

    def afforded(self, layers: list[int], fits) -> "PolicyConfig":
        """This policy with every layer's floor lifted one ladder step at a
        time, all layers together, while every expert of every layer still
        fits the budget at the lifted floors (`fits(floors)`). Below that
        point experts are evicted and a lower floor buys reads; above it
        a low-bit copy saves nothing and costs agreement. At a budget that
        holds every expert at full precision this is full precision
        throughout. Unchanged without `afford`."""
        if not self.afford or self.low_bits == FP:
            return self
        floors = {l: self.low_for(l) for l in layers}
        lifted = False
        while not all(b == FP for b in floors.values()):
            up = {l: LADDER[min(LADDER.index(b) + 1, len(LADDER) - 1)] for l, b in floors.items()}
            if not fits(up):
                break
            floors, lifted = up, True
        if not lifted:
            return self
        if all(b == FP for b in floors.values()):
            return replace(self, floors=floors, low_bits=FP, high_bits=FP)
        return replace(self, floors=floors)

    def acceptable(self, resident_bits: int, need_bits: int) -> bool:
        """A resident copy at higher precision than needed is always fine."""
        return resident_bits >= need_bits


def default_floors(moe_layers: list[int], expert_used: list[int], n_expert: int) -> dict[int, int]:
    """Floors without a calibration: int8 for the first and last MoE layer
    and for layers that use every expert (a dense or shared FFN carved into
    experts), int4 elsewhere. Early and last layers are usually the most
    sensitive; int2 only ever comes from a measurement."""
    floors = {l: 4 for l in moe_layers}
    for l in moe_layers:
        if l in (moe_layers[0], moe_layers[-1]) or expert_used[l] >= n_expert:
            floors[l] = 8
    return floors


def expert_requirements(policy: PolicyConfig, layer: int, sel, imp) -> dict[int, int]:
    """sel, imp: (T, A). For each expert used by any token, the highest
    precision any token needs from it (one read per expert for a batch)."""
    if policy.prefill_low and sel.shape[0] > 1:
        low = policy.low_for(layer)
        return {int(e): low for e in sel.unique().tolist()}
    need: dict[int, int] = {}
    for es, ps in zip(sel.tolist(), imp.tolist()):
        cum = 0.0
        # Most important first; ties keep the router's order.
        for r, (p, e) in enumerate(sorted(zip(ps, es), key=lambda t: -t[0])):
            bits = policy.required_bits(layer, r, cum)
            need[e] = max(need.get(e, 0), bits)
            cum += p
    return need
