"""Per-layer precision floors from measured sensitivity.

For each MoE layer alone, run its experts at int2 (everything else at full
precision) and measure KL(full || degraded) of the next-token distribution
on held-out text. Layers far above the typical KL get a floor: they must
not run int2 (or int4) whatever the token's gate weights say.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edge.moe.gguf_loader import GGUFModel
from edge.moe.model import MoETransformer, ResidentExperts
from kernels import quant


@dataclass
class SensitivityConfig:
    probe_bits: int = 2
    int4_factor: float = 1.5     # KL above factor x median -> floor int4
    int8_factor: float = 6.0     # ... -> floor int8
    max_tokens: int = 600


class _OneLayerDegraded(ResidentExperts):
    def __init__(self, base: ResidentExperts, layer: int, bits: int):
        self.w = dict(base.w)
        for (l, e), ws in base.w.items():
            if l == layer:
                self.w[l, e] = tuple(quant.dequantize(quant.quantize(t, bits)) for t in ws)


def measure(path: Path, seqs: list[list[int]], cfg: SensitivityConfig = SensitivityConfig(),
            log=print) -> dict:
    t0 = time.time()
    gm = GGUFModel(path)
    base = ResidentExperts(gm)
    tokens, n = [], 0
    for s in seqs:
        if n >= cfg.max_tokens:
            break
        tokens.append(s)
        n += len(s)

    def logprobs(experts):
        out = []
        for s in tokens:
            m = MoETransformer(gm, experts, max_ctx=len(s) + 1)
            out.append(m.forward(torch.tensor(s)).log_softmax(-1))
        return torch.cat(out)

    ref = logprobs(base)
    kl = {}
    for layer in gm.cfg.moe_layers:
        lp = logprobs(_OneLayerDegraded(base, layer, cfg.probe_bits))
        kl[layer] = (ref.exp() * (ref - lp)).sum(-1).mean().item()
        log(f"[moe-calibrate] layer {layer:2d} at int{cfg.probe_bits}: KL {kl[layer]:.4f} "
            f"({time.time() - t0:.0f}s)")
    med = sorted(kl.values())[len(kl) // 2]
    floors = {l: (8 if v > cfg.int8_factor * med else 4 if v > cfg.int4_factor * med else 2)
              for l, v in kl.items()}
    return {"probe_bits": cfg.probe_bits, "kl": kl, "floors": floors, "tokens": n,
            "seconds": round(time.time() - t0, 1)}


def save(result: dict, path: Path) -> None:
    path.write_text(json.dumps({**result, "kl": {str(k): v for k, v in result["kl"].items()},
                                "floors": {str(k): v for k, v in result["floors"].items()}},
                               indent=1))
