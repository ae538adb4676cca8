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

Datasets (--dataset): builtin (eight chat questions), humaneval (code
prompts, completed raw), mtbench (first turns); see bench/datasets.py. Each
row names its dataset; speedups compare with cloud-only on the same dataset.

Trees: picospec-Q runs once with chains (tree none) and once with --tree auto
(tree: the shape most often sent, siblings per level along the chain, e.g.
2-1-1-1; none if the planner kept chains). accepted_per_pass = drafted tokens
accepted per verified block (each block is verified in one pass, merged with
the blocks queued beside it; it depends on the block length the planner
chose), a taken sibling included; acceptance_rate stays
the chain's own (a position whose sibling was taken counts as a rejection of
the chain's token), so it compares with chain rows. Codec P carries no trees
at T>0 (kernels/tree.py says why).

Emulated cells run with row caches on both sides (`cloud-verifier --target-cache`,
the drafter behind `edge.draft_cache`, in --cache-dir, kept across cells and runs),
so a step whose rows were computed before costs only its modelled time, whatever
the load of this machine. Each emulated row reports real over modelled compute:
real_over_modelled for the verifier's passes, draft_real_over_modelled for draft
steps (above 1, the figure measured this machine, not the modelled hardware),
with both caches' hit rates. Behind a hit the drafter's model is brought up to
the sequence on a thread of its own while the step's modelled time runs, so a
later miss evaluates its own tokens and not the stretch of hits before it
(draft_caught_up_tokens at misses, draft_background_tokens behind hits).
--no-cache measures as before.

MoE drafters (moe-25-ufs, moe-25-sd, moe-50-ufs, moe-50-sd): the DyMoE drafter
at that expert budget on that modelled flash, emulated targets only, modes
sync and picospec-Q, its compute held to the pi5-moe device; their rows split
each draft step into compute (this CPU's and the device's) and storage stall
and name what keeps speculation from paying (bench/spec_moe.py).

--quick: the PicoSpec WAN only, the real and the emulated 32B target,
HumanEval and MT-bench, 4 prompts x 64 tokens per cell, drafters draft-l29
and the two 25 % MoE drafters (these on 2 prompts per dataset).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench import datasets, spec_moe
from bench.harness import VERIFIER_COUNTERS, Cell, stack, verifier_counters
from bench.report import RESULTS, markdown_table, pyplot, write_json
from common.procs import free_port
from edge.config import GenConfig
from kernels.sampling import SamplingConfig

PROFILES = ["lan", "picospec-wan", "lte", "3g"]
MODES = ["cloud-only", "edge-only", "sync", "picospec-P", "picospec-Q"]
TARGETS = ["smollm2-135m", "emulated:qwen3-32b-a100", "emulated:llama-70b-a100"]
DRAFTERS = ["draft-l29", "draft-q8"]       # default (realistic acceptance), best (near-copy)
DEVICE = "jetson-orin"                     # the dense drafters' device; MoE drafters': spec_moe.DEVICE
PROMPTS = datasets.BUILTIN
TREE_MODES = {"picospec-Q": ["off", "auto"]}   # chain and tree rows (--trees); other modes run chains
SAMPLING = SamplingConfig(temperature=0.7, top_p=0.9, seed=7)
COLUMNS = ["dataset", "profile", "mode", "tree", "target", "drafter", "tokens_per_s", "speedup", "ttft_s",
           "acceptance_rate", "accepted_per_pass", "bytes_up_per_token", "bytes_up_per_drafted_token",
           "bytes_down_per_token", "emulated", "real_over_modelled", "draft_real_over_modelled"]
MOE_COLUMNS = ["dataset", "mode", "target", "drafter", "tokens_per_s", "speedup", "speculated", "planner_right",
               "acceptance_rate", "draft_compute_modelled_s", "draft_compute_real_s", "draft_stall_s",
               "limited_by", "breakeven_acceptance", "ttft_s", "real_over_modelled"]


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true",
                    help="picospec-wan only, real and emulated 32B targets, HumanEval and MT-bench, 4 prompts x "
                         "64 tokens per cell, drafter draft-l29 (< 8 min on 2 cores)")
    ap.add_argument("--dataset", nargs="+", choices=datasets.DATASETS, default=None,
                    help="prompt sets (default: builtin; with --quick: humaneval mtbench)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per dataset (default: 8; --quick: 4)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per completion (default: %(default)s)")
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES, help="modes to run (default: all)")
    ap.add_argument("--trees", nargs="+", default=TREE_MODES["picospec-Q"], choices=["off", "auto", "always"],
                    help="tree settings picospec-Q runs with, one row each (default: %(default)s)")
    ap.add_argument("--drafters", nargs="+", default=None, choices=DRAFTERS + list(spec_moe.DRAFTERS),
                    help="drafters: dense GGUFs, and the DyMoE drafter at an expert budget (25 or 50 %%) on "
                         "modelled flash (ufs or sd), emulated targets only, modes sync and picospec-Q "
                         f"(default: all; --quick: draft-l29 and the 25 %% MoE drafters, these on "
                         f"{QUICK_MOE_PROMPTS} prompts per dataset)")
    ap.add_argument("--json", type=Path, default=RESULTS / "spec.json", help="output JSON (default: %(default)s)")
    ap.add_argument("--profiles", nargs="+", default=PROFILES, help="link-sim profiles to run")
    ap.add_argument("--targets", nargs="+", default=TARGETS, choices=TARGETS)
    ap.add_argument("--cache-dir", type=Path, default=RESULTS / "cache",
                    help="row caches of the emulated target and drafter, reused across cells and runs "
                         "(default: %(default)s)")
    ap.add_argument("--no-cache", action="store_true",
                    help="emulated cells compute every row for real (as before the caches)")


QUICK_PROFILES = ["picospec-wan"]
QUICK_TARGETS = ["smollm2-135m", "emulated:qwen3-32b-a100"]
QUICK_DATASETS = ["humaneval", "mtbench"]
QUICK_DRAFTERS = ["draft-l29", "moe-25-ufs", "moe-25-sd"]
QUICK_MOE_PROMPTS = 2         # a MoE sync completion takes 20-40 s here: --quick runs them on fewer prompts


def plan_cells(quick: bool, profiles, targets, modes=MODES, drafters=None, trees=None):
    """(target, profile, mode, drafter, tree setting) per cell."""
    drafters = drafters or (QUICK_DRAFTERS if quick else DRAFTERS + list(spec_moe.DRAFTERS))
    for target in targets:
        if quick and target not in QUICK_TARGETS:
            continue
        for profile in profiles:
            if quick and profile not in QUICK_PROFILES:
                continue
            for mode in modes:
                for drafter in [None] if mode == "cloud-only" else drafters:
                    moe = spec_moe.is_moe(drafter)
                    if moe and (mode not in spec_moe.MODES or not target.startswith("emulated:")):
                        continue
                    for tree in (trees or TREE_MODES["picospec-Q"]) if mode in TREE_MODES and not moe else ["off"]:
                        yield target, profile, mode, drafter, tree


def gen_config(mode: str, emulated: bool, max_tokens: int, tree: str = "off", device: str = DEVICE) -> GenConfig:
    base = dict(max_tokens=max_tokens, sampling=SAMPLING, emulate_device=device if emulated else None, tree=tree)
    if mode == "sync":
        return GenConfig(mode="sync", adaptive=False, **base)
    if mode.startswith("picospec"):
        return GenConfig(mode="picospec", codec=mode[-1], **base)
    return GenConfig(mode=mode, **base)


def tree_label(r) -> str:
    """The shape most often sent, or 'none' when every block was a chain."""
    shapes = r.tree_shapes
    return max(shapes, key=shapes.get) if shapes else "none"


def run(args) -> int:
    from edge.derive import ensure
    from edge.llama_model import LlamaDrafter, Tokenizer
    from edge.model_files import shipped_gguf
    tok = Tokenizer(shipped_gguf())
    cells = list(plan_cells(args.quick, args.profiles, args.targets, args.modes, args.drafters, args.trees))
    used = {c[3] for c in cells}
    why = spec_moe.missing() if any(spec_moe.is_moe(d) for d in used) else None
    if why:
        print(f"[spec] MoE-drafter rows skipped: {why}", flush=True)
        cells = [c for c in cells if not spec_moe.is_moe(c[3])]
    dense = [name for name in DRAFTERS if name in used]
    drafters = {name: LlamaDrafter(ensure(name), n_threads=1) for name in dense}
    emulated_drafters = dict(drafters)
    if not args.no_cache:      # their own instances: a cached drafter's model must see only its own calls
        from edge.draft_cache import cached_drafter
        emulated_drafters = {name: cached_drafter(LlamaDrafter(ensure(name), n_threads=1), ensure(name),
                                                  args.cache_dir, **LlamaDrafter.ROW_SETTINGS)
                             for name in dense}
    # MoE drafters compute for real (no row cache: which copy of an expert a step uses depends on
    # its reads' timing), held to their device; emulated targets only
    emulated_drafters.update({name: spec_moe.build(name) for name in used if spec_moe.is_moe(name)})
    if any(spec_moe.is_moe(name) for name in used):
        print(f"[spec] MoE drafters' compute held to {spec_moe.DEVICE}: {spec_moe.device_source()}", flush=True)
    rows: list[dict] = []
    edge_only_cache: dict = {}
    t_start = time.monotonic()
    names = args.dataset or (QUICK_DATASETS if args.quick else ["builtin"])
    n_prompts = args.prompts or (4 if args.quick else 8)
    n_tokens = args.max_tokens
    sets = {name: [tok.encode(p.text, raw=p.raw) for p in datasets.load(name, n_prompts)] for name in names}
    by_stack: dict = {}
    for c in cells:
        by_stack.setdefault((c[0], c[1]), []).append(c)
    done, total = 0, len(cells) * len(sets)
    for (target, profile), group in by_stack.items():
        emulated = target.startswith("emulated:")
        metrics = f"127.0.0.1:{free_port()}"
        cloud_args = ["--metrics", metrics] + (["--target-cache", str(args.cache_dir)]
                                               if emulated and not args.no_cache else [])
        with stack(profile, emulate_target=target.split(":", 1)[1] if emulated else None,
                   cloud_args=cloud_args) as (cloud, link):
            for dataset, prompts in sets.items():
                done = _run_dataset(rows, dataset, prompts, group, target, profile, emulated, n_tokens, link,
                                    QUICK_MOE_PROMPTS if args.quick and not args.prompts else len(prompts),
                                    emulated_drafters if emulated else drafters, tok, edge_only_cache, t_start,
                                    done, total, metrics)
    add_speedups(rows)
    spec_moe.judge(rows)
    for d in {id(d): d for d in [*drafters.values(), *emulated_drafters.values()]}.values():
        d.close()
    write_outputs(rows, args.json)
    print(f"spec: {len(rows)} rows in {time.monotonic() - t_start:.0f} s -> {args.json}")
    return 0


def add_speedups(rows: list[dict]) -> None:
    """speedup = tokens/s over cloud-only's on the same dataset, profile, target and prompts (rows
    run on fewer prompts, MoE rows in --quick, compare with cloud-only over those first prompts)."""
    for row in rows:
        base = next((x for x in rows if x["mode"] == "cloud-only" and x["profile"] == row["profile"]
                     and x["target"] == row["target"] and x["dataset"] == row["dataset"]), None)
        b = None
        if base is not None:
            b = base.get("tokens_per_s_first_prompts", {}).get(str(row["prompts"]))
            if b is None and row["prompts"] == base["prompts"]:
                b = base["tokens_per_s"]
        row["speedup"] = round(row["tokens_per_s"] / b, 3) if b else None


def _run_dataset(rows, dataset, prompts, group, target, profile, emulated, n_tokens, link, moe_prompts, drafters, tok,
                 edge_only_cache, t_start, done, total, metrics: str) -> int:
    """Every cell of one stack on one dataset's prompts, taking turns prompt by prompt."""
    n_prompts = len(prompts)
    todo = []                          # (mode, drafter, tree, cache key, Cell or cached result)
    for _, _, mode, dname, tree in group:
        key = (dname, emulated, dataset, n_prompts, n_tokens)
        if mode == "edge-only" and key in edge_only_cache:
            todo.append((mode, dname, tree, key, edge_only_cache[key]))  # the edge alone never touches the link
            continue
        device = spec_moe.DEVICE if spec_moe.is_moe(dname) else DEVICE
        todo.append((mode, dname, tree, key, Cell(None if mode == "edge-only" else link.address,
                                                  None if mode == "cloud-only" else drafters[dname], tok,
                                                  gen_config(mode, emulated, n_tokens, tree, device))))
    running = [c for *_, c in todo if isinstance(c, Cell)]
    moe_cells = {id(c) for _, dname, _, _, c in todo if spec_moe.is_moe(dname)}
    verifier = {id(c): dict.fromkeys(VERIFIER_COUNTERS, 0.0) for c in running}   # each cell's share of passes
    first: dict[int, float] = {}       # tokens/s over the prompts the MoE cells ran, for their speedup
    try:
        # Prompt by prompt, every mode in turn: the modes compared share the same moments of the box.
        # The turn starts one mode later each prompt: at T>0 the first to meet a prompt's text
        # finds the fewest rows cached (the text changes with lead timing), and no mode should
        # always be that one.
        for i, p in enumerate(prompts):
            if i == moe_prompts:
                first = {id(c): c.result.tokens_per_s for c in running}
            turn = i % len(running) if running else 0
            for c in running[turn:] + running[:turn]:
                if i >= moe_prompts and id(c) in moe_cells:
                    continue
                before = verifier_counters(metrics)
                c.run(p)
                after = verifier_counters(metrics)
                for k in VERIFIER_COUNTERS:
                    verifier[id(c)][k] += after[k] - before[k]
            print(f"[spec {profile} {target} {dataset}: prompt {i + 1}/{len(prompts)} in every mode, "
                  f"{time.monotonic() - t_start:5.0f}s]", flush=True)
    finally:
        for c in running:
            c.close()
    for mode, dname, tree, key, c in todo:
        done += 1
        r = c.result if isinstance(c, Cell) else c
        if mode == "edge-only":
            edge_only_cache[key] = r
        v = verifier.get(id(c)) if isinstance(c, Cell) else None
        row = {"dataset": dataset, "profile": profile, "mode": mode, "tree": tree_label(r),
               "tree_setting": tree, "target": target, "drafter": dname or "none",
               "tokens_per_s": round(r.tokens_per_s, 3), "ttft_s": round(r.ttft_s, 4),
               "acceptance_rate": None if r.acceptance_rate is None else round(r.acceptance_rate, 3),
               "bytes_up_per_token": round(r.bytes_up / max(r.tokens, 1), 2),
               "bytes_down_per_token": round(r.bytes_down / max(r.tokens, 1), 2),
               "bytes_up_per_drafted_token": round(r.bytes_up / r.drafted, 2) if r.drafted else None,
               "emulated": emulated, "prompts": min(n_prompts, moe_prompts) if id(c) in moe_cells else n_prompts,
               "max_tokens": n_tokens,
               "fallbacks": r.fallbacks, "passes": r.passes, "siblings": r.siblings,
               "sibling_hits": r.sibling_hits,
               "accepted_per_pass": round((r.accepted + r.sibling_hits) / r.passes, 3) if r.passes else None,
               "device": (spec_moe.DEVICE if spec_moe.is_moe(dname) else DEVICE) if dname and emulated else None,
               "speculated": r.speculated_tokens > 0,
               **spec_moe.step_fields(r.draft_steps, r.draft_real_s, r.draft_modelled_s, r.draft_stall_s),
               **compute_fields(r, v)}
        if id(c) in first:
            row["tokens_per_s_first_prompts"] = {str(moe_prompts): round(first[id(c)], 3)}
        rows.append(row)
        print(f"[spec {done}/{total} {time.monotonic() - t_start:5.0f}s] {dataset:<9} {profile:<13} {mode:<11} "
              f"{row['tree']:<9} {target:<24} {dname or '-':<10} {r.tokens_per_s:6.1f} tok/s  "
              f"ttft {r.ttft_s * 1e3:5.0f} ms  accept {row['acceptance_rate']}  per pass {row['accepted_per_pass']}"
              f"  real/model verifier {row['real_over_modelled']} draft {row['draft_real_over_modelled']}"
              f"  cache hits {row['target_cache_hit_rate']}/{row['draft_cache_hit_rate']}",
              flush=True)
    return done


def compute_fields(r, v: dict | None) -> dict:
    """Real compute over modelled, verifier and drafter, with the row caches' hit rates (None where
    nothing was modelled)."""
    def ratio(a, b):
        return round(a / b, 3) if b else None
    out = {"draft_real_over_modelled": ratio(r.draft_real_s, r.draft_modelled_s),
           "draft_cache_hit_rate": ratio(r.draft_hits, r.draft_hits + r.draft_misses),
           # the drafter's model brought up to the sequence: at misses (on a draft step's path) and
           # behind hits (while the step's modelled time ran)
           "draft_caught_up_tokens": r.draft_caught_up, "draft_background_tokens": r.draft_background}
    v = v or dict.fromkeys(VERIFIER_COUNTERS, 0.0)
    out.update(real_over_modelled=ratio(v["tandem_verifier_pass_real_seconds"],
                                        v["tandem_verifier_pass_modelled_seconds"]),
               passes_over_model=int(v["tandem_verifier_passes_over_model"]),
               target_cache_hit_rate=ratio(v["tandem_verifier_target_cache_hits"],
                                           v["tandem_verifier_target_cache_hits"]
                                           + v["tandem_verifier_target_cache_misses"]))
    return out


def write_outputs(rows: list[dict], path: Path) -> None:
    write_json(rows, path)
    md = ["# tandem-bench spec", "", __doc__.strip(), "",
          "speedup = tokens/s over cloud-only on the same dataset, profile and target.", ""]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        md += [f"## {dataset}", "", markdown_table([r for r in rows if r["dataset"] == dataset], COLUMNS), ""]
    moe = [r for r in rows if spec_moe.is_moe(r["drafter"])]
    if moe:
        md += ["## The DyMoE drafter (design card)", "", spec_moe.__doc__.strip(), "",
               f"Device: {spec_moe.device_source()}.", "", markdown_table(moe, MOE_COLUMNS), ""]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    plt = pyplot()
    panels = list(dict.fromkeys((r["dataset"], r["target"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (dataset, target) in zip(axes[0], panels):
        here = [r for r in rows if r["dataset"] == dataset and r["target"] == target]
        series = list(dict.fromkeys((r["mode"], r["drafter"], r["tree_setting"]) for r in here
                                    if r["mode"] in ("sync", "picospec-P", "picospec-Q")))
        profiles = [p for p in PROFILES if any(r["profile"] == p for r in here)]
        width = 0.8 / max(1, len(series))
        for i, (m, d, t) in enumerate(series):
            ys = [next((r["speedup"] or 0 for r in here if r["profile"] == p and r["mode"] == m
                        and r["drafter"] == d and r["tree_setting"] == t), 0) for p in profiles]
            label = f"{m} ({d})" + (" tree" if t != "off" else "")
            ax.bar([x + i * width for x in range(len(profiles))], ys, width, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(profiles))], profiles)
        ax.set_title(f"{dataset}: {target}" + (" (emulated)" if target.startswith("emulated") else " (real)"))
        ax.set_ylabel("speedup over cloud-only")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
