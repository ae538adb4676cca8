"""Greedy acceptance of the DyMoE drafter against the real target, end to end.

    python -m bench.moe_accept [--moe-model GGUF] [--budget-pct 25] [--dataset builtin]

A real `cloud-verifier` (the shipped SmolLM2 target, llama.cpp) on loopback; the MoE
drafter under the `dymoe` policy at a 25 % expert budget (SD card modelled); greedy
picospec with a fixed block plan (gamma 4, window 3, chains), adaptation and the cloud
lead off, so that every drafted position up to and including a rejection is verified
whatever the machine's speed. Acceptance is accepted / verified (edge/stats.py) over
every prompt of the dataset (default: the eight built-in chat questions,
chat-formatted as `edge-agent generate` sends them), 64 tokens each. The dense
drafter draft-l29 runs the same prompts for scale (`--no-dense` skips it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import datasets


def measure(address: str, drafter, tokenizer, prompts: list[list[int]], tokens: int) -> dict:
    """Verified and accepted draft positions summed over `prompts`."""
    from bench.harness import run_cell
    from edge.config import GenConfig
    cfg = GenConfig(mode="picospec", gamma=4, window=3, adaptive=False, cloud_lead=False,
                    tree="off", max_tokens=tokens, stop_at_eos=False)
    r = run_cell(address, drafter, tokenizer, prompts, cfg)
    return {"verified": r.verified, "accepted": r.accepted,
            "acceptance": round(r.accepted / r.verified, 4) if r.verified else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.moe_accept", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe-model", type=Path, default=None, help="MoE GGUF (default models/smollm2-moe.gguf)")
    ap.add_argument("--budget-pct", type=float, default=25.0)
    ap.add_argument("--storage", default="sd-card", help="storage model (acceptance does not depend on it)")
    ap.add_argument("--dataset", choices=datasets.DATASETS, default="builtin")
    ap.add_argument("--prompts", type=int, default=None, help="prompts (default: all of builtin, else 8)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per prompt (default: %(default)s)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense drafter's row")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = ap.parse_args(argv)

    from common.procs import start_cloud
    from edge.llama_model import Tokenizer
    from edge.model_files import models_dir, shipped_gguf
    from edge.moe.drafter import MoEDrafter, MoEDrafterConfig
    path = a.moe_model or models_dir() / "smollm2-moe.gguf"
    if not path.exists():
        print(f"{path} missing: `make models-moe` builds it", file=sys.stderr)
        return 1
    tok = Tokenizer(shipped_gguf())
    n = a.prompts if a.prompts is not None else (None if a.dataset == "builtin" else 8)
    prompts = [tok.encode(p.text, raw=p.raw) for p in datasets.load(a.dataset, n)]
    out = {"model": str(path), "dataset": a.dataset, "prompts": len(prompts), "tokens": a.tokens,
           "budget_pct": a.budget_pct, "policy": "dymoe", "gamma": 4, "window": 3, "cloud_lead": False}
    cloud = start_cloud("--threads", "1")   # edge and cloud share the cores: one thread each
    try:
        moe = MoEDrafter(MoEDrafterConfig(model=path, policy="dymoe", budget_pct=a.budget_pct,
                                          storage=a.storage))
        try:
            out["moe"] = measure(cloud.address, moe, tok, prompts, a.tokens)
        finally:
            moe.close()
        print(f"MoE drafter {path.name} (dymoe, {a.budget_pct:g} %): greedy acceptance "
              f"{out['moe']['acceptance']:.3f} ({out['moe']['accepted']}/{out['moe']['verified']} verified "
              f"positions, {len(prompts)} {a.dataset} prompts x {a.tokens} tokens)", flush=True)
        if not a.no_dense:
            from edge.derive import DEFAULT_DRAFT, ensure
            from edge.llama_model import LlamaDrafter
            out["dense"] = measure(cloud.address, LlamaDrafter(ensure(DEFAULT_DRAFT, quiet=True), n_threads=1),
                                   tok, prompts, a.tokens)
            print(f"dense drafter {DEFAULT_DRAFT}: greedy acceptance {out['dense']['acceptance']:.3f}", flush=True)
    finally:
        cloud.stop()
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
