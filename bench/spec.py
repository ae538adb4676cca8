"""`tandem-bench spec`: tokens/s and time to first token per link profile x mode x target.

Modes: cloud-only (the target streaming alone), edge-only (the drafter alone: a
different model, shown for scale), sync (stop-and-wait speculative decoding),
picospec-P and picospec-Q (pipelined, adaptive, with either residual codec).
Targets: the real SmolLM2-135M, and emulated 32B/70B targets on an A100 (real
tokens, modelled compute) with an emulated Jetson Orin edge. Each row says
whether its latency was emulated. Sampling: temperature 0.7, top-p 0.9.
Per link and target the modes take turns prompt by prompt, so a change in
the load of a shared machine is not charged to whichever mode ran during it.

acceptance_rate is per drafted position: accepted / tested (the verifier stops
testing a block at its first rejection, so accepted/drafted would shrink with
the block length). bytes_up_per_drafted_token counts every byte the edge sent
(Open with the prompt included) over the draft tokens it sent.

--quick: the PicoSpec WAN only, the real and the emulated 32B target, 8
prompts x 64 tokens per cell; the near-copy drafter only for picospec-P/Q on
the emulated target.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.harness import Cell, stack
from bench.report import RESULTS, markdown_table, pyplot, write_json
from edge.config import GenConfig
from kernels.sampling import SamplingConfig

PROFILES = ["lan", "picospec-wan", "lte", "3g"]
MODES = ["cloud-only", "edge-only", "sync", "picospec-P", "picospec-Q"]
TARGETS = ["smollm2-135m", "emulated:qwen3-32b-a100", "emulated:llama-70b-a100"]
DRAFTERS = ["draft-l29", "draft-q8"]       # default (realistic acceptance), best (near-copy)
DEVICE = "jetson-orin"
PROMPTS = [
    "Explain why the sky is blue.", "Write a short poem about rivers.", "How do vaccines work?",
    "Give three tips for learning a language.", "What is a black hole?", "Describe how bread is made.",
    "Why do cats purr?", "What is the Pythagorean theorem?",
]
SAMPLING = SamplingConfig(temperature=0.7, top_p=0.9, seed=7)
COLUMNS = ["profile", "mode", "target", "drafter", "tokens_per_s", "speedup", "ttft_s", "acceptance_rate",
           "bytes_up_per_token", "bytes_up_per_drafted_token", "bytes_down_per_token", "emulated"]


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true",
                    help="picospec-wan only, real and emulated 32B targets, 8 prompts x 64 tokens per cell; "
                         "the near-copy drafter only for picospec on the emulated target (< 5 min on 2 cores)")
    ap.add_argument("--json", type=Path, default=RESULTS / "spec.json", help="output JSON (default: %(default)s)")
    ap.add_argument("--profiles", nargs="+", default=PROFILES, help="link-sim profiles to run")
    ap.add_argument("--targets", nargs="+", default=TARGETS, choices=TARGETS)


QUICK_PROFILES = ["picospec-wan"]
QUICK_TARGETS = ["smollm2-135m", "emulated:qwen3-32b-a100"]


def plan_cells(quick: bool, profiles, targets):
    for target in targets:
        if quick and target not in QUICK_TARGETS:
            continue
        for profile in profiles:
            if quick and profile not in QUICK_PROFILES:
                continue
            for mode in MODES:
                drafters = [None] if mode == "cloud-only" else DRAFTERS
                for drafter in drafters:
                    if quick and drafter == "draft-q8" and not (mode.startswith("picospec")
                                                                and target.startswith("emulated")):
                        continue
                    yield target, profile, mode, drafter


def gen_config(mode: str, emulated: bool, max_tokens: int) -> GenConfig:
    base = dict(max_tokens=max_tokens, sampling=SAMPLING, emulate_device=DEVICE if emulated else None)
    if mode == "sync":
        return GenConfig(mode="sync", adaptive=False, **base)
    if mode.startswith("picospec"):
        return GenConfig(mode="picospec", codec=mode[-1], **base)
    return GenConfig(mode=mode, **base)


def run(args) -> int:
    from edge.derive import ensure
    from edge.llama_model import LlamaDrafter, Tokenizer
    from edge.model_files import shipped_gguf
    tok = Tokenizer(shipped_gguf())
    drafters = {name: LlamaDrafter(ensure(name), n_threads=1) for name in DRAFTERS}
    rows: list[dict] = []
    edge_only_cache: dict = {}
    t_start = time.monotonic()
    cells = list(plan_cells(args.quick, args.profiles, args.targets))
    by_stack: dict = {}
    for c in cells:
        by_stack.setdefault((c[0], c[1]), []).append(c)
    done = 0
    for (target, profile), group in by_stack.items():
        emulated = target.startswith("emulated:")
        n_prompts, n_tokens = 8, 64
        prompts = [tok.encode(p) for p in PROMPTS[:n_prompts]]
        with stack(profile, emulate_target=target.split(":", 1)[1] if emulated else None) as (cloud, link):
            todo = []                          # (mode, drafter, cache key, Cell or cached result)
            for _, _, mode, dname in group:
                key = (dname, emulated, n_prompts, n_tokens)
                if mode == "edge-only" and key in edge_only_cache:
                    todo.append((mode, dname, key, edge_only_cache[key]))  # the edge alone never touches the link
                    continue
                todo.append((mode, dname, key, Cell(None if mode == "edge-only" else link.address,
                                                    None if mode == "cloud-only" else drafters[dname], tok,
                                                    gen_config(mode, emulated, n_tokens))))
            running = [c for *_, c in todo if isinstance(c, Cell)]
            try:
                # Prompt by prompt, every mode in turn: the modes compared share the same moments of the box.
                for i, p in enumerate(prompts):
                    for c in running:
                        c.run(p)
                    print(f"[spec {profile} {target}: prompt {i + 1}/{len(prompts)} in every mode, "
                          f"{time.monotonic() - t_start:5.0f}s]", flush=True)
            finally:
                for c in running:
                    c.close()
            for mode, dname, key, c in todo:
                done += 1
                r = c.result if isinstance(c, Cell) else c
                if mode == "edge-only":
                    edge_only_cache[key] = r
                row = {"profile": profile, "mode": mode, "target": target, "drafter": dname or "none",
                       "tokens_per_s": round(r.tokens_per_s, 3), "ttft_s": round(r.ttft_s, 4),
                       "acceptance_rate": None if r.acceptance_rate is None else round(r.acceptance_rate, 3),
                       "bytes_up_per_token": round(r.bytes_up / max(r.tokens, 1), 2),
                       "bytes_down_per_token": round(r.bytes_down / max(r.tokens, 1), 2),
                       "bytes_up_per_drafted_token": round(r.bytes_up / r.drafted, 2) if r.drafted else None,
                       "emulated": emulated, "prompts": n_prompts, "max_tokens": n_tokens,
                       "fallbacks": r.fallbacks}
                rows.append(row)
                print(f"[spec {done}/{len(cells)} {time.monotonic() - t_start:5.0f}s] {profile:<13} {mode:<11} "
                      f"{target:<24} {dname or '-':<10} {r.tokens_per_s:6.1f} tok/s  ttft {r.ttft_s * 1e3:5.0f} ms  "
                      f"accept {row['acceptance_rate']}", flush=True)
    for row in rows:
        base = next((x for x in rows if x["mode"] == "cloud-only" and x["profile"] == row["profile"]
                     and x["target"] == row["target"]), None)
        row["speedup"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3) if base and base["tokens_per_s"] else None
    write_outputs(rows, args.json)
    print(f"spec: {len(rows)} rows in {time.monotonic() - t_start:.0f} s -> {args.json}")
    return 0


def write_outputs(rows: list[dict], path: Path) -> None:
    write_json(rows, path)
    md = ["# tandem-bench spec", "", __doc__.strip(), "",
          "speedup = tokens/s over cloud-only on the same profile and target.", "",
          markdown_table(rows, COLUMNS)]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    plt = pyplot()
    targets = sorted({r["target"] for r in rows})
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        series = [(m, d) for m in ("sync", "picospec-P", "picospec-Q") for d in DRAFTERS]
        profiles = [p for p in PROFILES if any(r["profile"] == p and r["target"] == target for r in rows)]
        width = 0.8 / len(series)
        for i, (m, d) in enumerate(series):
            ys = [next((r["speedup"] or 0 for r in rows if r["profile"] == p and r["target"] == target
                        and r["mode"] == m and r["drafter"] == d), 0) for p in profiles]
            ax.bar([x + i * width for x in range(len(profiles))], ys, width, label=f"{m} ({d})")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(profiles))], profiles)
        ax.set_title(target + (" (emulated)" if target.startswith("emulated") else " (real)"))
        ax.set_ylabel("speedup over cloud-only")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
