"""Per-layer precision floors from measured sensitivity.

For each MoE layer alone, run all its experts at a probe precision
(everything else at full precision) and measure KL(full || degraded) of the
next-token distribution on held-out text, for every probe (int8, int4,
int2). A layer's floor is the lowest precision whose KL stays within the
tolerance; a layer where even int8 exceeds it keeps full precision (16),
unless `max_floor` caps it (8: every layer may be held at int8 or lower).

The tolerance is `max(kl_tol, noise_factor x median KL of the int8 probe)`.
A small, poorly-fitted MoE can be chaotic: on the SmolLM2 test bed a 1e-4
relative perturbation of one layer's weights already moves the output by
~0.01 nats (routing near-ties flip and cascade). Measured there (400
tokens): layers 1-11 cost 0.01-0.06 at int8 and 0.06-0.25 at int4, layers
12-29 under 0.004 at int8 and 0.001-0.03 at int4: early layers need more.
The int8 median estimates the model's noise floor; a layer may go lower
only where the damage is within a few times it (or within `kl_tol`).

Probes read matrices the way DyMoE's store does (`native`): a matrix that
is exact at a lower precision is probed at that one, so the int8 probe of
a carved layer measures its refit down-projection, not gate/up at a grid
finer than their own.

Per-layer tolerances do not bound the sum: on the test bed eight layers
each "within tolerance" at int4 added up to a prompt agreement of ~0.8.
With `kl_budget` (the default) floors are instead chosen together: start
every layer at full precision and repeatedly lower the layer that saves the
most bytes per unit of KL it adds, while the summed KL stays within the
budget. The sum over-counts (degradations interact), so this is cautious.

The probe degrades *every* expert of the layer for every token, so it is
conservative for DyMoE, which runs low only the experts the router gives
little weight. Cost: the residual stream entering each layer is captured
once, so a probe only re-runs the layers from the probed one on.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from edge.moe.bits import FP
from edge.moe.gguf_loader import GGUFModel
from edge.moe.model import MoETransformer, ResidentExperts
from edge.moe.store import KINDS, ExpertStore, StorageProfile, StoreConfig, flash_copy, working_copy


@dataclass
class SensitivityConfig:
    probe_bits: tuple[int, ...] = (8, 4, 2)
    kl_tol: float = 0.01         # per layer, nats/token, degrading that layer alone
    noise_factor: float = 3.0
    max_floor: int = FP
    kl_budget: float = 0.03      # summed over layers; 0: per-layer tolerance instead
    max_tokens: int = 800
    group: int = 32


# Measured KLs are snapped to a log grid before any floor is chosen, so
# noise in the last digits (another BLAS code path, a routing near-tie
# resolved the other way) does not move a floor: 20 steps a decade is a
# ~12 % step; anything below 1e-4 nats counts as 1e-4 (still not free).
KL_STEPS_PER_DECADE = 20
KL_MIN = 1e-4


def quantise_kl(kl: float) -> float:
    k = max(kl, KL_MIN)
    return float(f"{10 ** (round(math.log10(k) * KL_STEPS_PER_DECADE) / KL_STEPS_PER_DECADE):.4g}")


@contextmanager
def reproducible_torch():
    """One thread and deterministic kernels while measuring: a reduction's
    order then depends on neither the thread count nor the load."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def _one_layer_degraded(base: ResidentExperts, layer: int, bits: int, group: int,
                        native: dict[tuple[int, str], int] | None = None) -> ResidentExperts:
    """`base` with every expert of `layer` quantised to `bits` (each matrix at
    most at its own lossless precision), the other layers shared."""
    native = native or {}
    out = base.copy()
    ws = []
    for e in range(base.gate_up[layer].shape[0]):
        ws.append([t if b == FP else working_copy(flash_copy(t, b, group))
                   for t, b in ((t, min(bits, native.get((layer, k), FP)))
                                for t, k in zip(base.expert(layer, e), KINDS))])
    out.set_layer(layer, ws)
    return out


def tolerance(kl: dict[int, dict[int, float]], kl_tol: float, noise_factor: float) -> float:
    top = kl[max(kl)].values()
    return max(kl_tol, noise_factor * sorted(top)[len(top) // 2])


def floors_from_kl(kl: dict[int, dict[int, float]], tol: float, max_floor: int = FP) -> dict[int, int]:
    """kl[bits][layer] -> layer -> lowest bits with KL <= tol, else full
    precision, capped at `max_floor`."""
    layers = sorted(next(iter(kl.values())))
    return {l: min(min([b for b in kl if kl[b][l] <= tol], default=FP), max_floor)
            for l in layers}


def measure(path: Path | GGUFModel, texts: list[list[int]], cfg: SensitivityConfig = SensitivityConfig(),
            log=print) -> dict:
    with reproducible_torch():
        return _measure(path, texts, cfg, log)


def _measure(path: Path | GGUFModel, texts: list[list[int]], cfg: SensitivityConfig, log) -> dict:
    t0 = time.time()
    gm = path if isinstance(path, GGUFModel) else GGUFModel(path)
    base = ResidentExperts(gm)
    native = ExpertStore(gm, StoreConfig(StorageProfile.from_name("none"), group=cfg.group,
                                         native=True)).native()
    tokens, n = [], 0
    for s in texts:
        if n >= cfg.max_tokens:
            break
        tokens.append(s[:cfg.max_tokens - n])
        n += len(tokens[-1])
    refs, entering = [], []
    proto = MoETransformer(gm, base, max_ctx=max(map(len, tokens)) + 1)
    for s in tokens:
        cap: list = []
        m = proto.sibling(base)
        refs.append(m.forward_from(0, m.embed(torch.tensor(s)), cap).log_softmax(-1))
        entering.append(cap)
    ref = torch.cat(refs)
    kl: dict[int, dict[int, float]] = {b: {} for b in cfg.probe_bits}
    kl_raw: dict[int, dict[int, float]] = {}
    for layer in gm.cfg.moe_layers:
        for bits in cfg.probe_bits:
            ex = _one_layer_degraded(base, layer, bits, cfg.group, native)
            lp = torch.cat([proto.sibling(ex).forward_from(layer, entering[j][layer]).log_softmax(-1)
                            for j in range(len(tokens))])
            raw = (ref.exp() * (ref - lp)).sum(-1).mean().item()
            kl_raw.setdefault(bits, {})[layer] = raw
            kl[bits][layer] = quantise_kl(raw)
        log(f"[moe-calibrate] layer {layer:2d}: KL " +
            ", ".join(f"int{b} {kl[b][layer]:.4f}" for b in cfg.probe_bits) +
            f" ({time.time() - t0:.0f}s)")
    tol, floors = _floors(kl, cfg, native_nbytes(gm, cfg.group))
    return {"kl_budget": cfg.kl_budget, "probe_bits": list(cfg.probe_bits), "kl_tol": cfg.kl_tol, "max_floor": cfg.max_floor,
            "noise_factor": cfg.noise_factor, "tolerance": tol, "group": cfg.group,
            "native": True, "kl": kl, "kl_raw": kl_raw, "kl_grid_steps_per_decade": KL_STEPS_PER_DECADE,
            "floors": floors, "tokens": n, "seconds": round(time.time() - t0, 1)}


def floors_from_budget(kl: dict[int, dict[int, float]], nbytes, budget: float,
                       max_floor: int = FP) -> dict[int, int]:
    """kl[bits][layer], nbytes(layer, bits) -> floors: the cheapest set of
    per-layer precisions (greedy in bytes saved per KL added) whose summed KL
    stays within `budget`. A step that saves no bytes is never taken."""
    layers = sorted(next(iter(kl.values())))
    ladder = sorted(kl, reverse=True)                   # 8, 4, 2
    cur = {l: FP for l in layers}
    cost = lambda l, b: 0.0 if b == FP else kl[b][l]
    total = 0.0
    while True:
        best = None
        for l in layers:
            for b in (b for b in ladder if b < cur[l]):
                saved = nbytes(l, cur[l]) - nbytes(l, b)
                added = max(cost(l, b) - cost(l, cur[l]), 1e-9)
                if saved > 0 and total + added <= budget and (best is None or saved / added > best[0]):
                    best = (saved / added, l, b, added)
        if best is None:
            break
        _, l, b, added = best
        cur[l], total = b, total + added
    return {l: min(b, max_floor) for l, b in cur.items()}


def _floors(kl, cfg: SensitivityConfig, nbytes) -> tuple[float, dict[int, int]]:
    if cfg.kl_budget > 0:
        return cfg.kl_budget, floors_from_budget(kl, nbytes, cfg.kl_budget, cfg.max_floor)
    tol = tolerance(kl, cfg.kl_tol, cfg.noise_factor)
    return tol, floors_from_kl(kl, tol, cfg.max_floor)


def native_nbytes(model: Path | GGUFModel, group: int = 32):
    """nbytes(layer, bits) of DyMoE's flash format (opening a GGUF parses its
    49k-token vocabulary: pass an opened one where there is one)."""
    gm = model if isinstance(model, GGUFModel) else GGUFModel(model)
    store = ExpertStore(gm, StoreConfig(StorageProfile.from_name("none"), group=group, native=True))
    return store.nbytes


def save(result: dict, path: Path) -> None:
    per_bits = lambda d: {f"int{b}": {str(l): v for l, v in per.items()} for b, per in d.items()}
    path.write_text(json.dumps(
        {**result, "kl": per_bits(result["kl"]),
         **({"kl_raw": per_bits(result["kl_raw"])} if "kl_raw" in result else {}),
         "floors": {str(k): v for k, v in result["floors"].items()}}, indent=1))


def refloor(saved: dict, cfg: SensitivityConfig, path: Path) -> dict:
    """New floors from a saved measurement under another tolerance, budget or cap."""
    parse = lambda d: {int(b.removeprefix("int")): {int(l): v for l, v in per.items()}
                       for b, per in d.items()}
    kl = parse(saved["kl"])
    if "kl_raw" in saved:
        saved = {**saved, "kl_raw": parse(saved["kl_raw"])}
    tol, floors = _floors(kl, cfg, native_nbytes(path, saved.get("group", cfg.group)))
    return {**saved, "kl": kl, "kl_tol": cfg.kl_tol, "noise_factor": cfg.noise_factor,
            "kl_budget": cfg.kl_budget, "max_floor": cfg.max_floor, "tolerance": tol,
            "floors": floors}
