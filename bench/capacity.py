"""`tandem-bench capacity`: how many edge sessions one emulated GPU verifier serves at an SLO.

The real daemons: one cloud-verifier holding an emulated target (real SmolLM2
tokens, each batched pass held to the GPU time sim/costmodel.py models for
it), a link-sim per link profile in front of it, and N edge sessions from the
load generator (bench/loadgen.py: the real client and speculative loop, the
real drafter's proposals replayed along the target's greedy path, an emulated
Jetson Orin's draft-step time). N ramps 1, 2, 4, ... 64 for each mode:
cloud-only (streaming from the target), sync (stop-and-wait speculative
decoding, `edge-agent --mode sync`) and picospec (pipelined); a mode's ramp
stops once its p10 per-session rate falls below the lowest SLO.

Capacity at an SLO is the largest N whose p10 per-session tokens/s, and that
of every smaller N, stays at or above it, with no session failed; goodput is
the aggregate tokens/s per GPU at that N (Llama-70B in bf16 takes two A100s).
The headline is the capacity per target and mode over every dataset and link
profile (the smallest), the table has it per dataset and profile too.

--quick: emulated Qwen3-32B on A100, MT-bench, picospec-wan, N = 1 2 4 8 16 32,
24 tokens per session, the three modes (under 10 minutes on 2 cores). The full
run: both targets, MT-bench and HumanEval, picospec-wan and lte, N up to 64,
64 tokens per session (tens of minutes: computing the replayed paths alone
takes minutes per dataset on 2 cores).

Writes --json PATH: {"rows": [...], "capacity": {TARGET: {MODE: {"10": N,
"20": N}}}, "capacity_cells": [per dataset and profile, with goodput],
"meta": {...}}, and PATH's .md table and .png plot (p10 against N per mode).

Reading it: on a CPU, a real pass for many sessions can take longer than the
modelled GPU pass, and then the figure measures the machine, not the GPU
(emulation only ever slows down). `real_over_modelled` says how far (> 1: the
machine was the bottleneck), where the verifier exports its real and modelled
pass time; `--target-cache DIR` has the verifier memoise target rows so that
emulated passes cost only their modelled time. `loadgen_kept_up` false means
the generator itself needed most of a core, so sessions waited for it.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
import urllib.request
from pathlib import Path

from bench import datasets
from bench.harness import scrape
from bench.loadgen import DEVICE, replay_work, run_cell, start_stack
from bench.report import RESULTS, markdown_table, pyplot, write_json
from sim.latency import TARGETS as LATENCY_TARGETS

TARGETS = ["emulated:qwen3-32b-a100", "emulated:llama-70b-a100"]
MODES = ["cloud-only", "sync", "picospec"]
DATASETS = ["mtbench", "humaneval"]
PROFILES = ["picospec-wan", "lte"]
FULL_N = [1, 2, 4, 8, 16, 32, 64]
QUICK_N = [1, 2, 4, 8, 16, 32]
SLOS = [10.0, 20.0]
# A cell whose real compute exceeded this share of the modelled time, or in which more than
# this share of passes ran past their model, is measured again, up to WARM_RETRIES times, with
# the target cache it just filled (the first run's ratio stays in the row as
# cold_real_over_modelled). A few cold passes hide in a low average: one miss late in a
# session makes its sequence catch up on the whole prefix, a stall every session feels.
WARM_RETRY_ABOVE = 0.5
WARM_RETRY_OVER_SHARE = 0.01
WARM_RETRIES = 3
COLUMNS = ["target", "gpu", "dataset", "profile", "mode", "n_sessions", "session_tokens_per_s_p50",
           "session_tokens_per_s_p10", "inter_token_p99_s", "ttft_s_p50", "aggregate_tokens_per_s",
           "verifier_passes_per_s", "tokens_per_pass", "acceptance_rate", "real_over_modelled", "pass_s_mean",
           "modelled_pass_s", "target_cache_hit_rate", "failed", "served_tokens_per_s_p10", "loadgen_cpu_share", "loadgen_kept_up"]
CAPACITY_COLUMNS = ["target", "dataset", "profile", "mode", "slo_tokens_per_s", "capacity", "lower_bound",
                    "goodput_tokens_per_s_per_gpu", "largest_n_tried", "loadgen_kept_up"]


def refusals(metrics_port: int) -> float:
    """RESOURCE_EXHAUSTED answers the verifier has given so far (a full verifier, or one at
    its SLO): every refused Open or Generate, a retrying edge's each time."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(r'^tandem_verifier_refusals_total\{code="RESOURCE_EXHAUSTED"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def slo_key(slo: float) -> str:
    """The JSON key of an SLO: '10' for 10.0."""
    return f"{slo:g}"


def gpus_of(target: str) -> tuple[str, int]:
    """(GPU name, GPUs per deployment) of an emulated target's profile."""
    d = LATENCY_TARGETS[target.split(":", 1)[1]].deployment
    return d.gpu.name, d.gpus


def modelled_pass_s(target: str, tokens_per_pass: float | None) -> float | None:
    """The cost model's time for a pass of the cell's mean size (its default KV): beside
    pass_s_mean, a rough sign of a CPU-bound cell where the verifier exports no modelled time."""
    if not tokens_per_pass:
        return None
    return LATENCY_TARGETS[target.split(":", 1)[1]].forward_s(round(tokens_per_pass))


def meets(row: dict, slo: float) -> bool:
    p10 = row.get("session_tokens_per_s_p10")
    return p10 is not None and p10 >= slo and not row.get("failed")


def ramp_capacity(rows: list[dict], slo: float) -> tuple[int, dict | None]:
    """(capacity, its row) over one ramp's rows: the largest N such that it and every smaller N
    tried meet the SLO; (0, None) when N = 1 already misses it."""
    best: tuple[int, dict | None] = (0, None)
    for r in sorted(rows, key=lambda r: r["n_sessions"]):
        if not meets(r, slo):
            break
        best = (r["n_sessions"], r)
    return best


def capacity_cells(rows: list[dict], slos=SLOS) -> list[dict]:
    """Capacity per target, dataset, profile, mode and SLO, with goodput at that point."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["dataset"], r["profile"], r["mode"]), []).append(r)
    out = []
    for (target, dataset, profile, mode), steps in groups.items():
        tried = max(r["n_sessions"] for r in steps)
        for slo in slos:
            n, at = ramp_capacity(steps, slo)
            below = [r for r in steps if r["n_sessions"] <= n]
            out.append({"target": target, "dataset": dataset, "profile": profile, "mode": mode,
                        "slo_tokens_per_s": slo, "capacity": n,
                        # every N tried met the SLO: the verifier carries at least this many
                        "lower_bound": n == tried,
                        "goodput_tokens_per_s_per_gpu": at["aggregate_tokens_per_s"] / at["gpus"] if at else None,
                        "largest_n_tried": tried,
                        "loadgen_kept_up": all(r.get("loadgen_kept_up", True) for r in below)})
    return out


def capacity(rows: list[dict], slos=SLOS) -> dict[str, dict[str, dict[str, int]]]:
    """{target: {mode: {"10": N, "20": N}}}: the smallest capacity over the datasets and link
    profiles measured, i.e. what holds for all of them."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for c in capacity_cells(rows, slos):
        per = out.setdefault(c["target"], {}).setdefault(c["mode"], {})
        key = slo_key(c["slo_tokens_per_s"])
        per[key] = min(per.get(key, c["capacity"]), c["capacity"])
    return out


def ramp(modes: list[str], ns: list[int], floor: float, measure, stopped=lambda mode, n: None) -> list[dict]:
    """Rows of measure(mode, n) for n in ns, the modes taking turns at each N (so a change in a
    shared machine's load is not charged to one of them); a mode drops out after its first
    row that misses the floor SLO, and stopped(mode, n) is told."""
    rows, live = [], list(modes)
    for n in ns:
        for mode in list(live):
            r = measure(mode, n)
            rows.append(r)
            if not meets(r, floor):
                live.remove(mode)
                stopped(mode, n)
        if not live:
            break
    return rows


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true",
                    help="emulated:qwen3-32b-a100, mtbench, picospec-wan, N = 1 2 4 8 16 32, 24 tokens, all three "
                         "modes (under 10 min on 2 cores); flags below narrow or widen it")
    ap.add_argument("--json", type=Path, default=RESULTS / "capacity.json",
                    help="output JSON (+ .md, .png beside it) (default: %(default)s)")
    ap.add_argument("--targets", nargs="+", choices=TARGETS, help=f"default: {' '.join(TARGETS)}")
    ap.add_argument("--modes", nargs="+", choices=MODES, help=f"default: {' '.join(MODES)}")
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, help=f"default: {' '.join(DATASETS)}")
    ap.add_argument("--profiles", nargs="+", help=f"link-sim profiles (default: {' '.join(PROFILES)})")
    ap.add_argument("--sessions", type=int, nargs="+", metavar="N",
                    help=f"the ramp's N (default: {' '.join(map(str, FULL_N))})")
    ap.add_argument("--tokens", type=int, help="tokens per session (default: 24 quick, 64 full)")
    ap.add_argument("--slo", type=float, nargs="+", default=SLOS, metavar="TOK_S",
                    help="per-session tokens/s SLOs; a ramp stops below the lowest (default: 10 20)")
    ap.add_argument("--target-cache", type=Path, metavar="DIR", default=RESULTS / "cache",
                    help="cloud-verifier --target-cache: memoised target rows, so that an emulated pass costs "
                         "only its modelled time and figures stay faithful at high N; the first run fills it "
                         "(default: %(default)s, shared with tandem-bench spec)")
    ap.add_argument("--admission-slo", type=float, metavar="TOK_S",
                    help="start the verifier with --slo-tokens-per-s TOK_S (admission by SLO) and run every N "
                         "given, past the capacity point: refused edges count as failed, and "
                         "served_tokens_per_s_p10 is the p10 of the sessions it admitted")
    ap.add_argument("--no-cache", action="store_true",
                    help="the verifier computes every row for real: past a few sessions, rows then measure "
                         "this CPU (real_over_modelled > 1)")


def plan(args) -> dict:
    """The grid a run covers: what --quick and the flags pick."""
    quick = args.quick
    return {"targets": args.targets or (TARGETS[:1] if quick else TARGETS),
            "modes": args.modes or MODES,
            "datasets": args.datasets or (DATASETS[:1] if quick else DATASETS),
            "profiles": args.profiles or (PROFILES[:1] if quick else PROFILES),
            "ns": sorted(set(args.sessions or (QUICK_N if quick else FULL_N))),
            "tokens": args.tokens or (24 if quick else 64),
            "slos": sorted(args.slo)}


def gen_config(mode: str, n_tokens: int):
    from edge.config import GenConfig
    return GenConfig(mode=mode, max_tokens=n_tokens, stop_at_eos=False, require_cloud=True,
                     emulate_device=DEVICE if mode != "cloud-only" else None)


def run(args) -> int:
    from edge.llama_model import Tokenizer
    from edge.model_files import shipped_gguf
    t_start = time.monotonic()
    g = plan(args)
    ns, n_tokens, floor = g["ns"], g["tokens"], g["slos"][0]

    def say(line: str) -> None:
        print(f"[capacity] {line}  [{time.monotonic() - t_start:.0f}s]", file=sys.stderr, flush=True)

    cache = None if args.no_cache else args.target_cache
    g["target_cache"] = str(cache) if cache else None
    tok = Tokenizer(shipped_gguf())
    work = {}
    for name in g["datasets"]:
        prompts = [tok.encode(p.text, raw=p.raw) for p in datasets.load(name, max(ns))]
        say(f"{name}: target greedy paths and replayed drafter proposals for {len(prompts)} prompts ...")
        # kept beside the row caches: a rerun of the same prompts skips minutes of real decoding
        work[name] = replay_work(prompts, n_tokens, memo_dir=cache)
    # a context per session that holds the longest prompt and its continuation, no more: N sequences of it
    n_ctx = max(len(w.prompt) for ws in work.values() for w in ws) + n_tokens + 64
    extra = ["--n-ctx", str(n_ctx)] + (["--target-cache", str(cache)] if cache else [])
    extra += ["--slo-tokens-per-s", f"{args.admission_slo:g}"] if args.admission_slo else []

    rows: list[dict] = []
    for target in g["targets"]:
        gpu, gpus = gpus_of(target)
        # headroom over N: an edge that switches from speculation to streaming re-opens its session
        stack = start_stack(target, g["profiles"], max(ns) + 4, *extra)
        say(f"{target} ({gpus}x {gpu}) verifier up, {stack.threads} threads, links: {' '.join(g['profiles'])}")
        if stack.cache_read_only:
            say(f"WARNING: another process writes the target cache {cache}: this run reads it but cannot "
                "add to it, so cells that miss stay cold (stop that process, or give --target-cache another DIR)")
        try:
            for dataset in g["datasets"]:
                for profile in g["profiles"]:
                    def measure(mode: str, n: int) -> dict:
                        def cell() -> dict:
                            return run_cell(stack.links[profile].address, tok, work[dataset],
                                            gen_config(mode, n_tokens), n, stack.metrics_port, tag="capacity")
                        refused0 = refusals(stack.metrics_port)
                        r, first = cell(), None
                        for _ in range(WARM_RETRIES if cache else 0):
                            if ((r["real_over_modelled"] or 0) <= WARM_RETRY_ABOVE
                                    and (r["passes_over_model_share"] or 0) <= WARM_RETRY_OVER_SHARE):
                                break
                            # this CPU, not the modelled GPU, set the pace: measure again with the
                            # rows the cell just cached (cloud-only and accepted drafts hit; rows
                            # after a rejected draft token are keyed by where blocks happened to
                            # start, which timing decides, so they fill over a few runs)
                            say(f"{mode} N={n}: real/modelled {r['real_over_modelled']:.2f}, "
                                f"{100 * (r['passes_over_model_share'] or 0):.0f} % of passes over the model, "
                                "measuring again warm")
                            first = first if first is not None else r["real_over_modelled"]
                            r = cell()
                        r = {"target": target, "gpu": gpu, "gpus": gpus, "dataset": dataset, "profile": profile,
                             "mode": mode, **r, "modelled_pass_s": modelled_pass_s(target, r["tokens_per_pass"]),
                             "tokens_per_session": n_tokens, "emulated": True, "verifier_threads": stack.threads,
                             "cold_real_over_modelled": first, "admission_slo": args.admission_slo,
                             "target_cache_read_only": stack.cache_read_only}
                        if args.admission_slo:
                            # what admission had measured by the cell's end: real over modelled as
                            # streams saw it, by which it scaled the cost model
                            r["admission_slowdown"] = scrape(f"127.0.0.1:{stack.metrics_port}").get(
                                "tandem_verifier_slo_slowdown")
                            # refused attempts over the cell (warm re-runs included): a refused edge
                            # waits out retry-after-ms and tries again, and counts as failed only when
                            # its retries run out
                            r["admission_refusals"] = refusals(stack.metrics_port) - refused0
                        rom = r["real_over_modelled"]
                        say(f"{target} {dataset} {profile} {mode} N={n}: p10 {r['session_tokens_per_s_p10']:.1f} "
                            f"p50 {r['session_tokens_per_s_p50']:.1f} tok/s/session, "
                            f"{r['aggregate_tokens_per_s']:.1f} aggregate, {r['tokens_per_pass'] or 0:.1f} tok/pass"
                            + (f", real/modelled {rom:.2f}" if rom is not None else "")
                            + ("" if r["loadgen_kept_up"] else ", load generator saturated")
                            + (f"; admitted {r['served_sessions']}/{n}, their p10 {r['served_tokens_per_s_p10'] or 0:.1f}, "
                               f"{r['admission_refusals']:.0f} refusals, slowdown {r['admission_slowdown'] or 0:.3f}"
                               if args.admission_slo else ""))
                        return r

                    if args.admission_slo:      # refusals are the point: every N, past the capacity point
                        rows += [measure(mode, n) for n in ns for mode in g["modes"]]
                    else:
                        rows += ramp(g["modes"], ns, floor, measure,
                                     lambda mode, n: say(f"{mode}: below {floor:g} tok/s at N={n}, ramp stopped"))
        finally:
            stack.stop()
    write_outputs(rows, g, args.json, time.monotonic() - t_start)
    return 0


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or platform.system()}"


def write_outputs(rows: list[dict], g: dict, path: Path, seconds: float) -> None:
    cells = capacity_cells(rows, g["slos"])
    cap = capacity(rows, g["slos"])
    meta = {"tokens_per_session": g["tokens"], "slos_tokens_per_s": " ".join(map(slo_key, g["slos"])),
            "load_generator": f"replayed draft-l29 proposals along the target's greedy path (T=0), {DEVICE} "
                              "draft-step timing; the sessions of a link profile share one link-sim",
            "real_over_modelled": "present" if any(r["real_over_modelled"] is not None for r in rows)
                                  else "not exported by this verifier (pass_s_mean: wall time per pass)",
            "machine": machine(), "target_cache": g.get("target_cache"), "seconds": round(seconds, 1)}
    write_json({"rows": rows, "capacity": cap, "capacity_cells": cells, "meta": meta}, path)
    head = ["| target | mode | " + " | ".join(f"sessions at {slo_key(s)} tok/s" for s in g["slos"]) + " |",
            "|---|---|" + "---|" * len(g["slos"])]
    head += [f"| {t} | {m} | " + " | ".join(str(v[slo_key(s)]) for s in g["slos"]) + " |"
             for t, modes in cap.items() for m, v in modes.items()]
    md = [f"# tandem-bench capacity\n\n{__doc__.split(chr(10) * 2)[0]}\n", "## Capacity (smallest over datasets and "
          "profiles)\n", *head, "", "## Per dataset and profile\n", markdown_table(cells, CAPACITY_COLUMNS), "",
          "## Rows\n", markdown_table(rows, COLUMNS)]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot(rows, g["slos"], path.with_suffix(".png"))
    print("\n".join(md[1:]))
    print(f"[capacity] wrote {path} (+ .md, .png) in {seconds:.0f}s", file=sys.stderr)


def plot(rows: list[dict], slos: list[float], path: Path) -> None:
    """Per-session p10 against N, a line per mode, a panel per target, dataset and profile."""
    plt = pyplot()
    panels = sorted({(r["target"], r["dataset"], r["profile"]) for r in rows})
    if not panels:
        return
    cols = min(2, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4 * nrows), squeeze=False)
    for ax, (target, dataset, profile) in zip(axes.flat, panels):
        for mode in MODES:
            pts = sorted((r["n_sessions"], r["session_tokens_per_s_p10"]) for r in rows
                         if (r["target"], r["dataset"], r["profile"], r["mode"]) == (target, dataset, profile, mode))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
        for slo in slos:
            ax.axhline(slo, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{target} (emulated), {dataset}, {profile}", fontsize=9)
        ax.set_xlabel("concurrent sessions N")
        ax.set_ylabel("p10 per-session tokens/s")
        ax.set_xscale("log", base=2)
        ns = sorted({r["n_sessions"] for r in rows})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

