"""The offloaded expert runtime: store + cache + policy + prefetcher.

`OffloadedExperts` is the `Experts` the model calls per MoE layer. For each
expert the layer needs it decides the precision (policy), uses a resident
copy if good enough (hit), otherwise issues a demand read and waits (stall).
Resident experts are computed while the missing ones are still loading.

Working copies are kept dequantised (float16 in the drafter, float32 for
reference checks) for CPU matmuls (a stand-in for a fused low-bit kernel);
the budget, the bytes read and the modelled I/O time all use the packed
low-bit size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from edge.moe.bits import FP
from edge.moe.cache import CacheConfig, ExpertCache
from edge.moe.gguf_loader import GGUFModel
from edge.moe.model import Experts, add_in_order, expert_part, token_gates
from edge.moe.policy import PolicyConfig, expert_requirements
from edge.moe.prefetch import DEMAND, PREFETCH, IOQueue
from edge.moe.store import ExpertStore, ExpertWeights


class BudgetTooSmall(ValueError):
    pass


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0
    pred_tp: int = 0
    n_pred: int = 0
    n_actual: int = 0
    bits_used: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        uses = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses,
                "hit_rate": self.hits / uses if uses else None,
                "bytes_read": self.bytes_read, "stall_s": round(self.stall_s, 6),
                "prefetch_precision": self.pred_tp / self.n_pred if self.n_pred else None,
                "prefetch_recall": self.pred_tp / self.n_actual if self.n_pred else None,
                "precision_mix": {("fp" if b == FP else f"int{b}"): n
                                  for b, n in sorted(self.bits_used.items())}}


def norm_prior(gm: GGUFModel) -> dict[tuple[int, int], float]:
    """Calibration-free residency prior (AIMER-style): experts whose weights
    carry more energy change the output more. Scaled to [0, 1] per layer."""
    from edge.moe.gguf_loader import expert_to_f32
    prior = {}
    for layer in gm.cfg.moe_layers:
        scores = []
        for e in range(gm.cfg.n_expert):
            up, down = (torch.from_numpy(expert_to_f32(*gm.expert_raw(layer, k, e)).copy())
                        for k in ("up", "down"))
            scores.append(float(up.norm() * down.norm()))
        top = max(scores) or 1.0
        for e, s in enumerate(scores):
            prior[layer, e] = s / top
    return prior


class OffloadedExperts(Experts):
    def __init__(self, gm: GGUFModel, store: ExpertStore, policy: PolicyConfig,
                 budget_bytes: int | None, log=None):
        self.gm, self.store, self.policy = gm, store, policy
        c = gm.cfg
        total = store.total_fp_nbytes()
        if policy.all_resident or budget_bytes is None:
            budget_bytes = max(budget_bytes or 0, total)
        need = max(c.expert_used[l] * store.nbytes(l, policy.low_for(l)) for l in c.moe_layers)
        if budget_bytes < need:
            raise BudgetTooSmall(
                f"expert budget {budget_bytes / 1e6:.2f} MB is below what one token needs: "
                f"{need / 1e6:.2f} MB ({max(c.expert_used)} experts of one layer at "
                f"{'full precision' if policy.min_bits() == FP else f'int{policy.min_bits()}'} "
                f"under policy {policy.name}); raise --expert-budget-mb/--expert-budget-pct")
        self.budget_bytes = budget_bytes
        policy = self.policy = policy.afforded(
            c.moe_layers, lambda fl: sum(store.nbytes(l, b) for l, b in fl.items()) * c.n_expert <= budget_bytes)
        if policy.high_above_floor:
            # Important experts above the floor only while every expert fits
            # at that precision: below that, each upgrade is a full-size read
            # that evicts two floor copies (measured at 25 %: hit rate 0.43
            # -> 0.32, bytes/token 29 -> 41 MB, no gain in agreement).
            high_all = sum(store.nbytes(l, policy.high_for(l)) for l in c.moe_layers) * c.n_expert
            if budget_bytes < high_all:
                policy = self.policy = replace(policy, high_above_floor=False)
        store.prepare(policy.bits_all(), log=log)
        prior = norm_prior(gm) if policy.prior else {}
        if policy.batch_reads and prior:
            store.set_order({l: sorted(range(c.n_expert), key=lambda e: -prior[l, e])
                             for l in c.moe_layers})
        self.cache = ExpertCache(CacheConfig(budget_bytes, use_prior=policy.evict_next_use, cycle=c.n_layer,
                                             base_rate={l: c.expert_used[l] / c.n_expert
                                                        for l in c.moe_layers}), prior)
        self.stats = {l: LayerStats() for l in c.moe_layers}
        self.step = 0
        self.stall_s = 0.0        # seconds compute waited on demand reads, all layers (the drafter's clock)
        self.io_busy_s = 0.0          # modelled flash time spent reading
        self._predicted: dict[int, set[int]] = {}
        self.io = IOQueue(store, self._on_read, batch=policy.batch_reads)
        self._warm_start(prior)
        # Every expert resident at the highest precision any token asks of it
        # (a budget that holds them all): nothing is ever read, so routing
        # layers ahead to prefetch would be pure overhead on a prompt.
        self._complete = self._holds_everything()
        # A policy that plans its precisions against the budget (DyMoE's `afford`) knows then that
        # nothing will ever be read or evicted: it computes from its resident copies directly, as
        # resident-fp does, without the per-expert cache bookkeeping (lookups under the cache's
        # lock, recency, pinning) that an LRU cache keeps up because it cannot know that.
        self._resident = ({k: e.w for k, e in self.cache.entries.items()}
                          if self._complete and policy.afford else None)

    # ---- setup ------------------------------------------------------------
    def _warm_start(self, prior) -> None:
        """Fill the budget before the first token, as a device would after
        loading the model: baselines in file order, DyMoE by its prior, first
        everything at low precision, then upgrades of the most likely ones."""
        c, p = self.gm.cfg, self.policy
        keys = [(l, e) for l in c.moe_layers for e in range(c.n_expert)]
        if p.prior:
            keys.sort(key=lambda k: -prior.get(k, 0.0))
        for pick in (p.low_for, p.high_for):
            for l, e in keys:
                b = pick(l)
                cur = self.cache.get((l, e))
                extra = self.store.nbytes(l, b) - (cur.w.nbytes if cur else 0)
                if (cur is None or cur.w.bits < b) and self.cache.fits_without_eviction(extra):
                    self.cache.admit((l, e), self.store.resident_copy(l, e, b))

    def _holds_everything(self) -> bool:
        """Every expert resident at the highest precision a token can ask of it."""
        c, p = self.gm.cfg, self.policy
        for l in c.moe_layers:
            for e in range(c.n_expert):
                cur = self.cache.get((l, e))
                if cur is None or not p.acceptable(cur.w.bits, max(p.high_for(l), p.low_for(l))):
                    return False
        return True

    def _on_read(self, key, w: ExpertWeights, prefetched: bool, busy: float) -> None:
        self.io_busy_s += busy
        self.stats[key[0]].bytes_read += w.nbytes
        cur = self.cache.get(key)
        if cur is None or cur.w.bits <= w.bits:
            self.cache.admit(key, w, prefetched=prefetched)

    # ---- Experts interface ------------------------------------------------
    def wants_hints(self) -> bool:
        return self.policy.prefetch and not self._complete

    def hint_depth(self, tokens: int) -> int:
        """A prompt needs nearly every expert of every layer, so guessing two
        layers ahead costs little and keeps the flash queue from running dry
        behind layers that were mostly resident; a decode token looks one
        layer ahead, where the guess is good, if the policy prefetches for
        single tokens at all."""
        if not self.wants_hints():
            return 0
        if tokens > 1:
            return self.policy.prefill_lookahead
        return 1 if self.policy.prefetch_decode else 0

    def hint(self, layer: int, sel: torch.Tensor, imp: torch.Tensor) -> None:
        need = expert_requirements(self.policy, layer, sel, imp)
        self._predicted[layer] = set(need)
        fetch = []
        for e, bits in need.items():
            cur = self.cache.get((layer, e))
            if cur is None or not self.policy.acceptable(cur.w.bits, bits):
                fetch.append((e, bits))
        self.io.submit_many(layer, fetch, PREFETCH, self.step)

    def ffn(self, layer, x, sel, w, imp):
        if self._resident is not None:
            return self._resident_ffn(layer, x, sel, w)
        st = self.stats[layer]
        self.io.horizon = (self.step, layer)
        self.cache.start_layer(layer, x.shape[0])
        need = expert_requirements(self.policy, layer, sel, imp)
        pred = self._predicted.pop(layer, None)
        if pred is not None:
            st.pred_tp += len(pred & set(need))
            st.n_pred += len(pred)
            st.n_actual += len(need)
        self.cache.pinned = {(layer, e) for e in need}
        ready, missing = {}, []
        for e, bits in need.items():
            cur = self.cache.get((layer, e))
            if cur is not None and self.policy.acceptable(cur.w.bits, bits):
                ready[e] = cur.w
                st.hits += 1
            else:
                st.misses += 1
                missing.append((e, bits))
            self.cache.touch((layer, e))
        futs = self.io.submit_many(layer, missing, DEMAND, self.step)
        waiting = {e: (bits, f) for (e, bits), f in zip(missing, futs)}
        # Resident experts are computed while the missing ones still load;
        # the parts are summed in the reference's order at the end.
        gw = token_gates(sel, w)
        parts = {e: self._part(layer, e, ew, x, sel, w, gw) for e, ew in ready.items()}
        for e, (bits, fut) in waiting.items():
            t0 = time.perf_counter()
            ew = fut.result()
            while ew is None or ew.bits < bits:      # a dropped or too-coarse prefetch
                ew = self.io.submit(layer, e, bits, DEMAND, self.step).result()
            waited = time.perf_counter() - t0
            st.stall_s += waited
            self.stall_s += waited
            parts[e] = self._part(layer, e, ew, x, sel, w, gw)
        out = torch.zeros_like(x)
        add_in_order(out, sel, parts)
        self.cache.pinned = set()
        if layer == self.gm.cfg.moe_layers[-1]:
            self.step += 1
        return out

    def _resident_ffn(self, layer, x, sel, w):
        gw = token_gates(sel, w)
        experts = sel[0].tolist() if gw is not None else sel.unique().tolist()
        self.stats[layer].hits += len(experts)
        res = self._resident
        parts = {e: self._part(layer, e, res[(layer, e)], x, sel, w, gw) for e in experts}
        out = torch.zeros_like(x)
        add_in_order(out, sel, parts)
        if layer == self.gm.cfg.moe_layers[-1]:
            self.step += 1
        return out

    def _part(self, layer, e, ew: ExpertWeights, x, sel, w, gw):
        bu = self.stats[layer].bits_used
        bu[ew.bits] = bu.get(ew.bits, 0) + 1
        return expert_part(x, sel, w, e, ew.gate_up, ew.down, gw)

    # ---- reporting --------------------------------------------------------
    def summary(self) -> dict:
        tot = LayerStats()
        for s in self.stats.values():
            tot.hits += s.hits; tot.misses += s.misses; tot.bytes_read += s.bytes_read
            tot.stall_s += s.stall_s; tot.pred_tp += s.pred_tp; tot.n_pred += s.n_pred
            tot.n_actual += s.n_actual
            for b, n in s.bits_used.items():
                tot.bits_used[b] = tot.bits_used.get(b, 0) + n
        return {"policy": self.policy.name, "budget_bytes": self.budget_bytes,
                "resident_bytes": self.cache.used_bytes,
                "resident_mix": {("fp" if b == FP else f"int{b}"): n
                                 for b, n in sorted(self.cache.precision_mix().items())},
                "steps": self.step, "prefetch_dropped": self.io.dropped,
                "read_requests": self.io.requests, "io_busy_s": round(self.io_busy_s, 4),
                "evictions": self.cache.counters.evictions,
                "total": tot.as_dict(),
                "layers": {l: s.as_dict() for l, s in self.stats.items()}}

    def close(self) -> None:
        self.io.close()
