"""`edge-agent moeify`, `edge-agent moe-calibrate` and the `--drafter moe` flags."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge.model_files import models_dir, shipped_gguf

DEFAULT_NAME = "smollm2-moe.gguf"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_model() -> Path:
    return models_dir() / DEFAULT_NAME


def calib_cache() -> Path:
    from edge.moe.calib_text import VERSION
    # Versioned name: a checkout with other calibration text keeps its own cache.
    return models_dir() / f"moe-calib-v{VERSION}.json"


# ---- moeify -----------------------------------------------------------------
def add_moeify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, help=f"output GGUF (default models/{DEFAULT_NAME})")
    p.add_argument("--experts", type=int, default=8, help="experts per layer (default 8)")
    p.add_argument("--top-k", type=int, default=6, help="experts per token (default 6)")
    p.add_argument("--source", type=Path, default=None, help="dense llama GGUF (default: shipped SmolLM2)")
    p.add_argument("--carve-layer0", action="store_true", help="carve layer 0 too (default: keep it dense)")
    p.add_argument("--f32", action="store_true", help="write F32 instead of F16 weights")
    p.add_argument("--force", action="store_true", help="rebuild even if the output exists")


# One torch thread for moeify and calibration: with 2, OpenMP workers wait on
# a preempted peer whenever the box is shared (the verifier, tests, anyone);
# measured on the dense pass of 790 tokens under load: 1 thread 2.9 s,
# 2 threads 42 s.
THREADS = 1


def run_moeify(args) -> int:
    from edge.moe.calib_text import load_or_generate
    from edge.moe.moeify import Dense, MoeifyConfig, dense_logits, moeify
    from edge.moe.quality import dense_quality, evaluate
    import torch
    torch.set_num_threads(THREADS)
    out = args.out or default_model()
    source = args.source or shipped_gguf()
    if out.exists() and not args.force:
        _log(f"[moeify] {out} exists; use --force to rebuild")
        return 0
    _log("[moeify] step 1/4: calibration text from the target (cached after the first run)")
    text = load_or_generate(source, calib_cache(), log=_log)
    cfg = MoeifyConfig(n_expert=args.experts, top_k=args.top_k,
                       dense_layers=() if args.carve_layer0 else (0,),
                       dtype="f32" if args.f32 else "f16")
    _log("[moeify] step 2/4: carve, route and refit layer by layer")
    try:
        res = moeify(Path(source), out, text["calib"], cfg, log=_log)
    except ValueError as exc:
        _log(f"[moeify] error: {exc}")
        return 2
    _log("[moeify] step 3/4: quality on held-out text (not the calibration text)")
    from edge.moe.gguf_loader import GGUFModel
    from edge.moe.model import MoETransformer, ResidentExperts
    gm = GGUFModel(out)
    experts = ResidentExperts(gm)
    src = Dense(Path(source))
    dl = lambda tokens: dense_logits(src, tokens)
    q = evaluate(lambda: MoETransformer(gm, experts, max_ctx=1024), dl,
                 text["heldout"], text["heldout_prompt_len"])
    q["dense"] = dense_quality(dl, text["heldout"], text["heldout_prompt_len"])
    q.update(build_seconds=round(res["seconds"], 1), experts=cfg.n_expert, top_k=cfg.top_k)
    out.with_name(out.name.removesuffix(".gguf") + ".quality.json").write_text(json.dumps(q, indent=1))
    _log(f"[moeify] MoE {cfg.n_expert}x top-{cfg.top_k}: top-1 vs dense {q['top1_vs_dense']:.3f}, "
         f"greedy acceptance {q['acceptance']:.3f}, ppl {q['ppl']:.1f} "
         f"(dense: acceptance {q['dense']['acceptance']:.3f}, ppl {q['dense']['ppl']:.1f}); "
         f"{q['positions']} positions")
    _log("[moeify] step 4/4: done. This model is a test bed for the MoE runtime, "
         "not a good language model.")
    return 0


# ---- precision floors -------------------------------------------------------
def add_calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--moe-model", type=Path, default=None, help="MoE GGUF (default models/smollm2-moe.gguf)")
    p.add_argument("--tokens", type=int, default=800,
                   help="tokens of the fixed calibration text (edge/moe/fixed_text.py) to measure "
                        "KL on (default %(default)s: all of it)")
    p.add_argument("--kl-tol", type=float, default=0.01,
                   help="per-layer KL (nats/token) a layer may add at its floor precision")
    p.add_argument("--noise-factor", type=float, default=3.0,
                   help="... or this many times the median int8 KL, if larger (model noise floor)")
    p.add_argument("--max-floor", type=int, default=16, choices=[2, 4, 8, 16],
                   help="cap on any layer's floor (default 16: a layer too sensitive for int8 "
                        "stays at full precision; 8 forces every layer to int8 or lower)")
    p.add_argument("--kl-budget", type=float, default=0.03,
                   help="summed KL (nats/token) all floors together may add; floors are the "
                        "cheapest in bytes within it (default 0.03; 0: per-layer --kl-tol instead)")
    p.add_argument("--from-kl", action="store_true",
                   help="recompute floors from the KL already stored beside the model (no measuring)")


def run_calibrate(args) -> int:
    import os
    # Pin the numeric code paths before torch starts (the same floors on any
    # x86 machine): MKL's conditional reproducibility at AVX2, torch's own
    # vectorised kernels at AVX2. One thread and deterministic algorithms
    # are set by the measurement itself.
    os.environ.setdefault("MKL_CBWR", "AVX2")
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    import hashlib
    import torch
    torch.set_num_threads(THREADS)
    from edge.moe.drafter import floors_path
    from edge.moe.fixed_text import fixed_sequences
    from edge.moe.sensitivity import SensitivityConfig, measure, refloor, save
    model = args.moe_model or default_model()
    if not model.exists():
        _log(f"[moe-calibrate] {model} not found; run `edge-agent moeify` first")
        return 2
    if args.tokens <= 0:
        _log(f"[moe-calibrate] --tokens must be positive, got {args.tokens}")
        return 2
    cfg = SensitivityConfig(max_tokens=args.tokens, kl_tol=args.kl_tol,
                            noise_factor=args.noise_factor, max_floor=args.max_floor,
                            kl_budget=args.kl_budget)
    if args.from_kl:
        if not floors_path(model).exists():
            _log(f"[moe-calibrate] {floors_path(model)} not found: measure first (without --from-kl)")
            return 2
        res = refloor(json.loads(floors_path(model).read_text()), cfg, model)
    else:
        from edge.moe.gguf_loader import GGUFModel
        try:
            texts = fixed_sequences(GGUFModel(model).cfg.n_vocab)
        except ValueError as exc:
            _log(f"[moe-calibrate] error: {exc}")
            return 2
        res = measure(model, texts, cfg, log=_log)
        with open(model, "rb") as f:
            res["model_sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    save(res, floors_path(model))
    _log(f"[moe-calibrate] {'KL budget' if cfg.kl_budget > 0 else 'tolerance'} "
         f"{res['tolerance']:.4f} nats/token; "
         f"floors -> {floors_path(model)}: {res['floors']}")
    # The low-bit flash images every policy reads, built once here.
    from edge.moe.gguf_loader import GGUFModel
    from edge.moe.store import ExpertStore, StorageProfile, StoreConfig
    ExpertStore(GGUFModel(model), StoreConfig(StorageProfile.from_name("none"))).prepare(
        [8, 4, 2], log=_log)
    return 0


# ---- drafter ----------------------------------------------------------------
def add_drafter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MoE drafter (--drafter moe)")
    g.add_argument("--moe-model", type=Path, default=None, help="MoE GGUF (default models/smollm2-moe.gguf)")
    b = g.add_mutually_exclusive_group()
    b.add_argument("--expert-budget-mb", type=float, default=None, help="resident expert memory in MB")
    b.add_argument("--expert-budget-pct", type=float, default=None,
                   help="resident expert memory as %% of the full-precision expert bytes")
    g.add_argument("--storage", default="none", choices=["ufs", "emmc", "sd-card", "none"],
                   help="modelled flash the experts are read from (default none)")
    from edge.moe.policy import POLICIES
    g.add_argument("--moe-policy", default="dymoe", choices=POLICIES, metavar="POLICY",
                   help="expert policy (default %(default)s): " + ", ".join(POLICIES) +
                        "; lru-native is llama.cpp's mmap of the quantised file, dymoe-no-X / "
                        "dymoe-with-X switch one DyMoE mechanism off / on")


def build_drafter(args):
    from edge.moe.drafter import MoEDrafter, MoEDrafterConfig
    model = getattr(args, "moe_model", None) or default_model()
    if not Path(model).exists():
        raise FileNotFoundError(f"MoE model {model} not found; build it with `edge-agent moeify`")
    return MoEDrafter(MoEDrafterConfig(model=Path(model), policy=args.moe_policy,
                                       budget_mb=args.expert_budget_mb,
                                       budget_pct=args.expert_budget_pct, storage=args.storage))
