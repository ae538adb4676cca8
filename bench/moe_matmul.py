"""`python -m bench.moe_matmul`: what one expert product costs at fp16, int8 and int4.

For the test bed's expert shapes (gate+up fused (2F, D), down (D, F), read
from the model), one token (decode) and a prompt's worth of rows, on this
CPU with one torch thread. Each timing cycles through every expert of the
model so the weights stream from memory as in a decode step, not from a
warm cache. Ways to compute a low-bit matrix:

- working copy: the record dequantised once into float16 (what DyMoE's
  runtime multiplies): the same product as an fp16 matrix;
- from the codes: unpack and dequantise at every product
  (`kernels.quant.matmul`), what holding only the packed record costs;
- torch's packed int kernels (`_weight_int8pack_mm`, per-row scales, and
  `_weight_int4pack_mm_for_cpu`, groups of 32): bfloat16 activations only
  are fast on this CPU, and neither reproduces the record's float16 values
  (their error against the exact reference is reported).

Errors are max |y - y_ref| / max |y_ref| against float32 dequantise-then-matmul
of the same record.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _time(fn, mats, rounds: int) -> float:
    """Median over `rounds` passes of the mean seconds per product, each pass
    one product per matrix in `mats` (cold-ish weights)."""
    for m in mats[:8]:
        fn(m)
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for m in mats:
            fn(m)
        per.append((time.perf_counter() - t0) / len(mats))
    return sorted(per)[len(per) // 2]


def measure(model: Path, rows=(1, 38), rounds: int = 5, n_experts: int | None = None) -> list[dict]:
    import torch
    from edge.moe.gguf_loader import GGUFModel
    from edge.moe.model import linear
    from edge.moe.store import ExpertStore, StorageProfile, StoreConfig, flash_copy, working_copy
    from kernels import quant
    torch.set_num_threads(1)
    gm = GGUFModel(model)
    c = gm.cfg
    store = ExpertStore(gm, StoreConfig(StorageProfile.from_name("none"), dtype=torch.float16))
    keys = [(l, e) for l in c.moe_layers for e in range(c.n_expert)][:n_experts]
    out = []
    for kind in ("gate_up", "down"):
        fp = [getattr(store.resident_copy(l, e, 16), kind).float() for l, e in keys]  # F16 values, float32
        n_out, n_in = fp[0].shape
        for bits in (16, 8, 4):
            recs = [flash_copy(w, bits, 32) for w in fp] if bits != 16 else None
            wc = ([working_copy(q).half() for q in recs] if recs else [w.half() for w in fp])
            ref_w = [working_copy(q) for q in recs] if recs else fp
            for t in rows:
                x = torch.randn(t, n_in, generator=torch.Generator().manual_seed(t)) * 0.1
                y_ref = [x @ w.T for w in ref_w[:16]]
                row = {"matrix": kind, "shape": [n_out, n_in], "bits": bits, "rows": t}

                def err(ys):
                    return max(float((y.float() - r).abs().max() / r.abs().max()) for y, r in zip(ys, y_ref))

                row["working_copy_us"] = _time(lambda w: linear(x, w), wc, rounds) * 1e6
                row["working_copy_err"] = err([linear(x, w) for w in wc[:16]])
                if recs:
                    row["from_codes_us"] = _time(lambda q: quant.matmul(x, q), recs, max(rounds // 2, 1)) * 1e6
                    row["from_codes_err"] = err([quant.matmul(x, q) for q in recs[:16]])
                    row.update(_torch_int(x, recs, ref_w, y_ref, bits, rounds))
                out.append(row)
                print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
    return out


def _torch_int(x, recs, ref_w, y_ref, bits: int, rounds: int) -> dict:
    """torch's packed int8/int4 kernels on the nearest thing to our record they
    take (bfloat16 activations: the fast path on this CPU)."""
    import torch
    from kernels import quant
    xb = x.to(torch.bfloat16)
    if bits == 8:
        # Per-row symmetric int8 of the exact weights: the kernel has no groups.
        packs = []
        for w in ref_w:
            s = (w.abs().amax(1) / 127).clamp_min(1e-12)
            packs.append(((w / s[:, None]).round().clamp(-127, 127).to(torch.int8), s.to(torch.bfloat16)))
        fn = lambda p: torch._weight_int8pack_mm(xb, p[0], p[1])
    else:
        # Our int4 groups as they are: w = (code - 8) * scale + (min + 8 scale).
        packs = []
        for q in recs:
            codes = quant.unpack(q).to(torch.int32)
            sz = torch.stack([q.scale.float().T, (q.minv.float() + 8 * q.scale.float()).T], -1)
            packs.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2),
                          sz.to(torch.bfloat16).contiguous()))
        fn = lambda p: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p[0], 32, p[1])
    ys = [fn(p) for p in packs[:16]]
    e = max(float((y.float() - r).abs().max() / r.abs().max()) for y, r in zip(ys, y_ref))
    return {"torch_int_bf16_us": _time(fn, packs, rounds) * 1e6, "torch_int_bf16_err": e}


def main(argv=None) -> int:
    from edge.moe.cli import default_model
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moe-model", type=Path, default=None)
    ap.add_argument("--rows", default="1,38", help="input rows to time (default: a token, a 38-token prompt)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--experts", type=int, default=None, help="experts to cycle through (default all)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    rows = measure(a.moe_model or default_model(), tuple(int(r) for r in a.rows.split(",")), a.rounds,
                   a.experts)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
